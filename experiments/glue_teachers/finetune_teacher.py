"""The teacher fine-tune step of `python -m tunekd.run` alone (no Ray, no trials): load and validate the
study, prepare the task, tokenize, fine-tune the teacher (or reuse it from the cache) and print its
eval metrics. Same functions as the driver, so the number is the one a study's parent run records.

    python experiments/glue_teachers/finetune_teacher.py search_spaces/glue_minilm.yaml \
        --set task.name=cola --set task.data_dir=../shared/data/cola --set task.max_train_samples=2000
"""

from __future__ import annotations

import argparse
import time

import torch

from tunekd.data import encode_splits
from tunekd.errors import run_cli
from tunekd.run import log, prepare, quiet_libraries
from tunekd.study import load_study
from tunekd.teacher import prepare_teacher


def main(args) -> int:
    torch.set_num_threads(args.threads)
    study = load_study(args.study, args.overrides)
    quiet_libraries()
    t0 = time.perf_counter()
    spec, base, _config, family, raw, tokenizer = prepare(study)
    encoded = encode_splits(raw, tokenizer, spec, study.task.max_length, family=family)
    info = prepare_teacher(study, family, spec, encoded, base, tokenizer, log=log)
    print(f"RESULT {spec.name}: train {len(encoded['train'])} rows, "
          + ", ".join(f"{k}={v:.2f}" for k, v in info.metrics.items())
          + f" ({', '.join(f'{k} {len(v)} rows' for k, v in encoded.items() if k != 'train')}); "
          f"wall {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=1)
    raise SystemExit(run_cli(main, p.parse_args()))
