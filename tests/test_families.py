"""Model families: the hidden states each one hands to the layer map, copy init of every stack
(T5's block-0 relative attention bias included), per-layer config lists, vocabulary checks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from tunekd.data import encode_splits
from tunekd.errors import ConfigError
from tunekd.models import FAMILIES, family_for
from tunekd.students import build_student
from tunekd.study import LoraConfig, StudentConfig
from tunekd.tasks import get_task

GEN_ROWS = {"source": ["a : b : c", "Mars Hill College : JOINED : 1973 | x : y : z"],
            "target": ["a is b of c.", "Mars Hill College joined in 1973."],
            "references": [["a is b of c."], ["Mars Hill College joined in 1973.", "It joined in 1973."]]}
MC_ROWS = {"context": ["Question: What barks?\nAnswer:", "A man sits on a roof. He"],
           "choices": [[" a dog", " a cat", " a fish", " a tree", " a car"],
                       [" falls.", " sings a long song.", " waves.", " sleeps.", " eats."]],
           "label": [0, 2]}


def _setup(tiny_model, name, task):
    import datasets

    path = str(tiny_model(name))
    spec = get_task(task)
    family = family_for(AutoConfig.from_pretrained(path))
    model = family.load(path, spec).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = GEN_ROWS if spec.kind == "generation" else MC_ROWS
    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)})
    return family, model, spec, encode_splits(dsd, tok, spec, 32, family=family)


@pytest.mark.parametrize("name, task, family_name, stacks", [
    ("bart", "dart", "seq2seq", ("encoder", "decoder")),
    ("t5", "wmt16_en_ro", "seq2seq", ("encoder", "decoder")),
    ("qwen3", "hellaswag", "decoder", ("decoder",)),
])
def test_hidden_states_have_the_shapes_the_map_uses(tiny_model, name, task, family_name, stacks):
    family, model, spec, enc = _setup(tiny_model, name, task)
    assert family.name == family_name and spec.kind in family.task_kinds
    batch = enc["train"].batch(torch.arange(2).numpy())
    out = family.forward(model, batch, hidden=True)
    assert tuple(out.hidden) == stacks
    for stack in stacks:
        hs, mask = out.hidden[stack], out.masks[stack]
        assert len(hs) == family.num_layers(model.config) + 1  # embeddings + every layer
        for h in hs:
            assert h.shape == (*mask.shape, 32)
    # token-level logits, masked to the positions that are trained on
    assert out.logits.dim() == 3 and out.logits_mask.shape == out.logits.shape[:2]
    if family_name == "seq2seq":
        assert torch.equal(out.logits_mask, batch["decoder_attention_mask"])
        assert torch.equal(out.masks["decoder"].sum(1), (batch["labels"] != -100).sum(1))
    else:
        # CE/KL on the continuation only: as many positions as the gold choice has tokens
        tok = AutoTokenizer.from_pretrained(str(tiny_model(name)))
        gold = [MC_ROWS["choices"][i][MC_ROWS["label"][i]] for i in range(2)]
        n_gold = [len(tok(g, add_special_tokens=False)["input_ids"]) for g in gold]
        assert out.logits_mask.sum(1).tolist() == n_gold
    assert torch.isfinite(family.ce_loss(out, batch))


def test_seq2seq_lengths_are_per_array():
    """Source and target arrays are trimmed each by their own length vector."""
    import numpy as np

    from tunekd.data import Encoded

    e = Encoded(arrays={"input_ids": np.ones((2, 10), dtype=np.int64), "labels": np.ones((2, 7), dtype=np.int64),
                        "chars": np.ones((2, 4), dtype=np.int64)},
                lengths=np.array([3, 5]), lengths_of={"labels": np.array([6, 2]), "chars": None})
    b = e.batch(np.array([0, 1]))
    assert b["input_ids"].shape == (2, 5) and b["labels"].shape == (2, 6) and b["chars"].shape == (2, 4)


def _assert_copied(teacher, student, family, copied):
    from tunekd.models import stack_prefixes

    t_state, s_state = teacher.state_dict(), student.state_dict()
    t_prefixes, s_prefixes = stack_prefixes(teacher, family), stack_prefixes(student, family)
    assert t_prefixes == s_prefixes
    checked = 0
    for key, value in s_state.items():
        source = key
        for prefix in s_prefixes.values():
            if key.startswith(prefix):
                i, _, rest = key[len(prefix):].partition(".")
                source = f"{prefix}{copied[int(i)]}.{rest}"
        if source not in t_state:  # T5: block 0's relative attention bias comes from teacher block 0
            assert "relative_attention_bias" in key and ".block.0." in key, key
            source = key
        assert torch.equal(value, t_state[source]), key
        checked += 1
    assert checked == len(s_state)


@pytest.mark.parametrize("name, task", [("bart", "dart"), ("t5", "wmt16_en_ro"), ("qwen3", "hellaswag")])
@pytest.mark.parametrize("copy_layers, copied", [([1, 3], [1, 3]), ("spread", [0, 3])])
def test_copy_init_puts_the_teachers_parameters_in_every_copied_position(tiny_model, name, task, copy_layers,
                                                                         copied):
    family, teacher, spec, _ = _setup(tiny_model, name, task)
    student = build_student(teacher, family, spec, StudentConfig(layers=2, init="copy", copy_layers=copy_layers),
                            seed=0)
    assert student.copied_layers == copied
    for stack in family.stacks(student.model).values():
        assert len(stack) == 2
    _assert_copied(teacher, student.model, family, copied)


def test_t5_student_block0_carries_the_teachers_relative_bias(tiny_model):
    family, teacher, spec, _ = _setup(tiny_model, "t5", "wmt16_en_ro")
    student = build_student(teacher, family, spec, StudentConfig(layers=2, init="copy", copy_layers=[2, 3]), seed=0)
    for stack in ("encoder", "decoder"):
        key = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert torch.equal(student.model.state_dict()[key], teacher.state_dict()[key])
        # the copied block's own attention weights are teacher block 2's
        q = f"{stack}.block.0.layer.0.SelfAttention.q.weight"
        assert torch.equal(student.model.state_dict()[q], teacher.state_dict()[q.replace("block.0", "block.2")])


def test_decoder_per_layer_config_lists_follow_the_copied_layers(tiny_model):
    family, teacher, spec, _ = _setup(tiny_model, "qwen3", "hellaswag")
    teacher.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    cfg = family.student_config(teacher.config, 2, copied=[1, 2])
    assert cfg.num_hidden_layers == 2 and cfg.layer_types == ["sliding_attention", "full_attention"]
    assert family.student_config(teacher.config, 3).layer_types == teacher.config.layer_types[:3]
    assert family.match_embeddings_default is False and FAMILIES["seq2seq"].match_embeddings_default is True


def test_vocabulary_mismatch_is_a_config_error(tiny_model):
    family, teacher, spec, _ = _setup(tiny_model, "qwen3", "hellaswag")

    class Narrow(type(family)):
        def student_config(self, *a, **k):
            cfg = super().student_config(*a, **k)
            cfg.vocab_size = 1000
            return cfg

    with pytest.raises(ConfigError, match="vocabularies differ"):
        build_student(teacher, Narrow(), spec, StudentConfig(layers=2, init="random"), seed=0)


def test_a_task_kind_the_family_cannot_run_is_refused(tiny_model):
    assert "generation" not in FAMILIES["decoder"].task_kinds
    assert "multiple_choice" not in FAMILIES["seq2seq"].task_kinds


def test_encoder_multiple_choice_head(tiny_model):
    """BERT-like encoders run multiple choice through AutoModelForMultipleChoice: [B, C] logits, the
    hidden states of the B*C (context, choice) pairs, accuracy of the argmax."""
    family, model, spec, enc = _setup(tiny_model, "bert_mc", "commonsenseqa")
    assert family.name == "encoder" and type(model).__name__ == "BertForMultipleChoice"
    batch = enc["train"].batch(torch.arange(2).numpy())
    assert batch["input_ids"].shape[:2] == (2, 5)
    out = family.forward(model, batch, hidden=True)
    assert out.logits.shape == (2, 5) and out.logits_mask is None
    assert len(out.hidden["encoder"]) == 5 and out.hidden["encoder"][0].shape == (*out.masks["encoder"].shape, 32)
    assert out.masks["encoder"].shape[0] == 10
    acc = family.evaluate(model, spec, enc, batch_size=10)["accuracy"]
    pred = out.logits.argmax(-1).numpy()
    assert acc == pytest.approx(100.0 * (pred == enc["validation"].arrays["labels"]).mean())
    student = build_student(model, family, spec, StudentConfig(layers=2, init="copy"), seed=0)
    assert type(student.model).__name__ == "BertForMultipleChoice"
    assert not torch.equal(student.model.classifier.weight, model.classifier.weight)  # the head starts random


def test_lora_student_trains_only_its_adapters_and_exports_merged(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunekd import distill
    from tunekd.students import export_student
    from tunekd.study import validate

    family, teacher, spec, enc = _setup(tiny_model, "qwen3", "hellaswag")
    study = validate({"name": "t", "task": {"name": "hellaswag"}, "teacher": {"model": "x"},
                      "student": {"layers": 2, "init": "copy", "copy_layers": "spread", "lora": {"rank": 4}},
                      "train": {"epochs": 1, "batch_size": 2, "lr": 1e-2}})
    from tunekd.trainable import single_init

    with single_init():  # as trials build students: the adapters are initialised all the same
        student = build_student(teacher, family, spec, study.student, seed=0)
    model = student.model
    assert type(model).__name__ == "Qwen3ForCausalLM" and len(family.stacks(model)["decoder"]) == 2
    plain = build_student(teacher, family, spec, study.student.model_copy(update={"lora": None}), seed=0).model
    batch0 = {k: v for k, v in enc["train"].batch(torch.arange(2).numpy()).items() if k != "index"}
    with torch.no_grad():  # B = 0: the adapted student starts as the copied one
        assert torch.allclose(family.forward(model.eval(), batch0).logits, family.forward(plain.eval(), batch0).logits,
                              atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    d = distill.Distiller(family=family, student=model, teacher=teacher, layer_map=[(1, 2), (2, 4)],
                          distill=study.distill)
    distill.fit(d, spec, enc["train"], {"validation": enc["validation"]}, study.train, epochs=1, seed=0)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # the copied weights stay the teacher's
    batch = {k: v for k, v in enc["train"].batch(torch.arange(2).numpy()).items() if k != "index"}
    want = family.forward(model.eval(), batch, hidden=False).logits
    export_student(model.state_dict(), teacher.config, family, spec, study.student, tmp_path / "s",
                   copied_layers=student.copied_layers)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(family.forward(merged, batch, hidden=False).logits, want, atol=1e-4)


def test_lora_needs_a_copied_student(tiny_model):
    family, teacher, spec, _ = _setup(tiny_model, "qwen3", "hellaswag")
    with pytest.raises(ValueError, match="lora adapts a copy-initialised student"):  # the study refuses it
        StudentConfig(layers=2, init="random", lora={"rank": 4})
    unvalidated = StudentConfig.model_construct(layers=2, init="random", lora=LoraConfig(rank=4))
    with pytest.raises(ConfigError, match="student.lora"):  # and so does build_student
        build_student(teacher, family, spec, unvalidated, seed=0)
    with pytest.raises(ConfigError, match="match no module"):
        build_student(teacher, family, spec, StudentConfig(layers=2, lora={"target_modules": ["nope"]}), seed=0)
