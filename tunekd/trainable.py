"""The Ray Tune function trainable: one trial = one config, a thin wrapper around `distill.fit`.

What every trial shares (tokenized data, the teacher's weights) arrives as one `Shared` object
through `tune.with_parameters`, i.e. Ray's object store: it works on every node of a cluster
and no trial re-tokenizes or re-fine-tunes. `run_trial` also runs without Ray (`report=None`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunekd import distill, plan
from tunekd.data import Encoded
from tunekd.models import FAMILIES
from tunekd.students import build_projections, build_student
from tunekd.study import Study
from tunekd.tasks import get_task


@dataclass
class Shared:
    """Everything prepared once on the driver for all trials."""

    study_json: str
    family: str
    teacher_config: dict[str, Any]
    teacher_state: dict[str, np.ndarray]
    encoded: dict[str, Encoded]

    def teacher(self, spec):
        from transformers import AutoConfig

        family = FAMILIES[self.family]
        cfg = dict(self.teacher_config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = family.from_config(config, spec)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.teacher_state.items()})
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model


def _state_arrays(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def make_shared(study: Study, family_name: str, teacher_model, encoded: dict[str, Encoded]) -> Shared:
    return Shared(study_json=study.model_dump_json(), family=family_name,
                  teacher_config=teacher_model.config.to_dict(), teacher_state=_state_arrays(teacher_model),
                  encoded=encoded)


# --- checkpoints (safetensors + a weights-only torch file; nothing arbitrary is unpickled) -------


def save_checkpoint(folder: str | Path, distiller: distill.Distiller, state: distill.TrainState) -> None:
    folder = Path(folder)
    tensors = {f"student.{k}": v.detach().cpu().contiguous() for k, v in distiller.student.state_dict().items()}
    tensors.update({f"proj.{k}": v.detach().cpu().contiguous() for k, v in distiller.projections.state_dict().items()})
    save_file(_untie(tensors), str(folder / "model.safetensors"))
    torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict()},
               folder / "optim.pt")
    (folder / "progress.json").write_text(json.dumps({"epoch": state.epoch, "step": state.step}))


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[int, str] = {}
    out = {}
    for k, v in tensors.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen[ptr] = k
    return out


def load_checkpoint(folder: str | Path, distiller: distill.Distiller, state: distill.TrainState) -> None:
    folder = Path(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    distiller.student.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")})
    distiller.projections.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("proj.")})
    optim = torch.load(folder / "optim.pt", weights_only=True)
    state.optimizer.load_state_dict(optim["optimizer"])
    state.scheduler.load_state_dict(optim["scheduler"])
    progress = json.loads((folder / "progress.json").read_text())
    state.epoch, state.step = int(progress["epoch"]), int(progress["step"])


# --- one trial ---------------------------------------------------------------------------------


def run_trial(overrides: dict[str, Any], shared: Shared, *, report=None, restore_dir: str | None = None) -> list[dict]:
    """Train one trial. `report(metrics, checkpoint_dir)` is called after every epoch."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    study = Study.model_validate_json(shared.study_json).trial(overrides)
    spec = get_task(study.task.name)
    family = FAMILIES[shared.family]
    threads = os.environ.get("TUNEKD_THREADS")
    torch.set_num_threads(int(threads) if threads else max(1, int(study.tune.resources.cpu)))
    teacher = shared.teacher(spec)
    the_plan = plan.resolve(study, family.num_layers(teacher.config), family.match_embeddings_default)
    student = build_student(teacher, family, spec, study.student, seed=study.seed)
    projections = build_projections(the_plan.layer_map, family.hidden_size(student.model.config),
                                    family.hidden_size(teacher.config), seed=study.seed)
    distiller = distill.Distiller(family=family, student=student.model, teacher=teacher,
                                  layer_map=the_plan.layer_map, distill=study.distill, projections=projections)
    train = shared.encoded["train"]
    evals = {k: v for k, v in shared.encoded.items() if k != "train"}
    state = distill.make_state(distiller, study.train, -(-len(train) // study.train.batch_size), study.train.epochs)
    if restore_dir:
        load_checkpoint(restore_dir, distiller, state)

    def on_epoch(epoch, metrics, st):
        if report is None:
            return
        with tempfile.TemporaryDirectory(prefix="tunekd-ckpt-") as folder:
            save_checkpoint(folder, distiller, st)
            report(metrics, folder)

    return distill.fit(distiller, spec, train, evals, study.train, epochs=study.train.epochs, seed=study.seed,
                       state=state, on_epoch=on_epoch)


def tune_trainable(config: dict[str, Any], shared: Shared) -> None:
    """The function Ray Tune runs."""
    import logging

    from ray import tune

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "checkpoint created" line per epoch
    checkpoint = tune.get_checkpoint()

    def report(metrics, folder):
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run_trial(dict(config), shared, report=report, restore_dir=folder)
    else:
        run_trial(dict(config), shared, report=report)
