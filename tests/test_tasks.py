"""Tasks: specs, local loaders on the real shared data, errors, the synthetic task, metrics."""

from __future__ import annotations

import collections
import csv
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tunekd.errors import ConfigError  # noqa: E402
from tunekd.tasks import TASKS, compute_metrics, get_task, load_task, synthetic_label  # noqa: E402
from tunekd.tasks.synthetic import NEGATIVE, NEGATORS, POSITIVE  # noqa: E402

from tests.helpers import DATA_DIR, shared_data as _data  # noqa: E402


def _check_columns(dsd, spec):
    assert set(dsd) == {"train", *spec.eval_splits}
    for split, ds in dsd.items():
        assert ds.column_names == [*spec.text_fields, "label"], split
        labels = set(ds["label"])
        assert labels <= set(range(spec.num_labels)), split


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_and_specs():
    assert set(TASKS) == {"sst2", "mnli", "qqp", "qnli", "cola", "stsb", "mrpc", "rte", "wnli", "synthetic", "dart",
                          "wmt16_en_ro", "hellaswag", "commonsenseqa"}
    mnli = get_task("mnli")
    assert mnli.label_names == ("entailment", "neutral", "contradiction")
    assert mnli.num_labels == 3
    assert mnli.eval_splits == ("validation_matched", "validation_mismatched")
    assert mnli.metrics == ("accuracy", "accuracy_mm")
    assert mnli.text_fields == ("text_a", "text_b")
    assert get_task("qqp").metrics == ("accuracy", "f1")
    assert get_task("sst2").hub == ("nyu-mll/glue", "sst2")
    assert get_task("sst2").text_fields == ("text_a",)
    assert get_task("qnli").label_names == ("entailment", "not_entailment")
    assert get_task("synthetic").hub is None
    kinds = {"dart": "generation", "wmt16_en_ro": "generation", "hellaswag": "multiple_choice",
             "commonsenseqa": "multiple_choice", "stsb": "regression"}
    for spec in TASKS.values():
        assert spec.kind == kinds.get(spec.name, "classification")


def test_unknown_task_suggests():
    with pytest.raises(ConfigError, match=r"unknown task 'sst'.*did you mean 'sst2'"):
        get_task("sst")
    with pytest.raises(ConfigError, match="unknown task 'mnlii'"):
        load_task("mnlii")


# ---------------------------------------------------------------------------------------------
# real shared data


@pytest.fixture(scope="module")
def sst2():
    return load_task("sst2", str(_data("sst2")))


def test_sst2_real(sst2):
    _check_columns(sst2, get_task("sst2"))
    assert len(sst2["train"]) == 67_349
    assert len(sst2["validation"]) == 872
    assert set(sst2["train"]["label"]) == {0, 1}
    assert set(sst2["validation"]["label"]) == {0, 1}
    assert sst2["validation"][0] == {"text_a": "it 's a charming and often affecting journey . ", "label": 1}
    assert collections.Counter(sst2["validation"]["label"]) == {1: 444, 0: 428}
    assert collections.Counter(sst2["train"]["label"]) == {1: 37_569, 0: 29_780}


