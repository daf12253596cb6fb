"""Generation and multiple-choice tasks: BLEU is sacreBLEU's corpus score, Romanian diacritics are
normalised, choices are scored by log-likelihood, the real files load, and a tiny study per family
runs through the CLI and logs its metric to MLflow."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
import torch
from torch import nn

from tunekd.tasks import bleu, choice_metrics, get_task, load_task


def test_bleu_is_sacrebleus_corpus_score_over_all_references():
    spec = get_task("dart")
    hyps = ["the cat sat on the mat", "a school joined in 1973", "it is red"]
    refs = [["the cat sat on the mat .", "a cat was on the mat"], ["A school from Mars Hill joined in 1973."],
            ["it is red", "the thing is red", "red it is"]]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(3)]
    assert bleu(spec, hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score, abs=1e-9)
    assert bleu(spec, ["a b c d e"], [["a b c d e"]]) == pytest.approx(100.0)


def test_generation_eval_bleu_equals_sacrebleu_on_the_same_outputs(tiny_model):
    import datasets
    from transformers import AutoTokenizer

    from tunekd.data import encode_splits
    from tunekd.models import FAMILIES

    family, spec = FAMILIES["seq2seq"], get_task("dart")
    path = str(tiny_model("bart"))
    model = family.load(path, spec).eval()
    rows = {"source": ["a : b : c", "x : y : z", "m : n : o"], "target": ["a b c", "x y z", "m n o"],
            "references": [["a b c", "the a b c"], ["x y z"], ["m n o"]]}
    enc = encode_splits(datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}),
                        AutoTokenizer.from_pretrained(path), spec, 32, family=family)
    gen = type("G", (), {"num_beams": 2, "max_new_tokens": 6, "eval_samples": 2})()
    hyps = family.generate(model, enc["validation"], np.arange(2), batch_size=2, generation=gen)
    assert len(hyps) == 2 and all(isinstance(h, str) for h in hyps)
    got = family.evaluate(model, spec, enc, batch_size=2, generation=gen)
    want = sacrebleu.corpus_bleu(hyps, [["a b c", "x y z"], ["the a b c", None]]).score
    assert got == {"bleu": pytest.approx(want)}


def test_romanian_diacritics_are_normalised_in_hypotheses_and_references():
    spec = get_task("wmt16_en_ro")
    assert spec.normalize("Componenţa şedinţei Ş Ţ") == "Componența ședinței Ș Ț"
    cedilla, comma = "Aprobarea procesului-verbal al şedinţei precedente", "Aprobarea procesului-verbal al ședinței precedente"
    assert bleu(spec, [cedilla], [[comma]]) == pytest.approx(100.0)
    assert bleu(spec, [comma], [[cedilla]]) == pytest.approx(100.0)
    assert bleu(get_task("dart"), [cedilla], [[comma]]) < 100.0


def test_choice_metrics_sum_and_length_normalised():
    loglik = np.array([[-4.0, -6.0], [-3.0, -2.5]])
    chars = np.array([[4, 12], [10, 5]])
    # row 0: raw picks 0; per char -1 vs -0.5 picks 1. row 1: raw picks 1; per char -0.3 vs -0.5 picks 0
    assert choice_metrics(loglik, chars, np.array([0, 1])) == {"accuracy": 100.0, "accuracy_norm": 0.0}


def test_accuracy_norm_divides_by_the_choices_own_length(minilm_path):
    """issue 9: lm-evaluation-harness divides by len(choice), the continuation's own text, not by
    len(" " + choice). Log-likelihoods [-4, -19] for "ab" / "abcdefghij": the harness picks 1
    (-4/2 = -2 < -19/10 = -1.9); dividing by 3 and 11 would pick 0."""
    import datasets
    from transformers import AutoTokenizer

    from tunekd.data import encode_splits
    from tunekd.models import FAMILIES
    from tunekd.tasks.choice import choice_chars

    assert choice_chars(" ab") == 2 and choice_chars(" abcdefghij") == 10 and choice_chars("ab") == 2
    tok = AutoTokenizer.from_pretrained(minilm_path)
    rows = {"context": ["x"], "choices": [[" ab", " abcdefghij"]], "label": [1]}
    enc = encode_splits(datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}), tok,
                        get_task("hellaswag"), 16, family=FAMILIES["decoder"])
    chars = enc["validation"].arrays["choice_chars"]
    assert chars.tolist() == [[2, 10]]
    loglik = np.array([[-4.0, -19.0]])
    harness = int(np.argmax([ll / len(c) for ll, c in zip(loglik[0], ["ab", "abcdefghij"])]))
    assert harness == 1
    got = choice_metrics(loglik, chars, np.array([1]))
    assert got == {"accuracy": 0.0, "accuracy_norm": 100.0}
    # the old divisor (one character too many) would have picked choice 0
    assert choice_metrics(loglik, chars + 1, np.array([1]))["accuracy_norm"] == 0.0


class Bigram(nn.Module):
    """A hand-built causal LM: the logits at a position depend only on that position's token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kw):
        return type("O", (), {"logits": self.table[input_ids]})()


