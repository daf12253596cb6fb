"""Issue 20: the per-epoch views of a study (trials.csv, learning curves, the at-chance warning) and the one-file
report.html, on a synthetic MLflow store with known per-epoch histories; every number is checked against MLflow's
metric history or against numpy/scipy on the known values."""

from __future__ import annotations

import html.parser
import pandas as pd
import pytest
from scipy import stats

from tests.test_report import Store
from tunekd import curves, report
from tunekd import stats as stats_

# (strategy, init, seed) -> eval/accuracy per epoch; 3 epochs; a trial with fewer was stopped early.
# Random-init students without matching stay at chance (50 % on 320 balanced rows).
CURVES = {
    ("forward", "copy", 0): [80.0, 85.0, 90.0], ("forward", "copy", 1): [81.0, 86.5, 91.0],
    ("none", "copy", 0): [79.0, 84.0, 89.5], ("none", "copy", 1): [70.0],
    ("forward", "random", 0): [55.0, 65.0, 72.5], ("forward", "random", 1): [56.0, 66.0, 70.0],
    ("none", "random", 0): [50.0, 50.0, 51.25], ("none", "random", 1): [50.0, 49.0, 50.0],
}
EPOCHS = 3
ROWS, BASELINE = 320, 50.0
NOTE = "**Study run** of quickstart; teacher accuracy 99.06 <script>alert('x')</script> [a link](http://example.com)"
STUDY_YAML = "name: chance\ntrain:\n  epochs: 3\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("mlflow"))
    exp = s.experiment("curves")
    s.parent_id = parent = s.parent(exp, teacher=99.06)
    for key, value in {"tunekd.teacher.baseline": f"{BASELINE:.2f}", "tunekd.teacher.baseline_rows": str(ROWS),
                       "mlflow.note.content": NOTE}.items():
        s.client.set_tag(parent, key, value)
    s.client.log_text(parent, STUDY_YAML, "study.yaml")
    for (strategy, init, seed), acc in CURVES.items():
        loss = [2.0 / (e + 1) + seed for e in range(len(acc))]
        s.trial(exp, parent, strategy=strategy, init=init, seed=seed,
                status="completed" if len(acc) == EPOCHS else "early_stopped",
                history={"eval/accuracy": [(e + 1, v) for e, v in enumerate(acc)],
                         "train/loss": [(e + 1, v) for e, v in enumerate(loss)]})
    s.trial(exp, parent, strategy="reverse", init="copy", seed=0, status="failed", error="RuntimeError: boom")
    return s


@pytest.fixture(scope="module")
def out(study, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    assert report.main(["--experiment", "curves", "--tracking-uri", study.uri, "--out", str(folder)]) == 0
    return folder


def test_trials_csv_is_every_epoch_of_every_trial_as_mlflow_has_it(study, out):
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials.columns) == ["trial", "run_id", "status", "strategy", "init", "seed", "epoch",
                                    "eval/accuracy", "train/loss"]
    assert len(trials) == sum(len(v) for v in CURVES.values())  # the failed trial reported no epoch
    for run_id, rows in trials.groupby("run_id"):
        for metric in ("eval/accuracy", "train/loss"):
            history = {m.step: m.value for m in study.client.get_metric_history(run_id, metric)}
            assert dict(zip(rows["epoch"], rows[metric])) == history
        first = rows.iloc[0]
        assert list(rows["eval/accuracy"]) == CURVES[(first["strategy"], first["init"], int(first["seed"]))]
    assert set(trials["status"]) == {"completed", "early_stopped"}


