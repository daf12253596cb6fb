"""The real CLI end to end: the quickstart study (shrunk by --set) on a local Ray, recorded in MLflow,
and a tiny study attached to a `ray start --head` cluster on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"
SHRINK = [
    "task.synthetic.train_size=96", "task.synthetic.eval_size=64", "task.max_length=24",
    "teacher.finetune.epochs=2", "train.epochs=3", "train.batch_size=16",
]

pytestmark = pytest.mark.slow


def run_cli(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "tunekd.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def child_runs(db: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tunekd.role") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart")
    t0 = time.perf_counter()
    proc = run_cli([str(QUICKSTART), *[f"--set={s}" for s in SHRINK]], cwd)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return cwd, proc, elapsed


def test_quickstart_records_every_trial_as_a_child_run(quickstart):
    cwd, proc, _ = quickstart
    client, parents, children = child_runs(cwd / "mlflow.db", "quickstart")
    assert len(parents) == 1
    parent = parents[0]
    assert "teacher/accuracy" in parent.data.metrics
    assert len(children) == 10
    for run in children:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["tunekd.status"] in ("completed", "early_stopped")
        for key in ("distill.strategy", "distill.lambda_hid", "student.init", "student.layers", "seed",
                    "train.lr", "distill.layer_map", "student.copied_layers", "distill.temperature"):
            assert key in params, key
        for key in ("eval/accuracy", "train/loss", "train/loss_ce", "train/loss_kl", "train/loss_hid"):
            assert key in metrics, key
        history = client.get_metric_history(run.info.run_id, "eval/accuracy")
        steps = [m.step for m in history]
        assert steps == list(range(1, len(steps) + 1))  # epochs as steps, none twice
        if tags["tunekd.status"] == "completed":
            assert len(steps) == 3
        else:
            assert len(steps) < 3
        init = params["student.init"]
        copied = json.loads(params["student.copied_layers"])
        assert copied == ([1, 3, 5] if init == "copy" else None)  # fwd(i) - 1 for 6 -> 3
    combos = {(r.data.params["distill.strategy"], r.data.params["student.init"]) for r in children}
    assert len(combos) == 10


def test_asha_stopped_at_least_one_trial(quickstart):
    cwd, proc, _ = quickstart
    _, _, children = child_runs(cwd / "mlflow.db", "quickstart")
    stopped = [r for r in children if r.data.tags["tunekd.status"] == "early_stopped"]
    assert stopped, proc.stdout[-3000:]


def test_layer_maps_as_spec_gives_them(quickstart):
    cwd, _, _ = quickstart
    _, _, children = child_runs(cwd / "mlflow.db", "quickstart")
    maps = {r.data.params["distill.strategy"]: json.loads(r.data.params["distill.layer_map"]) for r in children}
    assert maps["forward"] == [[0, 0], [1, 2], [2, 4], [3, 6]]
    assert maps["reverse"] == [[0, 0], [1, 6], [2, 4], [3, 2]]
    assert maps["all_to_one"] == [[0, 3], [1, 3], [2, 3], [3, 3]]
    assert maps["none"] == []
    assert sorted(t for _, t in maps["random"]) == [0, 2, 4, 6]


def test_quickstart_prints_summary_and_ui_command(quickstart):
    _, proc, _ = quickstart
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in proc.stdout
    assert "eval/accuracy" in proc.stdout and "early_stopped" in proc.stdout


def test_fine_tuned_teacher_is_cached_and_reused(quickstart):
    cwd, _, _ = quickstart
    teachers = list((cwd / ".tunekd_cache" / "teachers").iterdir())
    assert len(teachers) == 1 and (teachers[0] / "tunekd_teacher.json").is_file()
    proc = run_cli([str(QUICKSTART), *[f"--set={s}" for s in SHRINK], "--dry-run"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("init=") == 10


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def test_attach_to_a_running_cluster(tmp_path):
    import shutil
    import tempfile

    port = 6400 + os.getpid() % 500
    env = dict(os.environ)
    ray_tmp = Path(tempfile.mkdtemp(prefix="tkd", dir="/tmp"))  # AF_UNIX socket paths must stay short
    head = subprocess.run(
        [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        env=env, capture_output=True, text=True, timeout=120)
    assert head.returncode == 0, head.stderr
    pids = _cluster_pids(ray_tmp)
    try:
        study = tmp_path / "tiny.yaml"
        study.write_text(QUICKSTART.read_text())
        proc = run_cli([str(study), "--address", f"127.0.0.1:{port}", *[f"--set={s}" for s in SHRINK],
                        "--set=search.distill.strategy.grid=[forward]", "--set=search.student.init.grid=[copy]",
                        "--set=train.epochs=1"], tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"attached to the cluster at 127.0.0.1:{port}" in proc.stdout
        _, _, children = child_runs(tmp_path / "mlflow.db", "quickstart")
        assert len(children) == 1 and children[0].data.tags["tunekd.status"] == "completed"
    finally:
        pids = sorted(set(pids) | set(_cluster_pids(ray_tmp)))
        for pid in pids:  # stop only what this test started, by PID
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(2)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _cluster_pids(temp_dir: Path) -> list[int]:
    """PIDs of this cluster's daemons (their command line names its temp dir) and all their descendants."""
    cmds, parents = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmds[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found = {pid for pid, cmd in cmds.items() if str(temp_dir) in cmd and pid != os.getpid()}
    grew = True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= new
        grew = bool(new)
    return sorted(found)


def test_trained_student_is_saved_as_an_mlflow_artifact(tmp_path, tiny_bert_dir):
    import torch
    import yaml
    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForSequenceClassification

    study = tmp_path / "save.yaml"
    study.write_text(yaml.safe_dump({
        "name": "save", "task": {"name": "synthetic", "synthetic": {"train_size": 32, "eval_size": 16},
                                 "max_length": 16},
        "teacher": {"model": str(tiny_bert_dir)}, "student": {"layers": 2, "init": "copy"},
        "train": {"epochs": 1, "batch_size": 16, "save_model": True}, "tune": {"resources": {"cpu": 1}},
    }))
    proc = run_cli([str(study), "--num-cpus", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, _, children = child_runs(tmp_path / "mlflow.db", "save")
    (run,) = children
    local = download_artifacts(run_id=run.info.run_id, artifact_path="student",
                               tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", dst_path=str(tmp_path / "dl"))
    model = AutoModelForSequenceClassification.from_pretrained(local)
    assert model.config.num_hidden_layers == 2 and model.config.tunekd_copied_layers == [1, 3]
    assert (Path(local) / "tokenizer_config.json").is_file()
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    # trained: the copied layer moved away from the teacher's weights
    assert not torch.equal(model.bert.encoder.layer[1].output.dense.weight,
                           teacher.bert.encoder.layer[3].output.dense.weight)


def test_optuna_searcher_with_sampled_dimensions(tmp_path, tiny_bert_dir):
    import yaml

    study = tmp_path / "optuna.yaml"
    study.write_text(yaml.safe_dump({
        "name": "opt", "task": {"name": "synthetic", "synthetic": {"train_size": 32, "eval_size": 16},
                                "max_length": 16},
        "teacher": {"model": str(tiny_bert_dir)}, "student": {"layers": 2, "init": "random"},
        "train": {"epochs": 1, "batch_size": 16},
        "search": {"train.lr": {"loguniform": [1e-4, 1e-3]}, "distill.strategy": {"choice": ["forward", "reverse"]},
                   "student.layers": {"randint": [1, 2]}},
        "tune": {"searcher": "optuna", "num_samples": 3, "scheduler": "fifo", "resources": {"cpu": 1}},
    }))
    proc = run_cli([str(study), "--num-cpus", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, _, children = child_runs(tmp_path / "mlflow.db", "opt")
    assert len(children) == 3
    for run in children:
        p = run.data.params
        assert 1e-4 <= float(p["train.lr"]) <= 1e-3
        assert p["distill.strategy"] in ("forward", "reverse")
        assert p["student.layers"] in ("1", "2")
        assert run.data.tags["tunekd.status"] == "completed"
