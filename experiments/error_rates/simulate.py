"""The adaptive-seed planner's error rates, by simulation through `tunekd.seeds.plan_round` itself.

One cell, one pair (strategy `b` against the reference `a`), min 3 seeds, margin 1, α 0.05: trial values are
drawn so that the paired differences are Normal(Δ, sd); the planner is run round by round, exactly as the driver
runs it, until it asks for no more trials. Reported: P(equivalent | Δ = margin) (a false "equivalent") and
P(different | Δ = 0) (a false "different"), and the expected seeds, per (max, sd). A second table: one cell with
4 pairs (every Δ = 0), P(at least one "different").

    python experiments/error_rates/simulate.py [--reps 4000] [--json out.json]

Runs on whatever tunekd is importable (the same script measured the rule before and after the sequential
design). Its last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def run_setting(max_: int, sd: float, delta: float, reps: int, seed: int, levels: int = 2) -> dict:
    from tunekd.seeds import Design, plan_round, results_frame

    names = ["a", "b", "c", "d", "e"][:levels]
    design = Design(cell_keys=(), cells=((),), strategies=tuple(names), reference="a",
                    seeds=tuple(range(max_)), min=3, margin=1.0, alpha=0.05)
    rng = np.random.default_rng(seed)
    counts = {"equivalent": 0, "different": 0, "inconclusive": 0}
    any_diff = 0
    seeds_used = []
    for _ in range(reps):
        # trial value = level effect + noise with var sd²/2: every pair's differences have sd `sd`
        values = {(s, i): (delta if s != "a" else 0.0) + rng.standard_normal() * sd / math.sqrt(2)
                  for s in names for i in range(max_)}
        records: list = []
        while True:
            plan = plan_round(results_frame(records, design, "eval/accuracy"), design)
            if plan.done:
                break
            for c in plan.needed:
                s, i = c["distill.strategy"], c["seed"]
                records.append(({"distill.strategy": s, "seed": i}, "completed", {"eval/accuracy": values[(s, i)]}))
        verdicts = [p["verdict"].replace(" (unadjusted)", "") for p in plan.pairs]
        for v in verdicts[:1]:
            counts[v] = counts.get(v, 0) + 1
        any_diff += any(v == "different" for v in verdicts)
        seeds_used.append(plan.pairs[0]["seeds"])
    out = {"max": max_, "sd": sd, "delta": delta, "pairs": levels - 1, "reps": reps,
           **{f"p_{k}": v / reps for k, v in counts.items()}, "p_any_different": any_diff / reps,
           "seeds": float(np.mean(seeds_used))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=4000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = []
    for max_, sd in ((4, 1.0), (6, 1.0), (10, 1.0), (10, 2.0)):
        eq = run_setting(max_, sd, 1.0, args.reps, seed=1)
        df = run_setting(max_, sd, 0.0, args.reps, seed=2)
        rows.append({"max": max_, "sd": sd, "P(equivalent|Δ=margin)": eq["p_equivalent"],
                     "P(different|Δ=0)": df["p_different"], "E[seeds]|Δ=0": df["seeds"],
                     "E[seeds]|Δ=margin": eq["seeds"]})
    fam = run_setting(6, 1.0, 0.0, max(args.reps // 4, 500), seed=3, levels=5)
    mcse = math.sqrt(0.05 * 0.95 / args.reps)
    print(f"{'max':>4} {'sd':>4} {'P(eq|Δ=δ)':>10} {'P(diff|Δ=0)':>12} {'E[seeds]|0':>11} {'E[seeds]|δ':>11}")
    for r in rows:
        print(f"{r['max']:>4} {r['sd']:>4} {r['P(equivalent|Δ=margin)']:>10.4f} {r['P(different|Δ=0)']:>12.4f} "
              f"{r['E[seeds]|Δ=0']:>11.2f} {r['E[seeds]|Δ=margin']:>11.2f}")
    print(f"4 pairs in one cell, max 6, sd 1, every Δ = 0: P(at least one different) = {fam['p_any_different']:.4f} "
          f"({fam['reps']} reps)")
    print(f"Monte-Carlo standard error at 0.05: {mcse:.4f}; {time.time() - t0:.0f} s")
    result = {"reps": args.reps, "rows": rows, "family_any_different": fam["p_any_different"],
              "family_reps": fam["reps"], "mcse_at_alpha": mcse}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
