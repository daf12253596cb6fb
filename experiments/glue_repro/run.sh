#!/usr/bin/env bash
# Reproduces experiments/glue_repro/results/ (issue 10, part 3) on a 2-core CPU machine, through the
# tunekd CLIs only (tunekd.run, tunekd.report, tunekd.angles). Everything heavy (the MLflow store with
# the saved students, Ray results, the teacher caches) goes to $REPRO_WORK (default /tmp/glue_repro),
# outside the repository; only small result files are written to results/.
#
#   experiments/glue_repro/run.sh        # from anywhere; ~2 hours on 2 CPU cores (README.md, "Wall time")
#
# Env: DATA_ROOT   folder holding the GLUE folders sst2/ and mnli/ (default <repo>/../shared/data)
#      REPRO_WORK  scratch folder (default /tmp/glue_repro)
#      PYTHON      interpreter with tunekd installed (default: python)
#      JOBS        studies run side by side, one thread each (default 3: on 2 cores the third one
#                  shares them; the MNLI copy-init study is started early so that it is not left last)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DATA_ROOT="$(cd "${DATA_ROOT:-$REPO/../shared/data}" && pwd)"
WORK="${REPRO_WORK:-/tmp/glue_repro}"
PY="${PYTHON:-python}"
JOBS="${JOBS:-3}"
RESULTS="$HERE/results"
. "$REPO/experiments/common.sh"  # environment, cd "$WORK", URI, stamp, completed_run, keep_logs

# One study invocation: tunekd.run with one CPU; its log in $WORK/logs/<name>.log.
study() {
  local name=$1; shift
  if "$PY" -m tunekd.run "$@" --num-cpus 1 --tracking-uri "$URI" > "$WORK/logs/$name.log" 2>&1; then
    stamp "$name"
  else
    echo "[run.sh] $name failed (exit $?):"; tail -20 "$WORK/logs/$name.log"; return 1
  fi
}
# A pool of $JOBS slots: `spawn NAME ARGS...` starts a study when a slot is free; `spawn_first` also
# waits until the study's MLflow parent run exists, i.e. its teacher is fine-tuned and its teacher-output
# cache built, so that a second study of the same task reuses both (by content hash) instead of racing.
RUNNING=0
spawn() {
  if (( RUNNING >= JOBS )); then wait -n || true; RUNNING=$((RUNNING - 1)); fi
  study "$@" & RUNNING=$((RUNNING + 1))
}
spawn_first() {
  local name=$1 pid
  spawn "$@"; pid=$!
  until grep -qs "parent run" "$WORK/logs/$name.log"; do
    kill -0 "$pid" 2>/dev/null || { echo "[run.sh] $name ended before its parent run:"; tail -20 "$WORK/logs/$name.log"; exit 1; }
    sleep 5
  done
}
drain() { while (( RUNNING > 0 )); do wait -n || true; RUNNING=$((RUNNING - 1)); done; }

SST2=(--set task.data_dir="$DATA_ROOT/sst2")
MNLI=(--set task.data_dir="$DATA_ROOT/mnli")
RANDOM_INIT=(--set 'search.student.init.grid=[random]' --set train.lr=5e-4)
COPY_INIT=(--set 'search.student.init.grid=[copy]')

stamp start
# 1. The strategy grids: per task, the random-init and the copy-init invocation of one study (one MLflow
#    experiment). The random-init invocation of a task fine-tunes its teacher and builds its
#    teacher-output cache. MNLI copy init: seeds 0..2 only (tune.seeds.max=3), for the time budget.
spawn_first sst2_random "$HERE/sst2.yaml" "${SST2[@]}" "${RANDOM_INIT[@]}"
spawn_first mnli_random "$HERE/mnli.yaml" "${MNLI[@]}" "${RANDOM_INIT[@]}"
spawn mnli_copy "$HERE/mnli.yaml" "${MNLI[@]}" "${COPY_INIT[@]}" --set tune.seeds.max=3
spawn sst2_copy "$HERE/sst2.yaml" "${SST2[@]}" "${COPY_INIT[@]}"
# 2. λ sensitivity, SST-2, random init, forward: λ ∈ {1, 10} x seeds 0..2 (λ = 3 and λ = 0 = `none`
#    come from the strategy grid).
spawn lambda_sst2 "$HERE/lambda.yaml" "${SST2[@]}"
drain

# 3. Reports: every strategy against forward (the adaptive reference: TOST verdicts, margin 1 point)
#    and against none (does matching beat no matching?), per task.
for t in sst2 mnli; do
  for ref in forward none; do
    "$PY" -m tunekd.report --experiment "glue_repro_$t" --tracking-uri "$URI" --reference "$ref" --margin 1.0 \
      --out "$RESULTS/$t/vs_$ref" > "$WORK/logs/report_${t}_vs_$ref.log" 2>&1
  done
done
"$PY" -m tunekd.report --experiment glue_repro_lambda_sst2 --tracking-uri "$URI" --margin 1.0 \
  --out "$RESULTS/sst2/lambda" > "$WORK/logs/report_lambda.log" 2>&1
stamp reports

# 4. Angles on SST-2 dev (128 sentences): students at initialisation, and the trained forward students
#    (seed 0) of both inits, against the fine-tuned teacher.
TEACHER="$(grep -oE '/[^ ]*\.tunekd_cache/teachers/[0-9a-f]+' "$WORK/logs/sst2_random.log" | head -1)"
ANG=(--task sst2 --data-dir "$DATA_ROOT/sst2" --samples 128 --max-length 64 --tracking-uri "$URI" --experiment glue_repro_angles)
angles_run() {
  local name=$1; shift
  "$PY" -m tunekd.angles "$@" "${ANG[@]}" --out "$RESULTS/sst2/angles/$name" > "$WORK/logs/angles_$name.log" 2>&1
}
angles_run init_copy --student copy --teacher "$TEACHER" --layers 3 --seed 0
angles_run init_random --student random --teacher "$TEACHER" --layers 3 --seed 0
angles_run trained_copy_forward --student "run:$(completed_run glue_repro_sst2 student.init=copy distill.strategy=forward seed=0)"
angles_run trained_random_forward --student "run:$(completed_run glue_repro_sst2 student.init=random distill.strategy=forward seed=0)"
stamp angles

# 5. Small text outputs kept with the results: the studies' summaries, the angle logs, the wall times,
#    and the combined tables (tables.py).
keep_logs '^\[tunekd\]|^ *[a-z_]+·' sst2_random sst2_copy mnli_random mnli_copy lambda_sst2
for f in init_copy init_random trained_copy_forward trained_random_forward; do
  grep -v 'Downloading artifacts' "$WORK/logs/angles_$f.log" > "$RESULTS/logs/angles_$f.txt" || true
done
cp "$WORK/logs/wall_times.txt" "$RESULTS/wall_times.txt"
"$PY" "$HERE/tables.py" "$RESULTS"
echo "[run.sh] done in $(( $(date +%s) - T0 )) s; results in $RESULTS"
