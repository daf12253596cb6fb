"""Faults injected for real: a trial that raises, a non-finite loss, a worker killed by SIGKILL, the driver
killed mid-study and resumed; bounded checkpoints; and a local study listens on loopback only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

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


def start_cli(study, cwd, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "tunekd.run", str(study), "--num-cpus", "2", *extra], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def runs(cwd, experiment="faults"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    all_runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in all_runs if r.data.tags.get("tunekd.role") == "study"]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def steps(client, run, key="eval/accuracy"):
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def descendants(root: int) -> list[int]:
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, grew = {root}, True
    while grew:
        new = {p for p, pp in parents.items() if pp in found} - found
        found |= new
        grew = bool(new)
    return sorted(found - {root})


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout=300, every=0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def test_failing_and_non_finite_trials_are_marked_failed_and_others_go_on(tmp_path, tiny_bert_dir, monkeypatch):
    study = write_study(tmp_path, tiny_bert_dir, search={
        "seed": {"grid": [0, 1]},  # the seed-1 trials raise (fault injected inside the trial)
        "train.lr": {"grid": [1e-3, 1e12]},  # an absurd lr drives the loss to inf/NaN
    })
    monkeypatch.setenv("TUNEKD_INJECT_FAULT", "seed=1")
    code, out = finish(start_cli(study, tmp_path))
    assert code == 0, out[-4000:]
    client, parents, children = runs(tmp_path)
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


def test_killed_worker_is_retried_from_its_checkpoint(tmp_path, tiny_bert_dir):
    study = write_study(tmp_path, tiny_bert_dir,
                        task={"synthetic": {"train_size": 1200, "eval_size": 32}},
                        train={"epochs": 4}, tune={"max_failures": 2, "checkpoint_keep": 1})
    proc = start_cli(study, tmp_path)
    try:
        ckpt = wait_for(lambda: sorted(tmp_path.glob("ray_results/*/*/checkpoint_000000")), timeout=300)
        assert ckpt
        workers = [p for p in descendants(proc.pid) if "ImplicitFunc" in cmdline(p) or "tune_trainable" in cmdline(p)]
        assert workers, [cmdline(p)[:80] for p in descendants(proc.pid)]
        kill_tree(workers)
        code, out = finish(proc)
    finally:
        kill_tree(descendants(proc.pid) + [proc.pid]) if proc.poll() is None else None
    assert code == 0, out[-4000:]
    assert "retried from its last checkpoint" in out
    client, _, children = runs(tmp_path)
    assert len(children) == 1
    run = children[0]
    assert run.data.tags["tunekd.status"] == "completed"
    assert steps(client, run) == [1, 2, 3, 4]  # no step written twice
    # bounded checkpoints: the best and the last at most
    trial_dirs = [d for d in (tmp_path / "ray_results").glob("*/*") if d.is_dir()]
    for d in trial_dirs:
        assert len(list(d.glob("checkpoint_*"))) <= 2, list(d.glob("checkpoint_*"))


def test_killed_driver_resumes(tmp_path, tiny_bert_dir):
    study = write_study(tmp_path, tiny_bert_dir,
                        task={"synthetic": {"train_size": 600, "eval_size": 32}},
                        train={"epochs": 3},
                        tune={"max_concurrent_trials": 1},
                        search={"distill.strategy": {"grid": ["forward", "reverse", "all_to_one"]}})
    proc = start_cli(study, tmp_path)

    def one_done_one_started():
        try:
            _, _, children = runs(tmp_path)
        except Exception:
            return False
        done = [r for r in children if r.data.tags.get("tunekd.status") == "completed"]
        return len(done) >= 1 and len(children) >= 2 and sorted(tmp_path.glob("ray_results/*/*/checkpoint_*"))

    try:
        wait_for(one_done_one_started, timeout=400, every=1)
        tree = descendants(proc.pid)
        kill_tree([proc.pid])  # the driver dies mid-study
        proc.wait(timeout=30)
        time.sleep(1)
        kill_tree(tree)  # and the local Ray it had started (only what this test started)
    finally:
        if proc.poll() is None:
            kill_tree(descendants(proc.pid) + [proc.pid])
    client, parents, before = runs(tmp_path)
    done_before = {r.data.tags["tunekd.trial_id"]: steps(client, r) for r in before
                   if r.data.tags["tunekd.status"] == "completed"}
    assert done_before

    code, out = finish(start_cli(study, tmp_path, "--resume"))
    assert code == 0, out[-4000:]
    client, parents_after, after = runs(tmp_path)
    assert len(parents_after) == 1 and parents_after[0].info.run_id == parents[0].info.run_id
    trials = [r for r in after if r.data.tags["tunekd.status"] != "superseded"]
    assert len(trials) == 3
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


def _listening(pids):
    inodes = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] != "0A" or parts[9] not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = parts[1].split(":")
            if v6:
                raw = bytes.fromhex(addr_hex)
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                import ipaddress

                addr = str(ipaddress.IPv6Address(b"".join(words)))
            else:
                addr = ".".join(str(b) for b in bytes.fromhex(addr_hex)[::-1])
            found.append((addr, int(port_hex, 16), inodes[parts[9]]))
    return found


def test_local_study_listens_on_loopback_only(tmp_path, tiny_bert_dir):
    study = write_study(tmp_path, tiny_bert_dir, task={"synthetic": {"train_size": 600, "eval_size": 32}},
                        train={"epochs": 2})
    proc = start_cli(study, tmp_path)
    try:
        wait_for(lambda: sorted(tmp_path.glob("ray_results/*/*/checkpoint_000000")), timeout=300)
        sockets = _listening([proc.pid, *descendants(proc.pid)])
        code, out = finish(proc)
    finally:
        if proc.poll() is None:
            kill_tree(descendants(proc.pid) + [proc.pid])
    assert code == 0, out[-3000:]
    assert sockets, "expected Ray's listening sockets"
    import ipaddress

    def loopback(addr: str) -> bool:
        ip = ipaddress.ip_address(addr)
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or (mapped is not None and mapped.is_loopback)

    outside = [s for s in sockets if not loopback(s[0])]
    assert not outside, outside