def test_mnli_json_and_textfooler_real():
    folder = _data("mnli")
    spec = get_task("mnli")
    dsd = load_task("mnli", folder)
    _check_columns(dsd, spec)
    assert len(dsd["train"]) == 9_999
    assert len(dsd["validation_matched"]) == 1_000
    assert len(dsd["validation_mismatched"]) == 1_000

    # train: the 8,999 file first, then the 1,000 file; check against the raw JSON
    raw = json.loads((folder / "train_sample_8999.json").read_text(encoding="utf-8"))
    ids = {"entailment": 0, "neutral": 1, "contradiction": 2}
    for key in ("0", "1", "2", "4321"):
        row = dsd["train"][int(key)]
        assert row["text_a"] == raw[key]["text_a"]
        assert row["text_b"] == raw[key]["text_b"]
        assert row["label"] == ids[raw[key]["label"]]
    first_contradiction = next(k for k, r in raw.items() if r["label"] == "contradiction")
    assert dsd["train"][int(first_contradiction)]["label"] == 2
    raw_1000 = json.loads((folder / "train_sample_1000.json").read_text(encoding="utf-8"))
    assert dsd["train"][8_999]["text_a"] == raw_1000["0"]["text_a"]
    assert raw_1000["1"]["label"] == "contradiction" and dsd["train"][9_000]["label"] == 2
    assert collections.Counter(dsd["train"]["label"][:8_999]) == {0: 3_061, 1: 2_980, 2: 2_958}

    # eval: TextFooler, no header, label<TAB>premise<TAB>hypothesis
    with (folder / "dev_matched_textfooler_1k.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    neutral = next(i for i, r in enumerate(rows) if r[0] == "neutral")
    assert dsd["validation_matched"][neutral] == {"text_a": rows[neutral][1], "text_b": rows[neutral][2], "label": 1}
    assert dsd["validation_matched"][0]["label"] == ids[rows[0][0]]
    assert collections.Counter(dsd["validation_matched"]["label"]) == {0: 373, 2: 316, 1: 311}
    assert collections.Counter(dsd["validation_mismatched"]["label"]) == {0: 346, 2: 335, 1: 319}


def test_mnli_kshot_glue_header(tmp_path):
    kshot = _data("mnli") / "k-shot" / "16-13"
    (tmp_path / "train.tsv").symlink_to(kshot / "train.tsv")
    (tmp_path / "dev_matched.tsv").symlink_to(kshot / "dev_matched.tsv")
    (tmp_path / "dev_mismatched.tsv").symlink_to(kshot / "dev_matched.tsv")
    dsd = load_task("mnli", tmp_path)
    _check_columns(dsd, get_task("mnli"))
    assert len(dsd["train"]) == 48
    assert collections.Counter(dsd["train"]["label"]) == {0: 16, 1: 16, 2: 16}
    with (kshot / "train.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    for i in (0, 20, 47):
        assert dsd["train"][i]["text_a"] == rows[i]["sentence1"]
        assert dsd["train"][i]["text_b"] == rows[i]["sentence2"]
        assert dsd["train"][i]["label"] == get_task("mnli").label_names.index(rows[i]["gold_label"])
    assert dsd["validation_mismatched"]["text_a"] == dsd["validation_matched"]["text_a"]


def test_qqp_json_real():
    dsd = load_task("qqp", _data("qqp"))
    _check_columns(dsd, get_task("qqp"))
    assert len(dsd["train"]) == 8_999
    assert len(dsd["validation"]) == 1_000  # held-out train sample, see load_local's docstring
    assert collections.Counter(dsd["train"]["label"]) == {0: 5_747, 1: 3_252}


def test_qnli_real():
    folder = _data("qnli")
    dsd = load_task("qnli", folder)
    _check_columns(dsd, get_task("qnli"))
    assert len(dsd["train"]) == 9_999
    assert len(dsd["validation"]) == 5_463
    assert collections.Counter(dsd["validation"]["label"]) == {0: 2_702, 1: 2_761}
    with (folder / "dev.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0]["label"] == "entailment" and dsd["validation"][0]["label"] == 0
    assert rows[1]["label"] == "not_entailment" and dsd["validation"][1]["label"] == 1
    assert dsd["validation"][0]["text_a"] == rows[0]["question"]
    assert dsd["validation"][0]["text_b"] == rows[0]["sentence"]


def test_parent_data_folder_is_accepted():
    _data("qqp")
    dsd = load_task("qqp", DATA_DIR)
    assert len(dsd["train"]) == 8_999


def test_max_samples_subset_deterministic():
    folder = _data("qnli")
    a = load_task("qnli", folder, max_train_samples=100, max_eval_samples=50, seed=3)
    b = load_task("qnli", folder, max_train_samples=100, max_eval_samples=50, seed=3)
    c = load_task("qnli", folder, max_train_samples=100, max_eval_samples=50, seed=4)
    assert len(a["train"]) == 100 and len(a["validation"]) == 50
    assert a["train"].to_dict() == b["train"].to_dict()
    assert a["validation"].to_dict() == b["validation"].to_dict()
    assert a["train"]["text_a"] != c["train"]["text_a"]
    full = load_task("qnli", folder)
    assert set(a["train"]["text_b"]) <= set(full["train"]["text_b"])
    assert a["train"]["text_a"] != full["train"]["text_a"][:100]  # shuffled, not the head
    big = load_task("qnli", folder, max_eval_samples=10**9)
    assert len(big["validation"]) == 5_463


# ---------------------------------------------------------------------------------------------
# local files written here: formats and errors


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_quote_none_and_label_names(tmp_path):
    _write(tmp_path / "train.tsv", 'sentence\tlabel\na "quoted" film \t1\nbad\t0\n\n')
    _write(tmp_path / "dev.tsv", "sentence\tlabel\nfine\tpositive\n")
    dsd = load_task("sst2", tmp_path)
    assert dsd["train"]["text_a"] == ['a "quoted" film ', "bad"]
    assert dsd["train"]["label"] == [1, 0]
    assert dsd["validation"]["label"] == [1]


def test_json_list_and_jsonl_records(tmp_path):
    from tunekd.tasks.glue import read_file

    spec = get_task("qnli")
    recs = [{"text_a": "q?", "text_b": "s.", "label": "not_entailment"}, {"text_a": "q2?", "text_b": "s2.", "label": 0}]
    lst = _write(tmp_path / "a.json", json.dumps(recs))
    jl = _write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n")
    for path in (lst, jl):
        assert read_file(spec, path) == {"text_a": ["q?", "q2?"], "text_b": ["s.", "s2."], "label": [1, 0]}
    # sst2-like files have no text_b
    one = _write(tmp_path / "c.json", json.dumps({"0": {"text_a": "great", "label": "1"}}))
    assert read_file(get_task("sst2"), one) == {"text_a": ["great"], "label": [1]}


def test_error_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"data folder .*nope.* does not exist"):
        load_task("sst2", tmp_path / "nope")


def test_error_missing_split_file(tmp_path):
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "train.tsv", "sentence\tlabel\nok\t1\n")
    with pytest.raises(ConfigError) as e:
        load_task("sst2", tmp_path)
    msg = str(e.value)
    assert "'validation'" in msg and "dev.tsv" in msg and str(tmp_path) in msg
    with pytest.raises(ConfigError) as e:
        load_task("qqp", tmp_path / "empty")  # an existing folder without any of the files
    msg = str(e.value)
    assert "'train'" in msg and "train.tsv" in msg and "train_sample_8999.json" in msg


def test_error_missing_column(tmp_path):
    _write(tmp_path / "train.tsv", "sentence\tscore\nok\t1\n")
    _write(tmp_path / "dev.tsv", "sentence\tlabel\nok\t1\n")
    with pytest.raises(ConfigError) as e:
        load_task("sst2", tmp_path)
    msg = str(e.value)
    assert "train.tsv" in msg and "'label'" in msg and "missing" in msg and "sentence, score" in msg


def test_error_missing_json_field(tmp_path):
    _write(tmp_path / "train_sample_8999.json", json.dumps({"0": {"text_a": "a", "label": "1"}}))
    _write(tmp_path / "train_sample_1000.json", json.dumps({"0": {"text_a": "a", "text_b": "b", "label": "1"}}))
    with pytest.raises(ConfigError, match=r"train_sample_8999\.json.*'question2'.*missing.*text_a, label"):
        load_task("qqp", tmp_path)


def test_error_label_outside_set(tmp_path):
    _write(tmp_path / "train.tsv", "sentence\tlabel\nok\t1\nhmm\t2\n")
    _write(tmp_path / "dev.tsv", "sentence\tlabel\nok\t1\n")
    with pytest.raises(ConfigError) as e:
        load_task("sst2", tmp_path)
    msg = str(e.value)
    assert "train.tsv" in msg and "line 3" in msg and "'2'" in msg and "'negative'" in msg and "'positive'" in msg
    _write(tmp_path / "dev_matched.tsv", "maybe\tp\th\n")
    with pytest.raises(ConfigError, match=r"dev_matched\.tsv, line 1.*'maybe'.*'entailment'"):
        from tunekd.tasks.glue import read_file

        read_file(get_task("mnli"), tmp_path / "dev_matched.tsv")


def test_error_wrong_field_count(tmp_path):
    _write(tmp_path / "train.tsv", "sentence\tlabel\nok\t1\ntoo\tmany\t1\n")
    _write(tmp_path / "dev.tsv", "sentence\tlabel\nok\t1\n")
    with pytest.raises(ConfigError, match=r"train\.tsv, line 3: 3 tab-separated fields, expected 2"):
        load_task("sst2", tmp_path)


def test_error_empty_file(tmp_path):
    _write(tmp_path / "train.tsv", "sentence\tlabel\n")
    _write(tmp_path / "dev.tsv", "")
    with pytest.raises(ConfigError, match=r"train\.tsv has no rows"):
        load_task("sst2", tmp_path)
    _write(tmp_path / "train.tsv", "sentence\tlabel\nok\t1\n")
    with pytest.raises(ConfigError, match=r"dev\.tsv has no rows"):
        load_task("sst2", tmp_path)
    (tmp_path / "qqp").mkdir()
    _write(tmp_path / "qqp" / "train_sample_8999.json", "{}")
    _write(tmp_path / "qqp" / "train_sample_1000.json", "[]")
    with pytest.raises(ConfigError, match=r"train_sample_8999\.json has no rows"):
        load_task("qqp", tmp_path / "qqp")


def test_error_headerless_tsv_for_non_mnli(tmp_path):
    _write(tmp_path / "train.tsv", "ok\t1\n")
    _write(tmp_path / "dev.tsv", "sentence\tlabel\nok\t1\n")
    with pytest.raises(ConfigError, match="not a GLUE header"):
        load_task("sst2", tmp_path)


def test_bad_max_samples(tmp_path):
    with pytest.raises(ConfigError, match="max_train_samples"):
        load_task("synthetic", max_train_samples=0)


# ---------------------------------------------------------------------------------------------
# hub path (no network: datasets.load_dataset is replaced)


def test_hub_columns_are_mapped(monkeypatch):
    def fake(path, name):
        assert (path, name) == ("nyu-mll/glue", "mnli")
        feats = datasets.Features(
            {
                "premise": datasets.Value("string"),
                "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                "idx": datasets.Value("int32"),
            }
        )
        row = {"premise": ["p", "q"], "hypothesis": ["h", "i"], "label": [2, 0], "idx": [0, 1]}  # two classes
        splits = ("train", "validation_matched", "validation_mismatched")
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(row, features=feats) for s in splits})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    dsd = load_task("mnli")
    _check_columns(dsd, get_task("mnli"))
    assert dsd["validation_mismatched"][0] == {"text_a": "p", "text_b": "h", "label": 2}


