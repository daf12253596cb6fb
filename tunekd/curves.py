"""Per-epoch views of a study: every trial's metric histories (`trials.csv`), learning curves per cell
(`curves_<metric>.png` and the plotted series `curves.csv`) and the at-chance check of each cell.

The histories are MLflow's (`client.get_metric_history`, epochs as steps); the caller passes the client
(`tunekd.report` owns MLflow). A *cell* is one combination of the design keys other than the strategy
(init, depth, λ, ... whatever varies); its curves are one line per strategy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from tunekd import stats

EPOCH = "epoch"
PREFIXES = ("eval/", "train/")
STATUS_MARK = {"early_stopped": "x", "failed": "X", "running": "|"}  # where a trial that did not complete ended

History = dict[str, dict[int, float]]  # metric -> {epoch: value}


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display): the one set-up of every report plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fetch_histories(client, runs: pd.DataFrame) -> dict[str, History]:
    """Per run id: every `eval/` and `train/` metric's history as {epoch: value} (MLflow's steps; a step
    logged twice keeps its last value)."""
    out: dict[str, History] = {}
    cols = [c for c in runs.columns if c.startswith(PREFIXES)]
    for _, row in runs.iterrows():
        hist: History = {}
        for m in cols:
            if pd.isna(row[m]):
                continue
            points = sorted(client.get_metric_history(row["run_id"], m), key=lambda p: (p.step, p.timestamp))
            hist[m] = {int(p.step): float(p.value) for p in points}
        out[row["run_id"]] = hist
    return out


def trials_frame(runs: pd.DataFrame, histories: dict[str, History], keys: list[str],
                 names: dict[str, str] | None = None, seed: str = "seed") -> pd.DataFrame:
    """`trials.csv`: one row per trial and epoch it reported (any metric at that step): `trial`, `run_id`,
    `status`, the design keys `keys` (under `names`), `seed`, `epoch`, then every eval/ and train/ metric
    (NaN where a metric was not logged at that epoch). Rows ordered by run start, then epoch."""
    names = names or {}
    metrics = sorted({m for h in histories.values() for m in h}, key=lambda m: (not m.startswith("eval/"), m))
    rows = []
    for _, r in runs.iterrows():
        hist = histories.get(r["run_id"], {})
        for epoch in sorted({e for h in hist.values() for e in h}):
            row = {"trial": r.get("trial_id"), "run_id": r["run_id"], "status": r.get("status")}
            row.update({names.get(k, k): r.get(k) for k in keys})
            row[seed] = r.get(seed)
            row[EPOCH] = epoch
            row.update({m: hist.get(m, {}).get(epoch, math.nan) for m in metrics})
            rows.append(row)
    cols = ["trial", "run_id", "status", *(names.get(k, k) for k in keys), seed, EPOCH, *metrics]
    return pd.DataFrame(rows, columns=cols)


def last_values(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each trial's last epoch with a value of `metric` and that value (columns of `trials` but one row a trial)."""
    t = trials.dropna(subset=[metric]) if metric in trials else trials.iloc[0:0]
    return t.sort_values(EPOCH, kind="stable").groupby("run_id", sort=False).tail(1)


def curve_series(trials: pd.DataFrame, metric: str, cells: list[str], strategy: str | None) -> pd.DataFrame:
    """The plotted learning curves: per cell (`cells` columns), strategy and epoch, over the trials (seeds)
    that reported `metric` at that epoch: `n`, `mean`, `sd` (ddof 1), `min`, `max`; `metric`."""
    by = [*cells, *([strategy] if strategy else []), EPOCH]
    t = trials.dropna(subset=[metric]) if metric in trials else trials.iloc[0:0]
    if t.empty:
        return pd.DataFrame(columns=[*by, "n", "mean", "sd", "min", "max", "metric"])
    g = t.groupby(by, dropna=False, sort=False)[metric]
    out = g.agg(n="count", mean="mean", sd="std", min="min", max="max").reset_index()
    out["metric"] = metric
    return out


def _label(keys: list[str], vals) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, vals)) or "all trials"


def _groups(frame: pd.DataFrame, keys: list[str], order: Callable | None):
    if not keys:
        return [((), frame)]
    groups = [((v if isinstance(v, tuple) else (v,)), g) for v, g in frame.groupby(keys, dropna=False, sort=False)]
    return sorted(groups, key=lambda item: order(keys, item[0])) if order else groups


