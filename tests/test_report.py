"""`tunekd.report` on synthetic MLflow experiments with known values, checked against independent numpy/scipy."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tunekd import report
from tunekd.errors import ConfigError

SEEDS = (0, 1, 2)
FORWARD = {"copy": [80.0, 81.0, 82.5], "random": [70.0, 72.0, 71.0]}
# strategy − forward, per seed: chosen to be clearly equivalent, clearly different, or inconclusive (δ = 1)
DIFFS = {
    ("reverse", "copy"): [0.1, -0.1, 0.05],
    ("reverse", "random"): [-3.0, -3.2, -2.9],
    ("all_to_one", "copy"): [2.0, -1.5, 0.5],
    ("all_to_one", "random"): [0.6, 0.9, 0.3],
}
EXPECTED_VERDICT = {
    ("reverse", "copy"): "equivalent",
    ("reverse", "random"): "different",
    ("all_to_one", "copy"): "inconclusive",
    ("all_to_one", "random"): "inconclusive",
}
MARGIN = 1.0


def accuracy(strategy: str, init: str) -> list[float]:
    base = np.array(FORWARD[init])
    return list(base if strategy == "forward" else base + np.array(DIFFS[(strategy, init)]))


class Store:
    """A sqlite MLflow store written the way tunekd.tracking writes a study."""

    def __init__(self, tmp_path):
        from mlflow.tracking import MlflowClient

        self.uri = f"sqlite:///{tmp_path}/mlflow.db"
        self.artifacts = (tmp_path / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.clock = 1_700_000_000_000

    def tick(self) -> int:
        self.clock += 1000
        return self.clock

    def experiment(self, name: str) -> str:
        return self.client.create_experiment(name, artifact_location=f"{self.artifacts}/{name}")

    def parent(self, exp_id: str, teacher: float | None = None) -> str:
        run = self.client.create_run(exp_id, run_name="study", tags={"tunekd.role": "study"},
                                     start_time=self.tick())
        if teacher is not None:
            self.client.log_metric(run.info.run_id, "teacher/accuracy", teacher, step=0)
        return run.info.run_id

    def trial(self, exp_id: str, parent: str, *, strategy="forward", init="copy", seed=0, layers=3, lam=3.0,
              status="completed", metrics: dict | None = None, error: str | None = None,
              history: dict | None = None) -> str:
        from mlflow.entities import Metric, Param

        trial_id = f"t{self.clock}"
        tags = {"mlflow.parentRunId": parent, "tunekd.trial_id": trial_id, "tunekd.status": status}
        if error:
            tags["tunekd.error"] = error
        run = self.client.create_run(exp_id, run_name=trial_id, tags=tags, start_time=self.tick())
        fwd = [[0, 0], [1, 4], [2, 8], [3, 12]]
        layer_map = {"forward": fwd, "reverse": [[0, 0], [1, 12], [2, 8], [3, 4]],
                     "all_to_one": [[i, 6] for i in range(layers + 1)]}.get(strategy, fwd)
        params = {"distill.strategy": strategy, "student.init": init, "seed": str(seed),
                  "student.layers": str(layers), "distill.lambda_hid": str(lam), "train.lr": "2e-05",
                  "distill.layer_map": json.dumps(layer_map) + ("" if strategy != "random" else f"#{seed}"),
                  "student.copied_layers": json.dumps([3, 7, 11][:layers] if init == "copy" else None),
                  "task.name": "synthetic"}
        items = [Metric(k, v, self.clock, step) for k, vals in (history or {}).items() for step, v in vals]
        items += [Metric(k, v, self.clock, 10) for k, v in (metrics or {}).items()]
        self.client.log_batch(run.info.run_id, metrics=items, params=[Param(k, v) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id, status="FAILED" if status == "failed" else "FINISHED")
        return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    s = Store(tmp)
    # main study: 3 strategies x 2 inits x 3 seeds, plus an early-stopped and a failed trial
    exp = s.experiment("kd")
    s.kd_parent = s.parent(exp, teacher=90.5)
    for strategy, init in itertools.product(("forward", "reverse", "all_to_one"), ("copy", "random")):
        for seed, acc in zip(SEEDS, accuracy(strategy, init)):
            # an earlier epoch with another value: the report must use the last step
            s.trial(exp, s.kd_parent, strategy=strategy, init=init, seed=seed,
                    metrics={"eval/accuracy": acc, "eval/f1": acc - 10.0, "train/loss": 0.5},
                    history={"eval/accuracy": [(1, 11.0)]})
    s.trial(exp, s.kd_parent, strategy="forward", init="copy", seed=3, status="early_stopped",
            metrics={"eval/accuracy": 55.0, "eval/f1": 45.0}, history={"eval/accuracy": [(1, 50.0)]})
    s.trial(exp, s.kd_parent, strategy="random", init="copy", seed=0, status="failed",
            error="Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory | boom")
    # λ and depth sweep: 2 strategies x λ {1, 3} x depth {3, 6} x 2 seeds
    exp2 = s.experiment("kd-sweep")
    p2 = s.parent(exp2)
    for strategy, lam, layers, seed in itertools.product(("forward", "reverse"), (1.0, 3.0), (3, 6), (0, 1)):
        acc = 60.0 + 2 * lam + layers + seed + (0.5 if strategy == "reverse" else 0.0)
        s.trial(exp2, p2, strategy=strategy, lam=lam, layers=layers, seed=seed, metrics={"eval/accuracy": acc})
    # two invocations of the same study: the later one re-runs forward/seed 0
    exp3 = s.experiment("kd-twice")
    first = s.parent(exp3)
    for strategy, seed in itertools.product(("forward", "reverse"), (0, 1)):
        s.trial(exp3, first, strategy=strategy, seed=seed, metrics={"eval/accuracy": 70.0 + seed})
    s.second = s.parent(exp3)
    s.trial(exp3, s.second, strategy="forward", seed=0, metrics={"eval/accuracy": 90.0})
    # nothing completed
    exp4 = s.experiment("kd-broken")
    p4 = s.parent(exp4)
    s.trial(exp4, p4, status="failed", error="ValueError: bad")
    s.trial(exp4, p4, seed=1, status="early_stopped", metrics={"eval/accuracy": 50.0})
    return s


@pytest.fixture(scope="module")
def runs(store):
    return report.load_runs(store.client, "kd")


# --- load_runs ---------------------------------------------------------------------------------


def test_load_runs_rows_params_final_metrics(runs):
    assert len(runs) == 3 * 2 * 3 + 2
    assert runs["status"].value_counts().to_dict() == {"completed": 18, "early_stopped": 1, "failed": 1}
    assert {"run_id", "parent_id", "trial_id", "distill.strategy", "student.init", "seed", "distill.layer_map",
            "eval/accuracy", "eval/f1"} <= set(runs.columns)
    assert runs["seed"].dtype.kind == "i" and runs["distill.lambda_hid"].dtype.kind == "f"
    fwd_copy = runs[(runs["distill.strategy"] == "forward") & (runs["student.init"] == "copy")
                    & (runs["status"] == "completed")].sort_values("seed")
    assert fwd_copy["eval/accuracy"].tolist() == FORWARD["copy"]  # the last step, not epoch 1's 11.0
    failed = runs[runs["status"] == "failed"].iloc[0]
    assert "CUDA out of memory" in failed["error"] and pd.isna(failed["eval/accuracy"])


def test_load_runs_unknown_experiment_and_parent(store):
    with pytest.raises(ConfigError, match="unknown experiment 'kdd'.*did you mean 'kd'"):
        report.load_runs(store.client, "kdd")
    with pytest.raises(ConfigError, match="--parent"):
        report.load_runs(store.client, "kd", parent="0" * 32)


def test_load_runs_parent_filter_and_latest_rerun(store):
    all_runs = report.load_runs(store.client, "kd-twice")
    assert len(all_runs) == 5
    only = report.load_runs(store.client, "kd-twice", parent=store.second)
    assert len(only) == 1 and only["eval/accuracy"].tolist() == [90.0]
    table = report.strategy_table(all_runs, ["eval/accuracy"])
    fwd = table[table["strategy"] == "forward"].iloc[0]
    # seed 0 run again by the later invocation: its latest run (90) replaces the first one (70)
    assert fwd["eval/accuracy n"] == 2 and fwd["eval/accuracy mean"] == pytest.approx((90.0 + 71.0) / 2)


# --- the strategy table ------------------------------------------------------------------------


def test_strategy_table_means_sds(runs):
    metrics = ["eval/accuracy", "eval/f1"]
    table = report.strategy_table(runs, metrics)
    assert list(table.columns[:2]) == ["strategy", "init"]
    assert "seed" not in table and "distill.layer_map" not in table  # seed pooled, derived params ignored
    # random/copy has only a failed trial: its row stays, with no value
    assert len(table) == 7 and set(table["strategy"]) == {"forward", "reverse", "all_to_one", "random"}
    assert table["init"].tolist() == ["random"] * 3 + ["copy"] * 4
    assert table["strategy"].tolist() == ["forward", "reverse", "all_to_one"] * 2 + ["random"]
    missing = table.iloc[-1]
    assert missing["eval/accuracy"] == "no completed trial (1 failed)" and missing["eval/accuracy n"] == 0
    assert math.isnan(missing["eval/accuracy mean"])
    for _, row in table.iloc[:-1].iterrows():
        x = np.array(accuracy(row["strategy"], row["init"]))
        mean, sd = x.sum() / len(x), np.sqrt(((x - x.mean()) ** 2).sum() / (len(x) - 1))
        assert row["eval/accuracy n"] == 3  # the early-stopped seed 3 is not counted
        assert row["eval/accuracy mean"] == pytest.approx(mean, abs=1e-12)
        assert row["eval/accuracy sd"] == pytest.approx(sd, abs=1e-12)
        assert row["eval/f1 mean"] == pytest.approx(mean - 10.0, abs=1e-12)
        assert row["eval/accuracy"] == f"{mean:.2f} ± {sd:.2f} (3)"


def test_cell_format():
    assert report.cell(72.5, float("nan"), 1) == "72.50 ± – (1)"
    assert report.cell(72.5, 0.414, 3) == "72.50 ± 0.41 (3)"
    assert report.cell(float("nan"), float("nan"), 0) == "–"


def test_strategy_table_single_seed_sd_dash(runs):
    one = runs[(runs["seed"] == 0) | (runs["status"] != "completed")]
    table = report.strategy_table(one, ["eval/accuracy"])
    table = table[table["strategy"] != "random"]  # random/copy: only a failed trial (n 0)
    assert (table["eval/accuracy n"] == 1).all() and table["eval/accuracy sd"].isna().all()
    assert all(c.endswith("± – (1)") for c in table["eval/accuracy"])


def test_strategy_table_rows_follow_varying_params(store):
    sweep = report.load_runs(store.client, "kd-sweep")
    table = report.strategy_table(sweep, ["eval/accuracy"])
    assert list(table.columns[:4]) == ["strategy", "init", "layers", "lambda_hid"]
    assert len(table) == 2 * 2 * 2
    row = table[(table["strategy"] == "reverse") & (table["layers"] == 6) & (table["lambda_hid"] == 1.0)].iloc[0]
    assert row["eval/accuracy mean"] == pytest.approx(60 + 2 + 6 + 0.5 + 0.5)
    assert row["eval/accuracy sd"] == pytest.approx(np.std([0, 1], ddof=1))


# --- paired differences ------------------------------------------------------------------------


def expected_pair(d: list[float], margin: float) -> dict:
    d = np.asarray(d)
    n = len(d)
    mean = d.sum() / n
    sd = np.sqrt(((d - mean) ** 2).sum() / (n - 1))
    se = sd / np.sqrt(n)
    t95, t90 = stats.t.ppf(0.975, n - 1), stats.t.ppf(0.95, n - 1)
    p_low = 1 - stats.t.cdf((mean + margin) / se, n - 1)  # H0: diff <= -margin
    p_high = stats.t.cdf((mean - margin) / se, n - 1)  # H0: diff >= +margin
    return {"n": n, "mean_diff": mean, "ci_low": mean - t95 * se, "ci_high": mean + t95 * se,
            "ci90_low": mean - t90 * se, "ci90_high": mean + t90 * se, "p_tost": max(p_low, p_high)}


def test_paired_differences_against_hand_computation(runs):
    paired = report.paired_differences(runs, "eval/accuracy", "forward", MARGIN)
    assert list(paired.columns[:3]) == ["strategy", "init", "n"]
    assert len(paired) == 4 and "forward" not in set(paired["strategy"])
    for _, row in paired.iterrows():
        key = (row["strategy"], row["init"])
        exp = expected_pair(DIFFS[key], MARGIN)
        for col, value in exp.items():
            assert row[col] == pytest.approx(value, rel=1e-9, abs=1e-9), (key, col)
        assert row["verdict"] == EXPECTED_VERDICT[key], key
        # the verdict rule, independently: equivalent ⇔ 90% CI inside (−δ, δ)
        inside = -MARGIN < exp["ci90_low"] and exp["ci90_high"] < MARGIN
        assert (row["verdict"] == "equivalent") == inside
        if row["verdict"] == "different":
            assert exp["ci_low"] > 0 or exp["ci_high"] < 0


def test_paired_differences_margin_changes_verdict(runs):
    wide = report.paired_differences(runs, "eval/accuracy", "forward", margin=10.0)
    assert set(wide["verdict"]) == {"equivalent"}


def test_paired_differences_other_reference_and_sweep(runs, store):
    paired = report.paired_differences(runs, "eval/accuracy", "reverse", MARGIN)
    row = paired[(paired["strategy"] == "forward") & (paired["init"] == "random")].iloc[0]
    assert row["mean_diff"] == pytest.approx(-np.mean(DIFFS[("reverse", "random")]))
    sweep = report.load_runs(store.client, "kd-sweep")
    p = report.paired_differences(sweep, "eval/accuracy", "forward", MARGIN)
    assert len(p) == 4 and (p["n"] == 2).all()  # paired by seed within each (layers, λ)
    assert {"layers", "lambda_hid"} <= set(p.columns)
    # every difference is exactly 0.5: sd 0 estimates no spread: no interval, no verdict, a warning naming the trials
    assert np.allclose(p["mean_diff"], 0.5) and p["ci_low"].isna().all()
    assert set(p["verdict"]) == {"inconclusive"}
    assert all(w.startswith("identical differences (sd 0) decide nothing: t") and " vs t" in w for w in p["warning"])


def test_paired_differences_few_pairs_inconclusive(runs):
    one = runs[runs["seed"] == 0]
    paired = report.paired_differences(one, "eval/accuracy", "forward", MARGIN)
    assert (paired["n"] == 1).all() and set(paired["verdict"]) == {"inconclusive"}
    assert paired["ci_low"].isna().all()


def test_paired_differences_unknown_reference(runs):
    with pytest.raises(ConfigError, match="did you mean 'forward'"):
        report.paired_differences(runs, "eval/accuracy", "foward", MARGIN)


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_writes_files_and_logs_artifacts(store, tmp_path, capsys):
    out = tmp_path / "rep"
    rc = report.main(["--experiment", "kd", "--tracking-uri", store.uri, "--out", str(out)])
    assert rc == 0
    expected = {"report.md", "report.html", "table.csv", "paired.csv", "claims.csv", "table.tex", "trials.csv",
                "curves.csv", "strategies_accuracy.png", "strategies_f1.png", "paired_accuracy.png", "paired_f1.png",
                "curves_accuracy.png", "curves_f1.png"}
    assert {p.name for p in out.iterdir()} == expected
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert md in stdout
    assert "18 completed, 1 early_stopped, 1 failed" in md
    assert "81.17 ± 1.26 (3)" in md  # forward, copy
    assert "| reverse | random |" in md and "different" in md and "equivalent" in md
    # the trials not compared, with status and error
    tail = md.split("## Trials not compared")[1]
    assert "early_stopped" in tail and "failed" in tail and "CUDA out of memory \\| boom" in tail
    assert "Teacher: eval/accuracy 90.50" in md
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 7  # 3 strategies x 2 inits, and random/copy whose one trial failed
    assert "| random | copy | no completed trial (1 failed) |" in md
    paired = pd.read_csv(out / "paired.csv")
    assert len(paired) == 8 and set(paired["metric"]) == {"eval/accuracy", "eval/f1"}
    logged = {a.path for a in store.client.list_artifacts(store.kd_parent, "report")}
    assert logged == {f"report/{name}" for name in expected}


def test_cli_lambda_and_depth_plots(store, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = report.main(["--experiment", "kd-sweep", "--tracking-uri", store.uri, "--out", str(out),
                      "--metric", "accuracy", "--margin", "0.25", "--no-log"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "table.csv", "paired.csv", "claims.csv",
                                                "table.tex", "trials.csv", "curves.csv", "curves_accuracy.png",
                                                "strategies_accuracy.png", "paired_accuracy.png",
                                                "lambda_accuracy.png", "depth_accuracy.png"}
    paired = pd.read_csv(out / "paired.csv")
    # 0.5 exactly, outside a 0.25 margin, but identical differences (sd 0) decide nothing
    assert set(paired["verdict"]) == {"inconclusive"} and paired["warning"].str.startswith("identical").all()


@pytest.mark.parametrize("argv, message", [
    (["--experiment", "nope"], "unknown experiment 'nope'"),
    (["--experiment", "kd-broken"], "no completed trials (1 early_stopped, 1 failed)"),
    (["--experiment", "kd", "--reference", "revers"], "did you mean 'reverse'"),
    (["--experiment", "kd", "--metric", "bleu"], "unknown metric 'bleu'"),
])
def test_cli_errors_exit_2_one_line(store, tmp_path, capsys, argv, message):
    rc = report.main(argv + ["--tracking-uri", store.uri, "--out", str(tmp_path / "x"), "--no-log"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("tunekd: error:")


def test_cli_missing_database(tmp_path, capsys):
    rc = report.main(["--experiment", "kd", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"])
    assert rc == 2 and "no MLflow database" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_help_text(capsys):
    with pytest.raises(SystemExit):
        report.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--experiment", "--tracking-uri", "--out", "--reference", "--margin", "--parent", "--metric"):
        assert flag in text


# --- rung-aware pairs (ASHA) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def asha_runs(store):
    """An ASHA-like study: forward always runs 3 epochs; reverse is stopped after epoch 1 on seed 0 and 2 on
    seed 1, completes on seed 2; with random init both strategies are stopped after epoch 1 on every seed."""
    exp = store.experiment("kd-asha")
    parent = store.parent(exp)
    curves = {  # (strategy, init, seed) -> accuracy per epoch
        ("forward", "copy", 0): [70, 75, 80], ("forward", "copy", 1): [71, 76, 82], ("forward", "copy", 2): [69, 74, 81],
        ("reverse", "copy", 0): [72], ("reverse", "copy", 1): [70, 78], ("reverse", "copy", 2): [70, 75, 80.5],
        ("forward", "random", 0): [50], ("forward", "random", 1): [52], ("forward", "random", 2): [51],
        ("reverse", "random", 0): [53], ("reverse", "random", 1): [51], ("reverse", "random", 2): [55],
    }
    for (strategy, init, seed), acc in curves.items():
        store.trial(exp, parent, strategy=strategy, init=init, seed=seed,
                    status="completed" if len(acc) == 3 else "early_stopped",
                    history={"eval/accuracy": [(e + 1, float(v)) for e, v in enumerate(acc)]})
    df = report.load_runs(store.client, "kd-asha")
    return df, curves


def test_asha_pairs_get_verdicts_only_where_the_epoch_does_not_depend_on_the_outcome(asha_runs, store):
    df, curves = asha_runs
    # no histories: completed trials at the final epoch; reverse/copy lost seeds 0 and 1 to ASHA's stops, so which
    # pairs exist was chosen by the outcome: descriptive, no verdict; every random-init trial was stopped: no row
    final = report.paired_differences(df, "eval/accuracy", "forward", MARGIN)
    row = final[(final["strategy"] == "reverse") & (final["init"] == "copy")].iloc[0]
    assert row["n"] == 1 and row["rung"] == "final" and row["verdict"] == "descriptive"
    assert set(final["init"]) == {"copy"}

    withh = report.with_histories(store.client, df, ["eval/accuracy"])
    assert report.common_epoch(withh, "eval/accuracy") == 1  # the grace rung: every trial reached epoch 1
    paired = report.paired_differences(withh, "eval/accuracy", "forward", MARGIN)  # default: at epoch 1
    by = {r["init"]: r for _, r in paired.iterrows()}
    for init in ("copy", "random"):
        d = [curves[("reverse", init, s)][0] - curves[("forward", init, s)][0] for s in range(3)]
        half = stats.t.ppf(0.975, 2) * np.std(d, ddof=1) / np.sqrt(3)  # by hand
        assert by[init]["n"] == 3 and by[init]["rung"] == "1" and by[init]["basis"] == "epoch 1, every trial"
        assert by[init]["mean_diff"] == pytest.approx(np.mean(d))
        assert by[init]["ci_low"] == pytest.approx(np.mean(d) - half)
        assert by[init]["verdict"] in ("equivalent", "different", "inconclusive")
    # each pair at the deepest epoch both trials reached: chosen by ASHA's stops, so descriptive
    deep = report.paired_differences(withh, "eval/accuracy", "forward", MARGIN, at="deepest")
    by = {r["init"]: r for _, r in deep.iterrows()}
    d_copy = [72 - 70, 78 - 76, 80.5 - 81]  # seed 0 at epoch 1, seed 1 at epoch 2, seed 2 at epoch 3
    assert by["copy"]["mean_diff"] == pytest.approx(np.mean(d_copy)) and by["copy"]["rung"] == "1–3"
    assert set(deep["verdict"]) == {"descriptive"}
    # an epoch past the grace rung is not reached by every trial: descriptive too
    assert set(report.paired_differences(withh, "eval/accuracy", "forward", MARGIN, at=2)["verdict"]) == {"descriptive"}


def test_report_cli_compares_asha_studies_at_the_grace_rung(asha_runs, store, tmp_path):
    code = report.main(["--experiment", "kd-asha", "--tracking-uri", store.uri, "--out", str(tmp_path / "a"),
                        "--no-log"])
    assert code == 0
    paired = pd.read_csv(tmp_path / "a" / "paired.csv")
    assert sorted(paired["init"]) == ["copy", "random"] and list(paired["rung"].astype(str)) == ["1", "1"]
    assert "descriptive" not in set(paired["verdict"])
    md = (tmp_path / "a" / "report.md").read_text()
    assert "**epoch 1, every trial**" in md and "## Descriptive: each pair at the deepest epoch" in md and "1–3" in md
    code = report.main(["--experiment", "kd-asha", "--tracking-uri", store.uri, "--out", str(tmp_path / "b"),
                        "--no-log", "--final-only"])
    assert code == 0
    paired = pd.read_csv(tmp_path / "b" / "paired.csv")
    assert list(paired["init"]) == ["copy"] and list(paired["rung"]) == ["final"] and list(paired["n"]) == [1]
    assert list(paired["verdict"]) == ["descriptive"]


# --- LaTeX ---------------------------------------------------------------------------------------


def test_latex_p_values_and_epoch_column(runs, tmp_path):
    paired = report.paired_differences(runs, "eval/accuracy", "forward", MARGIN)
    table = report.strategy_table(runs, ["eval/accuracy"])
    tex = report.latex_tables(table, paired, ["eval/accuracy"], reference="forward", margin=MARGIN, alpha=0.05)
    assert "& epoch & $n$ &" in tex and "& final & 3 &" in tex
    assert report.p_text(0.0004, tex=True) == "$<0.001$" and report.p_text(0.0004) == "< 0.001"
    assert report.p_text(0.01234) == "0.0123"
    assert " & 0 & " not in tex  # no p printed as "0"
    assert tex.count("\\resizebox") == 2 and "graphicx" in tex


def test_latex_tables_compile_without_overfull_boxes(runs, store, tmp_path):
    """table.tex in a one-column article: pdflatex compiles it with no overfull box (skipped without pdflatex)."""
    import shutil
    import subprocess

    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-base texlive-latex-recommended)")
    sweep = report.load_runs(store.client, "kd-sweep")
    for name, df in (("kd", runs), ("sweep", sweep)):
        paired = report.paired_differences(df, "eval/accuracy", "forward", MARGIN)
        table = report.strategy_table(df, ["eval/accuracy", "eval/f1"] if "eval/f1" in df else ["eval/accuracy"])
        metrics = [c for c in ("eval/accuracy", "eval/f1") if c in df]
        (tmp_path / f"{name}.tex").write_text(report.latex_tables(table, paired, metrics, reference="forward",
                                                                   margin=MARGIN, alpha=0.05))
        doc = tmp_path / f"doc_{name}.tex"
        doc.write_text("\\documentclass{article}\n\\usepackage{booktabs,graphicx}\n\\begin{document}\n"
                       f"\\input{{{name}.tex}}\n\\end{{document}}\n")
        res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        log = (tmp_path / f"doc_{name}.log").read_text(errors="replace")
        assert res.returncode == 0, log[-2000:]
        assert "Overfull" not in log, [ln for ln in log.splitlines() if "Overfull" in ln]
        assert (tmp_path / f"doc_{name}.pdf").exists()