def test_hub_failure_is_config_error(monkeypatch):
    def fail(path, name):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(ConfigError, match=r"could not load task 'sst2' from the hub \(.*\); set task\.data_dir"):
        load_task("sst2")


# ---------------------------------------------------------------------------------------------
# synthetic


@pytest.mark.parametrize(
    "sentence, label",
    [
        ("the movie was not good but the acting was great", 1),
        ("good but not great", 0),
        ("never not bad", 0),
        ("the plot was bad", 0),
        ("the plot was hardly bad", 1),
        ("not awful but never not dull", 0),
        ("terrible but the ending is never bad", 1),
        ("good", 1),
    ],
)
def test_synthetic_rule(sentence, label):
    assert synthetic_label(sentence) == label
    assert synthetic_label(sentence.split()) == label


def test_synthetic_rule_needs_sentiment_word():
    with pytest.raises(ValueError):
        synthetic_label("good but the movie")


def test_synthetic_determinism_and_shape():
    a = load_task("synthetic", seed=7)
    b = load_task("synthetic", seed=7)
    c = load_task("synthetic", seed=8)
    _check_columns(a, get_task("synthetic"))
    assert len(a["train"]) == 2000 and len(a["validation"]) == 500
    assert a["train"].to_dict() == b["train"].to_dict()
    assert a["validation"].to_dict() == b["validation"].to_dict()
    assert a["train"]["text_a"] != c["train"]["text_a"]
    # the seed option wins over the seed argument
    d = load_task("synthetic", seed=99, synthetic={"seed": 7})
    assert d["train"].to_dict() == a["train"].to_dict()
    # train and eval come from different streams and do not share sentences
    assert not set(a["train"]["text_a"]) & set(a["validation"]["text_a"])


