"""Task registry and loading: ``get_task(name)`` and ``load_task(name, data_dir, ...)``.

Every loaded task is a ``datasets.DatasetDict`` with split ``train`` and each of
``spec.eval_splits``; every split has exactly the columns ``spec.text_fields + ("label",)``,
``label`` being an int (a ``ClassLabel`` named by ``spec.label_names``) for classification; see
``generation.py`` and ``choice.py`` for the columns of the other task kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunekd.errors import ConfigError, unknown

from .base import TaskSpec, bleu, choice_metrics, compute_metrics
from .choice import CHOICE_TASKS, load_hub_choice, load_local_choice
from .generation import GENERATION_TASKS, LOCAL_LOADERS, load_hub_generation
from .glue import GLUE_TASKS, load_hub, load_local
from .synthetic import SYNTHETIC, generate_synthetic, load_synthetic, synthetic_label

TASKS: dict[str, TaskSpec] = {**GLUE_TASKS, SYNTHETIC.name: SYNTHETIC, **GENERATION_TASKS, **CHOICE_TASKS}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise unknown("task", name, TASKS) from None


def _check_max(n: int | None, what: str) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"{what} must be a positive integer or None, got {n!r}")


def _subset(ds, n: int | None, seed: int):
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


def load_task(
    name: str,
    data_dir: str | Path | None = None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    synthetic: Mapping[str, Any] | None = None,
):
    """Load task ``name`` as a ``datasets.DatasetDict`` (``train`` + ``spec.eval_splits``).

    ``data_dir`` None loads a GLUE task from the Hugging Face hub; otherwise from that local
    folder (see :func:`tunekd.tasks.glue.load_local` for the accepted files, including which
    files stand in for splits missing from the shared sample data). The ``synthetic`` task is
    generated and ignores ``data_dir``; ``synthetic`` holds its options (train_size, eval_size,
    seed, max_words) and is ignored for other tasks. ``max_train_samples`` /
    ``max_eval_samples`` keep a seeded random subset (shuffle with ``seed``, take the first n)
    of the train / each eval split; None (or n >= the split's size) keeps all, in file order.
    """
    spec = get_task(name)
    _check_max(max_train_samples, "max_train_samples")
    _check_max(max_eval_samples, "max_eval_samples")
    if spec.name == SYNTHETIC.name:
        dsd = load_synthetic(synthetic, seed)
    else:
        hub = data_dir is None or str(data_dir) == ""
        if spec.kind == "generation":
            dsd = load_hub_generation(spec) if hub else LOCAL_LOADERS[spec.name](data_dir)
        elif spec.kind == "multiple_choice":
            dsd = load_hub_choice(spec) if hub else load_local_choice(spec, data_dir)
        elif hub:
            dsd = load_hub(spec)
        else:
            dsd = load_local(spec, data_dir)
    dsd["train"] = _subset(dsd["train"], max_train_samples, seed)
    for split in spec.eval_splits:
        dsd[split] = _subset(dsd[split], max_eval_samples, seed)
    return dsd


__all__ = [
    "TASKS",
    "TaskSpec",
    "bleu",
    "choice_metrics",
    "compute_metrics",
    "generate_synthetic",
    "get_task",
    "load_task",
    "synthetic_label",
]
