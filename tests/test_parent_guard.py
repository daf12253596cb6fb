"""The study's MLflow parent run never stays RUNNING: a crash after it is created ends it FAILED with the
error as tag `tunekd.error`, Ctrl-C ends it KILLED (`StudyTracker.parent_guard`, used by `tunekd.run`)."""

from __future__ import annotations

import pytest
import yaml

from tunekd import run as cli
from tunekd.tracking import ERROR_TAG, StudyTracker


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating one costs seconds); each test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracker(store, request):
    return StudyTracker(store, request.node.name)


def _parent(tracker):
    return tracker.client.get_run(tracker.parent_id)


def test_crash_ends_parent_failed_with_the_error(tracker):
    tracker.start_parent("p", {"a": 1}, "name: x\n")
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.parent_guard():
            raise RuntimeError("boom")
    run = _parent(tracker)
    assert run.info.status == "FAILED"
    assert "RuntimeError: boom" in run.data.tags[ERROR_TAG]
    assert "Traceback" in run.data.tags[ERROR_TAG]


def test_ctrl_c_ends_parent_killed(tracker):
    tracker.start_parent("p", {}, "")
    with pytest.raises(KeyboardInterrupt):
        with tracker.parent_guard():
            raise KeyboardInterrupt
    run = _parent(tracker)
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags[ERROR_TAG]


def test_success_leaves_the_ending_to_the_caller(tracker):
    tracker.start_parent("p", {}, "")
    with tracker.parent_guard():
        pass
    assert _parent(tracker).info.status == "RUNNING"
    tracker.end_parent("FINISHED")
    assert _parent(tracker).info.status == "FINISHED" and ERROR_TAG not in _parent(tracker).data.tags


def test_no_parent_yet_is_a_no_op(tracker):
    with pytest.raises(ValueError):
        with tracker.parent_guard():
            raise ValueError("before the parent run exists")
    assert tracker.parent_id is None
    assert tracker.client.search_runs([tracker.experiment_id]) == []


# --- through tunekd.run.main: Ray and Tune replaced by stand-ins, the rest real -------------------


class _Result:
    metrics: dict = {}
    error = None
    config: dict = {}


class _Results(list):
    """A ResultGrid stand-in: one trial that neither terminated nor errored (Tune stopped on Ctrl-C)."""

    num_terminated = 0
    num_errors = 0


def _study(tmp_path, tiny_bert_dir, name):
    raw = {"name": name, "task": {"name": "synthetic", "synthetic": {"train_size": 16, "eval_size": 16},
                                     "max_length": 16},
           "teacher": {"model": str(tiny_bert_dir)}, "student": {"layers": 2}, "train": {"epochs": 1}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("fit, code, status, tag", [
    ("crash", None, "FAILED", "RuntimeError: tune exploded"),
    ("interrupted", 130, "KILLED", "interrupted (Ctrl-C)"),
])
def test_run_ends_parent(fit, code, status, tag, store, tmp_path, tiny_bert_dir, monkeypatch):
    from ray import tune

    monkeypatch.chdir(tmp_path)

    class FakeTuner:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            if fit == "crash":
                raise RuntimeError("tune exploded")
            return _Results([_Result()])

    from tunekd.driver import StudyDriver

    monkeypatch.setattr(StudyDriver, "connect", lambda self: None)  # no Ray: the Tuner below is a stand-in
    monkeypatch.setattr(tune, "Tuner", FakeTuner)
    monkeypatch.setattr(tune, "with_parameters", lambda trainable, **kw: trainable)
    monkeypatch.setattr(tune, "with_resources", lambda trainable, resources: trainable)
    study = _study(tmp_path, tiny_bert_dir, f"guard-{fit}")
    argv = [str(study), "--tracking-uri", store]
    if code is None:
        with pytest.raises(RuntimeError, match="tune exploded"):
            cli.main(argv)
    else:
        assert cli.main(argv) == code
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(f"guard-{fit}")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`tunekd.role` = 'study'")
    assert parent.info.status == status
    assert tag in parent.data.tags[ERROR_TAG]
