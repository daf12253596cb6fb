"""Adaptive seeds (`tune.seeds`): which trials the next round runs, from the trials that have ended.

The compared dimension (`tune.seeds.compare`, default `distill.strategy`) has a reference level. A *cell*
is one combination of the other searched values (and not the seed), e.g. init x depth. A *pair* is a
non-reference level and the reference level within one cell, compared on the task's primary metric at the
final epoch, paired by seed, by the sequential design of `tunekd.stats` (`stats.boundaries`,
`stats.sequential_test`): a look at every n = min..max, α spent over the looks (O'Brien–Fleming type by
default), equivalence within ±margin per pair at α, "different" at α/m for the m pairs of a cell.

The seeds are `study.seed + i` for i = 0..max-1, used in that order. The planner is a pure function of the
ended trials (`plan_round`), so a resumed study recomputes where it stands from the child runs in MLflow:

- a pair has n = max(min, 1 + the highest seed index of its strategy's ended trials) seeds;
- every one of its n seeds needs an ended trial of the strategy and of the reference; missing ones are run
  (round 0: every pair at `min` seeds; an interrupted round: the trials it did not finish);
- when all have ended, the look's verdict is computed over the completed pairs (with the boundaries of a look
  at that many pairs; fewer than `min` completed pairs, or identical differences, decide nothing); an
  inconclusive pair with n < max gets seed n for the strategy and the reference (the reference trial is shared
  by the cell's pairs);
- equivalent, different, or inconclusive at `max`: the pair is decided (`final`).

The study ends when no pair needs a trial. Failed trials count as ended (they are not retried here; their
seed gives no pair).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tunekd import stats
from tunekd.report import SEED, STRATEGY
from tunekd.study import Study

ENDED = ("completed", "early_stopped", "failed")


def _key(v: Any) -> str:
    """A canonical text of a param value, equal for the value in-process, as MLflow stores it (a string), and as
    the study file wrote it (`lambda_hid: 0` is the float 0.0 in the trial): numbers compare as floats."""
    from tunekd.tracking import _param_value

    if not isinstance(v, bool):
        try:
            return repr(float(v))
        except (TypeError, ValueError):
            pass
    return _param_value(v)


@dataclass(frozen=True)
class Design:
    """The adaptive study's layout: the cells, the strategies, the reference and the seed values."""

    cell_keys: tuple[str, ...]
    cells: tuple[tuple[Any, ...], ...]
    strategies: tuple[str, ...]
    reference: str
    seeds: tuple[int, ...]  # len == max
    min: int
    margin: float
    alpha: float
    spending: str = "obrien_fleming"  # stats.SPENDINGS
    factor: str = STRATEGY  # the compared dimension; `strategies` are its levels
    unadjusted: bool = False  # the design was changed mid-study (--resume-force): verdicts say "unadjusted"

    @classmethod
    def from_study(cls, study: Study, unadjusted: bool = False) -> "Design":
        cfg = study.tune.seeds
        factor = cfg.compare
        keys = tuple(k for k in study.search if k not in (factor, SEED))
        cells = tuple(itertools.product(*(study.search[k].grid for k in keys)))
        return cls(cell_keys=keys, cells=cells, strategies=tuple(study.search[factor].grid),
                   reference=cfg.reference, seeds=tuple(study.seed + i for i in range(cfg.max)), min=cfg.min,
                   margin=cfg.margin, alpha=cfg.alpha, spending=cfg.spending, factor=factor, unadjusted=unadjusted)

    @property
    def max(self) -> int:
        return len(self.seeds)

    @property
    def pairs_per_cell(self) -> int:
        return sum(1 for s in self.strategies if _key(s) != _key(self.reference))

    def boundaries(self) -> stats.Boundaries:
        """The design's critical values per look (`stats.boundaries`, cached)."""
        return stats.boundaries(self.min, self.max, self.alpha, self.spending, self.pairs_per_cell)

    def to_dict(self) -> dict[str, Any]:
        """The design as the parent run records it (artifact design.json)."""
        return {"compare": self.factor, "reference": self.reference, "levels": list(self.strategies),
                "cells": [self.cell_label(c) for c in self.cells], "seeds": list(self.seeds), "min": self.min,
                "max": self.max, "margin": self.margin, "alpha": self.alpha, "spending": self.spending,
                "unadjusted": self.unadjusted, "boundaries": self.boundaries().to_dict()}

    def config(self, strategy: str, cell: tuple, seed: int) -> dict[str, Any]:
        """The trial config (dotted search values) of one strategy, cell and seed."""
        return {**dict(zip(self.cell_keys, cell)), self.factor: strategy, SEED: seed}

    def cell_label(self, cell: tuple) -> str:
        return ", ".join(f"{k}={v}" for k, v in zip(self.cell_keys, cell)) or "(one cell)"


@dataclass
class RoundPlan:
    """Where the study stands: one row per pair (`pairs`) and the trials the next round runs (`needed`)."""

    pairs: list[dict[str, Any]] = field(default_factory=list)
    needed: list[dict[str, Any]] = field(default_factory=list)  # trial configs

    @property
    def done(self) -> bool:
        return not self.needed

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.pairs)


