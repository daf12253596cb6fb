"""Stop signals end a study the way a shell reports it: SIGINT (Ctrl-C) → exit 130, SIGTERM (a scheduler's
preemption) → 143, SIGHUP (a closed terminal) → 129; the MLflow parent run ends KILLED naming the signal,
the trial that was running stays unfinished (not failed) with its checkpoint, and `--resume` continues it
to the end, from its last complete checkpoint (a torn newer one beside it, as a kill mid-write leaves it,
is not read). Each case is the real CLI in its own process, signalled while a trial runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import LONG_TESTS, descendants, kill_tree, runs, steps

pytestmark = pytest.mark.slow


def _study(tmp_path, teacher_dir, name):
    raw = {"name": name,
           "task": {"name": "synthetic", "synthetic": {"train_size": 768, "eval_size": 32}, "max_length": 16},
           "teacher": {"model": str(teacher_dir)}, "student": {"layers": 2, "init": "copy"},
           "train": {"epochs": 3, "batch_size": 16, "lr": 1e-3},
           "tune": {"resources": {"cpu": 1}, "scheduler": "fifo"}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(study, cwd, uri, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "tunekd.run", str(study), "--tracking-uri", uri, *extra],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _signal_after_first_epoch(proc, signum, group, twice=False):
    """Send `signum` once the running trial has reported epoch 1 (to the process group when `group`: what
    a terminal or a job scheduler does), and with `twice` again once the driver says it is stopping the
    trials (a second Ctrl-C: stop at once); return (exit code, output)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while not any(" epoch 1:" in ln for ln in lines):
        assert proc.poll() is None and time.time() < deadline, "".join(lines)[-4000:]
        time.sleep(0.1)
    (os.killpg if group else os.kill)(proc.pid, signum)
    while twice and not any("stopping the trials" in ln for ln in lines) and proc.poll() is None:
        time.sleep(0.05)
    if twice and proc.poll() is None:
        (os.killpg if group else os.kill)(proc.pid, signum)
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(descendants(proc.pid) + [proc.pid])
    reader.join(10)
    return code, "".join(lines)


@pytest.mark.parametrize("signame, group, own_ray, code, resume, twice", [
    ("SIGINT", False, False, 130, False, True),  # Ctrl-C twice: the second stops at once, still KILLED
    ("SIGTERM", True, False, 143, True, False),  # to the whole group; then --resume from the last complete checkpoint
    # with a local Ray of the driver's own, whose processes must survive the group signal (opt-in: two Ray starts)
    pytest.param("SIGTERM", True, True, 143, False, False, marks=LONG_TESTS),
    pytest.param("SIGHUP", True, False, 129, False, False, marks=LONG_TESTS),  # SIGTERM's path, another code
])
def test_stop_signal_ends_the_study_killed_and_resume_finishes_it(signame, group, own_ray, code, resume, twice,
                                                                   tmp_path, tiny_bert_dir, mlflow_uri, ray_session):
    name = f"signal_{signame.lower()}{'_own_ray' if own_ray else ''}"
    study = _study(tmp_path, tiny_bert_dir, name)
    # attached to the session's Ray, or with a local Ray of its own that the group signal also reaches
    extra = ["--num-cpus", "1"] if own_ray else ["--address", ray_session]
    got, out = _signal_after_first_epoch(_start(study, tmp_path, mlflow_uri, *extra), getattr(signal, signame), group,
                                         twice)
    assert got == code, out[-4000:]
    assert "SIGABRT" not in out and "Fatal Python error" not in out, out[-4000:]
    client, parents, children = runs(mlflow_uri, name)
    (parent,) = parents
    assert parent.info.status == "KILLED"
    label = "Ctrl-C" if signame == "SIGINT" else signame
    assert parent.data.tags["tunekd.error"] == f"interrupted ({label}); continue with --resume"
    (child,) = children
    assert child.data.tags["tunekd.status"] == "running"  # unfinished, not failed: --resume continues it
    done = steps(client, child)
    assert done and done[-1] < 3
    if not resume:
        return
    # and a torn checkpoint beside it: the next epoch's folder as a kill while it was written leaves it (weights
    # cut short, no progress.json: written last). --resume must continue from the last complete checkpoint.
    (trial_dir,) = [d for d in tmp_path.glob("ray_results/*/tune_trainable_*") if d.is_dir()]
    complete = {c.name: json.loads((c / "progress.json").read_text())["epoch"] for c in trial_dir.glob("checkpoint_*")}
    last = trial_dir / max(complete)
    torn = trial_dir / f"checkpoint_{int(last.name.split('_')[1]) + 1:06d}"
    torn.mkdir()
    weights = (last / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    proc = subprocess.run([sys.executable, "-m", "tunekd.run", str(study), "--tracking-uri", mlflow_uri, "--resume",
                           *extra], cwd=tmp_path, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    client, parents, children = runs(mlflow_uri, name)
    assert [p.info.status for p in parents] == ["FINISHED"]
    (child,) = children
    assert child.data.tags["tunekd.status"] == "completed"
    assert steps(client, child) == [1, 2, 3]  # continued from its checkpoint: no epoch logged twice
    out = proc.stdout + proc.stderr
    (restored,) = re.findall(r"from checkpoint: Checkpoint\(filesystem=local, path=(.+?)\)", out) or [out[-4000:]]
    # the complete checkpoint of the last epoch MLflow recorded (Tune's saved state names it; a newer complete one
    # the worker wrote while the study stopped is passed over too: its epoch is trained again, see test_faults)
    assert Path(restored).parent == trial_dir and complete.get(Path(restored).name) == done[-1], (restored, complete)
    assert torn.name not in out


def test_a_signal_ignored_at_the_start_stays_ignored():
    """`nohup tunekd run ...`: SIGHUP is ignored when the driver starts and must stay so (the study outlives
    its terminal); the other stop signals are caught while the study runs and restored after it."""
    from tunekd.driver import StudyDriver

    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM)}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        driver = StudyDriver.__new__(StudyDriver)  # the signal handling needs no study
        driver.signal, driver.fitting, driver.log = None, False, print
        with driver.stop_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is driver.stop_handler
            assert driver.stop_signals_caught == [signal.SIGINT, signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
