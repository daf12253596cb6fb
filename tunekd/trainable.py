"""The Ray Tune function trainable: one trial = one config, a thin wrapper around `distill.fit_members`.

What every trial shares (tokenized data, the teacher's weights, where the teacher-output cache is)
arrives as one `Shared` object through `tune.with_parameters`, i.e. Ray's object store: it works on
every node of a cluster and no trial re-tokenizes or re-fine-tunes. A trial whose teacher outputs
are all in the cache never builds the teacher; what a worker builds (the teacher's config, the
teacher model, the opened cache) is kept for the next trial on that worker (`reuse_actors`).
`run_trial` also runs without Ray (`report=None`). A trial group (`tune.group_by`, `tunekd.groups`) is
one Ray trial: `run_group` trains its members side by side, one teacher forward per batch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunekd import cache as tcache
from tunekd import checkpoints
from tunekd import distill, groups, plan, thread_exit
from tunekd.data import Encoded
from tunekd.models import FAMILIES
from tunekd.students import build_projections, build_student
from tunekd.study import Study
from tunekd.tasks import spec_for


# a worker's builds for the study it is serving (keyed by `Shared.token`): config, teacher, tensors
_WORKER: dict[str, dict[str, Any]] = {}

# a failed member's marker in its group's checkpoint (its error text): restored, it stays failed
FAILED = "failed.txt"

# cache arrays up to this size travel through the object store when the driver asks for it
SHIP_LIMIT_BYTES = 256 * 1024**2


@dataclass
class Shared:
    """Everything prepared once on the driver for all trials."""

    study_json: str
    family: str
    teacher_config: dict[str, Any]
    teacher_state: dict[str, np.ndarray]
    encoded: dict[str, Encoded]
    cache: tcache.CacheInfo | None = None  # the driver's teacher-cache decision (folder, mode, reason)
    cache_arrays: tcache.TeacherCache | None = None  # the cache in memory, for nodes without its folder
    # fault injection for the fault-tolerance tests: TUNEKD_INJECT_FAULT in the driver's environment
    inject_fault: str | None = field(default_factory=lambda: os.environ.get("TUNEKD_INJECT_FAULT") or None)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def _memo(self) -> dict[str, Any]:
        if self.token not in _WORKER:
            _WORKER.clear()  # one study at a time per worker
            _WORKER[self.token] = {}
        return _WORKER[self.token]

    def config(self):
        memo = self._memo()
        if "config" not in memo:
            from transformers import AutoConfig

            cfg = dict(self.teacher_config)
            memo["config"] = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        return memo["config"]

    def teacher(self, spec):
        """The teacher model (eval mode, frozen), built once per worker, then loaded from the shared state."""
        memo = self._memo()
        if "teacher" not in memo:
            family = FAMILIES[self.family]
            with single_init():
                model = family.from_config(self.config(), spec)
            model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.teacher_state.items()})
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            memo["teacher"] = model
        return memo["teacher"]

    def trials(self) -> plan.Trials:
        """The study's memoised trial resolution (config → trial study + plan), one per worker."""
        memo = self._memo()
        if "trials" not in memo:
            family = FAMILIES[self.family]
            memo["trials"] = plan.Trials(Study.model_validate_json(self.study_json), family.num_layers(self.config()),
                                         family.match_embeddings_default)
        return memo["trials"]

    def weights(self) -> "TeacherWeights":
        """The teacher's config and weights without building the model (enough to build a student)."""
        return TeacherWeights(self.config(), self.teacher_state)

    def open_cache(self) -> tuple[tcache.TeacherCache | None, str]:
        """The teacher-output cache and where it came from (`cache.open_shared`: this node's folder, object
        storage read into the node cache, the shipped arrays, or None: the trial runs the teacher online,
        and says so when the driver built a cache)."""
        cache, source, why = tcache.open_shared(self.cache, self.cache_arrays)
        if why:
            print(f"[tunekd] WARNING: this trial runs the teacher online (perf/cache_source=online): {why}", flush=True)
        return cache, source


@contextlib.contextmanager
def single_init():
    """Build models initialising each weight once: the `torch.nn.init` calls in the layers' constructors
    (e.g. `nn.Embedding.reset_parameters`) become no-ops, and `transformers`' own initialisation, which
    runs after them in `post_init` and sets every parameter and buffer (its contract for loading models
    created on the meta device), is kept. Same distributions, half the work (~0.2 s of 0.4 s for a
    MiniLM-sized student); the draws differ from a default build with the same seed."""
    import sys

    from transformers import initialization as hf_init

    saved = []
    try:
        for module_name in hf_init.TORCH_MODULES_TO_PATCH:
            module = sys.modules.get(module_name)
            for fn in hf_init.TORCH_INIT_FUNCTIONS if module is not None else ():
                if hasattr(module, fn):
                    saved.append((module, fn, getattr(module, fn)))
                    setattr(module, fn, _no_init)
        yield
    finally:
        for module, fn, orig in reversed(saved):
            setattr(module, fn, orig)


