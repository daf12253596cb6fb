"""Bad input is caught before any trial starts: one clear line naming the problem, exit code 2, Ray not
started and nothing written (no mlflow.db, ray_results/ or teacher cache: the working folder is left as
it was). Table-driven, through the real CLI entry points (`tunekd.run.main`, `tunekd.report.main`,
`tunekd.angles.main`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tunekd import angles
from tunekd import report
from tunekd import run as cli
from tunekd import studies

INF = float("inf")
NOT_UTF8 = b"caf\xe9"  # Latin-1 bytes, invalid as UTF-8

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
        if isinstance(text, bytes):
            (d / fname).write_bytes(text)
        else:
            (d / fname).write_text(text)
    return d


def _file(tmp_path, name, text="x"):
    f = tmp_path / name
    f.write_text(text)
    return f


def _weightless_teacher(tmp_path, tiny_bert_dir):
    d = tmp_path / "no_weights"
    d.mkdir()
    for f in Path(tiny_bert_dir).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")):
            shutil.copy(f, d / f.name)
    return d


def _three_label_teacher(tmp_path, tiny_bert_dir):
    """The tiny BERT classifier with its config saying 3 labels (the synthetic task has 2)."""
    d = tmp_path / "three_labels"
    if not (Path(tiny_bert_dir) / "config.json").is_file():  # collecting the case ids: no model yet
        return d
    shutil.copytree(tiny_bert_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    assert any(a.endswith("ForSequenceClassification") for a in cfg["architectures"])
    cfg["id2label"] = {str(i): f"L{i}" for i in range(3)}
    cfg["label2id"] = {f"L{i}": i for i in range(3)}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _dir(path):
    path.mkdir()


def _fifo(path):
    os.mkfifo(path)


def _base_yaml(extra=""):
    return ("name: bad\ntask: {name: synthetic, synthetic: {train_size: 16, eval_size: 16}, max_length: 16}\n"
            "teacher: {model: TINY}\nstudent: {layers: 2}\ntrain: {epochs: 1}\n" + extra)


def cases(tmp_path, tiny_bert_dir):
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    (vit / "model.safetensors").write_bytes(b"")  # a model folder has weights (else: teacher_without_weights)
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
        # --- issue 12: values that passed validation or failed late -----------------------------
        ("lr_inf", {"train": {"lr": INF}}, [], ["train.lr", "finite number"]),
        ("lambda_hid_inf", {"distill": {"lambda_hid": INF}}, [], ["distill.lambda_hid", "finite number"]),
        ("max_grad_norm_inf", {"train": {"max_grad_norm": INF}}, [], ["train.max_grad_norm", "finite number"]),
        ("max_grad_norm_nan", {"train": {"max_grad_norm": float("nan")}}, [], ["train.max_grad_norm", "finite number"]),
        ("uniform_bound_inf", {"tune": {"searcher": "random"}, "search": {"train.lr": {"uniform": [0, INF]}}}, [],
         ["search.train.lr.uniform", "finite number"]),
        ("grid_value_inf", {"search": {"distill.temperature": {"grid": [1.0, INF]}}}, [],
         ["search.distill.temperature", "value inf", "finite number"]),
        ("epochs_huge", {"train": {"epochs": 10**30}}, [], ["train.epochs", "less than or equal to 1000"]),
        ("synthetic_train_size_huge", {"task": {"synthetic": {"train_size": 10**15}}}, [],
         ["task.synthetic.train_size", "less than or equal to 1000000"]),
        ("seed_huge", {"seed": 2**70}, [], ["seed", "less than or equal to 4294967295"]),
        ("seed_negative", {"seed": -1}, [], ["seed", "greater than or equal to 0"]),
        ("trials_over_cap", {"tune": {"num_samples": 100_000}, "search": {"seed": {"grid": [0, 1]}}}, [],
         ["200000 trials", "at most 100000"]),
        ("grace_period_above_epochs", {"tune": {"asha": {"grace_period": 3}}}, [],
         ["tune.asha.grace_period 3", "allowed: 1..1"]),
        ("fp16_on_cpu", {"train": {"precision": "fp16"}}, [], ["train.precision 'fp16' needs a GPU", "'bf16'"]),
        ("heads_not_dividing_width", {"student": {"init": "random", "hidden_size": 30, "num_attention_heads": 7}}, [],
         ["width 30", "not divisible by 7 attention heads"]),
        ("lora_targets_absent", {"student": {"lora": {"target_modules": ["query", "nope"]}}}, [],
         ["student.lora.target_modules ['nope']", "allowed: ", "query"]),
        ("lora_random_init", {"student": {"init": "random", "lora": {"rank": 2}}}, [],
         ["lora adapts a copy-initialised student", "init 'copy'"]),
        ("study_not_utf8", _base_yaml("# ").encode() + NOT_UTF8 + b"\n", [], ["not UTF-8 text", "at line 6"]),
        ("tsv_not_utf8", {"task": {"name": "sst2", "data_dir": str(_folder_with(tmp_path, "latin1", {
            "train.tsv": sst_header.encode() + NOT_UTF8 + b" \t1\n", "dev.tsv": good_dev}))}}, [],
         ["train.tsv: not UTF-8 text"]),
        ("json_not_utf8", {"task": {"name": "mnli", "data_dir": str(_folder_with(tmp_path, "latin1json", {
            "train_sample_8999.json": b'{"0": {"text_a": "' + NOT_UTF8 + b'", "text_b": "x", "label": 0}}',
            "train_sample_1000.json": '{"0": {"text_a": "a", "text_b": "b", "label": 0}}'}))}},
         [], ["train_sample_8999.json: not UTF-8 text"]),
        ("jsonl_not_utf8", {"task": {"name": "hellaswag", "data_dir": str(_folder_with(tmp_path, "latin1jsonl", {
            "hellaswag_val_full.jsonl": b'{"ctx": "' + NOT_UTF8 + b'"}\n'}))}},
         [], ["hellaswag_val_full.jsonl: not UTF-8 text"]),
        ("yaml_nested_too_deep", _base_yaml("extra: " + "[" * 200 + "]" * 200 + "\n"), [],
         ["nested deeper than 32 levels"]),
        ("duplicate_key", _base_yaml("train: {epochs: 2}\n"), [], ["duplicate key 'train'", "line 6"]),
        ("duplicate_nested_key", _base_yaml("distill: {lambda_hid: 1, lambda_hid: 2}\n"), [],
         ["duplicate key 'lambda_hid'"]),
        ("name_too_long", {"name": "a" * 300}, [], ["name: ", "1-64 letters"]),
        ("name_with_slash", {"name": "a/b"}, [], ["name: 'a/b' is not allowed"]),
        ("name_dotdot", {"name": ".."}, [], ["name: '..' is not allowed", "without '..'"]),
        ("storage_is_file", {"tune": {"storage_path": str(_file(tmp_path, "a_file"))}}, [],
         ["tune.storage_path", "is a file"]),
        ("storage_under_file", {"tune": {"storage_path": str(_file(tmp_path, "b_file") / "runs")}}, [],
         ["tune.storage_path", "lies under the file"]),
        ("storage_in_proc", {"tune": {"storage_path": "/proc/tunekd_runs"}}, [],
         ["tune.storage_path", "pseudo file system"]),
        ("cache_dir_is_file", {"teacher": {"cache_dir": str(_file(tmp_path, "c_file"))}}, [],
         ["teacher.cache_dir", "is a file"]),
        ("tracking_ftp", {}, ["--tracking-uri", "ftp://example.org/mlflow"], ["scheme 'ftp' is not supported",
                                                                             "sqlite:///"]),
        ("tracking_sqlite_two_slashes", {}, ["--tracking-uri", "sqlite://x.db"], ["three slashes"]),
        ("tracking_postgresql_no_driver", {}, ["--tracking-uri", "postgresql://u@localhost/db"],
         ["database driver", "not installed"]),
        ("tracking_sqlite_directory", {}, ["--tracking-uri", f"sqlite:///{tmp_path}"], ["is a directory"]),
        ("tracking_sqlite_in_proc", {}, ["--tracking-uri", "sqlite:////proc/mlflow.db"], ["pseudo file system"]),
        ("tracking_sqlite_no_folder", {"tracking": {"uri": f"sqlite:///{tmp_path}/nope/mlflow.db"}}, [],
         ["does not exist"]),
        ("teacher_without_weights", {"teacher": {"model": str(_weightless_teacher(tmp_path, tiny_bert_dir))}}, [],
         ["has a config.json but no weights"]),
        ("num_cpus_zero", {}, ["--num-cpus", "0"], ["--num-cpus must be >= 1, got 0"]),
        ("num_cpus_negative", {}, ["--num-cpus", "-1"], ["--num-cpus must be >= 1, got -1"]),
        ("cpu_10000", {"tune": {"resources": {"cpu": 10000}}}, [],
         ["tune.resources.cpu", "less than or equal to 4096"]),
        ("cpu_more_than_machine", {"tune": {"resources": {"cpu": _cpus() + 1}}}, [],
         [f"tune.resources.cpu is {_cpus() + 1}", f"this machine has {_cpus()} CPUs"]),
        ("cpu_more_than_num_cpus", {"tune": {"resources": {"cpu": 2}}}, ["--num-cpus", "1"],
         ["tune.resources.cpu is 2", "--num-cpus gives Ray 1 CPUs"]),
        ("epochs_bool", {"train": {"epochs": True}}, [], ["train.epochs", "valid integer", "True"]),
        ("checkpoint_every_zero", {"tune": {"checkpoint_every": 0}}, [],
         ["tune.checkpoint_every", "greater than or equal to 1"]),
        ("keep_students_negative", {"tune": {"keep_students": -1}}, [],
         ["tune.keep_students", "greater than or equal to 0"]),
        ("ray_loggers_string", {"tune": {"ray_loggers": "yes"}}, [], ["tune.ray_loggers", "valid boolean"]),
        ("checkpoint_keep_replaced", {"tune": {"checkpoint_keep": 2}}, [], ["unknown key 'checkpoint_keep' in tune"]),
        ("layers_string", {"student": {"layers": "2"}}, [], ["student.layers", "valid integer", "'2'"]),
        ("trust_remote_code_string", {"teacher": {"trust_remote_code": "yes"}}, [],
         ["teacher.trust_remote_code", "valid boolean"]),
        ("set_bool_as_int", {}, ["--set", "train.epochs=true"], ["train.epochs", "valid integer"]),
        ("strategy_empty_list", {"distill": {"strategy": []}}, [], ["distill.strategy", "at least one"]),
        ("strategy_pair_bool", {"distill": {"strategy": [[1, True]]}}, [], ["distill.strategy.0.1", "valid integer"]),
        ("copy_layers_decreasing", {"student": {"copy_layers": [3, 0]}}, [],
         ["student.copy_layers", "strictly increasing", "[3, 0]"]),
        ("copy_layers_repeated", {"student": {"copy_layers": [1, 1]}}, [], ["student.copy_layers", "no repeats"]),
        ("teacher_head_of_another_size", {"teacher": {"model": str(_three_label_teacher(tmp_path, tiny_bert_dir))}},
         [], ["has a 3-output head", "needs 2", "teacher.finetune"]),
        ("study_is_directory", _dir, [], ["is a directory"]),
        ("study_is_fifo", _fifo, [], ["not a regular file"]),
    ]


def _garbage_store(tmp_path):
    """A file named like a store that holds no database (random bytes)."""
    f = tmp_path / "garbage.db"
    f.write_bytes(bytes(range(256)) * 8)
    return f


def _declared(tmp_path, folder, train, dev="text,label\nfine,pos\nmeh,neg\n", suffix=".csv", **task):
    """A declared classification task (teacher `tiny:bert`, which a run would build under .tunekd_cache/:
    the data must be refused before it is) over the files `train` and `dev` (text or bytes; None: no file)."""
    files = {k: v for k, v in {f"train{suffix}": train, f"dev{suffix}": dev}.items() if v is not None}
    d = _folder_with(tmp_path, folder, files)
    loader = {".csv": "csv", ".jsonl": "json", ".parquet": "parquet"}[suffix]
    data_files = {"train": str(d / f"train{suffix}"), "validation": str(d / f"dev{suffix}")}
    return {"task": {"name": "mine", "kind": "classification", "text_fields": ["text"],
                     "data": {"path": loader, "data_files": data_files}, **task},
            "teacher": {"model": "tiny:bert"}}


def issue19_cases(tmp_path):
    """Issue 19: declared labels that collapsed, data checked only after the teacher was materialised (also on
    --dry-run), a folder of another task, a store that is not a database, the smaller ones."""
    sst_header = "sentence\tlabel\n"
    two_rows = "text,label\ngood,pos\nbad,neg\n"
    outside = _declared(tmp_path, "outside", two_rows)
    outside["task"]["data"]["data_files"]["train"] = "../elsewhere/train.csv"
    hub = {"task": {"name": "mine", "kind": "classification", "text_fields": ["text"],
                    "data": {"path": "someone/no-such-dataset"}}, "teacher": {"model": "tiny:bert"}}
    return [
        ("declared_numeric_labels_1_2", _declared(tmp_path, "n12", "text,label\na,0\nb,1\n", "text,label\nc,1\n",
                                                  labels=[1, 2]), [],
         ["row 0: label 0 is not in the task's labels ['1', '2']", "by value, not as an id"]),
        ("declared_labels_minus_1_1", _declared(tmp_path, "m11", "text,label\na,-1\nb,1\nc,0\n",
                                                "text,label\nc,1\n", labels=[-1, 1]), [],
         ["row 2: label 0 is not in the task's labels ['-1', '1']"]),
        ("declared_one_class", _declared(tmp_path, "oneclass", "text,label\na,pos\nb,pos\n", labels=["pos", "neg"]),
         [], ["every training row has label 'pos'", "at least two classes"]),
        ("declared_missing_file", _declared(tmp_path, "nofile", None), [], ["train.csv does not exist"]),
        ("declared_empty_csv", _declared(tmp_path, "emptycsv", ""), [], ["train.csv is empty"]),
        ("declared_empty_csv_dry_run", _declared(tmp_path, "emptycsv2", ""), ["--dry-run"], ["train.csv is empty"]),
        ("declared_header_only", _declared(tmp_path, "headeronly", "text,label\n"), [],
         ["train.csv has a header but no rows"]),
        ("declared_label_not_in_labels_dry_run", _declared(tmp_path, "notin", two_rows, labels=["pos", "zzz"]),
         ["--dry-run"], ["label 'neg' is not in the task's labels ['pos', 'zzz']"]),
        ("declared_missing_text_column", _declared(tmp_path, "notext", "words,label\na,pos\nb,neg\n"), [],
         ["train.csv: column 'text' is missing; columns found: words, label"]),
        ("declared_label_missing_in_dev_only", _declared(tmp_path, "devnolabel", two_rows, "text\nfine\n"), [],
         ["(validation)", "dev.csv: column 'label' is missing"]),
        ("declared_empty_text_cell", _declared(tmp_path, "emptycell", "text,label\n,pos\nbad,neg\n"), [],
         ["split 'train', row 0, column 'text': expected text, got None"]),
        ("declared_no_eval_split", _declared(tmp_path, "noeval", two_rows, None), [],
         ["dev.csv does not exist"]),
        ("declared_csv_not_utf8", _declared(tmp_path, "latin1csv", b"text,label\n" + NOT_UTF8 + b",pos\nx,neg\n"), [],
         ["train.csv: not UTF-8 text (byte 0xe9 at line 2)"]),
        ("declared_jsonl_broken_line", _declared(tmp_path, "brokenjsonl", '{"text": "a", "label": "pos"}\n{"text": \n',
                                                 '{"text": "b", "label": "neg"}\n', suffix=".jsonl"), [],
         ["train.jsonl, line 2: invalid JSON"]),
        ("declared_text_named_parquet", _declared(tmp_path, "fakeparquet", two_rows, two_rows, suffix=".parquet"), [],
         ["train.parquet is not a Parquet file"]),
        ("declared_offline_hub_id", hub, [], ["could not load task 'mine' from someone/no-such-dataset"]),
        ("declared_path_outside_study_folder", outside, [],
         ["../elsewhere/train.csv does not exist", "relative path is read from the working folder"]),
        ("declared_regression_label_not_number",
         _declared(tmp_path, "regtext", "text,label\na,high\nb,1.5\n", "text,label\nc,0.5\n", kind="regression"), [],
         ["label 'high' of regression task 'mine' is not a finite number"]),
        ("folder_of_another_task", {"task": {"name": "cola", "data_dir": str(_folder_with(tmp_path, "sst2like", {
            "train.tsv": sst_header + "good \t1\nbad \t0\n", "dev.tsv": sst_header + "fine \t1\n"}))},
            "teacher": {"model": "tiny:bert"}}, [], ["this is a sst2 file", "not one of task 'cola'"]),
        ("builtin_one_class", {"task": {"name": "sst2", "data_dir": str(_folder_with(tmp_path, "sst2oneclass", {
            "train.tsv": sst_header + "good \t1\nfine \t1\n", "dev.tsv": sst_header + "ok \t1\n"}))}}, [],
         ["every training row has label 'positive'"]),
        ("store_not_a_database", {}, ["--tracking-uri", f"sqlite:///{_garbage_store(tmp_path)}"],
         ["is not an SQLite database"]),
        ("set_lr_100000_digits", {}, ["--set", "train.lr=" + "1" * 100_000], ["an integer of 100000 digits"]),
        ("grid_value_repeated", {}, ["--set", "search.student.init.grid=[copy, copy]"],
         ["grid value 'copy' is given twice"]),
        ("per_value_not_a_value", {"search": {"student.init": {"grid": ["copy", "random"],
                                                               "per_value": {"rand": {"train.lr": 1e-3}}}}}, [],
         ["search.student.init", "per_value: 'rand' is not one of its values"]),
        ("per_value_on_a_range", {"search": {"train.lr": {"uniform": [1e-4, 1e-3], "per_value": {1: {}}}},
                                  "tune": {"searcher": "random"}}, [],
         ["search.train.lr", "per_value needs a grid or choice dimension"]),
        ("per_value_sets_the_teacher", {"search": {"student.init": {"grid": ["copy", "random"],
                                                                    "per_value": {"random": {"teacher.model": "x"}}}}},
         [], ["per_value.random.teacher.model", "must be a key of student, distill, train"]),
        ("per_value_sets_a_searched_key", {"search": {"student.init": {"grid": ["copy", "random"],
                                                                       "per_value": {"random": {"seed": 1}}},
                                                      "seed": {"grid": [0, 1]}}}, [],
         ["per_value.random.seed", "must be a key of"]),
        ("per_value_bad_value", {"search": {"student.init": {"grid": ["copy", "random"],
                                                             "per_value": {"random": {"train.lr": -1}}}}}, [],
         ["search.student.init: value 'random'", "train.lr", "greater than 0"]),
        ("run_without_study", None, [], ["the following arguments are required: study"]),
    ]


def tool_cases(tmp_path, tiny_bert_dir):
    """(id, the tool's main, its arguments, words expected in the message): report and angles."""
    a_file = _file(tmp_path, "a_file")
    latin1 = _folder_with(tmp_path, "latin1", {"train.tsv": b"sentence\tlabel\n" + NOT_UTF8 + b" \t1\n",
                                               "dev.tsv": b"sentence\tlabel\n" + NOT_UTF8 + b" \t1\n"})
    return [
        ("report_out_is_file", report.main, ["--experiment", "e", "--out", str(a_file)], ["--out", "is a file"]),
        ("report_margin_nan", report.main, ["--experiment", "e", "--margin", "nan"],
         ["--margin must be a finite number > 0, got nan"]),
        ("report_margin_zero", report.main, ["--experiment", "e", "--margin", "0"], ["--margin", "got 0.0"]),
        ("report_tracking_ftp", report.main, ["--experiment", "e", "--tracking-uri", "ftp://example.org/x"],
         ["scheme 'ftp' is not supported"]),
        ("report_alpha_nan", report.main, ["--experiment", "e", "--alpha", "nan"], ["--alpha must be in (0, 0.5)"]),
        ("angles_samples_huge", angles.main, ["--samples", "100000000"], ["--samples must be in 1..100000"]),
        ("angles_out_is_file", angles.main, ["--out", str(a_file)], ["--out", "is a file"]),
        ("angles_layers_zero", angles.main, ["--layers", "0"], ["--layers must be in 1..1024, got 0"]),
        ("list_store_not_a_database", studies.main_list, ["--tracking-uri", f"sqlite:///{_garbage_store(tmp_path)}"],
         ["is not an SQLite database"]),
        ("compare_store_not_a_database", studies.main_compare,
         ["a", "b", "--tracking-uri", f"sqlite:///{_garbage_store(tmp_path)}"], ["is not an SQLite database"]),
        ("report_store_not_a_database", report.main,
         ["--experiment", "e", "--tracking-uri", f"sqlite:///{_garbage_store(tmp_path)}"], ["is not an SQLite database"]),
        ("compare_one_study", studies.main_compare, ["onlyone"],
         ["the following arguments are required: B", "tunekd compare --help"]),
        ("angles_data_not_utf8", angles.main, ["--teacher", str(tiny_bert_dir), "--task", "sst2", "--data-dir",
                                               str(latin1), "--samples", "4"], ["not UTF-8 text", ".tsv"]),
    ]


def _case_ids(table=None):
    import tempfile

    scratch = Path(tempfile.mkdtemp())
    (scratch / "model").mkdir()
    try:
        return [c[0] for c in (table or cases)(scratch, scratch / "model")]
    finally:
        shutil.rmtree(scratch)


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def no_ray(monkeypatch):
    """Every bad input fails before Ray starts."""
    import ray

    def refuse(*args, **kwargs):
        pytest.fail("ray.init was called: the bad input was not caught before Ray starts")

    monkeypatch.setattr(ray, "init", refuse)


def _merge(base, edits):
    out = json.loads(json.dumps(base))
    for key, value in edits.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _assert_one_line(code, err, words):
    assert code == 2, err
    assert err.startswith("tunekd: error: ") and "\n" not in err, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("case_id", _case_ids() + _case_ids(lambda tmp, _model: issue19_cases(tmp)))
def test_bad_input(case_id, tmp_path, tiny_bert_dir, capsys, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNEKD_TINY_DIR", raising=False)  # a `tiny:` teacher would be built under .tunekd_cache/
    (case,) = [c for c in cases(tmp_path, tiny_bert_dir) + issue19_cases(tmp_path) if c[0] == case_id]
    _, edits, extra, words = case
    study = tmp_path / "study.yaml"
    if edits is None:  # no study file argument at all
        study = None
    elif callable(edits):  # the study path itself is the problem (a folder, a FIFO)
        edits(study)
    elif isinstance(edits, (str, bytes)):
        text = edits.replace(b"TINY", str(tiny_bert_dir).encode()) if isinstance(edits, bytes) \
            else edits.replace("TINY", str(tiny_bert_dir))
        study.write_bytes(text) if isinstance(text, bytes) else study.write_text(text)
    else:
        raw = _merge(BASE, edits)
        if raw["teacher"]["model"] == "TINY":
            raw["teacher"]["model"] = str(tiny_bert_dir)
        study.write_text(yaml.safe_dump(raw))
    before = _listing(tmp_path)
    code = _exit_code(cli.main, [str(study)] * (study is not None) + extra)
    _assert_one_line(code, capsys.readouterr().err.strip(), words)
    assert _listing(tmp_path) == before  # nothing written: no mlflow.db, ray_results/, .tunekd_cache/


def _exit_code(main, argv) -> int:
    """The exit code of a CLI's main: returned, or (a usage error, from argparse) raised as SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("case_id", _case_ids(tool_cases))
def test_bad_tool_input(case_id, tmp_path, tiny_bert_dir, capsys, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    (case,) = [c for c in tool_cases(tmp_path, tiny_bert_dir) if c[0] == case_id]
    _, main, argv, words = case
    before = _listing(tmp_path)
    code = _exit_code(main, argv)
    _assert_one_line(code, capsys.readouterr().err.strip(), words)
    assert _listing(tmp_path) == before


def test_duplicate_keys_through_merge_keys_are_allowed():
    """A YAML merge key (`<<: *base`) may be overridden by the keys next to it; that is not a duplicate."""
    from tunekd.study import load_yaml

    assert load_yaml("base: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}\n")["c"] == {"x": 3, "y": 2}


def test_yaml12_exponent_floats_are_floats():
    """`lr: 1e-4` is a float (YAML 1.2), not the string PyYAML's YAML 1.1 rules make of it, so the strict
    float fields accept it; a quoted '1e-4' stays a string and is refused."""
    from tunekd.study import load_yaml, validate

    raw = load_yaml("name: x\ntask: {name: synthetic}\nteacher: {model: minilm}\ntrain: {lr: 1e-4}\n")
    assert raw["train"]["lr"] == pytest.approx(1e-4) and validate(raw).train.lr == pytest.approx(1e-4)
    raw["train"]["lr"] = "1e-4"
    with pytest.raises(Exception, match="train.lr: Input should be a valid number"):
        validate(raw)


@pytest.mark.parametrize("key", ["tune.storage_path", "teacher.cache_dir"])
def test_unwritable_folder_is_one_line(key, tmp_path, monkeypatch):
    """Read-only folders cannot be made as root (root writes anywhere), so the permission answer is
    replaced: an existing folder and a folder still to be created under it are both refused."""
    from tunekd.checks import check_writable_dir
    from tunekd.errors import ConfigError

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=rf"^{key} '.*' is not writable; give a folder you can write to$"):
        check_writable_dir(tmp_path, key)
    with pytest.raises(ConfigError, match=r"is not writable \(its existing parent '.*' is not\)"):
        check_writable_dir(tmp_path / "new" / "runs", key)
