"""Every statistical routine of tunekd, in one place: used by the adaptive-seed planner (`seeds.py`), the
report (`report.py`) and the plan command (`plan_seeds.py`). No MLflow, no Ray.

A *pair* compares one level of a searched dimension (a strategy, a λ, ...) with the reference level in one
*cell* (the values of the other searched dimensions), on paired differences d_i = x_i − ref_i, one per seed.

- `paired_test`: fixed n. Mean, sd, the (1−α) t interval, the two one-sided tests (TOST) of equivalence
  within ±δ (Schuirmann 1987; equals statsmodels' `ttost_paired`) and the two-sided t test of zero.
- The sequential design (`Boundaries`, `boundaries`): the looks n = min..max (one seed more per look), and
  per look the critical t values of the equivalence test (one-sided, per TOST side, α) and of the difference
  test (two-sided, α / m for the m pairs of a cell: Bonferroni, so "different" claims are family-wise).
  α is spent over the looks by a Lan–DeMets spending function (O'Brien–Fleming type, the default, or Pocock
  type; Lan & DeMets 1983, Jennison & Turnbull 2000 ch. 7) at information fraction n/max. The t statistics of
  one pair's growing sample have a joint null distribution free of σ (they are scale invariant), so the
  boundaries are calibrated by Monte Carlo on that distribution (fixed seed, cached): the overall error rates
  hold at α whatever the sd. A one-look design (min = max) uses the exact t quantiles.
  Equivalence at look k: mean ± c_eq·se inside (−δ, δ); different: not equivalent and |mean|/se > c_diff.
  P(equivalent | |Δ| ≥ δ) ≤ the one-sided crossing probability at the boundary null Δ = ±δ, which is α.
- `cell_claims`: the cell's headline "no level differs from the reference by more than ±δ", an
  intersection–union test (every pair equivalent; valid at α without correction, Berger 1982), and the
  family-wise "X differs" claims: Holm (statsmodels `multipletests`) at a fixed n, Bonferroni boundaries
  in a sequential design.
- `block_anova`: a randomized-block analysis (level × seed, the seed a block) with statsmodels OLS.
- `at_chance`: is a score clearly above the best constant guess (exact binomial test)?
- `simulate_cell`: the sequential rule, vectorised, on simulated trials (the plan command and the tests).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Spending = Literal["obrien_fleming", "pocock"]
SPENDINGS = ("obrien_fleming", "pocock")
CALIBRATION_PATHS = 400_000  # Monte-Carlo paths per calibration: the spent α is exact to about ±0.0004
CALIBRATION_SEED = 20261205
AT_CHANCE_ALPHA = 0.01  # as the teacher's sanity check


# --- fixed n ------------------------------------------------------------------------------------


def paired_test(d, margin: float, alpha: float = 0.05) -> dict:
    """Statistics of paired differences `d` at a fixed n: mean, sd, the (1−α) t interval, the (1−2α) interval
    of the TOST, the TOST p-value for the margin ±`margin` (the larger one-sided p), the two-sided p of zero
    and the verdict (per pair, unadjusted).

    equivalent: both one-sided tests reject at level α (the 1−2α interval lies inside (−δ, δ));
    different: not equivalent and the 1−α interval excludes 0; otherwise inconclusive — always with fewer
    than 2 pairs, and when every difference is the same value (sd 0: no estimate of the spread; `degenerate`).
    """
    from scipy import stats

    d = np.asarray(d, dtype=float)
    n = int(d.size)
    out = {"n": n, "mean_diff": float(d.mean()) if n else math.nan, "sd_diff": math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "ci90_low": math.nan, "ci90_high": math.nan,
           "p_tost": math.nan, "p_diff": math.nan, "verdict": "inconclusive", "degenerate": False}
    if n < 2:
        return out
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    out["sd_diff"] = sd
    if identical(d):  # every difference equal: no estimate of the spread, no test
        out.update(degenerate=True, sd_diff=0.0)
        return out
    res = stats.ttest_1samp(d, 0.0)
    ci, ci_eq = res.confidence_interval(1 - alpha), res.confidence_interval(1 - 2 * alpha)
    p_low = stats.ttest_1samp(d, -margin, alternative="greater").pvalue  # H0: Δ <= -δ
    p_high = stats.ttest_1samp(d, margin, alternative="less").pvalue  # H0: Δ >= +δ
    out.update(ci_low=float(ci.low), ci_high=float(ci.high), ci90_low=float(ci_eq.low), ci90_high=float(ci_eq.high),
               p_tost=float(max(p_low, p_high)), p_diff=float(res.pvalue))
    if out["p_tost"] < alpha:
        out["verdict"] = "equivalent"
    elif out["ci_low"] > 0 or out["ci_high"] < 0:
        out["verdict"] = "different"
    return out


IDENTICAL_TOL = 1e-9  # differences closer than this (relative to their size, at least 1) are the same value


def identical(d) -> bool:
    """Whether every value of `d` is the same up to float rounding (accuracies of a small eval set, subtracted,
    differ in their last bits: 80.05 − 79.70 and 79.82 − 79.47 are both 0.35 to a person, not to a float)."""
    d = np.asarray(d, dtype=float)
    return bool(d.size) and float(np.ptp(d)) <= IDENTICAL_TOL * max(1.0, float(np.abs(d).max()))


# --- the sequential design ----------------------------------------------------------------------


def spent(t, alpha: float, spending: Spending):
    """α spent by information fraction `t` (0 < t <= 1): Lan–DeMets O'Brien–Fleming type
    2·(1 − Φ(z_{1−α/2}/√t)), or Pocock type α·ln(1 + (e − 1)·t). Both equal α at t = 1."""
    from scipy.stats import norm

    t = np.asarray(t, dtype=float)
    if spending == "obrien_fleming":
        return 2.0 * norm.sf(norm.isf(alpha / 2.0) / np.sqrt(t))
    if spending == "pocock":
        return alpha * np.log1p((math.e - 1.0) * t)
    raise ValueError(f"unknown spending {spending!r}; known: {', '.join(SPENDINGS)}")


@functools.lru_cache(maxsize=64)
def _calibrate(n_min: int, n_max: int, alpha: float, spending: Spending, two_sided: bool) -> tuple[float, ...]:
    """Critical t values for the looks n_min..n_max such that a path of the null t statistics first crosses
    at look k with probability spent(t_k) − spent(t_{k−1}) (t_k = n_k/n_max); Monte Carlo, fixed seed."""
    from scipy import stats

    looks = list(range(n_min, n_max + 1))
    if len(looks) == 1:  # one look: the exact t quantile
        return (float(stats.t.isf(alpha / 2 if two_sided else alpha, n_min - 1)),)
    rng = np.random.default_rng(CALIBRATION_SEED)
    m = CALIBRATION_PATHS
    s = np.zeros(m)
    q = np.zeros(m)
    alive = np.ones(m, dtype=bool)
    crossed = 0
    out: list[float] = []
    for n in range(1, n_max + 1):
        x = rng.standard_normal(m)
        s += x
        q += x * x
        if n < n_min:
            continue
        mean = s / n
        var = np.maximum(q - n * mean * mean, 0.0) / (n - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = mean / np.sqrt(var / n)
        stat = np.abs(t) if two_sided else t
        target = int(round(float(spent(n / n_max, alpha, spending)) * m))
        need = target - crossed
        cand = stat[alive]
        if need <= 0 or not cand.size:
            c = math.inf
        elif need >= cand.size:
            c = float(cand.min())
        else:  # exactly `need` of the surviving paths lie above c: between the need-th and (need+1)-th largest
            k = cand.size - need
            part = np.partition(cand, (k - 1, k))
            c = float((part[k - 1] + part[k]) / 2.0)
        hit = alive & (stat > c)
        crossed += int(hit.sum())
        alive &= ~hit
        out.append(c)
    return tuple(out)


@dataclass(frozen=True)
class Boundaries:
    """The critical t values of a sequential design, one per look n = n_min..n_max."""

    n_min: int
    n_max: int
    alpha: float
    spending: str
    pairs: int  # m: the difference test runs at α/m (family-wise over a cell's pairs)
    eq: tuple[float, ...]  # one-sided, per TOST side
    diff: tuple[float, ...]  # two-sided

    def at(self, n: int) -> tuple[float, float]:
        """(c_eq, c_diff) for a look with n pairs (n_min <= n <= n_max)."""
        i = n - self.n_min
        if not 0 <= i < len(self.eq):
            raise ValueError(f"no look with {n} pairs (looks: {self.n_min}..{self.n_max})")
        return self.eq[i], self.diff[i]

    def rows(self) -> list[dict]:
        """One row per look: n, the information fraction, α spent so far by each test, the critical values."""
        out = []
        for i, n in enumerate(range(self.n_min, self.n_max + 1)):
            t = n / self.n_max
            one = self.n_min == self.n_max
            a_diff = self.alpha / self.pairs
            out.append({"look": i + 1, "seeds": n, "fraction": t,
                        "alpha_eq": self.alpha if one else float(spent(t, self.alpha, self.spending)),
                        "alpha_diff": a_diff if one else float(spent(t, a_diff, self.spending)),
                        "c_eq": self.eq[i], "c_diff": self.diff[i]})
        return out

    def describe(self) -> str:
        """The boundaries as a text table (the dry run, the plan command)."""
        head = (f"sequential design: looks at {self.n_min}..{self.n_max} seeds, {self.spending.replace('_', '–')} "
                f"α spending, α = {self.alpha:g} per equivalence test (each TOST side), {self.alpha:g}/{self.pairs} "
                f"per difference test (two-sided; {self.pairs} pair(s) per cell)")
        lines = [head, "  look  seeds  α spent (eq, diff)   equivalent if mean ± c_eq·se inside ±margin;  "
                       "different if |t| > c_diff"]
        for r in self.rows():
            lines.append(f"  {r['look']:>4}  {r['seeds']:>5}  {r['alpha_eq']:.4f}, {r['alpha_diff']:.4f}      "
                         f"c_eq = {_c(r['c_eq'])}   c_diff = {_c(r['c_diff'])}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"n_min": self.n_min, "n_max": self.n_max, "alpha": self.alpha, "spending": self.spending,
                "pairs": self.pairs, "looks": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                                for k, v in r.items()} for r in self.rows()],
                "calibration": {"paths": CALIBRATION_PATHS, "seed": CALIBRATION_SEED}}


def _c(x: float) -> str:
    return "  ∞  " if not math.isfinite(x) else f"{x:.3f}"


def boundaries(n_min: int, n_max: int, alpha: float = 0.05, spending: Spending = "obrien_fleming",
               pairs: int = 1) -> Boundaries:
    """The design's critical values (cached): see the module docstring."""
    if not 2 <= n_min <= n_max:
        raise ValueError(f"a sequential design needs 2 <= min <= max, got {n_min}..{n_max}")
    if spending not in SPENDINGS:
        raise ValueError(f"unknown spending {spending!r}; known: {', '.join(SPENDINGS)}")
    pairs = max(int(pairs), 1)
    return Boundaries(n_min=n_min, n_max=n_max, alpha=float(alpha), spending=spending, pairs=pairs,
                      eq=_calibrate(n_min, n_max, float(alpha), spending, False),
                      diff=_calibrate(n_min, n_max, float(alpha) / pairs, spending, True))


