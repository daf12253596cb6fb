"""Helpers of the tests: the shared data folder, MLflow runs of an experiment, processes by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


DATA_DIR = Path(os.environ.get("TUNEKD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data(task: str) -> Path:
    """The real data folder of `task` in ../shared/data (or $TUNEKD_DATA_DIR); skips the test without it."""
    import pytest

    folder = DATA_DIR / task
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} not found (set TUNEKD_DATA_DIR)")
    return folder


def runs(uri: str, experiment: str):
    """(client, parent runs, child runs) of `experiment` in the store at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    all_runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in all_runs if r.data.tags.get("tunekd.role") == "study"]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def steps(client, run, key="eval/accuracy") -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def cli_subprocess(args, cwd, timeout=600, **popen):
    """`python -m tunekd.run ARGS` in a new process (for what needs one: killing it, its own Ray)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "tunekd.run", *[str(a) for a in args]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def _process_table() -> tuple[dict[int, str], dict[int, int]]:
    cmds, parents = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmds[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return cmds, parents


def descendants(root: int) -> list[int]:
    """PIDs of every process below `root` (children, their children, ...)."""
    _, parents = _process_table()
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


def kill_tree(pids) -> None:
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


def listening(pids) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket these processes listen on."""
    import ipaddress

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
                addr = str(ipaddress.IPv6Address(b"".join(words)))
            else:
                addr = ".".join(str(b) for b in bytes.fromhex(addr_hex)[::-1])
            found.append((addr, int(port_hex, 16), inodes[parts[9]]))
    return found
