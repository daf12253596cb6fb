"""Distillation losses: KL on logits and intermediate-layer (hidden-state) matching.

Pure tensor functions; see docs/method.md, "The loss" and "Losses per model family". Everything is
computed in at least float32. Padding positions never influence a value (they are dropped by boolean
indexing before any arithmetic, so NaN/inf there cannot leak into the loss or its gradient), except
under the two options that reproduce the paper's code where it reads padding on purpose:
`hidden_normalize: layernorm_tensor_padded` (the paper's T5: layer-norm statistics of the whole
[B, L, H] tensor) and `reduction: token_sum_padded` (the paper's Qwen3: a mean over every position).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tunekd.errors import unknown

HIDDEN_LOSSES = ("mse", "cosine")
# E = Σ of squared error over valid positions and hidden units, N = valid positions in the batch,
# B = batch, L = padded length, H = width:
#   element_mean E/(N·H) · token_sum E/N · paper (BERT code) E/(B·N)
#   token_sum_padded: Σ over H per position, mean over all B·L positions (padding included), × N/(B·L)
REDUCTIONS = ("element_mean", "token_sum", "paper", "token_sum_padded")
# none · layernorm: per position (parameter-free) · l2: unit length per position ·
# layernorm_tensor: one mean/variance over the pair's whole tensor (valid positions) ·
# layernorm_tensor_padded: the same over the whole [B, L, H] tensor, padding included (the paper's T5)
NORMALIZE = ("none", "layernorm", "l2", "layernorm_tensor", "layernorm_tensor_padded")
AGGREGATE = ("mean", "sum")
KL_POSITIONS = ("targets", "sequence")
# reductions / normalisations that read padding positions: they need the full [B, L, H] tensors
_PADDED_REDUCTIONS = ("token_sum_padded",)
_PADDED_NORMALIZE = ("layernorm_tensor_padded",)
LN_EPS = 1e-5


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_option(kind: str, value: object, known: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in known:
        raise unknown(kind, value, known)


def _valid(mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """Boolean [B, L] mask of valid positions (all valid when ``mask`` is None)."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(shape)}")
    return mask.to(device) != 0


def kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """``τ² · Σ_c p_t(τ) (log p_t(τ) − log p_s(τ))``, averaged over examples or valid tokens.

    ``[B, C]`` logits: mean over examples (``mask`` ignored). ``[B, L, V]`` logits with a
    ``[B, L]`` mask (1 = real token): mean over non-padding tokens (all tokens if no mask).
    Returns a float32 scalar (float64 for float64 inputs); 0 when there is no valid token.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.dim() == 3:
        valid = _valid(mask, student_logits.shape[:2], student_logits.device)
        s, t = student_logits[valid], teacher_logits[valid]  # [N, V]
    elif student_logits.dim() == 2:
        s, t = student_logits, teacher_logits
    else:
        raise ValueError(f"logits must be [B, C] or [B, L, V], got {tuple(student_logits.shape)}")
    s, t = _upcast(s), _upcast(t)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    per = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # [N]
    n = per.shape[0]
    return per.sum() * (temperature**2) / max(n, 1)


def _normalize(x: Tensor, normalize: str) -> Tensor:
    """Normalise ``x`` ([N, H] valid rows, or the full [B, L, H] for the padded variants)."""
    if normalize == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS)
    if normalize == "l2":
        return F.normalize(x, dim=-1, eps=1e-12)
    if normalize in ("layernorm_tensor", "layernorm_tensor_padded"):
        if x.numel() == 0:
            return x
        return F.layer_norm(x, tuple(x.shape), eps=LN_EPS)  # one mean and variance over the whole tensor
    return x


def _tensor_layernorm(x: Tensor, valid: Tensor) -> Tensor:
    """``x`` [B, L, H] normalised by the mean and biased variance of its valid positions' elements."""
    v = x[valid]
    if v.numel() == 0:
        return x
    mu = v.mean()
    var = (v - mu).pow(2).mean()
    return (x - mu) / torch.sqrt(var + LN_EPS)


