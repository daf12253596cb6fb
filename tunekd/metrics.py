"""The metric registry: every evaluation metric by name, computed by scikit-learn, scipy or sacreBLEU.

A metric takes predictions and references (numpy arrays) and returns one float, in percent (0..100,
correlations -100..100) as the papers and the GLUE leaderboard report them. `input` says what it
scores: `"label"` (class ids; 2-D logits are reduced by argmax), `"score"` (real numbers, regression)
or `"text"` (hypotheses against reference sets). `kinds` are the task kinds it applies to. Metrics
whose value is undefined on the given data (a correlation of constant predictions) are 0, never NaN,
so that an epoch's metrics stay finite. This module imports nothing from tunekd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[..., float]
    input: str  # "label" | "score" | "text"
    kinds: tuple[str, ...]
    doc: str


def accuracy(pred, ref) -> float:
    """Share of exact matches, in percent."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(np.asarray(ref), np.asarray(pred)) * 100.0)


def f1(pred, ref) -> float:
    """F1 of label id 1 (the positive class: GLUE's MRPC/QQP F1), in percent; 0 when neither array has a 1."""
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(ref), np.asarray(pred), labels=[1], average="macro", zero_division=0) * 100.0)


def macro_f1(pred, ref) -> float:
    """Unweighted mean of the per-class F1 over the classes present in either array, in percent."""
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(ref), np.asarray(pred), average="macro", zero_division=0) * 100.0)


def matthews(pred, ref) -> float:
    """Matthews correlation coefficient x 100 (CoLA's metric); 0 when undefined."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(np.asarray(ref), np.asarray(pred)) * 100.0)


def _correlation(fn, pred, ref) -> float:
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(ref) == 0:
        return 0.0  # undefined (a constant array): no correlation
    return float(fn(pred, ref).statistic * 100.0)


def pearson(pred, ref) -> float:
    """Pearson's r x 100 (STS-B's primary metric); 0 when either array is constant."""
    from scipy.stats import pearsonr

    return _correlation(pearsonr, pred, ref)


def spearman(pred, ref) -> float:
    """Spearman's rho x 100; 0 when either array is constant."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, pred, ref)


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacreBLEU defaults: 13a tokenisation, exp smoothing) of each hypothesis against all
    references of its row (rows may have different numbers of references)."""
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", accuracy, "label", ("classification", "multiple_choice"), "share right, %"),
    Metric("f1", f1, "label", ("classification",), "F1 of label id 1, %"),
    Metric("macro_f1", macro_f1, "label", ("classification",), "mean per-class F1, %"),
    Metric("matthews", matthews, "label", ("classification",), "Matthews correlation x 100"),
    Metric("pearson", pearson, "score", ("regression",), "Pearson r x 100"),
    Metric("spearman", spearman, "score", ("regression",), "Spearman rho x 100"),
    Metric("bleu", bleu, "text", ("generation",), "corpus BLEU (sacreBLEU)"),
    # computed by the decoder family from per-character log-likelihoods (tasks.base.choice_metrics)
    Metric("accuracy_norm", accuracy, "label", ("multiple_choice",), "share right by length-normalised score, %"),
)}

# metrics a task kind reports when a declared task names none
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "regression": ("pearson", "spearman"),
    "multiple_choice": ("accuracy",),
    "generation": ("bleu",),
}
