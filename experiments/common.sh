# Sourced by the experiments' run.sh scripts once they have set WORK (scratch folder) and RESULTS:
# the offline, loopback-only environment, the scratch folder as working directory, the MLflow URI in it,
# and `stamp NAME` (appends "NAME <seconds since start>" to $WORK/logs/wall_times.txt).
export HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled
mkdir -p "$WORK/logs" "$RESULTS"
cd "$WORK"
URI="sqlite:///$WORK/mlflow.db"
T0=$(date +%s)
stamp() { echo "$1 $(( $(date +%s) - T0 ))" >> "$WORK/logs/wall_times.txt"; echo "[run.sh] $1 at +$(( $(date +%s) - T0 )) s"; }
: > "$WORK/logs/wall_times.txt"