def reads_padding(reduction: str, normalize: str) -> bool:
    """Whether these options read padding positions (the paper-exact variants)."""
    return reduction in _PADDED_REDUCTIONS or normalize in _PADDED_NORMALIZE


def hidden_pair_loss(
    student_h: Tensor,
    teacher_h: Tensor,
    mask: Tensor | None,
    *,
    loss: str = "mse",
    reduction: str = "element_mean",
    normalize: str = "none",
) -> Tensor:
    """Loss between one student and one teacher hidden state ``[B, L, H]`` over valid positions.

    ``mse`` reductions (E = Σ of squared error over valid positions and hidden units, N = valid
    positions in the batch, B = batch size, L = padded length): ``element_mean`` E/(N·H),
    ``token_sum`` E/N, ``paper`` E/(B·N), ``token_sum_padded`` (Σ over H at every position, padding
    included) / (B·L) × N/(B·L). ``cosine``: mean over valid positions of 1 − cos (reduction ignored).
    """
    _check_option("hidden_loss", loss, HIDDEN_LOSSES)
    _check_option("reduction", reduction, REDUCTIONS)
    _check_option("hidden_normalize", normalize, NORMALIZE)
    if student_h.shape != teacher_h.shape or student_h.dim() != 3:
        raise ValueError(
            f"student state {tuple(student_h.shape)} and teacher state {tuple(teacher_h.shape)} "
            "must both be [B, L, H] with the same shape (project the student first)"
        )
    valid = _valid(mask, student_h.shape[:2], student_h.device)
    return _pair_loss(student_h, teacher_h, valid, None, loss, reduction, normalize)


def _pair_loss(
    s_full: Tensor, t_full: Tensor, valid: Tensor, projection, loss: str, reduction: str, normalize: str
) -> Tensor:
    """One pair's loss from the full [B, L, H] states and the [B, L] validity mask."""
    batch = s_full.shape[0]
    if not reads_padding(reduction, normalize):
        # Drop padding before projecting, so nothing at padded positions reaches the
        # projection's gradient either. Projections act position-wise (e.g. nn.Linear).
        s = s_full[valid]
        if projection is not None:
            s = projection(s)
        return _flat_pair_loss(s, t_full[valid], batch, loss, reduction, normalize)
    # the paper-exact variants: the whole tensors, padding included where the option says so
    s = projection(s_full) if projection is not None else s_full
    t = t_full
    if s.shape != t.shape:
        raise ValueError(
            f"student state width {s.shape[-1]} differs from the teacher's {t.shape[-1]} "
            "(a projection is needed)"
        )
    s, t = _upcast(s), _upcast(t)
    if normalize == "layernorm_tensor_padded":
        s, t = _normalize(s, normalize), _normalize(t, normalize)
        if reduction not in _PADDED_REDUCTIONS:  # statistics with padding, the loss over valid positions
            return _flat_pair_loss(s[valid], t[valid], batch, loss, reduction, "none")
    elif normalize == "layernorm_tensor":  # statistics of the valid positions, applied to every position
        s, t = _tensor_layernorm(s, valid), _tensor_layernorm(t, valid)
    else:
        s, t = _normalize(s, normalize), _normalize(t, normalize)  # per position (or none)
    # token_sum_padded: Σ over H at every position, mean over B·L, × N/(B·L)
    if loss == "cosine":
        raise ValueError("reduction 'token_sum_padded' is for hidden_loss 'mse'")
    b, length = valid.shape
    per_pos = (s - t).pow(2).sum(-1)  # [B, L]
    return per_pos.mean() * (valid.sum().to(per_pos.dtype) / (b * length))  # no host sync


