"""How a study and its trials are described to a researcher: trial names, output locations, the
dry-run listing. Pure functions (no MLflow, no Ray): the tracker, the driver and the CLI share them.

A trial's name says what it is: `forward·copy·S3·λ3·s0` = strategy · init · student depth ·
λ (`distill.lambda_hid`) · seed, then every other varying search dimension as `name=value`
(`lr=5e-05`, `temperature=2`, ...). Names are made unique within a study by a `#2`, `#3` suffix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SEP = "·"
# the one layer numbering of every output (run descriptions, params, the dry-run listing): the paper's
NUMBERING = "layers 1-based as in the paper: layer k = the k-th transformer layer's output, 0 = the embeddings"
# the fixed parts of a name, in order: (dotted param, prefix)
NAME_PARTS = (("distill.strategy", ""), ("student.init", ""), ("student.layers", "S"),
              ("distill.lambda_hid", "λ"), ("seed", "s"))


def _value(v: Any) -> str:
    if isinstance(v, str):
        try:  # params arrive as MLflow strings: '3', '3.0', '[[1, 2]]'
            v = json.loads(v)
        except ValueError:
            return v
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "map" if v and isinstance(v[0], (list, tuple)) else ",".join(_value(x) for x in v)
    return str(v)


def short_name(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def trial_name(params: Mapping[str, Any], varying: Iterable[str] = ()) -> str:
    """`forward·copy·S3·λ3·s0[·lr=5e-05...]` from a trial's dotted params; `varying` are the study's
    search dimensions (those not already among the fixed parts are appended in the order given)."""
    parts = [f"{prefix}{_value(params[key])}" for key, prefix in NAME_PARTS if key in params]
    fixed = {key for key, _ in NAME_PARTS}
    for dim in varying:
        if dim not in fixed and dim in params:
            parts.append(f"{short_name(dim)}={_value(params[dim])}")
    return SEP.join(parts) or "trial"


def unique_name(name: str, taken: Iterable[str]) -> str:
    """`name`, or `name#2`, `name#3`, ... — the first one not in `taken`."""
    taken = set(taken)
    if name not in taken:
        return name
    i = 2
    while f"{name}#{i}" in taken:
        i += 1
    return f"{name}#{i}"


def copied_teacher_layers(copied: Iterable[int] | None) -> list[int] | None:
    """The teacher layers a copy-init student copied, in the outputs' numbering (`NUMBERING`, 1-based), from
    the 0-based module indices `student.copy_layers` takes and `tunekd.students` uses; None: random init."""
    return None if copied is None else [i + 1 for i in copied]


def layer_map_text(layer_map: Iterable[Iterable[int]] | str | None) -> str:
    """`[[1, 2], [2, 4]]` → `1←2, 2←4` (student layer ← teacher layer, `NUMBERING`); `–` for no matching."""
    if isinstance(layer_map, str):
        layer_map = json.loads(layer_map)
    pairs = [tuple(p) for p in (layer_map or [])]
    return ", ".join(f"{s}←{t}" for s, t in pairs) if pairs else "– (no intermediate-layer matching)"


def output_locations(study, study_file: str | None = None) -> dict[str, str]:
    """Where a run of `study` writes, as absolute paths (all relative ones are relative to the current
    working directory): the MLflow store, Ray's trial folders, the fine-tuned teachers, the
    teacher-output cache."""
    uri = study.tracking.uri
    if uri.startswith("sqlite:///"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    from tunekd import storage as tstorage

    storage = tstorage.resolve(study.tune.storage_path)
    out = {
        "mlflow": f"{uri} (experiment {study.experiment!r})",
        "ray": tstorage.join(storage, f"{study.name}-<date>-<time>"),
        "teacher": str(Path(study.teacher.cache_dir).expanduser().resolve() / "teachers"),
        "teacher cache": tstorage.join(storage, "teacher_cache"),
    }
    if tstorage.is_remote(storage):  # fine-tuned teachers on the storage too; each node keeps copies
        out["teacher"] = tstorage.join(storage, "teachers")
        out["node cache"] = f"{tstorage.node_cache_root()} (each node's copies; ${tstorage.NODE_CACHE_ENV})"
    return out


OUTPUTS_HELP = """outputs (relative to the working directory; see --dry-run for a study's absolute paths):
  ./mlflow.db                         MLflow store: parent and trial runs (tracking.uri, --tracking-uri)
  ./ray_results/<study>-<date>-<time> Ray's trial folders and checkpoints (tune.storage_path)
  ./ray_results/teacher_cache/        the teacher-output cache (under tune.storage_path)
  ./.tunekd_cache/teachers/           fine-tuned teachers, reused by content hash (teacher.cache_dir)
  (tune.storage_path s3://... or gs://...: Ray's folders, the teacher cache and the fine-tuned teachers
   all under it, each node's copies in ~/.cache/tunekd/storage; see README "Running on a cluster")"""


def dry_run_lines(study, trials: Iterable[tuple[dict, Any, Any]]) -> list[str]:
    """The dry-run listing: one block per trial point — its name, the resolved layer map (student ←
    teacher), the copied layers, epochs — then where the study would write.

    `trials`: (point, trial study, plan) for every point (`tunekd.plan.Plan`)."""
    lines = []
    varying = list(study.search)
    n = 0
    for point, t_study, p in trials:
        n += 1
        name = trial_name(p.params(t_study), varying)
        where = ", ".join(f"{k}={v}" for k, v in point.items())
        copied = (", copies teacher layers " + ",".join(str(i) for i in copied_teacher_layers(p.copied_layers))
                  if p.copied_layers else "")
        lines.append(f"  {n:>3}. {name}" + (f"   ({where})" if where else ""))
        lines.append(f"       map {layer_map_text(p.layer_map)}; {t_study.student.layers}-layer {t_study.student.init} "
                     f"student{copied}; {t_study.train.epochs} epochs, lr {t_study.train.lr:g}, "
                     f"batch {t_study.train.batch_size}")
    if study.tune.num_samples > 1:
        lines.append(f"  (each point {study.tune.num_samples} times: tune.num_samples)")
    lines.append(f"  (map: student layer ← teacher layer; {NUMBERING})")
    lines.append("outputs:")
    lines += [f"  {k + ':':<15}{v}" for k, v in output_locations(study).items()]
    return lines
