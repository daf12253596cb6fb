"""`python -m tunekd.angles`: the geometric analysis of docs/method.md — angles at a student state between teacher layers.

For a student hidden state `S_i` and teacher states `T_j`, `T_k` at the same (non-padding) token,

    cos θ_jk = ⟨T_j − S_i, T_k − S_i⟩ / (‖T_j − S_i‖ · ‖T_k − S_i‖)

for every student state i = 0..S (0: the embedding output) and every teacher-layer pair
1 <= j < k <= T. Acute angles (cos > 0) mean every teacher layer pulls the student roughly the same
way. Reported per student state: the T x T matrix of mean cosines, the fraction acute per pair and
overall, a histogram of all cosines. The student is a fresh one built from the teacher (`random`,
`copy`), a trained one logged by a trial (`run:<mlflow_run_id>`, artifact `student/`) or a local
folder; the cosines are computed in float64.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunekd.describe import copied_teacher_layers
from tunekd.errors import ArgumentParser, ConfigError, run_cli, unknown

HIST_BINS = 80


def log(msg: str) -> None:
    print(f"[tunekd] {msg}", file=sys.stderr, flush=True)


# --- the core ----------------------------------------------------------------------------------


def teacher_pairs(n_teacher: int) -> list[tuple[int, int]]:
    """The pairs (j, k), j < k, of indices into the teacher states, in the row order of `angle_cosines`."""
    return list(itertools.combinations(range(n_teacher), 2))


def angle_cosines(student_state: torch.Tensor, teacher_states: Sequence[torch.Tensor] | torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Cosines of the angles at the student state between the directions to every pair of teacher states.

    student_state: [B, L, H]; teacher_states: a sequence of T tensors [B, L, H] (or one [T, B, L, H]);
    mask: [B, L], nonzero at valid (non-padding) tokens. Returns a float64 tensor [P, N]:
    P = T(T−1)/2 rows in `teacher_pairs(T)` order (row for (j, k) = cos θ_jk), N the valid tokens in
    row-major (batch, position) order. Padded positions are dropped before any arithmetic, so their
    values (even NaN or inf) change nothing. Where a teacher state coincides with the student state
    the angle is undefined and the cosines involving it are NaN. Raises ConfigError when the widths
    differ (a narrower student is not in the teacher's space: the angles are undefined).
    """
    teachers = teacher_states if isinstance(teacher_states, torch.Tensor) else None
    if teachers is None:
        if len(teacher_states) == 0:
            raise ConfigError("angle_cosines needs at least one teacher state")
        shapes = {tuple(t.shape) for t in teacher_states}
        if len(shapes) != 1:
            raise ConfigError(f"teacher states have different shapes: {sorted(shapes)}")
        teachers = torch.stack([t.detach() for t in teacher_states])
    if teachers.dim() != 4 or student_state.dim() != 3:
        raise ConfigError(f"expected a student state [B, L, H] and teacher states [B, L, H]; got "
                          f"{tuple(student_state.shape)} and {tuple(teachers.shape[1:])}")
    if student_state.shape[-1] != teachers.shape[-1]:
        raise ConfigError(
            f"the student width {student_state.shape[-1]} differs from the teacher width {teachers.shape[-1]}: "
            "the angles between student and teacher states are undefined (the states live in different spaces); "
            "use a student of the teacher's width")
    if student_state.shape[:2] != teachers.shape[1:3] or tuple(mask.shape) != tuple(student_state.shape[:2]):
        raise ConfigError(f"shape mismatch: student {tuple(student_state.shape)}, teacher "
                          f"{tuple(teachers.shape[1:])}, mask {tuple(mask.shape)}")
    valid = mask.to(torch.bool).to(student_state.device)
    s = student_state.detach()[valid].to(torch.float64)  # [N, H]
    t = teachers.to(student_state.device)[:, valid].to(torch.float64)  # [T, N, H]
    d = t - s.unsqueeze(0)
    norm = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
    u = d / norm  # 0/0 → NaN where a teacher state coincides with the student state
    j, k = zip(*teacher_pairs(t.shape[0])) if t.shape[0] > 1 else ((), ())
    j = torch.tensor(j, dtype=torch.long, device=u.device)
    k = torch.tensor(k, dtype=torch.long, device=u.device)
    cos = (u[j] * u[k]).sum(dim=-1)
    return cos.clamp(-1.0, 1.0)  # rounding only; NaN stays NaN