def _flat_pair_loss(
    s: Tensor, t: Tensor, batch: int, loss: str, reduction: str, normalize: str
) -> Tensor:
    """Pair loss on the valid rows only: ``s``, ``t`` are [N, H]; ``batch`` is B."""
    if s.shape != t.shape:
        raise ValueError(
            f"student state width {s.shape[-1]} differs from the teacher's {t.shape[-1]} "
            "(a projection is needed)"
        )
    s = _normalize(_upcast(s), normalize)
    t = _normalize(_upcast(t), normalize)
    n, width = s.shape
    if n == 0:
        return s.sum() * 0.0  # keeps dtype, device and the autograd graph
    if loss == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    total = (s - t).pow(2).sum()
    if reduction == "element_mean":
        return total / (n * width)
    if reduction == "token_sum":
        return total / n
    return total / (batch * n)  # paper


def hidden_loss(
    student_states: Sequence[Tensor],
    teacher_states: Sequence[Tensor],
    layer_map: Sequence[tuple[int, int]],
    mask: Tensor | None,
    *,
    loss: str = "mse",
    reduction: str = "element_mean",
    normalize: str = "none",
    aggregate: str = "mean",
    projections: Mapping[int, Callable[[Tensor], Tensor]] | None = None,
) -> Tensor:
    """Pair losses over ``layer_map`` (``(student_index, teacher_index)`` pairs), mean or sum.

    ``aggregate`` ``mean``: the mean of the pair losses (the paper's BERT code); ``sum``: their sum
    (the paper's BART/T5 code: pairs stacked, one masked sum / (N·H), i.e. Σ of ``element_mean``).

    ``projections[s]`` (if present) maps student state ``s`` to the teacher width first; it is
    applied position-wise to the valid rows (``[N, H_student] -> [N, H_teacher]``).
    An empty map gives a float32 zero on the inputs' device.
    """
    _check_option("hidden_loss", loss, HIDDEN_LOSSES)
    _check_option("reduction", reduction, REDUCTIONS)
    _check_option("hidden_normalize", normalize, NORMALIZE)
    _check_option("aggregate", aggregate, AGGREGATE)
    pairs = [(int(s), int(t)) for s, t in layer_map]
    if not pairs:
        ref = next(iter(student_states), None)
        device = ref.device if ref is not None else None
        return torch.zeros((), dtype=torch.float32, device=device)
    ref = student_states[0]
    valid = _valid(mask, ref.shape[:2], ref.device)
    terms = []
    for s_idx, t_idx in pairs:
        if not 0 <= s_idx < len(student_states):
            raise IndexError(
                f"layer map pair ({s_idx}, {t_idx}): student has {len(student_states)} hidden states"
            )
        if not 0 <= t_idx < len(teacher_states):
            raise IndexError(
                f"layer map pair ({s_idx}, {t_idx}): teacher has {len(teacher_states)} hidden states"
            )
        s_full, t_full = student_states[s_idx], teacher_states[t_idx]
        if (
            s_full.dim() != 3
            or t_full.dim() != 3
            or s_full.shape[:2] != ref.shape[:2]
            or t_full.shape[:2] != ref.shape[:2]
        ):
            raise ValueError(
                f"layer map pair ({s_idx}, {t_idx}): states {tuple(s_full.shape)} and "
                f"{tuple(t_full.shape)} must be [B, L, H] with the batch's B and L"
            )
        proj = projections[s_idx] if projections is not None and s_idx in projections else None
        terms.append(_pair_loss(s_full, t_full, valid, proj, loss, reduction, normalize))
    total = torch.stack(terms).sum()
    return total / len(terms) if aggregate == "mean" else total


def total_loss(
    ce: Tensor, kl: Tensor, hid: Tensor, *, alpha_ce: float, alpha_kl: float, lambda_hid: float
) -> Tensor:
    """``α_ce · CE + α_kl · KL + λ · L_hid``."""
    return alpha_ce * ce + alpha_kl * kl + lambda_hid * hid


def regression_logit_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """The logit-level KD term of a regression task (a one-output head, e.g. STS-B): the mean squared
    difference of the student's and the teacher's outputs, mean over the batch. It takes the place of
    the temperature KL (there is no distribution to soften; the temperature is not used)."""
    return ((student_out.float() - teacher_out.float().detach()) ** 2).mean()
