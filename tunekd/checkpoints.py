"""Trial checkpoints: what a running trial writes to continue after a fault, and what a finished one keeps.

A checkpoint folder holds

    model.safetensors   the student and its projections (safetensors: nothing is unpickled)
    optim.pt            optimizer and LR-scheduler state (a weights-only torch file)
    rng.pt              torch, numpy and Python RNG states (weights-only torch file: tensors and numbers)
    progress.json       epochs and steps done, and the size of every file above; written last, and
                        checked by `load` (a file not the size it records was cut short)

The epoch is the data position: an epoch's batch order depends only on the study seed and the epoch
(`distill.fit`), so a trial restored after epoch k with its RNG states trains epochs k+1.. exactly as an
uninterrupted one. While a trial runs, Tune keeps its latest checkpoint only, and a restored trial starts
from the one Tune's saved state names (`trainable.tune_trainable`). When the trial ends
(`finish_trial`), the optimizer and RNG states go (nothing will continue it) and its score is written
(`final.json`); `prune_students` then keeps the weights of the best `tune.keep_students` finished trials of
the experiment and deletes the others'.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
OPTIM = "optim.pt"
RNG = "rng.pt"
PROGRESS = "progress.json"
FINAL = "final.json"
RESUME_ONLY = (OPTIM, RNG)  # what only a continuing trial needs


# --- writing and reading ------------------------------------------------------------------------


def save(folder: str | Path, distiller, state, *, resumable: bool = True) -> None:
    """Write a checkpoint of the trial into `folder`. `resumable=False` (the trial's last epoch): the
    weights and progress only, no optimizer or RNG state."""
    folder = Path(folder)
    tensors = {f"student.{k}": v.detach().cpu().contiguous() for k, v in distiller.student.state_dict().items()}
    tensors.update({f"proj.{k}": v.detach().cpu().contiguous() for k, v in distiller.projections.state_dict().items()})
    save_file(_untie(tensors), str(folder / WEIGHTS))
    if resumable:
        torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict()},
                   folder / OPTIM)
        torch.save(rng_state(), folder / RNG)
    files = {name: (folder / name).stat().st_size for name in (WEIGHTS, *RESUME_ONLY) if (folder / name).is_file()}
    (folder / PROGRESS).write_text(json.dumps({"epoch": state.epoch, "step": state.step, "files": files}))


def load(folder: str | Path, distiller, state) -> None:
    """Restore the student, projections, optimizer, scheduler, RNG states and position from `folder`."""
    folder = Path(folder)
    if not (folder / PROGRESS).is_file():  # written last: a checkpoint without it was cut short (e.g. an upload)
        raise RuntimeError(f"checkpoint {folder} is incomplete: {PROGRESS} is missing")
    progress = json.loads((folder / PROGRESS).read_text())
    # a file not the size progress.json records was cut short (optimizer and RNG states may be gone: a
    # finished trial's are deleted by `finish_trial`)
    torn = [name for name, size in progress["files"].items()
            if (folder / name).is_file() and (folder / name).stat().st_size != size]
    problems = [f"{name} is not the size {PROGRESS} records" for name in torn]
    problems += [] if (folder / WEIGHTS).is_file() else [f"{WEIGHTS} is missing"]
    if problems:
        raise RuntimeError(f"checkpoint {folder} is incomplete: {'; '.join(problems)}")
    tensors = load_file(str(folder / WEIGHTS))
    distiller.student.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")})
    distiller.projections.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("proj.")})
    if (folder / OPTIM).is_file():
        optim = torch.load(folder / OPTIM, weights_only=True)
        state.optimizer.load_state_dict(optim["optimizer"])
        state.scheduler.load_state_dict(optim["scheduler"])
    if (folder / RNG).is_file():
        set_rng_state(torch.load(folder / RNG, weights_only=True))
    state.epoch, state.step = int(progress["epoch"]), int(progress["step"])


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[int, str] = {}
    out = {}
    for k, v in tensors.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen[ptr] = k
    return out


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and numbers (loadable weights-only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "gauss": float(gauss)},
           "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                      "gauss": gauss_next}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    n = saved["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = saved["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


# --- a finished trial ---------------------------------------------------------------------------


def finish_trial(trial_dir: str | Path, score: float | None | dict[str, float | None]) -> None:
    """A trial that ended: delete its optimizer and RNG states (nothing continues it) and record its score
    (the study's metric at its last epoch) beside the weights, for `prune_students`. `trial_dir` is a local
    folder or a URI (`tunekd.storage`: a study on object storage). A trial group (`tunekd.groups`) gives
    {member subfolder: score}: each member's checkpoint is finished as a trial's."""
    from tunekd import storage

    scores = score if isinstance(score, dict) else {"": score}
    fs, root = storage.filesystem(str(trial_dir))
    for folder, names in _checkpoints(fs, root).items():
        sub = folder.partition("/")[2]  # '' for a trial's checkpoint, 'm<i>' for a member's
        if sub not in scores:
            continue
        for name in RESUME_ONLY:
            if name in names:
                fs.delete_file(f"{root}/{folder}/{name}")
        if WEIGHTS in names:
            value = scores[sub]
            ok = value is not None and math.isfinite(float(value))
            with fs.open_output_stream(f"{root}/{folder}/{FINAL}") as out:
                out.write(json.dumps({"score": float(value) if ok else None}).encode())


def _checkpoints(fs, root: str, depth: int = 0) -> dict[str, set[str]]:
    """{`checkpoint_*` folder (relative to `root`, `depth` folders down), and each of its subfolders (a trial
    group's members, `m<i>/`): the names of its files}."""
    from tunekd import storage

    out: dict[str, set[str]] = {}
    for rel in storage.files(fs, root):
        parts = rel.split("/")
        if len(parts) in (depth + 2, depth + 3) and parts[depth].startswith("checkpoint_"):
            out.setdefault("/".join(parts[:-1]), set()).add(parts[-1])
    return out


def prune_students(experiment_dir: str | Path, keep: int) -> list[Path | str]:
    """Keep the weights of the `keep` best-scoring finished trials of the experiment (ties: the earlier
    folder name), delete the other finished trials' weights, and those of trials without a finite score
    (failed ones); returns the checkpoint folders kept (Paths; URIs for a study on object storage)."""
    from tunekd import storage

    remote = storage.is_remote(str(experiment_dir))
    fs, root = storage.filesystem(str(experiment_dir))
    finished = []
    for folder, names in _checkpoints(fs, root, depth=1).items():  # a trial's, or a group member's
        if FINAL not in names:
            continue
        try:
            with fs.open_input_stream(f"{root}/{folder}/{FINAL}") as f:
                score = json.loads(f.read()).get("score")
        except (OSError, ValueError):
            score = None
        where = storage.join(str(experiment_dir), folder) if remote else Path(root) / folder
        finished.append((score is None, -(score or 0.0), str(where), where, WEIGHTS in names, folder))
    finished.sort()
    kept = []
    for i, (unscored, _, _, where, has_weights, folder) in enumerate(finished):
        if i < keep and not unscored:
            if has_weights:
                kept.append(where)
        elif has_weights:
            fs.delete_file(f"{root}/{folder}/{WEIGHTS}")
    return kept


def kept_weights(experiment_dir: str | Path, trial_id: str) -> Path | None:
    """The weights trial `trial_id` kept in its experiment folder (`prune_students` left them: it is among the
    best `tune.keep_students`), or None. Ray names a trial's folder with its trial id; a trial group's member
    (`<ray trial id>/<i>`, `tunekd.groups`) keeps them in subfolder `m<i>/` of the group's checkpoint."""
    from tunekd.groups import locate

    ray_id, sub = locate(trial_id)
    found = sorted(Path(experiment_dir).glob(f"*{ray_id}*/checkpoint_*/{sub + '/' if sub else ''}{WEIGHTS}"))
    return found[-1] if found else None


def disk_bytes(folder: str | Path) -> int:
    """Bytes of the files under `folder`."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and not f.is_symlink())
