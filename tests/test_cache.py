"""Teacher-output cache: equal to the online teacher to the stored precision, keyed and reused,
written atomically, sized by a budget; the truncated teacher; the layer set from the trials' maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tunekd import cache as tc
from tunekd.distill import truncated
from tunekd.study import Study
from tunekd.tasks import get_task

SPEC = get_task("synthetic")


pytestmark = pytest.mark.usefixtures("one_thread")


LAYERS = (0, 2, 4)


@pytest.fixture(scope="module")
def teacher(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    # larger states than the random init's, so fp16 rounding is visible at the tolerance we check
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory, family, teacher, encoded):
    root = tmp_path_factory.mktemp("tcache")
    info = tc.prepare(family, teacher, encoded["train"], root, layers=LAYERS, max_length=32, batch_size=16)
    return root, info


def _online(family, teacher, batch):
    with torch.no_grad():
        return family.forward(teacher, {k: v for k, v in batch.items() if k != "index"}, hidden=True)


def test_cached_outputs_equal_online_outputs_to_fp16_precision(built, family, teacher, encoded):
    root, info = built
    assert info.mode == "full" and info.layers == LAYERS and not info.reused and info.teacher_rows == 64
    cache = tc.TeacherCache.open(info.folder)
    assert cache.manifest["dtype"] == "fp16" and cache.rows == 64
    for rows in ([5, 3, 60, 1, 17], list(range(64))):
        batch = encoded["train"].batch(np.array(rows))
        out = _online(family, teacher, batch)
        valid = batch["attention_mask"].bool()
        assert (~valid).any()  # the batch has padding
        got = cache.hidden("encoder", batch["index"], batch["attention_mask"], LAYERS)
        for k in LAYERS:
            want = out.hidden["encoder"][k]
            assert got[k].shape == want.shape and got[k].dtype == torch.float32
            torch.testing.assert_close(got[k][valid], want[valid], rtol=2**-10, atol=2**-14)
            assert torch.equal(got[k][~valid], torch.zeros_like(got[k][~valid]))  # padding: zeros
            # rounding to fp16 is all there is to it
            torch.testing.assert_close(got[k][valid], want[valid].half().float(), rtol=2**-10, atol=1e-5)
        torch.testing.assert_close(cache.logits(batch["index"]), out.logits, rtol=1e-5, atol=1e-6)
    # it stores valid tokens only
    tokens = int(encoded["train"].lengths.sum())
    assert cache.manifest["stacks"] == {"encoder": tokens}
    assert (root / info.key / "encoder.h2.bin").stat().st_size == tokens * 32 * 2


def test_same_key_is_reused_and_nothing_half_written_remains(built, family, teacher, encoded):
    root, info = built
    again = tc.prepare(family, teacher, encoded["train"], root, layers=list(reversed(LAYERS)), max_length=32)
    assert again.reused and again.key == info.key and again.teacher_rows == 0 and "reused" in again.reason
    other = tc.prepare(family, teacher, encoded["train"], root, layers=(0, 4), max_length=32)
    assert other.key != info.key and not other.reused
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folders left
    # a folder without a (matching) manifest is not a cache: it is rebuilt
    (root / other.key / "manifest.json").unlink()
    rebuilt = tc.prepare(family, teacher, encoded["train"], root, layers=(0, 4), max_length=32)
    assert rebuilt.key == other.key and not rebuilt.reused


def test_key_depends_on_teacher_data_length_layers_dtype():
    base = tc.cache_key("t", "d", 32, [0, 2], "fp16")
    assert base == tc.cache_key("t", "d", 32, [2, 0], "fp16")
    for k in (tc.cache_key("T", "d", 32, [0, 2], "fp16"), tc.cache_key("t", "D", 32, [0, 2], "fp16"),
              tc.cache_key("t", "d", 64, [0, 2], "fp16"), tc.cache_key("t", "d", 32, [0], "fp16"),
              tc.cache_key("t", "d", 32, [0, 2], "bf16")):
        assert k != base


def test_weights_digest_sees_values():
    state = {"a": np.zeros(3, np.float32), "b": np.ones(2, np.float32)}
    d = tc.weights_digest(state)
    assert d == tc.weights_digest({k: torch.from_numpy(v) for k, v in state.items()})
    state["b"] = state["b"] * 2
    assert tc.weights_digest(state) != d


def test_budget_chooses_full_logits_or_off():
    est = {"logits": 1000, "full": 10 * tc.GB}
    assert tc.choose_mode(est, 0, layers=[2], needs_logits=True)[0] == "off"
    mode, reason = tc.choose_mode(est, 20, layers=[2], needs_logits=True)
    assert mode == "full" and "[2]" in reason
    mode, reason = tc.choose_mode(est, 2, layers=[2], needs_logits=True)
    assert mode == "logits" and "10 GB" in reason and "highest mapped layer" in reason
    assert tc.choose_mode({"logits": 3 * tc.GB, "full": 10 * tc.GB}, 2, layers=[2], needs_logits=True)[0] == "off"
    assert tc.choose_mode(est, 2, layers=[], needs_logits=False)[0] == "off"
    mode, reason = tc.choose_mode(est, 20, layers=[2], needs_logits=True, free_bytes=5 * tc.GB)
    assert mode == "logits" and "free disk" in reason


def test_small_budget_caches_logits_only(tmp_path, family, teacher, encoded):
    info = tc.prepare(family, teacher, encoded["train"], tmp_path, layers=LAYERS, max_length=32, budget_gb=1e-5)
    assert info.mode == "logits" and info.layers == ()
    cache = tc.TeacherCache.open(info.folder)
    assert not cache.covers([2]) and cache.covers([])
    off = tc.prepare(family, teacher, encoded["train"], tmp_path / "off", layers=LAYERS, max_length=32, budget_gb=0)
    assert off.mode == "off" and off.folder is None and not (tmp_path / "off").exists()


def test_bf16_storage(tmp_path, family, teacher, encoded):
    info = tc.prepare(family, teacher, encoded["train"], tmp_path, layers=(3,), max_length=32, dtype="bf16")
    cache = tc.TeacherCache.open(info.folder)
    assert cache.arrays["encoder.h3"].dtype == np.uint16
    batch = encoded["train"].batch(np.arange(0, 64, 3))
    want = _online(family, teacher, batch).hidden["encoder"][3]
    valid = batch["attention_mask"].bool()
    got = cache.hidden("encoder", batch["index"], batch["attention_mask"], [3])[3]
    torch.testing.assert_close(got[valid], want[valid].bfloat16().float(), rtol=2**-7, atol=1e-5)


def test_fp16_overflow_is_detected():
    with pytest.raises(tc._Overflow):
        tc._to_stored(torch.tensor([[1e5, 0.0]]), "fp16")
    bits = tc._to_stored(torch.tensor([[1e5, -2.5]]), "bf16")
    back = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
    torch.testing.assert_close(back, torch.tensor([[1e5, -2.5]]), rtol=2**-7, atol=0)


def test_arrays_in_memory_read_the_same(built, encoded):
    _, info = built
    on_disk = tc.TeacherCache.open(info.folder)
    in_memory = tc.load_arrays(info.folder)
    assert not any(isinstance(v, np.memmap) for v in in_memory.arrays.values())
    batch = encoded["train"].batch(np.array([9, 2, 33]))
    a = on_disk.hidden("encoder", batch["index"], batch["attention_mask"], [2])[2]
    b = in_memory.hidden("encoder", batch["index"], batch["attention_mask"], [2])[2]
    assert torch.equal(a, b)
    assert tc.open_cached(info.folder) is tc.open_cached(info.folder)
    assert tc.open_cached(str(info.folder) + "-missing") is None


def test_mismatched_batch_is_refused(built, encoded):
    _, info = built
    cache = tc.TeacherCache.open(info.folder)
    batch = encoded["train"].batch(np.array([0, 1]))
    mask = batch["attention_mask"].clone()
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="valid encoder tokens"):
        cache.hidden("encoder", batch["index"], mask, [0])


def test_truncated_teacher_shares_weights_and_matches_lower_layers(family, teacher, encoded):
    short = truncated(family, teacher, 2)
    assert short.inner is teacher and short.bert.embeddings is teacher.bert.embeddings  # shared, not copied
    assert short.config is teacher.config
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, k=k: ran.append(k))
             for k, layer in enumerate(teacher.bert.encoder.layer)]
    batch = encoded["train"].batch(np.arange(8))
    try:
        part = _online(family, short, batch).hidden["encoder"]  # the view first: hooks must not double up
        assert ran == [0, 1]  # layers 3 and 4 never run
        full = _online(family, teacher, batch).hidden["encoder"]
    finally:
        for h in hooks:
            h.remove()
    assert len(family.stacks(teacher)["encoder"]) == 4  # the original is back in one piece
    assert len(part) == 3
    for k in range(3):
        assert torch.equal(part[k], full[k])
    assert len(_online(family, teacher, batch).hidden["encoder"]) == 5  # the original still has 4 layers


def test_needed_layers_is_the_union_over_the_trials():
    from tunekd.plan import Trials

    study = Study.model_validate({"name": "x", "task": {"name": "synthetic"}, "teacher": {"model": "minilm"},
                                  "student": {"layers": 3}})
    trials = Trials(study, 6, True)
    points = [{"distill.strategy": s} for s in ("none", "forward", "reverse", "all_to_one", "random")]
    assert tc.needed_layers(trials, points) == {0, 2, 3, 4, 6}
    assert tc.needed_layers(trials, [{"distill.strategy": "all_to_one"}]) == {3}
    assert tc.needed_layers(trials, [{"distill.strategy": "forward", "distill.lambda_hid": 0}]) == set()
    assert tc.layers_from_maps([[(0, 0), (1, 2)], [(1, 5)]]) == {0, 2, 5}


def test_needed_layers_of_a_randint_depth_cover_every_depth():
    """student.layers randint [1, 4] of a 6-layer teacher: forward maps student layer i to teacher layer
    i * 6 / S rounded half up, for every S in 1..4, not only the end depths 1 and 4 (whose union lacks
    teacher layer 4, used by S = 3 only)."""
    from tunekd.plan import Trials, trial_points

    study = Study.model_validate({"name": "x", "task": {"name": "synthetic"}, "teacher": {"model": "minilm"},
                                  "search": {"student.layers": {"randint": [1, 4]}},
                                  "tune": {"searcher": "random"}})
    points = list(trial_points(study))
    assert points == [{"student.layers": s} for s in (1, 2, 3, 4)]
    by_hand = {0} | {int(i * 6 / s + 0.5) for s in (1, 2, 3, 4) for i in range(1, s + 1)}
    assert by_hand == {0, 2, 3, 4, 5, 6}
    assert tc.needed_layers(Trials(study, 6, True), points) == by_hand
    ends = tc.needed_layers(Trials(study, 6, True), [{"student.layers": 1}, {"student.layers": 4}])
    assert by_hand - ends == {4}


def test_cache_info_params_are_flat():
    info = tc.CacheInfo(mode="full", reason="r", folder="/x", key="k", layers=(0, 2))
    params = info.params()
    assert params["teacher.cache_mode"] == "full" and params["teacher.cache_layers"] == [0, 2]
    json.dumps(params)


def test_for_study_builds_under_the_storage_path(tmp_path, family, teacher, encoded):
    study = Study.model_validate({
        "name": "x", "task": {"name": "synthetic", "max_length": 32}, "teacher": {"model": "minilm"},
        "student": {"layers": 2}, "tune": {"storage_path": str(tmp_path / "ray")}})
    points = [{"distill.strategy": s} for s in ("none", "forward", "all_to_one")]
    lines = []
    info = tc.for_study(study, family, teacher, encoded, points, log=lines.append)
    assert info.mode == "full" and info.layers == (0, 2, 4)
    assert info.folder.startswith(str(tmp_path / "ray" / "teacher_cache"))
    assert any(line.startswith("teacher cache: full: ") for line in lines)
    assert next(teacher.parameters()).device.type == "cpu"
    off = tc.for_study(study, family, teacher, encoded, points, budget_gb=0)
    assert off.mode == "off" and "0" in off.reason


def test_unpadded_batch_reads_the_same(built, family, teacher, encoded):
    _, info = built
    cache = tc.TeacherCache.open(info.folder)
    lengths = encoded["train"].lengths
    rows = np.flatnonzero(lengths == lengths.max())[:3]
    batch = encoded["train"].batch(rows)
    assert bool(batch["attention_mask"].bool().all())
    got = cache.hidden("encoder", batch["index"], batch["attention_mask"], [4])[4]
    want = _online(family, teacher, batch).hidden["encoder"][4]
    torch.testing.assert_close(got, want.half().float(), rtol=2**-10, atol=1e-5)


# ---------------------------------------------------------------- issue 9: key and row checks

def test_key_changes_with_the_teacher_config_and_tokenizer(tmp_path, family, teacher, encoded, tiny_bert_dir):
    """Same weights, another `hidden_act` (or another tokenizer): another key, so no stale reuse."""
    import copy

    from transformers import AutoTokenizer

    base = tc.prepare(family, teacher, encoded["train"], tmp_path, layers=(2,), max_length=32)
    again = tc.prepare(family, teacher, encoded["train"], tmp_path, layers=(2,), max_length=32)
    assert again.reused and again.key == base.key
    other_act = copy.deepcopy(teacher)
    other_act.config.hidden_act = "relu"
    assert tc.weights_digest(other_act.state_dict()) == tc.weights_digest(teacher.state_dict())
    changed = tc.prepare(family, other_act, encoded["train"], tmp_path, layers=(2,), max_length=32)
    assert not changed.reused and changed.key != base.key
    # the tokenizer: an object, or the tokenizer files of a folder
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    with_tok = tc.prepare(family, teacher, encoded["train"], tmp_path, layers=(2,), max_length=32, tokenizer=tok)
    tok2 = AutoTokenizer.from_pretrained(tiny_bert_dir, do_lower_case=False)
    assert tc.tokenizer_digest(tok2) != tc.tokenizer_digest(tok)
    with_tok2 = tc.prepare(family, teacher, encoded["train"], tmp_path, layers=(2,), max_length=32, tokenizer=tok2)
    assert with_tok2.key != with_tok.key and not with_tok2.reused
    assert tc.tokenizer_digest(str(tiny_bert_dir)) != "" and tc.tokenizer_digest(None) == ""
    assert tc.tokenizer_digest(str(tiny_bert_dir)) == tc.tokenizer_digest(tiny_bert_dir)
    # the config digest ignores only the load path
    cfg = copy.deepcopy(teacher.config)
    cfg._name_or_path = "/somewhere/else"
    assert tc.config_digest(cfg) == tc.config_digest(teacher.config)
    cfg.layer_norm_eps = 1e-6
    assert tc.config_digest(cfg) != tc.config_digest(teacher.config)


def test_key_parts():
    base = tc.cache_key("t", "d", 32, [0], "fp16", config="c", tokenizer="k")
    assert base != tc.cache_key("t", "d", 32, [0], "fp16", config="C", tokenizer="k")
    assert base != tc.cache_key("t", "d", 32, [0], "fp16", config="c", tokenizer="K")


def test_permuted_batch_is_refused(built, encoded):
    """Rows out of step with `index` are refused per row, not only when the token totals differ."""
    _, info = built
    cache = tc.TeacherCache.open(info.folder)
    lengths = encoded["train"].lengths
    rows = np.array([int(np.argmin(lengths)), int(np.argmax(lengths)), 5])
    assert lengths[rows[0]] != lengths[rows[1]]
    batch = encoded["train"].batch(rows)
    cache.check_rows(batch["index"], batch)  # in step: fine
    cache.hidden("encoder", batch["index"], batch["attention_mask"], [2])
    swapped = batch["index"][[1, 0, 2]]  # same rows, same total token count, another order
    assert int(batch["attention_mask"].sum()) == int(cache.arrays["encoder.counts"][swapped.numpy()].sum())
    with pytest.raises(ValueError, match="valid encoder tokens"):
        cache.hidden("encoder", swapped, batch["attention_mask"], [2])
    with pytest.raises(ValueError, match="is not cached row"):
        cache.check_rows(swapped, batch)
    # rows of equal length swapped: only the token fingerprints can tell
    same = [i for i in range(len(lengths)) if lengths[i] == lengths[rows[2]] and i != rows[2]]
    assert same
    pair = np.array([rows[2], same[0]])
    b2 = encoded["train"].batch(pair)
    cache.hidden("encoder", b2["index"][[1, 0]], b2["attention_mask"], [2])  # counts cannot see it
    with pytest.raises(ValueError, match="is not cached row"):
        cache.check_rows(b2["index"][[1, 0]], b2)


def test_distiller_refuses_a_batch_out_of_step_with_the_cache(built, family, teacher, encoded):
    from tunekd.distill import Distiller
    from tunekd.study import DistillConfig

    _, info = built
    cache = tc.TeacherCache.open(info.folder)
    d = Distiller(family=family, student=teacher, teacher=None, layer_map=[(0, 0), (1, 2)],
                  distill=DistillConfig(), cache=cache)
    batch = encoded["train"].batch(np.array([0, 1, 2, 3]))
    d.losses(batch)  # in step
    batch["index"] = batch["index"].flip(0)
    with pytest.raises(ValueError, match="teacher cache"):
        d.losses(batch)
