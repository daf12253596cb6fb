"""Re-derive the committed verdicts of experiments/ with the corrected statistics (issue 18, item 9).

The committed paired.csv tables were computed by the old rules (fixed-n TOST and a 95 % interval at every look
of the adaptive seeds, no multiplicity correction, sd 0 deciding). The MLflow stores are gone, but each study's
run log (results/logs/*.txt) prints every trial's final value. This script

1. parses those logs into one `trials.csv` per study (trial, seed, strategy, init, layers, lambda_hid, lr,
   metric, value, correct/rows, epoch = the final epoch, status). The logs print accuracies rounded to 2
   decimals; an accuracy is correct/rows·100 on the eval split, so the exact value is recovered from the
   printed one and the split's row count (also printed by the log);
2. checks that those trials reproduce every committed paired.csv: per pair n, mean_diff, sd_diff, the 95 %
   interval and the TOST p-value of `tunekd.stats.paired_test` against the committed columns;
3. re-derives every table with `tunekd.report.paired_differences` / `cell_claims` on a frame shaped like
   `report.load_runs`' output: fixed-n studies by TOST per pair and Holm over a cell's pairs; studies that
   ran with adaptive seeds (`tune.seeds`) by the sequential design (`stats.boundaries(min, max, α,
   'obrien_fleming', pairs = levels − 1)`, replayed look by look in seed order), each cell with the design
   of the invocation that ran it; no verdict from identical differences (sd 0) or when every trial of both
   sides is at chance (the teacher check's majority class);
4. writes `paired_rederived.csv` and `claims_rederived.csv` beside each paired.csv, and experiments/REDERIVED.md
   (old vs new verdict per pair and the headline per cell).

    python experiments/rederive.py            # from the repository root; a few seconds; no Ray, no MLflow
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tunekd import report, stats

HERE = Path(__file__).resolve().parent
ALPHA = 0.05

# One trial row of a log's final table: name, strategy, init, layers, λ, lr, seed, 1 or 2 metric values, epochs, status.
ROW = re.compile(r"^\s*(?P<trial>\S+)\s+(?P<strategy>[a-z_]+)\s+(?P<init>random|copy)\s+(?P<layers>\d+)\s+"
                 r"(?P<lambda_hid>[\d.]+)\s+(?P<lr>[\d.e-]+)\s+(?P<seed>\d+)\s+(?P<values>(?:[\d.]+\s+)+?)"
                 r"(?P<epoch>\d+)\s+(?P<status>completed|early_stopped|failed)\s*$")
TEACHER = re.compile(r"^\[tunekd\] teacher: ((?:[a-z_]+=[\d.]+(?:, )?)+)$")
SPLITS = re.compile(r"^\[tunekd\] data: train \d+ rows, (.*) \(max length")
CHANCE = re.compile(r"vs majority class ([\d.]+) ")
SEEDS = re.compile(r"tune\.seeds: .* first, .*against '(\w+)' \(margin ([\d.]+)\), up to (\d+) seeds")
SEEDS_MIN = re.compile(r"configurations x seeds 0\.\.(\d+) first")
COUNTS = re.compile(r"trials: (\d+) completed, (\d+) early_stopped, (\d+) failed")


@dataclass
class Log:
    """What one study invocation's log says: its trials (long: one row per metric) and its design."""

    path: Path
    trials: pd.DataFrame
    seeds: dict | None  # adaptive seeds: {"min", "max", "margin", "reference"}; None for a fixed grid
    chance: float | None  # the majority class of the eval split (percent), from the teacher check


