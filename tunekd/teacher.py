"""Getting a fine-tuned teacher: load it, or fine-tune a base model once and cache it by content hash."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunekd import storage
from tunekd.errors import ConfigError
from tunekd.study import FinetuneConfig, Study, TrainConfig

MINILM = "minilm"
META = "tunekd_teacher.json"  # a fine-tuned teacher's record, written last


def resolve_model(ref: str) -> str:
    """A study's model reference → a hub id or a local folder. `minilm` is the offline MiniLM-L6;
    `tiny:<family>` a tiny random-initialised test fixture built offline (`tunekd.fixtures`)."""
    if ref.startswith("tiny:"):
        from tunekd.fixtures import tiny_path

        return tiny_path(ref[len("tiny:"):])
    if ref == MINILM:
        from tunekd.fixtures import minilm_path

        return minilm_path()
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"teacher.model {ref!r} is a folder without config.json; expected a transformers model")
        return str(path.resolve())
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ConfigError(f"teacher.model {ref!r} does not exist")
    return ref  # a hub id


def model_digest(path: str) -> str:
    """Content hash of a local model folder (config and weights); a hub id hashes as its name."""
    p = Path(path)
    h = hashlib.sha256()
    if not p.is_dir():
        h.update(f"hub:{path}".encode())
        return h.hexdigest()
    for f in sorted(p.rglob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".txt", ".model"):
            h.update(str(f.relative_to(p)).encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


@dataclass
class TeacherInfo:
    path: str  # folder of the fine-tuned teacher (or the given model)
    metrics: dict[str, float]
    cached: bool  # True when a cached fine-tuned teacher was reused


def finetune_key(base: str, task_digest: str, spec_name: str, finetune: dict, max_length: int) -> str:
    blob = json.dumps(
        {"model": model_digest(base), "task": spec_name, "data": task_digest, "finetune": finetune,
         "max_length": max_length}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def finetune_train_config(ft: FinetuneConfig, train: TrainConfig) -> TrainConfig:
    """The loop settings of the teacher's fine-tuning: the optimisation values of `teacher.finetune`;
    evaluation batch, clipping, precision and length buckets from the study's `train` section."""
    return TrainConfig(epochs=ft.epochs, lr=ft.lr, batch_size=ft.batch_size, weight_decay=ft.weight_decay,
                       warmup_ratio=ft.warmup_ratio, eval_batch_size=train.eval_batch_size,
                       max_grad_norm=train.max_grad_norm, precision=train.precision,
                       bucket_by_length=train.bucket_by_length)


def prepare_teacher(study: Study, family, spec, encoded: dict, base: str, tokenizer=None, *, log=print) -> TeacherInfo:
    """Fine-tune `base` on the task when `teacher.finetune` is set (once per content hash), else use it as is.
    Returns where the teacher is and its eval metrics."""
    from tunekd import distill
    from tunekd.device import device_for

    evals = {k: v for k, v in encoded.items() if k != "train"}
    ft = study.teacher.finetune
    if ft is None:
        model = family.load(base, spec, trust_remote_code=study.teacher.trust_remote_code)
        metrics = distill.evaluate(family, model.to(device_for()), spec, evals,
                                   batch_size=study.train.eval_batch_size, generation=study.task.generation)
        return TeacherInfo(path=base, metrics=metrics, cached=False)

    key = finetune_key(base, encoded["train"].digest() + "".join(v.digest() for v in evals.values()),
                       spec.name, ft.model_dump(), study.task.max_length)
    # on object storage the fine-tuned teacher lives under the storage path, and this node reads it into its
    # node cache (`tunekd.storage`); else in teacher.cache_dir
    remote = storage.is_remote(study.tune.storage_path)
    if remote:
        uri = storage.join(storage.resolve(study.tune.storage_path), "teachers", key)
        if storage.complete(uri):
            target, _ = storage.local_copy(uri, f"teachers/{key}")
            meta = json.loads((target / META).read_text())
            log(f"teacher: reusing fine-tuned teacher {uri} (this node's copy: {target})")
            return TeacherInfo(path=str(target), metrics=meta["metrics"], cached=True)
        root = storage.node_cache_root() / "teachers"
        target = root / key
    else:
        root = Path(study.teacher.cache_dir).expanduser().resolve() / "teachers"
        target = root / key
        if (target / META).is_file():
            meta = json.loads((target / META).read_text())
            log(f"teacher: reusing fine-tuned teacher {target}")
            return TeacherInfo(path=str(target), metrics=meta["metrics"], cached=True)

    log(f"teacher: fine-tuning {base} on {spec.name} ({ft.epochs} epochs, lr {ft.lr}); cached as "
        f"{uri if remote else target}")
    import torch

    torch.manual_seed(ft.seed)
    model = family.load(base, spec, trust_remote_code=study.teacher.trust_remote_code)
    train_cfg = finetune_train_config(ft, study.train)
    from tunekd.data import num_batches
    from tunekd.progress import bar

    steps = bar(ft.epochs * num_batches(encoded["train"], ft.batch_size), "teacher fine-tune", unit="step")
    try:
        history = distill.fit(distill.Distiller(family=family, student=model), spec, encoded["train"], evals,
                              train_cfg, epochs=ft.epochs, seed=ft.seed, progress=lambda m: log(f"teacher: {m}"),
                              generation=study.task.generation, on_step=lambda: steps.update(1))
    finally:
        steps.close()
    metrics = {k[len("eval/"):]: v for k, v in history[-1].items() if k.startswith("eval/")}
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META).write_text(json.dumps(
            {"base": base, "task": spec.name, "finetune": ft.model_dump(), "metrics": metrics}, indent=2))
        if remote:  # published (its completion record last), then kept as this node's copy
            storage.publish(tmp, uri)
            target = storage.adopt(tmp, f"teachers/{key}")
        else:
            try:
                os.rename(tmp, target)  # atomic: a half-written teacher is never reused
            except OSError:
                if not (target / META).is_file():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TeacherInfo(path=str(target), metrics=metrics, cached=False)