def design_record(study: Study) -> dict[str, Any]:
    """What the report needs to know of a study's design (the parent run's tag `tunekd.design`): the scheduler
    and grace period (where pairs may be compared), the epochs, and the adaptive seeds' sequential design."""
    cfg = study.tune.seeds
    out: dict[str, Any] = {"scheduler": study.tune.scheduler, "epochs": study.train.epochs,
                           "grace_period": study.tune.asha.grace_period if study.tune.scheduler == "asha" else None}
    if cfg is not None:
        out["seeds"] = {"compare": cfg.compare, "reference": cfg.reference, "min": cfg.min, "max": cfg.max,
                        "margin": cfg.margin, "alpha": cfg.alpha, "spending": cfg.spending}
    return out


def results_frame(records: Iterable[tuple[Mapping[str, Any], str, Mapping[str, float]]], design: Design,
                  metric: str) -> pd.DataFrame:
    """The ended trials as rows: `strategy`, `cell` (the cell's values as MLflow strings), `seed` (int),
    `status`, `value` (the final `metric`, NaN when absent). `records`: (params, status, metrics) per trial,
    params as the trial logged them (python values in-process, strings when read back from MLflow)."""
    rows = []
    for params, status, metrics in records:
        if status not in ENDED or design.factor not in params or SEED not in params:
            continue
        value = metrics.get(metric)
        rows.append({"strategy": _key(params[design.factor]), "cell": tuple(_key(params.get(k)) for k in design.cell_keys),
                     "seed": int(params[SEED]), "status": status,
                     "value": float(value) if value is not None and status == "completed" else float("nan")})
    return pd.DataFrame(rows, columns=["strategy", "cell", "seed", "status", "value"])


def plan_round(results: pd.DataFrame, design: Design) -> RoundPlan:
    """The pairs' state and the trials still needed, from the ended trials `results` (`results_frame`)."""
    ended: dict[tuple, float] = {}  # (strategy, cell, seed) -> value (NaN: no value)
    for r in results.itertuples(index=False):
        ended[(r.strategy, tuple(r.cell), int(r.seed))] = float(r.value)
    index = {s: i for i, s in enumerate(design.seeds)}
    out = RoundPlan()
    needed: dict[tuple, dict[str, Any]] = {}
    ref = design.reference
    bounds = design.boundaries()
    for cell in design.cells:
        ckey = tuple(_key(v) for v in cell)
        for strategy in design.strategies:
            if _key(strategy) == _key(ref):
                continue
            have = [index[seed] for (s, c, seed) in ended if s == _key(strategy) and c == ckey and seed in index]
            n = max(design.min, 1 + max(have, default=-1))
            want = design.seeds[:n]
            missing = [(s, seed) for seed in want for s in (strategy, ref) if (_key(s), ckey, seed) not in ended]
            row = {"cell": design.cell_label(cell), **dict(zip(design.cell_keys, cell)), "strategy": strategy,
                   "reference": ref, "seeds": n}
            if missing:
                result = {"n": 0, "verdict": "pending"}
                row["state"] = "running"
                for s, seed in missing:
                    needed[(s, cell, seed)] = design.config(s, cell, seed)
            else:
                d = [ended[(_key(strategy), ckey, seed)] - ended[(_key(ref), ckey, seed)] for seed in want]
                d = [x for x in d if x == x]  # completed pairs only (NaN: a failed or stopped trial)
                result = stats.sequential_test(d, design.margin, bounds)
                if result["verdict"] == "inconclusive" and n < design.max:
                    row["state"] = "more"
                    nxt = design.seeds[n]
                    for s in (strategy, ref):
                        needed[(s, cell, nxt)] = design.config(s, cell, nxt)
                else:
                    row["state"] = "final"
                    if design.unadjusted and result["verdict"] != "inconclusive":
                        result["verdict"] += " (unadjusted)"
            row.update(result)
            out.pairs.append(row)
    order = {_key(s): i for i, s in enumerate(design.strategies)}
    out.needed = sorted(needed.values(), key=lambda c: (c[SEED], design.cells.index(tuple(c[k] for k in design.cell_keys)),
                                                        order[_key(c[design.factor])]))
    return out


def verdict_table(plan: RoundPlan) -> str:
    """The console table of the pairs: cell, strategy vs reference, seeds, mean difference, 95% CI, verdict."""
    lines = []
    for p in plan.pairs:
        ci = (f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]" if p.get("ci_low") == p.get("ci_low")
              and "ci_low" in p else "–")
        diff = f"{p['mean_diff']:+.2f}" if p.get("mean_diff") == p.get("mean_diff") and "mean_diff" in p else "–"
        lines.append({"cell": p["cell"], "pair": f"{p['strategy']} - {p['reference']}", "seeds": p["seeds"],
                      "pairs": p["n"], "mean diff": diff, "95% CI (fixed-n)": ci, "verdict": p["verdict"]})
    return pd.DataFrame(lines).to_string(index=False) if lines else "(no pairs)"
