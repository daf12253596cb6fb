"""What a task is (`TaskSpec`) and how its evaluation metrics are computed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    """A task: its label set, its canonical text columns, its eval splits and metrics.

    After loading, every split has exactly the columns ``text_fields + ("label",)``, with
    ``label`` an int in ``range(num_labels)`` (classification and multiple choice: there
    ``text_fields`` is ``("context", "choices")``, ``choices`` a list of ``num_labels`` strings and
    ``label`` the index of the right one). Generation tasks have the columns ``("source", "target",
    "references")``: one training row per (input, reference) pair; an eval row per input with all
    its references.
    """

    name: str  # "sst2"
    kind: str  # "classification", "multiple_choice" or "generation"
    label_names: tuple[str, ...]  # index = label id
    text_fields: tuple[str, ...]  # ("text_a",) or ("text_a", "text_b")
    eval_splits: tuple[str, ...]  # ("validation",) or ("validation_matched", "validation_mismatched")
    metrics: tuple[str, ...]  # primary metric first
    hub: tuple[str, str | None] | None  # arguments to datasets.load_dataset(path, name); None: no hub copy
    # generation: applied to hypotheses and references alike before BLEU (e.g. Romanian diacritics)
    normalize: Callable[[str], str] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]


# ---------------------------------------------------------------------------------------------
# metrics (plain numpy; values in percent like the papers report them)


def accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(pred == ref) * 100.0)


def _f1_positive(pred: np.ndarray, ref: np.ndarray) -> float:
    """F1 of class 1 (GLUE's QQP/MRPC F1). 0 when there is no positive in either array."""
    tp = int(np.sum((pred == 1) & (ref == 1)))
    fp = int(np.sum((pred == 1) & (ref != 1)))
    fn = int(np.sum((pred != 1) & (ref == 1)))
    denom = 2 * tp + fp + fn
    return float(200.0 * tp / denom) if denom else 0.0


# metric name -> (function, index into spec.eval_splits)
_METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], int]] = {
    "accuracy": (accuracy, 0),
    "f1": (_f1_positive, 0),
    "accuracy_mm": (accuracy, 1),  # MNLI mismatched
}


def _as_label_ids(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 2:  # logits / probabilities -> ids
        a = a.argmax(axis=-1)
    if a.ndim != 1:
        raise ValueError(f"{what}: expected label ids (1-D) or logits (2-D), got shape {a.shape}")
    return a.astype(np.int64)


def compute_metrics(
    spec: TaskSpec,
    predictions: Mapping[str, np.ndarray],
    references: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """The task's metrics, keyed by name without prefix, in percent (0..100).

    ``predictions`` and ``references`` are keyed by eval split name. Predictions may be label
    ids (1-D) or logits (2-D, argmax is taken). MNLI gives ``{"accuracy": <matched>,
    "accuracy_mm": <mismatched>}``, QQP ``{"accuracy", "f1"}`` (F1 of class 1), the rest
    ``{"accuracy"}``.
    """
    out: dict[str, float] = {}
    for metric in spec.metrics:
        if metric not in _METRICS:
            raise ValueError(f"task {spec.name!r}: no implementation for metric {metric!r}")
        fn, split_idx = _METRICS[metric]
        split = spec.eval_splits[split_idx]
        if split not in predictions or split not in references:
            raise ValueError(
                f"task {spec.name!r}: metric {metric!r} needs split {split!r}; "
                f"got predictions for {sorted(predictions)} and references for {sorted(references)}"
            )
        pred = _as_label_ids(predictions[split], f"predictions[{split!r}]")
        ref = _as_label_ids(references[split], f"references[{split!r}]")
        if pred.shape != ref.shape:
            raise ValueError(
                f"task {spec.name!r}, split {split!r}: {pred.shape[0]} predictions but {ref.shape[0]} references"
            )
        if pred.size == 0:
            raise ValueError(f"task {spec.name!r}, split {split!r}: no examples to score")
        out[metric] = fn(pred, ref)
    return out


# ---------------------------------------------------------------------------------------------
# generation and multiple-choice metrics


def bleu(spec: TaskSpec, hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (sacreBLEU defaults: 13a tokenisation, exp smoothing) of `hypotheses` against all
    references of each row (rows may have different numbers of references), after `spec.normalize`."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"task {spec.name!r}: {len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError(f"task {spec.name!r}: no examples to score")
    norm = spec.normalize or (lambda t: t)
    hyps = [norm(h) for h in hypotheses]
    width = max(len(r) for r in references)
    streams = [[norm(r[k]) if k < len(r) else None for r in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(hyps, streams).score)


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