# --- is the teacher worth distilling from? ---------------------------------------------------------


@dataclass
class Sanity:
    """The teacher's primary metric against the best constant guess on the eval split."""

    metric: str
    value: float  # the teacher's score, percent
    baseline: float  # majority class (classification) / most frequent answer position (multiple choice), percent
    rows: int
    p_value: float  # one-sided exact binomial test, H0: accuracy = baseline
    ok: bool

    def message(self) -> str:
        return (f"teacher {self.metric} {self.value:.2f} is not clearly above the majority-class level "
                f"{self.baseline:.2f} on the {self.rows} eval rows (one-sided binomial p = {self.p_value:.3g}); "
                "every student would be distilled from noise: check teacher.finetune (epochs, lr) and "
                "task.max_train_samples")

    def tags(self) -> dict[str, str]:
        return {"tunekd.teacher.sanity": "ok" if self.ok else "at_chance",
                "tunekd.teacher.baseline": f"{self.baseline:.2f}", "tunekd.teacher.baseline_rows": str(self.rows)}


SANITY_ALPHA = 0.01


def teacher_sanity(spec, encoded: dict, metrics: dict[str, float], *, alpha: float = SANITY_ALPHA) -> Sanity | None:
    """Is the teacher's primary metric clearly (one-sided exact binomial test at level `alpha`) above
    the majority-class level of the split it is computed on? None when the metric has no chance level
    (generation: BLEU) or is not an accuracy."""
    import numpy as np
    from scipy import stats

    name = spec.primary_metric
    if spec.kind == "generation" or name != "accuracy" or name not in metrics:
        return None
    split = spec.eval_splits[0]
    data = encoded.get(split)
    if data is None:  # local data without the canonical split name: the first non-train split
        data = next((v for k, v in encoded.items() if k != "train"), None)
    if data is None or "labels" not in data.arrays or not len(data.arrays["labels"]):
        return None
    labels = np.asarray(data.arrays["labels"]).reshape(-1)
    n = int(labels.size)
    baseline = 100.0 * np.bincount(labels).max() / n
    value = float(metrics[name])
    k = int(round(value / 100.0 * n))
    p = float(stats.binomtest(k, n, baseline / 100.0, alternative="greater").pvalue)
    return Sanity(metric=name, value=value, baseline=float(baseline), rows=n, p_value=p, ok=p < alpha)


def check_teacher(study, spec, encoded: dict, metrics: dict[str, float], *, log=print) -> dict[str, str]:
    """`teacher_sanity` under the study's `teacher.sanity` (warn | error | off): logs a warning, or
    raises ConfigError, when the teacher is at chance. Returns tags for the parent run."""
    mode = getattr(study.teacher, "sanity", "warn")
    if mode == "off":
        return {}
    s = teacher_sanity(spec, encoded, metrics)
    if s is None:
        return {"tunekd.teacher.sanity": "n/a"}
    if not s.ok:
        if mode == "error":
            raise ConfigError(s.message() + " (teacher.sanity: error; set it to warn to go on)")
        log("WARNING: " + s.message())
    else:
        log(f"teacher: {s.metric} {s.value:.2f} vs majority class {s.baseline:.2f} (p = {s.p_value:.2g}): ok")
    return s.tags()
