"""Issue 10 on a GPU: SST-2 with all its training rows, random-init student, `none` vs `forward`, one seed.

    python benchmarks/gpu_random_init.py --data .gpu/sst2 --teacher .gpu/minilm --out $OUT      # the device run
    python benchmarks/gpu_random_init.py --device cpu --rows 512 --epochs 1 --teacher-epochs 1   # a CPU smoke run

The study is `experiments/glue_repro/sst2.yaml` (MiniLM-L6 teacher fine-tuned 2 epochs at lr 1e-4; a
3 x 384 student; λ = 3, `reduction: paper`, batch 32, max length 64) with the random-init settings of
its README (student.init random, lr 5e-4), all 67 349 training rows (`--rows N`: a fixed random subset)
and `--epochs` epochs. Everything runs in this process through tunekd's own code, without Ray or MLflow:
the driver's steps `setup_task`, `preflight`, `setup_data`, `setup_teacher` (fine-tunes the teacher once,
cached under the work folder) and `setup_cache` (the `Shared` data; the teacher-output cache is off:
the teacher runs online, as it would on a GPU), then `trainable.run_trial` once per strategy.

Prints each epoch's dev accuracy as it comes, a table (strategy, accuracy per epoch, final accuracy,
median over epochs of the mean step time, wall time), then one line of JSON. With `--out DIR` the
results so far are also written to DIR/result.json after every epoch (a run cut short keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tunekd without being installed (the device machine)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default=str(REPO / "experiments" / "glue_repro" / "sst2.yaml"))
    p.add_argument("--data", default=os.path.join(os.environ.get("TUNEKD_DATA_DIR", "../shared/data"), "sst2"),
                   help="SST-2 folder with train.tsv and dev.tsv (default $TUNEKD_DATA_DIR/sst2)")
    p.add_argument("--teacher", default="minilm", help="base teacher: a model folder or a study ref (minilm, tiny:bert)")
    p.add_argument("--rows", type=int, default=0, help="training rows, a fixed random subset (0: all)")
    p.add_argument("--epochs", type=int, default=3, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=2, help="teacher fine-tune epochs")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is one")
    p.add_argument("--strategies", default="none,forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-4, help="student lr (the reproduction's random-init lr)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="further study overrides, as for python -m tunekd.run")
    p.add_argument("--out", default=None, help="also write result.json here after every epoch")
    p.add_argument("--workdir", default=None, help="teacher fine-tune cache (default: a temporary folder)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[gpu] {msg}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # tunekd picks CUDA whenever it sees one (device.device_for)
    import torch
    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    os.environ.setdefault("TUNEKD_THREADS", str(torch.get_num_threads()))  # run_trial's thread count
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parts outside autocast
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or "cpu")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunekd-gpu-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve() if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]

    from tunekd.driver import RunOptions, StudyDriver
    from tunekd.study import load_study
    from tunekd.trainable import run_trial

    study = load_study(args.study, [
        f"task.data_dir={Path(args.data).resolve()}",
        f"task.max_train_samples={args.rows or 'null'}",
        f"teacher.model={args.teacher}",
        f"teacher.finetune.epochs={args.teacher_epochs}",
        f"teacher.cache_dir={workdir / '.tunekd_cache'}",
        "teacher.cache_budget_gb=0",  # no teacher-output cache: the teacher runs in every step
        f"train.epochs={args.epochs}", f"train.lr={args.lr}", f"train.precision={precision}",
        "train.save_model=false", f"seed={args.seed}",
        "student.init=random", "search.student.init.grid=[random]",
        f"search.distill.strategy.grid=[{','.join(strategies)}]",
        "tune.seeds=null", f"tune.storage_path={workdir / 'ray_results'}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}", *args.overrides])
    import tunekd

    log(f"{device_name} ({device}, {precision}); torch {torch.__version__}, transformers {transformers.__version__}; "
        f"tunekd from {Path(tunekd.__file__).parent}; "
        f"work folder {workdir}")
    t_start = time.perf_counter()
    driver = StudyDriver(study, RunOptions(track=False), log=log)
    driver.setup_task()
    driver.preflight()
    driver.setup_data()
    t0 = time.perf_counter()
    driver.setup_teacher()
    teacher_s = time.perf_counter() - t0
    driver.setup_cache()
    teacher_acc = driver.teacher.metrics.get("accuracy")
    rows = len(driver.encoded["train"])

    results: dict[str, dict] = {}

    def summary() -> dict:
        acc = {s: r["accuracy"][-1] for s, r in results.items() if r["accuracy"]}
        s = {"accuracy": acc, "step_s": {k: r["step_s"] for k, r in results.items()},
             "accuracy_by_epoch": {k: r["accuracy"] for k, r in results.items()},
             "wall_s": {k: r["wall_s"] for k, r in results.items()},
             "gap": (acc["forward"] - acc["none"]) if {"none", "forward"} <= acc.keys() else None,
             "teacher_accuracy": teacher_acc, "teacher_finetune_s": round(teacher_s, 1),
             "teacher_cached": driver.teacher.cached, "rows": rows, "epochs": args.epochs,
             "teacher_epochs": args.teacher_epochs, "precision": precision, "device": device_name,
             "seed": args.seed, "lr": args.lr, "torch": torch.__version__, "transformers": transformers.__version__,
             "total_s": round(time.perf_counter() - t_start, 1)}
        if out:
            (out / "result.json").write_text(json.dumps(s, indent=1, sort_keys=True))
        return s

    for point in driver.points:
        name = point["distill.strategy"]
        r = results[name] = {"accuracy": [], "step_s": None, "wall_s": None, "epoch_step_s": []}
        started = time.perf_counter()

        def report(metrics, folder, name=name, r=r, started=started):
            r["accuracy"].append(round(float(metrics["eval/accuracy"]), 2))
            r["epoch_step_s"].append(float(metrics["perf/step_s"]))
            r["step_s"] = round(statistics.median(r["epoch_step_s"]), 5)
            r["wall_s"] = round(time.perf_counter() - started, 1)
            log(f"{name}: epoch {int(metrics['epoch'])}/{args.epochs}: dev accuracy {r['accuracy'][-1]:.2f}, "
                f"loss {metrics['train/loss']:.4f} (ce {metrics['train/loss_ce']:.4f}, hid "
                f"{metrics['train/loss_hid']:.4f}), {metrics['perf/step_s'] * 1e3:.1f} ms/step, "
                f"epoch {metrics['time/epoch_s']:.1f} s")
            summary()

        log(f"{name}: {point}")
        run_trial(dict(point), driver.shared, report=report)

    s = summary()
    width = study.student.hidden_size or driver.family.hidden_size(driver.teacher_config)
    print(f"\nSST-2, {rows} training rows, {args.epochs} epochs, random-init {study.student.layers} x {width} student, "
          f"seed {args.seed}, "
          f"{precision} on {device_name}; teacher {teacher_acc:.2f} ({args.teacher_epochs} epochs, "
          f"{teacher_s:.0f} s{', cached' if driver.teacher.cached else ''})")
    print(f"{'strategy':<9} {'dev accuracy per epoch':<28} {'final':>6} {'step ms':>8} {'wall s':>7}")
    for name, r in results.items():
        per = " ".join(f"{a:.2f}" for a in r["accuracy"])
        print(f"{name:<9} {per:<28} {r['accuracy'][-1]:>6.2f} {r['step_s'] * 1e3:>8.1f} {r['wall_s']:>7.1f}")
    if s["gap"] is not None:
        print(f"gap forward - none: {s['gap']:+.2f} points")
    print(json.dumps(s, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
