"""Generation tasks: DART (RDF triples → text) and WMT16 English → Romanian, scored by sacreBLEU.

Every split has the columns ``source``, ``target`` and ``references``. Training rows are one per
(input, reference) pair; eval rows one per input, ``references`` holding all of its references
(``target`` is the first). Both load from the hub by default, or from a local folder
(``task.data_dir``) in the layout of ``../shared/data``:

* ``dart/``: ``dart-v1.1.1-full-{train,dev}.json`` (the official JSON: a list of ``{"tripleset",
  "annotations": [{"text"}, ...]}``). When the folder has no train file (the shared data has only
  dev and test), the dev entries are split deterministically: a fixed permutation (seed 0,
  independent of the study's seed) puts 80% in ``train`` and 20% in ``validation``, by input (entries
  with the same triples are merged first, their references pooled), so no input is in both.
* ``wmt16_en_ro/``: ``train.{en,ro}`` and ``newsdev2016.{en,ro}`` line files (one sentence a line,
  aligned). Without ``train.{en,ro}`` the newsdev2016 pairs are split 80/20 in the same way. The
  test set (newstest2016) is not used by studies.

See :func:`split_local`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tunekd.errors import ConfigError, read_utf8

from .base import TaskSpec

LOCAL_VALID_FRACTION = 0.2
LOCAL_SPLIT_SEED = 0


def normalize_romanian(text: str) -> str:
    """Romanian diacritics in one form: s/t with cedilla (ş ţ Ş Ţ, as in the older WMT16 data) become
    s/t with comma below (ș ț Ș Ț, the correct Romanian letters, as in newsdev/newstest2016).
    Applied to hypotheses and references alike before BLEU, so neither form is penalised."""
    return text.translate(_RO_TABLE)


_RO_TABLE = str.maketrans({"ş": "ș", "ţ": "ț", "Ş": "Ș", "Ţ": "Ț"})

DART = TaskSpec(
    name="dart",
    kind="generation",
    label_names=(),
    text_fields=("source", "target"),
    eval_splits=("validation",),
    metrics=("bleu",),
    hub=("GEM/dart", None),
)
WMT16_EN_RO = TaskSpec(
    name="wmt16_en_ro",
    kind="generation",
    label_names=(),
    text_fields=("source", "target"),
    eval_splits=("validation",),
    metrics=("bleu",),
    hub=("wmt/wmt16", "ro-en"),
    normalize=normalize_romanian,
)
GENERATION_TASKS: dict[str, TaskSpec] = {t.name: t for t in (DART, WMT16_EN_RO)}


def split_local(n: int, *, fraction: float = LOCAL_VALID_FRACTION, seed: int = LOCAL_SPLIT_SEED):
    """(train rows, validation rows) of `n` items: a fixed permutation, the last `fraction` held out
    (at least one row each side when n >= 2); each part in its original order."""
    if n < 2:
        raise ConfigError(f"cannot split {n} row(s) into train and validation")
    perm = np.random.default_rng(seed).permutation(n)
    n_valid = min(n - 1, max(1, int(round(n * fraction))))
    return sorted(perm[n_valid:].tolist()), sorted(perm[:n_valid].tolist())


def linearize_triples(tripleset) -> str:
    """`s : p : o | s : p : o` (the prefix-tuning / DART baselines' linearisation)."""
    return " | ".join(" : ".join(str(x).strip() for x in t) for t in tripleset)


def _dataset(sources: list[str], refs: list[list[str]], *, train: bool):
    import datasets

    if train:
        pairs = [(s, r) for s, rs in zip(sources, refs) for r in rs]
        return datasets.Dataset.from_dict({"source": [p[0] for p in pairs], "target": [p[1] for p in pairs],
                                           "references": [[p[1]] for p in pairs]})
    return datasets.Dataset.from_dict({"source": sources, "target": [r[0] for r in refs], "references": refs})


def _dataset_dict(train: tuple[list, list], valid: tuple[list, list]):
    import datasets

    return datasets.DatasetDict({"train": _dataset(*train, train=True), "validation": _dataset(*valid, train=False)})


def _dart_entry(rec, where: str) -> tuple[str, list[str]]:
    if not isinstance(rec, dict) or "tripleset" not in rec:
        raise ConfigError(f"{where}: expected a DART entry with 'tripleset', got {str(rec)[:80]!r}")
    ann = rec.get("annotations")
    if isinstance(ann, dict):  # hub layout: {"source": [...], "text": [...]}
        refs = list(ann.get("text") or [])
    elif isinstance(ann, list):
        refs = [a["text"] for a in ann if isinstance(a, dict) and a.get("text")]
    else:  # GEM layout
        refs = list(rec.get("references") or ([rec["target"]] if rec.get("target") else []))
    refs = [r.strip() for r in refs if r and r.strip()]
    return linearize_triples(rec["tripleset"]), refs


def _read_dart(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of DART entries")
    merged: dict[str, list[str]] = {}  # entries with the same input are one input with all their references
    for i, rec in enumerate(data):
        src, rs = _dart_entry(rec, f"{path}, entry {i}")
        if rs:  # an entry without a reference cannot be trained on or scored
            merged.setdefault(src, []).extend(r for r in rs if r not in merged.get(src, ()))
    if not merged:
        raise ConfigError(f"{path} has no entries with references")
    return list(merged), list(merged.values())


def _take(items, idx):
    return [items[i] for i in idx]


def _split_pairs(sources, refs):
    tr, va = split_local(len(sources))
    return (_take(sources, tr), _take(refs, tr)), (_take(sources, va), _take(refs, va))


def _folder(spec: TaskSpec, data_dir) -> Path:
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data folder {str(folder)!r} for task {spec.name!r} does not exist")
    return folder


def load_local_dart(data_dir):
    folder = _folder(DART, data_dir)
    dev = folder / "dart-v1.1.1-full-dev.json"
    if not dev.is_file():
        raise ConfigError(f"task 'dart': {folder} has no dart-v1.1.1-full-dev.json")
    train = folder / "dart-v1.1.1-full-train.json"
    if train.is_file():
        return _dataset_dict(_read_dart(train), _read_dart(dev))
    return _dataset_dict(*_split_pairs(*_read_dart(dev)))


def _read_lines(folder: Path, stem: str) -> tuple[list[str], list[list[str]]]:
    en, ro = folder / f"{stem}.en", folder / f"{stem}.ro"
    src = read_utf8(en).splitlines()
    tgt = read_utf8(ro).splitlines()
    if len(src) != len(tgt):
        raise ConfigError(f"{en} has {len(src)} lines but {ro} has {len(tgt)}; they must be aligned")
    keep = [i for i, (s, t) in enumerate(zip(src, tgt)) if s.strip() and t.strip()]
    return [src[i].strip() for i in keep], [[tgt[i].strip()] for i in keep]


def load_local_wmt16(data_dir):
    folder = _folder(WMT16_EN_RO, data_dir)
    if not (folder / "newsdev2016.en").is_file():
        raise ConfigError(f"task 'wmt16_en_ro': {folder} has no newsdev2016.en / newsdev2016.ro")
    dev = _read_lines(folder, "newsdev2016")
    if (folder / "train.en").is_file():
        return _dataset_dict(_read_lines(folder, "train"), dev)
    return _dataset_dict(*_split_pairs(*dev))


def _hub(spec: TaskSpec):
    import datasets

    path, name = spec.hub
    try:
        return datasets.load_dataset(path, name)
    except Exception as e:  # network, offline mode, missing cache ...
        raise ConfigError(f"task {spec.name!r}: cannot load hub dataset {path}"
                          f"{'/' + name if name else ''} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "set task.data_dir to a local folder") from None


def load_hub_generation(spec: TaskSpec):
    raw = _hub(spec)
    for split in ("train", "validation"):
        if split not in raw:
            raise ConfigError(f"hub dataset {spec.hub[0]} has no split {split!r}; it has {', '.join(raw)}")
    parts = {}
    for split in ("train", "validation"):
        if spec.name == "dart":  # one row per (triples, reference) on the hub: pool the references by input
            merged: dict[str, list[str]] = {}
            for i, rec in enumerate(raw[split]):
                src, rs = _dart_entry(rec, f"{spec.hub[0]} {split} row {i}")
                pool = merged.setdefault(src, [])
                pool.extend(r for r in rs if r not in pool)
            merged = {k: v for k, v in merged.items() if v}
            parts[split] = (list(merged), list(merged.values()))
        else:
            pairs = [(rec["translation"]["en"].strip(), rec["translation"]["ro"].strip()) for rec in raw[split]]
            pairs = [(s, t) for s, t in pairs if s and t]
            parts[split] = ([s for s, _ in pairs], [[t] for _, t in pairs])
    return _dataset_dict(parts["train"], parts["validation"])


LOCAL_LOADERS = {"dart": load_local_dart, "wmt16_en_ro": load_local_wmt16}
