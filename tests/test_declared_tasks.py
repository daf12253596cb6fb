"""Declared tasks (a task written in the study file, loaded through datasets.load_dataset) from CSV,
JSON Lines and Parquet files written here; their validation (one ConfigError line each); regression
through the KD loop (MSE head, MSE logit term), teacher fine-tuning and the teacher-output cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tunekd.errors import ConfigError  # noqa: E402
from tunekd.study import validate  # noqa: E402
from tunekd.tasks import compute_metrics, load_configured, spec_for, task_params  # noqa: E402

TRAIN = pd.DataFrame({
    "premise": ["A man plays.", "A dog runs.", "Kids sing.", "It rains.", "She reads.", "He cooks."],
    "hypothesis": ["Someone plays.", "A cat sleeps.", "Kids are silent.", "It is wet.", "She sleeps.", "Food."],
    "gold": ["entailment", "neutral", "contradiction", "entailment", "contradiction", "neutral"],
    "score": [4.5, 1.0, 0.5, 3.75, 0.0, 2.25],
})
DEV = TRAIN.iloc[[1, 0, 4]].reset_index(drop=True)


def write(folder: Path, fmt: str, frames: dict[str, pd.DataFrame]) -> dict:
    """Files of format `fmt` (csv, jsonl, parquet) per split; the `task.data` spec that loads them."""
    files = {}
    for split, df in frames.items():
        path = folder / f"{split}.{fmt}"
        if fmt == "csv":
            df.to_csv(path, index=False)
        elif fmt == "jsonl":
            df.to_json(path, orient="records", lines=True)
        else:
            df.to_parquet(path, index=False)
        files[split] = str(path)
    return {"path": {"csv": "csv", "jsonl": "json", "parquet": "parquet"}[fmt], "data_files": files}


def task_cfg(**task):
    return validate({"name": "t", "teacher": {"model": "minilm"}, "task": task}).task


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_declared_classification_from_files(tmp_path, fmt):
    data = write(tmp_path, fmt, {"train": TRAIN, "validation": DEV})
    cfg = task_cfg(name="nli", kind="classification", data=data, text_fields=["premise", "hypothesis"],
                   label_field="gold", metrics=["accuracy", "macro_f1"])
    spec, dsd = load_configured(cfg)
    assert spec.label_names == ("contradiction", "entailment", "neutral")  # read from the data, sorted
    assert (spec.kind, spec.metrics, spec.num_labels, spec.builtin) == ("classification", ("accuracy", "macro_f1"), 3, False)
    assert set(dsd) == {"train", "validation"}
    assert dsd["train"].column_names == ["text_a", "text_b", "label"]
    assert dsd["train"]["label"] == [1, 2, 0, 1, 0, 2]
    assert dsd["validation"][0] == {"text_a": "A dog runs.", "text_b": "A cat sleeps.", "label": 2}
    # listed labels fix the ids
    cfg = task_cfg(kind="classification", data=data, text_fields=["premise", "hypothesis"], label_field="gold",
                   labels=["entailment", "neutral", "contradiction"])
    spec, dsd = load_configured(cfg)
    assert spec.label_names == ("entailment", "neutral", "contradiction") and spec.name == "custom"
    assert dsd["train"]["label"] == [0, 1, 2, 0, 2, 1]
    assert spec_for(cfg).label_names == spec.label_names


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_declared_regression_from_files(tmp_path, fmt):
    data = write(tmp_path, fmt, {"train": TRAIN, "dev": DEV})
    cfg = task_cfg(kind="regression", data=data, text_fields=["premise"], label_field="score", eval_splits=["dev"])
    spec, dsd = load_configured(cfg, seed=0)
    assert (spec.metrics, spec.num_labels, spec.eval_splits) == (("pearson", "spearman"), 1, ("dev",))
    assert dsd["train"].column_names == ["text_a", "label"]
    assert dsd["dev"]["label"] == pytest.approx([1.0, 4.5, 0.0])


def test_integer_labels_and_ids(tmp_path):
    df = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": [3, 1, 2, 1]})
    data = write(tmp_path, "csv", {"train": df, "validation": df})
    spec, dsd = load_configured(task_cfg(kind="classification", data=data, text_fields=["text"]))
    assert spec.label_names == ("1", "2", "3") and dsd["train"]["label"] == [2, 0, 1, 0]
    df2 = pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})
    data = write(tmp_path, "csv", {"train": df2, "validation": df2})
    spec, dsd = load_configured(task_cfg(kind="classification", data=data, text_fields=["text"], labels=["neg", "pos"]))
    assert dsd["train"]["label"] == [0, 1]  # ids into the listed names


def test_several_eval_splits_report_each(tmp_path):
    data = write(tmp_path, "csv", {"train": TRAIN, "validation": DEV, "test": TRAIN})
    cfg = task_cfg(kind="classification", data=data, text_fields=["premise"], label_field="gold",
                   eval_splits=["validation", "test"], metrics=["accuracy"])
    spec, dsd = load_configured(cfg)
    assert dsd["validation"]["label"] == [2, 1, 0]
    out = compute_metrics(spec, {"validation": np.array([2, 2, 2]), "test": np.array(dsd["test"]["label"])},
                          {"validation": np.array(dsd["validation"]["label"]), "test": np.array(dsd["test"]["label"])})
    assert out == pytest.approx({"accuracy": 100 / 3, "accuracy_test": 100.0})


def test_declared_multiple_choice_and_generation(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps(r) for r in [
        {"q": "Sky?", "options": ["blue", "green"], "answer": "A"},
        {"q": "Grass?", "options": ["blue", "green"], "answer": "B"}]) + "\n")
    cfg = task_cfg(kind="multiple_choice", data={"path": "json", "data_files": {"train": str(mc), "validation": str(mc)}},
                   text_fields=["q", "options"], label_field="answer", labels=["A", "B"])
    spec, dsd = load_configured(cfg)
    assert dsd["validation"][1] == {"context": "Grass?", "choices": [" blue", " green"], "label": 1}
    assert spec.num_labels == 2 and spec.metrics == ("accuracy",)
    gen = tmp_path / "gen.jsonl"
    gen.write_text("\n".join(json.dumps(r) for r in [
        {"src": "a b", "refs": ["A B", "a-b"]}, {"src": "c", "refs": ["C"]}]) + "\n")
    cfg = task_cfg(kind="generation", data={"path": "json", "data_files": {"train": str(gen), "validation": str(gen)}},
                   text_fields=["src"], label_field="refs")
    spec, dsd = load_configured(cfg)
    assert len(dsd["train"]) == 3 and dsd["train"][1] == {"source": "a b", "target": "a-b", "references": ["a-b"]}
    assert dsd["validation"][0] == {"source": "a b", "target": "A B", "references": ["A B", "a-b"]}
    assert spec.metrics == ("bleu",)


# ---------------------------------------------------------------------------------------------
# validation: before Ray starts, one line each


@pytest.mark.parametrize("task, words", [
    ({"kind": "classification", "data": {"path": "csv"}, "text_fields": ["t"], "metrics": ["acuracy"]},
     r"task\.metrics: unknown metric 'acuracy'.*did you mean 'accuracy'"),
    ({"kind": "regression", "data": {"path": "csv"}, "text_fields": ["t"], "metrics": ["f1"]},
     r"'f1' does not apply to a regression task; regression metrics: pearson, spearman"),
    ({"kind": "classification", "text_fields": ["t"]}, r"task\.data: a declared task needs it"),
    ({"kind": "classification", "data": {"path": "csv"}}, r"task\.text_fields: a declared classification task"),
    ({"kind": "classification", "data": {"path": "csv", "trust_remote_code": True}, "text_fields": ["t"]},
     r"unknown key 'trust_remote_code' in task\.data; allowed: path, name, data_dir, data_files, revision"),
    ({"kind": "regression", "data": {"path": "csv"}, "text_fields": ["t"], "labels": ["a", "b"]},
     r"task\.labels: a regression task has no label list"),
    ({"kind": "classification", "name": "cola", "data": {"path": "csv"}, "text_fields": ["t"]},
     r"task\.name 'cola' is a built-in task"),
    ({"name": "rte", "metrics": ["accuracy"]}, r"task\.metrics: only a declared task"),
    ({"kind": "clasification", "data": {"path": "csv"}, "text_fields": ["t"]}, r"task\.kind: 'clasification' is not allowed"),
])
def test_bad_declarations(task, words):
    with pytest.raises(ConfigError, match=words) as exc:
        validate({"name": "t", "teacher": {"model": "minilm"}, "task": task})
    assert "\n" not in str(exc.value)


def test_bad_data_is_one_line(tmp_path):
    data = write(tmp_path, "csv", {"train": TRAIN, "validation": DEV})
    base = dict(kind="classification", data=data, text_fields=["premise"], label_field="gold")
    cases = [
        (dict(base, text_fields=["premis"]), r"train.csv: column 'premis' is missing; columns found: premise, "),
        (dict(base, labels=["entailment", "neutral"]), r"split 'train', row 2: label 'contradiction' is not in the "
                                                      r"task's labels \['entailment', 'neutral'\]"),
        (dict(base, eval_splits=["dev"]), r"has no split 'dev'; it has train, validation"),
        (dict(base, kind="regression", label_field="gold"), r"label 'entailment' of regression task 'custom' is not a finite"),
    ]
    for task, words in cases:
        with pytest.raises(ConfigError, match=words) as exc:
            load_configured(task_cfg(**task))
        assert "\n" not in str(exc.value)
    empty = tmp_path / "empty.csv"
    empty.write_text("premise,gold\n")
    with pytest.raises(ConfigError, match=r"\(validation\): .*empty\.csv has a header but no rows"):
        load_configured(task_cfg(**dict(base, data={"path": "csv", "data_files": {"train": data["data_files"]["train"],
                                                                                   "validation": str(empty)}})))
    with pytest.raises(ConfigError, match=r"task.data.data_files \(train\): .*missing\.csv does not exist"):
        load_configured(task_cfg(**dict(base, data={"path": "csv", "data_files": str(tmp_path / "missing.csv")})))


def test_resolved_definition_is_flat_params(tmp_path):
    data = write(tmp_path, "csv", {"train": TRAIN, "validation": DEV})
    spec, _ = load_configured(task_cfg(name="nli", kind="classification", data=data,
                                       text_fields=["premise", "hypothesis"], label_field="gold"))
    params = task_params(spec)
    assert params["task.kind"] == "classification" and params["task.builtin"] is False
    assert params["task.labels"] == ["contradiction", "entailment", "neutral"]
    assert params["task.text_fields"] == ["premise", "hypothesis"] and params["task.label_field"] == "gold"
    assert params["task.data.path"] == "csv" and params["task.primary_metric"] == "accuracy"
    assert params["task.data.data_files.validation"] == data["data_files"]["validation"]
    assert all(not isinstance(v, dict) for v in params.values())
    from tunekd.tasks import get_task

    cola = task_params(get_task("cola"))
    assert cola["task.hub"] == "nyu-mll/glue/cola" and cola["task.metrics"] == ["matthews"]
    assert task_params(get_task("cola"), task_cfg(name="cola", data_dir="/d/cola"))["task.source"] == "/d/cola"
    assert task_params(get_task("cola"), task_cfg(name="cola"))["task.source"] == "hub"
    assert task_params(spec, task_cfg(kind="classification", data=data, text_fields=["premise"]))["task.source"] == "csv"


# ---------------------------------------------------------------------------------------------
# regression through the KD loop, teacher fine-tuning and the cache (no Ray)


@pytest.fixture(scope="module")
def regression(tmp_path_factory, tiny_bert_dir):
    from transformers import AutoTokenizer

    from tunekd.data import encode_splits

    folder = tmp_path_factory.mktemp("reg")
    data = write(folder, "csv", {"train": TRAIN, "validation": DEV})
    spec, dsd = load_configured(task_cfg(kind="regression", data=data, text_fields=["premise", "hypothesis"],
                                         label_field="score"))
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    return spec, encode_splits(dsd, tok, spec, 32)


def test_regression_encoding_keeps_float_labels(regression):
    _, enc = regression
    assert enc["train"].arrays["labels"].dtype == np.float32
    batch = enc["train"].batch(np.array([0, 2]))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [4.5, 0.5]
    assert batch["input_ids"].dtype == torch.int64


def test_regression_kd_losses_by_hand(regression, tiny_bert_dir, tmp_path):
    from tunekd import cache as tc
    from tunekd import distill
    from tunekd.models import family_for
    from tunekd.students import build_student
    from tunekd.study import DistillConfig, StudentConfig

    spec, enc = regression
    family = family_for(type("C", (), {"model_type": "bert"})())
    torch.manual_seed(0)
    teacher = family.load(str(tiny_bert_dir), spec).eval()
    assert teacher.config.num_labels == 1
    student = build_student(teacher, family, spec, StudentConfig(layers=2, init="copy"), seed=0).model.eval()
    d = DistillConfig(strategy="none", alpha_ce=0.5, alpha_kl=2.0, lambda_hid=0.0)
    dist = distill.Distiller(family=family, student=student, teacher=teacher, distill=d)
    batch = enc["train"].batch(np.arange(6))
    parts = dist.losses(batch)
    with torch.no_grad():
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        s = student(**kw).logits.double()[:, 0]
        t = teacher(**kw).logits.double()[:, 0]
    y = batch["labels"].double()
    assert float(parts["loss_ce"]) == pytest.approx(float(((s - y) ** 2).mean()), rel=1e-5)
    assert float(parts["loss_out_mse"]) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-5)
    assert "loss_kl" not in parts  # an MSE of the outputs, named for what it is
    assert float(parts["loss"]) == pytest.approx(0.5 * float(((s - y) ** 2).mean()) + 2.0 * float(((s - t) ** 2).mean()),
                                                 rel=1e-5)
    # the cache holds the one-output teacher's scores; KD from it gives the same term
    info = tc.prepare(family, teacher, enc["train"], tmp_path / "c", layers=[], max_length=32, budget_gb=1.0,
                      dtype="bf16")
    cache = tc.TeacherCache.open(info.folder)
    assert info.mode != "off" and cache.layers == ()
    assert cache.arrays["logits"].shape == (6, 1)
    np.testing.assert_allclose(cache.arrays["logits"][:, 0], t.numpy(), rtol=1e-6)
    cached = distill.Distiller(family=family, student=student, distill=d, cache=cache).losses(batch)
    assert float(cached["loss_out_mse"]) == pytest.approx(float(parts["loss_out_mse"]), rel=1e-5)


def test_regression_finetune_and_evaluate(regression, tiny_bert_dir):
    from tunekd import distill
    from tunekd.models import family_for
    from tunekd.study import TrainConfig

    spec, enc = regression
    family = family_for(type("C", (), {"model_type": "bert"})())
    torch.manual_seed(0)
    model = family.load(str(tiny_bert_dir), spec)
    cfg = TrainConfig(epochs=3, batch_size=2, lr=1e-3, warmup_ratio=0.0)
    history = distill.fit(distill.Distiller(family=family, student=model), spec, enc["train"],
                          {"validation": enc["validation"]}, cfg, epochs=3, seed=0)
    assert set(k for k in history[-1] if k.startswith("eval/")) == {"eval/pearson", "eval/spearman"}
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    # the metric is Pearson of the model's own scores against the labels
    out = distill.evaluate(family, model, spec, {"validation": enc["validation"]}, batch_size=8)
    with torch.no_grad():
        b = enc["validation"].batch(np.arange(3))
        scores = model(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits[:, 0].double().numpy()
    assert out["pearson"] == pytest.approx(100 * np.corrcoef(scores, [1.0, 4.5, 0.0])[0, 1], abs=1e-4)
    assert out == pytest.approx({k[5:]: v for k, v in history[-1].items() if k.startswith("eval/")}, abs=1e-4)


def test_tsv_through_loader_options(tmp_path):
    """GLUE-style TSVs (quotes inside texts) through the csv loader's own options."""
    for split in ("train", "validation"):
        (tmp_path / f"{split}.tsv").write_text('index\tsentence\tlabel\n0\tHe said "hi.\t1\n1\tNo "quote\t0\n')
    data = {"path": "csv", "data_files": {s: str(tmp_path / f"{s}.tsv") for s in ("train", "validation")},
            "options": {"sep": "\t", "quoting": 3}}
    spec, dsd = load_configured(task_cfg(kind="classification", data=data, text_fields=["sentence"]))
    assert dsd["train"]["text_a"] == ['He said "hi.', 'No "quote'] and dsd["train"]["label"] == [1, 0]
    with pytest.raises(ConfigError, match=r"task\.data\.options: 'trust_remote_code' cannot be set here"):
        task_cfg(kind="classification", data=dict(data, options={"trust_remote_code": True}), text_fields=["s"])