def sequential_test(d, margin: float, bounds: Boundaries) -> dict:
    """The verdict of one look of the sequential design on the paired differences `d` (all pairs so far):
    `paired_test`'s fields (its intervals and p-values are the fixed-n ones, for information), and `verdict`
    by the look's boundaries: equivalent when mean ± c_eq·se lies inside (−δ, δ), different when not
    equivalent and |mean|/se > c_diff, else inconclusive (also with fewer than `n_min` pairs, or sd 0).
    `rci_low`/`rci_high`: the repeated confidence interval mean ± c_diff·se (Jennison & Turnbull 1989)."""
    out = paired_test(d, margin, bounds.alpha)
    out.update(verdict="inconclusive", rci_low=math.nan, rci_high=math.nan, c_eq=math.nan, c_diff=math.nan)
    n = out["n"]
    if n < bounds.n_min or n > bounds.n_max or out["degenerate"]:
        return out
    c_eq, c_diff = bounds.at(n)
    mean, se = out["mean_diff"], out["sd_diff"] / math.sqrt(n)
    out.update(c_eq=c_eq, c_diff=c_diff, rci_low=mean - c_diff * se, rci_high=mean + c_diff * se)
    if mean - c_eq * se > -margin and mean + c_eq * se < margin:
        out["verdict"] = "equivalent"
    elif abs(mean) > c_diff * se:
        out["verdict"] = "different"
    return out


