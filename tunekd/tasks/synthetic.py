"""The ``synthetic`` task: seeded English-word sentences for binary sentiment with composition.

A sentence has one or two clauses joined by ``but``. Each clause is some fillers, then 0-2
negators, then one sentiment word, then fillers. The label is the polarity of the sentiment
word of the LAST clause, flipped once per negator in that clause (1 = positive). The first
clause of a two-clause sentence is a distractor with random polarity and negation.

Word counts alone do not solve it (the distractor clause, the negation parity), so a pretrained
teacher learns it well while a small student trained from scratch for a short while does not.
No files and no network are needed; the same options and seed give the same dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tunekd.errors import ConfigError, unknown

from .base import TaskSpec

SYNTHETIC = TaskSpec(
    name="synthetic",
    kind="classification",
    label_names=("negative", "positive"),
    text_fields=("text_a",),
    eval_splits=("validation",),
    metrics=("accuracy",),
    hub=None,
)

POSITIVE = (
    "good", "great", "excellent", "wonderful", "pleasant", "brilliant", "superb", "delightful",
    "enjoyable", "charming", "fantastic", "lovely", "impressive", "fun",
)  # fmt: skip
NEGATIVE = (
    "bad", "awful", "terrible", "boring", "poor", "dull", "horrible", "dreadful", "weak",
    "tedious", "bland", "disappointing", "mediocre", "messy",
)  # fmt: skip
NEGATORS = ("not", "never", "hardly")
CONJUNCTION = "but"
FILLERS = (
    "the", "movie", "film", "plot", "was", "is", "really", "quite", "story", "actors", "and",
    "acting", "script", "ending", "music", "cast", "very", "rather", "overall", "seemed", "felt",
    "a", "bit", "this", "its", "scenes", "dialogue", "director", "so", "at", "times",
)  # fmt: skip

_POSITIVE_SET = frozenset(POSITIVE)
_NEGATIVE_SET = frozenset(NEGATIVE)
_NEGATOR_SET = frozenset(NEGATORS)

DEFAULTS: dict[str, Any] = {"train_size": 2000, "eval_size": 500, "seed": None, "max_words": 12}

# Smallest max_words: one clause with two negators and a sentiment word.
_MIN_WORDS = 3
# Two clauses need at least 1 + "but" + 3 words.
_MIN_WORDS_TWO_CLAUSES = 5


def synthetic_label(words: str | Sequence[str]) -> int:
    """The rule's label for a sentence (a string or a list of words): 1 positive, 0 negative.

    Clauses are split at ``but``; in the last clause the last sentiment word gives the polarity,
    flipped once for every negator before it in that clause. Unknown words are fillers.
    """
    tokens = words.split() if isinstance(words, str) else list(words)
    tokens = [t.lower() for t in tokens]
    last = len(tokens) - 1 - tokens[::-1].index(CONJUNCTION) if CONJUNCTION in tokens else -1
    clause = tokens[last + 1 :]
    pos = [i for i, t in enumerate(clause) if t in _POSITIVE_SET or t in _NEGATIVE_SET]
    if not pos:
        raise ValueError(f"no sentiment word in the last clause of {' '.join(tokens)!r}")
    i = pos[-1]
    polarity = 1 if clause[i] in _POSITIVE_SET else 0
    flips = sum(1 for t in clause[:i] if t in _NEGATOR_SET)
    return polarity ^ (flips % 2)


_NOUNS = ("movie", "film", "plot", "story", "acting", "script", "ending", "music", "cast", "dialogue")
_VERBS = ("was", "is", "seemed", "felt")
_ADVERBS = ("really", "quite", "very", "rather", "so")
_TAILS = ("overall", "honestly", "throughout", "today")


def _pick(rng: np.random.Generator, words: Sequence[str], n: int | None = None) -> Any:
    """One word (n None) or a list of n words drawn uniformly with replacement."""
    if n is None:
        return words[int(rng.integers(len(words)))]
    return [words[i] for i in rng.integers(len(words), size=n)]


def _fillers(rng: np.random.Generator, n: int, template: list[str], at_end: bool) -> list[str]:
    """``n`` filler words: a natural phrase (``template``) cut to fit, padded with random fillers."""
    extra = _pick(rng, FILLERS, max(0, n - len(template)))
    if at_end:  # a prefix ends where the negators start: "... the plot was really"
        return extra + template[len(template) - min(n, len(template)) :]
    return template[: min(n, len(template))] + extra  # a suffix: "overall and the music ..."


def _clause(rng: np.random.Generator, label: int, n_neg: int, n_fill: int) -> list[str]:
    """Fillers, ``n_neg`` negators, a sentiment word giving ``label`` after flips, fillers."""
    polarity = label ^ (n_neg % 2)
    word = _pick(rng, POSITIVE if polarity else NEGATIVE)
    negators = _pick(rng, NEGATORS, n_neg)
    before = int(rng.integers(0, n_fill + 1))
    prefix = ["the", _pick(rng, _NOUNS), _pick(rng, _VERBS), _pick(rng, _ADVERBS)]
    suffix = [_pick(rng, _TAILS), "and", "the", _pick(rng, _NOUNS)]
    return (
        _fillers(rng, before, prefix, at_end=True)
        + negators
        + [word]
        + _fillers(rng, n_fill - before, suffix, at_end=False)
    )


def _n_negators(rng: np.random.Generator) -> int:
    r = rng.random()  # 0, 1, 2 negators with probability 0.4, 0.4, 0.2
    return 0 if r < 0.4 else 1 if r < 0.8 else 2


def _sentence(rng: np.random.Generator, label: int, max_words: int) -> list[str]:
    two = max_words >= _MIN_WORDS_TWO_CLAUSES and bool(rng.random() < 0.5)
    neg_last = _n_negators(rng)
    if not two:
        n_fill = int(rng.integers(0, max_words - neg_last - 1 + 1))
        return _clause(rng, label, neg_last, n_fill)
    # budget: first clause needs 1 + its negators, "but" 1, last clause 1 + its negators
    neg_last = min(neg_last, max_words - 3)
    neg_first = min(_n_negators(rng), max_words - 3 - neg_last)
    spare = max_words - (neg_first + 1) - 1 - (neg_last + 1)
    n_fill = int(rng.integers(0, spare + 1))
    fill_first = int(rng.integers(0, n_fill + 1))
    first = _clause(rng, int(rng.integers(0, 2)), neg_first, fill_first)
    last = _clause(rng, label, neg_last, n_fill - fill_first)
    return first + [CONJUNCTION] + last


def _options(synthetic: Mapping[str, Any] | None, seed: int) -> dict[str, Any]:
    opts = dict(DEFAULTS)
    for key, value in (synthetic or {}).items():
        if key not in DEFAULTS:
            raise unknown("synthetic task option", key, DEFAULTS)
        opts[key] = value
    if opts["seed"] is None:
        opts["seed"] = seed
    for key, lo in (("train_size", 1), ("eval_size", 1), ("max_words", _MIN_WORDS)):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"synthetic task option {key!r} must be an integer >= {lo}, got {v!r}")
    if isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int) or opts["seed"] < 0:
        raise ConfigError(f"synthetic task option 'seed' must be a non-negative integer, got {opts['seed']!r}")
    return opts


def _generate(n: int, rng: np.random.Generator, max_words: int, avoid: set[str]) -> dict[str, list]:
    labels = np.array([i % 2 for i in range(n)])  # exactly balanced (n odd: one extra negative)
    rng.shuffle(labels)
    texts: list[str] = []
    seen = set(avoid)
    for label in labels:
        for _ in range(50):  # avoid repeats within the split and across splits, if space allows
            text = " ".join(_sentence(rng, int(label), max_words))
            if text not in seen:
                break
        seen.add(text)
        texts.append(text)
    return {"text_a": texts, "label": [int(x) for x in labels]}


def generate_synthetic(synthetic: Mapping[str, Any] | None = None, seed: int = 0) -> dict[str, dict[str, list]]:
    """``{"train": {"text_a": [...], "label": [...]}, "validation": {...}}`` as plain lists."""
    opts = _options(synthetic, seed)
    train_rng = np.random.default_rng([opts["seed"], 0])
    eval_rng = np.random.default_rng([opts["seed"], 1])
    train = _generate(opts["train_size"], train_rng, opts["max_words"], set())
    validation = _generate(opts["eval_size"], eval_rng, opts["max_words"], set(train["text_a"]))
    return {"train": train, "validation": validation}


def load_synthetic(synthetic: Mapping[str, Any] | None = None, seed: int = 0):
    import datasets

    features = datasets.Features(
        {"text_a": datasets.Value("string"), "label": datasets.ClassLabel(names=list(SYNTHETIC.label_names))}
    )
    data = generate_synthetic(synthetic, seed)
    return datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in data.items()})
