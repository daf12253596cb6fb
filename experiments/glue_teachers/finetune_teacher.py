"""The teacher fine-tune step of `python -m tunekd.run` alone (no Ray, no trials): the study driver's own
steps setup_task, setup_data and setup_teacher (load and validate the study, prepare the task, tokenize,
fine-tune the teacher or reuse it from the cache), then its eval metrics: the number a study's parent
run records.

    python experiments/glue_teachers/finetune_teacher.py search_spaces/glue_minilm.yaml \
        --set task.name=cola --set task.data_dir=../shared/data/cola --set task.max_train_samples=2000
"""

from __future__ import annotations

import argparse
import time

import torch

from tunekd.driver import RunOptions, StudyDriver
from tunekd.errors import run_cli
from tunekd.study import load_study


def main(args) -> int:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    driver = StudyDriver(load_study(args.study, args.overrides), RunOptions(study_file=args.study, track=False))
    driver.setup_task()
    driver.setup_data()
    driver.setup_teacher()
    spec, encoded, info = driver.spec, driver.encoded, driver.teacher
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
