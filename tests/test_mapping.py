"""Layer maps and copied-layer indices against SPEC.md ("Layer-selection strategies")."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunekd.errors import ConfigError
from tunekd.mapping import (
    STRATEGIES,
    copy_layer_indices,
    forward_targets,
    random_permutation,
    resolve_layer_map,
    validate_depths,
)

# ---------------------------------------------------------------- literal expectations (SPEC)

FORWARD_TARGETS = {
    (12, 1): [12],
    (12, 2): [6, 12],
    (12, 3): [4, 8, 12],
    (12, 4): [3, 6, 9, 12],
    (12, 6): [2, 4, 6, 8, 10, 12],
    (12, 9): [2, 3, 4, 6, 7, 8, 10, 11, 12],
    (36, 9): [4, 8, 12, 16, 20, 24, 28, 32, 36],
}

# (T, S) -> {strategy: pairs without the embedding pair}
EXPECTED = {
    (12, 1): {
        "forward": [(1, 12)],
        "reverse": [(1, 12)],
        "all_to_one": [(1, 6)],
    },
    (12, 2): {
        "forward": [(1, 6), (2, 12)],
        "reverse": [(1, 12), (2, 6)],
        "all_to_one": [(1, 6), (2, 6)],
    },
    (12, 3): {
        "forward": [(1, 4), (2, 8), (3, 12)],
        "reverse": [(1, 12), (2, 8), (3, 4)],
        "all_to_one": [(1, 6), (2, 6), (3, 6)],
    },
    (12, 4): {
        "forward": [(1, 3), (2, 6), (3, 9), (4, 12)],
        "reverse": [(1, 12), (2, 9), (3, 6), (4, 3)],
        "all_to_one": [(1, 6), (2, 6), (3, 6), (4, 6)],
    },
    (12, 6): {
        "forward": [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)],
        "reverse": [(1, 12), (2, 10), (3, 8), (4, 6), (5, 4), (6, 2)],
        "all_to_one": [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)],
    },
    (12, 9): {
        "forward": [(1, 2), (2, 3), (3, 4), (4, 6), (5, 7), (6, 8), (7, 10), (8, 11), (9, 12)],
        "reverse": [(1, 12), (2, 11), (3, 10), (4, 8), (5, 7), (6, 6), (7, 4), (8, 3), (9, 2)],
        "all_to_one": [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6), (7, 6), (8, 6), (9, 6)],
    },
    (36, 9): {
        "forward": [(1, 4), (2, 8), (3, 12), (4, 16), (5, 20), (6, 24), (7, 28), (8, 32), (9, 36)],
        "reverse": [(1, 36), (2, 32), (3, 28), (4, 24), (5, 20), (6, 16), (7, 12), (8, 8), (9, 4)],
        "all_to_one": [
            (1, 18), (2, 18), (3, 18), (4, 18), (5, 18), (6, 18), (7, 18), (8, 18), (9, 18)
        ],
    },
}

# the embedding pair each strategy gets with match_embeddings=True
EMBEDDING_PAIR = {
    (12, "forward"): (0, 0), (12, "reverse"): (0, 0), (12, "all_to_one"): (0, 6),
    (36, "forward"): (0, 0), (36, "reverse"): (0, 0), (36, "all_to_one"): (0, 18),
}

CASES = [(t, s, strat) for (t, s), by in EXPECTED.items() for strat in by]


@pytest.mark.parametrize(("t", "s"), list(FORWARD_TARGETS))
def test_forward_targets(t, s):
    assert forward_targets(t, s) == FORWARD_TARGETS[(t, s)]


@pytest.mark.parametrize(("t", "s", "strategy"), CASES)
def test_maps_without_embeddings(t, s, strategy):
    got = resolve_layer_map(strategy, t, s, match_embeddings=False)
    assert got == EXPECTED[(t, s)][strategy]


@pytest.mark.parametrize(("t", "s", "strategy"), CASES)
def test_maps_with_embeddings(t, s, strategy):
    got = resolve_layer_map(strategy, t, s, match_embeddings=True)
    assert got == [EMBEDDING_PAIR[(t, strategy)]] + EXPECTED[(t, s)][strategy]


def test_fully_literal_examples():
    assert resolve_layer_map("forward", 6, 3, match_embeddings=True) == [
        (0, 0), (1, 2), (2, 4), (3, 6)
    ]
    assert resolve_layer_map("forward", 12, 1, match_embeddings=False) == [(1, 12)]
    assert resolve_layer_map("forward", 12, 3, match_embeddings=True) == [
        (0, 0), (1, 4), (2, 8), (3, 12)
    ]
    assert resolve_layer_map("reverse", 12, 3, match_embeddings=True) == [
        (0, 0), (1, 12), (2, 8), (3, 4)
    ]
    assert resolve_layer_map("all_to_one", 12, 3, match_embeddings=True) == [
        (0, 6), (1, 6), (2, 6), (3, 6)
    ]
    assert resolve_layer_map("all_to_one", 36, 9, match_embeddings=True)[0] == (0, 18)


@pytest.mark.parametrize("emb", [True, False])
@pytest.mark.parametrize("strategy", ["none"])
def test_none_is_empty(strategy, emb):
    assert resolve_layer_map(strategy, 12, 3, match_embeddings=emb) == []


def test_random_pinned_regression():
    # random.Random(3).shuffle on [1..6] is stable across Python versions; pin it.
    assert resolve_layer_map("random", 12, 6, match_embeddings=False, seed=3) == [
        (1, 2), (2, 6), (3, 8), (4, 12), (5, 10), (6, 4)
    ]
    assert resolve_layer_map("random", 12, 6, match_embeddings=True, seed=3)[0] == (0, 0)


def test_random_deterministic_across_processes():
    code = (
        "import sys; from tunekd.mapping import resolve_layer_map as r;"
        "print(r('random', 36, 9, match_embeddings=True, seed=7));"
        "print('torch' in sys.modules)"
    )
    outs = set()
    for hashseed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        outs.add(res.stdout)
    assert len(outs) == 1
    printed_map, torch_loaded = outs.pop().splitlines()
    assert printed_map == str(resolve_layer_map("random", 36, 9, match_embeddings=True, seed=7))
    assert torch_loaded == "False"  # mapping is a pure, torch-free module


# ---------------------------------------------------------------- properties

@st.composite
def depths(draw):
    t = draw(st.integers(1, 48))
    s = draw(st.integers(1, t))
    return t, s


@settings(max_examples=200, deadline=None)
@given(depths(), st.integers(0, 2**32), st.sampled_from(["forward", "reverse", "all_to_one", "random"]),
       st.booleans(), st.sampled_from(["nontrivial", "any"]))
def test_map_properties(ts, seed, strategy, emb, draw):
    t, s = ts
    if strategy == "random" and draw == "nontrivial" and s <= 2:
        with pytest.raises(ConfigError, match="forward or reverse"):
            resolve_layer_map(strategy, t, s, match_embeddings=emb, seed=seed, random_draw=draw)
        return
    m = resolve_layer_map(strategy, t, s, match_embeddings=emb, seed=seed, random_draw=draw)
    students = [p[0] for p in m]
    assert students == list(range(0 if emb else 1, s + 1))  # one pair per state, sorted
    for si, ti in m:
        assert 0 <= si <= s and 0 <= ti <= t
        assert isinstance(si, int) and isinstance(ti, int)
    layer_pairs = [p for p in m if p[0] >= 1]
    fwd = forward_targets(t, s)
    if strategy == "forward":
        assert [p[1] for p in layer_pairs] == fwd
    elif strategy == "reverse":
        assert [p[1] for p in layer_pairs] == fwd[::-1]
    elif strategy == "all_to_one":
        assert all(ti == t // 2 for _, ti in m)
    else:
        assert sorted(p[1] for p in layer_pairs) == fwd
        if draw == "nontrivial":  # never secretly forward or reverse
            assert [p[1] for p in layer_pairs] not in (fwd, fwd[::-1])
    if emb and strategy != "all_to_one":
        assert m[0] == (0, 0)


@settings(max_examples=100, deadline=None)
@given(depths())
def test_forward_targets_properties(ts):
    t, s = ts
    fwd = forward_targets(t, s)
    assert len(fwd) == s and fwd[-1] == t
    assert all(a < b for a, b in zip(fwd, fwd[1:]))  # strictly increasing since T >= S
    assert all(1 <= f <= t for f in fwd)


@settings(max_examples=100, deadline=None)
@given(depths(), st.integers(0, 2**32))
def test_random_same_seed_same_map(ts, seed):
    t, s = ts
    draw = "nontrivial" if s >= 3 else "any"
    a = resolve_layer_map("random", t, s, match_embeddings=True, seed=seed, random_draw=draw)
    b = resolve_layer_map("random", t, s, match_embeddings=True, seed=seed, random_draw=draw)
    assert a == b


# ---------------------------------------------------------------- random: never forward or reverse (issue 9)

@pytest.mark.parametrize(("t", "s"), [(12, 3), (12, 4), (12, 6), (12, 9), (36, 9), (6, 3)])
def test_random_never_forward_or_reverse_over_many_seeds(t, s):
    fwd_map = resolve_layer_map("forward", t, s, match_embeddings=False)
    rev_map = resolve_layer_map("reverse", t, s, match_embeddings=False)
    maps = [resolve_layer_map("random", t, s, match_embeddings=False, seed=k) for k in range(2000)]
    assert all(m != fwd_map and m != rev_map for m in maps)
    # distinct seeds give varied maps: for S = 3 all 4 non-trivial permutations occur, for larger S many
    distinct = {tuple(m) for m in maps}
    if s == 3:
        assert len(distinct) == 4  # 3! minus identity and reversal: every one of them occurs
    elif s == 4:
        assert len(distinct) == 22  # 4! - 2
    else:
        assert len(distinct) > 500
    # and each map really is the forward targets permuted by the logged permutation
    fwd = forward_targets(t, s)
    for k in range(50):
        perm = random_permutation(s, k)
        assert sorted(perm) == list(range(1, s + 1))
        assert resolve_layer_map("random", t, s, match_embeddings=False, seed=k) == [
            (i, fwd[perm[i - 1] - 1]) for i in range(1, s + 1)]


def test_random_issue_seeds_no_longer_give_forward_or_reverse():
    # issue 9: with the unrestricted draw, T = 12, S = 3: seeds 5 and 17 give forward, seed 4 reverse
    fwd_map = resolve_layer_map("forward", 12, 3, match_embeddings=False)
    rev_map = resolve_layer_map("reverse", 12, 3, match_embeddings=False)
    anyd = {k: resolve_layer_map("random", 12, 3, match_embeddings=False, seed=k, random_draw="any")
            for k in (4, 5, 17)}
    assert anyd[5] == fwd_map and anyd[17] == fwd_map and anyd[4] == rev_map  # the paper's draw, kept as option
    for k in (4, 5, 17):
        m = resolve_layer_map("random", 12, 3, match_embeddings=False, seed=k)
        assert m not in (fwd_map, rev_map)


def test_random_keeps_the_unrestricted_draw_when_it_is_already_nontrivial():
    # `nontrivial` reshuffles only when the first draw is forward or reverse: other maps are unchanged
    for k in range(200):
        first = resolve_layer_map("random", 12, 6, match_embeddings=False, seed=k, random_draw="any")
        if first not in (resolve_layer_map("forward", 12, 6, match_embeddings=False),
                         resolve_layer_map("reverse", 12, 6, match_embeddings=False)):
            assert resolve_layer_map("random", 12, 6, match_embeddings=False, seed=k) == first


@pytest.mark.parametrize("s", [1, 2])
def test_random_with_two_or_fewer_layers_is_one_clear_error(s):
    with pytest.raises(ConfigError) as e:
        resolve_layer_map("random", 12, s, match_embeddings=True, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "at least 3 student layers" in msg and "random_draw: any" in msg
    # the paper's unrestricted draw stays available
    assert resolve_layer_map("random", 12, s, match_embeddings=False, seed=0, random_draw="any")


def test_random_draw_unknown():
    with pytest.raises(ConfigError, match="unknown random_draw 'nontrival'.*nontrivial"):
        random_permutation(3, 0, draw="nontrival")


@settings(max_examples=50, deadline=None)
@given(st.integers(3, 48).flatmap(lambda t: st.tuples(st.just(t), st.integers(3, t))))
def test_random_some_seed_differs(ts):
    t, s = ts
    maps = {tuple(resolve_layer_map("random", t, s, match_embeddings=False, seed=k))
            for k in range(20)}
    assert len(maps) > 1


@settings(max_examples=100, deadline=None)
@given(depths(), st.sampled_from(["forward", "spread"]))
def test_copy_indices_properties(ts, mode):
    t, s = ts
    idx = copy_layer_indices(mode, t, s)
    assert len(idx) == s and len(set(idx)) == s
    assert all(0 <= i < t for i in idx)
    assert idx == sorted(idx)
    if mode == "spread":
        assert idx[0] == 0
        if s > 1:
            assert idx[-1] == t - 1


# ---------------------------------------------------------------- explicit maps

def test_explicit_map_sorted_and_no_embedding_added():
    m = resolve_layer_map([[3, 12], [1, 4], (0, 0)], 12, 3, match_embeddings=True)
    assert m == [(0, 0), (1, 4), (3, 12)]
    assert resolve_layer_map([[2, 5]], 12, 3, match_embeddings=True) == [(2, 5)]
    assert resolve_layer_map([], 12, 3, match_embeddings=True) == []


def test_explicit_out_of_range_student():
    with pytest.raises(ConfigError, match=r"layer map pair \[4, 2\]: student index 4 out of range 0\.\.3"):
        resolve_layer_map([[1, 4], [4, 2]], 12, 3, match_embeddings=False)


def test_explicit_out_of_range_teacher():
    with pytest.raises(ConfigError, match=r"layer map pair \[1, 13\]: teacher index 13 out of range 0\.\.12"):
        resolve_layer_map([[1, 13]], 12, 3, match_embeddings=False)
    with pytest.raises(ConfigError, match=r"teacher index -1 out of range"):
        resolve_layer_map([[1, -1]], 12, 3, match_embeddings=False)


def test_explicit_duplicate_student():
    with pytest.raises(ConfigError, match=r"\[1, 8\].*student index 1"):
        resolve_layer_map([[1, 4], [1, 8]], 12, 3, match_embeddings=False)


@pytest.mark.parametrize("bad", [[[1]], [[1, 2, 3]], [["1", 2]], [[1.0, 2]], [5], [[True, 2]]])
def test_explicit_malformed(bad):
    with pytest.raises(ConfigError, match="layer map pair"):
        resolve_layer_map(bad, 12, 3, match_embeddings=False)


# ---------------------------------------------------------------- errors

def test_unknown_strategy_did_you_mean():
    with pytest.raises(ConfigError) as e:
        resolve_layer_map("foward", 12, 3, match_embeddings=True)
    msg = str(e.value)
    assert "unknown strategy 'foward'" in msg
    assert "did you mean 'forward'" in msg
    for name in STRATEGIES:
        assert name in msg


@pytest.mark.parametrize(("t", "s", "pattern"), [
    (12, 0, r"student depth 0 must be between 1 and the teacher's depth 12"),
    (12, 13, r"student depth 13 must be between 1 and the teacher's depth 12"),
    (12, -1, r"student depth -1"),
    (0, 0, r"teacher depth 0"),
])
def test_depth_errors(t, s, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate_depths(t, s)
    with pytest.raises(ConfigError, match=pattern):
        resolve_layer_map("forward", t, s, match_embeddings=True)
    with pytest.raises(ConfigError, match=pattern):
        copy_layer_indices("forward", t, s)
    with pytest.raises(ConfigError, match=pattern):
        forward_targets(t, s)


def test_depth_ok():
    validate_depths(12, 12)
    validate_depths(1, 1)
    assert resolve_layer_map("forward", 12, 12, match_embeddings=False) == [
        (i, i) for i in range(1, 13)
    ]


# ---------------------------------------------------------------- copy_layer_indices

@pytest.mark.parametrize(("mode", "t", "s", "expected"), [
    ("forward", 12, 3, [3, 7, 11]),
    ("forward", 12, 6, [1, 3, 5, 7, 9, 11]),
    ("forward", 36, 9, [3, 7, 11, 15, 19, 23, 27, 31, 35]),
    ("forward", 12, 1, [11]),
    ("spread", 12, 3, [0, 6, 11]),
    ("spread", 36, 9, [0, 4, 9, 13, 18, 22, 27, 31, 35]),
    ("spread", 12, 1, [0]),
    ("spread", 12, 2, [0, 11]),
    ("spread", 12, 12, list(range(12))),
])
def test_copy_layer_indices(mode, t, s, expected):
    assert copy_layer_indices(mode, t, s) == expected


def test_copy_layer_indices_explicit():
    assert copy_layer_indices([0, 5, 11], 12, 3) == [0, 5, 11]
    assert copy_layer_indices((11, 0, 5), 12, 3) == [11, 0, 5]  # order is the user's


@pytest.mark.parametrize(("bad", "pattern"), [
    ([0, 5], r"expected 3 .*got 2"),
    ([0, 5, 11, 1], r"expected 3 .*got 4"),
    ([0, 5, 12], r"index 12 out of range 0\.\.11"),
    ([-1, 5, 11], r"index -1 out of range 0\.\.11"),
    ([0, 5, 5], r"distinct"),
    ([0, 5, "x"], r"out of range"),
])
def test_copy_layer_indices_errors(bad, pattern):
    with pytest.raises(ConfigError, match=pattern):
        copy_layer_indices(bad, 12, 3)


def test_copy_layer_indices_unknown():
    with pytest.raises(ConfigError, match=r"unknown copy_layers 'sprad'.*did you mean 'spread'"):
        copy_layer_indices("sprad", 12, 3)


# ---------------------------------------------------------------- the plan: map seed and logged permutation

def _study(**distill):
    from tunekd.study import Study

    return Study.model_validate({"name": "x", "task": {"name": "synthetic"}, "teacher": {"model": "minilm"},
                                 "student": {"layers": 4}, "distill": {"strategy": "random", **distill}})


def test_plan_logs_the_permutation_and_draws_from_the_map_seed():
    from tunekd import plan

    study = _study()
    p = plan.resolve(study.trial({"seed": 3}), 12, True)
    assert p.permutation == random_permutation(4, 3) and p.map_seed == 3
    fwd = forward_targets(12, 4)
    assert p.layer_map == [(0, 0)] + [(i, fwd[p.permutation[i - 1] - 1]) for i in range(1, 5)]
    params = p.params(study.trial({"seed": 3}))
    assert params["distill.random_permutation"] == p.permutation and params["distill.map_seed_used"] == 3
    # distill.map_seed: the map no longer follows the trial's seed (maps can be crossed with seeds)
    fixed = [plan.resolve(_study(map_seed=11).trial({"seed": s}), 12, True) for s in range(5)]
    assert all(q.layer_map == fixed[0].layer_map and q.map_seed == 11 for q in fixed)
    assert fixed[0].permutation == random_permutation(4, 11)
    # other strategies log no permutation
    other = plan.resolve(_study().trial({"distill.strategy": "forward"}), 12, True)
    assert other.permutation is None and "distill.random_permutation" not in other.params(study)


def test_random_draw_option_in_the_study_file():
    from tunekd import plan
    from tunekd.study import validate

    raw = {"name": "x", "task": {"name": "synthetic"}, "teacher": {"model": "minilm"}, "student": {"layers": 2},
           "distill": {"strategy": "random", "random_draw": "any"}}
    assert plan.resolve(validate(raw), 12, True).layer_map  # the paper's draw works for S = 2
    raw["distill"]["random_draw"] = "nontrival"
    with pytest.raises(ConfigError) as e:
        validate(raw)
    assert "distill.random_draw" in str(e.value) and "'nontrivial'" in str(e.value) and "\n" not in str(e.value)
    raw["distill"]["random_draw"] = "nontrivial"
    with pytest.raises(ConfigError, match="at least 3 student layers"):
        plan.resolve(validate(raw), 12, True)
