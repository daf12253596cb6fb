"""Helpers of the tests: the shared data folder, MLflow runs of an experiment, processes by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# dummy credentials of the loopback S3 endpoint; no metadata-service lookup (it would leave loopback)
S3_ENV = {"AWS_ACCESS_KEY_ID": "tunekd-test-key", "AWS_SECRET_ACCESS_KEY": "tunekd-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class MotoS3:
    """moto's standalone S3 server on 127.0.0.1 (a real S3 HTTP endpoint), started and stopped by PID.
    `env` is what a process needs to use it (dummy credentials, AWS_ENDPOINT_URL)."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}
        exe = Path(sys.executable).with_name("moto_server")
        self.log = open(Path(log_dir) / "moto.log", "wb")
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, **self.env))
        wait_for(self._up, timeout=60, every=0.2)

    def _up(self) -> bool:
        import socket

        if self.proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def create_bucket(self, name: str) -> None:
        """A bucket (pyarrow creates none: `allow_bucket_creation` is off, as for a study)."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{name}", method="PUT"), timeout=10).read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """`os.environ` with `values` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# the longest fault-injection cases (a killed worker, a killed and frozen driver, SIGHUP) are opt-in so that the
# default suite stays under 5 minutes on 2 cores: TUNEKD_LONG_TESTS=1 runs them (about 2 minutes more)
LONG_TESTS = pytest.mark.skipif(os.environ.get("TUNEKD_LONG_TESTS") != "1", reason="opt-in: TUNEKD_LONG_TESTS=1")
