"""Issue 13: what a researcher reads — trial names and descriptions in MLflow, the parent run's summary,
the teacher sanity check, the `tunekd` command (list, compare), progress bars, the LaTeX table.
All on synthetic sqlite stores; no Ray, no model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tunekd import describe, plan, report
from tunekd.errors import ConfigError
from tunekd.study import load_study

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"


def _study(*overrides):
    return load_study(QUICKSTART, ["name=ux", "train.epochs=4", *overrides])  # the fixtures below log 4 epochs


def _params(study, point):
    t = study.trial(point)
    return plan.resolve(t, 6, True).params(t)


# --- names -------------------------------------------------------------------------------------


def test_trial_name_fixed_parts_and_varying_dims():
    study = _study("search.train.lr.grid=[0.0001,0.0002]")
    p = _params(study, {"student.init": "copy", "distill.strategy": "forward", "train.lr": 2e-4})
    assert describe.trial_name(p, list(study.search)) == "forward·copy·S3·λ3·s0·lr=0.0002"
    # MLflow gives params back as strings: the same name
    assert describe.trial_name({k: describe._value(v) if not isinstance(v, str) else v for k, v in p.items()},
                               list(study.search)) == "forward·copy·S3·λ3·s0·lr=0.0002"
    explicit = dict(p, **{"distill.strategy": [[1, 2], [2, 4]]})
    assert describe.trial_name(explicit).startswith("map·copy")


def test_unique_name():
    assert describe.unique_name("a", []) == "a"
    assert describe.unique_name("a", ["a"]) == "a#2"
    assert describe.unique_name("a", ["a", "a#2"]) == "a#3"


def test_layer_map_text():
    assert describe.layer_map_text("[[0, 0], [1, 2], [2, 4]]") == "0←0, 1←2, 2←4"
    assert describe.layer_map_text([]).startswith("–")


def test_dry_run_lines_show_maps_epochs_outputs():
    study = _study()
    trials = [(pt, study.trial(pt), plan.resolve(study.trial(pt), 6, True))
              for pt in [{"student.init": "copy", "distill.strategy": "reverse"}]]
    text = "\n".join(describe.dry_run_lines(study, trials))
    assert "reverse·copy·S3·λ3·s0" in text
    assert "map 0←0, 1←6, 2←4, 3←2" in text  # SPEC.md's reverse map for 6 → 3 (embeddings matched)
    from tunekd import mapping

    copied = mapping.copy_layer_indices("forward", 6, 3)  # modules 1, 3, 5: teacher layers 2, 4, 6 (1-based)
    assert f"{study.train.epochs} epochs" in text and f"copies teacher layers {','.join(str(i + 1) for i in copied)}" in text
    assert "copies teacher layers 2,4,6" in text and "(0-based)" not in text and describe.NUMBERING in text
    assert str(Path("mlflow.db").resolve()) in text and str(Path("ray_results").resolve()) in text


# --- the tracker -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A study recorded by StudyTracker: 4 trials (2 completed, 1 early-stopped, 1 failed)."""
    from tunekd.tracking import StudyTracker

    study = _study("search.seed.grid=[0,1]")
    tmp_path = tmp_path_factory.mktemp("ux")
    tracker = StudyTracker(f"sqlite:///{tmp_path}/mlflow.db", study.experiment)
    text = QUICKSTART.read_text()
    tracker.start_parent("ux-run", {"overrides": ["name=ux"]}, text, study=study, study_file=str(QUICKSTART),
                         command=["tunekd", "run", str(QUICKSTART), "--set", "name=ux"],
                         tags={"tunekd.teacher.sanity": "ok"})
    tracker.log_parent_metrics({"teacher/accuracy": 93.25})
    plan_ = [({"student.init": "copy", "distill.strategy": "forward", "seed": 0}, "completed", 81.0),
             ({"student.init": "copy", "distill.strategy": "forward", "seed": 1}, "completed", 84.5),
             ({"student.init": "random", "distill.strategy": "reverse", "seed": 0}, "early_stopped", 60.0),
             ({"student.init": "random", "distill.strategy": "none", "seed": 1}, "failed", None)]
    for i, (point, status, acc) in enumerate(plan_):
        tid = f"t{i}"
        tracker.start_trial(tid, _params(study, point))
        if acc is not None:
            for e in range(1, (4 if status == "completed" else 1) + 1):
                tracker.log_trial_metrics(tid, {"eval/accuracy": acc - 4 + e}, e)
        tracker.end_trial(tid, status, error="Traceback\nRuntimeError: non-finite loss at step 3"
                          if status == "failed" else None)
    summary = tracker.finish_parent("eval/accuracy", wall_s=42.0)
    return tracker, study, summary


