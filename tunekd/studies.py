"""`tunekd list` and `tunekd compare`: the studies in an MLflow store, and two studies side by side.

- list: every experiment holding tunekd study runs; per parent run (one invocation of a study) its
  start, status, trial counts by status, the teacher's metric and the best completed trial;
- compare A B: the strategy-robustness tables (`report.strategy_table`) of two experiments joined on
  their common configuration columns, with the difference of the means (B − A).

MLflow is reached only through `tunekd.report` (its client and run loading).
"""

from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime

import pandas as pd

from tunekd import report
from tunekd.errors import ArgumentParser, ConfigError, run_cli

DEFAULT_URI = "sqlite:///mlflow.db"


def _best_from_children(children: list) -> tuple[str, str, float] | None:
    """(name, metric, value) of the best completed child on its primary metric (eval/accuracy when
    present, else the first eval/ metric by name)."""
    done = [r for r in children if r.data.tags.get(report.STATUS_TAG) == report.COMPLETED]
    metrics = sorted({k for r in done for k in r.data.metrics if k.startswith("eval/")})
    if not metrics:
        return None
    metric = "eval/accuracy" if "eval/accuracy" in metrics else metrics[0]
    scored = [r for r in done if metric in r.data.metrics]
    best = max(scored, key=lambda r: r.data.metrics[metric])
    return best.info.run_name, metric, float(best.data.metrics[metric])


def study_rows(client) -> pd.DataFrame:
    """One row per tunekd parent run in the store (newest first within an experiment)."""
    rows = []
    for exp in client.search_experiments():
        runs = report._search_all(client, exp.experiment_id)
        parents = [r for r in runs if r.data.tags.get(report.ROLE_TAG) == "study"]
        if not parents:
            continue
        kids: dict[str, list] = {}
        for r in runs:
            pid = r.data.tags.get(report.PARENT_TAG)
            if pid and r.data.tags.get(report.ROLE_TAG) not in ("study", "angles", "report"):
                kids.setdefault(pid, []).append(r)
        for p in sorted(parents, key=lambda r: r.info.start_time or 0, reverse=True):
            children = kids.get(p.info.run_id, [])
            counts: dict[str, int] = {}
            for c in children:
                s = c.data.tags.get(report.STATUS_TAG, "running")
                counts[s] = counts.get(s, 0) + 1
            tags = p.data.tags
            if "tunekd.best.name" in tags:
                best = (tags["tunekd.best.name"], tags.get("tunekd.best.metric", ""),
                        float(tags.get("tunekd.best.value", "nan")))
            else:
                best = _best_from_children(children)
            teacher = {k.split("/", 1)[1]: v for k, v in p.data.metrics.items() if k.startswith("teacher/")}
            rows.append({
                "experiment": exp.name,
                "parent run": p.info.run_name,
                "started": datetime.fromtimestamp((p.info.start_time or 0) / 1000).strftime("%Y-%m-%d %H:%M"),
                "status": p.info.status.lower(),
                "trials": ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none",
                "teacher": ", ".join(f"{k} {v:.2f}" for k, v in teacher.items()) or "–",
                "best": f"{best[1].split('/', 1)[-1]} {best[2]:.2f} ({best[0]})" if best else "–",
                "run_id": p.info.run_id,
            })
    return pd.DataFrame(rows, columns=["experiment", "parent run", "started", "status", "trials", "teacher", "best",
                                       "run_id"])


def compare_tables(df_a: pd.DataFrame, df_b: pd.DataFrame, metric: str, names: tuple[str, str]) -> pd.DataFrame:
    """Two studies' strategy tables for `metric`, joined on their common configuration columns:
    `<A>` and `<B>` cells ("mean ± sd (n)") and `Δ mean (B − A)`; a configuration only one study ran
    has "–" on the other side."""
    a, b = report.strategy_table(df_a, [metric]), report.strategy_table(df_b, [metric])
    keys_a = [c for c in a.columns if not c.startswith(metric)]
    keys_b = [c for c in b.columns if not c.startswith(metric)]
    keys = [k for k in keys_a if k in keys_b]
    if not keys:
        raise ConfigError(f"the two studies share no configuration column (A: {keys_a}, B: {keys_b})")
    for t in (a, b):
        for k in keys:
            t[k] = t[k].astype(str)
    cols = [metric, f"{metric} mean"]
    merged = a[keys + cols].merge(b[keys + cols], on=keys, how="outer", suffixes=(" A", " B"), sort=False)
    out = merged[keys].copy()
    out[names[0]] = merged[f"{metric} A"].fillna("–")
    out[names[1]] = merged[f"{metric} B"].fillna("–")
    diff = merged[f"{metric} mean B"] - merged[f"{metric} mean A"]
    out["Δ mean (B − A)"] = [f"{d:+.2f}" if not (d is None or math.isnan(d)) else "–" for d in diff]
    return out