def sequential_replay(d, margin: float, bounds: Boundaries) -> dict:
    """The sequential design's verdict on the differences `d` in seed order, as the study reached it: the first
    look (n = n_min, n_min + 1, ..., len(d)) that decides, else the last look; `look` is its number of pairs."""
    d = np.asarray(d, dtype=float)
    last = None
    for n in range(bounds.n_min, min(d.size, bounds.n_max) + 1):
        last = sequential_test(d[:n], margin, bounds)
        last["look"] = n
        if last["verdict"] != "inconclusive":
            return last
    if last is None:  # fewer pairs than the first look
        last = sequential_test(d, margin, bounds)
        last["look"] = math.nan
    return last


# --- claims at the level of the question ---------------------------------------------------------


def holm(pvalues, alpha: float) -> np.ndarray:
    """Holm's step-down rejections (statsmodels `multipletests(method='holm')`); NaN p-values never reject."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    ok = ~np.isnan(p)
    out = np.zeros(p.size, dtype=bool)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=alpha, method="holm")[0]
    return out


def holm_adjusted(pvalues) -> np.ndarray:
    """Holm-adjusted p-values (NaN stays NaN)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    ok = ~np.isnan(p)
    out = np.full(p.size, math.nan)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def cell_claims(verdicts: list[str]) -> str:
    """The cell's headline from its pairs' equivalence verdicts, an intersection–union test: "holds" (every
    level within ±δ of the reference, at level α) only when every pair is equivalent; "fails" when a pair is
    different; else "not shown"."""
    if verdicts and all(v == "equivalent" for v in verdicts):
        return "holds"
    if any(v == "different" for v in verdicts):
        return "fails"
    return "not shown"