def parse_log(path: Path, chance: float | None = None) -> Log:
    """The trials and the design in one run log; `chance`: the majority class when the log does not print it."""
    metrics, rows_per_split, seeds, rows, total = None, [], None, [], None
    for line in path.read_text().splitlines():
        if m := TEACHER.match(line):
            metrics = ["eval/" + kv.split("=")[0] for kv in m.group(1).split(", ")]
        elif m := SPLITS.match(line):
            rows_per_split = [int(n) for n in re.findall(r"(\d+) rows", m.group(1))]
        elif m := CHANCE.search(line):
            chance = float(m.group(1))
        elif m := SEEDS.search(line):
            seeds = {"min": int(SEEDS_MIN.search(line).group(1)) + 1, "max": int(m.group(3)),
                     "margin": float(m.group(2)), "reference": m.group(1)}
        elif m := ROW.match(line):
            rows.append(m.groupdict())
        if m := COUNTS.search(line):
            total = sum(int(x) for x in m.groups())
    if metrics is None or len(rows_per_split) < len(metrics) or not rows:
        raise ValueError(f"{path}: no teacher metrics, eval split sizes or trial table found")
    if total != len(rows):  # the log's own count of its trials
        raise ValueError(f"{path}: {len(rows)} trial rows parsed, the log counts {total} trials")
    out = []
    for r in rows:
        values = r.pop("values").split()
        if len(values) != len(metrics):
            raise ValueError(f"{path}: trial {r['trial']} has {len(values)} values for metrics {metrics}")
        for metric, printed, n_rows in zip(metrics, values, rows_per_split):
            correct = round(float(printed) / 100.0 * n_rows)  # the printed value is correct/rows·100, rounded
            exact = correct / n_rows * 100.0
            decimals = len(printed.split(".")[1]) if "." in printed else 0
            if abs(exact - float(printed)) > 0.5 * 10 ** -decimals + 1e-9:
                raise ValueError(f"{path}: {printed} is no accuracy on {n_rows} rows")
            out.append({**r, "metric": metric, "value": exact, "printed": printed, "correct": correct,
                        "rows": n_rows, "log": path.name})
    df = pd.DataFrame(out)
    for col in ("layers", "seed", "epoch"):
        df[col] = df[col].astype(int)
    for col in ("lambda_hid", "lr"):
        df[col] = df[col].astype(float)
    return Log(path, df, seeds, chance)


PARAMS = {"strategy": report.STRATEGY, "init": report.INIT, "layers": report.LAYERS, "lambda_hid": report.LAMBDA,
          "lr": "train.lr", "seed": report.SEED}


def runs_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """`trials` (long) as `report.load_runs` returns runs: run_id, trial_id, status, start_time, the dotted
    params and one column per metric (the final value)."""
    wide = trials.pivot_table(index=["log", "trial", *PARAMS, "status"], columns="metric", values="value",
                              aggfunc="first").reset_index()
    wide.columns.name = None
    if wide.duplicated([*PARAMS]).any():
        raise ValueError("a configuration and seed appears twice in the logs")
    wide = wide.rename(columns={**PARAMS, "trial": "trial_id"}).drop(columns="log")
    wide.insert(0, "run_id", wide["trial_id"])
    wide["start_time"] = range(len(wide))
    return wide


@dataclass
class Table:
    """One committed verdict table: its folder, the reference, the dimension compared."""

    folder: str
    reference: str
    factor: str = report.STRATEGY


@dataclass
class Study:
    name: str
    trials_csv: str  # where its trials.csv goes
    logs: list[str]
    tables: list[Table] = field(default_factory=list)
    chance: float | None = None  # majority class when the logs do not print it


GR, SS = "glue_repro/results", "sst2_strategies/results"
SST2_MAJORITY = 50.92  # 444 of the 872 SST-2 dev rows are label 1; printed by glue_repro's teacher check
STUDIES = [
    Study("glue_repro_sst2", f"{GR}/sst2/trials.csv", [f"{GR}/logs/sst2_random.txt", f"{GR}/logs/sst2_copy.txt"],
          [Table(f"{GR}/sst2/vs_forward", "forward"), Table(f"{GR}/sst2/vs_none", "none")]),
    Study("glue_repro_mnli", f"{GR}/mnli/trials.csv", [f"{GR}/logs/mnli_random.txt", f"{GR}/logs/mnli_copy.txt"],
          [Table(f"{GR}/mnli/vs_forward", "forward"), Table(f"{GR}/mnli/vs_none", "none")]),
    # one strategy only: its committed paired.csv is empty (nothing to re-derive); the trials for the record
    Study("glue_repro_lambda_sst2", f"{GR}/sst2/lambda/trials.csv", [f"{GR}/logs/lambda_sst2.txt"]),
    Study("sst2_strategies", f"{SS}/strategies/trials.csv", [f"{SS}/logs/strategies_random.txt",
                                                              f"{SS}/logs/strategies_copy.txt"],
          [Table(f"{SS}/strategies", "forward")], chance=SST2_MAJORITY),
    Study("sst2_lambda", f"{SS}/lambda/trials.csv", [f"{SS}/logs/lambda.txt"], [Table(f"{SS}/lambda", "forward")],
          chance=SST2_MAJORITY),
]


