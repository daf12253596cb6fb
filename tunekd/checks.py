"""Pre-flight checks that need more than the study file: the teacher's config, the machine, the paths.

They run before Ray starts and before anything is written (MLflow, the teacher cache, `ray_results/`),
and each problem is one `ConfigError` line naming the key and what is allowed:

- `check_outputs(study, num_cpus=, address=)`: `tune.storage_path` is (or can become) a writable folder,
  or object storage that is reachable and writable (`storage.check_writable`: a probe object), and
  `teacher.cache_dir` (used with a local storage path) a writable folder; the tracking URI has a supported scheme and a usable target; a local
  teacher folder holds weights; `--num-cpus` and `tune.resources` fit a local machine.
- `check_trial(trial_study, teacher_config, family)`: one trial's impossibilities (fp16 without a GPU,
  attention heads that do not divide the width, a student that cannot be built, LoRA targets that are
  not modules of the student).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from urllib.parse import urlsplit

from tunekd.errors import ConfigError

# pseudo file systems: nothing a study writes belongs there
PSEUDO_FS = ("/proc", "/sys", "/dev")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# SQLAlchemy dialects MLflow accepts as a tracking store, and the DB-API modules that serve them
DB_DRIVERS = {
    "postgresql": ("psycopg2", "psycopg", "pg8000"),
    "mysql": ("MySQLdb", "pymysql", "mysql.connector"),
    "mssql": ("pyodbc", "pymssql"),
}
DRIVER_MODULES = {"psycopg2": "psycopg2", "psycopg": "psycopg", "pg8000": "pg8000", "mysqldb": "MySQLdb",
                  "pymysql": "pymysql", "mysqlconnector": "mysql.connector", "pyodbc": "pyodbc",
                  "pymssql": "pymssql"}
SUPPORTED_URIS = "sqlite:///path.db, http(s)://host:port, or postgresql:// / mysql:// / mssql:// with its driver"


# --- paths -------------------------------------------------------------------------------------


def _on_pseudo_fs(path: Path) -> bool:
    real = os.path.realpath(path)
    return any(real == p or real.startswith(p + os.sep) for p in PSEUDO_FS)


def check_writable_dir(path: str | Path, key: str) -> None:
    """`path` is a writable folder, or a folder that can be created (its nearest existing ancestor is a
    writable folder). Nothing is created."""
    p = Path(path).expanduser().absolute()
    if _on_pseudo_fs(p):
        raise ConfigError(f"{key} {str(path)!r} lies on a system pseudo file system ({', '.join(PSEUDO_FS)}); "
                          "give a folder on a real disk")
    probe = p
    while not os.path.lexists(probe):
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == p else f"lies under the file {str(probe)!r}"
        raise ConfigError(f"{key} {str(path)!r} {what}; give a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == p else f" (its existing parent {str(probe)!r} is not)"
        raise ConfigError(f"{key} {str(path)!r} is not writable{where}; give a folder you can write to")


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file


def check_tracking_uri(uri: str) -> None:
    """The scheme is one MLflow can record a study in, and its target is usable (no network here: an
    http(s) server's health is `tracking.check_uri`'s job)."""
    key = f"tracking URI {uri!r}"
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise ConfigError(f"{key}: a sqlite URI has three slashes and a path: sqlite:///relative.db or "
                              "sqlite:////absolute/path.db")
        raw = uri[len("sqlite:///"):].split("?", 1)[0]
        if not raw or raw == ":memory:":
            raise ConfigError(f"{key}: give a database file, e.g. sqlite:///mlflow.db")
        path = Path(raw).expanduser().absolute()
        if _on_pseudo_fs(path):
            raise ConfigError(f"{key}: {str(path)!r} lies on a system pseudo file system; give a file on a real disk")
        if path.is_dir():
            raise ConfigError(f"{key}: {str(path)!r} is a directory; give a database file, e.g. {uri.rstrip('/')}/mlflow.db")
        if os.path.lexists(path):
            if not path.is_file():
                raise ConfigError(f"{key}: {str(path)!r} is not a regular file")
            if not os.access(path, os.R_OK | os.W_OK):
                raise ConfigError(f"{key}: {str(path)!r} is not writable")
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
            if head and head != SQLITE_MAGIC:  # an empty file is an empty database
                raise ConfigError(f"{key}: {str(path)!r} is not an SQLite database (its first bytes are not "
                                  "'SQLite format 3'); give another file, or move this one away")
            return
        folder = path.parent
        if not folder.is_dir():
            raise ConfigError(f"{key}: folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: folder {str(folder)!r} is not writable")
        return
    if scheme in ("http", "https"):
        if not urlsplit(uri).hostname:
            raise ConfigError(f"{key}: no host; expected {scheme}://host:port")
        return
    dialect, _, driver = scheme.partition("+")
    if dialect == "postgres":
        dialect = "postgresql"
    if dialect in DB_DRIVERS:
        modules = (DRIVER_MODULES.get(driver, driver),) if driver else DB_DRIVERS[dialect]
        if not any(_importable(m) for m in modules):
            raise ConfigError(f"{key}: the {dialect} store needs a database driver ({' or '.join(modules)}), "
                              "which is not installed; install it or use sqlite:///mlflow.db")
        return
    if not scheme or scheme == "file":
        raise ConfigError(f"{key}: use sqlite:///path.db or an http(s) MLflow server (mlflow 3 refuses the file store)")
    raise ConfigError(f"{key}: scheme {scheme!r} is not supported; use {SUPPORTED_URIS}")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_teacher_files(ref: str) -> None:
    """A local teacher folder with a config.json also holds weights (not only a config)."""
    if ref.startswith("tiny:") or ref == "minilm" or "://" in ref:
        return  # packaged models (tunekd.teacher.resolve_model)
    p = Path(ref).expanduser()
    if p.is_dir() and (p / "config.json").is_file() and not any((p / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"teacher.model {ref!r} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])})")


def check_resources(study, *, num_cpus: int | None = None, address: str | None = None) -> None:
    """`--num-cpus` is positive; on a local Ray (no address) one trial fits the machine."""
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"--num-cpus must be >= 1, got {num_cpus}")
    if address:
        return  # a cluster's resources are checked once connected (run.check_resources)
    res = study.tune.resources
    if num_cpus is not None:
        cpus, source = num_cpus, f"--num-cpus gives Ray {num_cpus} CPUs"
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        source = f"this machine has {cpus} CPUs"
    if res.cpu > cpus:
        raise ConfigError(f"tune.resources.cpu is {res.cpu:g} (per trial) but {source}; allowed: up to {cpus}")
    if res.gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
        if res.gpu > gpus:
            raise ConfigError(f"tune.resources.gpu is {res.gpu:g} but this machine has {gpus} GPUs; "
                              f"allowed: up to {gpus}")


def check_outputs(study, *, num_cpus: int | None = None, address: str | None = None,
                  resources: bool = True, probe: bool = True) -> None:
    """Everything about where a study writes and what it runs on that can be checked without loading
    anything: storage and cache folders, the tracking URI, the teacher folder, local resources (unless
    `resources` is false: a --dry-run of a cluster study on a laptop runs nothing), object storage
    (unless `probe` is false: a --dry-run writes nothing there)."""
    from tunekd import storage

    if storage.is_remote(study.tune.storage_path):
        if probe:  # fine-tuned teachers live there too: teacher.cache_dir is not used
            storage.check_writable(study.tune.storage_path)
    else:
        check_writable_dir(study.tune.storage_path, "tune.storage_path")
        check_writable_dir(study.teacher.cache_dir, "teacher.cache_dir")
    check_tracking_uri(study.tracking.uri)
    check_teacher_files(study.teacher.model)
    if resources:
        check_resources(study, num_cpus=num_cpus, address=address)


def check_teacher_head(study, teacher_config, spec) -> None:
    """A teacher used as it is (`teacher.finetune` null) must already have the task's head: a checkpoint
    with a classification head of another size would otherwise get a new random head, silently."""
    archs = getattr(teacher_config, "architectures", None) or []
    if study.teacher.finetune is not None or spec.kind not in ("classification", "regression"):
        return
    if any(a.endswith("ForSequenceClassification") for a in archs) and teacher_config.num_labels != spec.num_labels:
        raise ConfigError(f"teacher.model {study.teacher.model!r} has a {teacher_config.num_labels}-output head but "
                          f"task {spec.name!r} needs {spec.num_labels}; with teacher.finetune null the teacher is used "
                          "as it is: set teacher.finetune, or give a teacher trained for this task")


# --- one trial ---------------------------------------------------------------------------------


def check_trial(trial, teacher_config, family) -> None:
    """Impossibilities of one trial study (`Study.trial(point)`) against the teacher: found here, not
    inside every trial."""
    if trial.train.precision == "fp16" and trial.tune.resources.gpu == 0:
        raise ConfigError("train.precision 'fp16' needs a GPU but tune.resources.gpu is 0; allowed on the CPU: "
                          "'fp32' or 'bf16'")
    s = trial.student
    config = family.student_config(teacher_config, s.layers, hidden_size=s.hidden_size,
                                   num_attention_heads=s.num_attention_heads,
                                   intermediate_size=s.intermediate_size)
    heads = getattr(config, "num_attention_heads", None)
    width = family.hidden_size(config)
    # T5 (d_kv) and configs with an explicit head_dim do not split the width among the heads
    if heads and getattr(config, "head_dim", None) is None and config.model_type != "t5" and width % heads:
        raise ConfigError(f"student width {width} (student.hidden_size) is not divisible by {heads} attention heads "
                          f"(student.num_attention_heads); allowed: a head count that divides the width")
    names = _module_names(family, trial.task, config)
    if s.lora is not None:
        _check_lora(s.lora, family, names)


def _check_lora(lora, family, names: dict[str, str]) -> None:
    adaptable = sorted(n for n, kind in names.items() if kind)
    if lora.target_modules:
        missing = [t for t in lora.target_modules if not names.get(t)]
        if missing:
            raise ConfigError(f"student.lora.target_modules {missing} are not linear or embedding modules of the "
                              f"{family.name} student; allowed: {', '.join(adaptable)}")
    elif not set(family.lora_targets) & set(adaptable):
        raise ConfigError(f"student.lora: the {family.name} family's default targets match no module of this "
                          f"student; give target_modules from: {', '.join(adaptable)}")


_MODULES: dict[tuple[str, str, str], dict[str, str]] = {}


def _module_names(family, task, config) -> dict[str, str]:
    """{last name component: the kind PEFT can adapt ('' if none)} of the student built on the meta
    device (no memory, no weights), once per distinct config; a config that cannot build a model is a
    ConfigError."""
    key = (family.name, task.model_dump_json(), config.to_json_string())
    if key not in _MODULES:
        _MODULES[key] = _build_names(family, task, config)
    return _MODULES[key]


def _build_names(family, task, config) -> dict[str, str]:
    import torch
    from transformers.pytorch_utils import Conv1D

    from tunekd.tasks import spec_for

    try:
        with torch.device("meta"):
            model = family.from_config(config, spec_for(task))
    except (ValueError, AssertionError, RuntimeError, TypeError) as exc:
        raise ConfigError(f"the student config cannot build a {family.name} model: {str(exc).splitlines()[0]}") from None
    kinds = ((torch.nn.Linear, "linear"), (Conv1D, "linear"), (torch.nn.Embedding, "embedding"),
             (torch.nn.Conv2d, "conv"))
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        kind = next((k for cls, k in kinds if isinstance(module, cls)), "")
        out[leaf] = out.get(leaf) or kind
    return out


# --- a trial group's memory (tune.group_by) ----------------------------------------------------------

GiB = 1024**3
_PARAMS: dict[tuple[str, str, str], int] = {}


def _param_count(family, task, config) -> int:
    """Parameters of the model `config` builds (on the meta device: no memory), once per distinct config."""
    import torch

    from tunekd.tasks import spec_for

    key = (family.name, task.model_dump_json(), config.to_json_string())
    if key not in _PARAMS:
        with torch.device("meta"):
            model = family.from_config(config, spec_for(task))
        _PARAMS[key] = sum(p.numel() for p in model.parameters())
    return _PARAMS[key]


def _layer_activations(batch: int, length: int, width: int, heads: int, inner: int) -> int:
    """Floats one transformer layer keeps for its backward pass: about ten width-sized tensors per token
    (attention projections, residuals, norms, dropout masks), two of the feed-forward's width, and three
    (scores, softmax, dropout) of the attention map per head."""
    return batch * length * (10 * width + 2 * inner) + 3 * batch * heads * length * length


def group_memory(trials: list, teacher_config, family) -> dict[str, int]:
    """Bytes a trial group (`tunekd.groups`) holds at its peak, estimated from the configs (fp32 throughout,
    so an upper estimate for bf16): the teacher's weights and the hidden states of one batch; each member's
    weights and AdamW's two moments (12 bytes a parameter, projections included); and the largest member's
    gradients (4 bytes a parameter) and activations (the members step one after another and free their
    gradients after their step, `distill.step_members`: one backward lives at a time). `trials`: the members'
    trial studies."""
    first = trials[0]
    batch, length = first.train.batch_size, first.task.max_length
    t_width, t_layers = family.hidden_size(teacher_config), family.num_layers(teacher_config)
    teacher = 4 * _param_count(family, first.task, teacher_config)
    outputs = 4 * batch * length * t_width * (t_layers + 1)
    students = activations = gradients = 0
    for trial in trials:
        s = trial.student
        config = family.student_config(teacher_config, s.layers, hidden_size=s.hidden_size,
                                       num_attention_heads=s.num_attention_heads,
                                       intermediate_size=s.intermediate_size)
        width = family.hidden_size(config)
        projections = 0 if width == t_width else (s.layers + 1) * (width * t_width + t_width)
        params = _param_count(family, trial.task, config) + projections
        students += 12 * params
        gradients = max(gradients, 4 * params)
        heads = getattr(config, "num_attention_heads", None) or 1
        inner = getattr(config, "intermediate_size", None) or 4 * width
        activations = max(activations, 4 * s.layers * _layer_activations(batch, length, width, heads, inner))
    return {"teacher": teacher + outputs, "students": students + gradients, "activations": activations,
            "total": teacher + outputs + students + gradients + activations}


def node_memory(study) -> tuple[int, str]:
    """(bytes, what) a trial of `study` may use on this machine: the GPU's memory (its share of it, by
    tune.resources.gpu) when the trials take a GPU, else the machine's RAM."""
    gpu = study.tune.resources.gpu
    if gpu > 0:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            return int(total * min(1.0, gpu)), f"{min(1.0, gpu):g} of a {total / GiB:.1f} GiB GPU"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, f"this machine's {total / GiB:.1f} GiB of RAM"


def check_group_memory(study, groups_of_trials: list[list], teacher_config, family,
                       available: tuple[int, str] | None = None) -> dict[str, int] | None:
    """Refuse, with the figures, a study whose largest trial group will not fit the memory a trial has
    (`node_memory`); returns that group's estimate (None without groups)."""
    if not study.tune.group_by or not groups_of_trials:
        return None
    worst = max((group_memory(g, teacher_config, family) | {"k": len(g)} for g in groups_of_trials),
                key=lambda e: e["total"])
    limit, what = available or node_memory(study)
    if worst["total"] > limit:
        raise ConfigError(
            f"tune.group_by: a group of {worst['k']} trials needs about {worst['total'] / GiB:.1f} GiB (teacher "
            f"{worst['teacher'] / GiB:.1f}, students with gradients and optimizer states "
            f"{worst['students'] / GiB:.1f}, activations {worst['activations'] / GiB:.1f}) but a trial has "
            f"{what}; group fewer dimensions, or lower train.batch_size")
    return worst
