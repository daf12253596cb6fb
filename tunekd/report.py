"""`python -m tunekd.report --experiment NAME`: the statistical report of a study recorded in MLflow.

Reads the study's trial runs (the child runs of its parent runs), compares the completed ones and
lists the early-stopped, failed and unfinished ones apart:

- the strategy-robustness table: one row per strategy x init (x every other search dimension that
  varies, e.g. student depth or lambda), one column per task metric, cells "mean ± sd (n)" over
  seeds (sample sd, ddof=1);
- paired differences of every level of a searched dimension (the strategy by default) against a reference
  level, paired by seed within the same init/depth/lambda/...: mean difference, t intervals and verdicts from
  `tunekd.stats` (TOST per pair, "different" family-wise, the sequential design of adaptive seeds), at an epoch
  that does not depend on the outcome (final under FIFO, the grace rung under ASHA; deeper rungs descriptive),
  and per cell the intersection–union headline and a randomized-block analysis (`claims.csv`);
- plots: metric vs λ and metric vs depth (when they vary) and a strategy bar chart;
- `report.md`, `report.html`, `table.csv`, `paired.csv`, `claims.csv`, `table.tex`, `trials.csv` and the PNGs in
  `--out`, also logged as artifacts (folder `report/`) on the study's parent run.

The statistics are `tunekd.stats` (scipy, statsmodels); tables are pandas; plots matplotlib (Agg).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tunekd import curves, html_report, stats
from tunekd.errors import ArgumentParser, ConfigError, run_cli, unknown


PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "tunekd.trial_id"
STATUS_TAG = "tunekd.status"
ERROR_TAG = "tunekd.error"
ROLE_TAG = "tunekd.role"

COMPLETED = "completed"
EARLY_STOPPED = "early_stopped"
HISTORY = "__history/"  # column prefix: per-run {epoch: value} of a metric (`with_histories`), for rung-aware pairs
STRATEGY, INIT, LAYERS, LAMBDA, SEED = "distill.strategy", "student.init", "student.layers", "distill.lambda_hid", "seed"
# Per-run bookkeeping columns of `load_runs` (everything else without a "/" is a param).
META = ("run_id", "parent_id", "trial_id", "status", "error", "start_time")
# Params that follow from others (the resolved map and a `random` map's permutation and seed depend on
# strategy and seed, the copied layers on init and depth): they never define a group of their own.
DERIVED = ("distill.layer_map", "student.copied_teacher_layers", "student.copied_layers",  # (older stores)
           "distill.random_permutation", "distill.map_seed_used")
SHORT = {STRATEGY: "strategy", INIT: "init", LAYERS: "layers", LAMBDA: "lambda_hid"}
STRATEGY_ORDER = ("none", "forward", "reverse", "all_to_one", "random")
INIT_ORDER = ("random", "copy")
VERDICTS = ("equivalent", "different", "inconclusive")


# --- reading the runs --------------------------------------------------------------------------


def _search_all(client, experiment_id: str, filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def _numeric_or_str(col: pd.Series) -> pd.Series:
    """A param column as numbers when every present value parses as one, else unchanged strings."""
    present = col.dropna()
    if present.empty:
        return col
    try:
        return pd.to_numeric(col)
    except (ValueError, TypeError):
        return col


def get_experiment(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise unknown("experiment", experiment, [e.name for e in client.search_experiments()])
    return exp


def load_runs(client, experiment: str, parent: str | None = None) -> pd.DataFrame:
    """One row per trial run (child run) of `experiment`, or only those of the parent run `parent`.

    Columns: `run_id`, `parent_id`, `trial_id`, `status` (the `tunekd.status` tag: completed,
    early_stopped, failed or running), `error` (the `tunekd.error` tag or None), `start_time` (ms);
    every param under its dotted name (numeric columns become numbers, the rest stay strings); every
    metric under its name (`eval/accuracy`, `train/loss`, ...) with its final value (last step).
    Raises ConfigError for an unknown experiment or parent run.
    """
    exp = get_experiment(client, experiment)
    if parent:
        try:
            prun = client.get_run(parent)
        except Exception as exc:  # mlflow raises MlflowException / RestException
            raise ConfigError(f"--parent {parent!r}: no such run ({str(exc).splitlines()[0]})") from None
        if prun.info.experiment_id != exp.experiment_id:
            raise ConfigError(f"--parent {parent!r} belongs to another experiment, not {experiment!r}")
    filt = f"tags.`{PARENT_TAG}` = '{parent}'" if parent else ""
    rows = []
    for run in _search_all(client, exp.experiment_id, filt):
        tags = run.data.tags
        if PARENT_TAG not in tags or tags.get(ROLE_TAG) in ("study", "angles", "report"):
            continue
        row = {
            "run_id": run.info.run_id,
            "parent_id": tags.get(PARENT_TAG),
            "trial_id": tags.get(TRIAL_TAG, run.info.run_name),
            "status": tags.get(STATUS_TAG, "running"),
            "error": tags.get(ERROR_TAG),
            "start_time": run.info.start_time,
        }
        row.update(run.data.params)
        row.update(run.data.metrics)
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else list(META))
    for col in param_columns(df):
        df[col] = _numeric_or_str(df[col])
    return df.sort_values("start_time", kind="stable").reset_index(drop=True) if rows else df


def param_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in META and "/" not in c and not c.startswith("__")]


def metric_columns(df: pd.DataFrame, prefix: str = "eval/") -> list[str]:
    return sorted(c for c in df.columns if c.startswith(prefix) and df[c].notna().any())


# --- grouping ----------------------------------------------------------------------------------


def completed(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == COMPLETED] if "status" in df else df


def design_keys(df: pd.DataFrame) -> list[str]:
    """The columns that define a configuration: strategy and init (when present), then every other
    param that varies across the runs, except the seed and the derived params."""
    keys = [k for k in (STRATEGY, INIT) if k in df]
    for col in param_columns(df):
        if col in keys or col == SEED or col in DERIVED:
            continue
        if df[col].nunique(dropna=False) > 1:
            keys.append(col)
    return keys


def comparable(df: pd.DataFrame, stopped: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Completed runs (and early-stopped ones when `stopped`), one per configuration and seed (a configuration
    and seed run again by a later invocation keeps its latest run), and the design keys."""
    runs = df[df["status"].isin((COMPLETED, EARLY_STOPPED))] if stopped and "status" in df else completed(df)
    keys = design_keys(runs)
    by = keys + ([SEED] if SEED in runs else [])
    if by and "start_time" in runs and len(runs):
        runs = runs.sort_values("start_time", kind="stable").drop_duplicates(by, keep="last")
    return runs, keys


def _order(key: str, value) -> tuple:
    if key == STRATEGY and value in STRATEGY_ORDER:
        return (0, STRATEGY_ORDER.index(value), "")
    if key == INIT and value in INIT_ORDER:
        return (0, INIT_ORDER.index(value), "")
    if isinstance(value, (int, float, np.integer, np.floating)) and not pd.isna(value):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def _sorted_groups(runs: pd.DataFrame, keys: list[str], first: list[str]):
    """`groupby(keys)` in display order: the `first` keys sort before the rest."""
    if not keys:
        yield (), runs
        return
    groups = list(runs.groupby(keys, dropna=False, sort=False))
    rank = first + [k for k in keys if k not in first]

    def sort_key(item):
        vals = item[0] if isinstance(item[0], tuple) else (item[0],)
        named = dict(zip(keys, vals))
        return tuple(_order(k, named[k]) for k in rank)

    for vals, g in sorted(groups, key=sort_key):
        yield (vals if isinstance(vals, tuple) else (vals,)), g


def short(key: str) -> str:
    return SHORT.get(key, key)


def _fmt(x: float, digits: int = 2) -> str:
    return "–" if x is None or pd.isna(x) else f"{x:.{digits}f}"


def cell(mean: float, sd: float, n: int) -> str:
    """`72.50 ± 0.41 (3)`; sd "–" when n < 2; "–" when there is no value."""
    if n == 0:
        return "–"
    return f"{_fmt(mean)} ± {_fmt(sd) if n > 1 else '–'} ({n})"


