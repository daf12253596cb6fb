"""The quickstart study end to end on a local Ray: teacher cache on vs off, and ASHA vs FIFO.

    python benchmarks/study.py                               # search_spaces/quickstart.yaml as it is
    python benchmarks/study.py --set task.synthetic.train_size=320 --set train.epochs=3

Runs the study's trials in-process with Ray Tune and the project's own pieces (task loading,
teacher fine-tune cache, `cache.for_study`, `trainable.tune_trainable`), without MLflow, three times:

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
import itertools
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


def trial_points(study):
    names = list(study.search)
    for combo in itertools.product(*[study.search[n].sample_points() for n in names]):
        yield dict(zip(names, combo))


def param_space(study):
    from ray import tune

    return {name: tune.grid_search(list(dim.value)) for name, dim in study.search.items()}


def prepare(study):
    """Task data and the fine-tuned teacher (cached under workdir/.tunekd_cache), like the driver does."""
    from transformers import AutoConfig, AutoTokenizer

    from tunekd.data import encode_splits
    from tunekd.models import family_for
    from tunekd.tasks import get_task, load_task
    from tunekd.teacher import prepare_teacher, resolve_model

    spec = get_task(study.task.name)
    base = resolve_model(study.teacher.model)
    family = family_for(AutoConfig.from_pretrained(base))
    raw = load_task(spec.name, study.task.data_dir, max_train_samples=study.task.max_train_samples,
                    max_eval_samples=study.task.max_eval_samples, seed=study.seed,
                    synthetic=study.task.synthetic.model_dump())
    tokenizer = AutoTokenizer.from_pretrained(base)
    encoded = encode_splits(raw, tokenizer, spec.text_fields, study.task.max_length)
    info = prepare_teacher(study, family, spec, encoded, base, tokenizer, log=log)
    return spec, family, encoded, info


def run_variant(name: str, study, spec, family, encoded, teacher_info, workdir: Path) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tunekd import cache as tcache
    from tunekd.trainable import make_shared, tune_trainable

    budget = 0.0 if name in ("online", "baseline") else float(study.teacher.cache_budget_gb or 2.0)
    if name == "baseline":  # as before the teacher cache and length buckets existed
        study = study.model_copy(update={"train": study.train.model_copy(update={"bucket_by_length": False})})
    scheduler_name = "fifo" if name == "fifo" else "asha"
    storage = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))  # its own cache: every cached run builds it
    study = study.model_copy(update={"tune": study.tune.model_copy(update={"storage_path": str(storage)})})
    t0 = time.perf_counter()
    teacher = family.load(teacher_info.path, spec)
    points = list(trial_points(study))
    info = tcache.for_study(study, family, teacher, encoded, points, budget_gb=budget, log=log)
    shared = make_shared(study, family.name, teacher, encoded, cache=info)
    del teacher
    if scheduler_name == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=study.train.epochs,
                                  grace_period=study.tune.asha.grace_period,
                                  reduction_factor=study.tune.asha.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    trainable = tune.with_resources(tune.with_parameters(tune_trainable, shared=shared),
                                    {"cpu": study.tune.resources.cpu, "gpu": study.tune.resources.gpu})
    tuner = tune.Tuner(
        trainable, param_space=param_space(study),
        tune_config=tune.TuneConfig(metric="eval/accuracy", mode="max", scheduler=scheduler,
                                    num_samples=study.tune.num_samples,
                                    max_concurrent_trials=study.tune.max_concurrent_trials,
                                    reuse_actors=study.tune.reuse_actors),
        run_config=tune.RunConfig(name=f"bench-{name}", storage_path=str(storage), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    trials = []
    for result in grid:
        if result.error:
            raise RuntimeError(f"{name}: a trial failed: {result.error}")
        df = result.metrics_dataframe
        last = df.iloc[-1]
        trials.append({"epochs": int(len(df)), "teacher_rows": float(last["perf/teacher_rows"]),
                       "startup_s": float(df["perf/startup_s"].iloc[0]), "pid": int(last["pid"]),
                       "start": float(df["timestamp"].iloc[0]) - float(df["time_total_s"].iloc[0]),
                       "best_acc": float(df["eval/accuracy"].max()), "last_acc": float(last["eval/accuracy"]),
                       "teacher_built": float(last.get("perf/teacher_built", float("nan")))})
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
    }
    log(f"{name}: wall {wall:.1f} s, {out['trial_epochs']} trial-epochs, teacher passes/example {passes:.2f}, "
        f"start-up warm {out['startup_warm_s']} cold {out['startup_cold_s']}, best acc {out['best_accuracy']:.2f}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    import transformers

    from tunekd.data import padding_report
    from tunekd.study import load_study

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    study = load_study(args.study, args.overrides)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunekd-bench-study-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the teacher fine-tune cache (.tunekd_cache) and Ray results land here
    spec, family, encoded, teacher_info = prepare(study)
    pad = padding_report(encoded["train"], study.train.batch_size, seed=study.seed)
    log(f"padding of an epoch: every row at full width {pad['full_width']:.1%}, random batches "
        f"{pad['random']:.1%}, length buckets {pad['bucketed']:.1%}")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    try:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):  # alternate the order so a drifting machine load evens out
            for v in (variants if r % 2 == 0 else list(reversed(variants))):
                runs[v].append(run_variant(v, study, spec, family, encoded, teacher_info, workdir))
    finally:
        ray.shutdown()

    def med(v, key):
        vals = [x[key] for x in runs[v] if x[key] is not None]
        return statistics.median(vals) if vals else None

    print(f"\n{study.name}: {len(list(trial_points(study)))} trials x {study.train.epochs} epochs, "
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
    print(json.dumps(summary, sort_keys=True, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