@dataclass
class AngleSummary:
    """Running statistics of the cosines of one student state over teacher layers `teacher_layers`
    (layer numbers, e.g. 1..T). Add batches with `update`; pairs follow `teacher_pairs` order."""

    teacher_layers: list[int]
    sum_cos: np.ndarray = field(init=False)
    count: np.ndarray = field(init=False)  # defined (non-NaN) cosines per pair
    acute: np.ndarray = field(init=False)  # cosines > 0 per pair
    undefined: int = field(init=False, default=0)
    hist: np.ndarray = field(init=False)  # counts of all cosines in HIST_BINS bins over [-1, 1]

    def __post_init__(self):
        p = len(self.pairs)
        self.sum_cos = np.zeros(p)
        self.count = np.zeros(p, dtype=np.int64)
        self.acute = np.zeros(p, dtype=np.int64)
        self.hist = np.zeros(HIST_BINS, dtype=np.int64)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(j, k) as teacher layer numbers."""
        return [(self.teacher_layers[a], self.teacher_layers[b]) for a, b in teacher_pairs(len(self.teacher_layers))]

    def update(self, cos: torch.Tensor) -> AngleSummary:
        c = cos.detach().to(torch.float64).cpu().numpy()
        if c.shape[0] != len(self.pairs):
            raise ValueError(f"expected {len(self.pairs)} pair rows, got {c.shape[0]}")
        ok = ~np.isnan(c)
        self.sum_cos += np.where(ok, c, 0.0).sum(axis=1)
        self.count += ok.sum(axis=1)
        self.acute += (np.where(ok, c, -1.0) > 0).sum(axis=1)
        self.undefined += int((~ok).sum())
        self.hist += np.histogram(c[ok], bins=HIST_BINS, range=(-1.0, 1.0))[0]
        return self

    @property
    def mean_pair(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sum_cos / self.count

    @property
    def acute_pair(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.acute / self.count

    def _matrix(self, values: np.ndarray) -> np.ndarray:
        n = len(self.teacher_layers)
        m = np.full((n, n), np.nan)
        for (a, b), v in zip(teacher_pairs(n), values):
            m[a, b] = m[b, a] = v
        return m

    @property
    def mean_matrix(self) -> np.ndarray:
        """[T, T]: mean cos θ_jk at [j, k] and [k, j] (indices into `teacher_layers`); NaN diagonal."""
        return self._matrix(self.mean_pair)

    @property
    def acute_matrix(self) -> np.ndarray:
        """[T, T]: fraction of tokens with cos θ_jk > 0; NaN diagonal."""
        return self._matrix(self.acute_pair)

    @property
    def mean_cos(self) -> float:
        """Mean over every pair and token."""
        n = int(self.count.sum())
        return float(self.sum_cos.sum() / n) if n else math.nan

    @property
    def frac_acute(self) -> float:
        """Fraction of all (pair, token) cosines that are > 0."""
        n = int(self.count.sum())
        return float(self.acute.sum() / n) if n else math.nan


def summarize(cos: torch.Tensor, teacher_layers: Sequence[int] | int) -> AngleSummary:
    """An `AngleSummary` of one `angle_cosines` result; `teacher_layers` are the layer numbers of the
    teacher states given to it (an int T means 1..T)."""
    layers = list(range(1, teacher_layers + 1)) if isinstance(teacher_layers, int) else list(teacher_layers)
    return AngleSummary(layers).update(cos)


# --- models and data ---------------------------------------------------------------------------


@dataclass
class Loaded:
    teacher: torch.nn.Module
    student: torch.nn.Module
    family: object
    spec: object
    teacher_path: str
    student_label: str
    student_info: dict


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _load_model(path: str, spec, what: str):
    from transformers import AutoConfig

    from tunekd.models import family_for

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path!r} cannot be loaded: {str(exc).splitlines()[0]}") from None
    family = family_for(config)
    try:
        return family, family.load(path, spec)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{what} {path!r} cannot be loaded: {str(exc).splitlines()[0]}") from None


def _store(tracking_uri: str, what: str):
    from tunekd import tracking

    if tracking_uri.startswith("sqlite:///") and not os.path.isfile(tracking_uri[len("sqlite:///"):]):
        raise ConfigError(f"{what}: no MLflow database at {tracking_uri[len('sqlite:///'):]!r}")
    return tracking.client(tracking_uri)


def _ray_dirs(tag: str | None, tracking_uri: str) -> list[Path]:
    """Where a study's Ray folder may be: the parent run's `tunekd.ray_path`, else (a moved or copied study
    folder) a folder of that name under `ray_results/` beside the sqlite store or in the working directory."""
    if not tag:
        return []
    out = [Path(tag)]
    name = Path(tag).name
    if tracking_uri.startswith("sqlite:///"):
        out.append(Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "ray_results" / name)
    out.append(Path("ray_results") / name)
    return [p for p in out if p.is_dir()]


@dataclass
class StudentSource:
    """A trial's trained student: an MLflow artifact folder `student/` (`train.save_model`), or the weights it
    kept in `ray_results/` (`tune.keep_students`), rebuilt on its teacher from the trial's params."""

    run_id: str
    params: dict
    artifact: bool
    weights: Path | None = None


