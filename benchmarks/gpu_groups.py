"""Issue 21's GPU check: per-member step times of trial groups of K = 1, 5, 10 in bf16 at the bert-base shape,
with the peak GPU memory of each, on a lent GPU (well under 10 minutes).

    python benchmarks/gpu_groups.py --out $OUT                                          # the device run
    python benchmarks/gpu_groups.py --device cpu --shape minilm --length 8 --batch-size 2 --reps 1   # smoke run

It is `benchmarks/groups.py --part step --sequential` with the device's defaults: a random-init 12 x 768
teacher run online, 3-layer copy-init students (strategies forward, reverse, all_to_one, random, none, then
again), batch 32, length 128, bf16 autocast, TF32 matmuls outside it; each K built, warmed up (3 steps),
timed (`--reps` 20 steps, medians, `torch.cuda.synchronize` around each) and freed in turn, its peak
`torch.cuda.max_memory_allocated` since the K was built. Prints the table, writes $OUT/result.json, and
ends with one line of JSON (`k1_over_plain`, `k5_over_plain`, `k10_over_plain`, `step.peak_gib`, the GPU's
name, torch and transformers versions). On the device it needs what `gpu_prepare.sh` packs into `.gpu/whl`
(pydantic; the MiniLM and SST-2 there are not used): see benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import groups as bench  # noqa: E402  (benchmarks/groups.py)


def main(argv=None) -> int:
    import torch
    import transformers

    argv = list(argv if argv is not None else sys.argv[1:])
    cpu = "--device" in argv and argv[argv.index("--device") + 1] == "cpu"
    defaults = ["--part", "step", "--ks", "1,5,10", "--sequential", "--reps", "20", "--warmup", "3"]
    if not cpu:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU visible (for a CPU smoke run: --device cpu)")
        defaults += ["--device", "cuda", "--precision", "bf16"]
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"[gpu] {torch.cuda.get_device_name(0)}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}", file=sys.stderr, flush=True)
    return bench.main(defaults + argv)  # later options win


if __name__ == "__main__":
    sys.exit(main())