def check_old(runs: pd.DataFrame, old: pd.DataFrame, reference: str, factor: str) -> pd.DataFrame:
    """The committed pairs recomputed from the parsed trials at fixed n (`stats.paired_test`: what the old rules
    computed at the last look): one row per committed pair with the committed (`old_*`) and recomputed (`new_*`)
    n, mean_diff, sd_diff, ci_low, ci_high, p_tost, and `match`: all agree to 1e-9 (relative or absolute) and the
    old rules give the committed verdict from them (equivalent: p_tost < α; different: the 95 % interval excludes
    0). Where the committed sd is float noise around 0 (identical differences), n, mean_diff and sd < 1e-9 are
    compared (the interval, p-value and verdict of a zero spread are noise)."""
    rows = []
    for r in old.to_dict("records"):
        sel = runs
        for k in cell_keys(old, factor):
            sel = sel[np.isclose(sel[k], r[report.short(k)])] if k in FLOATS else sel[sel[k] == r[report.short(k)]]
        a = sel[sel[factor] == r[report.short(factor)]].set_index(report.SEED)[r["metric"]]
        b = sel[sel[factor] == reference].set_index(report.SEED)[r["metric"]]
        d = (a - b).dropna().sort_index().to_numpy()
        new = stats.paired_test(d, float(r["margin"]), ALPHA)
        out = {report.short(factor): r[report.short(factor)]} | {report.short(k): r[report.short(k)]
                                                                 for k in cell_keys(old, factor)}
        out |= {"metric": r["metric"], "old_n": r["n"], "new_n": new["n"]}
        zero = r["sd_diff"] < 1e-9
        checked = ("mean_diff",) if zero else ("mean_diff", "sd_diff", "ci_low", "ci_high", "p_tost")
        ok = new["n"] == r["n"] and (not zero or new["sd_diff"] < 1e-9)
        for s in ("mean_diff", "sd_diff", "ci_low", "ci_high", "p_tost"):
            out[f"old_{s}"], out[f"new_{s}"] = r[s], new[s]
            if s in checked:
                ok = ok and math.isclose(new[s], r[s], rel_tol=1e-9, abs_tol=1e-9)
        old_rule = ("equivalent" if new["p_tost"] < ALPHA else "different" if new["ci_low"] > 0 or new["ci_high"] < 0
                    else "inconclusive") if not zero else r["verdict"]  # the old rules; sd 0: noise decided
        out["match"] = bool(ok and old_rule == r["verdict"])
        rows.append(out)
    return pd.DataFrame(rows)


FLOATS = (report.LAMBDA, "train.lr")


def cell_keys(paired: pd.DataFrame, factor: str) -> list[str]:
    """The dotted names of a paired table's cell columns (every key column but the compared one)."""
    return [p for p in PARAMS.values() if p != factor and p != report.SEED and report.short(p) in paired.columns]


def design(log: Log, levels: int) -> stats.Boundaries | None:
    """The sequential design an invocation ran with (adaptive seeds), or None (a fixed grid: fixed-n rules)."""
    if log.seeds is None:
        return None
    return stats.boundaries(log.seeds["min"], log.seeds["max"], ALPHA, "obrien_fleming", pairs=max(levels - 1, 1))


