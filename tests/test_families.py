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


# ---------------------------------------------------------------- issue 9: cut-down teacher, projections, frozen embeddings

def _family_batch(tiny_model, name):
    """(family, model, batch) for a tiny teacher of `name`; BERT on the synthetic classification task."""
    if name != "bert":
        task = {"bart": "dart", "t5": "wmt16_en_ro", "qwen3": "hellaswag"}[name]
        family, model, spec, enc = _setup(tiny_model, name, task)
        return family, model, enc["train"].batch(torch.arange(2).numpy())
    from tunekd.tasks import load_task

    path = str(tiny_model("bert"))
    spec = get_task("synthetic")
    family = family_for(AutoConfig.from_pretrained(path))
    model = family.load(path, spec).eval()
    raw = load_task("synthetic", None, synthetic={"train_size": 16, "eval_size": 8})
    enc = encode_splits(raw, AutoTokenizer.from_pretrained(path), spec, 32)
    return family, model, enc["train"].batch(torch.arange(6).numpy())


@pytest.mark.parametrize("name", ["bert", "bart", "t5", "qwen3"])
def test_truncated_teacher_states_equal_the_full_teachers_for_every_kept_index(tiny_model, name):
    from tunekd.distill import truncated

    family, teacher, batch = _family_batch(tiny_model, name)
    assert family.truncatable
    with torch.no_grad():
        full = family.forward(teacher, batch, hidden=True).hidden
        n_layers = family.num_layers(teacher.config)
        for keep in range(1, n_layers + 1):
            part = family.forward(truncated(family, teacher, keep), batch, hidden=True).hidden
            for stack, states in full.items():
                cut = stack in family.cut_stacks(teacher)
                assert len(part[stack]) == (keep + 1 if cut else n_layers + 1), (stack, keep)
                for k in range(keep + 1 if cut else n_layers + 1):
                    torch.testing.assert_close(part[stack][k], states[k], rtol=0, atol=1e-6,
                                               msg=f"{name} {stack} keep={keep} state {k}")
        # the original model is whole again, and still gives the same states
        again = family.forward(teacher, batch, hidden=True).hidden
    for stack in full:
        assert len(again[stack]) == n_layers + 1
        for a, b in zip(again[stack], full[stack]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name, stack", [("qwen3", "decoder"), ("t5", "decoder")])
def test_skipping_the_final_norm_is_what_makes_the_cut_teacher_right(tiny_model, name, stack):
    """The check above can fail: a cut that keeps the final norm (the old behaviour) gives norm(h_keep)."""
    from tunekd.distill import TruncatedView

    family, teacher, batch = _family_batch(tiny_model, name)

    class KeepsNorm(type(family)):
        def final_norms(self, model):
            return {}

    with torch.no_grad():
        full = family.forward(teacher, batch, hidden=True).hidden[stack]
        old = family.forward(TruncatedView(KeepsNorm(), teacher, 2), batch, hidden=True).hidden[stack]
    gap = (old[2] - full[2]).abs().max().item()
    assert gap > 1e-2, gap


def _narrow_seq2seq(tiny_model, name="bart"):
    task = {"bart": "dart", "t5": "wmt16_en_ro"}[name]
    family, teacher, spec, enc = _setup(tiny_model, name, task)
    cfg = StudentConfig(layers=2, init="random", hidden_size=16, num_attention_heads=2, intermediate_size=32)
    return family, teacher, spec, enc, build_student(teacher, family, spec, cfg, seed=0).model


def test_seq2seq_projections_are_per_stack(tiny_model):
    """Encoder state i and decoder state i each have their own projection (SPEC; the paper's separate
    encoder and decoder adapters), whether built per stack or from a flat dict."""
    from tunekd import distill
    from tunekd.students import build_projections
    from tunekd.study import DistillConfig

    family, teacher, spec, enc, student = _narrow_seq2seq(tiny_model)
    layer_map = [(0, 0), (1, 2), (2, 4)]
    stacks = list(family.stacks(student))
    nested = build_projections(layer_map, 16, 32, seed=0, stacks=stacks)
    assert set(nested) == {"encoder", "decoder"} and set(nested["encoder"]) == {"0", "1", "2"}
    assert not torch.equal(nested["encoder"]["1"].weight, nested["decoder"]["1"].weight)
    flat = build_projections(layer_map, 16, 32, seed=0)
    d = distill.Distiller(family=family, student=student, teacher=teacher, layer_map=layer_map,
                          distill=DistillConfig(alpha_kl=0.0), projections=flat)
    enc_p, dec_p = d.projections["encoder"]["1"], d.projections["decoder"]["1"]
    assert enc_p is not dec_p and enc_p.weight.data_ptr() != dec_p.weight.data_ptr()
    n_proj = sum(p.numel() for p in d.projections.parameters())
    assert n_proj == 2 * 3 * (16 * 32 + 32)  # 2 stacks x 3 matched states, each its own Linear
    from tunekd.study import TrainConfig

    train_cfg = TrainConfig(lr=1e-2, batch_size=2)
    state = distill.make_state(d, train_cfg, 1, 1)
    distill.train_step(d, state, enc["train"].batch(torch.arange(2).numpy()), train_cfg, torch.device("cpu"))
    assert not torch.equal(enc_p.weight, dec_p.weight)  # trained apart
    assert d.stack_projections("encoder")[1] is enc_p and d.stack_projections("decoder")[1] is dec_p


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_freeze_embeddings_as_the_papers_freeze_embeds(tiny_model, name):
    from tunekd import distill
    from tunekd.study import DistillConfig, TrainConfig

    task = {"bart": "dart", "t5": "wmt16_en_ro"}[name]
    family, teacher, spec, enc = _setup(tiny_model, name, task)
    student = build_student(teacher, family, spec, StudentConfig(layers=2, init="copy", freeze_embeddings=True),
                            seed=0).model
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    emb = student.get_input_embeddings().weight
    assert not emb.requires_grad
    assert student.get_output_embeddings().weight is emb  # tied LM head: frozen with it, as in the paper
    if name == "bart":
        assert any("embed_positions" in n for n in frozen)
    assert all("embed" in n or "shared" in n for n in frozen), frozen
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    d = distill.Distiller(family=family, student=student, teacher=teacher, layer_map=[(1, 2)],
                          distill=DistillConfig())
    train_cfg = TrainConfig(lr=1e-2, batch_size=2)
    state = distill.make_state(d, train_cfg, 1, 1)
    distill.train_step(d, state, enc["train"].batch(torch.arange(2).numpy()), train_cfg, torch.device("cpu"))
    after = dict(student.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert any(not torch.equal(after[n], before[n]) for n in after if n not in frozen)
    # off by default
    plain = build_student(teacher, family, spec, StudentConfig(layers=2, init="copy"), seed=0).model
    assert all(p.requires_grad for p in plain.parameters())


def test_decoder_kl_positions(tiny_model):
    """`targets`: the answer tokens; `sequence`: every non-padding position (the paper's Qwen3 code)."""
    from tunekd.distill import kl_mask
    from tunekd.study import DistillConfig

    family, teacher, batch = _family_batch(tiny_model, "qwen3")
    out = family.forward(teacher, batch, hidden=False)
    assert torch.equal(kl_mask(out, DistillConfig()), out.logits_mask)
    assert torch.equal(kl_mask(out, DistillConfig(kl_positions="sequence")), batch["attention_mask"])
    assert int(out.logits_mask.sum()) < int(batch["attention_mask"].sum())