def student_source(client, run, tracking_uri: str) -> StudentSource | None:
    """Where run `run`'s trained student is (artifact `student/` first, then kept weights), or None."""
    from tunekd import checkpoints

    rid = run.info.run_id
    params = dict(run.data.params)
    parent = run.data.tags.get("mlflow.parentRunId")
    parent_run = None
    if parent:
        try:
            parent_run = client.get_run(parent)
            params.setdefault("teacher.path", parent_run.data.params.get("teacher.path"))
        except Exception:  # noqa: BLE001 - the parent is context only
            parent_run = None
    if "student" in {a.path for a in client.list_artifacts(rid)}:
        return StudentSource(rid, params, artifact=True)
    trial_id = run.data.tags.get("tunekd.trial_id")
    ray_tag = parent_run.data.tags.get("tunekd.ray_path") if parent_run is not None else None
    for folder in _ray_dirs(ray_tag, tracking_uri) if trial_id else []:
        weights = checkpoints.kept_weights(folder, trial_id)
        if weights is not None:
            return StudentSource(rid, params, artifact=False, weights=weights)
    return None


def find_student(run_id: str, tracking_uri: str) -> StudentSource:
    """`--student run:ID`: that trial's trained student; ConfigError when the run or its weights are missing."""
    client = _store(tracking_uri, f"--student run:{run_id}")
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # MlflowException
        raise ConfigError(f"--student run:{run_id}: no such run at {tracking_uri} "
                          f"({str(exc).splitlines()[0]})") from None
    found = student_source(client, run, tracking_uri)
    if found is None:
        names = sorted(a.path for a in client.list_artifacts(run_id))
        raise ConfigError(f"--student run:{run_id}: the run has no artifact folder 'student/' (artifacts: "
                          f"{', '.join(names) or 'none'}) and no weights kept in its study's ray_results/ "
                          "(train.save_model: true logs every student; tune.keep_students keeps the best)")
    return found