def test_multiple_choice_scoring_picks_the_known_answer(minilm_path):
    import datasets
    from transformers import AutoTokenizer

    from tunekd.data import encode_splits
    from tunekd.models import FAMILIES

    tok = AutoTokenizer.from_pretrained(minilm_path)
    family, spec = FAMILIES["decoder"], get_task("hellaswag")
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("cat", "sat", "flew", "barked", "sang", "he", "dog")}
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    table[ids["cat"], ids["sat"]] = 10.0  # after "cat": "sat"
    table[ids["dog"], ids["barked"]] = 10.0  # after "dog": "barked"
    rows = {"context": ["the cat", "the dog"], "choices": [[" flew", " barked", " sat", " sang"],
                                                           [" sat", " barked", " flew", " sang"]],
            "label": [2, 1]}
    enc = encode_splits(datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}), tok, spec, 16,
                        family=family)
    model = Bigram(table)
    batch = {k: v for k, v in enc["validation"].batch(np.arange(2)).items() if k != "index"}
    scores = family.choice_loglik(model, batch)
    assert scores.shape == (2, 4)
    assert scores.argmax(dim=1).tolist() == [2, 1]
    # one scored token per choice: its log-probability under the bigram row of the context's last token
    logp = torch.log_softmax(table[ids["cat"]], dim=-1)
    assert scores[0, 0].item() == pytest.approx(logp[ids["flew"]].item(), abs=1e-5)
    metrics = family.evaluate(model, spec, enc, batch_size=8)
    assert metrics == {"accuracy": 100.0, "accuracy_norm": 100.0}


# --- the real files ----------------------------------------------------------------------------


def test_dart_local_files(data_dir):
    dsd = load_task("dart", data_dir / "dart")
    assert set(dsd) == {"train", "validation"}
    assert dsd["train"].column_names == ["source", "target", "references"]
    entries = len(set(dsd["train"]["source"])) + len(dsd["validation"])
    assert entries <= 2768 and len(dsd["validation"]) == round(entries * 0.2)  # duplicates merged
    assert not set(dsd["train"]["source"]) & set(dsd["validation"]["source"])  # split by entry
    refs = dsd["validation"]["references"]
    assert all(len(r) >= 1 for r in refs) and max(len(r) for r in refs) > 1  # all references kept
    both = list(dsd["train"]) + list(dsd["validation"])
    row = next(r for r in both if r["source"].startswith("Mars Hill College : JOINED : 1973"))
    assert row["source"] == "Mars Hill College : JOINED : 1973 | Mars Hill College : LOCATION : Mars Hill, North Carolina"
    assert row["target"] == "A school from Mars Hill, North Carolina, joined in 1973."
    again = load_task("dart", data_dir / "dart")
    assert again["validation"]["source"] == dsd["validation"]["source"]  # deterministic


def test_wmt16_local_files(data_dir):
    dsd = load_task("wmt16_en_ro", data_dir / "wmt16_en_ro")
    assert (len(dsd["train"]), len(dsd["validation"])) == (1599, 400)
    en = (data_dir / "wmt16_en_ro" / "newsdev2016.en").read_text(encoding="utf-8").splitlines()
    ro = (data_dir / "wmt16_en_ro" / "newsdev2016.ro").read_text(encoding="utf-8").splitlines()
    pairs = dict(zip(en, ro))
    for row in list(dsd["train"])[:20] + list(dsd["validation"])[:20]:
        assert pairs[row["source"]] == row["target"] and row["references"] == [row["target"]]


def test_hellaswag_local_files(data_dir):
    dsd = load_task("hellaswag", data_dir / "hellaswag")
    assert (len(dsd["train"]), len(dsd["validation"])) == (8034, 2008)
    assert dsd["train"].column_names == ["context", "choices", "label"]
    assert all(len(c) == 4 for c in dsd["validation"]["choices"])
    assert set(dsd["train"]["label"]) == {0, 1, 2, 3}
    both = list(dsd["train"]) + list(dsd["validation"])
    row = next(r for r in both if r["context"].startswith("Roof shingle removal: A man is sitting on a roof."))
    assert row["context"] == "Roof shingle removal: A man is sitting on a roof. he"
    assert row["label"] == 3 and row["choices"][3] == " starts pulling up roofing on a roof."


def test_commonsenseqa_local_files(data_dir):
    dsd = load_task("commonsenseqa", data_dir / "commonsenseqa")
    assert len(dsd["train"]) + len(dsd["validation"]) == 1221
    assert all(len(c) == 5 for c in dsd["train"]["choices"])
    both = list(dsd["train"]) + list(dsd["validation"])
    row = next(r for r in both if "revolving door" in r["context"])
    assert row["context"].startswith("Question: A revolving door") and row["context"].endswith("\nAnswer:")
    assert row["label"] == 0 and row["choices"][0] == " bank"  # answerKey A
    row = next(r for r in both if r["context"] == "Question: What do people aim to do at work?\nAnswer:")
    assert row["choices"][row["label"]] == " complete job"  # answerKey A


