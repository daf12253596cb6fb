"""Trial groups (issue 21): the per-member step time of a group of K, and a study's wall time grouped / not.

    python benchmarks/groups.py             # steps: 5 timed reps; study: 1024 SST-2 rows x 2 epochs
    python benchmarks/groups.py --quick     # under 10 minutes on 2 cores: 2 reps; 256 rows x 1 epoch
    python benchmarks/groups.py --part step --ks 1,5,10 --device cuda --precision bf16 --sequential   # GPU

Part `step` — the bert-base shape of `kd_step.py` (a random-init 12 x 768 teacher run online, 3-layer
copy-init students, batch 32, length 128, λ = 3, α_kl = 1, `--threads` 2): `plain` is one student's
fine-tuning step (CE only, `distill.train_step`); a group of K is one `distill.step_members` call for K
members (strategies forward, reverse, all_to_one, random, none, then again) sharing one teacher forward
(`distill.SharedForward`), each with its own generators. The per-member step is the group's step / K, given
as a ratio to `plain`, from wall time and (`_cpu`) from the process's CPU time (all threads): on a machine
other processes load, wall time stretches the long group steps more than the short plain one, CPU time much
less. The variants are interleaved rep by rep (the K groups are the first K of the same members, so their
weights move on; the time of a step does not depend on them), each figure a median;
`--sequential`: each K built, timed and freed in turn, with its peak memory (CUDA: max_memory_allocated).

Part `study` — SST-2 (`--rows` training rows, 256 of the 872 dev rows), the MiniLM-L6 teacher fine-tuned once (not
timed), 3-layer students, five strategies x 2 seeds, FIFO, 2 concurrent Ray trials of 1 CPU each, through
the project's driver (`StudyDriver`, no MLflow): `ungrouped` (10 Ray trials) and `grouped`
(`tune.group_by: [distill.strategy]`, 2 Ray trials of 5), with the teacher-output cache off (`online`:
every Ray trial runs its teacher) and on (`cached`, its build timed). Wall time from the teacher-output
cache step to the end of the trials, as `benchmarks/study.py`. The grouped and ungrouped students are the
same trials: their final dev accuracies are compared (`max_accuracy_diff`, expected 0).

Prints tables, then one line of JSON with `k5_over_plain` (and `k5_over_plain_cpu`), `study_wall_ratio`
(grouped / ungrouped, cache off), `study_wall_ratio_cached` (cache on) and the load average before and after.
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

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]  # tunekd without being installed; kd_step beside this file
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for key, value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_USAGE_STATS_ENABLED", "0"),
                   ("RAY_AUTH_MODE", "disabled"), ("RAY_AIR_NEW_OUTPUT", "0"),
                   ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")):
    os.environ.setdefault(key, value)

STRATEGIES = ["forward", "reverse", "all_to_one", "random", "none"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer reps and rows: under 10 minutes on 2 cores")
    p.add_argument("--part", default="step,study", help="comma list of: step, study")
    p.add_argument("--ks", default="1,2,5", help="group sizes of part step")
    p.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--device", default="cpu", help="cpu or cuda (part step)")
    p.add_argument("--precision", default="fp32", help="fp32 or bf16 (part step)")
    p.add_argument("--sequential", action="store_true", help="part step: one K at a time, with its peak memory")
    p.add_argument("--shape", default="bert-base", help="part step's teacher: bert-base, or minilm (a smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rows", type=int, default=None, help="SST-2 training rows of part study (1024; --quick 256)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs of part study (2; --quick 1)")
    p.add_argument("--data", default=os.path.join(os.environ.get("TUNEKD_DATA_DIR", str(REPO.parent / "shared" / "data")),
                                                  "sst2"), help="SST-2 folder (default $TUNEKD_DATA_DIR/sst2)")
    p.add_argument("--teacher", default="minilm", help="part study's base teacher (a study ref or a folder)")
    p.add_argument("--workdir", default=None, help="part study's Ray results and teacher cache (default: temporary)")
    p.add_argument("--out", default=None, help="also write result.json here")
    args = p.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 5)
    args.rows = args.rows or (256 if args.quick else 1024)
    args.epochs = args.epochs or (1 if args.quick else 2)
    return args


def log(msg: str) -> None:
    print(f"[groups] {msg}", file=sys.stderr, flush=True)


# --- part step ---------------------------------------------------------------------------------------


def build_members(n: int, family, teacher, spec, t_layers: int, student_layers: int = 3):
    from tunekd import distill, plan
    from tunekd.students import build_projections, build_student
    from tunekd.study import StudentConfig, Study

    members = []
    for i in range(n):
        strategy = STRATEGIES[i % len(STRATEGIES)]
        study = Study.model_validate({"name": "bench", "task": {"name": "sst2"}, "teacher": {"model": "minilm"},
                                      "student": {"layers": student_layers, "init": "copy"},
                                      "distill": {"strategy": strategy, "lambda_hid": 3.0, "alpha_kl": 1.0}})
        layer_map = plan.resolve(study, t_layers, family.match_embeddings_default).layer_map
        st = build_student(teacher, family, spec, StudentConfig(layers=student_layers, init="copy"), seed=i)
        width = family.hidden_size(teacher.config)
        proj = build_projections(layer_map, width, width, seed=i, stacks=list(family.stacks(st.model)))
        d = distill.Distiller(family=family, student=st.model, teacher=teacher, layer_map=list(layer_map),
                              distill=study.distill, projections=proj)
        members.append(distill.Member(d, rng=distill.generator_states()))
    return members


def bench_steps(args, log=log) -> dict:
    """Median seconds of a plain step and of a group step for each K; per-member ratios to plain."""
    from kd_step import make_data, make_teacher

    from tunekd import distill
    from tunekd.study import TrainConfig
    from tunekd.tasks import get_task

    device = torch.device(args.device)
    ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    spec = get_task("sst2")
    family, teacher = make_teacher(args.shape, spec)
    teacher.to(device)
    t_layers = family.num_layers(teacher.config)
    n_batches = 4
    data = make_data(args.batch_size * n_batches, args.length, teacher.config.vocab_size)
    train_cfg = TrainConfig(precision=args.precision, lr=1e-5, warmup_ratio=0.0)

    def new_state(d):
        d.to(device)
        d.student.train()
        return distill.make_state(d, train_cfg, 1000, 1)

    def batch_of(rep):
        return distill._to_device(data.batch(np.arange(args.batch_size) + args.batch_size * (rep % n_batches)),
                                  device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain_step(plain, rep):
        d, state = plain
        float(distill.train_step(d, state, batch_of(rep), train_cfg, device)["loss"].detach())

    def group_step(members, rep):
        for m in members:  # one SharedForward per call: this step's batch is new to it
            m.distiller.shared_forward = forward
        parts = distill.step_members(members, batch_of(rep), train_cfg, device, None, _raise)
        float(sum(p["loss"].detach() for _, p in parts))

    def timed(fn, *a):
        """(wall seconds, CPU seconds of this process: every thread's, kernel included) of `fn(*a)`"""
        sync()
        t, c = time.perf_counter(), time.process_time()
        fn(*a)
        sync()
        return time.perf_counter() - t, time.process_time() - c

    from tunekd.students import build_student
    from tunekd.study import StudentConfig

    plain = distill.Distiller(family=family, student=build_student(teacher, family, spec, StudentConfig(layers=3),
                                                                   seed=99).model)
    plain = (plain, new_state(plain))
    times: dict[str, list[float]] = {"plain": [], **{f"k{k}": [] for k in ks}}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    peak: dict[str, float] = {}
    forward = None
    if args.sequential:
        for name in ["plain", *[f"k{k}" for k in ks]]:
            members = []
            if name != "plain":
                members = build_members(int(name[1:]), family, teacher, spec, t_layers)
                for m in members:
                    m.state = new_state(m.distiller)
                forward = distill.SharedForward(family, teacher, [m.distiller for m in members])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for rep in range(args.warmup + args.reps):
                s, c = timed(plain_step, plain, rep) if name == "plain" else timed(group_step, members, rep)
                if rep >= args.warmup:
                    times[name].append(s)
                    cpu[name].append(c)
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
            log(f"{name}: median {statistics.median(times[name]):.3f} s" + (f", peak {peak[name]:.2f} GiB"
                                                                             if name in peak else ""))
            del members
    else:
        members = build_members(max(ks), family, teacher, spec, t_layers)
        for m in members:
            m.state = new_state(m.distiller)
        forwards = {k: distill.SharedForward(family, teacher, [m.distiller for m in members[:k]]) for k in ks}
        names = ["plain", *[f"k{k}" for k in ks]]
        for rep in range(args.warmup + args.reps):
            for name in names if rep % 2 == 0 else reversed(names):  # interleaved, alternating order
                if name == "plain":
                    s, c = timed(plain_step, plain, rep)
                else:
                    forward = forwards[int(name[1:])]
                    s, c = timed(group_step, members[:int(name[1:])], rep)
                if rep >= args.warmup:
                    times[name].append(s)
                    cpu[name].append(c)
            log(f"rep {rep + 1}/{args.warmup + args.reps}: " + ", ".join(
                f"{n} {times[n][-1]:.2f} s (CPU {cpu[n][-1]:.2f} s)" for n in names if rep >= args.warmup)
                + f"; load {os.getloadavg()[0]:.1f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"plain_s": med["plain"], "group_s": {k: med[f"k{k}"] for k in ks},
           "per_member_s": {k: med[f"k{k}"] / k for k in ks},
           "per_member_over_plain": {k: med[f"k{k}"] / k / med["plain"] for k in ks},
           # the same from CPU time, which other processes on a loaded machine stretch much less than wall time
           "plain_cpu_s": statistics.median(cpu["plain"]),
           "per_member_over_plain_cpu": {k: statistics.median(cpu[f"k{k}"]) / k / statistics.median(cpu["plain"])
                                         for k in ks},
           "reps": args.reps, "shape": args.shape, "device": str(device), "precision": args.precision, "threads": args.threads,
           "batch_size": args.batch_size, "length": args.length}
    if peak:
        out["peak_gib"] = peak
    return out


def _raise(member, exc):
    raise exc


# --- part study --------------------------------------------------------------------------------------


def study_of(args, workdir: Path):
    from tunekd.study import Study

    return Study.model_validate({
        "name": "groups_bench", "seed": 0,
        "task": {"name": "sst2", "data_dir": str(Path(args.data).resolve()), "max_length": 64,
                 "max_train_samples": args.rows, "max_eval_samples": 256},
        "teacher": {"model": args.teacher, "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 32},
                    "cache_dir": str(workdir / ".tunekd_cache"), "sanity": "off"},
        "student": {"layers": 3, "init": "copy"},
        "distill": {"strategy": "forward", "lambda_hid": 3.0, "alpha_kl": 1.0},
        "train": {"epochs": args.epochs, "batch_size": 32, "lr": 1e-4},
        "search": {"distill.strategy": {"grid": ["none", "forward", "reverse", "all_to_one", "random"]},
                   "seed": {"grid": [0, 1]}},
        "tune": {"scheduler": "fifo", "resources": {"cpu": 1}, "max_concurrent_trials": 2, "keep_students": 0},
    })


def run_study(name: str, base, workdir: Path) -> dict:
    """One variant through the driver's steps (no MLflow; `benchmarks/study.py`'s `drive`); timed from the
    teacher-output cache to the end."""
    from study import drive  # benchmarks/study.py

    from tunekd import groups

    grouped, cached = name.startswith("grouped"), name.endswith("cached")
    tune = {"storage_path": tempfile.mkdtemp(prefix=f"{name}-", dir=workdir),
            "group_by": ["distill.strategy"] if grouped else []}
    study = base.model_copy(update={
        "tune": base.tune.model_copy(update=tune),
        "teacher": base.teacher.model_copy(update={"cache_budget_gb": 2.0 if cached else 0.0})})
    driver, wall = drive(study, log=log)
    accuracy = {}
    for result in driver.results:
        if result.error:
            raise RuntimeError(f"{name}: a trial failed: {result.error}")
        for m in groups.views("", result.config, result.metrics):
            accuracy[f"{m.config['distill.strategy']}/{m.config['seed']}"] = m.result["eval/accuracy"]
    out = {"wall_s": wall, "ray_trials": len(driver.results), "trials": len(accuracy), "accuracy": accuracy,
           "cache_mode": driver.cache.mode, "load_after": os.getloadavg()[0]}
    log(f"{name}: wall {wall:.1f} s, {out['ray_trials']} Ray trials, {out['trials']} trials, cache {out['cache_mode']}")
    return out


def bench_study(args) -> dict:
    import ray
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunekd-bench-groups-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    base = study_of(args, workdir)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    try:
        # ungrouped first (it fine-tunes the teacher, untimed), then alternating
        runs = {n: run_study(n, base, workdir) for n in ("ungrouped", "grouped", "grouped_cached", "ungrouped_cached")}
    finally:
        ray.shutdown()
    diffs = [abs(runs[f"grouped{c}"]["accuracy"][k] - runs[f"ungrouped{c}"]["accuracy"][k])
             for c in ("", "_cached") for k in runs[f"ungrouped{c}"]["accuracy"]]
    return {"runs": runs, "rows": args.rows, "epochs": args.epochs,
            "study_wall_ratio": runs["grouped"]["wall_s"] / runs["ungrouped"]["wall_s"],
            "study_wall_ratio_cached": runs["grouped_cached"]["wall_s"] / runs["ungrouped_cached"]["wall_s"],
            "max_accuracy_diff": max(diffs)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"step", "study"})
    if unknown:
        raise SystemExit(f"--part: unknown {unknown}; known: step, study")
    started = time.perf_counter()
    summary: dict = {"quick": args.quick, "load_before": os.getloadavg()[0]}
    if "step" in parts:
        step = summary["step"] = bench_steps(args)
        print(f"\nstep, {args.shape} shape (teacher online, 3-layer students), batch {args.batch_size} x "
              f"length {args.length}, {args.precision}, {args.device}, {args.threads} threads, medians of "
              f"{args.reps} steps")
        print(f"{'K':>3} {'group step s':>13} {'per member s':>13} {'/ plain':>8} {'/ plain, CPU s':>14}" +
              (f" {'peak GiB':>9}" if "peak_gib" in step else ""))
        print(f"{'-':>3} {step['plain_s']:>13.3f} {step['plain_s']:>13.3f} {1.0:>8.2f} {1.0:>14.2f}" +
              (f" {step['peak_gib']['plain']:>9.2f}" if "peak_gib" in step else ""))
        for k in step["group_s"]:
            print(f"{k:>3} {step['group_s'][k]:>13.3f} {step['per_member_s'][k]:>13.3f} "
                  f"{step['per_member_over_plain'][k]:>8.2f} {step['per_member_over_plain_cpu'][k]:>14.2f}" +
                  (f" {step['peak_gib'][f'k{k}']:>9.2f}" if "peak_gib" in step else ""))
        for k, v in step["per_member_over_plain"].items():
            summary[f"k{k}_over_plain"] = round(v, 3)
            summary[f"k{k}_over_plain_cpu"] = round(step["per_member_over_plain_cpu"][k], 3)
    if "study" in parts:
        study = summary["study"] = bench_study(args)
        print(f"\nstudy: SST-2 {args.rows} rows x {args.epochs} epoch(s), 5 strategies x 2 seeds, FIFO, 2 CPUs")
        print(f"{'run':<18} {'wall s':>7} {'Ray trials':>10} {'cache':>6}")
        for name, r in study["runs"].items():
            print(f"{name:<18} {r['wall_s']:>7.1f} {r['ray_trials']:>10d} {r['cache_mode']:>6}")
        print(f"grouped / ungrouped: {study['study_wall_ratio']:.2f} (cache off), "
              f"{study['study_wall_ratio_cached']:.2f} (cache on); largest accuracy difference "
              f"{study['max_accuracy_diff']:g}")
        summary["study_wall_ratio"] = round(study["study_wall_ratio"], 3)
        summary["study_wall_ratio_cached"] = round(study["study_wall_ratio_cached"], 3)
    summary["load_after"] = os.getloadavg()[0]
    summary["total_s"] = time.perf_counter() - started
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "result.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    print(json.dumps(summary, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