def best_student(experiment: str, tracking_uri: str) -> StudentSource:
    """`--best EXPERIMENT`: the best completed trial (by the study's metric, tag `tunekd.best.metric`) of the
    experiment's latest study run whose student is kept (artifact `student/` or weights in ray_results/)."""
    client = _store(tracking_uri, f"--best {experiment}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise unknown("experiment", experiment, names)
    parents = client.search_runs([exp.experiment_id], "tags.`tunekd.role` = 'study'", max_results=1,
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        raise ConfigError(f"--best {experiment}: the experiment has no study run")
    parent = parents[0]
    metric = parent.data.tags.get("tunekd.best.metric", "eval/accuracy")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                  "tags.`tunekd.status` = 'completed'", max_results=10_000)
    ranked = sorted((r for r in children if metric in r.data.metrics), key=lambda r: -r.data.metrics[metric])
    for run in ranked:
        found = student_source(client, run, tracking_uri)
        if found is not None:
            log(f"--best {experiment}: trial {run.info.run_name} ({metric} {run.data.metrics[metric]:.2f}), "
                f"run {run.info.run_id}, " + ("artifact student/" if found.artifact else f"weights {found.weights}"))
            return found
    raise ConfigError(f"--best {experiment}: none of the {len(ranked)} completed trials of study run "
                      f"{parent.info.run_id} has a kept student (artifact student/ or weights in ray_results/)")


def _config_from_params(params: dict, prefix: str) -> dict:
    """The nested section `prefix` (e.g. `student`) of a trial's dotted MLflow params, values parsed back."""
    out: dict = {}
    for key, value in params.items():
        if not key.startswith(prefix + "."):
            continue
        try:
            value = json.loads(value)
        except (TypeError, ValueError):
            pass
        node = out
        *head, last = key[len(prefix) + 1:].split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def rebuild_student(source: StudentSource, teacher, family, spec):
    """The trial's student rebuilt on its teacher from the trial's `student.*` params, with the kept weights."""
    from safetensors.torch import load_file

    from tunekd.study import StudentConfig
    from tunekd.students import build_student

    fields = set(StudentConfig.model_fields)
    raw = {k: v for k, v in _config_from_params(source.params, "student").items() if k in fields}
    try:
        cfg = StudentConfig.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"run {source.run_id}: its student.* params do not make a student config "
                          f"({str(exc).splitlines()[0]})") from None
    student = build_student(teacher, family, spec, cfg, seed=0).model
    tensors = load_file(str(source.weights))
    state = {k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")}
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"the weights {source.weights} do not fit the student rebuilt from run {source.run_id}'s "
                          f"params ({str(exc).splitlines()[0]})") from None
    return student


def load_models(args, workdir: str) -> Loaded:
    from tunekd.study import StudentConfig
    from tunekd.students import build_student
    from tunekd.tasks import get_task
    from tunekd.teacher import resolve_model

    student_ref = args.student
    run_params: dict = {}
    student_path = None
    source = None
    if args.best:
        source = best_student(args.best, args.tracking_uri)
        student_ref = args.student = f"run:{source.run_id}"
    elif student_ref.startswith("run:"):
        run_id = student_ref[len("run:"):]
        if not run_id:
            raise ConfigError("--student run:<mlflow_run_id> needs a run id")
        source = find_student(run_id, args.tracking_uri)
    if source is not None:
        from tunekd import tracking

        run_params = source.params
        label = f"run-{source.run_id[:8]}"
        if source.artifact:
            student_path = tracking.download_artifacts(args.tracking_uri, source.run_id, "student", workdir)
            if not os.path.isfile(os.path.join(student_path, "config.json")):
                raise ConfigError(f"--student run:{source.run_id}: artifact 'student/' has no config.json "
                                  "(not a transformers model)")
    elif student_ref in ("random", "copy"):
        label = f"{student_ref}-{args.layers}"
    else:
        p = Path(student_ref).expanduser()
        if not (p / "config.json").is_file():
            raise ConfigError(f"--student {student_ref!r}: expected random, copy, run:<mlflow_run_id> or a folder "
                              "with a transformers model (config.json)")
        student_path = str(p.resolve())
        label = p.name or "student"

    # a trained student's task and teacher default to its trial's
    if args.task is None:
        args.task = run_params.get("task.name", "synthetic")
        if args.data_dir is None and run_params.get("task.data_dir") not in (None, "None", "null", ""):
            args.data_dir = run_params["task.data_dir"]
    if args.max_length is None:
        args.max_length = int(run_params.get("task.max_length", 128))
    teacher_ref = args.teacher
    if teacher_ref is None:
        teacher_ref = run_params.get("teacher.path") or "minilm"
        if run_params and not run_params.get("teacher.path"):
            log("the student's run does not name its teacher's path; using minilm (pass --teacher)")
    spec = get_task(args.task)
    teacher_path = resolve_model(teacher_ref)
    family, teacher = _load_model(teacher_path, spec, "--teacher")
    info: dict = {"student": student_ref}
    if source is not None and not source.artifact:
        student = rebuild_student(source, teacher, family, spec)
        info.update(layers=family.num_layers(student.config), init=run_params.get("student.init"),
                    copied_teacher_layers=run_params.get("student.copied_teacher_layers"), weights=str(source.weights))
    elif student_path is None:
        cfg = StudentConfig(layers=args.layers, init=student_ref, copy_layers=args.copy_layers)
        student = build_student(teacher, family, spec, cfg, seed=args.seed).model
        info.update(layers=args.layers, init=student_ref, seed=args.seed,
                    copied_teacher_layers=copied_teacher_layers(getattr(student.config, "tunekd_copied_layers", None)))
    else:
        s_family, student = _load_model(student_path, spec, "--student")
        if s_family.name != family.name:
            raise ConfigError(f"the student is a {s_family.name} model but the teacher a {family.name} model")
        info.update(layers=s_family.num_layers(student.config),
                    init=getattr(student.config, "tunekd_init", run_params.get("student.init")),
                    copied_teacher_layers=copied_teacher_layers(getattr(student.config, "tunekd_copied_layers", None)))
    s_width, t_width = family.hidden_size(student.config), family.hidden_size(teacher.config)
    if s_width != t_width:
        raise ConfigError(f"the student width {s_width} differs from the teacher width {t_width}: the angles between "
                          "student and teacher states are undefined (different spaces); use a student of the "
                          "teacher's width")
    return Loaded(teacher=teacher, student=student, family=family, spec=spec, teacher_path=teacher_path,
                  student_label=label, student_info=info)


