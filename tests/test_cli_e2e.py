"""The real CLI end to end: the quickstart study (shrunk by --set) recorded in MLflow, its fine-tuned
teacher reused by a second run, a trained student exported as an artifact, Optuna with sampled
dimensions, and a study in another process attached to a running Ray cluster.

The studies run in this process (`tunekd.run.main`) on the test process's Ray (`ray_session`) and MLflow
store (`mlflow_uri`); the attached one is a subprocess given that Ray's address.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import cli_subprocess, runs

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"
SHRINK = [
    "task.synthetic.train_size=64", "task.synthetic.eval_size=32", "task.max_length=24",
    "teacher.finetune.epochs=1", "train.epochs=2", "train.batch_size=16",
    "tune.scheduler=asha",  # the quickstart runs FIFO; here ASHA, so that early stopping is covered end to end
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory, ray_session, mlflow_uri):
    """The quickstart study, run once per test process (xdist --dist loadfile keeps this file's tests in one
    worker), recorded in the process's MLflow store."""
    cwd = tmp_path_factory.mktemp("quickstart")
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(cwd)
        mp.setenv("TUNEKD_REPORT", "1")  # the study ends with its report (conftest turns it off elsewhere)
        import contextlib
        import io

        from tunekd import run as cli

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = cli.main([str(QUICKSTART), *[f"--set={s}" for s in SHRINK], "--tracking-uri", mlflow_uri])
    finally:
        mp.undo()
    out = buf.getvalue()
    assert code == 0, out[-5000:]
    return cwd, out, mlflow_uri


def test_quickstart_records_every_trial_as_a_child_run(quickstart):
    cwd, out, uri = quickstart
    client, parents, children = runs(uri, "quickstart")
    assert len(parents) == 1
    parent = parents[0]
    assert "teacher/accuracy" in parent.data.metrics
    assert parent.data.params["teacher.cached"] == "False"
    assert len(children) == 20  # 5 strategies x 2 inits x 2 seeds
    for run in children:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["tunekd.status"] in ("completed", "early_stopped")
        for key in ("distill.strategy", "distill.lambda_hid", "student.init", "student.layers", "seed",
                    "train.lr", "distill.layer_map", "student.copied_teacher_layers", "distill.temperature"):
            assert key in params, key
        for key in ("eval/accuracy", "train/loss", "train/loss_ce", "train/loss_kl", "train/loss_hid"):
            assert key in metrics, key
        history = client.get_metric_history(run.info.run_id, "eval/accuracy")
        steps = [m.step for m in history]
        assert steps == list(range(1, len(steps) + 1))  # epochs as steps, none twice
        if tags["tunekd.status"] == "completed":
            assert len(steps) == 2
        else:
            assert len(steps) < 2
        init = params["student.init"]
        copied = json.loads(params["student.copied_teacher_layers"])
        assert copied == ([2, 4, 6] if init == "copy" else None)  # fwd(i) for 6 -> 3, 1-based like the map
    combos = {(r.data.params["distill.strategy"], r.data.params["student.init"], r.data.params["seed"])
              for r in children}
    assert len(combos) == 20


