"""The GLUE tasks added as table entries: CoLA, MRPC, RTE on their real files in ../shared/data,
STS-B and WNLI on small files in GLUE's real layouts, every one from a local copy of the hub's
(nyu-mll/glue) parquet layout through datasets.load_dataset, and their metrics against the formulas."""

from __future__ import annotations

import collections
import csv
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tunekd.errors import ConfigError  # noqa: E402
from tunekd.tasks import compute_metrics, get_task, load_task  # noqa: E402

from tests.helpers import shared_data as _data  # noqa: E402


def _tsv_rows(path: Path, header: bool = True):
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [r for r in reader if r]
    return (rows[0], rows[1:]) if header else (None, rows)


def _json_rows(path: Path):
    return list(json.loads(path.read_text(encoding="utf-8")).values())


def test_table_entries():
    expected = {  # kind, HF glue label names (index = id), metrics
        "cola": ("classification", ("unacceptable", "acceptable"), ("matthews",)),
        "stsb": ("regression", (), ("pearson", "spearman")),
        "mrpc": ("classification", ("not_equivalent", "equivalent"), ("accuracy", "f1")),
        "rte": ("classification", ("entailment", "not_entailment"), ("accuracy",)),
        "wnli": ("classification", ("not_entailment", "entailment"), ("accuracy",)),
    }
    for name, (kind, labels, metrics) in expected.items():
        spec = get_task(name)
        assert (spec.kind, spec.label_names, spec.metrics) == (kind, labels, metrics)
        assert spec.hub == ("nyu-mll/glue", name)
        assert spec.eval_splits == ("validation",)
    assert get_task("stsb").num_labels == 1
    assert get_task("cola").text_fields == ("text_a",)
    assert get_task("mrpc").text_fields == ("text_a", "text_b")


# ---------------------------------------------------------------------------------------------
# real shared data: PowerfulPromptFT JSON train parts + the official dev.tsv


def test_cola_real():
    folder = _data("cola")
    dsd = load_task("cola", folder)
    assert {k: len(v) for k, v in dsd.items()} == {"train": 8551, "validation": 1043}
    assert collections.Counter(dsd["validation"]["label"]) == {1: 721, 0: 322}  # SOURCE.md: 1 = acceptable
    assert dsd["validation"].features["label"].names == ["unacceptable", "acceptable"]
    _, rows = _tsv_rows(folder / "dev.tsv", header=False)  # source, label, mark, sentence
    assert len(rows) == 1043
    for i in (0, 500, 1042):
        assert dsd["validation"][i] == {"text_a": rows[i][3], "label": int(rows[i][1])}
    train = _json_rows(folder / "train_part_7695.json") + _json_rows(folder / "train_part_856.json")
    for i in (0, 7694, 7695, 8550):
        assert dsd["train"][i] == {"text_a": train[i]["text_a"], "label": int(train[i]["label"])}


def test_mrpc_real():
    folder = _data("mrpc")
    dsd = load_task("mrpc", folder)
    assert {k: len(v) for k, v in dsd.items()} == {"train": 3667, "validation": 408}
    assert collections.Counter(dsd["validation"]["label"]) == {1: 279, 0: 129}  # 1 = paraphrase
    header, rows = _tsv_rows(folder / "dev.tsv")  # UTF-8 BOM, "Quality #1 ID #2 ID #1 String #2 String"
    assert header == ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    for i in (0, 407):
        assert dsd["validation"][i] == {"text_a": rows[i][3], "text_b": rows[i][4], "label": int(rows[i][0])}
    train = _json_rows(folder / "train_part_3300.json") + _json_rows(folder / "train_part_367.json")
    for i in (0, 3300, 3666):
        want = {"text_a": train[i]["text_a"], "text_b": train[i]["text_b"], "label": int(train[i]["label"])}
        assert dsd["train"][i] == want