def sample_data(args, spec, tokenizer):
    """`--samples` rows of the task's first eval split, tokenized."""
    from tunekd.data import encode
    from tunekd.tasks import load_task

    synthetic = {"train_size": 8, "eval_size": max(args.samples, 8)}
    dsd = load_task(spec.name, args.data_dir, max_eval_samples=args.samples, seed=args.seed, synthetic=synthetic)
    split = spec.eval_splits[0]
    ds = dsd[split]
    if len(ds) > args.samples:
        ds = ds.select(range(args.samples))
    return split, encode(ds, tokenizer, spec.text_fields, args.max_length)


@torch.no_grad()
def measure(family, teacher, student, data, batch_size: int, device) -> dict[tuple[str, int], AngleSummary]:
    """One `AngleSummary` per (stack, student state index) over all batches of `data`."""
    from tunekd.data import batches

    teacher.eval().to(device)
    student.eval().to(device)
    out: dict[tuple[str, int], AngleSummary] = {}
    for batch in batches(data, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        t_out = family.forward(teacher, batch, hidden=True)
        s_out = family.forward(student, batch, hidden=True)
        for stack, s_states in s_out.hidden.items():
            t_states = t_out.hidden.get(stack)
            if not t_states:
                continue
            mask = s_out.masks[stack]
            t_layers = list(range(1, len(t_states)))
            stacked = torch.stack([t.float() for t in t_states[1:]])
            for i, s in enumerate(s_states):
                cos = angle_cosines(s.float(), stacked, mask)
                out.setdefault((stack, i), AngleSummary(t_layers)).update(cos)
    return out


# --- outputs -----------------------------------------------------------------------------------


def to_frame(stats: dict[tuple[str, int], AngleSummary]):
    import pandas as pd

    rows = []
    for (stack, i), s in stats.items():
        for (j, k), mean, frac, n in zip(s.pairs, s.mean_pair, s.acute_pair, s.count):
            rows.append({"stack": stack, "student_layer": i, "teacher_j": j, "teacher_k": k, "mean_cos": mean,
                         "frac_acute": frac, "n_tokens": int(n)})
    return pd.DataFrame(rows, columns=["stack", "student_layer", "teacher_j", "teacher_k", "mean_cos",
                                       "frac_acute", "n_tokens"])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _name(stack: str, i: int, many: bool) -> str:
    return f"{stack}_s{i}" if many else f"s{i}"


def plot_heatmap(s: AngleSummary, title: str, path: Path) -> Path:
    plt = _pyplot()
    m = s.mean_matrix
    n = len(s.teacher_layers)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * max(n, 4), 0.6 + 0.55 * max(n, 4)))
    im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(n), [str(t) for t in s.teacher_layers])
    ax.set_yticks(range(n), [str(t) for t in s.teacher_layers])
    ax.set_xlabel("teacher layer k")
    ax.set_ylabel("teacher layer j")
    if n <= 16:
        for a in range(n):
            for b in range(n):
                if not np.isnan(m[a, b]):
                    ax.text(b, a, f"{m[a, b]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(m[a, b]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="mean cos θ_jk")
    ax.set_title(f"{title}\nmean cos {s.mean_cos:.3f}, acute {100 * s.frac_acute:.1f}%", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histogram(stats: dict[tuple[str, int], AngleSummary], title: str, path: Path) -> Path:
    plt = _pyplot()
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    many = len({stack for stack, _ in stats}) > 1
    fig, ax = plt.subplots(figsize=(7, 4))
    for (stack, i), s in stats.items():
        total = s.hist.sum()
        if total:
            ax.stairs(s.hist / total / (edges[1] - edges[0]), edges, label=f"student {_name(stack, i, many)}")
    ax.axvline(0.0, color="grey", ls="--", lw=1)
    ax.set_xlabel("cos θ_jk (all teacher-layer pairs and tokens)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(stats, out: Path, label: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "angles.csv"]
    to_frame(stats).to_csv(files[0], index=False)
    many = len({stack for stack, _ in stats}) > 1
    for (stack, i), s in stats.items():
        name = _name(stack, i, many)
        files.append(plot_heatmap(s, f"{label}: student state {name} ({'embeddings' if i == 0 else f'layer {i}'})",
                                  out / f"heatmap_{name}.png"))
    files.append(plot_histogram(stats, f"{label}: cosines at the student between teacher layers", out / "hist.png"))
    return files


def overall(stats) -> tuple[float, float]:
    n = sum(int(s.count.sum()) for s in stats.values())
    if not n:
        return math.nan, math.nan
    return (sum(float(s.sum_cos.sum()) for s in stats.values()) / n,
            sum(int(s.acute.sum()) for s in stats.values()) / n)


def summary_text(stats) -> str:
    many = len({stack for stack, _ in stats}) > 1
    lines = [f"{'student':>10} {'mean cos':>9} {'acute':>7} {'min pair':>9} {'tokens':>7}"]
    for (stack, i), s in stats.items():
        worst = np.nanmin(s.mean_pair) if np.isfinite(s.mean_pair).any() else math.nan
        n_tok = int(s.count.max()) if len(s.count) else 0
        lines.append(f"{_name(stack, i, many):>10} {s.mean_cos:>9.3f} {100 * s.frac_acute:>6.1f}% {worst:>9.3f} "
                     f"{n_tok:>7}")
    mean, frac = overall(stats)
    lines.append(f"{'all':>10} {mean:>9.3f} {100 * frac:>6.1f}%")
    return "\n".join(lines)


def log_to_mlflow(args, loaded: Loaded, stats, files: list[Path]) -> str:
    from tunekd import tracking

    tags = {"tunekd.role": "angles"}
    if args.student.startswith("run:"):
        tags["tunekd.source_run"] = args.student[len("run:"):]
    params = {"teacher": loaded.teacher_path, "task": args.task, "samples": args.samples,
              "max_length": args.max_length, **{f"student.{k}" if k != "student" else k: v
                                                for k, v in loaded.student_info.items()}}
    mean, frac = overall(stats)
    metrics = {"angles/mean_cos": mean, "angles/frac_acute": frac}
    many = len({stack for stack, _ in stats}) > 1
    for (stack, i), s in stats.items():
        metrics[f"angles/mean_cos/{_name(stack, i, many)}"] = s.mean_cos
        metrics[f"angles/frac_acute/{_name(stack, i, many)}"] = s.frac_acute
    return tracking.log_single_run(args.tracking_uri, args.experiment, f"angles-{loaded.student_label}", tags=tags,
                                   params={k: str(v)[:6000] for k, v in params.items()},
                                   metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)},
                                   files=[str(f) for f in files])


# --- the CLI -----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="tunekd angles",
        description=textwrap.fill("The geometric analysis of docs/method.md: at every valid token, the cosine of the angle at a student "
                    "hidden state S_i between the directions to two teacher layers, cos θ_jk = <T_j - S_i, T_k - S_i> "
                    "/ (|T_j - S_i| |T_k - S_i|), for every student state i (0 = embeddings) and teacher-layer pair "
                    "1 <= j < k <= T. Writes angles.csv (mean cosine and fraction acute per student state and pair), "
                    "a heatmap PNG of the mean-cosine matrix per student state and a histogram PNG of all cosines; "
                    "prints a per-student-state summary.", 100),
        epilog="examples:\n"
               "  tunekd angles --student copy --layers 3 --samples 64\n"
               "  tunekd run search_spaces/quickstart.yaml        # a study whose best student is kept\n"
               "  tunekd angles --best quickstart --experiment angles\n\n"
               "--student run:<child run id> takes any trial whose student is kept (tunekd list shows the best). "
               "The student must have the teacher's width (else the angles are undefined, exit 2).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None,
                   help="teacher: a local transformers folder, a hub id, or 'minilm' (offline MiniLM-L6). Default: "
                        "for --student run:ID the teacher path recorded by that run's study, else minilm")
    p.add_argument("--student", default="copy",
                   help="'random' or 'copy' (a fresh student built from the teacher, see --layers), "
                        "'run:<mlflow_run_id>' (the trained student of that trial: its artifact student/, or its "
                        "weights kept in its study's ray_results/), or a local transformers folder (default: "
                        "%(default)s)")
    p.add_argument("--best", default=None, metavar="EXPERIMENT",
                   help="the student of the best completed trial of EXPERIMENT's latest study run whose weights are "
                        "kept (artifact student/, or tune.keep_students' weights in ray_results/), instead of "
                        "--student; its task and teacher are the trial's")
    p.add_argument("--layers", type=int, default=3, help="depth of a random/copy student, 1..1024 (default: %(default)s)")
    p.add_argument("--copy-layers", default="forward", choices=("forward", "spread"),
                   help="which teacher layers a copy student copies (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the student init and the data sample (default: 0)")
    p.add_argument("--task", default=None,
                   help="task whose first eval split is sampled (default: the run's task for run:ID, else synthetic)")
    p.add_argument("--data-dir", default=None, help="local data folder of the task (default: hub / generated)")
    p.add_argument("--samples", type=int, default=64, help="number of examples, 1..100000 (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None,
                   help="max tokens per example (default: the run's task.max_length, else 128)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: angles/<student label>)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                   help="MLflow tracking URI, for run:ID and for --experiment (default: %(default)s)")
    p.add_argument("--experiment", default=None,
                   help="log to this MLflow experiment: a run (tag tunekd.role=angles) with metrics angles/mean_cos, "
                        "angles/frac_acute (overall and per student state) and the files as artifacts")
    return p.parse_args(argv)


# bounds of the numeric options: a typo must not become an hour-long forward pass or a MemoryError
ARG_BOUNDS = {"layers": (1, 1024), "samples": (1, 100_000), "batch_size": (1, 65536), "max_length": (2, 131072),
              "seed": (0, 2**32 - 1)}


def check_args(args) -> None:
    """Each numeric option within its bounds and --out a folder that can be written: one ConfigError line."""
    from tunekd.checks import check_writable_dir

    for name, (low, high) in ARG_BOUNDS.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"--{name.replace('_', '-')} must be in {low}..{high}, got {value}")
    if args.out is not None:
        check_writable_dir(args.out, "--out")


def run(args) -> int:
    check_args(args)
    _quiet()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="tunekd-angles-") as workdir:
        loaded = load_models(args, workdir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(loaded.teacher_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"no tokenizer with the teacher {loaded.teacher_path!r}: {str(exc).splitlines()[0]}") \
                from None
        split, data = sample_data(args, loaded.spec, tokenizer)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        t_layers = loaded.family.num_layers(loaded.teacher.config)
        s_layers = loaded.family.num_layers(loaded.student.config)
        log(f"teacher {loaded.teacher_path} ({t_layers} layers), student {loaded.student_label} ({s_layers} layers), "
            f"{len(data)} examples of {args.task}/{split}, on {device}")
        stats = measure(loaded.family, loaded.teacher, loaded.student, data, args.batch_size, device)
    out = Path(args.out or Path("angles") / re.sub(r"[^\w.-]+", "_", loaded.student_label))
    files = write_outputs(stats, out, loaded.student_label)
    print(summary_text(stats))
    log(f"angles: {len(files)} files in {out}")
    if args.experiment:
        rid = log_to_mlflow(args, loaded, stats, files)
        log(f"mlflow: experiment {args.experiment!r}, run {rid}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