@pytest.mark.slow
def test_declared_csv_study_through_the_cli(tmp_path):
    """One tiny study on a declared regression task from CSV files, through `python -m tunekd.run`:
    the teacher is fine-tuned (one output, MSE), its outputs cached, one KD trial runs and the task's
    resolved definition and metrics land in MLflow."""
    import subprocess
    import sys

    import yaml
    from mlflow.tracking import MlflowClient

    data = write(tmp_path, "csv", {"train": pd.concat([TRAIN] * 4), "validation": TRAIN})
    study = {
        "name": "declared_csv", "seed": 0,
        "task": {"name": "similarity", "kind": "regression", "data": data, "text_fields": ["premise", "hypothesis"],
                 "label_field": "score", "max_length": 24},
        "teacher": {"model": "tiny:bert", "finetune": {"epochs": 1, "batch_size": 8, "lr": 1e-3}},
        "student": {"layers": 2, "init": "copy"},
        "distill": {"strategy": "forward", "lambda_hid": 1.0, "alpha_kl": 1.0},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3},
        "tune": {"scheduler": "fifo", "resources": {"cpu": 1}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TUNEKD_TINY_DIR=str(tmp_path / "tiny"))
    proc = subprocess.run([sys.executable, "-m", "tunekd.run", str(path), "--num-cpus", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "task similarity (regression)" in proc.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("declared_csv").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("tunekd.role") == "study")
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    p = parent.data.params
    assert (p["task.kind"], p["task.name"], p["task.label_field"], p["task.data.path"]) == \
        ("regression", "similarity", "score", "csv")
    assert p["task.source"] == "csv" and p["task.data.data_files.train"] == data["data_files"]["train"]
    assert p["task.metrics"] == '["pearson", "spearman"]' and p["teacher.cache_mode"] != "off"
    assert {"teacher/pearson", "teacher/spearman"} <= set(parent.data.metrics)
    m = child.data.metrics
    assert child.data.tags["tunekd.status"] == "completed"
    assert -100.0 <= m["eval/pearson"] <= 100.0 and m["train/loss_out_mse"] > 0 and m["train/loss_hid"] > 0
    assert m["perf/cache_hit"] == 1.0
