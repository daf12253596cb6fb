"""`tunekd plan STUDY.yaml --sd X`: plan the seeds before spending compute.

For the study's design — its adaptive seeds (`tune.seeds`: the sequential design), or a fixed number of seeds
(`search.seed`) — simulate each pair's verdicts at Δ = 0 (no difference) and at Δ = ±margin (a difference as large
as the margin), with paired differences of sd X (`--sd`, or `--sd-from EXPERIMENT`: the median paired sd of a
finished study, read from MLflow), and print per pair the probability of each verdict and the expected seeds,
then the expected trials of the study and its expected wall time. The simulation is `stats.simulate_cell`: the
same boundaries and rule as the planner.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from tunekd import stats
from tunekd.errors import ArgumentParser, ConfigError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="tunekd plan",
        description="Plan a study's seeds before running it: per pair, the probability of each verdict and the "
                    "expected seeds at Δ = 0 and at Δ = margin under the study's design (adaptive seeds: the "
                    "sequential design of tune.seeds; otherwise the seeds of search.seed), and the expected trials "
                    "and wall time.",
        epilog="Examples: tunekd plan search_spaces/robustness.yaml --sd 1.0; tunekd plan "
               "search_spaces/robustness.yaml --sd-from quickstart --trial-seconds 30. The sd is that of the "
               "paired differences (strategy − reference, same seed), in metric points. Exit status 2: bad input "
               "(one line on stderr).")
    p.add_argument("study", help="the study file (YAML)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sd", type=float, help="sd of the paired differences, metric points")
    src.add_argument("--sd-from", metavar="EXPERIMENT",
                     help="use the median paired-difference sd of this finished study (MLflow experiment)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store for --sd-from "
                                                                         "(default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a study value")
    p.add_argument("--trial-seconds", type=float, default=None,
                   help="wall seconds of one trial (default: the median of --sd-from's completed trials, else none: "
                        "no wall-time estimate)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="trials running at once (default: tune.max_concurrent_trials, else CPUs / "
                        "tune.resources.cpu)")
    p.add_argument("--reps", type=int, default=20_000, help="simulated studies (default: %(default)s)")
    return p.parse_args(argv)


def _design(study):
    """(boundaries, reference, compare, levels, cells, margin) of the study's comparisons."""
    from tunekd.report import STRATEGY
    from tunekd.seeds import Design

    cfg = study.tune.seeds
    if cfg is not None:
        d = Design.from_study(study)
        levels = [s for s in d.strategies if str(s) != str(d.reference)]
        return d.boundaries(), d.reference, d.factor, levels, len(d.cells), d.margin
    dim = study.search.get(STRATEGY)
    if dim is None or dim.kind != "grid":
        raise ConfigError("tunekd plan needs a search.distill.strategy grid or a tune.seeds design")
    seeds = study.search.get("seed")
    n = len(seeds.grid) if seeds is not None and seeds.kind == "grid" else study.tune.num_samples
    if n < 2:
        raise ConfigError(f"the study runs {n} seed(s) per configuration: a paired comparison needs at least 2 "
                          "(search.seed grid, or tune.seeds)")
    levels = [s for s in dim.grid if s != "forward"]
    cells = 1
    for k, v in study.search.items():
        if k not in (STRATEGY, "seed") and v.kind == "grid":
            cells *= len(v.grid)
    return stats.boundaries(n, n, 0.05, pairs=max(len(levels), 1)), "forward", STRATEGY, levels, cells, 1.0


def sd_from(uri: str, experiment: str) -> tuple[float, list[float], float | None]:
    """(median paired sd, every pair's sd, median wall seconds of a completed trial) of a finished study."""
    from tunekd import report

    client = report._client(uri)
    df = report.load_runs(client, experiment)
    runs, _ = report.comparable(df)
    if runs.empty:
        raise ConfigError(f"--sd-from {experiment!r}: no completed trials")
    metric = report.metric_columns(runs)[0]
    paired = report.paired_differences(df, metric, "forward" if "forward" in set(runs.get(report.STRATEGY, []))
                                       else runs[report.STRATEGY].iloc[0])
    sds = [float(x) for x in paired["sd_diff"] if x == x and x > 0]
    if not sds:
        raise ConfigError(f"--sd-from {experiment!r}: no pair with two or more seeds to estimate an sd from")
    secs = []
    for rid in runs["run_id"]:
        info = client.get_run(rid).info
        if info.end_time and info.start_time:
            secs.append((info.end_time - info.start_time) / 1000.0)
    return float(np.median(sds)), sds, float(np.median(secs)) if secs else None


def plan_text(bounds: stats.Boundaries, *, sd: float, margin: float, reference, compare: str, levels: list,
              cells: int, reps: int, trial_seconds: float | None, concurrency: int) -> str:
    lines = [bounds.describe(), "",
             f"per pair ({compare}: each of {', '.join(map(str, levels))} against {reference}), paired sd {sd:g}, "
             f"margin {margin:g}, {reps} simulated studies per row:",
             f"  {'true Δ':>8}  {'P(equivalent)':>13}  {'P(different)':>12}  {'P(inconclusive)':>15}  "
             f"{'E[seeds]':>8}"]
    totals = {}
    for label, delta in (("0", 0.0), ("margin", margin)):
        sim = stats.simulate_cell([delta] * len(levels), sd, margin, bounds, reps=reps, seed=1)
        p = sim["pairs"][0]  # every pair alike: the first one's rates
        lines.append(f"  {label:>8}  {p['equivalent']:>13.3f}  {p['different']:>12.3f}  {p['inconclusive']:>15.3f}  "
                     f"{p['seeds']:>8.2f}")
        totals[label] = sim["trials"] * cells
    k = len(levels) + 1
    lines += ["", f"trials: {k * bounds.n_min * cells} at the first look, at most {k * bounds.n_max * cells}; "
                  f"expected {totals['0']:.0f} when no {compare} differs, {totals['margin']:.0f} when each differs "
                  f"by the margin ({cells} cell(s) x {k} levels)"]
    if trial_seconds:
        for label, n in totals.items():
            lines.append(f"expected wall time (Δ = {label}): {n * trial_seconds / concurrency / 60:.1f} min "
                         f"({trial_seconds:.0f} s a trial, {concurrency} at once; rounds wait for their slowest trial)")
    return "\n".join(lines)


def run(args) -> int:
    from tunekd.study import load_study

    if args.sd is not None and not (math.isfinite(args.sd) and args.sd > 0):
        raise ConfigError(f"--sd must be a finite number > 0, got {args.sd}")
    if args.reps < 100:
        raise ConfigError(f"--reps must be at least 100, got {args.reps}")
    study = load_study(args.study, args.set)
    bounds, reference, compare, levels, cells, margin = _design(study)
    trial_seconds = args.trial_seconds
    if args.sd_from:
        sd, sds, secs = sd_from(args.tracking_uri, args.sd_from)
        print(f"paired sds of {args.sd_from!r}: {', '.join(f'{x:.2f}' for x in sds)}; median {sd:.2f}")
        trial_seconds = trial_seconds or secs
    else:
        sd = args.sd
    conc = args.concurrency or study.tune.max_concurrent_trials or max(
        int((os.cpu_count() or 1) // max(study.tune.resources.cpu, 1e-9)), 1)
    print(plan_text(bounds, sd=sd, margin=margin, reference=reference, compare=compare, levels=levels, cells=cells,
                    reps=args.reps, trial_seconds=trial_seconds, concurrency=conc))
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
