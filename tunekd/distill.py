"""The KD training loop, independent of Ray: batches → losses → optimizer, evaluation each epoch.

`Distiller` computes L = α_ce·CE + α_kl·KL + λ·L_hid for one batch; `fit` runs epochs and hands
each epoch's metrics to a callback (the Ray trainable reports and checkpoints there). With no
teacher it is plain fine-tuning, which is also how a teacher is fine-tuned.

The teacher's outputs come from a `cache.TeacherCache` when one holds them (looked up by the
batch's row numbers, `batch["index"]`), else from running the teacher: all of it when its logits
are needed, else only its layers up to the highest one the layer map uses (`truncated`).
The loss options (`study.DistillConfig`) select each family's formula from the paper's code; see
docs/method.md "Losses per model family" and `losses`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from tunekd import losses
from tunekd.cache import TeacherCache
from tunekd.data import Encoded, batch_indices, num_batches, padding_fraction
from tunekd.device import autocast, device_for  # noqa: F401  (re-exported: distill.device_for)
from tunekd.errors import ConfigError
from tunekd.models import Family
from tunekd.study import DistillConfig, GenerationConfig, TrainConfig
from tunekd.tasks.base import compute_metrics


# the logged name of the output term of a regression task: an MSE between student and teacher outputs, not a KL
OUTPUT_MSE = "loss_out_mse"


class NonFiniteLoss(RuntimeError):
    pass


class TruncatedView(nn.Module):
    """`model` run with only the first `keep` layers of the stacks `family.cut_stacks` names, and with
    those stacks' final norms skipped (`family.final_norms`), so that its hidden states 0..keep of every
    stack equal the full model's; its logits are meaningless. It shares every weight: each call swaps
    the cut stacks (and norms) into the model and puts the originals back afterwards, so the model
    itself is never copied (Hugging Face's output-capturing hooks stay installed once) and is
    unchanged between calls. Not for concurrent use of the same model from several threads."""

    def __init__(self, family: Family, model: nn.Module, keep: int):
        super().__init__()
        self.inner = model
        self._family = family
        self.keep = int(keep)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def _swaps(self) -> list[tuple[nn.Module, str, nn.Module]]:
        """(parent, child name, replacement) for every cut stack and every final norm it must skip."""
        model, family, keep = self.inner, self._family, self.keep
        stacks = family.stacks(model)
        norms = family.final_norms(model)
        wanted: dict[int, nn.Module] = {}
        for name in family.cut_stacks(model):
            stack = stacks[name]
            if keep >= len(stack):
                continue  # nothing to cut: the full stack, its final norm included
            wanted[id(stack)] = nn.ModuleList(list(stack)[:keep])
            if name in norms:
                wanted[id(norms[name])] = nn.Identity()
        swaps = []
        for parent in model.modules():
            for child_name, child in parent._modules.items():
                if child is not None and id(child) in wanted:
                    swaps.append((parent, child_name, wanted[id(child)]))
        return swaps

    def forward(self, *args, **kwargs):
        swaps = self._swaps()
        originals = [(parent, name, parent._modules[name]) for parent, name, _ in swaps]
        try:
            for parent, name, new in swaps:
                parent._modules[name] = new
            return self.inner(*args, **kwargs)
        finally:
            for parent, name, old in originals:
                parent._modules[name] = old


def truncated(family: Family, model: nn.Module, keep: int) -> nn.Module:
    """A view of `model` that runs only its layers up to `keep` (see `TruncatedView`): its hidden states
    0..keep equal the full model's (for an encoder-decoder: all encoder states, decoder states 0..keep)."""
    return TruncatedView(family, model, keep)


class SharedForward:
    """The teacher forward of a trial group (`tunekd.groups`): run once per batch with what any member takes
    from the model (logits if one needs them, else the layers up to the highest one a member matches), and
    handed to every member that asks for that batch. The teacher runs in eval mode under `no_grad`, so it
    draws no random numbers: each member gets exactly the tensors its own forward would compute (the
    states of a truncated run equal the full model's, `TruncatedView`)."""

    def __init__(self, family: Family, teacher: nn.Module, members: list[Distiller]):
        needs = [(d.model_needs(), d.teacher_indices) for d in members]
        self.logits = any(logits for (logits, _), _ in needs)
        self.hidden = any(hidden for (_, hidden), _ in needs)
        keep = max((max(wanted) for (_, hidden), wanted in needs if hidden), default=0)
        self.model = (truncated(family, teacher, keep) if self.hidden and not self.logits and family.truncatable
                      else teacher)
        self.family = family
        self.forwards = 0  # teacher forwards run (one per batch of the group)
        self._batch: dict | None = None
        self._out = None

    def __call__(self, batch: dict[str, torch.Tensor], *, logits: bool, hidden: bool):
        if (logits and not self.logits) or (hidden and not self.hidden):
            raise RuntimeError(f"a group member asks the teacher for {'logits' if logits else 'hidden states'}, "
                               "which no member declared (Distiller.model_needs)")
        if batch is not self._batch:
            self._batch = self._out = None  # the previous batch's outputs go before the next forward
            with torch.no_grad():
                self.model.eval()
                self._out = self.family.forward(self.model, batch, hidden=self.hidden)
            self._batch = batch
            self.forwards += 1
        return self._out


def teacher_needed(d: DistillConfig | None, layer_map: list[tuple[int, int]], cache: TeacherCache | None) -> bool:
    """Whether a trial with distill config `d` and `layer_map` must run a teacher model, given `cache`
    (a `cache.TeacherCache` or None): when it uses logits or hidden states the cache does not hold."""
    if d is None:
        return False
    hidden = d.lambda_hid > 0 and bool(layer_map)
    if d.alpha_kl > 0 and cache is None:
        return True
    return hidden and (cache is None or not cache_serves_hidden(d, cache, {int(t) for _, t in layer_map}))


def cache_serves_hidden(d, cache, layers) -> bool:
    """Whether `cache` can give the teacher states `layers` for loss options `d`: it holds them, and the
    options do not read padding positions (the cache keeps valid tokens only; padding comes back as 0,
    which the paper-exact `_padded` options would read)."""
    return cache.covers(layers) and not losses.reads_padding(d.reduction, d.hidden_normalize)


@dataclass
class Distiller:
    """The student (and its projections) being trained, with the teacher it learns from: a model
    (`teacher`), precomputed outputs (`cache`), or both (the model fills what the cache lacks)."""

    family: Family
    student: nn.Module
    teacher: nn.Module | None = None
    layer_map: list[tuple[int, int]] = field(default_factory=list)
    distill: DistillConfig | None = None  # None = plain fine-tuning (CE only)
    projections: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    cache: TeacherCache | None = None  # the teacher's outputs for the training rows
    teacher_rows: int = 0  # rows the teacher model ran on (counted for perf/teacher_rows)
    cached_rows: int = 0  # rows whose teacher outputs came from the cache
    shared_forward: "SharedForward | None" = None  # a trial group's teacher forward, run once per batch for all
    _short: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self):
        self.projections = per_stack_projections(self.projections, list(self.family.stacks(self.student)))

    def parameters(self):
        yield from self.student.parameters()
        yield from self.projections.parameters()

    def to(self, device):
        self.student.to(device)
        self.projections.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None or self.cache is not None

    @property
    def uses_teacher(self) -> bool:
        d = self.distill
        return self.has_teacher and d is not None and (d.alpha_kl > 0 or self.uses_hidden)

    @property
    def uses_hidden(self) -> bool:
        d = self.distill
        return self.has_teacher and d is not None and d.lambda_hid > 0 and bool(self.layer_map)

    @property
    def teacher_indices(self) -> list[int]:
        return sorted({int(t) for _, t in self.layer_map})

    def needs_teacher_model(self) -> bool:
        """Whether some teacher output this distiller uses is not in its cache."""
        return self.uses_teacher and teacher_needed(self.distill, self.layer_map, self.cache)

    def model_needs(self) -> tuple[bool, bool]:
        """(logits, hidden states): what this distiller's training batches take from the teacher model rather
        than from its cache (as `teacher_outputs` decides for a batch with row numbers)."""
        if not self.uses_teacher:
            return False, False
        d, cache = self.distill, self.cache
        logits = d.alpha_kl > 0 and cache is None
        hidden = self.uses_hidden and (cache is None or not cache_serves_hidden(d, cache, self.teacher_indices))
        return logits, hidden

    def teacher_outputs(self, batch: dict[str, torch.Tensor], s_out, *, logits: bool, hidden: bool):
        """(teacher logits or None, {stack: hidden-state sequence} or None) for this batch."""
        index = batch.get("index")
        cache = self.cache if index is not None else None
        t_logits = t_hidden = None
        wanted = self.teacher_indices
        from_cache = cache is not None and hidden and cache_serves_hidden(self.distill, cache, wanted)
        if cache is not None and (logits or from_cache):
            cache.check_rows(index, batch)
        if cache is not None:
            if logits:
                t_logits = cache.logits(index, s_out.logits.device)
            if from_cache:
                t_hidden = {stack: cache.states(stack, index, s_out.masks[stack], wanted, max(wanted) + 1)
                            for stack in s_out.hidden}
            if t_logits is not None or t_hidden is not None:
                self.cached_rows += int(index.shape[0])
        need_logits = logits and t_logits is None
        need_hidden = hidden and t_hidden is None
        if (need_logits or need_hidden) and self.shared_forward is not None:  # a group's one forward per batch
            out = self.shared_forward(batch, logits=need_logits, hidden=need_hidden)
            self.teacher_rows += int(batch["input_ids"].shape[0])
            return (out.logits if need_logits else t_logits), (out.hidden if need_hidden else t_hidden)
        if need_logits or need_hidden:
            if self.teacher is None:
                raise RuntimeError("the teacher cache lacks outputs this trial needs and no teacher model was given "
                                   f"(logits: {need_logits}, hidden states {wanted}: {need_hidden})")
            model = self.teacher
            if not need_logits and self.family.truncatable:  # hidden states only: run the layers up to the highest one matched
                if self._short is None:
                    self._short = truncated(self.family, self.teacher, max(wanted))
                model = self._short
            with torch.no_grad():
                model.eval()
                out = self.family.forward(model, batch, hidden=need_hidden)
            self.teacher_rows += int(batch["input_ids"].shape[0])
            if need_logits:
                t_logits = out.logits
            if need_hidden:
                t_hidden = out.hidden
        return t_logits, t_hidden

    def stack_projections(self, stack: str) -> dict[int, nn.Module] | None:
        """The width projections of `stack`'s matched student states (None when the widths agree)."""
        if stack not in self.projections:
            return None
        return {int(k): v for k, v in self.projections[stack].items()} or None

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        d = self.distill
        s_out = self.family.forward(self.student, batch, hidden=self.uses_hidden)
        ce = self.family.ce_loss(s_out, batch)
        zero = ce.new_zeros(())
        kl, hid = zero, zero
        # a one-output head (regression, e.g. STS-B): the output term is an MSE, named for it
        regression = s_out.logits.shape[-1] == 1 and s_out.logits_mask is None
        if self.uses_teacher:
            t_logits, t_hidden = self.teacher_outputs(batch, s_out, logits=d.alpha_kl > 0, hidden=self.uses_hidden)
            if d.alpha_kl > 0:
                if t_logits.shape[-1] != s_out.logits.shape[-1]:
                    raise ConfigError(f"teacher and student vocabularies differ ({t_logits.shape[-1]} vs "
                                      f"{s_out.logits.shape[-1]} logits): KD needs one shared vocabulary")
                if regression:  # MSE of the outputs
                    kl = losses.regression_logit_loss(s_out.logits, t_logits)
                else:
                    kl = losses.kl_loss(s_out.logits, t_logits, d.temperature, kl_mask(s_out, d))
            if self.uses_hidden:
                hid = sum(
                    losses.hidden_loss(
                        s_out.hidden[stack], t_hidden[stack], self.layer_map, s_out.masks[stack],
                        loss=d.hidden_loss, reduction=d.reduction, normalize=d.hidden_normalize,
                        aggregate=d.aggregate, projections=self.stack_projections(stack),
                    )
                    for stack in s_out.hidden
                )
        if d is None:
            total = ce
        else:
            total = losses.total_loss(ce, kl, hid, alpha_ce=d.alpha_ce, alpha_kl=d.alpha_kl, lambda_hid=d.lambda_hid)
        return {"loss": total, "loss_ce": ce, OUTPUT_MSE if regression else "loss_kl": kl, "loss_hid": hid}


