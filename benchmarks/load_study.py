"""Load: a study of many very short trials through the real CLI; counts the MLflow child runs and
reports the wall time and the driver's peak memory (VmHWM). Prints a table and one JSON line.

    python benchmarks/load_study.py --trials 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def peak_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tunekd-load-"))
    from tunekd.fixtures import build

    teacher = build("bert", work / "teacher")
    study = work / "load.yaml"
    study.write_text(yaml.safe_dump({
        "name": "load",
        "task": {"name": "synthetic", "synthetic": {"train_size": 16, "eval_size": 16}, "max_length": 16},
        "teacher": {"model": str(teacher)},
        "student": {"layers": 2, "init": "copy"},
        "train": {"epochs": 1, "batch_size": 16},
        "search": {"seed": {"grid": list(range(args.trials))}},
        "tune": {"scheduler": "fifo", "resources": {"cpu": 1}},
    }))
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tunekd.run", str(study), "--num-cpus", str(args.cpus)], cwd=work,
                            env=env, stdout=open(work / "log.txt", "w"), stderr=subprocess.STDOUT)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, peak_kib(proc.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("load")
    runs = client.search_runs([exp.experiment_id], max_results=10_000) if exp else []
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    statuses = {}
    for r in children:
        statuses[r.data.tags.get("tunekd.status")] = statuses.get(r.data.tags.get("tunekd.status"), 0) + 1
    print(f"{'trials':>8} {'child runs':>10} {'wall s':>8} {'s/trial':>8} {'driver peak MiB':>16}  statuses")
    print(f"{args.trials:>8} {len(children):>10} {wall:>8.1f} {wall / max(args.trials, 1):>8.2f} "
          f"{peak / 1024:>16.0f}  {statuses}")
    print(json.dumps({"trials": args.trials, "child_runs": len(children), "wall_s": round(wall, 1),
                      "driver_peak_mib": round(peak / 1024), "statuses": statuses, "exit_code": proc.returncode,
                      "log": str(work / "log.txt")}))


if __name__ == "__main__":
    main()
