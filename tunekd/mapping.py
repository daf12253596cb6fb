"""Layer-selection strategies: which student hidden state is matched to which teacher state.

Pure functions, no torch. Indices follow Hugging Face ``hidden_states`` tuples: 0 is the
embedding output, ``k`` the output of layer ``k`` (1-based). See docs/method.md, "Layer-selection
strategies" and "The student".
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tunekd.errors import ConfigError, unknown

STRATEGIES = ("none", "forward", "reverse", "all_to_one", "random")
COPY_LAYERS = ("forward", "spread")
# How `random` draws its permutation π: `nontrivial` (default) among the permutations that are
# neither the identity (= forward) nor the reversal (= reverse); `any`: the paper's unrestricted draw,
# which may reproduce forward or reverse (then a "random" trial is not a distinct strategy).
RANDOM_DRAWS = ("nontrivial", "any")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_depths(teacher_layers: int, student_layers: int) -> None:
    """Raise ConfigError unless ``teacher_layers >= student_layers >= 1`` (both ints)."""
    if not _is_int(teacher_layers) or teacher_layers < 1:
        raise ConfigError(f"teacher depth {teacher_layers!r} must be an integer of at least 1")
    if not _is_int(student_layers) or not 1 <= student_layers <= teacher_layers:
        raise ConfigError(
            f"student depth {student_layers!r} must be between 1 and the teacher's depth "
            f"{teacher_layers}"
        )


def forward_targets(teacher_layers: int, student_layers: int) -> list[int]:
    """``fwd(i) = ceil(i * T / S)`` for ``i = 1..S`` (1-based teacher layers)."""
    validate_depths(teacher_layers, student_layers)
    t, s = teacher_layers, student_layers
    return [-(-i * t // s) for i in range(1, s + 1)]


def _explicit_map(
    pairs: Sequence, teacher_layers: int, student_layers: int
) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for pair in pairs:
        shown = list(pair) if isinstance(pair, (list, tuple)) else pair
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(_is_int(v) for v in pair)
        ):
            raise ConfigError(
                f"layer map pair {shown!r}: expected [student_index, teacher_index], two integers"
            )
        s, t = pair
        if not 0 <= s <= student_layers:
            raise ConfigError(
                f"layer map pair {shown!r}: student index {s} out of range 0..{student_layers}"
            )
        if not 0 <= t <= teacher_layers:
            raise ConfigError(
                f"layer map pair {shown!r}: teacher index {t} out of range 0..{teacher_layers}"
            )
        if s in seen:
            raise ConfigError(
                f"layer map pair {shown!r}: student index {s} appears more than once"
            )
        seen.add(s)
        out.append((s, t))
    return sorted(out)


def resolve_layer_map(
    strategy: str | list,
    teacher_layers: int,
    student_layers: int,
    *,
    match_embeddings: bool,
    seed: int = 0,
    random_draw: str = "nontrivial",
) -> list[tuple[int, int]]:
    """The resolved supervision map: ``(student_index, teacher_index)`` pairs sorted by student index.

    ``strategy`` is one of STRATEGIES or an explicit list of ``[s, t]`` pairs. ``seed`` and
    ``random_draw`` only matter for ``random`` (see `random_permutation`).
    """
    validate_depths(teacher_layers, student_layers)
    t, s = teacher_layers, student_layers
    if isinstance(strategy, (list, tuple)):
        return _explicit_map(strategy, t, s)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise unknown("strategy", strategy, STRATEGIES)
    if strategy == "none":
        return []
    fwd = forward_targets(t, s)  # fwd[i - 1] == fwd(i)
    if strategy == "all_to_one":
        pairs = [(i, t // 2) for i in range(1, s + 1)]
        if match_embeddings:
            pairs.insert(0, (0, t // 2))
        return pairs
    if strategy == "forward":
        pairs = [(i, fwd[i - 1]) for i in range(1, s + 1)]
    elif strategy == "reverse":
        pairs = [(i, fwd[s - i]) for i in range(1, s + 1)]  # fwd(S + 1 - i)
    else:  # random
        perm = random_permutation(s, seed, draw=random_draw)  # perm[i - 1] == π(i)
        pairs = [(i, fwd[perm[i - 1] - 1]) for i in range(1, s + 1)]
    if match_embeddings:
        pairs.insert(0, (0, 0))
    return pairs


def random_permutation(student_layers: int, seed: int, *, draw: str = "nontrivial") -> list[int]:
    """π for the ``random`` strategy as the list ``[π(1), ..., π(S)]`` (a permutation of ``1..S``).

    Shuffles ``[1..S]`` with ``random.Random(seed)`` (stable across processes and Python versions).
    ``any``: that first shuffle, whatever it is (the paper's draw; it can be the identity or the
    reversal, i.e. forward or reverse). ``nontrivial``: the same generator keeps shuffling until the
    result is neither the identity nor the reversal, so a ``random`` trial is never secretly forward
    or reverse; it needs S >= 3 (for S <= 2 every permutation is one of the two: ConfigError).
    """
    if not isinstance(draw, str) or draw not in RANDOM_DRAWS:
        raise unknown("random_draw", draw, RANDOM_DRAWS)
    s = student_layers
    if not _is_int(s) or s < 1:
        raise ConfigError(f"student depth {s!r} must be an integer of at least 1")
    if draw == "nontrivial" and s <= 2:
        raise ConfigError(
            f"strategy 'random' with {s} student layer(s): every permutation of {s} layer(s) is forward or "
            "reverse, so 'random' would duplicate one of them; use at least 3 student layers, or "
            "distill.random_draw: any for the paper's unrestricted draw"
        )
    identity = list(range(1, s + 1))
    rng = random.Random(seed)
    perm = list(identity)
    rng.shuffle(perm)
    if draw == "any":
        return perm
    while perm == identity or perm == identity[::-1]:  # at most 2/S! of draws: a few tries at worst
        perm = list(identity)
        rng.shuffle(perm)
    return perm


def copy_layer_indices(
    copy_layers: str | list[int], teacher_layers: int, student_layers: int
) -> list[int]:
    """0-based indices of the teacher layer modules copied into student layers ``0..S-1``.

    ``forward``: ``fwd(i) - 1``; ``spread``: evenly spaced including first and last;
    or an explicit list of ``S`` distinct indices in ``0..T-1``.
    """
    validate_depths(teacher_layers, student_layers)
    t, s = teacher_layers, student_layers
    if isinstance(copy_layers, (list, tuple)):
        idx = list(copy_layers)
        if len(idx) != s:
            raise ConfigError(
                f"copy_layers {idx!r}: expected {s} teacher layer indices (one per student "
                f"layer), got {len(idx)}"
            )
        for v in idx:
            if not _is_int(v) or not 0 <= v < t:
                raise ConfigError(
                    f"copy_layers {idx!r}: index {v!r} out of range 0..{t - 1}"
                )
        if len(set(idx)) != len(idx):
            raise ConfigError(f"copy_layers {idx!r}: indices must be distinct")
        return idx
    if not isinstance(copy_layers, str) or copy_layers not in COPY_LAYERS:
        raise unknown("copy_layers", copy_layers, COPY_LAYERS)
    if copy_layers == "forward":
        return [f - 1 for f in forward_targets(t, s)]
    if s == 1:
        return [0]
    return [min(i * t // (s - 1), t - 1) for i in range(s)]