def kl_mask(out, d) -> torch.Tensor | None:
    """The positions KL averages over: `out.logits_mask` (the trained target tokens), or with
    `distill.kl_positions: sequence` every non-padding position of the sequence (`out.sequence_mask`;
    for a causal LM the context too, as the paper's Qwen3 code)."""
    if getattr(d, "kl_positions", "targets") == "sequence" and out.sequence_mask is not None:
        return out.sequence_mask
    return out.logits_mask


def per_stack_projections(projections: nn.ModuleDict, stacks: list[str]) -> nn.ModuleDict:
    """Projections as {stack: {student index: module}}: each matched state of each stack has its own.
    A flat {student index: module} dict (from `students.build_projections` without `stacks`) becomes
    the first stack's; every other stack gets an independent copy (same initial values, own weights)."""
    if len(projections) == 0 or all(isinstance(v, nn.ModuleDict) for v in projections.values()):
        return projections
    out = nn.ModuleDict()
    for i, stack in enumerate(stacks):
        out[stack] = projections if i == 0 else copy.deepcopy(projections)
    return out


def _to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Model inputs to `device`; the row numbers stay on the CPU (they index host-side caches)."""
    return {k: v if k == "index" else v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(family: Family, model: nn.Module, spec, splits: dict[str, Encoded], *, batch_size: int = 128,
             precision: str = "fp32", generation: GenerationConfig | None = None) -> dict[str, float]:
    """The task's metrics: classification here (argmax of `family.predict`); other kinds (generation:
    decode and BLEU; multiple choice: scores per choice) by `family.evaluate`. `generation` is the
    study's `task.generation`."""
    model.eval()
    if spec.kind not in ("classification", "regression"):
        return family.evaluate(model, spec, splits, batch_size=batch_size, precision=precision,
                               generation=generation)
    device = next(model.parameters()).device
    preds, refs = {}, {}
    for name, data in splits.items():
        out = None
        for index in batch_indices(data.lengths, batch_size, shuffle=False, bucket=True):  # rows by length
            batch = _to_device(data.batch(index), device)
            with autocast(device, precision):
                o = family.forward(model, batch, hidden=False)
            pred = family.predict(o, batch).cpu().numpy()
            if out is None:
                out = np.zeros((len(data),) + pred.shape[1:], dtype=pred.dtype)
            out[index] = pred
        preds[name] = out
        refs[name] = data.arrays["labels"]
    return compute_metrics(spec, preds, refs)