def rederive(logs: list[Log], runs: pd.DataFrame, old: pd.DataFrame, table: Table) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`report.paired_differences` and `report.cell_claims` with the corrected rules, each cell under the design
    of the invocation (log) that ran it. Returns (paired, claims), rows in the committed table's order."""
    levels = runs[table.factor].nunique()
    paired, claims = [], []
    for metric in old["metric"].unique():
        margin = float(old.loc[old["metric"] == metric, "margin"].iloc[0])
        for log in logs:
            inits = set(log.trials["init"])
            rows = log.trials.loc[log.trials["metric"] == metric, "rows"]
            chance = (log.chance, int(rows.iloc[0])) if log.chance is not None and metric == "eval/accuracy" else None
            part = report.paired_differences(runs, metric, table.reference, margin, ALPHA, factor=table.factor,
                                             at=report.FINAL, bounds=design(log, levels), chance=chance)
            part = part[part["init"].isin(inits)]
            if part.empty:
                continue
            part = part.assign(design=describe_design(log, levels))
            bounds = design(log, levels)
            if bounds is not None:  # the critical values at the look that decided (or the last look)
                looks = [int(x) if x == x else min(int(n), bounds.n_max) for x, n in zip(part["look"], part["n"])]
                part["c_eq"] = [bounds.at(n)[0] if n >= bounds.n_min else math.nan for n in looks]
                part["c_diff"] = [bounds.at(n)[1] if n >= bounds.n_min else math.nan for n in looks]
                part["max_seeds"] = bounds.n_max
            paired.append(part)
            claims.append(report.cell_claims(runs, part, metric, factor=table.factor, at=report.FINAL))
    return pd.concat(paired, ignore_index=True), pd.concat(claims, ignore_index=True)


def describe_design(log: Log, levels: int) -> str:
    if log.seeds is None:
        return "fixed n: TOST per pair, Holm over the cell's pairs"
    s = log.seeds
    return (f"sequential: seeds {s['min']}..{s['max']}, O'Brien–Fleming, different at α/{max(levels - 1, 1)}")


def why(old: str, new: pd.Series) -> str:
    """Why a verdict changed (empty when it did not)."""
    if old == new["verdict"]:
        return ""
    if isinstance(new["warning"], str) and new["warning"].startswith("identical"):
        return "sd 0: identical differences decide nothing"
    if new["verdict"] == report.AT_CHANCE:
        return "every trial of both sides at chance"
    if new["design"].startswith("sequential"):
        from scipy.stats import t

        n = int(new["look"]) if new["look"] == new["look"] else int(new["n"])
        tstat = abs(new["mean_diff"]) / (new["sd_diff"] / math.sqrt(new["n"]))
        stopped = (f"; the old rules stopped at {n} seeds (the design would have run up to "
                   f"{int(new['max_seeds'])})" if old != "inconclusive" and n < new["max_seeds"] else "")
        if old == "different":
            return (f"different needs |t| > c_diff = {new['c_diff']:.2f} at {n} seeds (α/4, the design's boundary) "
                    f"instead of {t.isf(ALPHA / 2, n - 1):.2f} (fixed n, α); |t| = {tstat:.2f}{stopped}")
        return (f"equivalent needs mean ± c_eq·se inside ±margin with c_eq = {new['c_eq']:.2f} at {n} seeds (the "
                f"design's boundary) instead of {t.isf(ALPHA, n - 1):.2f} (fixed n){stopped}")
    if old == "different" and new["verdict"] == "inconclusive" and new["p_diff"] < ALPHA <= new["p_diff_holm"]:
        return f"Holm over the cell's pairs (p {new['p_diff']:.3g} → {new['p_diff_holm']:.3g})"
    return "UNEXPLAINED"


TRIAL_COLUMNS = ["trial", "seed", "strategy", "init", "layers", "lambda_hid", "lr", "metric", "value", "printed",
                 "correct", "rows", "epoch", "status", "log"]


