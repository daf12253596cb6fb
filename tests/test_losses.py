"""Losses against independent float64 references written from SPEC.md ("Loss")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tunekd.errors import ConfigError
from tunekd.losses import (
    AGGREGATE,
    HIDDEN_LOSSES,
    NORMALIZE,
    REDUCTIONS,
    hidden_loss,
    hidden_pair_loss,
    kl_loss,
    total_loss,
)

RTOL = 1e-5
ATOL = 1e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_mask(b: int, l: int, seed: int) -> torch.Tensor:
    """Random padding: right padding on some rows plus a few holes; at least one valid token."""
    g = _gen(seed)
    lengths = torch.randint(1, l + 1, (b,), generator=g)
    mask = (torch.arange(l)[None, :] < lengths[:, None]).long()
    holes = torch.rand(b, l, generator=g) < 0.15
    mask[holes] = 0
    mask[0, 0] = 1
    return mask


# ---------------------------------------------------------------- float64 references

def _ref_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def _ref_kl_row(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    ls = _ref_log_softmax(s / tau)
    lt = _ref_log_softmax(t / tau)
    pt = np.exp(lt)
    return tau * tau * float(sum(pt[c] * (lt[c] - ls[c]) for c in range(len(s))))


def ref_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float, mask=None) -> float:
    s = student.double().numpy()
    t = teacher.double().numpy()
    if s.ndim == 2:
        rows = [_ref_kl_row(s[b], t[b], tau) for b in range(s.shape[0])]
    else:
        m = np.ones(s.shape[:2]) if mask is None else mask.numpy()
        rows = [
            _ref_kl_row(s[b, i], t[b, i], tau)
            for b in range(s.shape[0])
            for i in range(s.shape[1])
            if m[b, i] != 0
        ]
    return sum(rows) / len(rows)


def _ref_norm(x: np.ndarray, normalize: str) -> np.ndarray:
    if normalize == "layernorm":
        mu = x.sum() / len(x)
        var = ((x - mu) ** 2).sum() / len(x)  # biased variance, as layer norm uses
        return (x - mu) / math.sqrt(var + 1e-5)
    if normalize == "l2":
        return x / max(math.sqrt((x * x).sum()), 1e-12)
    return x


def _ref_tensor_norm(x: np.ndarray, m: np.ndarray, padded: bool) -> np.ndarray:
    """One mean and (biased) variance over the whole [B, L, H] tensor: over every element (padded) or
    over the elements of valid positions only; the whole tensor is then normalised with them."""
    vals = [x[b, i, h] for b in range(x.shape[0]) for i in range(x.shape[1]) for h in range(x.shape[2])
            if padded or m[b, i] != 0]
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / len(vals)
    return (x - mu) / math.sqrt(var + 1e-5)


def ref_hidden(student, teacher, mask, loss, reduction, normalize) -> float:
    s = student.double().numpy()
    t = teacher.double().numpy()
    m = mask.numpy()
    batch, length, width = s.shape
    if normalize in ("layernorm_tensor", "layernorm_tensor_padded"):
        padded = normalize == "layernorm_tensor_padded"
        s, t = _ref_tensor_norm(s, m, padded), _ref_tensor_norm(t, m, padded)
        normalize = "none"
    if reduction == "token_sum_padded":  # every position, padding included: mean over B·L, × N/(B·L)
        per_pos = []
        for b in range(batch):
            for i in range(length):
                sv, tv = _ref_norm(s[b, i], normalize), _ref_norm(t[b, i], normalize)
                per_pos.append(sum((sv[h] - tv[h]) ** 2 for h in range(width)))
        n = int((m != 0).sum())
        return sum(per_pos) / (batch * length) * n / (batch * length)
    sq_sum, cos_terms, n_valid = 0.0, [], 0
    for b in range(batch):
        for i in range(length):
            if m[b, i] == 0:
                continue
            n_valid += 1
            sv = _ref_norm(s[b, i], normalize)
            tv = _ref_norm(t[b, i], normalize)
            for h in range(width):
                sq_sum += (sv[h] - tv[h]) ** 2
            cos = float(sv @ tv) / (math.sqrt(float(sv @ sv)) * math.sqrt(float(tv @ tv)))
            cos_terms.append(1.0 - cos)
    if loss == "cosine":
        return sum(cos_terms) / n_valid
    if reduction == "element_mean":
        return sq_sum / (n_valid * width)
    if reduction == "token_sum":
        return sq_sum / n_valid
    return sq_sum / (batch * n_valid)  # paper: batch size x valid positions in the batch


def _close(got: torch.Tensor, want: float):
    assert got.dim() == 0
    assert got.item() == pytest.approx(want, rel=RTOL, abs=ATOL)


# ---------------------------------------------------------------- KL

@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_classification_matches_reference(tau, seed):
    g = _gen(seed)
    s = torch.randn(7, 5, generator=g) * 3
    t = torch.randn(7, 5, generator=g) * 3
    got = kl_loss(s, t, tau)
    assert got.dtype == torch.float32
    _close(got, ref_kl(s, t, tau))
    _close(kl_loss(s, t, tau, mask=torch.zeros(7)), ref_kl(s, t, tau))  # mask ignored for [B, C]


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_tokens_matches_reference(tau, seed):
    g = _gen(seed)
    s = torch.randn(3, 6, 11, generator=g) * 2
    t = torch.randn(3, 6, 11, generator=g) * 2
    mask = _random_mask(3, 6, seed)
    _close(kl_loss(s, t, tau, mask), ref_kl(s, t, tau, mask))
    _close(kl_loss(s, t, tau), ref_kl(s, t, tau))  # no mask: every token counts


def test_kl_zero_for_identical_and_positive_otherwise():
    g = _gen(3)
    x = torch.randn(4, 9, generator=g)
    assert kl_loss(x, x.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(x, torch.randn(4, 9, generator=g), 1.0).item() > 0


def test_kl_numerically_stable_for_extreme_logits():
    s = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[-1000.0, 1000.0, 0.0], [500.0, -500.0, 0.0]])
    got = kl_loss(s, t, 1.0)
    assert torch.isfinite(got)
    _close(got, ref_kl(s, t, 1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_low_precision_upcast(dtype):
    g = _gen(4)
    s = (torch.randn(2, 5, 13, generator=g) * 4).to(dtype)
    t = (torch.randn(2, 5, 13, generator=g) * 4).to(dtype)
    mask = _random_mask(2, 5, 4)
    got = kl_loss(s, t, 2.0, mask)
    assert got.dtype == torch.float32
    _close(got, ref_kl(s.float(), t.float(), 2.0, mask))


def test_kl_padding_has_no_influence():
    g = _gen(5)
    s = torch.randn(3, 7, 10, generator=g)
    t = torch.randn(3, 7, 10, generator=g)
    mask = _random_mask(3, 7, 5)
    pad = mask == 0
    assert pad.any()
    base = kl_loss(s, t, 1.0, mask)
    for fill in (1e30, -1e30, float("nan"), float("inf")):
        s2, t2 = s.clone(), t.clone()
        s2[pad] = fill
        t2[pad] = fill
        assert torch.equal(kl_loss(s2, t2, 1.0, mask), base)
        s2.requires_grad_(True)
        kl_loss(s2, t2, 1.0, mask).backward()
        assert torch.isfinite(s2.grad).all()
        assert (s2.grad[pad] == 0).all()


def test_kl_gradient_flows_to_student():
    g = _gen(6)
    s = torch.randn(3, 4, 8, generator=g, requires_grad=True)
    t = torch.randn(3, 4, 8, generator=g)
    mask = _random_mask(3, 4, 6)
    kl_loss(s, t, 2.0, mask).backward()
    assert s.grad is not None
    assert s.grad[mask.bool()].abs().sum() > 0


# ---------------------------------------------------------------- hidden pair loss

HIDDEN_COMBOS = [
    (loss, red, norm) for loss in HIDDEN_LOSSES for red in REDUCTIONS for norm in NORMALIZE
    if not (loss == "cosine" and red == "token_sum_padded")  # refused: see test_cosine_with_padded_sum
]
# the options that read padding on purpose (the paper's T5 / Qwen3 code)
PADDING_BLIND = [c for c in HIDDEN_COMBOS if c[1] != "token_sum_padded" and c[2] != "layernorm_tensor_padded"]


@pytest.mark.parametrize(("loss", "reduction", "normalize"), HIDDEN_COMBOS)
@pytest.mark.parametrize("seed", [0, 1])
def test_hidden_pair_matches_reference(loss, reduction, normalize, seed):
    g = _gen(100 + seed)
    s = torch.randn(3, 5, 8, generator=g) * 2 + 0.5
    t = torch.randn(3, 5, 8, generator=g) * 2 - 0.5
    mask = _random_mask(3, 5, seed)
    got = hidden_pair_loss(s, t, mask, loss=loss, reduction=reduction, normalize=normalize)
    assert got.dtype == torch.float32
    _close(got, ref_hidden(s, t, mask, loss, reduction, normalize))


def test_hidden_pair_reductions_relationship():
    g = _gen(7)
    s, t = torch.randn(4, 6, 10, generator=g), torch.randn(4, 6, 10, generator=g)
    mask = _random_mask(4, 6, 7)
    em = hidden_pair_loss(s, t, mask, reduction="element_mean")
    ts = hidden_pair_loss(s, t, mask, reduction="token_sum")
    pp = hidden_pair_loss(s, t, mask, reduction="paper")
    torch.testing.assert_close(ts, em * 10)
    torch.testing.assert_close(pp, ts / 4)


def test_hidden_pair_defaults_and_no_mask():
    g = _gen(8)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    ones = torch.ones(2, 3, dtype=torch.long)
    want = ref_hidden(s, t, ones, "mse", "element_mean", "none")
    _close(hidden_pair_loss(s, t, ones), want)
    _close(hidden_pair_loss(s, t, None), want)
    _close(hidden_pair_loss(s, t, ones.bool()), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hidden_pair_low_precision_upcast(dtype):
    g = _gen(9)
    s = torch.randn(2, 4, 16, generator=g).to(dtype)
    t = torch.randn(2, 4, 16, generator=g).to(dtype)
    mask = _random_mask(2, 4, 9)
    got = hidden_pair_loss(s, t, mask, normalize="layernorm")
    assert got.dtype == torch.float32
    _close(got, ref_hidden(s.float(), t.float(), mask, "mse", "element_mean", "layernorm"))


@pytest.mark.parametrize(("loss", "reduction", "normalize"), PADDING_BLIND)
def test_hidden_padding_has_no_influence(loss, reduction, normalize):
    g = _gen(10)
    s = torch.randn(3, 6, 8, generator=g)
    t = torch.randn(3, 6, 8, generator=g)
    mask = _random_mask(3, 6, 10)
    pad = mask == 0
    assert pad.any()
    kw = dict(loss=loss, reduction=reduction, normalize=normalize)
    base = hidden_pair_loss(s, t, mask, **kw)
    for fill in (1e30, float("nan"), float("inf")):
        s2, t2 = s.clone(), t.clone()
        s2[pad] = fill
        t2[pad] = fill
        s2.requires_grad_(True)
        got = hidden_pair_loss(s2, t2, mask, **kw)
        assert torch.equal(got.detach(), base)
        got.backward()
        assert torch.isfinite(s2.grad).all()
        assert (s2.grad[pad] == 0).all()


def test_hidden_pair_gradient_flows():
    g = _gen(11)
    s = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 6, generator=g)
    mask = _random_mask(2, 5, 11)
    for loss in HIDDEN_LOSSES:
        s.grad = None
        hidden_pair_loss(s, t, mask, loss=loss).backward()
        assert s.grad[mask.bool()].abs().sum() > 0


def test_hidden_pair_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        hidden_pair_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), None)


# ---------------------------------------------------------------- hidden loss over a map

def _states(n: int, b: int, l: int, h: int, seed: int, requires_grad=False):
    g = _gen(seed)
    return [torch.randn(b, l, h, generator=g, requires_grad=requires_grad) for _ in range(n)]


@pytest.mark.parametrize(("loss", "reduction", "normalize"), HIDDEN_COMBOS)
def test_hidden_loss_matches_reference(loss, reduction, normalize):
    student = _states(4, 3, 5, 6, 20)  # S = 3
    teacher = _states(13, 3, 5, 6, 21)  # T = 12
    mask = _random_mask(3, 5, 20)
    layer_map = [(0, 0), (1, 4), (2, 8), (3, 12)]
    kw = dict(loss=loss, reduction=reduction, normalize=normalize)
    pair_refs = [ref_hidden(student[a], teacher[b], mask, loss, reduction, normalize)
                 for a, b in layer_map]
    _close(hidden_loss(student, teacher, layer_map, mask, aggregate="mean", **kw),
           sum(pair_refs) / len(pair_refs))
    _close(hidden_loss(student, teacher, layer_map, mask, aggregate="sum", **kw), sum(pair_refs))


def test_hidden_loss_mean_vs_sum():
    student = _states(4, 2, 6, 5, 30)
    teacher = _states(13, 2, 6, 5, 31)
    mask = _random_mask(2, 6, 30)
    layer_map = [(1, 6), (2, 6), (3, 6), (0, 6)]  # all_to_one with embeddings, list order kept
    mean = hidden_loss(student, teacher, layer_map, mask, aggregate="mean")
    total = hidden_loss(student, teacher, layer_map, mask, aggregate="sum")
    torch.testing.assert_close(total, mean * len(layer_map))
    pairs = sum(hidden_pair_loss(student[a], teacher[b], mask) for a, b in layer_map)
    torch.testing.assert_close(total, pairs)
    # lists from YAML work the same as tuples
    torch.testing.assert_close(
        hidden_loss(student, teacher, [list(p) for p in layer_map], mask), mean
    )


def test_hidden_loss_empty_map():
    student = _states(2, 2, 3, 4, 40)
    teacher = _states(3, 2, 3, 4, 41)
    got = hidden_loss(student, teacher, [], torch.ones(2, 3))
    assert got.dim() == 0 and got.dtype == torch.float32 and got.item() == 0.0
    assert got.device == student[0].device


def test_hidden_loss_projections_applied():
    torch.manual_seed(0)
    student = _states(3, 2, 4, 4, 50, requires_grad=True)  # width 4
    teacher = _states(5, 2, 4, 8, 51)  # width 8
    mask = _random_mask(2, 4, 50)
    projs = {i: torch.nn.Linear(4, 8) for i in range(3)}
    layer_map = [(0, 0), (1, 2), (2, 4)]
    got = hidden_loss(student, teacher, layer_map, mask, projections=projs, aggregate="sum")
    with torch.no_grad():
        want = sum(
            ref_hidden(projs[a](student[a]), teacher[b], mask, "mse", "element_mean", "none")
            for a, b in layer_map
        )
    _close(got, want)
    got.backward()
    for i in range(3):
        assert projs[i].weight.grad is not None and projs[i].weight.grad.abs().sum() > 0
        assert student[i].grad[mask.bool()].abs().sum() > 0
    # a projection only applies to its own key; the others need equal widths
    with pytest.raises(ValueError, match="projection"):
        hidden_loss(student, teacher, layer_map, mask, projections={0: projs[0]})


def test_hidden_loss_projection_padding_cannot_leak():
    student = _states(2, 2, 5, 4, 60, requires_grad=False)
    teacher = _states(3, 2, 5, 8, 61)
    mask = _random_mask(2, 5, 60)
    pad = mask == 0
    assert pad.any()
    proj = torch.nn.Linear(4, 8)
    base = hidden_loss(student, teacher, [(1, 2)], mask, projections={1: proj})
    student[1] = student[1].clone()
    student[1][pad] = float("nan")
    teacher[2] = teacher[2].clone()
    teacher[2][pad] = float("nan")
    got = hidden_loss(student, teacher, [(1, 2)], mask, projections={1: proj})
    assert torch.equal(got.detach(), base.detach())
    got.backward()
    assert torch.isfinite(proj.weight.grad).all() and torch.isfinite(proj.bias.grad).all()


def test_hidden_loss_gradient_flows_to_student():
    student = _states(4, 2, 3, 6, 70, requires_grad=True)
    teacher = _states(13, 2, 3, 6, 71)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    hidden_loss(student, teacher, [(0, 0), (1, 4), (2, 8), (3, 12)], mask,
                normalize="l2").backward()
    for st in student:
        assert st.grad[mask.bool()].abs().sum() > 0
        assert (st.grad[~mask.bool()] == 0).all()


# ---------------------------------------------------------------- total and errors

def test_total_loss():
    ce, kl, hid = torch.tensor(0.5), torch.tensor(2.0), torch.tensor(0.25)
    got = total_loss(ce, kl, hid, alpha_ce=1.0, alpha_kl=1.0, lambda_hid=3.0)
    torch.testing.assert_close(got, torch.tensor(0.5 + 2.0 + 0.75))
    got = total_loss(ce, kl, hid, alpha_ce=0.0, alpha_kl=2.0, lambda_hid=0.0)
    torch.testing.assert_close(got, torch.tensor(4.0))


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"loss": "mes"}, r"unknown hidden_loss 'mes'.*did you mean 'mse'"),
    ({"reduction": "papr"}, r"unknown reduction 'papr'.*did you mean 'paper'"),
    ({"normalize": "layer_norm"}, r"unknown hidden_normalize 'layer_norm'.*did you mean 'layernorm'"),
    ({"aggregate": "avg"}, r"unknown aggregate 'avg'; known: mean, sum"),
])
def test_unknown_options(kwargs, pattern):
    s = _states(2, 1, 2, 3, 80)
    t = _states(2, 1, 2, 3, 81)
    with pytest.raises(ConfigError, match=pattern):
        hidden_loss(s, t, [(1, 1)], None, **kwargs)
    with pytest.raises(ConfigError, match=pattern):
        hidden_loss(s, t, [], None, **kwargs)  # options are checked even when the map is empty
    if "aggregate" not in kwargs:
        with pytest.raises(ConfigError, match=pattern):
            hidden_pair_loss(s[0], t[0], None, **kwargs)


def test_every_listed_option_is_implemented_and_accepted_by_the_study():
    """Each name in the option tuples runs (a finite, non-negative loss that is 0 for equal states) and is
    what the study schema accepts for that key."""
    import itertools

    from tunekd.study import DistillConfig

    s = _states(2, 1, 3, 4, 82)
    t = _states(2, 1, 3, 4, 83)
    for loss, reduction, normalize, aggregate in itertools.product(HIDDEN_LOSSES, REDUCTIONS, NORMALIZE, AGGREGATE):
        kw = {"loss": loss, "reduction": reduction, "normalize": normalize, "aggregate": aggregate}
        if loss == "cosine" and reduction == "token_sum_padded":
            continue  # refused: see test_cosine_with_padded_sum_is_refused
        got = hidden_loss(s, t, [(1, 1)], None, **kw)
        assert torch.isfinite(got) and float(got) >= 0, kw
        assert float(hidden_loss(s, s, [(1, 1)], None, **kw)) == pytest.approx(0.0, abs=1e-6), kw
        cfg = DistillConfig(hidden_loss=loss, reduction=reduction, hidden_normalize=normalize, aggregate=aggregate)
        assert (cfg.hidden_loss, cfg.reduction, cfg.hidden_normalize, cfg.aggregate) == (loss, reduction, normalize,
                                                                                       aggregate)


def test_cosine_with_padded_sum_is_refused():
    s, t = _states(2, 2, 3, 4, 90), _states(2, 2, 3, 4, 91)
    with pytest.raises(ValueError, match="token_sum_padded"):
        hidden_loss(s, t, [(1, 1)], torch.ones(2, 3), loss="cosine", reduction="token_sum_padded")


@pytest.mark.parametrize(("reduction", "normalize"), [("token_sum_padded", "l2"),
                                                      ("element_mean", "layernorm_tensor_padded")])
def test_padded_variants_read_padding(reduction, normalize):
    # the paper-exact options read the padded positions' states (that is what they reproduce)
    g = _gen(92)
    s, t = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    base = hidden_pair_loss(s, t, mask, reduction=reduction, normalize=normalize)
    s2 = s.clone()
    s2[0, 3:] += 3.0
    assert not torch.equal(hidden_pair_loss(s2, t, mask, reduction=reduction, normalize=normalize), base)


def test_padded_variants_without_padding_equal_the_plain_ones():
    # SPEC: with no padding the Qwen3 formula equals token_sum (averaged over pairs), and the padded
    # tensor-wide layer norm equals the one over valid positions
    g = _gen(93)
    s, t = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    ones = torch.ones(3, 4)
    torch.testing.assert_close(hidden_pair_loss(s, t, ones, reduction="token_sum_padded", normalize="l2"),
                               hidden_pair_loss(s, t, ones, reduction="token_sum", normalize="l2"))
    torch.testing.assert_close(hidden_pair_loss(s, t, ones, normalize="layernorm_tensor_padded"),
                               hidden_pair_loss(s, t, ones, normalize="layernorm_tensor"))
