"""The study file: a typed, validated schema, `--set` overrides and the search space.

A study file is UTF-8 YAML read with a safe loader only (`StudyLoader`: `yaml.SafeLoader` that also
refuses duplicate keys and deep nesting); nothing in it is executed or imported. Types are strict (no
boolean or quoted string where a number or a boolean is expected), floats finite, sizes bounded.
Every problem is reported as one `ConfigError` line naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import math
import re
import stat
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from tunekd import losses, mapping
from tunekd.errors import ConfigError, not_utf8, unknown

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")

# Strict scalars: `epochs: true`, `layers: "2"`, `trust_remote_code: "yes"` are refused, not coerced.
# (Floats accept integers; every float must be finite, see `_Section.model_config`.)
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]

# Bounds that keep a typo from becoming a month-long run or a MemoryError.
MAX_SEED = 2**32 - 1  # numpy's seed range; torch and Python accept it too
MAX_EPOCHS = 1000
MAX_ROWS = 10**9  # caps on rows kept from a data set
MAX_SYNTHETIC_ROWS = 1_000_000
MAX_BATCH = 65536
MAX_TRIALS = 100_000  # grid points x num_samples
MAX_STUDY_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_INT_DIGITS = 1000  # longer digit strings are no value a study needs (Python's own limit is 4300)
MAX_NAME = 64
Seed = Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)]
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


class SyntheticSpec(_Section):
    train_size: Int = Field(2000, ge=8, le=MAX_SYNTHETIC_ROWS)
    eval_size: Int = Field(500, ge=8, le=MAX_SYNTHETIC_ROWS)
    max_words: Int = Field(12, ge=4, le=512)


class GenerationConfig(_Section):
    """How generation tasks are evaluated: greedy (num_beams 1) or beam search, on the first
    `eval_samples` rows of each eval split (null: all) so that ASHA's rungs stay cheap."""

    num_beams: Int = Field(1, ge=1, le=64)
    max_new_tokens: Int = Field(64, ge=1, le=8192)
    eval_samples: Int | None = Field(None, ge=1, le=MAX_ROWS)


class DataSpec(_Section):
    """Where a declared task's data come from: arguments to `datasets.load_dataset` (a hub id and
    config, or a packaged loader such as csv / json / parquet with `data_files`). Nothing that runs
    code (no loading scripts, no trust_remote_code)."""

    path: str = Field(min_length=1)
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    revision: str | None = None
    # further options of the loader, plain values only, e.g. {sep: "\t", quoting: 3} for GLUE-style TSVs
    options: dict[str, str | int | float | bool] | None = None

    @field_validator("options")
    @classmethod
    def _options(cls, v):
        reserved = {"path", "name", "data_dir", "data_files", "revision", "split", "trust_remote_code", "token",
                    "download_mode", "cache_dir", "verification_mode", "storage_options", "streaming", "num_proc",
                    "keep_in_memory", "download_config", "features"}
        bad = sorted(set(v or ()) & reserved)
        if bad:
            raise ConfigError(f"task.data.options: {bad[0]!r} cannot be set here (options are the loader's own "
                              "settings, e.g. sep, quoting, field)")
        return v


TASK_KINDS = ("classification", "regression", "multiple_choice", "generation")
# keys that only a declared task (task.kind set) takes
_DECLARATION_KEYS = ("text_fields", "labels", "metrics", "eval_splits")