# --- how much does the level explain? --------------------------------------------------------------


def block_anova(values, levels, blocks) -> dict:
    """Randomized-block analysis of `values` ~ level + block (the seed a block: its trials share initial weights
    and batches), by statsmodels OLS + type-II ANOVA, over the complete blocks only (every level present). Returns
    n_blocks, n_levels, F and p of the level effect, and the shares of the total sum of squares from level,
    block and residual. NaN where there are fewer than 2 complete blocks or 2 levels, or no residual spread."""
    import pandas as pd

    df = pd.DataFrame({"y": np.asarray(values, dtype=float), "level": [str(v) for v in levels],
                       "block": [str(b) for b in blocks]}).dropna()
    k = df["level"].nunique()
    counts = df.groupby("block")["level"].nunique()
    df = df[df["block"].isin(counts[counts == k].index)]
    b = df["block"].nunique()
    out = {"blocks": int(b), "levels": int(k), "F": math.nan, "p": math.nan, "share_level": math.nan,
           "share_block": math.nan, "share_residual": math.nan}
    if b < 2 or k < 2:
        return out
    df = df.drop_duplicates(["block", "level"], keep="last")
    total = float(((df["y"] - df["y"].mean()) ** 2).sum())
    if total == 0.0:
        return out
    import statsmodels.api as sm
    from statsmodels.formula.api import ols

    table = sm.stats.anova_lm(ols("y ~ C(level) + C(block)", data=df).fit(), typ=2)
    ss = table["sum_sq"]
    out.update(share_level=float(ss["C(level)"] / total), share_block=float(ss["C(block)"] / total),
               share_residual=float(ss["Residual"] / total))
    if ss["Residual"] > 1e-12 * total:
        out.update(F=float(table.loc["C(level)", "F"]), p=float(table.loc["C(level)", "PR(>F)"]))
    return out


# --- chance ------------------------------------------------------------------------------------------