def test_quickstart_report_compares_at_the_epoch_every_trial_reached(quickstart, tmp_path):
    """The shrunk quickstart runs ASHA (grace period 1): the report reads the design from the parent run and
    compares every strategy with forward for both inits on both seeds at epoch 1, which every trial reached —
    not at the epoch ASHA's stops chose; each pair at the deepest epoch both trials reached is descriptive only."""
    import json

    import pandas as pd

    from tunekd import report

    cwd, _, uri = quickstart
    code = report.main(["--experiment", "quickstart", "--tracking-uri", uri, "--out", str(tmp_path), "--no-log"])
    assert code == 0
    client, parents, children = runs(uri, "quickstart")
    design = json.loads(parents[0].data.tags["tunekd.design"])
    assert design["scheduler"] == "asha" and design["grace_period"] == 1 and design["epochs"] == 2
    paired = pd.read_csv(tmp_path / "paired.csv")
    assert {(s, i) for s, i in zip(paired["strategy"], paired["init"])} == {
        (s, i) for s in ("none", "reverse", "all_to_one", "random") for i in ("copy", "random")}
    assert (paired["n"] == 2).all(), paired
    assert set(paired["rung"].astype(str)) == {"1"} and set(paired["basis"]) == {"epoch 1, every trial"}
    assert "descriptive" not in set(paired["verdict"])
    at1 = {(r.data.params["distill.strategy"], r.data.params["student.init"], r.data.params["seed"]):
           {m.step: m.value for m in client.get_metric_history(r.info.run_id, "eval/accuracy")}[1] for r in children}
    for _, row in paired.iterrows():  # by hand, from MLflow's histories
        d = [at1[(row["strategy"], row["init"], s)] - at1[("forward", row["init"], s)] for s in ("0", "1")]
        assert row["mean_diff"] == pytest.approx(sum(d) / 2)
        if d[0] == d[1] or abs(d[0] - d[1]) < 1e-9:  # identical differences decide nothing
            assert row["verdict"] in ("inconclusive", "at chance"), row
    md = (tmp_path / "report.md").read_text()
    assert "**epoch 1, every trial**" in md
    if any(r.data.tags["tunekd.status"] == "early_stopped" for r in children):
        assert "## Descriptive: each pair at the deepest epoch both trials reached" in md


def test_asha_stopped_at_least_one_trial(quickstart):
    cwd, out, uri = quickstart
    _, _, children = runs(uri, "quickstart")
    stopped = [r for r in children if r.data.tags["tunekd.status"] == "early_stopped"]
    assert stopped, out[-3000:]


def test_layer_maps_as_spec_gives_them(quickstart):
    cwd, _, uri = quickstart
    _, _, children = runs(uri, "quickstart")
    maps = {r.data.params["distill.strategy"]: json.loads(r.data.params["distill.layer_map"]) for r in children}
    assert maps["forward"] == [[0, 0], [1, 2], [2, 4], [3, 6]]
    assert maps["reverse"] == [[0, 0], [1, 6], [2, 4], [3, 2]]
    assert maps["all_to_one"] == [[0, 3], [1, 3], [2, 3], [3, 3]]
    assert maps["none"] == []
    assert sorted(t for _, t in maps["random"]) == [0, 2, 4, 6]


def test_quickstart_prints_summary_and_ui_command(quickstart):
    _, out, uri = quickstart
    assert f"mlflow ui --backend-store-uri {uri}" in out
    assert "eval/accuracy" in out and "early_stopped" in out
    assert "teacher: fine-tuning" in out


def test_quickstart_ends_with_its_report(quickstart):
    """The end of `tunekd run` names the study's report.html, written to report/<experiment>/ and logged on the
    parent run with the per-epoch metrics of every trial."""
    import pandas as pd

    cwd, out, uri = quickstart
    folder = cwd / "report" / "quickstart"
    assert f"report: {Path('report') / 'quickstart' / 'report.html'}" in out, out[-2000:]
    client, (parent,), children = runs(uri, "quickstart")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/trials.csv", "report/curves_accuracy.png"} <= logged
    trials = pd.read_csv(folder / "trials.csv")
    epochs = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "eval/accuracy")) for r in children}
    assert len(trials) == sum(epochs.values()) and trials.groupby("run_id").size().to_dict() == epochs
    text = (folder / "report.html").read_text()
    assert "curves_accuracy.png" not in text and text.count("data:image/png;base64,") >= 2


def test_fine_tuned_teacher_is_cached_and_reused(quickstart, study_cli, mlflow_uri):
    """A second study in the same folder finds the fine-tuned teacher by its content hash: no fine-tuning,
    the same teacher folder and metrics, recorded as cached."""
    cwd, _, _ = quickstart
    teachers = list((cwd / ".tunekd_cache" / "teachers").iterdir())
    assert len(teachers) == 1 and (teachers[0] / "tunekd_teacher.json").is_file()
    code, out = study_cli([QUICKSTART, *[f"--set={s}" for s in SHRINK], "--set=train.epochs=1",
                           "--set=search.distill.strategy.grid=[forward]", "--set=search.student.init.grid=[copy]",
                           "--set=search.seed.grid=[0]",
                           "--set=tracking.experiment=quickstart_reuse", "--tracking-uri", mlflow_uri], cwd)
    assert code == 0, out[-4000:]
    assert f"teacher: reusing fine-tuned teacher {teachers[0]}" in out
    assert "teacher: fine-tuning" not in out
    assert list((cwd / ".tunekd_cache" / "teachers").iterdir()) == teachers
    _, (parent,), (child,) = runs(mlflow_uri, "quickstart_reuse")
    assert parent.data.params["teacher.cached"] == "True"
    assert parent.data.params["teacher.path"] == str(teachers[0])
    assert child.data.tags["tunekd.status"] == "completed"