class TaskConfig(_Section):
    """A built-in task (`name`), or a task declared here (`kind`, `data`, `text_fields`, ...)."""

    name: str | None = None
    kind: Literal[TASK_KINDS] | None = None
    data: DataSpec | None = None  # declared: required; built-in GLUE task: a copy of its hub layout
    text_fields: list[str] | None = None
    label_field: str = "label"
    labels: list[str | int] | None = None
    metrics: list[str] | None = None
    eval_splits: list[str] | None = None
    train_split: str = "train"
    data_dir: str | None = None
    max_train_samples: Int | None = Field(None, ge=1, le=MAX_ROWS)
    max_eval_samples: Int | None = Field(None, ge=1, le=MAX_ROWS)
    max_length: Int = Field(128, ge=8, le=131072)
    synthetic: SyntheticSpec = SyntheticSpec()
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def _declaration(self):
        from tunekd import metrics as metric_registry
        from tunekd.tasks import TASKS

        if self.kind is None:  # a built-in task
            if self.name is None:
                raise ConfigError("task: give a built-in task (task.name) or declare one (task.kind, task.data, "
                                  "task.text_fields, ...)")
            if self.name not in TASKS:
                raise ConfigError(f"task.name: {unknown('task', self.name, TASKS)}")
            given = [k for k in _DECLARATION_KEYS if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"task.{given[0]}: only a declared task (task.kind set) takes it; built-in task "
                                  f"{self.name!r} has its own")
            return self
        if self.name in TASKS:
            raise ConfigError(f"task.name {self.name!r} is a built-in task; name a declared task otherwise "
                              "(or drop task.kind to use the built-in)")
        if self.data is None:
            raise ConfigError("task.data: a declared task needs it (datasets.load_dataset arguments, e.g. "
                              "{path: csv, data_files: {train: train.csv, validation: dev.csv}})")
        if self.data_dir is not None:
            raise ConfigError("task.data_dir: a declared task reads its files through task.data (data_files)")
        if not self.text_fields:
            raise ConfigError(f"task.text_fields: a declared {self.kind} task needs its text column(s)")
        for name in self.metrics or ():
            metric = metric_registry.METRICS.get(name)
            if metric is None:
                raise ConfigError(f"task.metrics: {unknown('metric', name, metric_registry.METRICS)}")
            if self.kind not in metric.kinds:
                fits = [m for m, v in metric_registry.METRICS.items() if self.kind in v.kinds]
                raise ConfigError(f"task.metrics: {name!r} does not apply to a {self.kind} task; "
                                  f"{self.kind} metrics: {', '.join(fits)}")
        if self.metrics is not None and not self.metrics:
            raise ConfigError("task.metrics: give at least one metric (the first is the primary one)")
        if self.eval_splits is not None and not self.eval_splits:
            raise ConfigError("task.eval_splits: give at least one eval split")
        if self.labels is not None:
            if self.kind in ("regression", "generation"):
                raise ConfigError(f"task.labels: a {self.kind} task has no label list")
            names = [str(x) for x in self.labels]
            if len(set(names)) != len(names) or len(names) < 2:
                raise ConfigError(f"task.labels: give at least two distinct labels, got {self.labels}")
        return self


class FinetuneConfig(_Section):
    epochs: Int = Field(3, ge=1, le=MAX_EPOCHS)
    lr: Float = Field(5e-5, gt=0)
    batch_size: Int = Field(32, ge=1, le=MAX_BATCH)
    weight_decay: Float = Field(0.01, ge=0)
    warmup_ratio: Float = Field(0.1, ge=0, le=1)
    seed: Seed = 0