def strategy_table(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The strategy-robustness table over the completed runs of `df` (from `load_runs`).

    One row per configuration: columns `strategy`, `init` and every other varying param (short names
    `layers`, `lambda_hid`; other params keep their dotted names), then for each metric `m`: `m` (the
    cell "mean ± sd (n)"), `m mean`, `m sd` (sample sd, ddof=1; NaN when n < 2) and `m n` (the number
    of seeds with a value). Rows in display order: init, the other params, then strategy. A configuration whose
    trials all stopped early, failed or are unfinished keeps its row: n 0, the cell "no completed trial (...)".
    """
    runs, keys = comparable(df)
    rows = []
    first = [INIT] + [k for k in keys if k not in (INIT, STRATEGY)] + [STRATEGY]
    rest = df[df["status"] != COMPLETED] if "status" in df and all(k in df for k in keys) else df.iloc[0:0]
    for vals, g in _sorted_groups(pd.concat([runs, rest]), keys, first):
        row = {short(k): v for k, v in zip(keys, vals)}
        others = g[g["status"] != COMPLETED]["status"].value_counts() if "status" in g else pd.Series(dtype=int)
        g = g[g["status"] == COMPLETED] if "status" in g else g
        for m in metrics:
            x = g[m].dropna().astype(float) if m in g else pd.Series(dtype=float)
            n = int(x.size)
            mean = float(x.mean()) if n else math.nan
            sd = float(x.std(ddof=1)) if n > 1 else math.nan
            row[m] = cell(mean, sd, n) if len(g) else (
                "no completed trial (" + ", ".join(f"{v} {k}" for k, v in others.items()) + ")")
            row[f"{m} mean"], row[f"{m} sd"], row[f"{m} n"] = mean, sd, n
        rows.append(row)
    cols = [short(k) for k in keys] + [c for m in metrics for c in (m, f"{m} mean", f"{m} sd", f"{m} n")]
    return pd.DataFrame(rows, columns=cols)


# --- paired differences ------------------------------------------------------------------------

FINAL, DEEPEST = "final", "deepest"
AT_CHANCE, DESCRIPTIVE = "at chance", "descriptive"


def _values_at(runs: pd.DataFrame, metric: str, at) -> pd.Series:
    """Each run's `metric` at the comparison's epoch: `final` (the last value), an epoch number (from the run's
    history; NaN when it has none at that epoch)."""
    if at == FINAL or HISTORY + metric not in runs:
        return runs[metric].astype(float) if metric in runs else pd.Series(math.nan, index=runs.index)
    return runs[HISTORY + metric].map(lambda h: float(h.get(int(at), math.nan)) if isinstance(h, dict) else math.nan)


def common_epoch(df: pd.DataFrame, metric: str) -> int | None:
    """The deepest epoch that *every* compared trial (completed or early-stopped) reported — under ASHA the
    grace-period rung: it does not depend on which trials ASHA stopped. None without histories."""
    if HISTORY + metric not in df:
        return None
    runs = df[df["status"].isin((COMPLETED, EARLY_STOPPED))] if "status" in df else df
    last = [max(h) for h in runs[HISTORY + metric] if isinstance(h, dict) and h]
    return int(min(last)) if last else None


def comparison_epoch(df: pd.DataFrame, metric: str, at=None) -> tuple[object, bool]:
    """(where pairs are compared, whether a verdict there is outcome-independent). `at`: `final`, `deepest`
    (each pair at the deepest epoch both of its trials reached — chosen by ASHA's stops: descriptive), an
    epoch, or None: from the data — the final epoch when no trial was stopped early (FIFO), else the epoch
    every trial reached (ASHA's grace rung)."""
    stopped = "status" in df and (df["status"] == EARLY_STOPPED).any()
    if at is None:
        if not stopped or HISTORY + metric not in df:
            return FINAL, not stopped
        at = common_epoch(df, metric)
    if at == DEEPEST:
        return DEEPEST, False
    if at == FINAL:
        return FINAL, not stopped  # under ASHA the completed trials are the ones it kept: chosen by outcome
    e = common_epoch(df, metric)
    return int(at), e is not None and int(at) <= e


def _match_level(reference, levels: list, what: str = "reference (no trials at that value)") -> object:
    """The level of the compared dimension that `reference` names (numbers compare as numbers: `3` is 3.0)."""
    for v in levels:
        if str(v) == str(reference):
            return v
        try:
            if float(v) == float(reference):
                return v
        except (TypeError, ValueError):
            pass
    raise unknown(what, str(reference), [str(v) for v in levels])


def _trial_names(frame: pd.DataFrame, cols: tuple[str, str]) -> str:
    return ", ".join(f"{a} vs {b}" for a, b in frame[list(cols)].itertuples(index=False))


def paired_differences(df: pd.DataFrame, metric: str, reference="forward", margin: float = 1.0,
                       alpha: float = 0.05, *, factor: str = STRATEGY, at=None,
                       bounds: stats.Boundaries | None = None, chance: tuple[float, int | None] | None = None,
                       unadjusted: bool = False) -> pd.DataFrame:
    """Every level of `factor` (default the strategy) against its `reference` level on `metric`.

    A pair is a run of the level and a run of the reference with the same seed and the same value of every other
    design key (init, depth, λ, ... whatever varies: the *cell*). Where the pairs are compared: `at`
    (`comparison_epoch`): the final epoch (FIFO), the epoch every trial reached (ASHA's grace rung: verdicts
    do not depend on which trials ASHA stopped), or `deepest` (descriptive: no verdict).

    Verdicts (`stats`): with `bounds` (a study with adaptive seeds), the sequential design's rule replayed look by
    look in seed order; else fixed-n: TOST per pair at α ("equivalent"), and "different" family-wise over the
    cell's pairs (Holm on the two-sided p-values, column `p_diff_holm`). No verdict from identical differences
    (sd 0: inconclusive, `warning` names the trials), nor when every trial of both sides is at chance (`chance` =
    (baseline %, eval rows): verdict "at chance").

    One row per level and cell: the keys (short names), `n`, `mean_diff`, `sd_diff`, `ci_low`/`ci_high` (the
    1−α t interval), `ci90_low`/`ci90_high`, `p_tost`, `p_diff`, `p_diff_holm`, `look`, `verdict`, `warning`,
    `mean`, `mean_ref`, `metric`, `reference`, `margin`, `rung` ("final", an epoch, or a range for `deepest`),
    `basis` (in words). Raises ConfigError when the reference has no trial."""
    where, ok = comparison_epoch(df, metric, at)
    ok = ok or where == FINAL  # at the final epoch: checked per row (`_pairs_lost_to_stops`)
    runs, keys = comparable(df, stopped=where != FINAL)
    if factor not in runs:
        raise ConfigError(f"the runs have no param {factor!r}")
    if metric not in runs and HISTORY + metric not in runs:
        raise unknown("metric", metric, metric_columns(runs))
    levels = sorted(runs[factor].dropna().unique(), key=lambda s: _order(factor, s))
    ref_level = _match_level(reference, levels)
    keys = [factor] + [k for k in keys if k != factor]
    others = keys[1:]
    if SEED not in runs:
        raise ConfigError("cannot pair runs: they have no 'seed' param")
    pair_on = others + [SEED]
    runs = runs.copy()
    if where == DEEPEST:
        runs["__v"] = runs[HISTORY + metric] if HISTORY + metric in runs else runs[metric]
    else:
        runs["__v"] = _values_at(runs, metric, where)
    runs["__name"] = runs["trial_id"] if "trial_id" in runs else runs.index.astype(str)
    ref = runs[runs[factor] == ref_level][pair_on + ["__v", "__name"]].rename(
        columns={"__v": "__ref", "__name": "__ref_name"})
    basis = {FINAL: "final epoch", DEEPEST: "deepest epoch both trials reached"}.get(
        where, f"epoch {where}, every trial")
    rows = []
    sub = runs[runs[factor] != ref_level]
    first = [INIT] + [k for k in others if k != INIT] + [factor]
    for vals, g in _sorted_groups(sub, keys, first):
        merged = g[pair_on + ["__v", "__name"]].merge(ref, on=pair_on, how="inner").sort_values(SEED)
        if where == DEEPEST:
            merged = _at_common_rung(merged, "__v", "__v")
        else:
            merged["__rung"] = where
        merged = merged.dropna(subset=["__v", "__ref"])
        a, b = merged["__v"].astype(float).to_numpy(), merged["__ref"].astype(float).to_numpy()
        d = a - b
        row = {short(k): v for k, v in zip(keys, vals)}
        valid = ok and not (where == FINAL and _pairs_lost_to_stops(df, factor, vals[0], ref_level, others, vals[1:]))
        if bounds is not None and valid:
            res = stats.sequential_replay(d, margin, bounds)
        else:
            res = stats.paired_test(d, margin, alpha)
            res["look"] = math.nan
        res.pop("rci_low", None), res.pop("rci_high", None), res.pop("c_eq", None), res.pop("c_diff", None)
        warning = ""
        if res.pop("degenerate", False):
            warning = f"identical differences (sd 0) decide nothing: {_trial_names(merged, ('__name', '__ref_name'))}"
        if chance is not None and len(d) and all(stats.at_chance(x, *chance) for x in np.concatenate([a, b])):
            res["verdict"] = AT_CHANCE
            warning = (f"every trial at chance (not above the constant guess {chance[0]:.2f} by a binomial test "
                       f"at {stats.AT_CHANCE_ALPHA:g}): no verdict")
        if not valid:
            res["verdict"] = DESCRIPTIVE
        row.update(res)
        row.update(warning=warning, mean=float(a.mean()) if len(a) else math.nan,
                   mean_ref=float(b.mean()) if len(b) else math.nan, metric=metric, reference=ref_level,
                   margin=margin, rung=_rung_text(merged["__rung"]),
                   basis=basis + ("" if valid else " (descriptive: which pairs exist depends on which trials were "
                                                   "stopped early)"), __cell=tuple(vals[1:]), __valid=valid)
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["p_diff_holm"] = math.nan
        if bounds is None:  # "different" is family-wise over the cell's pairs: Holm
            for _, idx in out.groupby("__cell", sort=False).groups.items():
                part = out.loc[idx]
                tested = part["verdict"].isin(("equivalent", "different", "inconclusive")) & part["__valid"]
                p = part["p_diff"].where(tested)
                out.loc[idx, "p_diff_holm"] = stats.holm_adjusted(p)
                keep = stats.holm(p, alpha)
                demote = (part["verdict"] == "different").to_numpy() & ~keep
                out.loc[np.asarray(idx)[demote], "verdict"] = "inconclusive"
        if unadjusted:
            out["verdict"] = [v + " (unadjusted)" if v in ("equivalent", "different") else v for v in out["verdict"]]
        out = out.drop(columns=["__cell", "__valid"])
    cols = [short(k) for k in keys] + list(PAIRED_STATS)
    return out.reindex(columns=cols)


def _pairs_lost_to_stops(df: pd.DataFrame, factor: str, level, ref_level, others: list[str], cell: tuple) -> bool:
    """Whether an early-stopped trial of `level` or `ref_level` in this cell had a partner (the other side's trial
    of its seed): then which pairs reach the final epoch depends on the stops, and a final-epoch verdict would be
    chosen by the outcome."""
    if "status" not in df or SEED not in df:
        return False
    sel = df[df[factor].isin([level, ref_level])]
    for k, v in zip(others, cell):
        sel = sel[(sel[k] == v) | (sel[k].isna() & pd.isna(v))]
    sel = sel[sel["status"] != "failed"]
    stopped = sel[sel["status"] == EARLY_STOPPED]
    for _, r in stopped.iterrows():
        other = ref_level if r[factor] == level else level
        if ((sel[factor] == other) & (sel[SEED] == r[SEED])).any():
            return True
    return False


def _at_common_rung(merged: pd.DataFrame, value: str, ref_value: str) -> pd.DataFrame:
    """Each pair's values at the deepest epoch both histories reached (`__rung`); NaN when none is common.
    `value` holds the level's history, `__ref` the reference's; both are replaced by the values there."""
    out = merged.copy()
    a, b, rungs = [], [], []
    for h, hr in zip(out[value], out["__ref"]):
        h = h if isinstance(h, dict) else {}
        hr = hr if isinstance(hr, dict) else {}
        common = set(h) & set(hr)
        r = min(max(h, default=0), max(hr, default=0))
        if r in common:
            a.append(h[r]), b.append(hr[r]), rungs.append(r)
        else:
            a.append(math.nan), b.append(math.nan), rungs.append(math.nan)
    out[value], out["__ref"], out["__rung"] = a, b, rungs
    return out


def _rung_text(rungs: pd.Series) -> str:
    vals = [r for r in rungs if not (isinstance(r, float) and math.isnan(r))]
    if not vals:
        return "–"
    if all(v == FINAL for v in vals):
        return FINAL
    lo, hi = int(min(vals)), int(max(vals))
    return str(lo) if lo == hi else f"{lo}–{hi}"


def cell_claims(df: pd.DataFrame, paired: pd.DataFrame, metric: str, *, factor: str = STRATEGY, at=None) -> pd.DataFrame:
    """One row per cell: the pairs' verdict counts, the headline "no level differs from the reference by more
    than ±margin" as an intersection–union test (`holds` only when every pair is equivalent: valid at α without
    correction), and the randomized-block analysis of the level over complete seeds (`stats.block_anova`:
    the level's F and p, the shares of the variation from level, seed and residual)."""
    part = paired[paired["metric"] == metric] if len(paired) else paired
    if part.empty:
        return pd.DataFrame()
    where, _ = comparison_epoch(df, metric, at)
    runs, keys = comparable(df, stopped=where != FINAL)
    others = [k for k in keys if k != factor]
    runs = runs.copy()
    runs["__v"] = _values_at(runs, metric, where if where != DEEPEST else FINAL)
    rows = []
    cell_cols = [short(k) for k in others]
    groups = part.groupby(cell_cols, sort=False, dropna=False) if cell_cols else [((), part)]
    for vals, g in groups:
        vals = vals if isinstance(vals, tuple) else (vals,)
        sel = runs
        for k, v in zip(others, vals):
            sel = sel[sel[k] == v]
        verdicts = [str(v).replace(" (unadjusted)", "") for v in g["verdict"]]
        block = stats.block_anova(sel["__v"], sel[factor], sel[SEED]) if SEED in sel else {}
        row = dict(zip(cell_cols, vals))
        row.update(metric=metric, pairs=len(g), equivalent=verdicts.count("equivalent"),
                   different=verdicts.count("different"), inconclusive=verdicts.count("inconclusive"),
                   headline=(DESCRIPTIVE if all(v == DESCRIPTIVE for v in verdicts) else stats.cell_claims(verdicts)),
                   **{f"block_{k}": v for k, v in block.items()})
        rows.append(row)
    return pd.DataFrame(rows)


# --- plots -------------------------------------------------------------------------------------




def slug(metric: str) -> str:
    name = metric.split("/", 1)[1] if metric.startswith("eval/") else metric
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _facets(table: pd.DataFrame, exclude: list[str]):
    keys = [c for c in table.columns if c in _key_names(table) and c not in exclude]
    if not keys:
        return [("", table)]
    out = []
    for vals, g in table.groupby(keys, dropna=False, sort=False):
        vals = vals if isinstance(vals, tuple) else (vals,)
        out.append((", ".join(f"{k}={v}" for k, v in zip(keys, vals)), g))
    return out


def _key_names(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if " " not in c and "/" not in c]


def _figure(n: int, width: float = 4.5, height: float = 3.6):
    plt = curves.pyplot()
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def plot_versus(table: pd.DataFrame, x: str, metric: str, path: Path, teacher: float | None = None) -> Path:
    """`metric` (mean ± sd over seeds) against the key column `x` of a `strategy_table`, one line per
    strategy, one panel per value of the other keys (init, ...)."""
    facets = _facets(table, ["strategy", x])
    plt, fig, axes = _figure(len(facets))
    for ax, (title, g) in zip(axes, facets):
        for strategy, s in g.groupby("strategy", sort=False):
            s = s.sort_values(x)
            line = ax.plot(s[x].astype(float), s[f"{metric} mean"], marker="o", label=str(strategy))[0]
            spread = s[s[f"{metric} n"] > 1]  # no error bar where there is one seed
            if len(spread):
                ax.errorbar(spread[x].astype(float), spread[f"{metric} mean"], yerr=spread[f"{metric} sd"],
                            fmt="none", capsize=3, color=line.get_color())
        if teacher is not None:
            ax.axhline(teacher, color="grey", ls="--", lw=1, label="teacher")
        ax.set_xticks(sorted(g[x].astype(float).unique()))
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_strategies(table: pd.DataFrame, metric: str, path: Path, teacher: float | None = None,
                    epoch: str = "the final epoch") -> Path:
    """Bar chart of `metric` mean ± sd per strategy, bars grouped by init, one panel per value of
    the other keys. Bars start at zero; error bars only where n > 1 (the mean is written on each bar,
    so that small differences stay readable)."""
    facets = _facets(table, ["strategy", "init"])
    plt, fig, axes = _figure(len(facets), width=5.5)
    for ax, (title, g) in zip(axes, facets):
        strategies = list(dict.fromkeys(g["strategy"]))
        inits = list(dict.fromkeys(g["init"])) if "init" in g else [None]
        width = 0.8 / len(inits)
        for i, init in enumerate(inits):
            part = g if init is None else g[g["init"] == init]
            pos = {s: j for j, s in enumerate(strategies)}
            xs = [pos[s] + (i - (len(inits) - 1) / 2) * width for s in part["strategy"]]
            sd = part[f"{metric} sd"].where(part[f"{metric} n"] > 1)  # NaN: no error bar for n = 1
            bars = ax.bar(xs, part[f"{metric} mean"], width, label=f"init={init}" if init is not None else None)
            ax.errorbar(xs, part[f"{metric} mean"], yerr=sd.to_numpy(dtype=float), fmt="none", capsize=3,
                        ecolor="black", lw=1)
            ax.bar_label(bars, labels=[f"{_fmt(v, 1)}\nn={n}" if n else "" for v, n in
                                       zip(part[f"{metric} mean"], part[f"{metric} n"])],
                         fontsize=7, padding=2, label_type="center", color="white")
            for x, n in zip(xs, part[f"{metric} n"]):  # a configuration without a completed trial stays visible
                if not n:
                    ax.text(x, 0, "no completed\ntrial", rotation=90, fontsize=6, ha="center", va="bottom")
        ax.set_xticks(range(len(strategies)))
        ax.set_xticklabels([str(s) for s in strategies], rotation=20, fontsize=8)
        if teacher is not None:
            ax.axhline(teacher, color="grey", ls="--", lw=1, label="teacher")
        hi = np.nanmax(g[f"{metric} mean"] + g[f"{metric} sd"].fillna(0.0))
        if teacher is not None:
            hi = max(hi, teacher)
        if np.isfinite(hi):
            ax.set_ylim(0, hi * 1.12 if hi > 0 else 1)  # bars from zero
        ax.set_ylabel(f"{metric} at {epoch}")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_paired(paired: pd.DataFrame, metric: str, path: Path) -> Path:
    """The equivalence picture: per strategy and configuration, the mean paired difference against the
    reference (dot) with its 95% t interval (thin) and the TOST's 90% interval (thick), the ±margin band
    shaded and zero marked. An interval inside the band is *equivalent*; one clear of zero *different*.
    Configurations with fewer than 2 pairs get a hollow dot and no interval."""
    plt = curves.pyplot()
    part = paired[paired["metric"] == metric].reset_index(drop=True)
    keys = [c for c in part.columns if c not in PAIRED_STATS]
    labels = [", ".join(f"{v}" if k == "strategy" else f"{k}={v}" for k, v in zip(keys, row))
              for row in part[keys].itertuples(index=False)]
    margin = float(part["margin"].iloc[0]) if len(part) else 1.0
    reference = str(part["reference"].iloc[0]) if len(part) else "reference"
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * max(len(part), 2) + 1.5))
    ax.axvspan(-margin, margin, color="tab:green", alpha=0.12, label=f"±{margin:g}: equivalence margin")
    ax.axvline(0, color="grey", lw=1)
    colors = {"equivalent": "tab:green", "different": "tab:red", "inconclusive": "tab:grey",
              AT_CHANCE: "tab:orange", DESCRIPTIVE: "tab:blue"}
    ys = np.arange(len(part))[::-1]
    for y, (_, r) in zip(ys, part.iterrows()):
        c = colors.get(str(r["verdict"]).replace(" (unadjusted)", ""), "black")
        if r["n"] >= 2 and not pd.isna(r["ci_low"]):
            ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=c, lw=1.2)
            ax.plot([r["ci90_low"], r["ci90_high"]], [y, y], color=c, lw=4, alpha=0.6, solid_capstyle="butt")
            ax.plot(r["mean_diff"], y, "o", color=c)
        elif not pd.isna(r["mean_diff"]):
            ax.plot(r["mean_diff"], y, "o", mfc="white", color=c)
        ax.annotate(f"{r['verdict']} (n={int(r['n'])}, epoch {r['rung']})", (1.01, y), xycoords=("axes fraction", "data"),
                    fontsize=7, va="center", color=c)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(-0.8, len(part) - 0.2)
    basis = str(part["basis"].iloc[0]) if len(part) else ""
    ax.set_xlabel(f"{metric}: level − {reference}, paired by seed, {basis} (thin: 95% CI, thick: 90% CI)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


# --- LaTeX -------------------------------------------------------------------------------------

PAIRED_STATS = ("n", "mean_diff", "sd_diff", "ci_low", "ci_high", "ci90_low", "ci90_high", "p_tost", "p_diff",
                "p_diff_holm", "look", "verdict", "warning", "mean", "mean_ref", "metric", "reference", "margin", "rung",
                "basis")
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def _tex_cell(mean: float, sd: float, n: int) -> str:
    if n == 0 or pd.isna(mean):
        return "--"
    return f"${mean:.2f} \\pm {sd:.2f}$ ({n})" if n > 1 else f"${mean:.2f}$ (1)"


def _tex_tabular(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A booktabs tabular scaled to the column width at most (`\\resizebox`, graphicx): never overfull."""
    out = ["\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%",
           f"\\begin{{tabular}}{{{align}}}", "\\toprule", " & ".join(header) + r" \\", "\\midrule"]
    out += [" & ".join(r) + r" \\" for r in rows]
    return out + ["\\bottomrule", "\\end{tabular}}"]


def p_text(p: float, tex: bool = False) -> str:
    """A p-value for a table: 3 significant digits, "< 0.001" below that, "–" when absent."""
    if p is None or pd.isna(p):
        return "--" if tex else "–"
    if p < 0.001:
        return "$<0.001$" if tex else "< 0.001"
    return f"{p:.3g}"


def latex_tables(table: pd.DataFrame, paired: pd.DataFrame, metrics: list[str], *, reference: str,
                 margin: float, alpha: float) -> str:
    """The strategy table (mean ± sd (n) per metric) and the paired verdicts as booktabs tables (needs
    `\\usepackage{booktabs,graphicx}`), each scaled to the column width at most, ready for `\\input{table.tex}`."""
    keys = _key_names(table)
    head = [tex_escape(k) for k in keys] + [tex_escape(m.split("/", 1)[-1]) for m in metrics]
    rows = [[tex_escape(r[k]) for k in keys] + [_tex_cell(r[f"{m} mean"], r[f"{m} sd"], int(r[f"{m} n"]))
                                               for m in metrics] for _, r in table.iterrows()]
    lines = ["% tunekd report; needs \\usepackage{booktabs,graphicx}", "\\begin{table}[t]", "\\centering", "\\small"]
    lines += _tex_tabular(head, rows, "l" * len(keys) + "r" * len(metrics))
    lines += ["\\caption{Final-epoch metrics of the completed trials over seeds: mean $\\pm$ sample standard deviation "
              "(number of seeds).}", "\\label{tab:tunekd-strategies}", "\\end{table}", ""]
    if len(paired):
        pk = [c for c in paired.columns if c not in PAIRED_STATS]
        head = (["metric"] + [tex_escape(k) for k in pk]
                + ["epoch", "$n$", "$\\Delta$", f"{100 * (1 - alpha):g}\\% CI", "$p_\\mathrm{TOST}$", "verdict"])
        rows = []
        for _, r in paired.iterrows():
            ci = f"$[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]$" if not pd.isna(r["ci_low"]) else "--"
            rows.append([tex_escape(str(r["metric"]).split("/", 1)[-1])] + [tex_escape(r[k]) for k in pk]
                        + [tex_escape(r["rung"]), str(int(r["n"])),
                           f"${r['mean_diff']:+.2f}$" if not pd.isna(r["mean_diff"]) else "--",
                           ci, p_text(r["p_tost"], tex=True), tex_escape(r["verdict"])])
        lines += ["\\begin{table}[t]", "\\centering", "\\small"]
        lines += _tex_tabular(head, rows, "l" * (1 + len(pk)) + "lrrrrl")
        sequential = paired["look"].notna().any() if "look" in paired else False
        rule = ("the sequential design of the study's adaptive seeds (boundaries per look, $\\alpha$ spent over the "
                "looks)" if sequential else
                f"TOST per pair at $\\alpha={alpha:g}$; \\emph{{different}} family-wise over each cell's pairs (Holm)")
        lines += [f"\\caption{{Paired differences against \\texttt{{{tex_escape(reference)}}} (same seed and "
                  f"configuration) at the epoch given. Equivalent: within $\\pm{margin:g}$; verdicts by {rule}; "
                  f"no verdict from identical differences or from students at chance; "
                  f"\\emph{{descriptive}} rows compare epochs chosen by early stopping.}}",
                  "\\label{tab:tunekd-paired}", "\\end{table}", ""]
    return "\n".join(lines)


# --- Markdown ----------------------------------------------------------------------------------


def _md_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(none)"
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_md_value(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _paired_md(paired: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in paired.columns if c not in PAIRED_STATS]
    out = paired[keys].copy()
    out["epoch"] = paired["rung"]
    out["n"] = paired["n"]
    out["mean diff"] = [f"{v:+.2f}" if not pd.isna(v) else "–" for v in paired["mean_diff"]]
    out["95% CI"] = [f"[{lo:+.2f}, {hi:+.2f}]" if not pd.isna(lo) else "–"
                     for lo, hi in zip(paired["ci_low"], paired["ci_high"])]
    out["90% CI"] = [f"[{lo:+.2f}, {hi:+.2f}]" if not pd.isna(lo) else "–"
                     for lo, hi in zip(paired["ci90_low"], paired["ci90_high"])]
    out["p (TOST)"] = [p_text(p) for p in paired["p_tost"]]
    if paired["p_diff_holm"].notna().any():
        out["p diff (Holm)"] = [p_text(p) for p in paired["p_diff_holm"]]
    if paired["look"].notna().any():
        out["decided at"] = [f"{int(v)} seeds" if not pd.isna(v) else "–" for v in paired["look"]]
    out["verdict"] = paired["verdict"]
    return out


def _excluded_md(df: pd.DataFrame) -> pd.DataFrame:
    rest = df[df["status"] != COMPLETED] if "status" in df else df.iloc[0:0]
    cols = ["trial_id", "status"] + [k for k in (STRATEGY, INIT, LAYERS, LAMBDA, SEED) if k in rest]
    out = rest[cols].rename(columns={k: short(k) for k in cols}).copy()
    out["epochs"] = [_last_epoch(r) for _, r in rest.iterrows()]
    out["error"] = [_error_line(e) for e in rest.get("error", pd.Series([None] * len(rest), index=rest.index))]
    out["run_id"] = rest["run_id"].values
    return out


def _last_epoch(row) -> str:
    return "–" if pd.isna(row.get("__last_step", math.nan)) else str(int(row["__last_step"]))


def _error_line(err) -> str:
    if err is None or (isinstance(err, float) and math.isnan(err)) or not str(err).strip():
        return ""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= 200 else text[:197] + "..."


# --- the CLI -----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="tunekd report",
        description="Statistical report of a tunekd study recorded in MLflow: the strategy-robustness table "
                    "(mean ± sd over seeds per strategy x init x ...), paired differences of every level of a "
                    "searched dimension (the strategy by default) against a reference level with t intervals and "
                    "verdicts that hold their error rates, claims per cell, a randomized-block analysis, and plots. "
                    "Writes report.md, table.csv, paired.csv, claims.csv, table.tex (LaTeX: booktabs, graphicx) and "
                    "PNGs to --out, logs them on the study's parent run (artifact folder report/) and prints the "
                    "Markdown.",
        epilog="Verdicts (pairs matched by seed within a cell): 'equivalent' when the difference is shown inside "
               "(-margin, +margin) (TOST at alpha, per pair); 'different' when not equivalent and the test of 0 "
               "rejects family-wise over the cell's pairs (Holm; in a study with adaptive seeds, the sequential "
               "design's boundaries); else 'inconclusive' (also with identical differences); 'at chance' when every "
               "trial of both sides is at the chance level. Where pairs are compared: at the final epoch (FIFO), or "
               "at the epoch every trial reached (ASHA's grace rung); pairs at the deepest epoch both trials reached "
               "are shown as descriptive, without a verdict. Examples: tunekd report --experiment quickstart; "
               "tunekd report --experiment lambda --compare distill.lambda_hid --reference 3. Exit status 2: "
               "unknown experiment, no completed trials, or another input problem (one line on stderr).")
    p.add_argument("--experiment", required=True, help="MLflow experiment name (= the study's experiment)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                   help="MLflow tracking URI (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: report/<experiment>)")
    p.add_argument("--compare", default=None, metavar="DIM",
                   help="the searched dimension whose levels are compared, e.g. distill.lambda_hid, student.layers "
                        "or student.init (default: the study's tune.seeds.compare, else distill.strategy)")
    p.add_argument("--reference", default=None,
                   help="the level every other level is compared with (default: the study's tune.seeds.reference, "
                        "else 'forward' for the strategy; needed for another --compare)")
    p.add_argument("--margin", type=float, default=None,
                   help="equivalence margin δ in metric points, e.g. accuracy percent (default: the study's "
                        "tune.seeds.margin, else 1.0)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="significance level: (1-alpha) intervals, tests at level alpha (default: %(default)s)")
    p.add_argument("--at", default=None, metavar="final|deepest|EPOCH",
                   help="where pairs are compared (default: final for a FIFO study, the grace-period epoch every "
                        "trial reaches for ASHA); 'deepest' and epochs past the grace period are descriptive")
    p.add_argument("--parent", default=None, metavar="RUN_ID",
                   help="only the trials of this parent run (one invocation of the study); default: every trial "
                        "run of the experiment, a configuration and seed run twice keeping its latest run; the "
                        "artifacts go to this parent run, else to the latest parent run")
    p.add_argument("--metric", action="append", default=None, metavar="NAME",
                   help="metric to report, e.g. accuracy or eval/f1; repeatable (default: every eval/ metric "
                        "present)")
    p.add_argument("--no-log", action="store_true", help="write the files only; log nothing to MLflow")
    p.add_argument("--final-only", action="store_true", help="the same as --at final")
    return p.parse_args(argv)


def _parse_at(text):
    if text is None or text in (FINAL, DEEPEST):
        return text
    try:
        e = int(text)
    except ValueError:
        raise ConfigError(f"--at must be 'final', 'deepest' or an epoch number >= 1, got {text!r}") from None
    if e < 1:
        raise ConfigError(f"--at must be 'final', 'deepest' or an epoch number >= 1, got {text!r}")
    return e


DESIGN_TAG = "tunekd.design"
UNADJUSTED_TAG = "tunekd.design.unadjusted"
CHANCE_TAGS = ("tunekd.teacher.baseline", "tunekd.teacher.baseline_rows")


def study_design(client, parent: str | None) -> dict:
    """The parent run's recorded design (tag `tunekd.design`: scheduler, grace period, epochs, adaptive seeds),
    the chance level of the accuracy (the teacher sanity check's majority class and eval rows) and whether the
    design was changed mid-study. Empty for a study recorded before these tags."""
    if not parent:
        return {}
    import json

    tags = client.get_run(parent).data.tags
    out = {}
    try:
        out = json.loads(tags.get(DESIGN_TAG, "{}")) or {}
    except ValueError:
        out = {}
    out["unadjusted"] = tags.get(UNADJUSTED_TAG) == "true"
    try:
        base = float(tags[CHANCE_TAGS[0]])
        rows = int(tags[CHANCE_TAGS[1]]) if CHANCE_TAGS[1] in tags else None
        out["chance"] = {"eval/accuracy": (base, rows)}
    except (KeyError, ValueError):
        pass
    return out


def _comparison(args, design: dict, levels: list) -> tuple[str, object, float, object, stats.Boundaries | None]:
    """(factor, reference, margin, at, bounds) from the arguments and the recorded design."""
    seeds = design.get("seeds") or {}
    factor = args.compare or seeds.get("compare") or STRATEGY
    factor = {v: k for k, v in SHORT.items()}.get(factor, factor)
    same = seeds.get("compare", STRATEGY) == factor and bool(seeds)
    reference = args.reference if args.reference is not None else (seeds.get("reference") if same else None)
    if reference is None:
        if factor != STRATEGY:
            raise ConfigError(f"--compare {factor}: name the reference level with --reference (one of its values)")
        reference = "forward"
    margin = args.margin if args.margin is not None else float(seeds.get("margin", 1.0) if same else 1.0)
    at = FINAL if args.final_only else _parse_at(args.at)
    if at is None:
        if design.get("scheduler") == "fifo":
            at = FINAL
        elif design.get("scheduler") == "asha":
            at = int(design.get("grace_period") or 1)
    bounds = None
    if same and at in (None, FINAL) and not design.get("unadjusted"):  # a changed design: fixed-n, "unadjusted"
        bounds = stats.boundaries(int(seeds["min"]), int(seeds["max"]), args.alpha, seeds.get("spending", "obrien_fleming"),
                                  pairs=max(len(levels) - 1, 1))
    return factor, reference, margin, at, bounds


def _client(uri: str):

    from tunekd.checks import check_tracking_uri
    from tunekd.tracking import check_uri

    check_tracking_uri(uri)
    check_uri(uri)
    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///"):]):
        raise ConfigError(f"tracking URI {uri!r}: no MLflow database at {uri[len('sqlite:///'):]!r}")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def latest_parent(client, experiment_id: str) -> str | None:
    runs = client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = 'study'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _resolve_metrics(requested, runs: pd.DataFrame) -> list[str]:
    present = metric_columns(runs)
    if not requested:
        if not present:
            raise ConfigError("the completed trials have no eval/ metric")
        return present
    out = []
    for m in requested:
        name = m if "/" in m else f"eval/{m}"
        if name not in present:
            raise unknown("metric", m, present)
        out.append(name)
    return out


def check_levels(margin: float, alpha: float) -> None:
    if not (math.isfinite(margin) and margin > 0):
        raise ConfigError(f"--margin must be a finite number > 0, got {margin}")
    if not 0 < alpha < 0.5:  # false for nan too
        raise ConfigError(f"--alpha must be in (0, 0.5), got {alpha}")


def build_report(df: pd.DataFrame, *, experiment: str, out: Path, metrics: list[str] | None = None,
                 reference="forward", margin: float = 1.0, alpha: float = 0.05,
                 teacher: dict[str, float] | None = None, source: str = "", factor: str = STRATEGY, at=None,
                 bounds: stats.Boundaries | None = None, chance: dict[str, tuple[float, int | None]] | None = None,
                 unadjusted: bool = False, descriptive: bool = True,
                 histories: dict[str, curves.History] | None = None, description: str | None = None,
                 study_yaml: str | None = None) -> tuple[str, list[Path]]:
    """Write report.md, report.html, table.csv, paired.csv, claims.csv, table.tex and the PNGs for the runs `df`
    into `out`; return the Markdown and the written files. `at`, `bounds`, `unadjusted`: see `paired_differences`;
    `chance`: metric -> (the majority-class level in percent, the eval rows or None): no verdict from students at
    chance, the chance line and a warning per cell; `descriptive`: also show each pair at the deepest epoch both
    trials reached when that differs (ASHA). With `histories` (run id -> metric -> {epoch: value},
    `curves.fetch_histories`) also trials.csv, curves.csv and the learning curves."""
    check_levels(margin, alpha)
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    runs, keys = comparable(df)
    if runs.empty:
        detail = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no trial runs"
        raise ConfigError(f"experiment {experiment!r} has no completed trials ({detail})")
    metrics = _resolve_metrics(metrics, runs)
    teacher = {k: v for k, v in (teacher or {}).items() if k in metrics}
    chance = chance or {}
    compared = factor in runs and runs[factor].nunique() > 1
    paired_parts, extra_parts, claims_parts = [], [], []
    if compared:
        for m in metrics:
            part = paired_differences(df, m, reference, margin, alpha, factor=factor, at=at, bounds=bounds,
                                      chance=chance.get(m), unadjusted=unadjusted)
            paired_parts.append(part)
            claims_parts.append(cell_claims(df, part, m, factor=factor, at=at))
            if descriptive and HISTORY + m in df and (df["status"] == EARLY_STOPPED).any() and at != DEEPEST:
                extra_parts.append(paired_differences(df, m, reference, margin, alpha, factor=factor, at=DEEPEST))
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    table = strategy_table(df, metrics)
    table.to_csv(out / "table.csv", index=False)
    files.append(out / "table.csv")
    paired = pd.concat(paired_parts, ignore_index=True) if paired_parts else pd.DataFrame()
    paired.to_csv(out / "paired.csv", index=False)
    files.append(out / "paired.csv")
    claims = pd.concat(claims_parts, ignore_index=True) if claims_parts else pd.DataFrame()
    claims.to_csv(out / "claims.csv", index=False)
    files.append(out / "claims.csv")
    (out / "table.tex").write_text(latex_tables(table, paired, metrics, reference=str(reference), margin=margin,
                                                alpha=alpha))
    files.append(out / "table.tex")

    plots: list[tuple[str, Path]] = []
    if len(paired):
        for m in metrics:
            if (paired["metric"] == m).any():
                plots.append((f"{m}: paired differences against {reference}",
                              plot_paired(paired, m, out / f"paired_{slug(m)}.png")))
    if "strategy" in table:
        for m in metrics:
            plots.append((f"{m} by strategy", plot_strategies(table, m, out / f"strategies_{slug(m)}.png",
                                                              teacher.get(m), final_epoch(runs))))
        if "lambda_hid" in table:
            for m in metrics:
                plots.append((f"{m} vs λ", plot_versus(table, "lambda_hid", m, out / f"lambda_{slug(m)}.png",
                                                      teacher.get(m))))
        if "layers" in table:
            for m in metrics:
                plots.append((f"{m} vs student depth", plot_versus(table, "layers", m, out / f"depth_{slug(m)}.png",
                                                                  teacher.get(m))))
    files.extend(p for _, p in plots)
    per_epoch = (_per_epoch(df, histories, metrics, out, chance.get("eval/accuracy"), teacher) if histories is not None
                 else ([], [], []))
    files.extend(per_epoch[0])

    n_done = int((df["status"] == COMPLETED).sum())
    superseded = n_done - len(runs)
    lines = [f"# Study report: {experiment}", ""]
    if source:
        lines += [source, ""]
    lines.append("Trials: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in
                                       (COMPLETED, "early_stopped", "failed", "running")
                                       if counts.get(s, 0) or s == COMPLETED)
                 + (f" ({superseded} completed runs superseded by a later run of the same configuration and seed)"
                    if superseded else ""))
    varying = [short(k) for k in keys if k not in (STRATEGY, INIT)]
    lines.append("Rows are strategy x init" + (" x " + " x ".join(varying) if varying else "") + "; seeds: "
                 + (", ".join(str(s) for s in sorted(runs[SEED].dropna().unique())) if SEED in runs else "–") + ".")
    if teacher:
        lines.append("Teacher: " + ", ".join(f"{m} {v:.2f}" for m, v in teacher.items()) + ".")
    for m, (base, rows) in chance.items():
        if m in metrics:
            lines.append(f"Chance level of {m}: {base:.2f} (the majority class"
                         + (f" of {rows} eval rows)" if rows else ")") + ".")
    for warning in per_epoch[1]:
        lines += ["", warning]
    lines += ["", "## Strategy robustness", "",
              f"Cells: mean ± sample sd (number of seeds) of each metric at {final_epoch(runs)}, over the completed "
              "trials; a configuration without one says so.", "",
              md_table(table[[c for c in table.columns if not c.endswith((" mean", " sd", " n"))]]), ""]
    if compared:
        lines += _verdict_section(paired_parts, claims_parts, metrics, factor=factor, reference=reference,
                                  margin=margin, alpha=alpha, bounds=bounds, unadjusted=unadjusted)
        if extra_parts:
            lines += ["## Descriptive: each pair at the deepest epoch both trials reached", "",
                      "Which epoch a pair reaches depends on which trial ASHA stopped, so these rows carry no verdict "
                      "(a strategy slow at first but equal at the end would look different here).", ""]
            for part in extra_parts:
                lines += [f"### {part['metric'].iloc[0] if len(part) else ''}", "",
                          md_table(_paired_md(part).drop(columns=["p (TOST)", "verdict"], errors="ignore")), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{t}]({p.name})" for t, p in plots] + [""]
    lines += per_epoch[2]
    excluded = _excluded_md(df)
    lines += ["## Trials not compared", "",
              "Early-stopped, failed and unfinished trials: not in the strategy table (early-stopped ones are in the "
              "paired differences at the epochs they reached).", "", md_table(excluded), ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    files.insert(0, out / "report.md")
    files.insert(1, html_report.write(out / "report.html", text, title=f"Study report: {experiment}",
                                      description=description, study_yaml=study_yaml))
    return text, files


def _verdict_section(paired_parts: list[pd.DataFrame], claims_parts: list[pd.DataFrame], metrics: list[str], *,
                     factor: str, reference, margin: float, alpha: float, bounds: stats.Boundaries | None,
                     unadjusted: bool) -> list[str]:
    """The paired differences and the claims per cell, with the rules that make them, in words."""
    name = short(factor)
    basis = str(paired_parts[0]["basis"].iloc[0]) if paired_parts and len(paired_parts[0]) else "–"
    if bounds is not None:
        rule = (f"Verdicts by the study's sequential design ({bounds.n_min}..{bounds.n_max} seeds, "
                f"{bounds.spending.replace('_', '–')} α spending; `decided at` gives the look): *equivalent* per pair "
                f"at α = {alpha:g}; *different* at α/{bounds.pairs} per pair, family-wise over each cell's "
                f"{bounds.pairs} pair(s) (Bonferroni, built into the boundaries).")
    else:
        rule = (f"*equivalent*: the {100 * (1 - 2 * alpha):g}% interval lies inside (−δ, δ) (TOST, both one-sided "
                f"p < {alpha:g}; a claim per pair); *different*: not equivalent, and the two-sided test of 0 rejects "
                f"after Holm's correction over the cell's pairs (family-wise at {alpha:g}; column `p diff (Holm)`).")
    lines = [f"## Paired differences against {name} = `{reference}`", "",
             f"{name} − {reference}, paired by seed within the same configuration, compared at the **{basis}** "
             f"(column *epoch*). Equivalence margin δ = {margin:g} points. {rule} Otherwise *inconclusive* "
             f"(always with fewer than 2 pairs, and with identical differences: sd 0 estimates no spread). "
             f"*at chance*: every trial of both sides is at the chance level, so the pair says nothing about "
             f"the {name}; *descriptive*: the epoch compared was chosen by which trials were stopped: no verdict."
             + (" **The design was changed during the study (`--resume-force`): every verdict is unadjusted.**"
                if unadjusted else ""), ""]
    for m, part, claims in zip(metrics, paired_parts, claims_parts):
        lines += [f"### {m}", "", md_table(_paired_md(part)), ""]
        if len(part):
            tally = part["verdict"].astype(str).str.replace(" (unadjusted)", "", regex=False).value_counts()
            lines += ["Verdicts: " + ", ".join(f"{tally.get(v, 0)} {v}" for v in VERDICTS + (AT_CHANCE, DESCRIPTIVE)
                                               if tally.get(v, 0) or v in VERDICTS), ""]
            warnings = [w for w in part["warning"] if isinstance(w, str) and w]
            lines += [f"- **Warning:** {w}" for w in warnings] + ([""] if warnings else [])
        if len(claims):
            lines += [f"**Claims per cell** — *headline*: \"no {name} differs from `{reference}` by more than "
                      f"±{margin:g}\", an intersection–union test: it *holds* (at α = {alpha:g}, no correction "
                      f"needed) only when every pair of the cell is equivalent; *fails* when a pair is different. "
                      f"*F*, *p*: the {name} effect in a randomized-block analysis ({name} × seed, the seed a "
                      f"block; complete seeds only); *shares*: of the variation across the cell's trials.", "",
                      md_table(_claims_md(claims)), ""]
    return lines


def _claims_md(claims: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in claims.columns if c not in ("metric", "pairs", "equivalent", "different", "inconclusive",
                                                    "headline") and not c.startswith("block_")]
    out = claims[keys].copy()
    out["pairs"] = claims["pairs"]
    out["equivalent / different / inconclusive"] = [
        f"{a} / {b} / {c}" for a, b, c in zip(claims["equivalent"], claims["different"], claims["inconclusive"])]
    out["headline"] = claims["headline"]
    if "block_F" in claims:
        out["seeds (blocks)"] = claims["block_blocks"]
        out["F"] = [_fmt(v) for v in claims["block_F"]]
        out["p"] = [p_text(v) for v in claims["block_p"]]
        out["shares: level / seed / residual"] = [
            "–" if pd.isna(a) else f"{a:.0%} / {b:.0%} / {c:.0%}"
            for a, b, c in zip(claims["block_share_level"], claims["block_share_block"], claims["block_share_residual"])]
    return out


def final_epoch(runs: pd.DataFrame) -> str:
    """The epoch the completed trials `runs` end at, in words: "epoch 4" (or "epochs 2–4" when `train.epochs`
    varies; "the final epoch" when the runs do not record it)."""
    epochs = sorted({int(e) for e in runs["train.epochs"].dropna()}) if "train.epochs" in runs else []
    if not epochs:
        return "the final epoch"
    return f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}–{epochs[-1]}"


def _per_epoch(df: pd.DataFrame, histories: dict, metrics: list[str], out: Path,
               chance: tuple[float, int | None] | None, teacher: dict[str, float]) -> tuple[list[Path], list[str], list[str]]:
    """trials.csv, curves.csv and the learning-curve PNGs (`tunekd.curves`) for every trial run of `df`: the files,
    the at-chance warnings and the Markdown section."""
    keys = design_keys(df)
    names = {k: short(k) for k in keys}
    cells = [names[k] for k in keys if k != STRATEGY]
    strategy = names.get(STRATEGY)
    longs = {v: k for k, v in names.items()}

    def order(cols, vals):
        return tuple(_order(longs.get(c, c), v) for c, v in zip(cols, vals))

    trials = curves.trials_frame(df, histories, keys, names)
    trials.to_csv(out / "trials.csv", index=False)
    files = [out / "trials.csv"]
    series = pd.concat([curves.curve_series(trials, m, cells, strategy) for m in metrics], ignore_index=True)
    series.to_csv(out / "curves.csv", index=False)
    files.append(out / "curves.csv")
    level = chance[0] if chance else None
    lines = ["## Learning curves", "",
             "Per cell, each strategy's mean over the seeds that reached each epoch, the band min–max over those seeds; "
             "x marks an early-stopped trial at its last epoch"
             + (f"; the dotted line is chance (the majority class, {level:.2f})" if level is not None else "")
             + ". Every trial's per-epoch metrics: `trials.csv`; the plotted series: `curves.csv`.", ""]
    warnings: list[str] = []
    for m in metrics:
        if m not in trials:
            continue
        path = curves.plot_curves(trials, m, out / f"curves_{slug(m)}.png", cells=cells, strategy=strategy,
                                  chance=level if m == "eval/accuracy" else None, teacher=teacher.get(m), order=order)
        files.append(path)
        lines += [f"![{m} per epoch]({path.name})", ""]
        if chance and m == "eval/accuracy":
            by_cell = curves.chance_cells(trials, m, cells, *chance, order=order)
            warnings += curves.chance_warnings(by_cell, cells, m, *chance)
            by_strategy = cells + ([strategy] if strategy else [])
            lines += [f"Students at chance ({m} at each trial's last epoch, {curves.chance_test(*chance)}):", "",
                      md_table(curves.chance_cells(trials, m, by_strategy, *chance, order=order)), ""]
    return files, warnings, lines


def _with_last_steps(client, df: pd.DataFrame) -> pd.DataFrame:
    """Add `__last_step` (the last epoch reported) to the runs that were not completed."""
    df = df.copy()
    df["__last_step"] = math.nan
    for i, row in df[df["status"] != COMPLETED].iterrows():
        logged = [c for c in df.columns if "/" in c and not pd.isna(row[c])][:1]
        steps = [m.step for key in logged for m in client.get_metric_history(row["run_id"], key)]
        if steps:
            df.at[i, "__last_step"] = max(steps)
    return df


def with_histories(client, df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Add `__history/<metric>` (per run: {epoch: value} from MLflow's metric history, epochs as steps) for the
    completed and early-stopped runs, so that `paired_differences` compares each pair at its deepest common rung."""
    df = df.copy()
    for m in metrics:
        col = []
        for _, row in df.iterrows():
            if row.get("status") in (COMPLETED, EARLY_STOPPED):
                col.append({int(h.step): float(h.value) for h in client.get_metric_history(row["run_id"], m)})
            else:
                col.append(None)
        df[HISTORY + m] = col
    return df


def _study_context(client, prun) -> dict[str, str | None]:
    """The parent run's description and its study file (artifact study.yaml), for report.html."""
    import tempfile

    study_yaml = None
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one small file: no progress bar on stderr
    try:
        with tempfile.TemporaryDirectory() as tmp:
            study_yaml = Path(client.download_artifacts(prun.info.run_id, "study.yaml", tmp)).read_text()
    except Exception:  # noqa: BLE001 - no artifact (an older study) or an unreachable store: the report goes on
        pass
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar
    return {"description": prun.data.tags.get("mlflow.note.content"), "study_yaml": study_yaml}


def run(args) -> int:
    text, where = write_report(args)
    print(text)
    print(f"[tunekd] report: {where}", file=sys.stderr)
    return 0


def study_report(tracking_uri: str, experiment: str, parent: str) -> str:
    """The end of `tunekd run`: the report of the study's parent run `parent` with the defaults, written to
    report/<experiment>/ and logged on the parent run; returns where it is (one line)."""
    return write_report(parse_args(["--experiment", experiment, "--tracking-uri", tracking_uri, "--parent", parent]))[1]


def write_report(args) -> tuple[str, str]:
    """Write (and unless --no-log log) the report `args` ask for; return its Markdown and where it is."""
    from tunekd import tracking
    from tunekd.checks import check_writable_dir

    check_levels(1.0 if args.margin is None else args.margin, args.alpha)
    _parse_at(args.at)
    if args.out is not None:
        check_writable_dir(args.out, "--out")
    client = _client(args.tracking_uri)
    exp = get_experiment(client, args.experiment)
    df = load_runs(client, args.experiment, args.parent)
    parent = args.parent or latest_parent(client, exp.experiment_id)
    teacher, context = {}, {}
    if parent:
        prun = client.get_run(parent)
        teacher = {"eval/" + k[len("teacher/"):]: v for k, v in prun.data.metrics.items() if k.startswith("teacher/")}
        context = _study_context(client, prun)
    design = study_design(client, parent)
    mixed = ""
    if len(df) and not args.parent:  # several invocations: one design must hold for all of them
        others = {str(client.get_run(p).data.tags.get(DESIGN_TAG)) for p in df["parent_id"].dropna().unique()}
        if len(others) > 1:
            mixed = (" The trials come from parent runs with different designs: verdicts use fixed-n tests and are "
                     "marked unadjusted (use --parent for one invocation's design).")
            design = {k: v for k, v in design.items() if k not in ("seeds", "scheduler", "grace_period")}
            design["unadjusted"] = any(str(t) != "None" and '"seeds"' in str(t) for t in others)
    if len(df):
        df = _with_last_steps(client, df)
        done = df[df["status"].isin((COMPLETED, EARLY_STOPPED))]
        df = with_histories(client, df, _resolve_metrics(args.metric, done) if len(done) else [])
    levels = []
    factor_name = {v: k for k, v in SHORT.items()}.get(args.compare, args.compare) or STRATEGY
    if len(df) and factor_name in df:
        levels = list(df[factor_name].dropna().unique())
    factor, reference, margin, at, bounds = _comparison(args, design, levels)
    if levels and factor == factor_name:  # an unknown reference is refused before --out is made
        _match_level(reference, sorted(levels, key=lambda v: _order(factor, v)),
                     "--reference strategy" if factor == STRATEGY else f"--reference level of {factor}")
    out = Path(args.out or Path("report") / re.sub(r"[^\w.-]+", "_", args.experiment))
    parents = sorted(df["parent_id"].dropna().unique()) if len(df) else []
    source = (f"MLflow {args.tracking_uri}, experiment {args.experiment!r}, "
              + (f"parent run {args.parent}" if args.parent else f"{len(parents)} parent run(s)") + ".")
    source += mixed
    if design.get("scheduler"):
        source += (f" Scheduler: {design['scheduler']}" + (f" (grace period {design.get('grace_period')})"
                                                          if design["scheduler"] == "asha" else "")
                   + f", {design.get('epochs')} epochs" + ("; adaptive seeds" if design.get("seeds") else "") + ".")
    made = None  # the first folder of `out` that does not exist yet (build_report makes it)
    for folder in (out, *out.parents):
        if folder.exists():
            break
        made = folder
    try:
        text, files = build_report(df, experiment=args.experiment, out=out, metrics=args.metric,
                                   reference=reference, margin=margin, alpha=args.alpha,
                                   teacher=teacher, source=source, factor=factor, at=at, bounds=bounds,
                                   chance=design.get("chance"), unadjusted=design.get("unadjusted", False),
                                   histories=curves.fetch_histories(client, df), **context)
    except ConfigError:
        if made is not None and made.is_dir():  # refused: leave no half-written folder this command made
            import shutil

            shutil.rmtree(made, ignore_errors=True)
        raise
    where = f"{out / 'report.html'} (and report.md, trials.csv, ...: {len(files)} files in {out})"
    if args.no_log:
        return text, where
    moved = tracking.moved_store(client, args.tracking_uri, exp)
    if moved:
        return text, where + (f"; warning: {moved}; the report is not logged to MLflow (it would be written there), "
                              f"only to {out.resolve()}")
    if not parent:
        return text, where + "; no parent run to log them on"
    for f in files:
        client.log_artifact(parent, str(f), "report")
    return text, where + f", logged on parent run {parent} (artifacts report/)"


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
