"""A study on a Ray cluster with no shared disk, for real, on loopback: an S3 endpoint on 127.0.0.1 (moto's
standalone server), a 2-node Ray cluster (a head and a worker node, each started from its own working
directory with its own node cache), an MLflow server keeping its artifacts in the same bucket, and a driver
in a third, empty folder with `tune.storage_path: s3://...`.

Checks: the study completes; every trial reports `perf/cache_source` local or storage (never online: the
worker node reads the cache from the bucket); the fine-tuned teacher and the teacher cache live in the
bucket; after the driver is killed mid-study, `--resume` completes from the bucket; the driver's folder
holds nothing but the study file; `tunekd report` reads the artifacts from the bucket.

Opt-in (about 2-3 minutes on 2 CPUs): TUNEKD_CLUSTER_TEST=1 python -m pytest -q -n 0 -s tests/test_cluster_storage.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import MotoS3, _process_table, descendants, environ, free_port, kill_tree, listening, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("TUNEKD_CLUSTER_TEST") != "1",
                                 reason="the loopback cluster test is opt-in: TUNEKD_CLUSTER_TEST=1")]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# `ray start --address` refuses a second node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps Ray on
# 127.0.0.1), and with it set to 1 resolves 127.0.0.1 to this machine's outward address. On loopback the
# worker node therefore runs `ray start` with the guard lifted and the outward-address lookup answering
# 127.0.0.1 (ray/scripts/scripts.py, ray/_private/services.py); every process still binds 127.0.0.1 only
# (checked below). A real cluster needs none of this.
WORKER_NODE = """
import sys
from ray._private import ray_constants, services
ray_constants.ENABLE_RAY_CLUSTER = True
services.node_ip_address_from_perspective = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import main
sys.argv = ["ray", "start", *sys.argv[1:]]
main()
"""


def _study(path: Path, name: str, epochs: int, train_size: int) -> Path:
    raw = {
        "name": name,
        "task": {"name": "synthetic", "synthetic": {"train_size": train_size, "eval_size": 32}, "max_length": 16},
        "teacher": {"model": "minilm", "finetune": {"epochs": 1, "batch_size": 16}, "sanity": "off"},
        "student": {"layers": 2, "init": "copy"},
        "distill": {"strategy": "forward", "alpha_kl": 1.0, "lambda_hid": 1.0},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 1e-3, "save_model": False},
        "tune": {"resources": {"cpu": 1}, "scheduler": "fifo", "storage_path": "s3://study/runs"},
        "search": {"distill.strategy": {"grid": ["forward", "reverse"]}},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


class Cluster:
    """moto, a 2-node Ray and an MLflow server on 127.0.0.1; stopped by PID (only what it started)."""

    def __init__(self, root: Path):
        self.root = root
        self.temp = root / "ray"
        self.procs: list[subprocess.Popen] = []
        self.s3 = MotoS3(root)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        root = self.root
        self.s3.create_bucket("study")
        self.env = {**os.environ, **self.s3.env, "PYTHONPATH": str(REPO), "TUNEKD_THREADS": "1",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "disabled", "TUNEKD_REPORT": "0", "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS", None)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        for name in ("head", "worker", "driver", "reader"):
            (root / name).mkdir()
        start = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
        self._run([BIN / "ray", "start", "--head", f"--port={self.port}", "--include-dashboard=false",
                   f"--temp-dir={self.temp}", *start], "head")
        self._run([sys.executable, "-c", WORKER_NODE, f"--address={self.address}", *start], "worker")
        self.mlflow_port = free_port()
        self.tracking = f"http://127.0.0.1:{self.mlflow_port}"
        self.procs.append(subprocess.Popen(
            [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", "s3://study/mlflow"],
            cwd=root, env={**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=open(root / "mlflow.log", "wb"), stderr=subprocess.STDOUT))
        wait_for(self._mlflow_up, timeout=120, every=0.5)

    def node_env(self, node: str) -> dict[str, str]:
        return {**self.env, "TUNEKD_NODE_CACHE": str(self.root / f"{node}_cache")}

    def _run(self, cmd, node: str) -> None:
        out = subprocess.run([str(c) for c in cmd], cwd=self.root / node, env=self.node_env(node),
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    def _mlflow_up(self) -> bool:
        import urllib.request

        try:
            return urllib.request.urlopen(self.tracking + "/health", timeout=2).status == 200
        except OSError:
            return False

    def pids(self) -> list[int]:
        """The Ray processes of this cluster (their command lines name its temp folder), the servers, and
        everything below them."""
        cmds, _ = _process_table()
        roots = [p for p, c in cmds.items() if str(self.temp) in c] + [p.pid for p in self.procs] + [self.s3.proc.pid]
        return sorted({d for r in roots for d in descendants(r)} | set(roots))

    def driver(self, *args) -> subprocess.Popen:
        # the driver runs on the head node (as `ray job submit` or a KubeRay head would) and shares its node cache
        return subprocess.Popen([sys.executable, "-m", "tunekd.run", "cluster.yaml", "--address", self.address,
                                 "--tracking-uri", self.tracking, *args], cwd=self.root / "driver",
                                env=self.node_env("head"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> None:
        kill_tree(self.pids())
        self.s3.stop()


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    return client, [r for r in client.search_runs([exp.experiment_id], max_results=100)
                    if "mlflow.parentRunId" in r.data.tags]


def _loopback(addr: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(addr)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _bucket(prefix: str) -> dict[str, int]:
    from tunekd import storage

    return storage.files(*storage.filesystem(f"s3://study/{prefix}"))


def test_study_on_s3_two_node_cluster_and_resume():
    root = Path(tempfile.mkdtemp(prefix="tkc", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = Cluster(root)
    try:
        with environ(cluster.s3.env):  # this process reads the bucket and the MLflow server too
            _study_and_resume(cluster, root)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _study_and_resume(cluster: Cluster, root: Path) -> None:
    # two alive nodes, every listening socket on loopback
    nodes = json.loads(subprocess.run(
        [sys.executable, "-c", f"import ray, json; ray.init(address='{cluster.address}', logging_level='ERROR'); "
                               "print(json.dumps([[n['NodeManagerAddress'], n['Alive']] for n in ray.nodes()]))"],
        env=cluster.env, capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1])
    assert nodes == [["127.0.0.1", True], ["127.0.0.1", True]], nodes
    bound = {addr for addr, _, _ in listening(cluster.pids())}
    assert bound and all(_loopback(a) for a in bound), bound

    # 1. a study on S3, run to the end
    _study(root / "driver" / "cluster.yaml", "cluster", epochs=2, train_size=64)
    t0 = time.time()
    proc = cluster.driver()
    out, _ = proc.communicate(timeout=900)
    print(f"first study: {time.time() - t0:.0f} s")
    assert proc.returncode == 0, out[-6000:]
    client, children = _runs(cluster.tracking, "cluster")
    sources = {r.data.tags["tunekd.trial_id"]: r.data.tags.get("tunekd.cache_source") for r in children}
    print("trial -> perf/cache_source (first study):", sources)
    assert len(sources) == 2 and set(sources.values()) <= {"local", "storage"}, sources
    assert "storage" in sources.values(), sources  # the worker node read the cache from the bucket
    assert {r.data.tags["tunekd.status"] for r in children} == {"completed"}
    assert "runs the teacher online" not in out
    keys = _bucket("runs")
    assert any(k.startswith("teacher_cache/") and k.endswith("manifest.json") for k in keys), sorted(keys)[:20]
    assert any(k.startswith("teachers/") and k.endswith("tunekd_teacher.json") for k in keys)
    assert any("/checkpoint_" in k for k in keys)  # Ray's trial folders in the bucket
    # finished trials pruned in the bucket: no optimizer state, the best one's weights only (keep_students 1)
    assert not [k for k in keys if k.endswith(("/optim.pt", "/rng.pt"))], sorted(keys)
    assert len([k for k in keys if k.startswith("cluster-") and k.endswith("/model.safetensors")]) == 1
    assert list((root / "worker_cache").glob("teacher_cache/*/manifest.json"))  # the worker's node copy
    artifacts = _bucket("mlflow")
    assert any(k.endswith("fingerprint.json") for k in artifacts), sorted(artifacts)[:20]
    assert sorted(p.name for p in (root / "driver").iterdir()) == ["cluster.yaml"]

    # 2. the driver killed mid-study, then --resume from the bucket
    _study(root / "driver" / "cluster.yaml", "resumed", epochs=3, train_size=400)
    proc = cluster.driver()
    wait_for(lambda: any(k.startswith("resumed-") and k.endswith("/checkpoint_000000/progress.json")
                         for k in _bucket("runs")), timeout=600, every=1)
    tree = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    kill_tree(tree)
    client, cut = _runs(cluster.tracking, "resumed")
    print("trial -> (status, epochs logged) when the driver was killed:",
          {r.data.tags["tunekd.trial_id"]: (r.data.tags.get("tunekd.status"),
                                            [m.step for m in client.get_metric_history(r.info.run_id, "eval/accuracy")])
           for r in cut})
    assert cut and not all(r.data.tags.get("tunekd.status") == "completed" for r in cut)
    t0 = time.time()
    proc = cluster.driver("--resume")
    out, _ = proc.communicate(timeout=900)
    print(f"--resume after the killed driver: {time.time() - t0:.0f} s, exit {proc.returncode}")
    assert proc.returncode == 0, out[-6000:]
    assert "resuming parent run" in out
    client, children = _runs(cluster.tracking, "resumed")
    active = [r for r in children if r.data.tags.get("tunekd.status") != "superseded"]
    table = {r.data.tags["tunekd.trial_id"]: (r.data.tags.get("tunekd.cache_source"),
                                              r.data.tags.get("tunekd.status"),
                                              [m.step for m in client.get_metric_history(r.info.run_id,
                                                                                         "eval/accuracy")])
             for r in active}
    print("trial -> (perf/cache_source, status, epochs logged) after --resume:", table)
    assert len(table) == 2 and all(v[1] == "completed" and v[2] == [1, 2, 3] for v in table.values()), table
    assert {v[0] for v in table.values()} <= {"local", "storage"}, table
    assert sorted(p.name for p in (root / "driver").iterdir()) == ["cluster.yaml"]

    # 3. tunekd report reads the study's artifacts through the server from the bucket
    rep = subprocess.run([sys.executable, "-m", "tunekd", "report", "--experiment", "cluster", "--tracking-uri",
                          cluster.tracking, "--no-log"], cwd=root / "reader", env=cluster.env,
                         capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    assert (root / "reader" / "report" / "cluster" / "report.md").is_file()
