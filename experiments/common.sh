# Sourced by the experiments' run.sh scripts once they have set WORK (scratch folder) and RESULTS:
# the offline, loopback-only environment, the scratch folder as working directory, the MLflow URI in it,
# `stamp NAME` (appends "NAME <seconds since start>" to $WORK/logs/wall_times.txt), and `keep_logs`.
export HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled
mkdir -p "$WORK/logs" "$RESULTS"
cd "$WORK"
URI="sqlite:///$WORK/mlflow.db"
T0=$(date +%s)
stamp() { echo "$1 $(( $(date +%s) - T0 ))" >> "$WORK/logs/wall_times.txt"; echo "[run.sh] $1 at +$(( $(date +%s) - T0 )) s"; }
: > "$WORK/logs/wall_times.txt"

# `completed_run EXPERIMENT PARAM=VALUE...`: the id of the newest completed trial run of EXPERIMENT whose
# params have these values (for `tunekd.angles --student run:ID`); needs $PY.
completed_run() {
  "$PY" - "$URI" "$@" <<'PYEOF'
import sys, mlflow
client = mlflow.tracking.MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name(sys.argv[2])
query = " and ".join(["tags.`tunekd.status` = 'completed'"]
                     + [f"params.`{k}` = '{v}'" for k, v in (a.split("=", 1) for a in sys.argv[3:])])
print(client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id)
PYEOF
}

# `keep_logs PATTERN NAME...`: the lines of $WORK/logs/NAME.log that match PATTERN (grep -E), without the
# per-epoch lines, into $RESULTS/logs/NAME.txt: the small part of a study's log kept with its results.
keep_logs() {
  local pattern=$1 f
  shift
  mkdir -p "$RESULTS/logs"
  for f in "$@"; do
    grep -E "$pattern" "$WORK/logs/$f.log" | grep -v ' epoch [0-9]*:' > "$RESULTS/logs/$f.txt" || true
  done
}
