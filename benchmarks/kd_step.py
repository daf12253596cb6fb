"""One training step, three ways: (a) plain student fine-tuning, (b) KD with the teacher run online,
(c) KD reading the teacher's outputs from the cache (`tunekd.cache`).

    python benchmarks/kd_step.py                       # MiniLM-L6 and a 12-layer 768-wide teacher, fp32 + bf16
    python benchmarks/kd_step.py --shapes minilm --precision fp32 --reps 10

Shapes: `minilm` = the real MiniLM-L6 weights (6 layers, 384 wide) -> 3-layer copy-init student;
`bert-base` = a random-init BERT config (12 layers, 768 wide) -> `--student-layers` (3). Batch 32,
length 128 (every token real), forward layer map with embeddings, λ = 3, α_kl = 1. Each step is
`distill.train_step` (the training loop's own step) on a batch from `Encoded.batch`, so it includes
the cache lookup. The variants are interleaved and each figure is a median over `--reps` steps,
all measured in this one run; the ratios are what to compare across machines.
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

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--shapes", default="minilm,bert-base", help="comma list of: minilm, bert-base")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of: fp32, bf16, fp16 (GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=3)
    return p.parse_args(argv)


def make_teacher(shape: str, spec):
    from transformers import BertConfig, BertForSequenceClassification

    from tunekd.models import family_for
    from tunekd.teacher import resolve_model

    if shape == "minilm":
        from transformers import AutoConfig

        path = resolve_model("minilm")
        family = family_for(AutoConfig.from_pretrained(path))
        model = family.load(path, spec)
    elif shape == "bert-base":
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         num_labels=spec.num_labels)
        model = BertForSequenceClassification(cfg)
        family = family_for(cfg)
    else:
        raise SystemExit(f"unknown shape {shape!r}; known: minilm, bert-base")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return family, model


def make_data(n: int, length: int, vocab: int):
    from tunekd.data import Encoded

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, vocab, size=(n, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    arrays = {"input_ids": ids, "attention_mask": np.ones((n, length), np.int32),
              "token_type_ids": np.zeros((n, length), np.int32), "labels": rng.integers(0, 2, n)}
    return Encoded(arrays=arrays, lengths=np.full(n, length, dtype=np.int64))


def bench_shape(shape: str, args, precisions: list[str], device: torch.device, log) -> dict:
    from tunekd import cache as tcache
    from tunekd import distill, plan
    from tunekd.students import build_student
    from tunekd.study import StudentConfig, Study, TrainConfig
    from tunekd.tasks import get_task

    spec = get_task("sst2")
    family, teacher = make_teacher(shape, spec)
    teacher.to(device)
    t_layers = family.num_layers(teacher.config)
    study = Study.model_validate({"name": "bench", "task": {"name": "sst2"}, "teacher": {"model": "minilm"},
                                  "student": {"layers": args.student_layers, "init": "copy"},
                                  "distill": {"strategy": "forward", "lambda_hid": 3.0, "alpha_kl": 1.0}})
    layer_map = plan.resolve(study, t_layers, family.match_embeddings_default).layer_map
    n_batches = 4
    data = make_data(args.batch_size * n_batches, args.length, teacher.config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="tunekd-bench-cache-") as root:
        t0 = time.perf_counter()
        info = tcache.prepare(family, teacher, data, root, layers=tcache.layers_from_maps([layer_map]),
                              max_length=args.length, budget_gb=8, batch_size=args.batch_size, device=device)
        build_s = time.perf_counter() - t0
        cache = tcache.TeacherCache.open(info.folder)
        log(f"{shape}: teacher {t_layers} layers x {family.hidden_size(teacher.config)}, student "
            f"{args.student_layers} layers, map {layer_map}; cache {info.mode} {info.nbytes / 2**20:.0f} MiB "
            f"built in {build_s:.1f} s")
        out = {"cache_build_s": build_s, "cache_mib": info.nbytes / 2**20}
        for precision in precisions:
            train_cfg = TrainConfig(precision=precision, lr=1e-5, warmup_ratio=0.0)
            variants = {}
            for name in ("a", "b", "c"):
                st = build_student(teacher, family, spec, StudentConfig(layers=args.student_layers, init="copy"),
                                   seed=0)
                d = distill.Distiller(
                    family=family, student=st.model,
                    teacher=teacher if name == "b" else None,
                    layer_map=list(layer_map) if name != "a" else [],
                    distill=study.distill if name != "a" else None,
                    cache=cache if name == "c" else None)
                d.to(device)
                d.student.train()
                state = distill.make_state(d, train_cfg, 1000, 1)
                scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
                variants[name] = (d, state, scaler)
            times = {k: [] for k in variants}
            order = list(variants)
            for rep in range(args.reps + 2):
                index = np.arange(args.batch_size) + args.batch_size * (rep % n_batches)
                for name in order if rep % 2 == 0 else reversed(order):  # interleaved, alternating order
                    d, state, scaler = variants[name]
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    batch = distill._to_device(data.batch(index), device)
                    parts = distill.train_step(d, state, batch, train_cfg, device, scaler)
                    float(parts["loss"].detach())
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if rep >= 2:
                        times[name].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            out[precision] = {
                "a_s": med["a"], "b_s": med["b"], "c_s": med["c"],
                "b_over_a": med["b"] / med["a"], "c_over_a": med["c"] / med["a"],
                "c_over_b": med["c"] / med["b"],
                "teacher_rows_b": variants["b"][0].teacher_rows, "teacher_rows_c": variants["c"][0].teacher_rows,
            }
            log(f"  {precision}: a {med['a']:.3f} s  b {med['b']:.3f} s  c {med['c']:.3f} s  "
                f"b/a {med['b'] / med['a']:.2f}  c/a {med['c'] / med['a']:.2f}")
            del variants
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if "fp16" in precisions and device.type != "cuda":
        raise SystemExit("fp16 needs --device cuda")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    results = {s: bench_shape(s, args, precisions, device, log) for s in shapes}
    print(f"\nKD step, batch {args.batch_size} x length {args.length}, {args.threads} threads, {device}, "
          f"medians of {args.reps} interleaved steps")
    print(f"{'shape':<10} {'prec':<5} {'a plain s':>10} {'b online s':>11} {'c cached s':>11} "
          f"{'b/a':>6} {'c/a':>6} {'c/b':>6}")
    for shape, res in results.items():
        for precision in precisions:
            r = res[precision]
            print(f"{shape:<10} {precision:<5} {r['a_s']:>10.3f} {r['b_s']:>11.3f} {r['c_s']:>11.3f} "
                  f"{r['b_over_a']:>6.2f} {r['c_over_a']:>6.2f} {r['c_over_b']:>6.2f}")
    summary = {"device": str(device), "threads": args.threads, "reps": args.reps, "batch_size": args.batch_size,
               "length": args.length, "student_layers": args.student_layers, "results": results}
    head = results.get("minilm", {}).get("fp32")
    if head:
        summary["b_over_a"] = round(head["b_over_a"], 3)
        summary["c_over_a"] = round(head["c_over_a"], 3)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