class TeacherConfig(_Section):
    model: str
    finetune: FinetuneConfig | None = None
    cache_dir: str = ".tunekd_cache"
    cache_budget_gb: Float = Field(2.0, ge=0)  # teacher-output cache: full, logits-only or off (0) by size
    cache_dtype: Literal["fp16", "bf16"] = "fp16"
    trust_remote_code: Bool = False
    # a teacher not clearly above the majority class on the eval split: warn (and tag the parent run),
    # error (stop before any trial), or off
    sanity: Literal["warn", "error", "off"] = "warn"

    @field_validator("sanity", mode="before")
    @classmethod
    def _sanity(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false


class LoraConfig(_Section):
    """Train low-rank adapters (PEFT LoRA) instead of the student's weights: for large copy-initialised
    students (the paper's Qwen3 runs). `target_modules` null: the family's default projections."""

    rank: Int = Field(8, ge=1, le=4096)
    alpha: Float = Field(16.0, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1)


class StudentConfig(_Section):
    layers: Int = Field(3, ge=1, le=1024)
    init: Literal["random", "copy"] = "copy"
    copy_layers: str | list[Int] = "forward"
    hidden_size: Int | None = Field(None, ge=8, le=65536)
    num_attention_heads: Int | None = Field(None, ge=1, le=1024)
    intermediate_size: Int | None = Field(None, ge=8, le=262144)
    lora: LoraConfig | None = None  # null: every student weight trains
    # the paper's `--freeze_embeds` (BART, T5): token (and learned position) embeddings do not train
    freeze_embeddings: bool = False

    @field_validator("copy_layers")
    @classmethod
    def _copy_layers(cls, v):
        if isinstance(v, str) and v not in ("forward", "spread"):
            raise unknown("copy_layers", v, ("forward", "spread"))
        if isinstance(v, list):
            if not v:
                raise ValueError("an explicit list needs one teacher layer index per student layer, got []")
            if any(b <= a for a, b in zip(v, v[1:])):
                raise ValueError(f"an explicit list must be strictly increasing teacher layer indices "
                                 f"(no repeats), got {v}")
        return v

    @model_validator(mode="after")
    def _lora_needs_copy(self):
        if self.lora is not None and self.init != "copy":
            raise ValueError("lora adapts a copy-initialised student; with init 'random' its frozen "
                             "weights would be random: use init 'copy' or lora null")
        return self


class DistillConfig(_Section):
    strategy: str | list[tuple[Int, Int]] = "forward"
    match_embeddings: Bool | None = None  # None: the model family's default
    lambda_hid: Float = Field(3.0, ge=0)
    alpha_ce: Float = Field(1.0, ge=0)
    alpha_kl: Float = Field(1.0, ge=0)
    temperature: Float = Field(1.0, gt=0)
    hidden_loss: Literal[losses.HIDDEN_LOSSES] = "mse"
    reduction: Literal[losses.REDUCTIONS] = "element_mean"
    hidden_normalize: Literal[losses.NORMALIZE] = "none"
    aggregate: Literal[losses.AGGREGATE] = "mean"
    # token-level KL over the trained target tokens, or every position of the sequence (causal LMs:
    # the context too, the paper's Qwen3 code); no effect on sequence-level (classification) logits
    kl_positions: Literal[losses.KL_POSITIONS] = "targets"
    # strategy `random`: π among permutations that are neither forward nor reverse (nontrivial,
    # needs >= 3 student layers) or the paper's unrestricted draw (any)
    random_draw: Literal[mapping.RANDOM_DRAWS] = "nontrivial"
    map_seed: int | None = None  # seed of the `random` map; null: the trial's seed

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v):
        if isinstance(v, str) and v not in mapping.STRATEGIES:
            raise unknown("strategy", v, mapping.STRATEGIES)
        if isinstance(v, list) and not v:
            raise ValueError("an explicit layer map needs at least one [student, teacher] pair; "
                             "for no hidden-state supervision use strategy 'none'")
        return v

    @model_validator(mode="after")
    def _loss_options(self):
        if self.hidden_loss == "cosine" and self.reduction == "token_sum_padded":
            raise ValueError("distill.reduction 'token_sum_padded' sums squared errors: it needs "
                             "hidden_loss 'mse', not 'cosine'")
        return self


class TrainConfig(_Section):
    epochs: Int = Field(3, ge=1, le=MAX_EPOCHS)
    batch_size: Int = Field(32, ge=1, le=MAX_BATCH)
    eval_batch_size: Int = Field(128, ge=1, le=MAX_BATCH)
    lr: Float = Field(5e-5, gt=0)
    weight_decay: Float = Field(0.01, ge=0)
    warmup_ratio: Float = Field(0.1, ge=0, le=1)
    max_grad_norm: Float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    bucket_by_length: Bool = True  # batches from length-sorted buckets (less padding)
    save_model: Bool = False  # log each trial's final student as an MLflow artifact `student/` (transformers format)


