"""Golden values, one per family: each paper preset's loss equals the paper's formula.

For every preset in `search_spaces/paper/`, tunekd's hidden loss, KL and total loss, computed with the
preset's own `distill` section on fixed small tensors, are compared with an independent float64
implementation written here, loop by loop, from SPEC.md "The paper's code, family by family"
(it calls nothing in tunekd). The layer map on the formula side is also written from SPEC
(fwd(i) = ceil(i*T/S), the embedding pair (0, 0) where the family matches embeddings).

Each test prints one `GOLDEN` line (run with `-s` to see them).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tunekd import losses
from tunekd.distill import kl_mask
from tunekd.models.base import Output
from tunekd.study import load_study

PAPER = Path(__file__).resolve().parents[1] / "search_spaces" / "paper"
RTOL = 1e-6

# family -> (preset file, teacher depth in the paper, stacks, KL kind, embeddings matched by default)
FAMILIES = {
    "bert": ("glue_bert.yaml", 12, ("encoder",), "sequence_level", True),
    "bart": ("dart_bart.yaml", 12, ("encoder", "decoder"), "target_tokens", True),
    "t5": ("wmt16_t5.yaml", 12, ("encoder", "decoder"), "target_tokens", True),
    "qwen3": ("qwen3_mc.yaml", 36, ("decoder",), "all_positions", False),
}
B, L, H, V, C = 3, 6, 8, 11, 3  # batch, padded length, width, vocabulary, classes
CE = 0.731  # a fixed CE value: the CE term is the same in every family


# ---------------------------------------------------------------- fixed inputs

def _inputs(family: str, n_student: int, n_teacher: int, stacks):
    g = torch.Generator().manual_seed(sum(map(ord, family)))
    states = {}
    for stack in stacks:
        s = [torch.randn(B, L, H, generator=g, dtype=torch.float64) * 1.5 + 0.3 for _ in range(n_student + 1)]
        t = [torch.randn(B, L, H, generator=g, dtype=torch.float64) * 2.0 - 0.2 for _ in range(n_teacher + 1)]
        states[stack] = (s, t)
    # right padding, a different length per row and per stack; no row empty
    masks = {"encoder": torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]),
             "decoder": torch.tensor([[1] * 5 + [0], [1] * 3 + [0] * 3, [1] * 6])}
    if family == "bert":
        s_logits = torch.randn(B, C, generator=g, dtype=torch.float64)
        t_logits = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
        logits_mask = seq_mask = None
    else:
        s_logits = torch.randn(B, L, V, generator=g, dtype=torch.float64)
        t_logits = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
        seq_mask = masks["decoder"]
        if family == "qwen3":  # the answer: the last two real tokens of each row
            logits_mask = torch.zeros_like(seq_mask)
            for b in range(B):
                n = int(seq_mask[b].sum())
                logits_mask[b, n - 2:n] = 1
        else:
            logits_mask = seq_mask
    return states, masks, s_logits, t_logits, logits_mask, seq_mask


# ---------------------------------------------------------------- the formulas, float64, from SPEC

def fwd_map(t: int, s: int, embeddings: bool) -> list[tuple[int, int]]:
    pairs = [(i, math.ceil(i * t / s)) for i in range(1, s + 1)]
    return ([(0, 0)] if embeddings else []) + pairs


def _np(x):
    return x.detach().double().numpy()


def _log_softmax(row, tau):
    z = row / tau
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def _kl_row(s_row, t_row, tau):
    ls, lt = _log_softmax(s_row, tau), _log_softmax(t_row, tau)
    return tau * tau * sum(math.exp(lt[c]) * (lt[c] - ls[c]) for c in range(len(s_row)))


def formula_kl(kind, s_logits, t_logits, tau, logits_mask, seq_mask):
    s, t = _np(s_logits), _np(t_logits)
    if kind == "sequence_level":  # per example
        return sum(_kl_row(s[b], t[b], tau) for b in range(B)) / B
    m = _np(logits_mask if kind == "target_tokens" else seq_mask)  # all positions: context and answer
    rows = [_kl_row(s[b, i], t[b, i], tau) for b in range(B) for i in range(L) if m[b, i]]
    return sum(rows) / len(rows)


def formula_bert_hidden(s_states, t_states, mask, pairs):
    """Per pair: Σ over valid positions and H of (t − s)², divided by B·N; mean over pairs."""
    m = _np(mask)
    n = int(m.sum())
    per_pair = []
    for si, ti in pairs:
        s, t = _np(s_states[si]), _np(t_states[ti])
        e = sum((t[b, i, h] - s[b, i, h]) ** 2 for b in range(B) for i in range(L) if m[b, i] for h in range(H))
        per_pair.append(e / (B * n))
    return sum(per_pair) / len(per_pair)


def _tensor_layer_norm(x):
    """The whole (B, L, H) tensor normalised by its own mean and variance, padding included."""
    vals = [x[b, i, h] for b in range(B) for i in range(L) for h in range(H)]
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / len(vals)
    out = np.empty_like(x)
    for b in range(B):
        for i in range(L):
            for h in range(H):
                out[b, i, h] = (x[b, i, h] - mu) / math.sqrt(var + 1e-5)
    return out


def formula_seq2seq_hidden(s_states, t_states, mask, pairs, tensor_layer_norm: bool):
    """Pairs stacked: Σ over pairs, valid positions and H of (t − s)², divided by N·H
    (T5: each pair's tensors layer-normalised over the whole (B, L, H) tensor first)."""
    m = _np(mask)
    n = int(m.sum())
    total = 0.0
    for si, ti in pairs:
        s, t = _np(s_states[si]), _np(t_states[ti])
        if tensor_layer_norm:
            s, t = _tensor_layer_norm(s), _tensor_layer_norm(t)
        total += sum((t[b, i, h] - s[b, i, h]) ** 2 for b in range(B) for i in range(L) if m[b, i] for h in range(H))
    return total / (n * H)


def formula_qwen3_hidden(s_states, t_states, mask, pairs):
    """Pairs stacked, l2-normalised per position, Σ over H, the mean over (P, B, L) with padding
    positions included, times N / (B·L)."""
    m = _np(mask)
    n = int(m.sum())
    terms = []
    for si, ti in pairs:
        s, t = _np(s_states[si]), _np(t_states[ti])
        for b in range(B):
            for i in range(L):
                ns = math.sqrt(sum(s[b, i, h] ** 2 for h in range(H)))
                nt = math.sqrt(sum(t[b, i, h] ** 2 for h in range(H)))
                terms.append(sum((t[b, i, h] / nt - s[b, i, h] / ns) ** 2 for h in range(H)))
    return sum(terms) / (len(pairs) * B * L) * n / (B * L)


# ---------------------------------------------------------------- tunekd, with the preset's settings

def tunekd_losses(d, states, masks, layer_map, s_logits, t_logits, logits_mask, seq_mask):
    hid = sum(losses.hidden_loss(states[st][0], states[st][1], layer_map, masks[st], loss=d.hidden_loss,
                                 reduction=d.reduction, normalize=d.hidden_normalize, aggregate=d.aggregate)
              for st in states)
    out = Output(logits=s_logits, hidden={}, masks=masks, logits_mask=logits_mask, sequence_mask=seq_mask)
    kl = losses.kl_loss(s_logits, t_logits, d.temperature, kl_mask(out, d))
    ce = torch.tensor(CE, dtype=torch.float64)
    total = losses.total_loss(ce, kl, hid, alpha_ce=d.alpha_ce, alpha_kl=d.alpha_kl, lambda_hid=d.lambda_hid)
    return float(hid), float(kl), float(total)


def _check(family):
    from tunekd import plan

    preset, t_layers, stacks, kl_kind, emb_default = FAMILIES[family]
    study = load_study(PAPER / preset)
    d, s_layers = study.distill, study.student.layers
    the_plan = plan.resolve(study, t_layers, emb_default)
    pairs = fwd_map(t_layers, s_layers, emb_default if d.match_embeddings is None else d.match_embeddings)
    assert d.strategy == "forward" and the_plan.layer_map == pairs  # the formula's map, written from SPEC
    states, masks, s_logits, t_logits, logits_mask, seq_mask = _inputs(family, s_layers, t_layers, stacks)
    got = tunekd_losses(d, {st: states[st] for st in stacks}, masks, the_plan.layer_map, s_logits, t_logits,
                        logits_mask, seq_mask)
    hid = 0.0
    for st in stacks:
        s_states, t_states = states[st]
        if family == "bert":
            hid += formula_bert_hidden(s_states, t_states, masks[st], pairs)
        elif family in ("bart", "t5"):
            hid += formula_seq2seq_hidden(s_states, t_states, masks[st], pairs, tensor_layer_norm=family == "t5")
        else:
            hid += formula_qwen3_hidden(s_states, t_states, masks[st], pairs)
    tau = {"bert": 1.0, "bart": 1.0, "t5": 2.0, "qwen3": 1.0}[family]  # SPEC's τ per family
    kl = formula_kl(kl_kind, s_logits, t_logits, tau, logits_mask, seq_mask)
    total = 1.0 * CE + 1.0 * kl + 3.0 * hid  # α_ce = α_kl = 1, λ = 3 (SPEC, the paper)
    want = (hid, kl, total)
    print(f"\nGOLDEN {family} ({preset}): hidden tunekd={got[0]:.12g} formula={hid:.12g} | "
          f"KL tunekd={got[1]:.12g} formula={kl:.12g} | total tunekd={got[2]:.12g} formula={total:.12g}")
    for name, a, b in zip(("hidden", "KL", "total"), got, want):
        assert a == pytest.approx(b, rel=RTOL), name
        assert b > 0
    return d, got, want


def test_golden_bert():
    d, _, _ = _check("bert")
    assert (d.reduction, d.hidden_normalize, d.aggregate) == ("paper", "none", "mean")


def test_golden_bart():
    d, _, _ = _check("bart")
    assert (d.reduction, d.hidden_normalize, d.aggregate) == ("element_mean", "none", "sum")
    assert load_study(PAPER / "dart_bart.yaml").student.freeze_embeddings


def test_golden_t5():
    d, _, _ = _check("t5")
    assert (d.reduction, d.hidden_normalize, d.aggregate, d.temperature) == (
        "element_mean", "layernorm_tensor_padded", "sum", 2.0)
    assert load_study(PAPER / "wmt16_t5.yaml").student.freeze_embeddings


def test_golden_qwen3():
    d, got, _ = _check("qwen3")
    assert (d.reduction, d.hidden_normalize, d.kl_positions, d.match_embeddings) == (
        "token_sum_padded", "l2", "sequence", False)
    # issue 9 (1): the old preset (element_mean) made the hidden term H times smaller
    states, masks, *_ = _inputs("qwen3", 9, 36, ("decoder",))
    old = losses.hidden_loss(*states["decoder"], fwd_map(36, 9, False), masks["decoder"], reduction="element_mean",
                             normalize="l2")
    assert got[0] > 4 * float(old)  # H = 8 here; 4096 for Qwen3-8B


def test_goldens_would_catch_the_old_presets():
    """The formulas tell the old settings apart: they are not a check that cannot fail."""
    states, masks, *_ = _inputs("t5", 3, 12, ("encoder", "decoder"))
    pairs = fwd_map(12, 3, True)
    s, t = states["encoder"]
    paper = formula_seq2seq_hidden(s, t, masks["encoder"], pairs, tensor_layer_norm=True)
    old = float(losses.hidden_loss(s, t, pairs, masks["encoder"], normalize="layernorm", aggregate="mean"))
    assert abs(old - paper) / paper > 0.5  # per-token layer norm and pairs averaged: far from the paper's


# ---------------------------------------------------------------- the dry run says what each preset computes

@pytest.mark.parametrize("family, family_name, markers", [
    ("bert", "encoder", ["τ = 1", "per example", "mean over pairs", "Σ(t−s)² / (B·N) [paper]", "[none]",
                         "embeddings matched: yes"]),
    ("bart", "seq2seq", ["τ = 1", "over the target tokens", "Σ over pairs", "Σ(t−s)² / (N·H) [element_mean]",
                         "[none]", "encoder + decoder stacks added", "student embeddings frozen"]),
    ("t5", "seq2seq", ["τ = 2", "over the target tokens", "Σ over pairs", "[element_mean]",
                       "[layernorm_tensor_padded]", "student embeddings frozen"]),
    ("qwen3", "decoder", ["τ = 1", "every position of the sequence", "mean over pairs", "[token_sum_padded]",
                          "l2 per position", "embeddings matched: no"]),
])
def test_describe_loss_per_preset(family, family_name, markers):
    from tunekd.models import FAMILIES
    from tunekd.plan import Trials, describe_loss, describe_losses

    study = load_study(PAPER / FAMILIES_PRESET[family])
    line = describe_loss(study, FAMILIES[family_name])
    for m in markers:
        assert m in line, (m, line)
    assert "loss_out_mse" not in line  # a KL, not the regression's output MSE
    trials = Trials(study, 12, FAMILIES[family_name].match_embeddings_default)
    lines = describe_losses(trials, [{"distill.strategy": s} for s in ("none", "forward", "reverse", "random")],
                            FAMILIES[family_name])
    assert len(lines) == 3 and "L_hid off" in lines[0] and "(2 trials)" in lines[1]
    assert "random π: neither forward nor reverse, from the trial's seed" in lines[2]


FAMILIES_PRESET = {k: v[0] for k, v in FAMILIES.items()}


def test_describe_loss_of_a_regression_task_names_the_output_mse():
    """STS-B (one output): the output term is an MSE between student and teacher outputs, no KL and no τ,
    logged as loss_out_mse (`distill.Distiller.losses`)."""
    from tunekd.models import FAMILIES
    from tunekd.plan import describe_loss

    study = load_study(PAPER / "glue_bert.yaml", ["task.name=stsb"])
    line = describe_loss(study, FAMILIES["encoder"])
    assert "MSE(teacher output)" in line and "logged as loss_out_mse" in line
    assert "KL" not in line.replace("no KL", "") and "τ" not in line, line


def test_dry_run_prints_the_resolved_loss_settings(data_dir, tmp_path):
    """The CLI, on the BERT preset with the tiny BERT as its teacher (the paper's teachers need the hub)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "TUNEKD_TINY_DIR": str(tmp_path / "tiny")}
    proc = subprocess.run([sys.executable, "-m", "tunekd.run", str(PAPER / "glue_bert.yaml"), "--dry-run",
                           "--set", "teacher.model=tiny:bert", "--set", f"task.data_dir={data_dir / 'sst2'}",
                           "--set", "search.seed.grid=[0]", "--set", "search.train.lr.grid=[2.0e-5]"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "resolved loss settings:" in out
    assert "Σ(t−s)² / (B·N) [paper]" in out and "(6 trials)" in out
    assert "random π: neither forward nor reverse" in out
