"""Faults injected for real: a trial that raises, a non-finite loss, a worker killed by SIGKILL, the driver
killed mid-study and resumed; bounded checkpoints; and a local study listens on loopback only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import LONG_TESTS, cmdline, descendants, kill_tree, listening, steps, wait_for
from tests.helpers import runs as _runs

pytestmark = pytest.mark.slow


def write_study(tmp_path, teacher_dir, **edits):
    raw = {
        "name": "faults",
        "task": {"name": "synthetic", "synthetic": {"train_size": 64, "eval_size": 32}, "max_length": 16},
        "teacher": {"model": str(teacher_dir)},
        "student": {"layers": 2, "init": "copy"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3},
        "tune": {"resources": {"cpu": 1}, "max_concurrent_trials": 2, "scheduler": "fifo"},
    }
    for key, value in edits.items():
        raw.setdefault(key, {}).update(value) if isinstance(value, dict) else raw.__setitem__(key, value)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_cli(study, cwd, mlflow_uri, *extra):
    """The CLI in its own process with its own local Ray (2 CPUs): these tests kill it or its workers."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "tunekd.run", str(study), "--num-cpus", "2",
                             "--tracking-uri", mlflow_uri, *extra], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_failing_and_non_finite_trials_are_marked_failed_and_others_go_on(tmp_path, tiny_bert_dir, study_cli,
                                                                          mlflow_uri, monkeypatch):
    study = write_study(tmp_path, tiny_bert_dir, name="faults_errors", search={
        "seed": {"grid": [0, 1]},  # the seed-1 trials raise (fault injected inside the trial)
        "train.lr": {"grid": [1e-3, 1e12]},  # an absurd lr drives the loss to inf/NaN
    })
    monkeypatch.setenv("TUNEKD_INJECT_FAULT", "seed=1")
    code, out = study_cli([study, "--tracking-uri", mlflow_uri], tmp_path)
    assert code == 0, out[-4000:]
    client, parents, children = _runs(mlflow_uri, "faults_errors")
    assert len(children) == 4
    by = {(int(r.data.params["seed"]), float(r.data.params["train.lr"])): r for r in children}
    ok = by[(0, 1e-3)]
    assert ok.data.tags["tunekd.status"] == "completed" and steps(client, ok) == [1, 2]
    for key in [(1, 1e-3), (1, 1e12)]:
        run = by[key]
        assert run.data.tags["tunekd.status"] == "failed"
        assert "injected fault: TUNEKD_INJECT_FAULT=seed=1" in run.data.tags["tunekd.error"]
        assert run.info.status == "FAILED"
    nan = by[(0, 1e12)]
    assert nan.data.tags["tunekd.status"] == "failed"
    assert "non-finite loss at step" in nan.data.tags["tunekd.error"]
    assert "failed" in out


@LONG_TESTS
def test_killed_worker_is_retried_from_its_checkpoint(tmp_path, tiny_bert_dir, mlflow_uri):
    study = write_study(tmp_path, tiny_bert_dir, name="faults_worker",
                        task={"synthetic": {"train_size": 600, "eval_size": 32}},
                        train={"epochs": 4}, tune={"max_failures": 2})
    proc = start_cli(study, tmp_path, mlflow_uri)
    try:
        ckpt = wait_for(lambda: sorted(tmp_path.glob("ray_results/*/*/checkpoint_000000")), timeout=300, every=0.2)
        assert ckpt
        workers = [p for p in descendants(proc.pid) if "ImplicitFunc" in cmdline(p) or "tune_trainable" in cmdline(p)]
        assert workers, [cmdline(p)[:80] for p in descendants(proc.pid)]
        kill_tree(workers)
        code, out = finish(proc)
    finally:
        kill_tree(descendants(proc.pid) + [proc.pid]) if proc.poll() is None else None
    assert code == 0, out[-4000:]
    assert "retried from its last checkpoint" in out
    client, _, children = _runs(mlflow_uri, "faults_worker")
    assert len(children) == 1
    run = children[0]
    assert run.data.tags["tunekd.status"] == "completed"
    assert steps(client, run) == [1, 2, 3, 4]  # no step written twice
    # bounded checkpoints: the best and the last at most
    trial_dirs = [d for d in (tmp_path / "ray_results").glob("*/*") if d.is_dir()]
    for d in trial_dirs:
        assert len(list(d.glob("checkpoint_*"))) <= 2, list(d.glob("checkpoint_*"))


