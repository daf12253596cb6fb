"""The KD loop: the loss is α_ce·CE + α_kl·KL + λ·L_hid of the models' outputs; the teacher cache
changes nothing but the stored precision; bf16 works on the CPU; a short fit lowers the loss;
a trial with a full cache never builds the teacher."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tunekd import cache as tc
from tunekd import distill
from tunekd.students import build_student
from tunekd.study import DistillConfig, StudentConfig, Study, TrainConfig
from tunekd.tasks import get_task

SPEC = get_task("synthetic")


pytestmark = pytest.mark.usefixtures("one_thread")


DCFG = DistillConfig(strategy="forward", alpha_ce=0.5, alpha_kl=2.0, lambda_hid=3.0, temperature=2.0)
MAP = [(0, 0), (1, 2), (2, 4)]  # forward, T=4 -> S=2, embeddings matched


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, family, teacher, encoded):
    info = tc.prepare(family, teacher, encoded["train"], tmp_path_factory.mktemp("tc"), layers=(0, 2, 4),
                      max_length=32)
    return info, tc.TeacherCache.open(info.folder)


@pytest.fixture(scope="module")
def logits_cache(tmp_path_factory, family, teacher, encoded):
    info = tc.prepare(family, teacher, encoded["train"], tmp_path_factory.mktemp("tcl"), layers=(0, 2, 4),
                      max_length=32, budget_gb=1e-5)
    assert info.mode == "logits"
    return tc.TeacherCache.open(info.folder)


def make(family, teacher, *, cache=None, with_teacher=True, dcfg=DCFG, seed=0, init="copy"):
    st = build_student(teacher, family, SPEC, StudentConfig(layers=2, init=init), seed=seed)
    return distill.Distiller(family=family, student=st.model, teacher=teacher if with_teacher else None,
                             layer_map=list(MAP), distill=dcfg, cache=cache)


def test_loss_is_the_weighted_sum_of_ce_kl_and_hidden(family, teacher, encoded):
    d = make(family, teacher)
    d.student.eval()  # no dropout: the independent forward below sees the same model
    batch = encoded["train"].batch(np.arange(20))
    parts = d.losses(batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        so = d.student(**inputs, output_hidden_states=True)
        to = teacher(**inputs, output_hidden_states=True)
    tau = DCFG.temperature
    ce = F.cross_entropy(so.logits, batch["labels"])
    log_pt = torch.log_softmax(to.logits / tau, -1)
    kl = (tau**2) * (log_pt.exp() * (log_pt - torch.log_softmax(so.logits / tau, -1))).sum(-1).mean()
    valid = batch["attention_mask"].bool()
    hid = torch.stack([((so.hidden_states[s][valid] - to.hidden_states[t][valid]) ** 2).mean() for s, t in MAP]).mean()
    for name, want in (("loss_ce", ce), ("loss_kl", kl), ("loss_hid", hid)):
        torch.testing.assert_close(parts[name].detach(), want, rtol=1e-5, atol=1e-6)
        assert want > 0
    torch.testing.assert_close(parts["loss"].detach(), 0.5 * ce + 2.0 * kl + 3.0 * hid, rtol=1e-5, atol=1e-6)


def test_cached_losses_equal_online_losses(family, teacher, encoded, full_cache, logits_cache):
    _, cache = full_cache
    batch = encoded["train"].batch(np.array([40, 2, 7, 63, 11, 30]))
    online = make(family, teacher)
    cached = make(family, teacher, cache=cache, with_teacher=False)
    logits_only = make(family, teacher, cache=logits_cache)
    got = {}
    for name, d in (("online", online), ("cached", cached), ("logits", logits_only)):
        d.student.eval()
        got[name] = {k: v.detach() for k, v in d.losses(batch).items()}
    torch.testing.assert_close(got["cached"]["loss_ce"], got["online"]["loss_ce"], rtol=0, atol=0)
    torch.testing.assert_close(got["cached"]["loss_kl"], got["online"]["loss_kl"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["cached"]["loss_hid"], got["online"]["loss_hid"], rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(got["cached"]["loss"], got["online"]["loss"], rtol=2e-3, atol=1e-6)
    # logits from the cache, hidden states from the teacher cut after layer 4 (= all of this one)
    for k in ("loss_kl", "loss_hid", "loss"):
        torch.testing.assert_close(got["logits"][k], got["online"][k], rtol=1e-5, atol=1e-7)
    assert (online.teacher_rows, online.cached_rows) == (6, 0)
    assert (cached.teacher_rows, cached.cached_rows) == (0, 6)
    assert (logits_only.teacher_rows, logits_only.cached_rows) == (6, 6)
    assert not cached.needs_teacher_model() and logits_only.needs_teacher_model()


@pytest.mark.parametrize("opts", [{"reduction": "token_sum_padded", "hidden_normalize": "l2"},
                                  {"hidden_normalize": "layernorm_tensor_padded"}])
def test_options_that_read_padding_take_hidden_states_from_the_teacher_not_the_cache(family, teacher, encoded,
                                                                                   full_cache, opts):
    """The cache keeps valid tokens only: the paper-exact `_padded` options need the real padded states."""
    _, cache = full_cache
    dcfg = DCFG.model_copy(update=opts)
    batch = encoded["train"].batch(np.array([40, 2, 7, 63, 11, 30]))
    assert not bool(batch["attention_mask"].bool().all())  # there is padding to read
    assert distill.teacher_needed(dcfg, MAP, cache) and not distill.teacher_needed(DCFG, MAP, cache)
    with pytest.raises(RuntimeError, match="cache lacks"):
        make(family, teacher, cache=cache, with_teacher=False, dcfg=dcfg).losses(batch)
    online, mixed = make(family, teacher, dcfg=dcfg), make(family, teacher, cache=cache, dcfg=dcfg)
    online.student.eval()
    mixed.student.eval()
    a, b = online.losses(batch), mixed.losses(batch)
    assert mixed.teacher_rows == 6  # hidden states from the teacher model (logits from the cache)
    torch.testing.assert_close(b["loss_hid"].detach(), a["loss_hid"].detach(), rtol=1e-6, atol=1e-7)


def test_logits_only_cache_runs_a_truncated_teacher(family, teacher, encoded, logits_cache):
    dcfg = DCFG.model_copy(update={"strategy": "all_to_one"})
    d = make(family, teacher, cache=logits_cache, dcfg=dcfg)
    d.layer_map = [(0, 2), (1, 2), (2, 2)]
    d.student.eval()
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, k=k: ran.append(k))
             for k, layer in enumerate(family.stacks(teacher)["encoder"])]
    try:
        parts = d.losses(encoded["train"].batch(np.arange(8)))
    finally:
        for h in hooks:
            h.remove()
    assert d._short is not None and d._short.keep == 2 and ran == [0, 1]  # the teacher ran layers 1-2 only
    ref = make(family, teacher, dcfg=dcfg)
    ref.layer_map = list(d.layer_map)
    ref.student.eval()
    want = ref.losses(encoded["train"].batch(np.arange(8)))
    torch.testing.assert_close(parts["loss"].detach(), want["loss"].detach(), rtol=1e-5, atol=1e-7)


def _train_cfg(**kw):
    base = {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "lr": 1e-3, "warmup_ratio": 0.0}
    base.update(kw)
    return TrainConfig(**base)


def test_fit_with_cache_matches_fit_without(family, teacher, encoded, full_cache):
    _, cache = full_cache
    evals = {"validation": encoded["validation"]}
    histories = {}
    for name, kwargs in (("online", {}), ("cached", {"cache": cache, "with_teacher": False})):
        d = make(family, teacher, **kwargs)
        torch.manual_seed(123)  # same dropout masks
        histories[name] = distill.fit(d, SPEC, encoded["train"], evals, _train_cfg(), epochs=2, seed=5)
    for a, b in zip(histories["online"], histories["cached"]):
        for k in ("train/loss", "train/loss_ce", "train/loss_kl", "train/loss_hid"):
            assert b[k] == pytest.approx(a[k], rel=2e-3, abs=1e-6), k
        assert b["eval/accuracy"] == pytest.approx(a["eval/accuracy"], abs=1 / 32 + 1e-9)
    assert histories["online"][-1]["perf/teacher_rows"] == 2 * 64
    assert histories["cached"][-1]["perf/teacher_rows"] == 0
    assert histories["cached"][-1]["perf/cached_rows"] == 2 * 64
    assert 0 <= histories["cached"][0]["perf/pad_frac"] < 1


def _mean_loss(d, data):
    d.student.eval()
    with torch.no_grad():
        vals = [float(d.losses(data.batch(np.arange(s, min(s + 32, len(data)))))["loss"]) for s in range(0, len(data), 32)]
    return float(np.mean(vals))


def test_short_fit_lowers_the_training_loss(family, teacher, encoded):
    d = make(family, teacher, init="random")
    before = _mean_loss(d, encoded["train"])
    torch.manual_seed(0)
    history = distill.fit(d, SPEC, encoded["train"], {"validation": encoded["validation"]}, _train_cfg(epochs=3),
                          epochs=3, seed=0)
    after = _mean_loss(d, encoded["train"])
    assert after < 0.8 * before, (before, after)
    assert history[-1]["train/loss"] < history[0]["train/loss"]


def test_bf16_on_cpu_runs_and_is_close_to_fp32(family, teacher, encoded):
    d = make(family, teacher)
    d.student.eval()
    batch = encoded["train"].batch(np.arange(32))
    with torch.no_grad():
        fp32 = {k: float(v) for k, v in d.losses(batch).items()}
        with distill.autocast(torch.device("cpu"), "bf16"):
            bf16 = {k: float(v) for k, v in d.losses(batch).items()}
    for k in fp32:
        assert np.isfinite(bf16[k])
        assert bf16[k] == pytest.approx(fp32[k], rel=5e-2, abs=1e-3), k
    torch.manual_seed(0)
    history = distill.fit(d, SPEC, encoded["train"], {"validation": encoded["validation"]},
                          _train_cfg(epochs=1, precision="bf16", batch_size=32), epochs=1, seed=0)
    assert all(np.isfinite(v) for v in history[0].values())


def test_fp16_needs_a_gpu():
    if torch.cuda.is_available():
        assert distill.device_for("fp16").type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="needs a GPU"):
            distill.device_for("fp16")


def test_evaluate_by_length_keeps_row_order(family, teacher, encoded):
    data = encoded["validation"]
    got = distill.evaluate(family, teacher, SPEC, {"validation": data}, batch_size=8)
    with torch.no_grad():
        preds = teacher(**{k: torch.from_numpy(data.arrays[k]).long()
                           for k in ("input_ids", "attention_mask", "token_type_ids")}).logits.argmax(-1).numpy()
    assert got["accuracy"] == pytest.approx(100.0 * float(np.mean(preds == data.arrays["labels"])))


def test_trial_with_full_cache_never_builds_the_teacher(family, teacher, encoded, full_cache, tmp_path):
    from tunekd.trainable import make_shared, run_trial

    info, _ = full_cache
    study = Study.model_validate({
        "name": "t", "task": {"name": "synthetic", "max_length": 32}, "teacher": {"model": "minilm"},
        "student": {"layers": 2, "init": "copy"}, "distill": DCFG.model_dump(),
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3}})
    cached = make_shared(study, family.name, teacher, encoded, cache=info)
    online = make_shared(study, family.name, teacher, encoded)
    shipped = make_shared(study, family.name, teacher, encoded, cache=info, ship_cache=True)
    assert shipped.cache_arrays is not None
    shipped.cache = dataclasses.replace(info, folder=str(tmp_path / "not-on-this-node"))  # another node
    results = {}
    for name, shared in (("cached", cached), ("online", online), ("shipped", shipped), ("warm", cached)):
        torch.manual_seed(0)
        results[name] = run_trial({}, shared)[-1]
    assert results["cached"]["perf/teacher_built"] == 0 and results["cached"]["perf/teacher_rows"] == 0
    assert results["shipped"]["perf/cache_hit"] == 1 and results["shipped"]["perf/teacher_rows"] == 0
    assert results["online"]["perf/teacher_built"] == 1 and results["online"]["perf/teacher_rows"] == 64
    assert results["cached"]["train/loss"] == pytest.approx(results["online"]["train/loss"], rel=2e-3)
    assert results["warm"]["train/loss"] == results["cached"]["train/loss"]
    assert 0 < results["warm"]["perf/startup_s"] < 5.0


def test_trial_the_full_cache_does_not_cover_is_an_error(family, teacher, encoded, full_cache):
    """The study built a full cache of layers (0, 2, 4); a trial mapping teacher layer 3 would silently
    run the teacher online: an error instead."""
    from tunekd.trainable import make_shared, run_trial

    info, _ = full_cache
    study = Study.model_validate({
        "name": "t", "task": {"name": "synthetic", "max_length": 32}, "teacher": {"model": "minilm"},
        "student": {"layers": 2, "init": "copy"}, "distill": {**DCFG.model_dump(), "strategy": [(1, 3)]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3}})
    shared = make_shared(study, family.name, teacher, encoded, cache=info)
    with pytest.raises(RuntimeError, match=r"holds layers \[0, 2, 4\] but this trial maps teacher layers \[3\]"):
        run_trial({}, shared)


def test_single_init_initialises_every_weight_once(family, teacher):
    """Constructor-level torch init is skipped; transformers' init still sets every parameter and buffer."""
    from tunekd.trainable import single_init

    cfg = StudentConfig(layers=2, init="random")
    default = build_student(teacher, family, SPEC, cfg, seed=0).model
    with single_init():
        quick = build_student(teacher, family, SPEC, cfg, seed=0).model
    assert torch.nn.init.normal_ is not None and torch.nn.Linear(2, 2).weight.abs().sum() > 0  # restored
    ref = {n: q.detach() for n, q in default.named_parameters()}
    std = teacher.config.initializer_range
    for name, p in ((n, q.detach()) for n, q in quick.named_parameters()):
        assert torch.isfinite(p).all(), name
        if name.endswith("LayerNorm.weight"):
            assert torch.equal(p, ref[name]), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif p.numel() > 100:
            assert abs(float(p.std()) - std) < 0.25 * std, name
    for (name, b), (_, b_ref) in zip(quick.named_buffers(), default.named_buffers()):
        assert torch.equal(b, b_ref), name