@dataclass
class TrainState:
    optimizer: torch.optim.Optimizer
    scheduler: object
    epoch: int = 0  # epochs completed
    step: int = 0


def make_state(distiller: Distiller, train_cfg: TrainConfig, steps_per_epoch: int, epochs: int) -> TrainState:
    params = [p for p in distiller.parameters() if p.requires_grad]
    # the fused kernel: ~9x faster than the default on the CPU at MiniLM size (embeddings dominate)
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=True)
    total = max(1, steps_per_epoch * epochs)
    scheduler = linear_schedule_with_warmup(optimizer, int(train_cfg.warmup_ratio * total), total)
    return TrainState(optimizer=optimizer, scheduler=scheduler)


def linear_schedule_with_warmup(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' `get_linear_schedule_with_warmup` (equal at every step: tests/test_distill.py): the factor
    rises linearly from 0 over `warmup_steps`, then falls linearly to 0 at `total_steps`. Written here because
    importing it from transformers pulls in `transformers.trainer_utils` and with it PEFT: ~2.5 s more for
    every process that trains (each Ray worker of a study, the CLI)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(distiller: Distiller, state: TrainState, batch: dict[str, torch.Tensor], train_cfg: TrainConfig, device,
               scaler=None) -> dict[str, torch.Tensor]:
    """One optimizer step on one batch (already on `device`): losses under autocast, backward, clipping."""
    with autocast(device, train_cfg.precision):
        parts = distiller.losses(batch)
    loss = parts["loss"]
    state.step += 1
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"non-finite loss at step {state.step}")
    state.optimizer.zero_grad(set_to_none=True)
    params = [p for p in distiller.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
        scaler.step(state.optimizer)
        scaler.update()
    else:
        loss.backward()
        nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
        state.optimizer.step()
    state.scheduler.step()
    return parts


def generator_states() -> dict[str, object]:
    """The states of torch's default generators that training draws from (dropout): the CPU one, and the
    CUDA ones once CUDA is in use."""
    out: dict[str, object] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_generator_states(states: dict[str, object]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class Member:
    """One student trained by `fit_members`, with its own optimizer state and its own epoch callback.

    `rng`: the member's own generator states (`generator_states`), set around everything it draws random
    numbers for (its steps, its checkpoints) and saved after, so that members trained side by side each see
    the draws they would see alone; None (a trial alone): the global generators as they are."""

    distiller: Distiller
    state: TrainState | None = None
    on_epoch: Callable[[int, dict[str, float], TrainState], None] | None = None
    rng: dict[str, object] | None = None
    error: Exception | None = None  # why it stopped (a non-finite loss or metric); the others go on
    history: list[dict[str, float]] = field(default_factory=list)

    @contextmanager
    def own_rng(self):
        if self.rng is None:
            yield
            return
        set_generator_states(self.rng)
        try:
            yield
        finally:
            self.rng = generator_states()


def step_members(members: list[Member], batch: dict[str, torch.Tensor], train_cfg: TrainConfig, device, scaler,
                 fail: Callable[[Member, Exception], None]) -> list[tuple[Member, dict[str, torch.Tensor]]]:
    """One optimizer step of every member still training on the same batch (each with its own generators;
    a group's teacher forward runs at the first member that asks); a non-finite loss goes to `fail`. A member's
    gradients are freed once it has stepped (`train_step` sets them to None before its next backward anyway),
    so a group holds one member's gradients at a time, not K."""
    out = []
    for m in members:
        if m.error is not None:
            continue
        try:
            with m.own_rng():
                out.append((m, train_step(m.distiller, m.state, batch, train_cfg, device, scaler)))
        except NonFiniteLoss as exc:
            fail(m, exc)
        finally:
            m.state.optimizer.zero_grad(set_to_none=True)
    return out


def fit(
    distiller: Distiller,
    spec,
    train: Encoded,
    evals: dict[str, Encoded],
    train_cfg: TrainConfig,
    *,
    epochs: int,
    seed: int,
    state: TrainState | None = None,
    on_epoch: Callable[[int, dict[str, float], TrainState], None] | None = None,
    progress: Callable[[str], None] | None = None,
    started: float | None = None,
    generation: GenerationConfig | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[dict[str, float]]:
    """Train for `epochs` epochs (resuming after `state.epoch` when a state is given).

    Batches come from length buckets unless `train_cfg.bucket_by_length` is false. Each epoch's
    metrics hold `train/*`, `eval/*` and `perf/*`: seconds per step, the padding fraction, the rows
    the teacher model ran on and those read from the cache (cumulative), and, given `started`
    (a `time.perf_counter()` value), `perf/startup_s`: from `started` to the first training step.
    `generation` (the study's `task.generation`) sets how generation tasks are evaluated.
    `on_step()` is called after every optimizer step (a progress bar). A non-finite loss or metric
    raises `NonFiniteLoss`.
    """
    member = Member(distiller, state, on_epoch)
    fit_members([member], spec, train, evals, train_cfg, epochs=epochs, seed=seed, progress=progress,
                started=started, generation=generation, on_step=on_step)
    return member.history


def fit_members(
    members: list[Member],
    spec,
    train: Encoded,
    evals: dict[str, Encoded],
    train_cfg: TrainConfig,
    *,
    epochs: int,
    seed: int,
    progress: Callable[[str], None] | None = None,
    started: float | None = None,
    generation: GenerationConfig | None = None,
    on_step: Callable[[], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> None:
    """`fit` for several students side by side on one stream of batches (a trial group, `tunekd.groups`):
    every batch goes to each member in turn, each with its own optimizer, schedule and `rng`. `train_cfg`
    gives what the members share (batch size, buckets, precision, eval batch size); their optimizers were
    made from their own settings (`make_state`). A member whose loss or metrics are not finite ends alone
    (`Member.error`); when none is left the last error is raised. Each member's epoch metrics are those of
    `fit` for it alone; `perf/step_s` is the group's time per step divided among the members training, and
    `perf/group_size` (members > 1) the number of them. All members continue from the same epoch.
    `after_epoch(epoch)` is called once the members' `on_epoch` calls for the epoch are done."""
    device = device_for(train_cfg.precision)
    steps = num_batches(train, train_cfg.batch_size)
    for m in members:
        m.distiller.to(device)
        m.state = m.state or make_state(m.distiller, train_cfg, steps, epochs)
    done = {m.state.epoch for m in members if m.error is None}
    if len(done) > 1:
        raise RuntimeError(f"the members of a group continue from different epochs: {sorted(done)}")
    scaler = torch.amp.GradScaler("cuda") if train_cfg.precision == "fp16" else None
    bucket = train_cfg.bucket_by_length
    startup = None
    last_error: Exception | None = None

    def fail(m: Member, exc: Exception) -> None:
        nonlocal last_error
        m.error = last_error = exc
        if not any(x.error is None for x in members):
            raise exc

    for epoch in range((done.pop() if done else epochs) + 1, epochs + 1):
        live = [m for m in members if m.error is None]
        # each member's sums of the loss parts `losses` returns (loss_kl, or loss_out_mse for regression)
        sums: dict[int, dict[str, float]] = {id(m): {} for m in live}
        for m in live:
            m.distiller.student.train()
        n = 0
        t0 = time.perf_counter()
        order = batch_indices(train.lengths, train_cfg.batch_size, shuffle=True, seed=seed * 100_003 + epoch,
                              bucket=bucket)
        for index in order:
            if startup is None and started is not None:
                startup = time.perf_counter() - started
            batch = _to_device(train.batch(index), device)
            for m, parts in step_members(live, batch, train_cfg, device, scaler, fail):
                member_sums = sums[id(m)]
                for k, v in parts.items():
                    member_sums[k] = member_sums.get(k, 0.0) + float(v.detach())
            n += 1
            if on_step is not None:
                on_step()
        train_s = time.perf_counter() - t0
        pad = padding_fraction(train.lengths, order)
        for m in live:
            if m.error is not None:
                continue
            d = m.distiller
            m.state.epoch = epoch
            metrics = {f"train/{k}": v / max(n, 1) for k, v in sums[id(m)].items()}
            metrics.update({f"eval/{k}": v for k, v in evaluate(
                d.family, d.student, spec, evals,
                batch_size=train_cfg.eval_batch_size, precision=train_cfg.precision, generation=generation).items()})
            metrics["epoch"] = epoch
            metrics["time/epoch_s"] = time.perf_counter() - t0
            metrics["perf/step_s"] = train_s / max(n, 1) / len(live)
            metrics["perf/pad_frac"] = pad
            metrics["perf/teacher_rows"] = float(d.teacher_rows)
            metrics["perf/cached_rows"] = float(d.cached_rows)
            if len(members) > 1:
                metrics["perf/group_size"] = float(len(live))
            if startup is not None:
                metrics["perf/startup_s"] = startup
            if any(not math.isfinite(v) for v in metrics.values()):
                fail(m, NonFiniteLoss(f"non-finite metric at epoch {epoch}: {metrics}"))
                continue
            m.history.append(metrics)
            if progress:
                progress(f"epoch {epoch}/{epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if m.on_epoch:
                with m.own_rng():
                    m.on_epoch(epoch, metrics, m.state)
        if after_epoch is not None:
            after_epoch(epoch)