def _epoch_of(folder: Path) -> int:
    try:
        return int(json.loads((folder / "progress.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


@LONG_TESTS
def test_killed_driver_resumes(tmp_path, tiny_bert_dir, mlflow_uri):
    """The driver is killed in the worst place: a worker has written its epoch-2 checkpoint but the driver
    (frozen by SIGSTOP) never saw that epoch, so MLflow lacks step 2 and Tune's saved state names the epoch-1
    checkpoint. --resume must train epoch 2 again (MLflow gets steps 1, 2, 3), and not re-run finished trials."""
    study = write_study(tmp_path, tiny_bert_dir, name="faults_driver",
                        task={"synthetic": {"train_size": 1600, "eval_size": 32}},
                        train={"epochs": 3},
                        tune={"max_concurrent_trials": 1},
                        search={"distill.strategy": {"grid": ["forward", "reverse"]}})
    proc = start_cli(study, tmp_path, mlflow_uri)

    def second_trial_after_epoch_1():  # the running trial's folder once MLflow has its step 1
        try:
            client, _, children = _runs(mlflow_uri, "faults_driver")
        except Exception:
            return None
        done = [r for r in children if r.data.tags.get("tunekd.status") == "completed"]
        running = [r for r in children if r.data.tags.get("tunekd.status") == "running"]
        if not done or not running or steps(client, running[0]) != [1]:
            return None
        folders = list(tmp_path.glob(f"ray_results/*/*{running[0].data.tags['tunekd.trial_id']}*"))
        return folders[0] if folders and _epoch_of(folders[0] / "checkpoint_000000") == 1 else None

    def freeze_once_epoch_2_is_written():
        for _ in range(3):
            trial_dir = wait_for(second_trial_after_epoch_1, timeout=400, every=0.05)
            time.sleep(0.15)  # the driver hands the trial its epoch 2 (milliseconds after it logs epoch 1)
            os.kill(proc.pid, signal.SIGSTOP)  # ... and sees nothing more
            try:
                return wait_for(lambda: any(_epoch_of(f) == 2 for f in trial_dir.glob("checkpoint_*")),
                                timeout=20, every=0.2)
            except AssertionError:  # it had not handed it out yet: let it go on, and try again
                os.kill(proc.pid, signal.SIGCONT)
        raise AssertionError("no worker wrote its epoch-2 checkpoint while the driver was frozen")

    try:
        freeze_once_epoch_2_is_written()
        time.sleep(1)  # the copy into the trial's folder completes
        tree = descendants(proc.pid)
        kill_tree([proc.pid])  # the driver dies mid-study
        proc.wait(timeout=30)
        time.sleep(1)
        kill_tree(tree)  # and the local Ray it had started (only what this test started)
    finally:
        if proc.poll() is None:
            kill_tree(descendants(proc.pid) + [proc.pid])
    client, parents, before = _runs(mlflow_uri, "faults_driver")
    done_before = {r.data.tags["tunekd.trial_id"]: steps(client, r) for r in before
                   if r.data.tags["tunekd.status"] == "completed"}
    assert done_before
    cut = [r for r in before if r.data.tags["tunekd.status"] == "running"]
    assert [steps(client, r) for r in cut] == [[1]]  # the epoch-2 checkpoint is on disk, step 2 is not in MLflow

    code, out = finish(start_cli(study, tmp_path, mlflow_uri, "--resume"))
    assert code == 0, out[-4000:]
    client, parents_after, after = _runs(mlflow_uri, "faults_driver")
    assert len(parents_after) == 1 and parents_after[0].info.run_id == parents[0].info.run_id
    trials = [r for r in after if r.data.tags["tunekd.status"] != "superseded"]
    assert len(trials) == 2
    assert {r.data.tags["tunekd.status"] for r in trials} == {"completed"}
    # a trial the killed driver had started before Ray saved its state is re-run under a new id;
    # its old run is kept and points to the new one
    ids = {r.data.tags["tunekd.trial_id"] for r in trials}
    for run in after:
        if run.data.tags["tunekd.status"] == "superseded":
            assert run.data.tags["tunekd.superseded_by"] in ids
    for run in trials:
        assert steps(client, run) == [1, 2, 3]
        if run.data.tags["tunekd.trial_id"] in done_before:  # finished trials are not trained again
            assert f"{run.data.tags['tunekd.trial_id']} epoch" not in out


def test_local_ray_listens_on_loopback_only(ray_session, tmp_path, tiny_bert_dir, study_cli, mlflow_uri):
    """The local Ray the driver starts (`driver.connect_ray`, as the session's was) listens on loopback only:
    its daemons, and the workers of a study running on it (sampled after its first checkpoint)."""
    import ipaddress
    import threading

    study = write_study(tmp_path, tiny_bert_dir, name="faults_loopback",
                        task={"synthetic": {"train_size": 400, "eval_size": 32}}, train={"epochs": 2})
    sampled = []

    def sample():
        wait_for(lambda: sorted(tmp_path.glob("ray_results/*/*/checkpoint_000000")), timeout=300, every=0.2)
        found = listening([os.getpid(), *descendants(os.getpid())])
        sampled.extend((addr, port, pid, cmdline(pid)) for addr, port, pid in found)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code, out = study_cli([study, "--tracking-uri", mlflow_uri], tmp_path)
    sampler.join(timeout=60)
    assert code == 0, out[-3000:]
    assert sampled, "expected Ray's listening sockets"
    assert any("ImplicitFunc" in cmd for *_, cmd in sampled), "expected a trial worker among them"
    assert any("gcs_server" in cmd for *_, cmd in sampled) and any("raylet" in cmd for *_, cmd in sampled)

    def loopback(addr: str) -> bool:
        ip = ipaddress.ip_address(addr)
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or (mapped is not None and mapped.is_loopback)

    outside = [s for s in sampled if not loopback(s[0])]
    assert not outside, outside