def _no_init(tensor, *args, **kwargs):
    return tensor


class TeacherWeights:
    """Stands in for the teacher model where only `.config` and `.state_dict()` are read (students.py)."""

    def __init__(self, config, state: dict[str, np.ndarray]):
        self.config = config
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():  # read-only arrays from the object store: only read here
            warnings.simplefilter("ignore", UserWarning)
            return {k: torch.from_numpy(v) for k, v in self._state.items()}


def _state_arrays(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def make_shared(study: Study, family_name: str, teacher_model, encoded: dict[str, Encoded],
                cache: tcache.CacheInfo | None = None, *, ship_cache: bool = False) -> Shared:
    """`ship_cache`: also put the cache's arrays in the object store (when under SHIP_LIMIT_BYTES), for a
    cluster whose nodes do not share the storage path."""
    arrays = None
    if ship_cache and cache is not None and cache.mode != "off" and cache.nbytes <= SHIP_LIMIT_BYTES:
        arrays = tcache.load_arrays(cache.folder)
    return Shared(study_json=study.model_dump_json(), family=family_name,
                  teacher_config=teacher_model.config.to_dict(), teacher_state=_state_arrays(teacher_model),
                  encoded=encoded, cache=cache, cache_arrays=arrays)


# --- one trial ---------------------------------------------------------------------------------


def _injected_fault(overrides: dict[str, Any], spec: str | None) -> None:
    """Fault injection for the fault-tolerance tests: with TUNEKD_INJECT_FAULT='KEY=VALUE' in the driver's
    environment (carried to the trials in `Shared.inject_fault`), the trials whose override KEY is VALUE
    raise inside the trial (every impossibility of a configuration is refused before the study starts,
    so no study value can make a trial raise)."""
    if spec:
        key, _, value = spec.partition("=")
        if key in overrides and str(overrides[key]) == value:
            raise RuntimeError(f"injected fault: TUNEKD_INJECT_FAULT={spec}")


def run_trial(overrides: dict[str, Any], shared: Shared, *, report=None, restore_dir: str | None = None) -> list[dict]:
    """Train one trial. `report(metrics, checkpoint_dir)` is called after every epoch."""
    return run_group([overrides], shared, report=report, restore_dir=restore_dir, grouped=False)[0]


def run_group(configs: list[dict[str, Any]], shared: Shared, *, report=None, restore_dir: str | None = None,
              grouped: bool = True) -> list[list[dict]]:
    """Train the trials `configs` side by side as one group (`tunekd.groups`): one stream of batches, one
    teacher forward per batch, each member with its own generators; returns each member's epoch metrics.
    `report(metrics, checkpoint_dir)` is called once per epoch with the group's result (`groups.group_result`)
    and a checkpoint folder holding each member's checkpoint in its subfolder. `grouped=False` (one config):
    a plain trial, its metrics and checkpoint as they are."""
    started = time.perf_counter()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    for overrides in configs:
        _injected_fault(overrides, shared.inject_fault)
    trials = [shared.trials()(overrides) for overrides in configs]
    study = trials[0].study  # what the members share: task, seed, batches, resources
    spec = spec_for(study.task)
    family = FAMILIES[shared.family]
    threads = os.environ.get("TUNEKD_THREADS")
    torch.set_num_threads(int(threads) if threads else max(1, int(study.tune.resources.cpu)))
    config = shared.config()
    train = shared.encoded["train"]
    cache, cache_source = shared.open_cache()
    if cache is not None and cache.rows != len(train):
        raise RuntimeError(f"teacher cache {shared.cache.folder}: {cache.rows} rows, the training split {len(train)}; "
                           "it was built from other data")
    # the teacher model is built only when the cache lacks something a member uses
    needs = [distill.teacher_needed(t.study.distill, t.plan.layer_map, cache) for t in trials]
    for need, t in zip(needs, trials):
        if need and cache is not None and shared.cache.mode == "full":
            raise RuntimeError(
                f"teacher cache {shared.cache.folder} holds layers {list(cache.layers)} but this trial maps teacher "
                f"layers {sorted({j for _, j in t.plan.layer_map})}: the study expected the cache to cover every "
                "trial, and running the teacher online instead would only be slower (a search value the driver "
                "did not enumerate?)")
    teacher = shared.teacher(spec) if any(needs) else None
    steps = -(-len(train) // study.train.batch_size)
    members = []
    for need, t in zip(needs, trials):
        with single_init():
            student = build_student(teacher if need else shared.weights(), family, spec, t.study.student,
                                    seed=t.study.seed)
        projections = build_projections(t.plan.layer_map, family.hidden_size(student.model.config),
                                        family.hidden_size(config), seed=t.study.seed,
                                        stacks=list(family.stacks(student.model)))
        distiller = distill.Distiller(family=family, student=student.model, teacher=teacher if need else None,
                                      layer_map=t.plan.layer_map, distill=t.study.distill, projections=projections,
                                      cache=cache)
        state = distill.make_state(distiller, t.study.train, steps, t.study.train.epochs)
        # a member of a group draws from its own generators, from the state its trial alone would have here
        members.append(distill.Member(distiller, state, rng=distill.generator_states() if grouped else None))
    online = [m.distiller for m, need in zip(members, needs) if need]
    if grouped and teacher is not None:
        forward = distill.SharedForward(family, teacher, online)
        for d in online:
            d.shared_forward = forward
    folders = [os.path.join(restore_dir or "", groups.prefix(i) if grouped else "") for i in range(len(members))]
    for m, folder in zip(members, folders):
        if not restore_dir:
            continue
        if os.path.isfile(os.path.join(folder, FAILED)):  # a member that had failed stays failed
            m.error = distill.NonFiniteLoss(Path(folder, FAILED).read_text())
            continue
        checkpoints.load(folder, m.distiller, m.state)
        if grouped:
            m.rng = distill.generator_states()
    every, epochs = study.tune.checkpoint_every, study.train.epochs
    # weights + AdamW's two moments, about the size of a resumable checkpoint
    checkpoint_bytes = sum(3 * p.numel() * p.element_size() for m in members for p in m.distiller.parameters()
                           if p.requires_grad)
    checkpoint_s = 0.0  # time spent writing and handing over checkpoints, reported as perf/checkpoint_s
    pending: dict[str, Any] = {}  # this epoch's checkpoint folder and the members' metrics

    def on_epoch(i: int):
        def save(epoch, metrics, st):
            metrics["perf/cache_hit"] = float(cache is not None)
            metrics["perf/cache_source"] = cache_source
            metrics["perf/teacher_built"] = float(needs[i])  # this member needs the teacher model
            pending.setdefault("metrics", {})[i] = metrics
            if report is None or (epoch % every and epoch != epochs):  # no checkpoint this epoch
                return
            t0 = time.perf_counter()
            if "folder" not in pending:
                pending["folder"] = tempfile.mkdtemp(prefix="tunekd-ckpt-", dir=scratch_dir(checkpoint_bytes))
            folder = os.path.join(pending["folder"], groups.prefix(i) if grouped else "")
            os.makedirs(folder, exist_ok=True)
            # the last epoch's checkpoint is the trial's result: weights only, nothing will continue it
            checkpoints.save(folder, members[i].distiller, st, resumable=epoch != epochs)
            pending["save_s"] = pending.get("save_s", 0.0) + time.perf_counter() - t0
        return save

    def after_epoch(epoch: int):
        nonlocal checkpoint_s
        per_member, folder = pending.pop("metrics", {}), pending.pop("folder", None)
        t0 = time.perf_counter() - pending.pop("save_s", 0.0)
        try:
            if report is None:
                return
            errors = {i: f"{type(m.error).__name__}: {m.error}" for i, m in enumerate(members) if m.error is not None}
            if folder is not None:
                for i in errors:
                    os.makedirs(os.path.join(folder, groups.prefix(i)), exist_ok=True)
                    Path(folder, groups.prefix(i), FAILED).write_text(errors[i])
            for metrics in per_member.values():
                metrics["perf/checkpoint_s"] = checkpoint_s + (time.perf_counter() - t0 if folder else 0.0)
            if grouped:
                report(groups.group_result(per_member, errors, f"eval/{spec.primary_metric}"), folder)
            else:
                report(per_member[0], folder)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
                checkpoint_s += time.perf_counter() - t0

    for i, m in enumerate(members):
        m.on_epoch = on_epoch(i)
    distill.fit_members(members, spec, train, {k: v for k, v in shared.encoded.items() if k != "train"},
                        study.train, epochs=epochs, seed=study.seed, started=started,
                        generation=study.task.generation, after_epoch=after_epoch)
    return [m.history for m in members]


def scratch_dir(nbytes: int) -> str | None:
    """Where a checkpoint is written before Tune copies it into the trial's folder: shared memory
    (/dev/shm) when it has room for twice `nbytes` (the copy then costs one disk write, not two), else the
    default temporary folder."""
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    return shm if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize > 2 * nbytes else None


def tune_trainable(config: dict[str, Any], shared: Shared) -> None:
    """The function Ray Tune runs."""
    import logging

    from ray import tune

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "checkpoint created" line per epoch
    checkpoint = tune.get_checkpoint()

    def report(metrics, folder):
        with thread_exit.reporting():  # where Tune stops a trial (SystemExit): `thread_exit`
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    run = functools.partial(run_group, groups.members(config)) if groups.is_group(config) else \
        functools.partial(run_trial, dict(config))
    with thread_exit.stoppable():
        if checkpoint is None:
            run(shared, report=report)
            return
        # Only the checkpoint Tune names, never a newer one on disk: a worker writes its checkpoint before the
        # driver sees that epoch's result, so a driver killed in between leaves a newer checkpoint whose epoch
        # MLflow never got; restoring from it would leave that step missing. The epoch is trained again instead
        # (deterministically: `checkpoints`), and the tracker skips the steps it already has.
        with checkpoint.as_directory() as folder:
            run(shared, report=report, restore_dir=folder)