def test_rte_real():
    folder = _data("rte")
    dsd = load_task("rte", folder)
    assert {k: len(v) for k, v in dsd.items()} == {"train": 2489, "validation": 277}
    assert collections.Counter(dsd["validation"]["label"]) == {0: 146, 1: 131}  # entailment = 0
    header, rows = _tsv_rows(folder / "dev.tsv")
    assert header == ["index", "sentence1", "sentence2", "label"]
    ids = {"entailment": 0, "not_entailment": 1}
    for i in (0, 1, 276):
        assert dsd["validation"][i] == {"text_a": rows[i][1], "text_b": rows[i][2], "label": ids[rows[i][3]]}
    train = _json_rows(folder / "train_part_2240.json") + _json_rows(folder / "train_part_249.json")
    assert dsd["train"][2240] == {"text_a": train[2240]["text_a"], "text_b": train[2240]["text_b"],
                                  "label": ids[train[2240]["label"]]}


# ---------------------------------------------------------------------------------------------
# GLUE's own TSV layouts, written here (STS-B, WNLI are not in the shared data; CoLA's train.tsv)

STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
STSB_TRAIN = [
    "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n",
    "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a large flute.\tA man is playing a flute.\t3.800\n",
    "2\tmain-captions\tMSRvid\t2012test\t0005\tnone\tnone\tA man is spreading shreded cheese on a pizza.\t"
    "A man is spreading shredded cheese on an uncooked pizza.\t3.800\n",
]
STSB_DEV = [
    "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\t"
    "A man wearing a hard hat is dancing.\t5.000\n",
    "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child is riding a horse.\t"
    "A child is riding a horse.\t4.750\n",
]
WNLI_HEADER = "index\tsentence1\tsentence2\tlabel\n"
WNLI_TRAIN = [
    "0\tI stuck a pin through a carrot. When I pulled the pin out, it left a hole.\tThe carrot has a hole.\t1\n",
    "1\tJohn couldn't see the stage with Billy in front of him because he is so short.\tJohn is so short.\t1\n",
    "2\tThe police arrested all of the gang members. They were trying to stop the drug trade in the "
    "neighborhood.\tThe police were trying to stop the drug trade in the neighborhood.\t1\n",
]
WNLI_DEV = [
    "0\tThe drain is clogged with hair. It has to be cleaned.\tThe hair has to be cleaned.\t0\n",
    "1\tJane knocked on Susan's door but she did not answer.\tSusan did not answer.\t1\n",
]


def _write(path: Path, lines) -> Path:
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_stsb_glue_tsv(tmp_path):
    _write(tmp_path / "train.tsv", [STSB_HEADER, *STSB_TRAIN])
    _write(tmp_path / "dev.tsv", [STSB_HEADER, *STSB_DEV])
    dsd = load_task("stsb", tmp_path)
    assert dsd["train"].column_names == ["text_a", "text_b", "label"]
    assert dsd["train"].features["label"] == datasets.Value("float32")
    assert dsd["train"]["label"] == pytest.approx([5.0, 3.8, 3.8])
    assert dsd["validation"][1]["text_a"] == "A young child is riding a horse."
    assert dsd["validation"]["label"] == pytest.approx([5.0, 4.75])
    _write(tmp_path / "dev.tsv", [STSB_HEADER, STSB_DEV[0].replace("5.000", "five")])
    with pytest.raises(ConfigError, match=r"dev\.tsv, line 2: label 'five' of regression task 'stsb' is not a finite"):
        load_task("stsb", tmp_path)


def test_wnli_glue_tsv(tmp_path):
    _write(tmp_path / "train.tsv", [WNLI_HEADER, *WNLI_TRAIN, *WNLI_DEV])  # both classes (one alone is refused)
    _write(tmp_path / "dev.tsv", [WNLI_HEADER, *WNLI_DEV])
    dsd = load_task("wnli", tmp_path)
    assert dsd["train"]["label"] == [1, 1, 1, 0, 1]  # GLUE/HF WNLI: 1 = entailment
    assert dsd["validation"]["label"] == [0, 1]
    assert dsd["validation"].features["label"].int2str(1) == "entailment"
    assert dsd["validation"][0]["text_b"] == "The hair has to be cleaned."


