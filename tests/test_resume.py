"""Integrity of checkpoints and resume (issue 12, parts 1-2): a restored trial equals an uninterrupted one;
a finished trial keeps no optimizer state and its weights only among the best `tune.keep_students`;
`--resume` refuses a changed study (unless --resume-force, which records the change), never reads Ray state
from outside the study's storage, and fails in seconds, creating nothing, when there is nothing to resume.
All without Ray but the one small study at the end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tunekd import checkpoints
from tunekd.errors import ConfigError
from tunekd.study import Study

pytestmark = pytest.mark.usefixtures("one_thread")


def trial_study(epochs=3, **tune) -> Study:
    return Study.model_validate({
        "name": "t", "task": {"name": "synthetic", "max_length": 32}, "teacher": {"model": "minilm"},
        "student": {"layers": 2, "init": "copy"},
        "distill": {"strategy": "forward", "alpha_ce": 0.5, "alpha_kl": 1.0, "lambda_hid": 1.0},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 1e-3}, "tune": tune})


class Stop(Exception):
    pass


def _comparable(history):
    return [{k: v for k, v in h.items() if k.startswith(("train/", "eval/")) or k == "epoch"} for h in history]


# --- checkpoints -------------------------------------------------------------------------------------


def test_restored_trial_equals_uninterrupted_one(family, teacher, encoded, tmp_path):
    """3 epochs straight vs 1 epoch, checkpoint, a fresh `run_trial` restored from it for epochs 2-3: the
    same losses and metrics to the last bit (same weights, optimizer, scheduler, RNG and data order).
    Without the RNG states (dropout draws) the numbers differ: the test can tell."""
    from tunekd.trainable import make_shared, run_trial

    shared = make_shared(trial_study(3), family.name, teacher, encoded)
    straight = run_trial({}, shared)

    def stop_after_first(metrics, folder):
        assert metrics["epoch"] == 1 and folder is not None
        shutil.copytree(folder, tmp_path / "ckpt1")
        raise Stop

    with pytest.raises(Stop):
        run_trial({}, shared, report=stop_after_first)
    assert sorted(p.name for p in (tmp_path / "ckpt1").iterdir()) == sorted(
        [checkpoints.WEIGHTS, checkpoints.OPTIM, checkpoints.RNG, checkpoints.PROGRESS])
    assert json.loads((tmp_path / "ckpt1" / checkpoints.PROGRESS).read_text())["epoch"] == 1
    torch.rand(1000)  # the global RNG moves on in between; the checkpoint's states must win
    resumed = run_trial({}, shared, restore_dir=str(tmp_path / "ckpt1"))
    assert [h["epoch"] for h in resumed] == [2, 3]
    assert _comparable(resumed) == _comparable(straight[1:])

    shutil.copytree(tmp_path / "ckpt1", tmp_path / "no_rng")
    (tmp_path / "no_rng" / checkpoints.RNG).unlink()
    torch.manual_seed(12345)
    progress = json.loads((tmp_path / "no_rng" / checkpoints.PROGRESS).read_text())
    del progress["files"][checkpoints.RNG]
    (tmp_path / "no_rng" / checkpoints.PROGRESS).write_text(json.dumps(progress))
    other = run_trial({}, shared, restore_dir=str(tmp_path / "no_rng"))
    assert other[0]["train/loss"] != resumed[0]["train/loss"]


def test_checkpoint_every_and_the_last_epoch_has_no_optimizer_state(family, teacher, encoded, tmp_path):
    from tunekd.trainable import make_shared, run_trial

    shared = make_shared(trial_study(3, checkpoint_every=2), family.name, teacher, encoded)
    seen = {}

    def report(metrics, folder):
        seen[metrics["epoch"]] = sorted(p.name for p in Path(folder).iterdir()) if folder else None
        assert metrics["perf/checkpoint_s"] >= 0

    history = run_trial({}, shared, report=report)
    assert seen[1] is None  # epoch 1: no checkpoint
    assert checkpoints.OPTIM in seen[2] and checkpoints.RNG in seen[2]
    assert seen[3] == sorted([checkpoints.WEIGHTS, checkpoints.PROGRESS])  # the result: weights only
    assert history[-1]["perf/checkpoint_s"] > 0


def _fake_checkpoint(folder: Path, epoch: int, weights: bytes = b"w" * 100) -> Path:
    folder.mkdir(parents=True)
    (folder / checkpoints.WEIGHTS).write_bytes(weights)
    (folder / checkpoints.OPTIM).write_bytes(b"o" * 200)
    (folder / checkpoints.RNG).write_bytes(b"r" * 10)
    files = {n: (folder / n).stat().st_size for n in (checkpoints.WEIGHTS, checkpoints.OPTIM, checkpoints.RNG)}
    (folder / checkpoints.PROGRESS).write_text(json.dumps({"epoch": epoch, "step": 4 * epoch, "files": files}))
    return folder


def test_restore_starts_from_the_checkpoint_tune_names_not_a_newer_one(tmp_path, monkeypatch):
    """A worker writes checkpoint_000001 (epoch 2), the driver is killed before it sees that epoch: Tune's
    saved state names checkpoint_000000. The trial must retrain epoch 2 (so MLflow gets step 2), not skip it."""
    from ray import tune

    from tunekd import trainable

    named = _fake_checkpoint(tmp_path / "trial" / "checkpoint_000000", 1)
    _fake_checkpoint(tmp_path / "trial" / "checkpoint_000001", 2)
    seen = []
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(named)))
    monkeypatch.setattr(trainable, "run_trial", lambda config, shared, report, restore_dir=None: seen.append(
        json.loads((Path(restore_dir) / checkpoints.PROGRESS).read_text())["epoch"]))
    trainable.tune_trainable({}, shared=None)
    assert seen == [1]


def test_load_refuses_a_torn_checkpoint(tmp_path):
    torn = _fake_checkpoint(tmp_path / "torn", 2)
    (torn / checkpoints.OPTIM).write_bytes(b"o" * 50)  # a crash mid-copy: not the size progress.json records
    with pytest.raises(RuntimeError, match=r"incomplete: optim.pt is not the size progress.json records"):
        checkpoints.load(torn, None, None)
    gone = _fake_checkpoint(tmp_path / "gone", 2)
    (gone / checkpoints.WEIGHTS).unlink()
    with pytest.raises(RuntimeError, match=r"incomplete: model.safetensors is missing"):
        checkpoints.load(gone, None, None)
    cut = _fake_checkpoint(tmp_path / "cut", 2)
    (cut / checkpoints.PROGRESS).unlink()  # an upload killed before its last file
    with pytest.raises(RuntimeError, match=r"incomplete: progress.json is missing"):
        checkpoints.load(cut, None, None)


def test_finished_trials_keep_weights_of_the_best_only(tmp_path):
    scores = {"a": 50.0, "b": 75.0, "c": float("nan"), "d": 60.0, "failed": None}
    for name, score in scores.items():
        _fake_checkpoint(tmp_path / name / "checkpoint_000001", 2)
        checkpoints.finish_trial(tmp_path / name, score)
    _fake_checkpoint(tmp_path / "running" / "checkpoint_000000", 1)  # not finished: untouched
    kept = checkpoints.prune_students(tmp_path, 10)  # room for all: the unscored (NaN, failed) keep nothing
    assert sorted(p.parent.name for p in kept) == ["a", "b", "d"]
    kept = checkpoints.prune_students(tmp_path, 2)
    assert sorted(p.parent.name for p in kept) == ["b", "d"]
    weights = sorted(p.parent.parent.name for p in tmp_path.glob(f"*/*/{checkpoints.WEIGHTS}"))
    assert weights == ["b", "d", "running"]
    assert sorted(p.parent.parent.name for p in tmp_path.glob(f"*/*/{checkpoints.OPTIM}")) == ["running"]
    assert not list(tmp_path.glob(f"[abcdf]*/*/{checkpoints.RNG}"))
    assert checkpoints.prune_students(tmp_path, 0) == [] and not list(tmp_path.glob(f"[abcdf]*/*/{checkpoints.WEIGHTS}"))


# --- the fingerprint --------------------------------------------------------------------------------


def write_study(tmp_path, teacher_dir, name="resume", **edits) -> Path:
    raw = {
        "name": name,
        "task": {"name": "synthetic", "synthetic": {"train_size": 64, "eval_size": 32}, "max_length": 16},
        "teacher": {"model": str(teacher_dir)},
        "student": {"layers": 2, "init": "copy"},
        "train": {"epochs": 4, "batch_size": 16, "lr": 1e-3},
        "tune": {"resources": {"cpu": 1}, "scheduler": "fifo", "storage_path": str(tmp_path / "ray_results")},
    }
    for key, value in edits.items():
        raw[key].update(value)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fingerprint_of(path, *overrides, uri="sqlite:///unused.db"):
    from tunekd.driver import RunOptions, StudyDriver
    from tunekd.study import load_study

    study = load_study(str(path), list(overrides))
    study = study.model_copy(update={"tracking": study.tracking.model_copy(update={"uri": uri})})
    driver = StudyDriver(study, RunOptions(study_file=str(path)), log=lambda m: None)
    driver.setup_task()
    return driver, driver.fingerprint()


def test_fingerprint_names_what_changed(tmp_path, tiny_bert_dir):
    from tunekd.resume import changes, digest

    path = write_study(tmp_path, tiny_bert_dir)
    _, base = fingerprint_of(path)
    _, again = fingerprint_of(path, "tune.max_concurrent_trials=3", "train.save_model=true")  # operational only
    assert digest(base) == digest(again)
    _, epochs = fingerprint_of(path, "train.epochs=6")
    assert changes(base, epochs) == ["train.epochs 4 → 6"]
    _, size = fingerprint_of(path, "task.synthetic.train_size=80")
    found = changes(base, size)
    assert found[0] == "task.synthetic.train_size 64 → 80" and found[1].startswith("the task data (data_digest")
    assert base["data_digest"] != size["data_digest"] and base["teacher_digest"] == size["teacher_digest"]


def fake_parent(tmp_path, path, uri, *, ray_path=None):
    """A parent run as `setup_tracking` records it (tags, fingerprint artifact) and a Ray state folder,
    without running the study (tuner.pkl is a placeholder that these tests never let Tune read)."""
    from tunekd.tracking import StudyTracker

    driver, parts = fingerprint_of(path, uri=uri)
    from tunekd.resume import FINGERPRINT_FILE, FINGERPRINT_TAG, RAY_PATH_TAG, digest

    ray_path = Path(ray_path or tmp_path / "ray_results" / "resume-20260101-000000")
    ray_path.mkdir(parents=True, exist_ok=True)
    (ray_path / "tuner.pkl").write_bytes(b"not a pickle")
    tracker = StudyTracker(uri, driver.study.experiment)
    parent = tracker.start_parent("resume-1", {}, path.read_text(),
                                  tags={RAY_PATH_TAG: str(ray_path), FINGERPRINT_TAG: digest(parts)})
    tracker.client.log_dict(parent, parts, FINGERPRINT_FILE)
    tracker.end_parent("KILLED")
    return parent


def test_resume_refuses_a_changed_study_and_force_records_it(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    from tunekd import run as cli
    from tunekd.driver import RunOptions, StudyDriver
    from tunekd.resume import FORCED_TAG
    from tunekd.study import load_study
    from tunekd.tracking import StudyTracker

    monkeypatch.chdir(tmp_path)  # the artifact store (./mlruns) of this sqlite store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_study(tmp_path, tiny_bert_dir)
    parent = fake_parent(tmp_path, path, uri)

    for override, key in (("train.epochs=6", "train.epochs 4 → 6"),
                          ("task.synthetic.train_size=80", "task.synthetic.train_size 64 → 80")):
        capsys.readouterr()
        code = cli.main([str(path), "--resume", "--tracking-uri", uri, "--set", override])
        err = capsys.readouterr().err
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and "--resume-force" in lines[0], err

    # --resume-force: the steps up to the parent run (no Ray): the change is recorded on it
    study = load_study(str(path), ["train.epochs=6"])
    study = study.model_copy(update={"tracking": study.tracking.model_copy(update={"uri": uri})})
    driver = StudyDriver(study, RunOptions(study_file=str(path), resume="latest", resume_force=True),
                         log=lambda m: None)
    driver.find_resume()
    driver.setup_task()
    driver.preflight()
    driver.check_resume()
    assert driver.resume_change == "the study changed: train.epochs 4 → 6"
    driver.tracker = StudyTracker(uri, study.experiment)
    driver.setup_tracking()
    run = driver.tracker.client.get_run(parent)
    assert "train.epochs 4 → 6" in run.data.tags[FORCED_TAG]
    arts = [a.path for a in driver.tracker.client.list_artifacts(parent, "resumed")]
    assert len(arts) == 1 and arts[0].endswith("fingerprint.json")
    driver.tracker.end_parent("KILLED")

    # the unchanged study passes the check
    same = StudyDriver(driver.study.model_copy(update={"train": driver.study.train.model_copy(update={"epochs": 4})}),
                       RunOptions(resume="latest"), log=lambda m: None)
    same.find_resume()
    same.setup_task()
    same.check_resume()
    assert same.resume_change is None


def test_resume_refuses_a_ray_path_outside_the_storage(tmp_path, tiny_bert_dir, monkeypatch):
    from tunekd.resume import check_under, find_resumable

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_study(tmp_path, tiny_bert_dir)
    fake_parent(tmp_path, path, uri, ray_path=tmp_path / "elsewhere" / "x")  # e.g. a tag someone rewrote
    with pytest.raises(ConfigError, match=r"tunekd.ray_path .* is not under this study's tune.storage_path"):
        find_resumable(uri, "resume", str(tmp_path / "ray_results"))
    storage = tmp_path / "ray_results"
    with pytest.raises(ConfigError, match="not under"):
        check_under(str(storage / ".." / "elsewhere" / "x"), str(storage))
    storage.mkdir(exist_ok=True)
    (storage / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not under"):
        check_under(str(storage / "link" / "x"), str(storage))
    assert check_under(str(storage / "a" / ".." / "b"), str(storage)) == str(storage.resolve() / "b")


@pytest.mark.parametrize("store", ["absent", "empty"])
def test_resume_with_nothing_to_resume_fails_fast_and_creates_nothing(tmp_path, tiny_bert_dir, store):
    path = write_study(tmp_path, tiny_bert_dir)
    db = tmp_path / "mlflow.db"
    if store == "empty":  # a store without this study's experiment
        from tunekd.tracking import client

        client(f"sqlite:///{db}").create_experiment("other")
    before = sorted(p.name for p in tmp_path.iterdir())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunekd.run", str(path), "--resume", "--tracking-uri",
                           f"sqlite:///{db}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0], proc.stderr
    assert ("no tracking store" if store == "absent" else "experiment 'resume' does not exist") in lines[0]
    assert "ray:" not in proc.stdout and "teacher" not in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no mlflow.db, ray_results, cache, mlruns
    if store == "empty":
        from tunekd.tracking import client

        assert client(f"sqlite:///{db}").get_experiment_by_name("resume") is None
    assert took < 5.0, took
    print(f"--resume with nothing to resume ({store} store): {took:.2f} s")


# --- one small study on the session's Ray: the disk bound --------------------------------------------


def test_finished_study_keeps_no_optimizer_state_and_best_weights_only(tmp_path, tiny_bert_dir, study_cli,
                                                                      mlflow_uri):
    from tests.helpers import runs

    path = write_study(tmp_path, tiny_bert_dir, name="resume_disk", train={"epochs": 2},
                       tune={"keep_students": 1, "max_concurrent_trials": 2})
    study = yaml.safe_load(path.read_text())
    study["search"] = {"train.lr": {"grid": [1e-4, 1e-3, 3e-3]}}
    path.write_text(yaml.safe_dump(study))
    code, out = study_cli([path, "--tracking-uri", mlflow_uri], tmp_path)
    assert code == 0, out[-4000:]
    (exp_dir,) = (tmp_path / "ray_results").glob("resume_disk-*")  # beside it: the shared teacher cache
    trial_dirs = [d for d in exp_dir.iterdir() if d.is_dir()]
    assert len(trial_dirs) == 3
    files = [p for p in exp_dir.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name in (checkpoints.OPTIM, checkpoints.RNG)]
    # Ray's JSON result files (tune.ray_loggers, default): result.json (a line per epoch) and params per trial,
    # none of its CSV or TensorBoard files
    assert not [p for p in files if p.name == "progress.csv" or p.name.startswith("events.out")]
    for d in trial_dirs:
        assert len((d / "result.json").read_text().splitlines()) == 2 and (d / "params.json").is_file()
    weights = [p for p in files if p.name == checkpoints.WEIGHTS]
    assert len(weights) == 1
    client, _, children = runs(mlflow_uri, "resume_disk")
    best = max(children, key=lambda r: r.data.metrics["eval/accuracy"])
    scores = {json.loads((d / checkpoints.FINAL).read_text())["score"] for d in exp_dir.glob("*/checkpoint_*")}
    assert best.data.metrics["eval/accuracy"] == max(scores)
    kept_score = json.loads((weights[0].parent / checkpoints.FINAL).read_text())["score"]
    assert kept_score == max(scores)
    # beside the one kept student, a finished trial holds a few small files (progress, score, Ray's results)
    other = sum(checkpoints.disk_bytes(d) for d in trial_dirs) - weights[0].stat().st_size
    assert other / len(trial_dirs) < 16_000, other
    # Ray's own tools read the study: ExperimentAnalysis and Tuner.restore(...).get_results(), each trial's
    # last eval/accuracy equal to its MLflow run's
    from ray import tune

    from tunekd.trainable import tune_trainable

    final = {r.data.tags["tunekd.trial_id"]: r.data.metrics["eval/accuracy"] for r in children}
    frame = tune.ExperimentAnalysis(str(exp_dir)).dataframe()
    assert dict(zip(frame["trial_id"], frame["eval/accuracy"])) == final
    results = tune.Tuner.restore(str(exp_dir), tune_trainable).get_results()
    assert not results.errors and {r.metrics["trial_id"]: r.metrics["eval/accuracy"] for r in results} == final
    assert all(len(r.metrics_dataframe) == 2 for r in results)  # the per-epoch history: 2 epochs
