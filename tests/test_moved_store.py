"""A study folder that is copied or moved: MLflow's sqlite store keeps absolute artifact paths, so `tunekd report`
on a copy must never write into the original folder (issue 20, item 9). On synthetic stores (StudyTracker, no Ray,
no model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tunekd import plan, report, tracking
from tunekd.errors import ConfigError
from tunekd.study import load_study

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def study_folder(tmp_path, monkeypatch):
    """`orig/`: a finished study as `tunekd run` leaves it in its working directory (mlflow.db, mlruns/):
    forward and reverse x copy x seeds 0, 1, all completed."""
    orig = tmp_path / "orig"
    orig.mkdir()
    monkeypatch.chdir(orig)
    study = load_study(REPO / "search_spaces" / "quickstart.yaml",
                       ["name=moved", "search.distill.strategy.grid=[forward,reverse]", "search.student.init=null"])
    # (an absolute URI: MLflow caches a store by its URI, so a relative one would outlive this folder)
    tracker = tracking.StudyTracker(f"sqlite:///{orig / 'mlflow.db'}", study.experiment)
    tracker.start_parent("moved-run", {}, "name: moved\n", study=study)
    for i, (strategy, seed) in enumerate((("forward", 0), ("forward", 1), ("reverse", 0), ("reverse", 1))):
        t = study.trial({"distill.strategy": strategy, "seed": seed})
        tracker.start_trial(f"t{i}", plan.resolve(t, 6, True).params(t))
        for epoch in range(1, t.train.epochs + 1):
            tracker.log_trial_metrics(f"t{i}", {"eval/accuracy": 80.0 + i + epoch}, epoch)
        tracker.end_trial(f"t{i}", "completed")
    tracker.finish_parent("eval/accuracy", wall_s=1.0)
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert Path(exp.artifact_location).is_relative_to(orig.resolve())  # absolute, into orig/
    assert exp.tags[tracking.STORE_TAG] == str(orig.resolve())
    return orig


@pytest.mark.parametrize("tagged", [True, False])  # False: an experiment from before tunekd.store_dir
def test_report_on_a_copied_study_folder_never_writes_into_the_original(study_folder, tmp_path, monkeypatch,
                                                                       capsys, tagged):
    copy = tmp_path / "copy"
    shutil.copytree(study_folder, copy)
    uri = f"sqlite:///{copy / 'mlflow.db'}"
    if not tagged:
        c = tracking.client(uri)
        c.delete_experiment_tag(c.get_experiment_by_name("moved").experiment_id, tracking.STORE_TAG)
    before = snapshot(study_folder)
    monkeypatch.chdir(copy)
    assert report.main(["--experiment", "moved", "--tracking-uri", uri]) == 0
    err = capsys.readouterr().err
    assert "is a copy or move of the study folder" in err and str(study_folder.resolve()) in err
    assert "not logged to MLflow" in err
    assert snapshot(study_folder) == before  # the original folder: not a byte written
    assert (copy / "report" / "moved" / "report.md").is_file()  # written where the user is
    # a study run into the copied store would write into the original too: refused, one line
    with pytest.raises(ConfigError, match="copy or move of the study folder"):
        tracking.StudyTracker(uri, "moved")
    assert snapshot(study_folder) == before


def test_report_in_the_original_folder_logs_its_files(study_folder, capsys):
    """The check is not always on: in its own folder the report is logged on the parent run (artifacts report/)."""
    uri = f"sqlite:///{study_folder / 'mlflow.db'}"
    assert report.main(["--experiment", "moved", "--tracking-uri", uri]) == 0
    err = capsys.readouterr().err
    assert "copy or move" not in err and "logged on parent run" in err
    assert list(study_folder.glob("mlruns/*/*/artifacts/report/report.md"))