def test_cola_glue_train_tsv_without_header(tmp_path):
    (tmp_path / "train.tsv").write_text("gj04\t1\t\tOur friends won't buy this analysis.\n"
                                        "gj04\t0\t*\tThey drank the pub.\n", encoding="utf-8")
    (tmp_path / "dev.tsv").symlink_to(_data("cola") / "dev.tsv")
    dsd = load_task("cola", tmp_path)
    assert dsd["train"][1] == {"text_a": "They drank the pub.", "label": 0}
    assert len(dsd["validation"]) == 1043


# ---------------------------------------------------------------------------------------------
# the hub (nyu-mll/glue): a local copy of its layout, loaded by datasets.load_dataset (no network)

HUB = {  # config -> (columns other than label and idx, label feature, rows of (texts..., label))
    "cola": (("sentence",), datasets.ClassLabel(names=["unacceptable", "acceptable"]),
             [("The sailors rode the breeze clear of the rocks.", 1), ("They drank the pub.", 0)]),
    "stsb": (("sentence1", "sentence2"), datasets.Value("float32"),
             [("A plane is taking off.", "An air plane is taking off.", 5.0), ("A man.", "A dog.", 0.25)]),
    "mrpc": (("sentence1", "sentence2"), datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
             [("He said so .", "He said that .", 1), ("A .", "B .", 0)]),
    "rte": (("sentence1", "sentence2"), datasets.ClassLabel(names=["entailment", "not_entailment"]),
            [("Dana Reeve died.", "Christopher Reeve had an accident.", 1), ("A cat sat.", "A cat sat.", 0)]),
    "wnli": (("sentence1", "sentence2"), datasets.ClassLabel(names=["not_entailment", "entailment"]),
             [("The drain is clogged with hair.", "The hair is clogged.", 0), ("I saw it.", "It was seen.", 1)]),
}


def write_hub_copy(root: Path, config: str) -> Path:
    """``<root>/<config>/{train,validation,test}-00000-of-00001.parquet`` and a README declaring the
    config, as in the nyu-mll/glue repository (the test split has label -1, as there)."""
    cols, label, rows = HUB[config]
    feats = datasets.Features({**{c: datasets.Value("string") for c in cols}, "label": label,
                               "idx": datasets.Value("int32")})
    (root / config).mkdir(parents=True, exist_ok=True)
    for split, data in (("train", rows), ("validation", rows[::-1]), ("test", rows[:1])):
        table = {c: [r[i] for r in data] for i, c in enumerate(cols)}
        table["label"] = [r[-1] if split != "test" else -1 for r in data]
        table["idx"] = list(range(len(data)))
        f = feats if split != "test" or not isinstance(label, datasets.ClassLabel) else datasets.Features(
            {**{c: datasets.Value("string") for c in cols}, "label": datasets.Value("int64"),
             "idx": datasets.Value("int32")})
        datasets.Dataset.from_dict(table, features=f).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text(
        "---\nconfigs:\n" + "".join(
            f"- config_name: {c}\n  data_files:\n" + "".join(
                f"  - split: {s}\n    path: {c}/{s}-*\n" for s in ("train", "validation", "test"))
            for c in sorted(p.name for p in root.iterdir() if p.is_dir())) + "---\n# glue (local copy)\n")
    return root


@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_layout_through_load_dataset(tmp_path, name):
    root = write_hub_copy(tmp_path / "glue", name)
    dsd = load_task(name, data={"path": str(root), "name": name})
    spec = get_task(name)
    assert set(dsd) == {"train", "validation"}
    cols, _, rows = HUB[name]
    assert dsd["train"].column_names == [*spec.text_fields, "label"]
    for i, row in enumerate(rows):
        got = dsd["train"][i]
        assert [got[f] for f in spec.text_fields] == list(row[:-1])
        assert got["label"] == pytest.approx(row[-1])
    if spec.kind == "classification":
        assert dsd["train"].features["label"].names == list(spec.label_names)