def test_child_runs_named_described_and_statused(tracked):
    tracker, _, _ = tracked
    c = tracker.client
    runs = {r.info.run_name: r for r in c.search_runs([tracker.experiment_id],
                                                      f"tags.`mlflow.parentRunId` = '{tracker.parent_id}'")}
    assert set(runs) == {"forward·copy·S3·λ3·s0", "forward·copy·S3·λ3·s1", "reverse·random·S3·λ3·s0",
                         "none·random·S3·λ3·s1"}
    status = {n: (r.info.status, r.data.tags["tunekd.status"]) for n, r in runs.items()}
    assert status["forward·copy·S3·λ3·s0"] == ("FINISHED", "completed")
    assert status["reverse·random·S3·λ3·s0"] == ("KILLED", "early_stopped")
    assert status["none·random·S3·λ3·s1"] == ("FAILED", "failed")
    note = runs["reverse·random·S3·λ3·s0"].data.tags["mlflow.note.content"]
    assert "stopped early by the scheduler after 1/4 epochs" in note
    assert "0←0, 1←6, 2←4, 3←2" in note and "eval/accuracy 57.00" in note
    assert "1-based as in the paper" in note and "0-based" not in note
    copy_note = runs["forward·copy·S3·λ3·s0"].data.tags["mlflow.note.content"]
    assert "Layer map (student layer ← teacher layer): 0←0, 1←2, 2←4, 3←6" in copy_note
    assert "Copied teacher layers: 2, 4, 6" in copy_note  # the forward map's teacher layers, one numbering
    assert "non-finite loss at step 3" in runs["none·random·S3·λ3·s1"].data.tags["mlflow.note.content"]


def test_parent_summary_best_counts_artifacts(tracked, tmp_path):
    tracker, study, summary = tracked
    run = tracker.client.get_run(tracker.parent_id)
    tags, metrics = run.data.tags, run.data.metrics
    # best completed trial by hand: seed 1 ends at 84.5 - 4 + 4
    assert summary["best_name"] == tags["tunekd.best.name"] == "forward·copy·S3·λ3·s1"
    assert float(tags["tunekd.best.value"]) == 84.5 and metrics["best/accuracy"] == 84.5
    assert tags["tunekd.best.run_id"] == tracker.trials["t1"].run_id
    assert (tags["tunekd.trials.completed"], tags["tunekd.trials.early_stopped"], tags["tunekd.trials.failed"]) \
        == ("2", "1", "1")
    assert metrics["trials/completed"] == 2 and metrics["study/wall_s"] == 42.0
    assert run.info.status == "FINISHED"
    note = tags["mlflow.note.content"]
    assert "tunekd run" in note and "--set name=ux" in note and "accuracy 93.25" in note
    assert "1 early_stopped" in note and "forward·copy·S3·λ3·s1" in note
    import tunekd

    assert tags["tunekd.version"] == tunekd.__version__
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    # the resolved study (name after --set) and the original file
    out = tmp_path / "art"
    tracker.client.download_artifacts(tracker.parent_id, "", str(out))
    resolved = yaml.safe_load((out / "study.yaml").read_text())
    assert resolved["name"] == "ux" and resolved["search"]["seed"] == {"grid": [0, 1], "choice": None,
                                                                      "uniform": None, "loguniform": None,
                                                                      "randint": None}
    assert (out / "study.original.yaml").read_text() == QUICKSTART.read_text()


