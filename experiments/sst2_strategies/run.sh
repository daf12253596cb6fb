#!/usr/bin/env bash
# Reproduces experiments/sst2_strategies/results/ (issue 5, part 4) on a CPU machine, through the
# tunekd CLIs only. Everything heavy (MLflow store with the saved students, Ray results, the teacher
# cache) goes to $SST2_WORK (default /tmp/sst2exp), outside the repository; only the small result
# files are written to results/.
#
#   experiments/sst2_strategies/run.sh            # from anywhere; ~45 minutes on 2 shared CPU cores
#
# Env: TUNEKD_DATA_DIR  GLUE SST-2 folder (train.tsv, dev.tsv); default <repo>/../shared/data/sst2
#      SST2_WORK        scratch folder (default /tmp/sst2exp)
#      PYTHON           interpreter with tunekd installed (default: python)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DATA="$(cd "${TUNEKD_DATA_DIR:-$REPO/../shared/data/sst2}" && pwd)"
WORK="${SST2_WORK:-/tmp/sst2exp}"
PY="${PYTHON:-python}"
RESULTS="$HERE/results"
. "$REPO/experiments/common.sh"  # environment, cd "$WORK", URI, stamp, completed_run, keep_logs

# Start a study in the background; return once its MLflow parent run exists (so that the teacher is
# fine-tuned and cached, and the experiment created, by one process only). $1 = log name.
start_study() {
  local name=$1; shift
  "$PY" -m tunekd.run "$@" > "$WORK/logs/$name.log" 2>&1 &
  local pid=$!
  until grep -qs "parent run" "$WORK/logs/$name.log"; do
    if ! kill -0 "$pid" 2>/dev/null; then echo "[run.sh] $name failed:"; tail -20 "$WORK/logs/$name.log"; exit 1; fi
    sleep 5
  done
  PIDS+=("$pid")
}
wait_all() { for p in "${PIDS[@]}"; do wait "$p"; done; PIDS=(); }
PIDS=()

# 1. Strategies x init x 3 seeds (30 trials): copy init (lr 1e-4) and random init (lr 1e-3) are two
#    invocations of the same study into one MLflow experiment, run side by side with one CPU each
#    (one trial at a time each). The first one fine-tunes the MiniLM teacher (cached by content hash).
stamp start
start_study strategies_copy "$HERE/strategies.yaml" --num-cpus 1 --tracking-uri "$URI" \
  --set task.data_dir="$DATA" --set 'search.student.init.grid=[copy]'
stamp teacher_ready
start_study strategies_random "$HERE/strategies.yaml" --num-cpus 1 --tracking-uri "$URI" \
  --set task.data_dir="$DATA" --set 'search.student.init.grid=[random]' --set train.lr=1e-3
wait_all
stamp strategies_done

# 2. lambda in {1, 5, 10} x {forward, all_to_one} x 3 seeds, copy init (18 trials, 2 at a time).
start_study lambda "$HERE/lambda.yaml" --num-cpus 2 --tracking-uri "$URI" --set task.data_dir="$DATA"
wait_all
stamp lambda_done

# 3. Two saved forward students (seed 0) for the angles: copy init and random init.
start_study students_copy "$HERE/students.yaml" --num-cpus 1 --tracking-uri "$URI" --set task.data_dir="$DATA"
start_study students_random "$HERE/students.yaml" --num-cpus 1 --tracking-uri "$URI" --set task.data_dir="$DATA" \
  --set student.init=random --set train.lr=1e-3
wait_all
stamp students_done

# 4. Reports: tables, paired differences against forward with TOST (margin 1 point), plots.
"$PY" -m tunekd.report --experiment sst2_strategies --tracking-uri "$URI" --out "$RESULTS/strategies" --margin 1.0 \
  > "$WORK/logs/report_strategies.log" 2>&1
"$PY" -m tunekd.report --experiment sst2_lambda --tracking-uri "$URI" --out "$RESULTS/lambda" --margin 1.0 \
  > "$WORK/logs/report_lambda.log" 2>&1
stamp reports_done

# 5. Angles: students at initialisation against the fine-tuned teacher, and the two trained students.
TEACHER="$(grep -oE '/[^ ]*\.tunekd_cache/teachers/[0-9a-f]+' "$WORK/logs/strategies_copy.log" | head -1)"
echo "[run.sh] fine-tuned teacher: $TEACHER"
COPY_RUN=$(completed_run sst2_students student.init=copy); RANDOM_RUN=$(completed_run sst2_students student.init=random)
echo "[run.sh] trained students: copy run:$COPY_RUN, random run:$RANDOM_RUN"
ANG=(--task sst2 --data-dir "$DATA" --samples 128 --max-length 64 --tracking-uri "$URI" --experiment sst2_angles)
"$PY" -m tunekd.angles --student copy --teacher "$TEACHER" --layers 3 --seed 0 "${ANG[@]}" \
  --out "$RESULTS/angles/init_copy" > "$WORK/logs/angles_init_copy.log" 2>&1
"$PY" -m tunekd.angles --student random --teacher "$TEACHER" --layers 3 --seed 0 "${ANG[@]}" \
  --out "$RESULTS/angles/init_random" > "$WORK/logs/angles_init_random.log" 2>&1
"$PY" -m tunekd.angles --student "run:$COPY_RUN" "${ANG[@]}" \
  --out "$RESULTS/angles/trained_copy_forward" > "$WORK/logs/angles_trained_copy.log" 2>&1
"$PY" -m tunekd.angles --student "run:$RANDOM_RUN" "${ANG[@]}" \
  --out "$RESULTS/angles/trained_random_forward" > "$WORK/logs/angles_trained_random.log" 2>&1
stamp angles_done

# 6. Small text outputs kept with the results: the run logs' summaries and the wall times.
keep_logs '^\[tunekd\]|^ *[0-9a-f]{5}_[0-9]{5} |^ *[a-z_]+·' strategies_copy strategies_random lambda students_copy students_random
for f in angles_init_copy angles_init_random angles_trained_copy angles_trained_random; do
  cp "$WORK/logs/$f.log" "$RESULTS/logs/$f.txt"
done
cp "$WORK/logs/wall_times.txt" "$RESULTS/wall_times.txt"
"$PY" "$HERE/lambda_table.py" "$RESULTS"
echo "[run.sh] done in $(( $(date +%s) - T0 )) s; results in $RESULTS"