def test_shared_teacher_is_the_teacher(family, teacher, encoded):
    from tunekd.study import Study
    from tunekd.trainable import make_shared

    study = Study.model_validate({"name": "t", "task": {"name": "synthetic"}, "teacher": {"model": "minilm"}})
    shared = make_shared(study, family.name, teacher, encoded)
    rebuilt = shared.teacher(SPEC)
    assert rebuilt is shared.teacher(SPEC)  # once per worker
    batch = {k: v for k, v in encoded["train"].batch(np.arange(16)).items() if k != "index"}
    with torch.no_grad():
        a, b = family.forward(teacher, batch), family.forward(rebuilt, batch)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden["encoder"], b.hidden["encoder"]))


def test_linear_schedule_with_warmup_equals_transformers():
    """distill's own linear schedule (not imported from transformers, whose import pulls in PEFT) gives
    transformers' factor at every step, for warmup 0, some and all of the steps."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from tunekd.distill import linear_schedule_with_warmup

    for warmup, total in ((0, 7), (3, 20), (10, 10), (1, 1)):
        ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5) for _ in range(2))
        a, b = linear_schedule_with_warmup(ours, warmup, total), get_linear_schedule_with_warmup(theirs, warmup, total)
        for _ in range(total + 3):
            assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
            ours.step(), theirs.step(), a.step(), b.step()
