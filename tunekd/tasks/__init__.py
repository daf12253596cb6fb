"""Tasks: the table of built-in declarations, declared tasks, and loading.

``spec_for(task)`` gives the `TaskSpec` of a study's ``task`` section (a built-in name, or a
declaration); ``load_configured(task, seed=...)`` loads it (returning the spec with any labels read
from the data); ``get_task(name)`` / ``load_task(name, data_dir, ...)`` do the same for a built-in by
name. Every loaded task is a ``datasets.DatasetDict`` with split ``train`` and each of
``spec.eval_splits``; every split has exactly the columns ``spec.text_fields + ("label",)``,
``label`` being an int (a ``ClassLabel`` named by ``spec.label_names``) for classification and a
float for regression; see ``generation.py`` and ``choice.py`` for the columns of the other task kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunekd.errors import ConfigError, unknown

from .base import KINDS, TaskSpec, bleu, choice_metrics, compute_metrics, metric_plan
from .choice import load_hub_choice, load_local_choice
from .declared import load_declared, spec_from
from .generation import LOCAL_LOADERS, load_hub_generation
from .glue import load_hub, load_local
from .synthetic import SYNTHETIC, generate_synthetic, load_synthetic, synthetic_label
from .table import TASKS


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise unknown("task", name, TASKS) from None


def is_declared(task) -> bool:
    return getattr(task, "kind", None) is not None


def spec_for(task) -> TaskSpec:
    """The `TaskSpec` of a study's ``task`` section (`study.TaskConfig`) or of a built-in name. A declared
    classification task whose labels are read from the data has them once the driver has loaded it
    (`load_configured`) and put them into the study (``task.labels``)."""
    if isinstance(task, str):
        return get_task(task)
    if is_declared(task):
        return spec_from(task)
    return get_task(task.name)


def _check_max(n: int | None, what: str) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"{what} must be a positive integer or None, got {n!r}")


def _subset(ds, n: int | None, seed: int):
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


def _load(spec: TaskSpec, data_dir, data, synthetic, seed):
    if not spec.builtin:
        return load_declared(spec)
    if spec.name == SYNTHETIC.name:
        return spec, load_synthetic(synthetic, seed)
    if data is not None:
        if not spec.hub_columns:
            raise ConfigError(f"task.data: task {spec.name!r} cannot be loaded from a datasets.load_dataset spec; "
                              "use task.data_dir (or declare a task with task.kind)")
        return spec, load_hub(spec, dict(data))
    hub = data_dir is None or str(data_dir) == ""
    if spec.kind == "generation":
        return spec, load_hub_generation(spec) if hub else LOCAL_LOADERS[spec.name](data_dir)
    if spec.kind == "multiple_choice":
        return spec, load_hub_choice(spec) if hub else load_local_choice(spec, data_dir)
    return spec, load_hub(spec) if hub else load_local(spec, data_dir)


def _check_classes(spec: TaskSpec, train) -> None:
    """A classification task's training rows hold at least two classes: labels that collapsed to one (a
    wrong label list, a wrong folder, a subset too small) would train nothing and score 100."""
    if spec.kind != "classification":
        return
    found = sorted(set(train["label"]))
    if len(found) < 2:
        name = spec.label_names[found[0]] if found else "none"
        raise ConfigError(f"task {spec.name!r}: every training row has label {name!r} (of "
                          f"{list(spec.label_names)}); a classification task needs at least two classes in its "
                          "training data (check task.labels, the label column or max_train_samples)")


def _load_subset(spec, data_dir, data, max_train_samples, max_eval_samples, seed, synthetic):
    _check_max(max_train_samples, "max_train_samples")
    _check_max(max_eval_samples, "max_eval_samples")
    spec, dsd = _load(spec, data_dir, data, synthetic, seed)
    dsd["train"] = _subset(dsd["train"], max_train_samples, seed)
    _check_classes(spec, dsd["train"])
    for split in spec.eval_splits:
        dsd[split] = _subset(dsd[split], max_eval_samples, seed)
    return spec, dsd


def load_task(
    name: str,
    data_dir: str | Path | None = None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    synthetic: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
):
    """Load built-in task ``name`` as a ``datasets.DatasetDict`` (``train`` + ``spec.eval_splits``).

    ``data_dir`` None loads it from the Hugging Face hub (``spec.hub``); otherwise from that local
    folder (see :func:`tunekd.tasks.glue.load_local` for the accepted files, including which
    files stand in for splits missing from the shared sample data). ``data`` (GLUE tasks): other
    ``datasets.load_dataset`` arguments giving the hub's layout, e.g. a local copy of its parquet
    files. The ``synthetic`` task is generated and ignores ``data_dir``; ``synthetic`` holds its
    options (train_size, eval_size, seed, max_words) and is ignored for other tasks.
    ``max_train_samples`` / ``max_eval_samples`` keep a seeded random subset (shuffle with ``seed``,
    take the first n) of the train / each eval split; None (or n >= the split's size) keeps all, in
    file order.
    """
    return _load_subset(get_task(name), data_dir, data, max_train_samples, max_eval_samples, seed, synthetic)[1]


def load_configured(task, *, seed: int = 0):
    """``(spec, DatasetDict)`` of a study's ``task`` section (`study.TaskConfig`): a built-in task (from
    ``task.data_dir``, ``task.data`` or the hub) or a declared one (``datasets.load_dataset(**task.data)``,
    validated: missing column, empty split, label outside the list are ConfigErrors). The spec has the
    labels read from the data when the declaration lists none."""
    spec = spec_for(task)
    data = getattr(task, "data", None)
    if data is not None and not isinstance(data, Mapping):
        data = data.model_dump(exclude_none=True)
    synthetic = getattr(task, "synthetic", None)
    if synthetic is not None and not isinstance(synthetic, Mapping):
        synthetic = synthetic.model_dump()
    return _load_subset(spec, getattr(task, "data_dir", None), None if not spec.builtin else data,
                        task.max_train_samples, task.max_eval_samples, seed, synthetic)


def task_params(spec: TaskSpec, task=None) -> dict[str, Any]:
    """The task's resolved definition as flat MLflow parameters (for the study's parent run). Given the
    study's ``task`` section, ``task.source`` says where this run read the data: the local folder
    (``task.data_dir``), the ``datasets.load_dataset`` path (``task.data``), the hub or the generator."""
    out = spec.definition()
    if task is not None:
        data = getattr(task, "data", None)
        out["task.source"] = str(getattr(task, "data_dir", None) or (data.path if hasattr(data, "path") else
                                 (data or {}).get("path")) or ("hub" if spec.hub else "generated"))
    return out


__all__ = [
    "KINDS",
    "TASKS",
    "TaskSpec",
    "bleu",
    "choice_metrics",
    "compute_metrics",
    "generate_synthetic",
    "get_task",
    "is_declared",
    "load_configured",
    "load_task",
    "metric_plan",
    "spec_for",
    "synthetic_label",
    "task_params",
]