def tiny_study(folder: Path, teacher_dir, name: str, *, init: str = "copy", **sections) -> Path:
    """A one-trial study of the synthetic task (32/16 rows) with the tiny BERT teacher, written to
    `folder/<name>.yaml`; `sections` add to (or replace) the keys of its sections."""
    import yaml

    raw = {"name": name, "task": {"name": "synthetic", "synthetic": {"train_size": 32, "eval_size": 16},
                                  "max_length": 16},
           "teacher": {"model": str(teacher_dir)}, "student": {"layers": 2, "init": init},
           "train": {"epochs": 1, "batch_size": 16}, "tune": {"resources": {"cpu": 1}}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_attach_to_a_running_cluster(tmp_path, ray_session, tiny_bert_dir, mlflow_uri):
    """A study in another process given `--address` of a running Ray (this session's) attaches to it."""
    study = tiny_study(tmp_path, tiny_bert_dir, "attach")
    proc = cli_subprocess([study, "--address", ray_session, "--tracking-uri", mlflow_uri], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"attached to the cluster at {ray_session}" in proc.stdout
    _, _, children = runs(mlflow_uri, "attach")
    assert len(children) == 1 and children[0].data.tags["tunekd.status"] == "completed"


def test_trained_student_is_saved_as_an_mlflow_artifact(tmp_path, tiny_bert_dir, study_cli, mlflow_uri):
    import torch
    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForSequenceClassification

    study = tiny_study(tmp_path, tiny_bert_dir, "save", train={"save_model": True}, tune={"ray_loggers": False})
    code, out = study_cli([study, "--tracking-uri", mlflow_uri], tmp_path)
    assert code == 0, out[-3000:]
    # tune.ray_loggers: false: none of Ray's per-trial result files
    ray_files = {p.name for p in (tmp_path / "ray_results").rglob("*") if p.is_file()}
    assert not ray_files & {"result.json", "params.json", "params.pkl", "progress.csv"}, ray_files
    client, _, children = runs(mlflow_uri, "save")
    (run,) = children
    local = download_artifacts(run_id=run.info.run_id, artifact_path="student", tracking_uri=mlflow_uri,
                               dst_path=str(tmp_path / "dl"))
    model = AutoModelForSequenceClassification.from_pretrained(local)
    assert model.config.num_hidden_layers == 2 and model.config.tunekd_copied_layers == [1, 3]
    assert (Path(local) / "tokenizer_config.json").is_file()
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    # trained: the copied layer moved away from the teacher's weights
    assert not torch.equal(model.bert.encoder.layer[1].output.dense.weight,
                           teacher.bert.encoder.layer[3].output.dense.weight)


def test_optuna_searcher_with_sampled_dimensions(tmp_path, tiny_bert_dir, study_cli, mlflow_uri):
    study = tiny_study(tmp_path, tiny_bert_dir, "opt", init="random", search={
        "train.lr": {"loguniform": [1e-4, 1e-3]}, "distill.strategy": {"choice": ["forward", "reverse"]},
        "student.layers": {"randint": [1, 2]},
    }, tune={"searcher": "optuna", "num_samples": 3, "scheduler": "fifo"})
    code, out = study_cli([study, "--tracking-uri", mlflow_uri], tmp_path)
    assert code == 0, out[-3000:]
    _, _, children = runs(mlflow_uri, "opt")
    assert len(children) == 3
    for run in children:
        p = run.data.params
        assert 1e-4 <= float(p["train.lr"]) <= 1e-3
        assert p["distill.strategy"] in ("forward", "reverse")
        assert p["student.layers"] in ("1", "2")
        assert run.data.tags["tunekd.status"] == "completed"