def test_hub_missing_config_is_one_line(tmp_path):
    root = write_hub_copy(tmp_path / "glue", "rte")
    with pytest.raises(ConfigError, match=r"could not load task 'wnli' from .*config 'wnli'"):
        load_task("wnli", data={"path": str(root), "name": "wnli"})


# ---------------------------------------------------------------------------------------------
# metrics against the formulas (float64, by hand)


def _mcc(pred, ref):
    tp = np.sum((pred == 1) & (ref == 1)); tn = np.sum((pred == 0) & (ref == 0))  # noqa: E702
    fp = np.sum((pred == 1) & (ref == 0)); fn = np.sum((pred == 0) & (ref == 1))  # noqa: E702
    den = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return 0.0 if den == 0 else float(tp * tn - fp * fn) / den


def _ranks(x):
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x)); r[order] = np.arange(len(x), dtype=np.float64)  # noqa: E702
    for v in np.unique(x):  # ties: the mean rank
        r[x == v] = r[x == v].mean()
    return r


def test_cola_matthews_by_hand():
    pred = np.array([1, 1, 0, 1, 0, 0, 1, 1])
    ref = np.array([1, 0, 0, 1, 1, 0, 1, 1])
    # tp=4, tn=2, fp=1, fn=1: (8 - 1) / sqrt(5 * 5 * 3 * 3) = 7/15
    out = compute_metrics(get_task("cola"), {"validation": pred}, {"validation": ref})
    assert out == pytest.approx({"matthews": 100 * 7 / 15})
    assert out["matthews"] == pytest.approx(100 * _mcc(pred, ref))
    logits = np.stack([-pred, pred], axis=1).astype(float)  # argmax -> pred
    assert compute_metrics(get_task("cola"), {"validation": logits}, {"validation": ref}) == out
    const = compute_metrics(get_task("cola"), {"validation": np.ones(8)}, {"validation": ref})
    assert const == {"matthews": 0.0}


def test_stsb_pearson_spearman_by_hand():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 5, size=40).round(1)
    pred = ref + rng.normal(0, 1.0, size=40)
    pred[:5] = pred[5]  # ties
    out = compute_metrics(get_task("stsb"), {"validation": pred[:, None].astype(np.float32)}, {"validation": ref})
    p32 = pred.astype(np.float32).astype(np.float64)
    r = np.sum((p32 - p32.mean()) * (ref - ref.mean())) / math.sqrt(np.sum((p32 - p32.mean()) ** 2) * np.sum((ref - ref.mean()) ** 2))
    rp, rr = _ranks(p32), _ranks(ref)
    rho = np.corrcoef(rp, rr)[0, 1]
    assert list(out) == ["pearson", "spearman"]
    assert out["pearson"] == pytest.approx(100 * r, abs=1e-9)
    assert out["spearman"] == pytest.approx(100 * rho, abs=1e-9)
    assert compute_metrics(get_task("stsb"), {"validation": np.full(40, 2.0)}, {"validation": ref}) == \
        {"pearson": 0.0, "spearman": 0.0}


def test_mrpc_accuracy_f1_and_wnli_rte_accuracy_by_hand():
    pred = np.array([1, 0, 1, 1, 0, 1, 0])
    ref = np.array([1, 0, 0, 1, 1, 1, 1])
    # 4 of 7 right; class 1: tp=3, fp=1, fn=2 -> F1 = 6 / (6 + 1 + 2) = 2/3
    out = compute_metrics(get_task("mrpc"), {"validation": pred}, {"validation": ref})
    assert out == pytest.approx({"accuracy": 400 / 7, "f1": 200 / 3})
    for name in ("rte", "wnli"):
        assert compute_metrics(get_task(name), {"validation": pred}, {"validation": ref}) == \
            pytest.approx({"accuracy": 400 / 7})