def test_synthetic_labels_follow_rule_and_are_balanced():
    dsd = load_task("synthetic", synthetic={"train_size": 1000, "eval_size": 301, "max_words": 9}, seed=1)
    vocab = set(POSITIVE) | set(NEGATIVE) | set(NEGATORS)
    for split, ds in dsd.items():
        labels = np.array(ds["label"])
        assert abs(labels.mean() - 0.5) <= 0.05, split
        for row in ds:
            words = row["text_a"].split()
            assert 1 <= len(words) <= 9
            assert synthetic_label(words) == row["label"]
            assert any(w in vocab for w in words)
    texts = dsd["train"]["text_a"]
    assert any(" but " in t for t in texts) and any(" but " not in t for t in texts)
    assert any(any(n in t.split() for n in NEGATORS) for t in texts)


def test_synthetic_options_validated():
    with pytest.raises(ConfigError, match=r"unknown synthetic task option 'train_sizes'.*did you mean 'train_size'"):
        load_task("synthetic", synthetic={"train_sizes": 10})
    with pytest.raises(ConfigError, match="max_words"):
        load_task("synthetic", synthetic={"max_words": 2})
    with pytest.raises(ConfigError, match="does not exist"):  # options for other tasks are ignored
        load_task("sst2", "/nonexistent", synthetic={"train_size": 10})
    small = load_task("synthetic", synthetic={"train_size": 20, "eval_size": 10, "max_words": 3})
    assert all(len(t.split()) <= 3 for t in small["train"]["text_a"])


