"""What a task is (`TaskSpec`, one declaration) and how its evaluation metrics are computed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunekd import metrics as _metrics

KINDS = ("classification", "regression", "multiple_choice", "generation")


@dataclass(frozen=True)
class TaskSpec:
    """A task, built in or declared in a study file: its kind, label set, text columns, eval splits,
    metrics, and where its data come from.

    After loading, every split has exactly the columns ``text_fields + ("label",)``: ``label`` an int in
    ``range(num_labels)`` (classification), a float (regression), the index of the right choice
    (multiple choice: ``text_fields`` is ``("context", "choices")``, ``choices`` a list of strings).
    Generation tasks have the columns ``("source", "target", "references")``: one training row per
    (input, reference) pair; an eval row per input with all its references.

    Where the data come from: ``hub`` (``datasets.load_dataset(path, name)``) with ``hub_columns``
    (hub column -> canonical column); a local folder in the GLUE layout read by ``local_files`` (per
    split, alternatives of files to concatenate), ``local_columns`` (canonical column -> accepted
    names, the GLUE TSV header name first) and ``headerless`` (canonical column per position of a
    header-less TSV); or, for a declared task, ``data`` (any ``datasets.load_dataset`` arguments) with
    ``source_fields`` (the data's columns for ``text_fields``) and ``label_field``.
    """

    name: str  # "sst2"
    kind: str  # one of KINDS
    label_names: tuple[str, ...]  # index = label id; () for regression and generation
    text_fields: tuple[str, ...]  # ("text_a",) or ("text_a", "text_b")
    eval_splits: tuple[str, ...]  # ("validation",) or ("validation_matched", "validation_mismatched")
    metrics: tuple[str, ...]  # primary metric first
    hub: tuple[str, str | None] | None  # arguments to datasets.load_dataset(path, name); None: no hub copy
    # generation: applied to hypotheses and references alike before BLEU (e.g. Romanian diacritics)
    normalize: Callable[[str], str] | None = None
    hub_columns: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    local_files: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict, compare=False, hash=False)
    local_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)
    headerless: tuple[str, ...] | None = None
    # the header of GLUE's own TSVs of this task (None: none, or it varies): a TSV whose header is exactly
    # another task's is that task's folder, refused (`glue._read_tsv`)
    glue_header: tuple[str, ...] | None = field(default=None, compare=False, hash=False)
    # declared tasks
    data: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    source_fields: tuple[str, ...] = ()
    label_field: str = "label"
    train_split: str = "train"
    builtin: bool = True

    @property
    def num_labels(self) -> int:
        """Outputs of the task head: the number of classes, 1 for regression."""
        return 1 if self.kind == "regression" else len(self.label_names)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def definition(self) -> dict[str, Any]:
        """The resolved definition as flat MLflow parameters (``task.kind``, ``task.metrics``, ...)."""
        out: dict[str, Any] = {
            "task.name": self.name, "task.kind": self.kind, "task.builtin": self.builtin,
            "task.metrics": list(self.metrics), "task.primary_metric": self.primary_metric,
            "task.eval_splits": list(self.eval_splits), "task.text_fields": list(self.source_fields or self.text_fields),
            "task.label_field": self.label_field, "task.num_labels": self.num_labels,
        }
        if self.label_names:
            out["task.labels"] = list(self.label_names)
        if self.data is not None:
            for k, v in self.data.items():
                if isinstance(v, Mapping):  # data_files per split
                    out.update({f"task.data.{k}.{split}": files for split, files in v.items()})
                else:
                    out[f"task.data.{k}"] = v
        elif self.hub is not None:
            out["task.hub"] = "/".join(x for x in self.hub if x)
        return out


# ---------------------------------------------------------------------------------------------
# metrics: the registry in tunekd.metrics, applied per eval split

# metric names that score an eval split other than the first: name -> (registry metric, split index)
SPLIT_METRICS: dict[str, tuple[str, int]] = {"accuracy_mm": ("accuracy", 1)}  # MNLI mismatched


def accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    return _metrics.accuracy(pred, ref)


def _as_label_ids(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 2:  # logits / probabilities -> ids
        a = a.argmax(axis=-1)
    if a.ndim != 1:
        raise ValueError(f"{what}: expected label ids (1-D) or logits (2-D), got shape {a.shape}")
    return a.astype(np.int64)


def _as_scores(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2 and a.shape[1] == 1:  # a regression head's [N, 1] output
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{what}: expected scores (1-D or [N, 1]), got shape {a.shape}")
    return a


def metric_plan(spec: TaskSpec) -> list[tuple[str, str, int]]:
    """(reported name, registry metric, eval split index) of every value the task reports. Each metric
    scores the first eval split under its own name; a declared task with several eval splits also
    reports each metric on every further split as ``<metric>_<split>``."""
    plan = []
    for name in spec.metrics:
        metric, idx = SPLIT_METRICS.get(name, (name, 0))
        plan.append((name, metric, idx))
    if not spec.builtin:
        for idx, split in enumerate(spec.eval_splits[1:], start=1):
            plan.extend((f"{name}_{split}", name, idx) for name in spec.metrics)
    return plan


def compute_metrics(
    spec: TaskSpec,
    predictions: Mapping[str, np.ndarray],
    references: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """The task's metrics (``tunekd.metrics``), keyed by name without prefix, in percent.

    ``predictions`` and ``references`` are keyed by eval split name. Classification predictions may
    be label ids (1-D) or logits (2-D, argmax is taken); regression predictions are scores (1-D or
    [N, 1]). MNLI gives ``{"accuracy": <matched>, "accuracy_mm": <mismatched>}``, QQP and MRPC
    ``{"accuracy", "f1"}`` (F1 of class 1), CoLA ``{"matthews"}``, STS-B ``{"pearson", "spearman"}``.
    """
    out: dict[str, float] = {}
    for name, metric_name, split_idx in metric_plan(spec):
        metric = _metrics.METRICS.get(metric_name)
        if metric is None or metric.input == "text":
            raise ValueError(f"task {spec.name!r}: no implementation for metric {name!r}")
        split = spec.eval_splits[split_idx]
        if split not in predictions or split not in references:
            raise ValueError(
                f"task {spec.name!r}: metric {name!r} needs split {split!r}; "
                f"got predictions for {sorted(predictions)} and references for {sorted(references)}"
            )
        convert = _as_scores if metric.input == "score" else _as_label_ids
        pred = convert(predictions[split], f"predictions[{split!r}]")
        ref = convert(references[split], f"references[{split!r}]")
        if pred.shape != ref.shape:
            raise ValueError(
                f"task {spec.name!r}, split {split!r}: {pred.shape[0]} predictions but {ref.shape[0]} references"
            )
        if pred.size == 0:
            raise ValueError(f"task {spec.name!r}, split {split!r}: no examples to score")
        out[name] = metric.fn(pred, ref)
    return out


# ---------------------------------------------------------------------------------------------
# generation and multiple-choice metrics


def bleu(spec: TaskSpec, hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (`tunekd.metrics.bleu`, sacreBLEU defaults) of `hypotheses` against all references of
    each row (rows may have different numbers of references), after `spec.normalize`."""

    if len(hypotheses) != len(references):
        raise ValueError(f"task {spec.name!r}: {len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError(f"task {spec.name!r}: no examples to score")
    norm = spec.normalize or (lambda t: t)
    return _metrics.bleu([norm(h) for h in hypotheses], [[norm(r) for r in refs] for refs in references])


def choice_metrics(loglik: np.ndarray, char_lengths: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """lm-evaluation-harness `acc` / `acc_norm`: the choice with the highest summed log-likelihood, and
    the highest log-likelihood per character of the choice's text. [N, C] scores, [N] right answers."""
    loglik = np.asarray(loglik, dtype=np.float64)
    labels = np.asarray(labels)
    if loglik.shape[0] == 0:
        raise ValueError("no examples to score")
    norm = loglik / np.maximum(np.asarray(char_lengths, dtype=np.float64), 1.0)
    return {"accuracy": accuracy(loglik.argmax(axis=1), labels),
            "accuracy_norm": accuracy(norm.argmax(axis=1), labels)}
