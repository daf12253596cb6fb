"""The study file: a typed, validated schema, `--set` overrides and the search space.

A study file is YAML read with `yaml.safe_load` only; nothing in it is executed or imported.
Every problem is reported as one `ConfigError` line naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunekd import losses, mapping
from tunekd.errors import ConfigError, unknown

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class SyntheticSpec(_Section):
    train_size: int = Field(2000, ge=8)
    eval_size: int = Field(500, ge=8)
    max_words: int = Field(12, ge=4)


class GenerationConfig(_Section):
    """How generation tasks are evaluated: greedy (num_beams 1) or beam search, on the first
    `eval_samples` rows of each eval split (null: all) so that ASHA's rungs stay cheap."""

    num_beams: int = Field(1, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    eval_samples: int | None = Field(None, ge=1)


class TaskConfig(_Section):
    name: str
    data_dir: str | None = None
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    max_length: int = Field(128, ge=8)
    synthetic: SyntheticSpec = SyntheticSpec()
    generation: GenerationConfig = GenerationConfig()


class FinetuneConfig(_Section):
    epochs: int = Field(3, ge=1)
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    seed: int = 0


class TeacherConfig(_Section):
    model: str
    finetune: FinetuneConfig | None = None
    cache_dir: str = ".tunekd_cache"
    cache_budget_gb: float = Field(2.0, ge=0)  # teacher-output cache: full, logits-only or off (0) by size
    cache_dtype: Literal["fp16", "bf16"] = "fp16"
    trust_remote_code: bool = False
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

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None


class StudentConfig(_Section):
    layers: int = Field(3, ge=1)
    init: Literal["random", "copy"] = "copy"
    copy_layers: str | list[int] = "forward"
    hidden_size: int | None = Field(None, ge=8)
    num_attention_heads: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=8)
    lora: LoraConfig | None = None  # null: every student weight trains

    @field_validator("copy_layers")
    @classmethod
    def _copy_layers(cls, v):
        if isinstance(v, str) and v not in ("forward", "spread"):
            raise unknown("copy_layers", v, ("forward", "spread"))
        return v


class DistillConfig(_Section):
    strategy: str | list[tuple[int, int]] = "forward"
    match_embeddings: bool | None = None  # None: the model family's default
    lambda_hid: float = Field(3.0, ge=0)
    alpha_ce: float = Field(1.0, ge=0)
    alpha_kl: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    hidden_loss: Literal[losses.HIDDEN_LOSSES] = "mse"
    reduction: Literal[losses.REDUCTIONS] = "element_mean"
    hidden_normalize: Literal[losses.NORMALIZE] = "none"
    aggregate: Literal[losses.AGGREGATE] = "mean"

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v):
        if isinstance(v, str) and v not in mapping.STRATEGIES:
            raise unknown("strategy", v, mapping.STRATEGIES)
        return v


class TrainConfig(_Section):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    bucket_by_length: bool = True  # batches from length-sorted buckets (less padding)
    save_model: bool = False  # log each trial's final student as an MLflow artifact `student/` (transformers format)


class AshaConfig(_Section):
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)


class ResourcesConfig(_Section):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)


class TuneConfig(_Section):
    scheduler: Literal["asha", "fifo"] = "asha"
    asha: AshaConfig = AshaConfig()
    searcher: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    resources: ResourcesConfig = ResourcesConfig()
    reuse_actors: bool = True
    storage_path: str = "ray_results"
    max_failures: int = Field(0, ge=0)
    checkpoint_keep: int = Field(1, ge=1)


class TrackingConfig(_Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # default: the study name


class SearchDim(_Section):
    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in SEARCH_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SEARCH_KINDS)}")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs [low, high] with low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError("loguniform needs low > 0")
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


class Study(_Section):
    name: str = Field(min_length=1)
    seed: int = 0
    task: TaskConfig
    teacher: TeacherConfig
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    search: dict[str, SearchDim] = {}
    tune: TuneConfig = TuneConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def trial(self, overrides: dict[str, Any]) -> "Study":
        """The study config of one trial: this study with the trial's dotted overrides applied."""
        raw = self.model_dump(mode="python")
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        raw["search"] = {}
        return Study.model_validate(raw)


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


def _format_error(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in ("str", "list[tuple[int,int]]")))
    kind = err["type"]
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind == "extra_forbidden":
        parent, _, key = loc.rpartition(".")
        allowed = _allowed_keys(err["loc"][:-1])
        base = f"unknown key {key!r}" + (f" in {parent}" if parent else "")
        e = unknown("key", key, allowed)
        suggestion = str(e).partition(" (did you mean")[2]
        return f"{base}; allowed: {', '.join(allowed)}" + (f" (did you mean{suggestion}" if suggestion else "")
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
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
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
        raise ConfigError(f"{source}: {_format_error(exc.errors()[0])}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _check_search(study, raw, source)
    return study


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
        for point in dim.sample_points():
            trial = copy.deepcopy(raw)
            trial["search"] = {}
            set_dotted(trial, path, point)
            try:
                Study.model_validate(trial)
            except ValidationError as exc:
                raise ConfigError(f"{source}: search.{path}: value {point!r}: {_format_error(exc.errors()[0])}") from None
            except ConfigError as exc:
                raise ConfigError(f"{source}: search.{path}: value {point!r}: {exc}") from None


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
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
            if last in SEARCH_KINDS and head:
                search[head] = {last: value}
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


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
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