def test_hub_loading_errors_are_config_errors(monkeypatch):
    import datasets

    from tunekd.errors import ConfigError

    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    for task in ("dart", "wmt16_en_ro", "hellaswag", "commonsenseqa"):
        with pytest.raises(ConfigError, match="cannot load hub dataset.*task.data_dir"):
            load_task(task)


# --- a tiny study per family through the real CLI --------------------------------------------------

SMOKE = [
    ("bart_dart.yaml", "dart", "eval/bleu"),
    ("t5_wmt16_en_ro.yaml", "wmt16_en_ro", "eval/bleu"),
    ("qwen3_hellaswag.yaml", "hellaswag", "eval/accuracy"),
    ("qwen3_commonsenseqa.yaml", "commonsenseqa", "eval/accuracy"),
    ("bert_hellaswag.yaml", "hellaswag", "eval/accuracy"),
]


@pytest.mark.slow
@pytest.mark.parametrize("study, task, metric", SMOKE, ids=[s[0].split(".")[0] for s in SMOKE])
def test_tiny_study_through_the_cli_logs_its_metric(tmp_path, data_dir, study, task, metric, study_cli, mlflow_uri):
    """The smoke study through the CLI (in this process, on the test process's Ray and MLflow store)."""
    import json
    from pathlib import Path

    from tests.helpers import runs

    repo = Path(__file__).resolve().parents[1]
    shrink = [f"task.data_dir={data_dir / task}", "task.max_train_samples=32", "task.max_eval_samples=16",
              "train.epochs=1", "search.distill.strategy.grid=[forward]"]
    code, out = study_cli([repo / "search_spaces" / "smoke" / study, *[f"--set={s}" for s in shrink],
                           "--tracking-uri", mlflow_uri], tmp_path, env={"TUNEKD_TINY_DIR": tmp_path / "tiny"})
    assert code == 0, out[-5000:]
    _, _, children = runs(mlflow_uri, "smoke_" + study.split(".")[0])
    assert len(children) == 1
    run = children[0]
    assert run.data.tags["tunekd.status"] == "completed"
    assert metric in run.data.metrics and 0.0 <= run.data.metrics[metric] <= 100.0
    for key in ("train/loss_ce", "train/loss_kl", "train/loss_hid"):
        assert key in run.data.metrics
    assert run.data.metrics["train/loss_hid"] > 0
    pairs = json.loads(run.data.params["distill.layer_map"])
    assert pairs == ([[1, 2], [2, 4]] if study.startswith("qwen3") else [[0, 0], [1, 2], [2, 4]])
    if metric == "eval/bleu":
        assert run.data.params["task.generation.max_new_tokens"] == "12"


def test_hub_layouts_map_to_the_task_columns(monkeypatch):
    """The hub path (datasets.load_dataset) with small in-memory copies of each hub layout."""
    import datasets

    def fake(path, name=None):
        if path == "GEM/dart":
            train = [{"tripleset": [["A", "B", "C"]], "target": "A B C.", "references": []},
                     {"tripleset": [["A", "B", "C"]], "target": "C is B of A.", "references": []},
                     {"tripleset": [["X", "Y", "Z"]], "target": "X Y Z.", "references": []}]
            valid = [{"tripleset": [["Q", "R", "S"]], "target": "Q R S.", "references": ["Q R S.", "S of Q."]}]
        elif path == "wmt/wmt16":
            assert name == "ro-en"
            train = valid = [{"translation": {"en": "hello", "ro": "salut"}}]
        elif path == "Rowan/hellaswag":
            train = valid = [{"activity_label": "Roof", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                              "endings": ["a [title] b", "c", "d", "e"], "label": "2"}]
        else:
            train = valid = [{"question": "Q?", "choices": {"label": list("ABCDE"), "text": list("vwxyz")},
                              "answerKey": "C"}]
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                                     "validation": datasets.Dataset.from_list(valid)})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    dart = load_task("dart")
    assert dart["train"]["source"] == ["A : B : C", "A : B : C", "X : Y : Z"]  # one row per reference
    assert dart["train"]["target"] == ["A B C.", "C is B of A.", "X Y Z."]
    assert dart["validation"][0] == {"source": "Q : R : S", "target": "Q R S.", "references": ["Q R S.", "S of Q."]}
    assert load_task("wmt16_en_ro")["validation"][0] == {"source": "hello", "target": "salut", "references": ["salut"]}
    hs = load_task("hellaswag")["validation"][0]
    assert hs == {"context": "Roof: A man is on a roof. He", "choices": [" a. b", " c", " d", " e"], "label": 2}
    cs = load_task("commonsenseqa")["train"][0]
    assert cs["label"] == 2 and cs["context"] == "Question: Q?\nAnswer:"
