"""`tunekd.stats`: each routine against a value computed another way (statsmodels, scipy, float64 formulas), and
the error rates of every procedure that peeks, stops early or tests many pairs, by simulation (vectorised: seconds).

Monte-Carlo tolerance: a rate estimated from R replicates has standard error sqrt(α(1−α)/R); the checks allow
3.5 standard errors above α (a false alarm about once in 4 000 runs per check; the seeds are fixed, so a run
is reproducible)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from tunekd import stats

ALPHA, MARGIN = 0.05, 1.0


def _tol(reps: int, alpha: float = ALPHA) -> float:
    return alpha + 3.5 * math.sqrt(alpha * (1 - alpha) / reps)


# --- fixed n -------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [[0.1, -0.3, 0.4, 0.2], [2.0, 1.5, 3.1], [0.5, -0.9, 1.7, 0.2, -0.4, 0.8]])
def test_paired_test_equals_statsmodels_ttost_paired_and_scipy(d):
    from statsmodels.stats.weightstats import ttost_paired

    d = np.asarray(d)
    ref = np.zeros_like(d)
    res = stats.paired_test(d, MARGIN, ALPHA)
    p_sm = ttost_paired(d, ref, -MARGIN, MARGIN)[0]
    assert res["p_tost"] == pytest.approx(p_sm, rel=1e-12, abs=1e-15)
    assert res["p_diff"] == pytest.approx(sps.ttest_rel(d, ref).pvalue, rel=1e-12)
    n, m, s = d.size, d.mean(), d.std(ddof=1)
    half = sps.t.ppf(0.975, n - 1) * s / math.sqrt(n)  # by hand
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((m - half, m + half), rel=1e-12)


def test_identical_differences_decide_nothing():
    for d in ([0.0, 0.0, 0.0], [-1.03, -1.03, -1.03], [0.5, 0.5]):
        res = stats.paired_test(d, MARGIN)
        assert res["verdict"] == "inconclusive" and res["degenerate"] and math.isnan(res["p_tost"])
    b = stats.boundaries(2, 4, ALPHA)
    assert stats.sequential_test([0.2, 0.2, 0.2], MARGIN, b)["verdict"] == "inconclusive"
    v, _ = stats.sequential_verdicts(np.full((3, 4), 0.2), MARGIN, b)
    assert (v == 0).all()


# --- the sequential design -------------------------------------------------------------------------


def test_spending_functions_by_formula():
    t = np.array([0.25, 0.5, 1.0])
    obf = 2 * (1 - sps.norm.cdf(sps.norm.ppf(1 - ALPHA / 2) / np.sqrt(t)))
    assert stats.spent(t, ALPHA, "obrien_fleming") == pytest.approx(obf, rel=1e-12)
    assert stats.spent(t, ALPHA, "pocock") == pytest.approx(ALPHA * np.log(1 + (math.e - 1) * t), rel=1e-12)
    for sp in stats.SPENDINGS:
        assert float(stats.spent(1.0, ALPHA, sp)) == pytest.approx(ALPHA, rel=1e-12)


def test_one_look_is_the_fixed_n_t_test():
    b = stats.boundaries(5, 5, ALPHA, pairs=3)
    assert b.eq[0] == pytest.approx(sps.t.isf(ALPHA, 4), rel=1e-12)
    assert b.diff[0] == pytest.approx(sps.t.isf(ALPHA / 3 / 2, 4), rel=1e-12)


def test_boundaries_shrink_to_the_last_look_and_are_cached():
    for sp in stats.SPENDINGS:
        b = stats.boundaries(3, 8, ALPHA, sp)
        assert len(b.eq) == len(b.diff) == 6
        assert all(x > y for x, y in zip(b.diff, b.diff[1:]))  # O'Brien–Fleming and Pocock both decrease in t
        assert b.diff[-1] > sps.t.isf(ALPHA / 2, 7)  # the last look pays for the earlier ones
    hits = stats._calibrate.cache_info().hits
    assert stats.boundaries(3, 8, ALPHA) == stats.boundaries(3, 8, ALPHA)
    assert stats._calibrate.cache_info().hits == hits + 4  # both tests' values, twice: from the cache
    text = stats.boundaries(3, 8, ALPHA).describe()
    assert text.count("c_eq =") == 6 and "O'Brien" not in text and "obrien–fleming" in text


@pytest.mark.parametrize("spending", stats.SPENDINGS)
@pytest.mark.parametrize("n_max", [6, 10])
@pytest.mark.parametrize("sd", [0.5, 1.0, 2.0, 4.0])
def test_sequential_rule_holds_alpha_whatever_the_sd(spending, n_max, sd):
    """P(equivalent | Δ = margin) <= α and P(different | Δ = 0) <= α, over the whole sequence of looks."""
    reps = 12_000
    b = stats.boundaries(3, n_max, ALPHA, spending)
    rng = np.random.default_rng(hash((spending, n_max, sd)) % 2**32)
    v_eq, _ = stats.sequential_verdicts(MARGIN + sd * rng.standard_normal((reps, n_max)), MARGIN, b)
    v_0, _ = stats.sequential_verdicts(sd * rng.standard_normal((reps, n_max)), MARGIN, b)
    assert (v_eq == 1).mean() <= _tol(reps)
    assert (v_0 == 2).mean() <= _tol(reps)
    # at the other boundary null too (Δ = −margin)
    v_neg, _ = stats.sequential_verdicts(-MARGIN + sd * rng.standard_normal((reps, n_max)), MARGIN, b)
    assert (v_neg == 1).mean() <= _tol(reps)


def test_the_difference_test_spends_all_of_alpha_when_equivalence_cannot_stop_it():
    """With sd large against the margin equivalence never stops a path, so P(different | Δ = 0) is the whole
    spent α: it must be close to α from below, not just under it (the calibration is not merely conservative)."""
    reps = 40_000
    b = stats.boundaries(3, 10, ALPHA)
    v, _ = stats.sequential_verdicts(50.0 * np.random.default_rng(7).standard_normal((reps, 10)), MARGIN, b)
    se = math.sqrt(ALPHA * (1 - ALPHA) / reps)
    assert abs((v == 2).mean() - ALPHA) < 3.5 * se


def test_repeated_fixed_n_looks_break_alpha_and_the_design_does_not():
    """The rule tunekd had (a fixed-n TOST and 95% interval at every look) exceeds α in the same simulation that
    the design passes: the check can fail."""
    reps, n_max = 20_000, 10
    naive = stats.Boundaries(n_min=3, n_max=n_max, alpha=ALPHA, spending="none", pairs=1,
                             eq=tuple(sps.t.isf(ALPHA, n - 1) for n in range(3, n_max + 1)),
                             diff=tuple(sps.t.isf(ALPHA / 2, n - 1) for n in range(3, n_max + 1)))
    x = np.random.default_rng(11).standard_normal((reps, n_max))
    assert (stats.sequential_verdicts(x, MARGIN, naive)[0] == 2).mean() > 2 * ALPHA
    assert (stats.sequential_verdicts(x, MARGIN, stats.boundaries(3, n_max, ALPHA))[0] == 2).mean() <= _tol(reps)


def test_vectorised_rule_equals_the_look_by_look_rule():
    b = stats.boundaries(3, 7, ALPHA, "pocock", pairs=2)
    rng = np.random.default_rng(5)
    paths = rng.normal(0.4, 0.8, (300, 7))
    codes, stop = stats.sequential_verdicts(paths, MARGIN, b)
    names = {0: "inconclusive", 1: "equivalent", 2: "different"}
    for path, code, n in zip(paths, codes, stop):
        res = stats.sequential_replay(path, MARGIN, b)
        assert res["verdict"] == names[int(code)]
        assert res["look"] == n


# --- many pairs: family-wise and intersection–union claims ------------------------------------------


def test_family_wise_different_over_a_cells_pairs():
    """4 pairs sharing the reference, every Δ = 0: P(at least one "different") <= α, sequential and fixed-n Holm."""
    reps = 5_000
    b = stats.boundaries(3, 6, ALPHA, pairs=4)
    sim = stats.simulate_cell([0.0] * 4, 1.0, MARGIN, b, reps=reps, seed=3)
    assert sim["any_different"] <= _tol(reps)
    # fixed n = 6, Holm over the 4 two-sided p-values (pairs correlated through the shared reference)
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((reps, 6)) / math.sqrt(2)
    x = rng.standard_normal((reps, 4, 6)) / math.sqrt(2)
    d = x - ref[:, None, :]
    p = sps.ttest_1samp(d, 0.0, axis=2).pvalue
    # Holm rejects anything iff its smallest p is below α/m (step-down, by hand, vectorised); stats.holm agrees
    rejected = p.min(axis=1) <= ALPHA / 4
    assert all(stats.holm(row, ALPHA).any() == r for row, r in zip(p[:20], rejected[:20]))
    assert rejected.mean() <= _tol(reps)
    assert (p < ALPHA).any(axis=1).mean() > 2 * ALPHA  # uncorrected: what Holm prevents


def test_holm_equals_statsmodels_and_skips_missing_tests():
    from statsmodels.stats.multitest import multipletests

    p = [0.01, 0.04, 0.03, 0.2]
    assert list(stats.holm(p, 0.05)) == list(multipletests(p, 0.05, "holm")[0])
    assert list(stats.holm([0.01, math.nan, 0.04], 0.05)) == list(multipletests([0.01, 0.04], 0.05, "holm")[0][[0]]) \
        + [False] + list(multipletests([0.01, 0.04], 0.05, "holm")[0][[1]])
    assert stats.holm_adjusted([0.01, 0.04])[1] == pytest.approx(0.04)  # by hand: max(2·0.01, 1·0.04)


def test_intersection_union_headline():
    assert stats.cell_claims(["equivalent"] * 3) == "holds"
    assert stats.cell_claims(["equivalent", "inconclusive"]) == "not shown"
    assert stats.cell_claims(["equivalent", "different"]) == "fails"
    assert stats.cell_claims([]) == "not shown"
    # by simulation: one pair at the margin, the others at 0: P(headline holds) <= α
    reps = 8_000
    b = stats.boundaries(3, 6, ALPHA, pairs=3)
    sim = stats.simulate_cell([MARGIN, 0.0, 0.0], 0.5, MARGIN, b, reps=reps, seed=9)
    assert sim["all_equivalent"] <= _tol(reps)


# --- the block analysis and chance ------------------------------------------------------------------


def test_block_anova_by_hand():
    rng = np.random.default_rng(2)
    k, b = 4, 5
    y = rng.normal(70, 1, (k, b)) + np.array([0, 0.5, 1.0, -0.5])[:, None] + rng.normal(0, 2, b)[None, :]
    levels = np.repeat(np.arange(k), b)
    blocks = np.tile(np.arange(b), k)
    res = stats.block_anova(y.reshape(-1), levels, blocks)
    g = y.mean()
    ss_level = b * ((y.mean(axis=1) - g) ** 2).sum()
    ss_block = k * ((y.mean(axis=0) - g) ** 2).sum()
    ss_total = ((y - g) ** 2).sum()
    ss_res = ss_total - ss_level - ss_block
    f = (ss_level / (k - 1)) / (ss_res / ((k - 1) * (b - 1)))
    assert res["F"] == pytest.approx(f, rel=1e-9)
    assert res["p"] == pytest.approx(sps.f.sf(f, k - 1, (k - 1) * (b - 1)), rel=1e-9)
    assert res["share_level"] == pytest.approx(ss_level / ss_total, rel=1e-9)
    assert res["share_block"] == pytest.approx(ss_block / ss_total, rel=1e-9)
    assert res["blocks"] == b and res["levels"] == k
    # an incomplete block is left out; identical values give no test
    res = stats.block_anova(np.r_[y.reshape(-1), 80.0], np.r_[levels, 0], np.r_[blocks, 99])
    assert res["blocks"] == b and res["F"] == pytest.approx(f, rel=1e-9)
    assert math.isnan(stats.block_anova([50.0] * 6, [0, 1, 2] * 2, [0] * 3 + [1] * 3)["F"])


def test_block_anova_error_rate():
    """No level effect, strong seed effect: the F test rejects at about α."""
    reps, k, b = 200, 5, 4
    rng = np.random.default_rng(8)
    levels = np.repeat(np.arange(k), b)
    blocks = np.tile(np.arange(b), k)
    hits = 0
    for _ in range(reps):
        y = rng.normal(0, 1, (k, b)) + rng.normal(0, 3, b)[None, :]
        hits += stats.block_anova(y.reshape(-1), levels, blocks)["p"] < ALPHA
    assert hits / reps <= _tol(reps)


def test_at_chance_by_binomial_test():
    assert stats.at_chance(50.0, 50.6, 320)  # below the majority class
    assert stats.at_chance(53.0, 50.6, 320)  # p = 0.22
    assert not stats.at_chance(60.0, 50.6, 320)
    k = round(0.53 * 320)
    assert sps.binomtest(k, 320, 0.506, alternative="greater").pvalue > 0.01
    assert stats.at_chance(50.0, 50.0, None) and not stats.at_chance(50.1, 50.0, None)


def test_simulate_cell_counts_the_shared_reference_once():
    b = stats.boundaries(3, 3, ALPHA, pairs=2)  # one look: every pair runs 3 seeds
    sim = stats.simulate_cell([0.0, 0.0], 1.0, MARGIN, b, reps=100)
    assert sim["trials"] == pytest.approx(3 * 3)  # 2 levels + the reference, 3 seeds each
    assert all(p["seeds"] == 3 for p in sim["pairs"])
    assert isinstance(pd.DataFrame(sim["pairs"]), pd.DataFrame)


def test_differences_equal_up_to_float_rounding_are_identical():
    """Accuracies of a small eval set: 80.05 − 79.70 and 79.82 − 79.47 are 0.35 both, not in floats."""
    d = np.array([80.05 - 79.70, 79.82 - 79.47, 81.40 - 81.05])
    assert d.std(ddof=1) > 0  # floats see a spread...
    res = stats.paired_test(d, MARGIN)
    assert res["degenerate"] and res["verdict"] == "inconclusive" and res["sd_diff"] == 0.0  # ...tunekd does not
    v, _ = stats.sequential_verdicts(np.tile(np.r_[d, d], (2, 1)), MARGIN, stats.boundaries(3, 6, ALPHA))
    assert (v == 0).all()
    assert not stats.identical([0.35, 0.35 + 1e-6])