def plot_curves(trials: pd.DataFrame, metric: str, path: Path, *, cells: list[str], strategy: str | None,
                chance: float | None = None, teacher: float | None = None, order: Callable | None = None) -> Path:
    """One panel per cell; per strategy the mean of `metric` over the seeds that reached each epoch (line)
    with the min–max band over those seeds (shaded); trials that did not complete marked where they ended
    (x: early-stopped, X: failed, |: unfinished); the chance level (majority class) and the teacher dashed."""
    plt = pyplot()
    series = curve_series(trials, metric, cells, strategy)
    panels = _groups(series, cells, order)
    ncol = min(len(panels), 2)
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(6.0 * ncol, 8.0), 4.0 * nrow + 0.4), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    ends = last_values(trials, metric)
    for ax, (vals, part) in zip(axes.flat, panels):
        cell_trials = ends
        for k, v in zip(cells, vals):
            cell_trials = cell_trials[cell_trials[k].astype(str) == str(v)]
        for (svals, s) in _groups(part, [strategy] if strategy else [], order):
            s = s.sort_values(EPOCH)
            mine = cell_trials if not strategy else cell_trials[cell_trials[strategy].astype(str) == str(svals[0])]
            seeds = int(mine["run_id"].nunique())
            name = str(svals[0]) if svals else "trials"
            line = ax.plot(s[EPOCH], s["mean"], marker="o", ms=3, label=f"{name} ({seeds} seed{'s' * (seeds != 1)})")[0]
            ax.fill_between(s[EPOCH], s["min"], s["max"], color=line.get_color(), alpha=0.15, lw=0)
            stopped = mine[mine["status"].isin(list(STATUS_MARK))]
            for status, st in stopped.groupby("status"):
                ax.plot(st[EPOCH], st[metric], STATUS_MARK[status], color=line.get_color(), ms=8, mew=2)
        if chance is not None:
            ax.axhline(chance, color="black", ls=":", lw=1, label=f"chance (majority class) {chance:.1f}")
        if teacher is not None:
            ax.axhline(teacher, color="grey", ls="--", lw=1, label=f"teacher {teacher:.1f}")
        epochs = sorted(trials[EPOCH].dropna().unique()) if len(trials) else []
        if epochs:
            ax.set_xticks([int(e) for e in epochs])
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(_label(cells, vals), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{metric} per epoch — line: mean over the seeds that reached the epoch; band: min–max over them;\n"
                 "x: an early-stopped trial at its last epoch (X failed, | unfinished)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- at chance ---------------------------------------------------------------------------------


def chance_cells(trials: pd.DataFrame, metric: str, cells: list[str], baseline: float, rows: int | None,
                 order: Callable | None = None) -> pd.DataFrame:
    """Per cell: `students` (trials with a value of `metric`), `at_chance` (of those, how many are not clearly
    above chance at their last epoch, `stats.at_chance`), `epochs` (the last epochs, e.g. "4" or "1–4")."""
    ends = last_values(trials, metric)
    rows_out = []
    for vals, g in _groups(ends, cells, order):
        flags = np.array([stats.at_chance(float(v), baseline, rows) for v in g[metric]], dtype=bool)
        lo, hi = int(g[EPOCH].min()), int(g[EPOCH].max())
        rows_out.append({**dict(zip(cells, vals)), "students": len(g), "at_chance": int(flags.sum()),
                         "epochs": str(lo) if lo == hi else f"{lo}–{hi}"})
    return pd.DataFrame(rows_out, columns=[*cells, "students", "at_chance", "epochs"])


def chance_test(baseline: float, rows: int | None) -> str:
    """What "at chance" means here, in words."""
    return (f"at chance = not clearly above the majority class {baseline:.2f} on {rows} eval rows by a one-sided "
            f"exact binomial test at level {stats.AT_CHANCE_ALPHA:g}" if rows else
            f"at chance = at or below the majority class {baseline:.2f}")


def chance_warnings(table: pd.DataFrame, cells: list[str], metric: str, baseline: float, rows: int | None) -> list[str]:
    """One line per cell (a row of `chance_cells`) with students at chance; empty when none is."""
    return [f"**Warning — {_label(cells, [r[k] for k in cells])}: {int(r['at_chance'])} of {int(r['students'])} "
            f"students at chance** ({metric} at epoch {r['epochs']}; {chance_test(baseline, rows)}): comparisons "
            "within this cell say little about the strategies." for _, r in table.iterrows() if r["at_chance"] > 0]