def run_study(study: Study, root: Path = HERE) -> list[dict]:
    """Parse a study's logs, write its trials.csv and, per committed table, paired_rederived.csv and
    claims_rederived.csv. Returns one record per table (old, check, new, claims) for REDERIVED.md."""
    logs = [parse_log(root / p, study.chance) for p in study.logs]
    trials = pd.concat([lg.trials for lg in logs], ignore_index=True)
    trials = trials.sort_values(["init", "strategy", "lambda_hid", "seed", "metric"], kind="stable")
    trials[TRIAL_COLUMNS].to_csv(root / study.trials_csv, index=False)
    runs = runs_frame(trials)
    out = []
    for table in study.tables:
        folder = root / table.folder
        old = pd.read_csv(folder / "paired.csv")
        check = check_old(runs, old, table.reference, table.factor)
        new, claims = rederive(logs, runs, old, table)
        new.to_csv(folder / "paired_rederived.csv", index=False)
        claims.to_csv(folder / "claims_rederived.csv", index=False)
        out.append({"study": study, "table": table, "old": old, "check": check, "new": new, "claims": claims})
    return out


def _join(rec: dict) -> pd.DataFrame:
    """Old and new verdict per pair, side by side."""
    factor = report.short(rec["table"].factor)
    keys = [factor] + [report.short(k) for k in cell_keys(rec["old"], rec["table"].factor)]
    old = rec["old"].rename(columns={"verdict": "old verdict"})
    new = rec["new"].copy()
    for k in keys:  # the committed CSV reads λ and lr back as floats
        if k in old and old[k].dtype.kind == "f":
            new[k] = new[k].astype(float)
    both = old[keys + ["metric", "n", "mean_diff", "sd_diff", "old verdict"]].merge(
        new[keys + ["metric", "verdict", "look", "p_diff", "p_diff_holm", "warning", "design", "c_eq", "c_diff",
                    "max_seeds"]
            if "c_eq" in new else keys + ["metric", "verdict", "look", "p_diff", "p_diff_holm", "warning", "design"]],
        on=keys + ["metric"], how="left", validate="one_to_one")
    if "c_eq" not in both:
        both["c_eq"] = both["c_diff"] = both["max_seeds"] = math.nan
    both["why"] = [why(o, r) for o, (_, r) in zip(both["old verdict"], both.iterrows())]
    return both