def test_shared_view_and_ui_url(tracked):
    tracker, _, _ = tracked
    url = tracker.ui_url()
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs?viewStateShareKey=")
    exp = tracker.client.get_experiment(tracker.experiment_id)
    state = json.loads(exp.tags[f"mlflow.sharedViewState.tunekd-{tracker.parent_id}"])
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{tracker.parent_id}'"
    assert state["selectedColumns"][:2] == ["tags.`tunekd.status`", "metrics.`eval/accuracy`"]
    # the parent row's teacher and best metric, the trials' epochs: columns of metrics the runs hold
    assert {"metrics.`teacher/accuracy`", "metrics.`best/accuracy`", "metrics.`train/epochs`"} <= set(
        state["selectedColumns"])
    parent = tracker.client.get_run(tracker.parent_id).data.metrics
    assert parent["teacher/accuracy"] == 93.25 and parent["best/accuracy"] == 84.5
    for rec in tracker.trials.values():  # train/epochs is the step of every epoch: 1, 2, ... up to the last
        history = tracker.client.get_metric_history(rec.run_id, "train/epochs")
        assert [(m.step, m.value) for m in history] == [(e, float(e)) for e in range(1, rec.last_step + 1)]
    assert state["columnWidths"]["tags.`tunekd.status`"] >= 280 and state["runsHiddenMode"] == "SHOW_ALL"
    grouped = json.loads(exp.tags[f"mlflow.sharedViewState.tunekd-{tracker.parent_id}-by-strategy"])
    # one group per cell: strategy x the other searched values but the seed (here the init)
    assert grouped["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "distill.strategy"},
                                                 {"mode": "param", "groupByData": "student.init"}]
    assert grouped["selectedColumns"] == state["selectedColumns"] and grouped["useGroupedValuesInCharts"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    lines = tracker.ui_command().splitlines()  # pasteable: a command, then comment lines with the links
    assert lines[0] == f"mlflow ui --backend-store-uri {tracker.uri}"
    assert lines[1] == f"# then open: {url}" and lines[2].endswith(f"viewStateShareKey=tunekd-{tracker.parent_id}-by-strategy")


def test_git_commit_outside_a_repository(tmp_path):
    from tunekd.tracking import git_commit

    f = tmp_path / "study.yaml"
    f.write_text("x: 1\n")
    assert git_commit(f) is None


# --- the teacher sanity check ------------------------------------------------------------------


def _binom_sf(k, n, p):
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


class _Split:
    def __init__(self, labels):
        self.arrays = {"labels": np.asarray(labels)}


def test_teacher_sanity_against_hand_binomial():
    from tunekd.tasks import get_task
    from tunekd.teacher import teacher_sanity

    spec = get_task("sst2")
    encoded = {"train": _Split([0, 1]), spec.eval_splits[0]: _Split([1] * 40 + [0] * 24)}  # majority 62.5 %
    at_chance = teacher_sanity(spec, encoded, {"accuracy": 62.5})
    assert at_chance.baseline == 62.5 and at_chance.rows == 64 and not at_chance.ok
    assert at_chance.p_value == pytest.approx(_binom_sf(40, 64, 0.625), rel=1e-9)
    good = teacher_sanity(spec, encoded, {"accuracy": 50 / 64 * 100})
    assert good.p_value == pytest.approx(_binom_sf(50, 64, 0.625), rel=1e-9) and good.ok
    assert teacher_sanity(get_task("wmt16_en_ro"), encoded, {"bleu": 1.0}) is None


def test_check_teacher_warns_tags_or_errors():
    from tunekd.tasks import get_task
    from tunekd.teacher import check_teacher

    spec = get_task("sst2")
    encoded = {spec.eval_splits[0]: _Split([0, 1] * 32)}
    logged = []
    tags = check_teacher(_study(), spec, encoded, {"accuracy": 50.0}, log=logged.append)
    assert tags["tunekd.teacher.sanity"] == "at_chance" and logged[0].startswith("WARNING: teacher accuracy 50.00")
    with pytest.raises(ConfigError, match="not clearly above the majority-class level 50.00"):
        check_teacher(_study("teacher.sanity=error"), spec, encoded, {"accuracy": 50.0}, log=logged.append)
    assert check_teacher(_study("teacher.sanity=off"), spec, encoded, {"accuracy": 50.0}) == {}


# --- the study file ------------------------------------------------------------------------------


def test_set_removing_a_missing_search_dimension_is_an_error():
    with pytest.raises(ConfigError, match=r"no search dimension 'distill\.lambda'.*did you mean"):
        _study("search.distill.lambda=null")
    assert "distill.strategy" not in _study("search.distill.strategy=null").search


# --- progress --------------------------------------------------------------------------------------


def test_study_progress_counts_and_quiet_without_tty(capsys, monkeypatch):
    from tunekd.progress import StudyProgress, enabled

    monkeypatch.delenv("TUNEKD_PROGRESS", raising=False)
    assert not enabled()  # pytest's stderr is not a terminal
    p = StudyProgress(3)
    for t in ("a", "b", "c"):
        p.started(t)
    p.ended("a", "completed")
    p.ended("b", "early_stopped")
    p.ended("b", "early_stopped")  # reported twice: counted once
    assert p.counts() == {"running": 1, "completed": 1, "early_stopped": 1, "failed": 0}
    assert p.done == 2
    p.close()
    assert capsys.readouterr().err == ""


def test_study_progress_forced_on_draws_a_bar(capsys, monkeypatch):
    from tunekd.progress import StudyProgress

    monkeypatch.setenv("TUNEKD_PROGRESS", "1")
    p = StudyProgress(2, "ux")
    p.started("a")
    p.ended("a", "failed")
    p.close()
    err = capsys.readouterr().err
    assert "ux" in err and "1/2" in err and "failed 1" in err


# --- the tunekd command ----------------------------------------------------------------------------


def test_tunekd_list_and_compare(tracked, tmp_path, capsys):
    from tunekd import cli

    tracker, _, _ = tracked
    assert cli.main(["list", "--tracking-uri", tracker.uri]) == 0
    out = capsys.readouterr().out
    assert "## ux" in out and "ux-run" in out and "1 early_stopped" in out and "2 completed" in out
    assert "accuracy 84.50 (forward·copy·S3·λ3·s1)" in out and "accuracy 93.25" in out

    # a second study in the same store, forward only: compare joins on strategy and init
    from tunekd.tracking import StudyTracker

    other = StudyTracker(tracker.uri, "ux-b")
    study = _study("name=ux-b", "search.seed.grid=[0,1]")
    other.start_parent("b", {}, "", study=study)
    for i, (seed, acc) in enumerate(((0, 82.0), (1, 86.0))):
        other.start_trial(f"b{i}", _params(study, {"student.init": "copy", "distill.strategy": "forward", "seed": seed}))
        other.log_trial_metrics(f"b{i}", {"eval/accuracy": acc}, 4)
        other.end_trial(f"b{i}", "completed")
    other.finish_parent("eval/accuracy", wall_s=1.0)
    md = tmp_path / "cmp.md"
    assert cli.main(["compare", "ux", "ux-b", "--tracking-uri", tracker.uri, "--out", str(md)]) == 0
    out = capsys.readouterr().out
    # ux: forward/copy final 81, 84.5 -> mean 82.75, sd 2.47; ux-b: 82, 86 -> 84.00, 2.83; Δ = +1.25
    sd_a, sd_b = np.std([81.0, 84.5], ddof=1), np.std([82.0, 86.0], ddof=1)
    row = [ln for ln in out.splitlines() if ln.startswith("| forward | copy |")][0]
    assert f"82.75 ± {sd_a:.2f} (2)" in row and f"84.00 ± {sd_b:.2f} (2)" in row and "+1.25" in row
    assert md.read_text().strip() in out
    assert cli.main(["compare", "ux", "nope", "--tracking-uri", tracker.uri]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    # the same study twice would merge its two columns into one: refused, one line
    assert cli.main(["compare", "ux", "ux", "--tracking-uri", tracker.uri]) == 2
    captured = capsys.readouterr()
    assert not captured.out and len(captured.err.strip().splitlines()) == 1 and "same study 'ux'" in captured.err


COMMANDS = ("run", "report", "plan", "angles", "list", "compare")


def _help(command: str, capsys) -> str:
    from tunekd import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_usage_line_names_the_tunekd_command(command, capsys):
    assert _help(command, capsys).startswith(f"usage: tunekd {command} ")


def test_help_examples_run_as_written(capsys):
    """Every `tunekd ...` example of `tunekd --help` and the commands' helps parses with that command's own
    parser, names files that exist in the repository, and only studies an example creates (the quickstart's
    file, `--set name=...`) — so that they run as written, in this order, from the repository root."""
    import importlib
    import shlex

    from tunekd import cli

    texts = []
    assert cli.main(["--help"]) == 0
    texts.append(capsys.readouterr().out)
    texts += [_help(c, capsys) for c in COMMANDS]
    examples = [ln.split("#", 1)[0].strip() for text in texts for ln in text.splitlines()
                if ln.startswith("  tunekd ")]
    assert len(examples) >= 10
    created, named = set(), []
    for line in examples:
        command, *args = shlex.split(line)[1:]
        module, _, _ = cli.COMMANDS[command]
        parse = {"list": "parse_list", "compare": "parse_compare"}.get(command, "parse_args")
        ns = getattr(importlib.import_module(module), parse)(args)
        if hasattr(ns, "study"):
            assert (REPO / ns.study).is_file(), line
        if command == "run":
            sets = dict(s.split("=", 1) for s in ns.overrides)
            created.add(sets.get("name", yaml.safe_load((REPO / ns.study).read_text())["name"]))
        named += {"report": [getattr(ns, "experiment", None)], "compare": [getattr(ns, "a", None), getattr(ns, "b", None)],
                  "angles": [getattr(ns, "best", None)], "plan": [getattr(ns, "sd_from", None)]}.get(command, [])
    assert {"quickstart", "quickstart-lambda1"} <= created
    assert {n for n in named if n} <= created, (named, created)


def test_tunekd_help_and_module_entry():
    proc = subprocess.run([sys.executable, "-m", "tunekd", "--help"], capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0
    for word in ("run", "report", "angles", "list", "compare", "./mlflow.db", "./ray_results"):
        assert word in proc.stdout


def test_report_help_has_no_double_percent(capsys):
    with pytest.raises(SystemExit):
        report.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "with t intervals" in text and "%%" not in text and "table.tex" in text


def test_run_help_names_outputs(capsys):
    from tunekd import run

    with pytest.raises(SystemExit):
        run.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "./mlflow.db" in text and "./ray_results" in text and ".tunekd_cache/teachers" in text


def test_address_error_once_and_names_ray_address(monkeypatch):
    from tunekd import driver, run

    seen = {}

    class Recorder:  # the driver the CLI builds: only its options matter here
        def __init__(self, study, options):
            seen["options"] = options

        def run(self):
            return 0

    monkeypatch.setattr(driver, "StudyDriver", Recorder)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens on port 1
    repo = Path(__file__).resolve().parents[1]
    assert run.main([str(repo / "search_spaces" / "quickstart.yaml")]) == 0
    options = seen["options"]
    assert (options.address, options.address_source) == ("127.0.0.1:1", "RAY_ADDRESS")
    with pytest.raises(ConfigError) as exc:
        driver.connect_ray(options.address, None, source=options.address_source)
    text = str(exc.value)
    assert text.count("cannot reach") == 1 and "(from RAY_ADDRESS)" in text


# --- the report's LaTeX table and plots ----------------------------------------------------------


def test_latex_table_booktabs_and_n1(tmp_path):
    rows = []
    for strategy, init, seed, acc in [("forward", "copy", 0, 80.0), ("forward", "copy", 1, 82.0),
                                      ("reverse", "copy", 0, 81.0), ("reverse", "copy", 1, 83.5),
                                      ("all_to_one", "random", 0, 70.0)]:
        rows.append({"run_id": f"r{len(rows)}", "parent_id": "p", "trial_id": f"t{len(rows)}", "status": "completed",
                     "error": None, "start_time": len(rows), "distill.strategy": strategy, "student.init": init,
                     "seed": seed, "eval/accuracy": acc})
    df = pd.DataFrame(rows)
    text, files = report.build_report(df, experiment="ux", out=tmp_path, reference="forward")
    tex = (tmp_path / "table.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    # forward/copy: mean 81, sd sqrt(2); all_to_one/random has one seed: no ± at all
    assert f"$81.00 \\pm {math.sqrt(2):.2f}$ (2)" in tex
    assert "all\\_to\\_one & random & $70.00$ (1)" in tex
    # reverse - forward on copy: d = 1, 1.5 -> mean +1.25
    assert "reverse & copy & final & 2 & $+1.25$" in tex  # the epoch compared, then n
    assert {p.name for p in files} >= {"table.tex", "paired_accuracy.png", "strategies_accuracy.png"}
    assert (tmp_path / "paired_accuracy.png").read_bytes()[:4] == b"\x89PNG"