def test_synthetic_subset():
    a = load_task("synthetic", max_train_samples=100, max_eval_samples=30, seed=2)
    b = load_task("synthetic", max_train_samples=100, max_eval_samples=30, seed=2)
    assert len(a["train"]) == 100 and len(a["validation"]) == 30
    assert a["train"].to_dict() == b["train"].to_dict()


# ---------------------------------------------------------------------------------------------
# metrics


def test_accuracy_and_f1_by_hand():
    pred = np.array([1, 0, 1, 1, 0, 1])
    ref = np.array([1, 0, 0, 1, 1, 1])
    # 4 of 6 right; class 1: tp=3 (0, 3, 5), fp=1 (2), fn=1 (4) -> P=R=3/4 -> F1=3/4
    out = compute_metrics(get_task("qqp"), {"validation": pred}, {"validation": ref})
    assert list(out) == ["accuracy", "f1"]
    assert out["accuracy"] == pytest.approx(400 / 6)
    assert out["f1"] == pytest.approx(75.0)

    pred = np.array([1, 1, 1, 0, 0])
    ref = np.array([1, 0, 0, 0, 1])
    # tp=1, fp=2, fn=1 -> P=1/3, R=1/2 -> F1 = 2PR/(P+R) = (1/3)/(5/6) = 0.4
    out = compute_metrics(get_task("qqp"), {"validation": pred}, {"validation": ref})
    assert out == pytest.approx({"accuracy": 40.0, "f1": 40.0})

    out = compute_metrics(get_task("qqp"), {"validation": np.zeros(4)}, {"validation": np.zeros(4)})
    assert out == {"accuracy": 100.0, "f1": 0.0}


def test_mnli_metrics_and_logits():
    spec = get_task("mnli")
    logits = np.array([[2.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.0, 0.1, 3.0], [5.0, 0.0, 0.0]])  # -> 0, 1, 2, 0
    preds = {"validation_matched": logits, "validation_mismatched": np.array([0, 0, 2])}
    refs = {"validation_matched": np.array([0, 1, 2, 2]), "validation_mismatched": np.array([0, 1, 2])}
    out = compute_metrics(spec, preds, refs)
    assert out == pytest.approx({"accuracy": 75.0, "accuracy_mm": 200 / 3})
    assert compute_metrics(get_task("sst2"), {"validation": [1, 0]}, {"validation": [1, 1]}) == {"accuracy": 50.0}
    with pytest.raises(ValueError, match="validation_mismatched"):
        compute_metrics(spec, {"validation_matched": logits}, refs)
    with pytest.raises(ValueError, match="3 predictions but 4 references"):
        compute_metrics(get_task("sst2"), {"validation": [1, 0, 1]}, {"validation": [1, 1, 0, 0]})


def test_qqp_kshot_glue_header(tmp_path):
    kshot = _data("qqp") / "k-shot" / "16-13"
    (tmp_path / "train.tsv").symlink_to(kshot / "train.tsv")
    (tmp_path / "dev.tsv").symlink_to(kshot / "dev.tsv")
    dsd = load_task("qqp", tmp_path)
    _check_columns(dsd, get_task("qqp"))
    assert len(dsd["train"]) == 32 and len(dsd["validation"]) == 32
    assert collections.Counter(dsd["train"]["label"]) == {0: 16, 1: 16}
    with (kshot / "train.tsv").open(encoding="utf-8", newline="") as f:
        row = next(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert dsd["train"][0] == {"text_a": row["question1"], "text_b": row["question2"], "label": int(row["is_duplicate"])}
