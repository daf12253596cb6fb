"""The quickstart study end to end on a local Ray: teacher cache on vs off, and ASHA vs FIFO.

    python benchmarks/study.py                               # search_spaces/quickstart.yaml as it is
    python benchmarks/study.py --set task.synthetic.train_size=320 --set train.epochs=3

Runs the study in-process through the project's own driver (the steps of `tunekd.driver.StudyDriver`,
with `RunOptions(track=False)`: no MLflow) on one local Ray, once per variant:

- `baseline`: ASHA, teacher cache off and no length buckets (as before either existed);
- `online`: ASHA, teacher cache off (every trial runs the teacher in every step);
- `cached`: ASHA, teacher cache on (built once before the trials, included in the wall time);
- `fifo`:   FIFO, teacher cache on (every trial runs all its epochs).

The teacher is fine-tuned (or found in `.tunekd_cache` under the work folder) before any of them
and is not timed; each run has its own storage folder, so each cached run builds its cache (timed).
With `--rounds N` the variants run N times in alternating order and the figures are medians. Reported: wall time of each run and the ratio cached/online; teacher forward
passes per training example (the cache build plus every trial's `perf/teacher_rows`, divided by
the training rows); trial start-up (`perf/startup_s`: entering `run_trial` to the first step) of
warm workers (not the first trial of a worker process in that run) and the first ones; ASHA vs FIFO trial-epochs
and best `eval/accuracy`; the padding fraction of an epoch with and without length buckets.
Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default=str(REPO / "search_spaces" / "quickstart.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="study override, as for python -m tunekd.run")
    p.add_argument("--variants", default="baseline,online,cached,fifo",
                   help="comma list of: baseline, online, cached, fifo")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the variants this many times, alternating their order; figures are medians")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--workdir", default=None, help="folder for Ray results, caches (default: a temp folder)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def variant_study(name: str, study, workdir: Path):
    """The study as variant `name` runs it: its own storage folder (so each cached run builds its cache)."""
    tune_cfg = {"storage_path": str(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))),
                "scheduler": "fifo" if name == "fifo" else "asha"}
    update = {"tune": study.tune.model_copy(update=tune_cfg)}
    if name in ("online", "baseline"):
        update["teacher"] = study.teacher.model_copy(update={"cache_budget_gb": 0.0})
    if name == "baseline":  # as before the teacher cache and length buckets existed
        update["train"] = study.train.model_copy(update={"bucket_by_length": False})
    return study.model_copy(update=update)


def history_callback():
    """A Tune callback keeping every trial's reported results in memory (independent of Ray's per-trial result
    files, which a study may turn off with `tune.ray_loggers: false`)."""
    from ray import tune

    class History(tune.Callback):
        def __init__(self):
            self.results: dict[str, list[dict]] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.results.setdefault(trial.trial_id, []).append(dict(result))

    return History()


def drive(study, callbacks=(), log=log):
    """(driver, wall seconds): `study` through the project's driver (`tunekd.driver.StudyDriver`, without
    MLflow) on the Ray this process started; its untimed steps (task, data, the fine-tuned teacher), then the
    timed ones (teacher-output cache, tuner, trials). `callbacks`: more Tune callbacks."""
    from tunekd.driver import RunOptions, StudyDriver

    driver = StudyDriver(study, RunOptions(track=False), log=log)
    driver.setup_task()
    driver.preflight()
    driver.connect()  # the Ray `main` started: used as it is
    driver.setup_data()
    driver.setup_teacher()
    t0 = time.perf_counter()
    driver.setup_cache()
    driver.setup_tracking()
    driver.setup_tuner()
    driver.tuner._local_tuner.get_run_config().callbacks.extend(callbacks)  # as driver.attach_callbacks does
    driver.fit()
    return driver, time.perf_counter() - t0


def run_variant(name: str, study, workdir: Path) -> dict:
    """One variant through the project's own driver (`tunekd.driver.StudyDriver`, without MLflow): its
    untimed steps (task, data, the fine-tuned teacher: cached under workdir/.tunekd_cache), then the timed
    ones (teacher-output cache, tuner, trials)."""
    history = history_callback()
    driver, wall = drive(variant_study(name, study, workdir), callbacks=[history])
    grid, info, encoded = driver.results, driver.cache, driver.encoded
    import pandas as pd

    from tunekd.checkpoints import disk_bytes

    trials = []
    for result in grid:
        if result.error:
            raise RuntimeError(f"{name}: a trial failed: {result.error}")
        df = pd.DataFrame(history.results[result.metrics["trial_id"]])
        last = df.iloc[-1]
        trials.append({"epochs": int(len(df)), "teacher_rows": float(last["perf/teacher_rows"]),
                       "startup_s": float(df["perf/startup_s"].iloc[0]), "pid": int(last["pid"]),
                       "start": float(df["timestamp"].iloc[0]) - float(df["time_total_s"].iloc[0]),
                       "best_acc": float(df["eval/accuracy"].max()), "last_acc": float(last["eval/accuracy"]),
                       "teacher_built": float(last.get("perf/teacher_built", float("nan"))),
                       "checkpoint_s": float(last["perf/checkpoint_s"]), "trial_s": float(last["time_total_s"])})
    kept = sum(f.stat().st_size for f in Path(driver.ray_path).glob("*/checkpoint_*/model.safetensors"))
    warm, cold, seen = [], [], set()
    for t in sorted(trials, key=lambda t: t["start"]):
        (warm if t["pid"] in seen else cold).append(t["startup_s"])
        seen.add(t["pid"])
    n = len(encoded["train"])
    passes = (info.teacher_rows + sum(t["teacher_rows"] for t in trials)) / n
    out = {
        "wall_s": wall, "trials": len(trials), "trial_epochs": sum(t["epochs"] for t in trials),
        "teacher_passes_per_example": passes, "cache_mode": info.mode, "cache_reason": info.reason,
        "cache_build_s": info.seconds, "startup_warm_s": statistics.median(warm) if warm else None,
        "startup_cold_s": statistics.median(cold) if cold else None,
        "startup_warm_max_s": max(warm) if warm else None,
        "best_accuracy": max(t["last_acc"] for t in trials),
        "best_accuracy_any_epoch": max(t["best_acc"] for t in trials),
        "teacher_built_trials": sum(1 for t in trials if t["teacher_built"] == 1.0),
        # what the finished study leaves in its Ray folder (the shared teacher cache lies beside it)
        "disk_per_finished_trial_mb": disk_bytes(driver.ray_path) / len(trials) / 1e6,
        # of which: the weights of the best `tune.keep_students` trials, and everything else per trial
        "disk_kept_students_mb": kept / 1e6,
        "disk_other_per_trial_kb": (disk_bytes(driver.ray_path) - kept) / len(trials) / 1e3,
        # writing and handing checkpoints to Tune, of the trials' own time
        "checkpoint_fraction": sum(t["checkpoint_s"] for t in trials) / sum(t["trial_s"] for t in trials),
    }
    log(f"{name}: wall {wall:.1f} s, {out['trial_epochs']} trial-epochs, teacher passes/example {passes:.2f}, "
        f"start-up warm {out['startup_warm_s']} cold {out['startup_cold_s']}, best acc {out['best_accuracy']:.2f}, "
        f"disk {out['disk_per_finished_trial_mb']:.2f} MB/trial, checkpoints {out['checkpoint_fraction']:.1%} of trial time")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    import transformers

    from tunekd.data import padding_report
    from tunekd.study import grid_size, load_study

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    study = load_study(args.study, args.overrides)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunekd-bench-study-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the teacher fine-tune cache (.tunekd_cache) and Ray results land here
    from tunekd.data import encode_splits
    from tunekd.driver import StudyDriver

    probe = StudyDriver(study, log=log)  # the study's task, for the padding figures and the table
    probe.setup_task()
    encoded = encode_splits(probe.raw, probe.tokenizer, probe.spec, study.task.max_length, family=probe.family)
    pad = padding_report(encoded["train"], study.train.batch_size, seed=study.seed)
    log(f"padding of an epoch: every row at full width {pad['full_width']:.1%}, random batches "
        f"{pad['random']:.1%}, length buckets {pad['bucketed']:.1%}")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    try:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):  # alternate the order so a drifting machine load evens out
            for v in (variants if r % 2 == 0 else list(reversed(variants))):
                runs[v].append(run_variant(v, study, workdir))
    finally:
        ray.shutdown()

    def med(v, key):
        vals = [x[key] for x in runs[v] if x[key] is not None]
        return statistics.median(vals) if vals else None

    print(f"\n{study.name}: {grid_size(study) * study.tune.num_samples} trials x {study.train.epochs} epochs, "
          f"{len(encoded['train'])} training rows, {args.num_cpus} CPUs, max {study.tune.max_concurrent_trials} "
          f"concurrent trials, {args.rounds} round(s)")
    print(f"{'run':<8} {'wall s':>7} {'trial-ep':>8} {'s/trial-ep':>10} {'teacher/ex':>10} {'warm start s':>12} "
          f"{'first start s':>13} {'best acc':>8} {'cache':>6}")
    for v, rs in runs.items():
        for r in rs:
            warm = f"{r['startup_warm_s']:.3f}" if r["startup_warm_s"] is not None else "-"
            cold = f"{r['startup_cold_s']:.3f}" if r["startup_cold_s"] is not None else "-"
            print(f"{v:<8} {r['wall_s']:>7.1f} {r['trial_epochs']:>8d} {r['wall_s'] / r['trial_epochs']:>10.2f} "
                  f"{r['teacher_passes_per_example']:>10.2f} {warm:>12} {cold:>13} {r['best_accuracy']:>8.2f} "
                  f"{r['cache_mode']:>6}")
    for v, rs in runs.items():
        for r in rs:
            r["wall_per_trial_epoch_s"] = r["wall_s"] / r["trial_epochs"]
    summary = {"study": study.name, "overrides": args.overrides, "train_rows": len(encoded["train"]),
               "rounds": args.rounds, "padding": pad, "runs": runs}
    if "cached" in runs and "online" in runs:
        summary["wall_ratio_cached"] = round(med("cached", "wall_s") / med("online", "wall_s"), 3)
        summary["wall_per_trial_epoch_ratio_cached"] = round(
            med("cached", "wall_per_trial_epoch_s") / med("online", "wall_per_trial_epoch_s"), 3)
    if "cached" in runs and "baseline" in runs:
        summary["wall_ratio_vs_baseline"] = round(med("cached", "wall_s") / med("baseline", "wall_s"), 3)
        summary["wall_per_trial_epoch_ratio_vs_baseline"] = round(
            med("cached", "wall_per_trial_epoch_s") / med("baseline", "wall_per_trial_epoch_s"), 3)
    all_runs = [r for rs in runs.values() for r in rs]
    summary["disk_per_finished_trial_mb"] = round(statistics.median(r["disk_per_finished_trial_mb"] for r in all_runs), 3)
    summary["disk_kept_students_mb"] = round(statistics.median(r["disk_kept_students_mb"] for r in all_runs), 3)
    summary["disk_other_per_trial_kb"] = round(statistics.median(r["disk_other_per_trial_kb"] for r in all_runs), 2)
    summary["checkpoint_fraction"] = round(statistics.median(r["checkpoint_fraction"] for r in all_runs), 4)
    if "cached" in runs:
        summary["teacher_passes_per_example"] = round(med("cached", "teacher_passes_per_example"), 3)
        summary["trial_startup_s"] = med("cached", "startup_warm_s")
    if "online" in runs:
        summary["teacher_passes_per_example_online"] = round(med("online", "teacher_passes_per_example"), 3)
        summary["trial_startup_online_s"] = med("online", "startup_warm_s")
    if "fifo" in runs and ("cached" in runs or "online" in runs):
        asha = "cached" if "cached" in runs else "online"
        summary["asha_epoch_ratio"] = round(med(asha, "trial_epochs") / med("fifo", "trial_epochs"), 3)
        summary["best_accuracy_asha"] = med(asha, "best_accuracy")
        summary["best_accuracy_fifo"] = med("fifo", "best_accuracy")
    if "wall_ratio_cached" in summary:
        print(f"wall time cached/online: {summary['wall_ratio_cached']:.2f} (per trial-epoch "
              f"{summary['wall_per_trial_epoch_ratio_cached']:.2f})")
    if "wall_ratio_vs_baseline" in summary:
        print(f"wall time cached (with length buckets) / baseline (neither): {summary['wall_ratio_vs_baseline']:.2f} "
              f"(per trial-epoch {summary['wall_per_trial_epoch_ratio_vs_baseline']:.2f})")
    if "asha_epoch_ratio" in summary:
        print(f"trial-epochs ASHA/FIFO: {summary['asha_epoch_ratio']:.2f}; best accuracy ASHA "
              f"{summary['best_accuracy_asha']:.2f}, FIFO {summary['best_accuracy_fifo']:.2f}")
    print(f"disk per finished trial {summary['disk_per_finished_trial_mb']:.2f} MB (Ray folder, without the teacher "
          f"cache); checkpoints {summary['checkpoint_fraction']:.1%} of trial time (medians over runs)")
    print(json.dumps(summary, sort_keys=True, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