def test_curves_one_series_per_strategy_and_cell_mean_and_band_over_seeds(out):
    series = pd.read_csv(out / "curves.csv")
    acc = series[series["metric"] == "eval/accuracy"]
    assert len(acc.groupby(["init", "strategy"])) == 4  # 2 inits x 2 strategies
    for (init, strategy, epoch), row in acc.set_index(["init", "strategy", "epoch"]).iterrows():
        values = [v[epoch - 1] for (s, i, _), v in CURVES.items() if (s, i) == (strategy, init) and len(v) >= epoch]
        assert row["n"] == len(values)
        assert row["mean"] == pytest.approx(sum(values) / len(values))
        assert (row["min"], row["max"]) == (min(values), max(values))
    # none/copy at epoch 2 and 3: only seed 0 reached them
    assert acc[(acc["init"] == "copy") & (acc["strategy"] == "none")]["n"].tolist() == [2, 1, 1]
    assert (out / "curves_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "curves_loss.png").exists() is False  # curves of the reported (eval/) metrics only


def test_at_chance_is_the_one_sided_exact_binomial_test():
    values = [50.0, 53.75, 55.0, 57.5, 70.0]
    flags = [stats_.at_chance(v, BASELINE, ROWS) for v in values]
    for v, flag in zip(values, flags):
        k = round(v / 100 * ROWS)
        p = stats.binom.sf(k - 1, ROWS, BASELINE / 100)  # P(X >= k) under chance
        assert flag == (p >= stats_.AT_CHANCE_ALPHA), (v, p)
    assert flags == [True, True, True, False, False]
    assert [stats_.at_chance(v, BASELINE, None) for v in (50.0, 50.5)] == [True, False]  # no eval size: at or below


def test_report_warns_about_cells_at_chance(out):
    md = (out / "report.md").read_text()
    head = md.split("## Strategy robustness")[0]
    # random init: both none students (51.25 at epoch 3, 50.0 at epoch 3) at chance, both forward ones not
    assert "**Warning — init=random: 2 of 4 students at chance**" in head
    assert "init=copy" not in head
    assert f"not clearly above the majority class 50.00 on {ROWS} eval rows" in head
    table = md.split("Students at chance")[1]
    assert "| random | none | 2 | 2 | 3 |" in table and "| copy | none | 2 | 0 | 1–3 |" in table


def test_tables_keep_configurations_without_a_completed_trial(out):
    md = (out / "report.md").read_text()
    assert "| reverse | copy | no completed trial (1 failed) |" in md
    table = pd.read_csv(out / "table.csv")
    # rows: random init (none, forward), then copy (none: seed 1 stopped early, forward, reverse: failed)
    assert len(table) == 5 and table["eval/accuracy n"].tolist() == [2, 2, 1, 2, 0]


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, k, v) for k, v in attrs if k in ("src", "href", "srcset", "data", "action")]


def test_report_html_is_one_self_contained_file(study, out):
    text = (out / "report.html").read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(text)
    assert parser.refs and all(v.startswith("data:image/png;base64,") for _, _, v in parser.refs), parser.refs
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert parser.tags.count("img") == len(pngs) == (out / "report.md").read_text().count("![")
    assert "script" not in parser.tags and "a" not in parser.tags  # the description's HTML is text, links plain
    assert "&lt;script&gt;" in text and "teacher accuracy 99.06" in text
    assert "epochs: 3" in text  # the study file
    assert "Warning — init=random: 2 of 4 students at chance" in text
    assert text.index("The study") < text.index("Strategy robustness") < text.index("Learning curves")
    logged = {a.path for a in study.client.list_artifacts(study.parent_id, "report")}
    assert {"report/report.html", "report/trials.csv", "report/curves.csv", "report/curves_accuracy.png"} <= logged


def test_trials_frame_without_histories_is_empty_with_columns():
    df = pd.DataFrame({"run_id": ["r"], "trial_id": ["t"], "status": ["failed"], "seed": [0]})
    frame = curves.trials_frame(df, {"r": {}}, [])
    assert frame.empty and list(frame.columns) == ["trial", "run_id", "status", "seed", "epoch"]
    assert curves.curve_series(frame, "eval/accuracy", [], None).empty