class AshaConfig(_Section):
    grace_period: Int = Field(1, ge=1, le=MAX_EPOCHS)
    reduction_factor: Float = Field(2, gt=1, le=1000)


class ResourcesConfig(_Section):
    cpu: Float = Field(1, gt=0, le=4096)
    gpu: Float = Field(0, ge=0, le=1024)


class SeedsConfig(_Section):
    """Adaptive seeds (`tune.seeds`): a sequential design (tunekd.stats). Every cell runs `min` seeds, then one
    more seed per round for each level/cell pair of the `compare` dimension whose verdict against `reference`
    is still open, up to `max` (fixed up front); α is spent over the looks (`spending`)."""

    min: Int = Field(3, ge=2, le=100)
    max: Int = Field(10, ge=2, le=100)
    margin: Float = Field(1.0, gt=0)
    compare: str = Field("distill.strategy", min_length=1)  # the searched dimension whose levels are compared
    reference: str | Float = "forward"  # a level of `compare` (a number for a numeric dimension, e.g. λ 3)
    alpha: Float = Field(0.05, gt=0, lt=0.5)
    spending: Literal["obrien_fleming", "pocock"] = "obrien_fleming"

    @model_validator(mode="after")
    def _range(self):
        if self.min > self.max:
            raise ValueError(f"min {self.min} is more than max {self.max}")
        return self


class TuneConfig(_Section):
    scheduler: Literal["asha", "fifo"] = "asha"
    asha: AshaConfig = AshaConfig()
    searcher: Literal["grid", "random", "optuna"] = "grid"
    num_samples: Int = Field(1, ge=1, le=MAX_TRIALS)
    max_concurrent_trials: Int | None = Field(None, ge=1, le=MAX_TRIALS)
    resources: ResourcesConfig = ResourcesConfig()
    reuse_actors: Bool = True
    # a local folder, or object storage Ray Tune accepts (s3://bucket/prefix, gs://bucket/prefix; `tunekd.storage`)
    storage_path: str = Field("ray_results", min_length=1)
    max_failures: Int = Field(0, ge=0, le=1000)
    # checkpoints: a running trial keeps its latest one (student, optimizer, RNG, epoch), written every
    # `checkpoint_every` epochs and after its last; a finished trial keeps its weights only if it is among
    # the best `keep_students` finished trials (by the task metric), and no optimizer state
    checkpoint_every: Int = Field(1, ge=1, le=MAX_EPOCHS)
    keep_students: Int = Field(1, ge=0, le=MAX_TRIALS)
    # Ray's per-trial JSON result files (result.json, params.json, params.pkl: a few kB per trial), read by
    # `ray.tune.ExperimentAnalysis` and `Tuner.restore(...).get_results()`; false: none (Tune resumes without them)
    ray_loggers: Bool = True
    seeds: SeedsConfig | None = None  # adaptive seeds (tunekd.seeds); None: the seeds the search gives
    # trial groups (tunekd.groups): the trials differing only in these grid dimensions run as one Ray trial
    group_by: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("storage_path")
    @classmethod
    def _storage_uri(cls, v):
        from tunekd.storage import check_uri

        check_uri(v, key="")
        return v