def markdown(records: list[dict]) -> str:
    lines = ["# Committed verdicts re-derived with the corrected statistics (issue 18, item 9)", "",
             "Generated by `python experiments/rederive.py` (from the repository root; seconds, no Ray or MLflow).",
             "The MLflow stores of these studies are gone; each study's run log prints every trial's final value,",
             "which the script parses into a `trials.csv` per study (accuracies are correct/rows·100, recovered",
             "exactly from the printed 2-decimal value and the eval split's size). Only final epochs exist, and",
             "every study ran FIFO, so every comparison is at the final epoch (outcome-independent under FIFO).", "",
             "**Rules.** Fixed grids of seeds: TOST per pair at α = 0.05 (*equivalent*), *different* family-wise over",
             "a cell's pairs by Holm. Studies with adaptive seeds (`tune.seeds`): the sequential design",
             "`stats.boundaries(min, max, 0.05, 'obrien_fleming', pairs = levels − 1 = 4)`, replayed look by look in",
             "seed order, each cell under the design of the invocation that ran it (the MNLI copy-init invocation",
             "had max 3: one look, exact t quantiles with *different* at α/4); the same design for the",
             "`vs none` tables (which pairs got a 4th seed was decided by the `vs forward` pairs: the repeated-look",
             "boundaries bound the error over every look that could have been taken). Identical differences",
             "(sd 0) decide nothing; pairs whose trials are all at chance (SST-2: the 50.92 % majority class of",
             "872 dev rows; MNLI matched: 37.30 % of 1000; binomial test at 0.01) get no verdict.", "",
             "**Check of the parsed trials.** For every committed pair, `stats.paired_test` on the parsed trials",
             "(what the old rules computed at the last look) reproduces the committed n, mean_diff, sd_diff,",
             "95 % interval and TOST p-value to 1e-9, and the old rules give the committed verdict from them; the",
             "table below says where it did. `glue_repro/results/sst2/lambda/paired.csv` is empty (one strategy, λ",
             "varies): nothing to re-derive there; its trials are written for the record.", ""]
    summary = []
    for rec in records:
        both, table = _join(rec), rec["table"]
        chk = rec["check"]
        summary.append((table.folder, len(chk), int(chk["match"].sum()),
                        int((both["old verdict"] != both["verdict"]).sum())))
    lines += md(pd.DataFrame(summary, columns=["table", "pairs", "pairs reproduced", "verdicts changed"])) + [""]
    changed = []
    for rec in records:
        both, table = _join(rec), rec["table"]
        factor, keys = report.short(table.factor), [report.short(k) for k in cell_keys(rec["old"], table.factor)]
        for _, r in both[both["old verdict"] != both["verdict"]].iterrows():
            changed.append({"table": table.folder, "pair": f"{r[factor]} − {table.reference}",
                            "cell": ", ".join(f"{k} {r[k]}" for k in keys), "metric": r["metric"],
                            "old → new": f"{r['old verdict']} → **{r['verdict']}**", "why": r["why"]})
    lines += ["## Every verdict that changed", ""] + md(pd.DataFrame(changed)) + [""]
    for rec in records:
        both, table = _join(rec), rec["table"]
        factor = report.short(table.factor)
        lines += [f"## `{table.folder}/` — {factor} against `{table.reference}`", "",
                  f"Old: `paired.csv` (kept); new: `paired_rederived.csv`, `claims_rederived.csv`. "
                  f"Design: {'; '.join(sorted(set(both['design'])))}.", ""]
        view = both.assign(mean_diff=both["mean_diff"].map(lambda x: f"{x:+.2f}"),
                           sd_diff=both["sd_diff"].map(lambda x: f"{x:.2f}"),
                           look=both["look"].map(lambda x: "" if x != x else str(int(x))),
                           changed=np.where(both["old verdict"] != both["verdict"], "**yes**", ""))
        cols = [c for c in view.columns if c not in ("p_diff", "p_diff_holm", "warning", "design", "c_eq", "c_diff",
                                                    "max_seeds")]
        lines += md(view[cols].rename(columns={"verdict": "new verdict", "look": "decided at"})) + [""]
        claims = rec["claims"]
        if len(claims):
            keys = [c for c in claims.columns if c not in ("metric", "pairs", "equivalent", "different",
                                                           "inconclusive", "headline") and not c.startswith("block_")]
            old_head = []
            for _, c in claims.iterrows():
                sel = both[both["metric"] == c["metric"]]
                for k in keys:
                    sel = sel[sel[k] == c[k]] if k in sel else sel
                old_head.append(stats.cell_claims(list(sel["old verdict"])))
            view = claims.assign(**{"old verdicts → headline": old_head,
                                    "strategy F p": claims["block_p"].map(lambda x: "–" if x != x else f"{x:.3g}")})
            lines += [f"Headline per cell: \"no {factor} differs from `{table.reference}` by more than ±margin\" "
                      "(intersection–union: holds only when every pair is equivalent). The old reports had no "
                      "headline; the column *old verdicts → headline* applies the same rule to the old verdicts.", ""]
            lines += md(view[keys + ["metric", "equivalent", "different", "inconclusive", "headline",
                                     "old verdicts → headline", "strategy F p"]]) + [""]
    return "\n".join(lines)


def md(df: pd.DataFrame) -> list[str]:
    return report.md_table(df).splitlines()


def main() -> int:
    records = []
    for study in STUDIES:
        records += run_study(study)
    bad = [(r["table"].folder, row) for r in records for _, row in r["check"].iterrows() if not row["match"]]
    for folder, row in bad:
        print(f"[rederive] {folder}: committed pair not reproduced: {row.to_dict()}", file=sys.stderr)
    (HERE / "REDERIVED.md").write_text(markdown(records))
    for r in records:
        both = _join(r)
        print(f"[rederive] {r['table'].folder}: {int(r['check']['match'].sum())}/{len(r['check'])} committed pairs "
              f"reproduced; {int((both['old verdict'] != both['verdict']).sum())} verdicts changed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