def at_chance(value: float, baseline: float, rows: int | None, alpha: float = AT_CHANCE_ALPHA) -> bool:
    """Is an accuracy `value` (percent) not clearly above the best constant guess `baseline` (percent)? With the
    eval size `rows`: one-sided exact binomial test of value > baseline at level `alpha`; without it, value <=
    baseline."""
    if value is None or baseline is None or math.isnan(value) or math.isnan(baseline):
        return False
    if not rows:
        return value <= baseline
    from scipy import stats

    k = int(round(value / 100.0 * rows))
    p = float(stats.binomtest(min(max(k, 0), rows), rows, min(max(baseline / 100.0, 0.0), 1.0),
                              alternative="greater").pvalue)
    return p >= alpha


# --- simulation of the sequential rule -----------------------------------------------------------------


def sequential_verdicts(paths: np.ndarray, margin: float, bounds: Boundaries) -> tuple[np.ndarray, np.ndarray]:
    """The sequential rule on many pairs at once: `paths` (R, n_max) of paired differences in seed order.
    Returns (verdict codes: 0 inconclusive, 1 equivalent, 2 different; n at the stop). The same rule as
    `sequential_test` look by look (the tests check both agree)."""
    r = paths.shape[0]
    verdict = np.zeros(r, dtype=np.int8)
    stop = np.full(r, bounds.n_max, dtype=np.int64)
    open_ = np.ones(r, dtype=bool)
    hi, lo = np.maximum.accumulate(paths, axis=1), np.minimum.accumulate(paths, axis=1)
    size = np.maximum.accumulate(np.abs(paths), axis=1)
    for n in range(bounds.n_min, bounds.n_max + 1):
        c_eq, c_diff = bounds.at(n)
        x = paths[:, :n]
        mean = x.mean(axis=1)
        sd = x.std(axis=1, ddof=1)
        se = sd / math.sqrt(n)
        # identical values (`identical`) are no spread: they never decide
        ok = open_ & (hi[:, n - 1] - lo[:, n - 1] > IDENTICAL_TOL * np.maximum(size[:, n - 1], 1.0))
        eq = ok & (mean - c_eq * se > -margin) & (mean + c_eq * se < margin)
        diff = ok & ~eq & (np.abs(mean) > c_diff * se)
        verdict[eq], verdict[diff] = 1, 2
        stop[eq | diff] = n
        open_ &= ~(eq | diff)
    return verdict, stop


def simulate_cell(deltas, sd: float, margin: float, bounds: Boundaries, reps: int = 20_000,
                  seed: int = 0) -> dict:
    """The sequential design on simulated trials of one cell: the reference and one level per entry of `deltas`
    (its true difference to the reference); trial value = Δ + noise with var sd²/2 (a seed effect would cancel in
    the paired differences), so each pair's
    differences have sd `sd` (and pairs sharing the reference correlate 0.5). Returns per pair the probability
    of each verdict and the expected seeds, and the expected trials of the cell (the reference runs as many
    seeds as its longest pair)."""
    rng = np.random.default_rng(seed)
    deltas = np.asarray(deltas, dtype=float)
    m, n = deltas.size, bounds.n_max
    ref = rng.standard_normal((reps, n)) * sd / math.sqrt(2.0)
    out = {"pairs": [], "trials": 0.0}
    longest = np.zeros(reps)
    for j in range(m):
        x = deltas[j] + rng.standard_normal((reps, n)) * sd / math.sqrt(2.0)
        v, stop = sequential_verdicts(x - ref, margin, bounds)
        longest = np.maximum(longest, stop)
        out["pairs"].append({"delta": float(deltas[j]), "equivalent": float((v == 1).mean()),
                             "different": float((v == 2).mean()), "inconclusive": float((v == 0).mean()),
                             "seeds": float(stop.mean()), "verdicts": v})
        out["trials"] += float(stop.mean())
    out["trials"] += float(longest.mean())
    out["any_different"] = float(np.any([p["verdicts"] == 2 for p in out["pairs"]], axis=0).mean()) if m else 0.0
    out["all_equivalent"] = float(np.all([p["verdicts"] == 1 for p in out["pairs"]], axis=0).mean()) if m else 0.0
    for p in out["pairs"]:
        del p["verdicts"]
    return out
