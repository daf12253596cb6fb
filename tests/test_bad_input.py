"""Bad input is caught before any trial starts: one clear line naming the problem, exit code 2, and no
MLflow run created. Table-driven, through the real CLI entry point (`tunekd.run.main`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunekd import run as cli

BASE = {
    "name": "bad",
    "task": {"name": "synthetic", "synthetic": {"train_size": 16, "eval_size": 16}, "max_length": 16},
    "teacher": {"model": "TINY"},
    "student": {"layers": 2, "init": "copy"},
    "train": {"epochs": 1},
    "tune": {"resources": {"cpu": 1}},
}


def _folder_with(tmp_path, name, files):
    d = tmp_path / name
    d.mkdir()
    for fname, text in files.items():
        (d / fname).write_text(text)
    return d


def cases(tmp_path, tiny_bert_dir):
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    sst_header = "sentence\tlabel\n"
    good_dev = sst_header + "a fine film \t1\n"
    csv_dir = _folder_with(tmp_path, "csv", {"train.csv": "text,label\ngood,pos\nbad,neg\n",
                                             "dev.csv": "text,label\nfine,pos\nmeh,so-so\n"})
    declared = {"name": "mine", "kind": "classification", "text_fields": ["text"],
                "data": {"path": "csv", "data_files": {"train": str(csv_dir / "train.csv"),
                                                       "validation": str(csv_dir / "dev.csv")}}}
    return [
        # (id, study edits or raw text, extra CLI args, words expected in the message)
        ("malformed_yaml", "name: bad\ntask: {name: synthetic\n", [], ["malformed YAML at line"]),
        ("unknown_key", {"distill": {"lamda_hid": 1}}, [], ["unknown key 'lamda_hid' in distill",
                                                           "did you mean 'lambda_hid'"]),
        ("wrong_type", {"train": {"epochs": "many"}}, [], ["train.epochs", "integer"]),
        ("unknown_strategy", {"distill": {"strategy": "foward"}}, [], ["unknown strategy 'foward'",
                                                                      "did you mean 'forward'"]),
        ("unknown_task", {"task": {"name": "sst"}}, [], ["unknown task 'sst'", "did you mean 'sst2'"]),
        ("unknown_family", {"teacher": {"model": str(vit)}}, [], ["model_type 'vit'", "supported"]),
        ("unknown_searcher", {"tune": {"searcher": "hyperopt"}}, [], ["tune.searcher", "'optuna'"]),
        ("depth_zero", {"student": {"layers": 0}}, [], ["student.layers", "greater than or equal to 1"]),
        ("depth_above_teacher", {"student": {"layers": 5, "init": "random"}}, [],
         ["student depth 5", "teacher's depth 4"]),
        ("depth_above_teacher_in_search", {"search": {"student.layers": {"grid": [2, 9]}}}, [],
         ["student depth 9", "student.layers=9"]),
        ("negative_lambda", {"distill": {"lambda_hid": -3}}, [], ["distill.lambda_hid", "greater than or equal to 0"]),
        ("negative_temperature", {"distill": {"temperature": -1}}, [], ["distill.temperature", "greater than 0"]),
        ("explicit_map_out_of_range", {"distill": {"strategy": [[1, 2], [2, 7]]}}, [],
         ["layer map pair [2, 7]", "teacher index 7"]),
        ("copy_width_mismatch", {"student": {"layers": 2, "init": "copy", "hidden_size": 16}}, [],
         ["copy", "hidden_size 16", "teacher 32"]),
        ("missing_data_folder", {"task": {"name": "sst2", "data_dir": str(tmp_path / "nope")}}, [],
         ["does not exist"]),
        ("missing_split_file", {"task": {"name": "sst2", "data_dir": str(_folder_with(tmp_path, "nodev", {
            "train.tsv": sst_header + "good \t1\n"}))}}, [], ["dev.tsv"]),
        ("missing_column", {"task": {"name": "sst2", "data_dir": str(_folder_with(tmp_path, "nocol", {
            "train.tsv": "sentence\tscore\ngood \t1\n", "dev.tsv": good_dev}))}}, [], ["label"]),
        ("label_outside_set", {"task": {"name": "sst2", "data_dir": str(_folder_with(tmp_path, "badlabel", {
            "train.tsv": sst_header + "good \t7\n", "dev.tsv": good_dev}))}}, [], ["label '7'", "not one of the labels"]),
        ("empty_dataset", {"task": {"name": "sst2", "data_dir": str(_folder_with(tmp_path, "empty", {
            "train.tsv": sst_header, "dev.tsv": good_dev}))}}, [], ["no rows"]),
        ("declared_unknown_metric", {"task": dict(declared, metrics=["matthew"])}, [],
         ["task.metrics: unknown metric 'matthew'", "did you mean 'matthews'"]),
        ("declared_missing_column", {"task": dict(declared, text_fields=["sentence"])}, [],
         ["column 'sentence' is missing", "columns found: text, label"]),
        ("declared_label_outside_list", {"task": dict(declared, labels=["neg", "pos"])}, [],
         ["label 'so-so' is not in the task's labels ['neg', 'pos']"]),
        ("teacher_path_missing", {"teacher": {"model": str(tmp_path / "no_model")}}, [], ["does not exist"]),
        ("tracking_unreachable", {}, ["--tracking-uri", "http://127.0.0.1:9"], ["unreachable"]),
        ("tracking_file_store", {}, ["--tracking-uri", str(tmp_path / "mlruns")], ["sqlite"]),
        ("ray_unreachable", {}, ["--address", "127.0.0.1:9"], ["cannot reach the Ray cluster"]),
        ("gpu_where_none", {"tune": {"resources": {"cpu": 1, "gpu": 1}}}, ["--num-cpus", "1"],
         ["tune.resources.gpu", "0 GPUs"]),
    ]


def _case_ids():
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp())
    try:
        return [c[0] for c in cases(scratch, scratch)]
    finally:
        shutil.rmtree(scratch)


def _merge(base, edits):
    out = json.loads(json.dumps(base))
    for key, value in edits.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("case_id", _case_ids())
def test_bad_input(case_id, tmp_path, tiny_bert_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (case,) = [c for c in cases(tmp_path, tiny_bert_dir) if c[0] == case_id]
    _, edits, extra, words = case
    study = tmp_path / "study.yaml"
    if isinstance(edits, str):
        study.write_text(edits)
    else:
        raw = _merge(BASE, edits)
        if raw["teacher"]["model"] == "TINY":
            raw["teacher"]["model"] = str(tiny_bert_dir)
        study.write_text(yaml.safe_dump(raw))
    code = cli.main([str(study), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("tunekd: error: ") and "\n" not in err, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "mlflow.db").exists()  # nothing was recorded