class TrackingConfig(_Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = Field(None, min_length=1, max_length=256)  # default: the study name


_NONE = object()


# sections a search value's own settings (`SearchDim.per_value`) may set: what one trial trains, not what
# the study shares (task, teacher) or how it runs (tune, tracking)
PER_VALUE_SECTIONS = ("student", "distill", "train")


class SearchDim(_Section):
    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[Float, Float] | None = None
    loguniform: tuple[Float, Float] | None = None
    randint: tuple[Int, Int] | None = None
    # settings that go with a value of a grid/choice dimension, e.g. {random: {train.lr: 1.0e-3}}: every trial
    # at that value has them (a learning rate per init, as the paper's random-init students had their own)
    per_value: dict[Any, dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in SEARCH_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SEARCH_KINDS)}")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind} needs at least one value")
        if kind == "grid":  # a repeated value would run the same trials twice
            repeated = next((v for i, v in enumerate(value) if v in value[:i]), _NONE)
            if repeated is not _NONE:
                raise ValueError(f"grid value {repeated!r} is given twice (a grid runs each value once; "
                                 "for repeats vary seed or tune.num_samples)")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs [low, high] with low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        if self.per_value is not None:
            if kind not in ("grid", "choice"):
                raise ValueError(f"per_value needs a grid or choice dimension, got {kind!r}")
            for key in self.per_value:
                if _value_of(key, value) is _NONE:
                    raise ValueError(f"per_value: {key!r} is not one of its values {list(value)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SEARCH_KINDS if getattr(self, k) is not None)

    @property
    def value(self):
        return getattr(self, self.kind)

    def sample_points(self) -> list[Any]:
        """Values that stand for this dimension when checking it: all grid/choice values, the bounds otherwise."""
        return list(self.value)

    def settings_for(self, value: Any) -> dict[str, Any]:
        """`per_value`'s dotted settings for one value of the dimension ({} when it has none)."""
        for key, settings in (self.per_value or {}).items():
            if _value_of(key, [value]) is not _NONE:
                return dict(settings)
        return {}


def _value_of(key: Any, values: list[Any]) -> Any:
    """The value of `values` that a `per_value` key names: equal, or equal as text (a study that travelled
    as JSON has text keys: 3 -> "3"); _NONE if none does."""
    for v in values:
        if key == v or str(key) == str(v):
            return v
    return _NONE


class Study(_Section):
    name: str
    seed: Seed = 0
    task: TaskConfig
    teacher: TeacherConfig
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    search: dict[str, SearchDim] = {}
    tune: TuneConfig = TuneConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        # the name becomes a folder (ray_results/<name>-<time>), a run name and an experiment name:
        # only what every file system and store accepts, no path separators, no '..'
        if not (NAME_PATTERN.fullmatch(v) and ".." not in v and len(v) <= MAX_NAME):
            raise ValueError(f"{v[:80]!r}{'...' if len(v) > 80 else ''} is not allowed; use 1-{MAX_NAME} letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit, without '..'")
        return v

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def trial(self, overrides: dict[str, Any]) -> "Study":
        """The study config of one trial: this study with the trial's dotted overrides applied."""
        raw = self.model_dump(mode="python")
        for key, value in {**self.linked_settings(overrides), **overrides}.items():
            set_dotted(raw, key, value)
        raw["search"] = {}
        return Study.model_validate(raw)

    def linked_settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The `per_value` settings that go with a trial's search values (dotted key -> value)."""
        out: dict[str, Any] = {}
        for path, dim in self.search.items():
            if dim.per_value and path in overrides:
                out.update(dim.settings_for(overrides[path]))
        return out


# --- dotted paths -------------------------------------------------------------------------------


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def flatten(raw: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}`; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _known_paths() -> list[str]:
    """Every dotted path a search dimension may name (the leaves of the schema, minus search/tune/tracking)."""
    paths: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for fname, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{fname}.")
            elif fname in ("finetune",):  # optional section
                walk(FinetuneConfig, f"{prefix}{fname}.")
            elif fname in ("lora",):  # optional section
                walk(LoraConfig, f"{prefix}{fname}.")
            else:
                paths.append(f"{prefix}{fname}")

    walk(Study, "")
    return [p for p in paths if p.split(".")[0] not in ("search", "tune", "tracking", "name")]


SEARCHABLE = tuple(_known_paths())


# --- loading and errors -------------------------------------------------------------------------


def _is_union_label(part) -> bool:
    """pydantic names the member of a union in an error's location (`str`, `list[tuple[int,int]]`)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _first_error(exc: ValidationError) -> dict:
    """The error to report: the most specific one (a union reports one error per member; the member
    the value got furthest into names the real problem, e.g. `distill.strategy.0.1` for `[[1, true]]`)."""
    errors = exc.errors()
    return max(errors, key=lambda e: len([p for p in e["loc"] if not _is_union_label(p)]))


def _format_error(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_label(p))
    kind = err["type"]
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind == "value_error":  # our own validators' messages say what they got
        return f"{loc}: {msg}"
    if kind == "extra_forbidden":
        parent, _, key = loc.rpartition(".")
        allowed = _allowed_keys(err["loc"][:-1])
        base = f"unknown key {key!r}" + (f" in {parent}" if parent else "")
        e = unknown("key", key, allowed)
        suggestion = str(e).partition(" (did you mean")[2]
        return f"{base}; allowed: {', '.join(allowed)}" + (f" (did you mean{suggestion}" if suggestion else "")
    if kind == "value_error" and isinstance(err.get("input"), dict) and isinstance(err.get("ctx", {}).get("error"), ConfigError):
        return msg  # a section's own check: the message names its keys
    if kind == "missing":
        return f"{loc}: required key is missing"
    if kind == "literal_error":
        return f"{loc}: {err['input']!r} is not allowed; {msg.replace('Input should be', 'allowed:')}"
    return f"{loc}: {msg} (got {err.get('input')!r})"


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Study
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        inner = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif len(inner) == 1:  # an optional section (X | None)
            model = inner[0]
        elif str(part) == "finetune":
            model = FinetuneConfig
        elif str(part) == "search":
            return list(SEARCH_KINDS)
        else:
            return []
    return list(model.model_fields)


def validate(raw: Any, source: str = "study") -> Study:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a study file must be a YAML mapping, got {type(raw).__name__}")
    try:
        study = Study.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_error(_first_error(exc))}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _check_search(study, raw, source)
    _check_schedule(study, source)
    _check_seeds(study, source)
    _check_groups(study, source)
    return study


def max_epochs(study: Study) -> int:
    """The most epochs any trial of the study runs (ASHA's max_t)."""
    dim = study.search.get("train.epochs")
    return int(max(dim.sample_points())) if dim else study.train.epochs


def _check_schedule(study: Study, source: str) -> None:
    n = grid_size(study) * study.tune.num_samples
    if n > MAX_TRIALS:
        raise ConfigError(f"{source}: the study has {n} trials (grid points x tune.num_samples); at most {MAX_TRIALS}")
    if study.tune.scheduler == "asha" and study.tune.asha.grace_period > max_epochs(study):
        raise ConfigError(f"{source}: tune.asha.grace_period {study.tune.asha.grace_period} is more than the "
                          f"{max_epochs(study)} epochs a trial runs (train.epochs); allowed: 1..{max_epochs(study)}")


def _check_seeds(study: Study, source: str) -> None:
    """`tune.seeds` needs a grid study over its `compare` dimension (with the reference among its values), run
    FIFO (the verdicts compare final epochs; ASHA would stop trials early), one sample, and no seed dimension."""
    cfg = study.tune.seeds
    if cfg is None:
        return
    where = f"{source}: tune.seeds"
    dim = study.search.get(cfg.compare)
    if dim is None or dim.kind != "grid":
        raise ConfigError(f"{where}.compare {cfg.compare!r}: it needs a search.{cfg.compare} grid "
                          f"(searched: {', '.join(study.search) or 'nothing'})")
    values = list(dim.grid)

    def same(a, b) -> bool:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return float(a) == float(b)
        return str(a) == str(b)

    if not any(same(cfg.reference, v) for v in values):
        raise ConfigError(f"{where}.reference {cfg.reference!r} is not one of the searched values of "
                          f"{cfg.compare} ({', '.join(map(str, values))})")
    if len(values) < 2:
        raise ConfigError(f"{where} needs at least 2 values in search.{cfg.compare}")
    if "seed" in study.search:
        raise ConfigError(f"{where} chooses the seeds itself: remove search.seed")
    if study.tune.searcher != "grid":
        raise ConfigError(f"{where} needs tune.searcher 'grid', got {study.tune.searcher!r}")
    if study.tune.num_samples != 1:
        raise ConfigError(f"{where} needs tune.num_samples 1, got {study.tune.num_samples}")
    if study.tune.scheduler != "fifo":
        raise ConfigError(f"{where} compares final epochs: it needs tune.scheduler 'fifo' (ASHA would stop "
                          f"trials early), got {study.tune.scheduler!r}")
    if study.seed + cfg.max - 1 > MAX_SEED:
        raise ConfigError(f"{where}: seeds study.seed..study.seed+max-1 exceed {MAX_SEED}")


# the dimensions a trial group may differ in: neither the teacher nor the stream of batches depends on them
GROUPABLE = ("distill.", "student.", "train.lr", "train.weight_decay", "train.warmup_ratio")


def _check_groups(study: Study, source: str) -> None:
    """`tune.group_by` names grid dimensions of the search (so not with optuna, which takes no grid) that change
    neither the teacher nor the batches, in a FIFO study (ASHA stops trials one by one)."""
    keys = study.tune.group_by
    if not keys:
        return
    where = f"{source}: tune.group_by"
    for key in keys:
        if key not in study.search or study.search[key].kind != "grid":
            grids = [k for k, d in study.search.items() if d.kind == "grid" and k.startswith(GROUPABLE)]
            raise ConfigError(f"{where}: {key!r} is not a grid dimension of the search; allowed: "
                              f"{', '.join(grids) or 'none (the search has no groupable grid dimension)'}")
        if not key.startswith(GROUPABLE):
            raise ConfigError(f"{where}: {key!r} changes the teacher or the batches, which a group shares; allowed: "
                              "distill.*, student.*, train.lr, train.weight_decay, train.warmup_ratio")
        for value, settings in (study.search[key].per_value or {}).items():
            for setting in settings:
                if not setting.startswith(GROUPABLE):
                    raise ConfigError(f"{where}: search.{key}.per_value.{value} sets {setting}, which changes the "
                                      "batches a group shares; group by another dimension, or drop that setting")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{where} names a dimension twice: {keys}")
    if study.tune.scheduler != "fifo":
        raise ConfigError(f"{where} needs tune.scheduler 'fifo': ASHA stops trials one by one, so it keeps one trial "
                          "per configuration")


def _check_search(study: Study, raw: dict, source: str) -> None:
    for path, dim in study.search.items():
        if path != "seed" and path not in SEARCHABLE:
            e = unknown("search dimension", path, SEARCHABLE)
            raise ConfigError(f"{source}: search: {e}")
        if study.tune.searcher == "optuna" and dim.kind == "grid":
            raise ConfigError(
                f"{source}: search.{path}: 'grid' needs searcher 'grid' or 'random'; with optuna use 'choice'"
            )
        if study.tune.searcher == "grid" and dim.kind != "grid":
            raise ConfigError(
                f"{source}: search.{path}: searcher 'grid' takes only grid dimensions, got {dim.kind!r}; "
                "use searcher 'random' or 'optuna'"
            )
        for key, settings in (dim.per_value or {}).items():
            for setting in settings:
                where = f"{source}: search.{path}.per_value.{key}.{setting}"
                if setting.split(".")[0] not in PER_VALUE_SECTIONS or setting not in SEARCHABLE:
                    raise ConfigError(f"{where}: a value's own setting must be a key of "
                                      f"{', '.join(PER_VALUE_SECTIONS)} (what one trial trains)")
                if setting in study.search:
                    raise ConfigError(f"{where}: it is searched itself (search.{setting}); set it in one place "
                                      f"(e.g. --set search.{path}.per_value=null)")
        for point in dim.sample_points():
            trial = copy.deepcopy(raw)
            trial["search"] = {}
            for setting, value in dim.settings_for(point).items():
                set_dotted(trial, setting, value)
            set_dotted(trial, path, point)
            try:
                Study.model_validate(trial)
            except ValidationError as exc:
                raise ConfigError(f"{source}: search.{path}: value {point!r}: {_format_error(_first_error(exc))}") from None
            except ConfigError as exc:
                raise ConfigError(f"{source}: search.{path}: value {point!r}: {exc}") from None


class StudyYAMLError(yaml.MarkedYAMLError):
    """A YAML document that parses but is refused: a duplicate key or too deep a nesting."""


class StudyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate mapping keys (YAML says they are an error; PyYAML keeps
    the last) and nesting deeper than MAX_YAML_DEPTH (which would exhaust the recursion limit)."""

    _depth = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_YAML_DEPTH:
            raise StudyYAMLError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                 self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` may be overridden by the keys next to it
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if dup:
                    raise StudyYAMLError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader, node):
    """An int of at most MAX_INT_DIGITS digits (Python refuses to convert longer digit strings, with a
    traceback)."""
    digits = sum(c.isdigit() for c in node.value)
    if digits > MAX_INT_DIGITS:
        raise StudyYAMLError(None, None, f"an integer of {digits} digits (at most {MAX_INT_DIGITS})", node.start_mark)
    return loader.construct_yaml_int(node)


StudyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)

# YAML 1.2 floats without a dot (`1e-4`, `5E3`): PyYAML (YAML 1.1) reads them as strings, which the
# strict float fields would refuse.
StudyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str):
    """`yaml.load` with `StudyLoader` (safe: plain data only)."""
    return yaml.load(text, Loader=StudyLoader)  # noqa: S506 - StudyLoader is a SafeLoader


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value")
    try:
        parsed = load_yaml(value) if value != "" else ""
    except StudyYAMLError as exc:
        raise ConfigError(f"--set {text[:80]!r}: {exc.problem}") from None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("search."):
            dim = key[len("search."):]
            search = raw.setdefault("search", {}) or {}
            raw["search"] = search
            head, _, last = dim.rpartition(".")
            if last in SEARCH_KINDS and head:  # a new range or list of values: the dimension is replaced
                search[head] = {last: value}
            elif last == "per_value" and head in search and isinstance(search[head], dict):
                search[head] = {**search[head], "per_value": value}  # the dimension's own settings (null: none)
            elif value is None:
                if dim not in search:
                    hint = str(unknown("", dim, list(search))).partition(" (did you mean")[2]
                    raise ConfigError(f"--set {text}: the study has no search dimension {dim!r} to remove; it "
                                      f"searches: {', '.join(search) or 'nothing'}"
                                      + (f" (did you mean{hint}" if hint else ""))
                search.pop(dim)
            else:
                search[dim] = value
        else:
            set_dotted(raw, key, value)
    return raw


def read_study_text(path: str | Path) -> str:
    """The text of a study file: a regular file of at most MAX_STUDY_BYTES of UTF-8."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"study file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"study file {str(path)!r} cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"study file {str(path)!r} is a directory; give a YAML file")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"study file {str(path)!r} is not a regular file (a FIFO, socket or device); "
                          "give a YAML file")
    if st.st_size > MAX_STUDY_BYTES:
        raise ConfigError(f"study file {str(path)!r} is {st.st_size} bytes; at most {MAX_STUDY_BYTES}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"study file {str(path)!r} cannot be read ({exc.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, data) from None


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    path = Path(path)
    text = read_study_text(path)
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
    return validate(raw, str(path))


# --- search space -------------------------------------------------------------------------------


def grid_size(study: Study) -> int:
    return math.prod(len(d.grid) for d in study.search.values() if d.kind == "grid")