# --- the CLIs -----------------------------------------------------------------------------------


def parse_list(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="tunekd list",
        description="List the tunekd studies in an MLflow store: per parent run (one invocation of a study) its "
                    "start, status, trial counts by status, the teacher's metric and the best completed trial.",
        epilog="examples:\n  tunekd list\n  tunekd list --tracking-uri sqlite:///mlflow.db\n"
               "  tunekd list --tracking-uri http://127.0.0.1:5000   # a running mlflow server",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=DEFAULT_URI, help="MLflow tracking URI (default: %(default)s)")
    return p.parse_args(argv)


def run_list(args) -> int:
    client = report._client(args.tracking_uri)
    rows = study_rows(client)
    if rows.empty:
        print(f"no tunekd studies in {args.tracking_uri}")
        return 0
    for exp, g in rows.groupby("experiment", sort=False):
        print(f"## {exp}\n")
        print(report.md_table(g.drop(columns=["experiment"])))
        print()
    return 0


def parse_compare(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="tunekd compare",
        description="Put two studies' strategy-robustness tables side by side: per configuration (strategy x "
                    "init x the other columns both studies vary) the cell mean ± sd (n seeds) of each study's "
                    "completed trials, and the difference of the means (B − A).",
        epilog="examples (the second study: the quickstart again with λ = 1):\n"
               "  tunekd run search_spaces/quickstart.yaml\n"
               "  tunekd run search_spaces/quickstart.yaml --set name=quickstart-lambda1 --set distill.lambda_hid=1\n"
               "  tunekd compare quickstart quickstart-lambda1\n"
               "  tunekd compare quickstart quickstart-lambda1 --metric accuracy --out compare.md\n\n"
               "A and B must be two different studies (the same one twice is refused).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="A", help="first study (MLflow experiment name)")
    p.add_argument("b", metavar="B", help="second study (MLflow experiment name)")
    p.add_argument("--metric", default=None, help="metric, e.g. accuracy or eval/f1 (default: eval/accuracy when "
                                                  "both have it, else their first common eval/ metric)")
    p.add_argument("--tracking-uri", default=DEFAULT_URI, help="MLflow tracking URI (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    return p.parse_args(argv)


def run_compare(args) -> int:
    if args.a == args.b:
        raise ConfigError(f"compare: A and B are the same study {args.a!r}; name two different studies "
                          "(tunekd list shows them)")
    client = report._client(args.tracking_uri)
    dfs = [report.load_runs(client, name) for name in (args.a, args.b)]
    for name, df in zip((args.a, args.b), dfs):
        if report.completed(df).empty:
            raise ConfigError(f"study {name!r} has no completed trials")
    common = sorted(set(report.metric_columns(report.completed(dfs[0])))
                    & set(report.metric_columns(report.completed(dfs[1]))))
    if args.metric:
        metric = args.metric if "/" in args.metric else f"eval/{args.metric}"
        if metric not in common:
            raise report.unknown("metric (common to both studies)", args.metric, common)
    elif not common:
        raise ConfigError(f"{args.a!r} and {args.b!r} have no eval/ metric in common")
    else:
        metric = "eval/accuracy" if "eval/accuracy" in common else common[0]
    table = compare_tables(dfs[0], dfs[1], metric, (args.a, args.b))
    text = (f"# {args.a} vs {args.b}: {metric}\n\nCells: mean ± sample sd (seeds) over completed trials.\n\n"
            + report.md_table(table) + "\n")
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"[tunekd] compare: written to {args.out}", file=sys.stderr)
    return 0


def main_list(argv=None) -> int:
    return run_cli(run_list, parse_list(argv))


def main_compare(argv=None) -> int:
    return run_cli(run_compare, parse_compare(argv))
