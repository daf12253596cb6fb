"""GLUE classification tasks (SST-2, MNLI, QQP, QNLI): specs, local-folder readers, hub loading.

Local folders (``task.data_dir``) are read by a per-task, per-split list of alternatives; each
alternative is a list of file names, the first alternative whose files all exist is used, and
its files are concatenated in order. Two kinds of files are read:

* ``.tsv`` (GLUE layout): tab-separated, read with ``quoting=csv.QUOTE_NONE``. A header row is
  recognised by known GLUE column names (``sentence``, ``sentence1``, ``gold_label``, ...);
  without one only MNLI is accepted, as TextFooler's ``label<TAB>premise<TAB>hypothesis``.
* ``.json`` / ``.jsonl`` (PowerfulPromptFT layout): ``{"0": {"text_a", "text_b", "label"}, ...}``,
  a JSON list of such records, or one record per line.

String labels are mapped through ``TaskSpec.label_names``; digit strings and ints are ids.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tunekd.errors import ConfigError, not_utf8, read_utf8

from .base import TaskSpec

log = logging.getLogger(__name__)

SST2 = TaskSpec(
    name="sst2",
    kind="classification",
    label_names=("negative", "positive"),
    text_fields=("text_a",),
    eval_splits=("validation",),
    metrics=("accuracy",),
    hub=("nyu-mll/glue", "sst2"),
)
MNLI = TaskSpec(
    name="mnli",
    kind="classification",
    label_names=("entailment", "neutral", "contradiction"),
    text_fields=("text_a", "text_b"),
    eval_splits=("validation_matched", "validation_mismatched"),
    metrics=("accuracy", "accuracy_mm"),
    hub=("nyu-mll/glue", "mnli"),
)
QQP = TaskSpec(
    name="qqp",
    kind="classification",
    label_names=("not_duplicate", "duplicate"),
    text_fields=("text_a", "text_b"),
    eval_splits=("validation",),
    metrics=("accuracy", "f1"),
    hub=("nyu-mll/glue", "qqp"),
)
QNLI = TaskSpec(
    name="qnli",
    kind="classification",
    label_names=("entailment", "not_entailment"),
    text_fields=("text_a", "text_b"),
    eval_splits=("validation",),
    metrics=("accuracy",),
    hub=("nyu-mll/glue", "qnli"),
)

GLUE_TASKS: dict[str, TaskSpec] = {t.name: t for t in (SST2, MNLI, QQP, QNLI)}

# Per task and split: ordered alternatives, each a list of files that are concatenated.
LAYOUTS: dict[str, dict[str, list[list[str]]]] = {
    "sst2": {
        "train": [["train.tsv"]],
        "validation": [["dev.tsv"]],
    },
    "mnli": {
        "train": [["train.tsv"], ["train_sample_8999.json", "train_sample_1000.json"]],
        "validation_matched": [["dev_matched.tsv"], ["dev_matched_textfooler_1k.tsv"]],
        "validation_mismatched": [["dev_mismatched.tsv"], ["dev_mismatched_textfooler_1k.tsv"]],
    },
    "qqp": {
        "train": [["train.tsv"], ["train_sample_8999.json"]],
        # train_sample_1000.json is a held-out sample of QQP *train*, not the official dev set
        # (which is not in the shared data); dev_first9.tsv is far too small to evaluate on.
        "validation": [["dev.tsv"], ["train_sample_1000.json"]],
    },
    "qnli": {
        "train": [["train.tsv"], ["train_sample_8999.json", "train_sample_1000.json"]],
        "validation": [["dev.tsv"]],
    },
}

# Per task, canonical column -> accepted source column names, in order of preference. The first
# name is the GLUE TSV header name, used in error messages.
COLUMNS: dict[str, dict[str, list[str]]] = {
    "sst2": {"text_a": ["sentence", "text_a", "text"], "label": ["label"]},
    "mnli": {
        "text_a": ["sentence1", "premise", "text_a"],
        "text_b": ["sentence2", "hypothesis", "text_b"],
        "label": ["gold_label", "label"],
    },
    "qqp": {
        "text_a": ["question1", "text_a"],
        "text_b": ["question2", "text_b"],
        "label": ["is_duplicate", "label"],
    },
    "qnli": {"text_a": ["question", "text_a"], "text_b": ["sentence", "text_b"], "label": ["label"]},
}

# Header-less TSV layouts (canonical column per position): TextFooler's MNLI files.
HEADERLESS: dict[str, tuple[str, ...]] = {"mnli": ("label", "text_a", "text_b")}

# Any of these in the first row of a TSV marks it as a header row.
_KNOWN_HEADER_NAMES = {name for cols in COLUMNS.values() for names in cols.values() for name in names} | {
    "index", "id", "idx", "qid1", "qid2", "promptID", "pairID", "genre", "label1",
    "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse",
}  # fmt: skip

# Hub (nyu-mll/glue) column -> canonical column.
HUB_COLUMNS: dict[str, dict[str, str]] = {
    "sst2": {"sentence": "text_a", "label": "label"},
    "mnli": {"premise": "text_a", "hypothesis": "text_b", "label": "label"},
    "qqp": {"question1": "text_a", "question2": "text_b", "label": "label"},
    "qnli": {"question": "text_a", "sentence": "text_b", "label": "label"},
}


# ---------------------------------------------------------------------------------------------
# labels


def parse_label(spec: TaskSpec, raw: Any, where: str) -> int:
    """A label id from a label name (``"entailment"``), a digit string (``"1"``) or an int."""
    if isinstance(raw, bool):
        raw = int(raw)
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and raw.strip() in spec.label_names:
        return spec.label_names.index(raw.strip())
    elif isinstance(raw, str) and raw.strip().isdigit():
        value = int(raw.strip())
    else:
        value = None
    if value is None or not 0 <= value < spec.num_labels:
        allowed = ", ".join(f"{name!r} ({i})" for i, name in enumerate(spec.label_names))
        raise ConfigError(f"{where}: label {raw!r} is not one of the labels of task {spec.name!r}: {allowed}")
    return value


# ---------------------------------------------------------------------------------------------
# readers: each yields (where, record) with record keyed by source column names


def _resolve_columns(spec: TaskSpec, available: Iterable[str], path: Path) -> dict[str, str]:
    """canonical column -> source column, or ConfigError naming the missing one."""
    available = list(available)
    resolved: dict[str, str] = {}
    for canon in (*spec.text_fields, "label"):
        names = COLUMNS[spec.name][canon]
        found = next((n for n in names if n in available), None)
        if found is None:
            also = f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
            raise ConfigError(
                f"{path}: required column {names[0]!r}{also} is missing; columns found: {', '.join(available) or 'none'}"
            )
        resolved[canon] = found
    return resolved


def _read_tsv(spec: TaskSpec, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            first = next(reader, None)
            while first is not None and not first:  # leading blank lines
                first = next(reader, None)
            if first is None:
                return
            header_like = any(cell.strip() in _KNOWN_HEADER_NAMES for cell in first)
            if header_like:
                header = [cell.strip() for cell in first]
                mapping = _resolve_columns(spec, header, path)
                pending: list[tuple[int, list[str]]] = []
            elif spec.name in HEADERLESS:
                header = list(HEADERLESS[spec.name])
                mapping = {c: c for c in header}
                pending = [(reader.line_num, first)]
            else:
                expected = ", ".join(COLUMNS[spec.name][c][0] for c in (*spec.text_fields, "label"))
                raise ConfigError(
                    f"{path}: the first row is not a GLUE header; expected a header with columns {expected}"
                )

            def rows() -> Iterator[tuple[int, list[str]]]:
                yield from pending
                for row in reader:
                    yield reader.line_num, row

            for line, row in rows():
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != len(header):
                    raise ConfigError(
                        f"{path}, line {line}: {len(row)} tab-separated fields, expected {len(header)}"
                    )
                rec = dict(zip(header, row))
                yield f"{path}, line {line}", {canon: rec[src] for canon, src in mapping.items()}
        except csv.Error as e:
            raise ConfigError(f"{path}, line {reader.line_num}: cannot parse TSV ({e})") from e
        except UnicodeDecodeError as e:
            raise not_utf8(path, e) from None


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    text = read_utf8(path)
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield f"{path}, line {i}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}, line {i}: invalid JSON ({e.msg})") from e
        return
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict):
        for key, rec in data.items():
            yield f"{path}, row {key!r}", rec
    elif isinstance(data, list):
        for i, rec in enumerate(data):
            yield f"{path}, row {i}", rec
    else:
        raise ConfigError(f"{path}: expected a JSON object of records or a list of records")


def _read_json(spec: TaskSpec, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, rec in _json_records(path):
        if not isinstance(rec, dict):
            raise ConfigError(f"{where}: expected an object with text_a/text_b/label, got {type(rec).__name__}")
        mapping = _resolve_columns(spec, rec.keys(), path)
        yield where, {canon: rec[src] for canon, src in mapping.items()}


READERS = {".tsv": _read_tsv, ".json": _read_json, ".jsonl": _read_json}


def read_file(spec: TaskSpec, path: Path) -> dict[str, list]:
    """Columns ``spec.text_fields + ("label",)`` of one file; labels as ids."""
    reader = READERS.get(path.suffix)
    if reader is None:
        raise ConfigError(f"{path}: cannot read files ending in {path.suffix!r}; known: {', '.join(READERS)}")
    cols: dict[str, list] = {c: [] for c in (*spec.text_fields, "label")}
    for where, rec in reader(spec, path):
        for field in spec.text_fields:
            value = rec[field]
            if not isinstance(value, str):
                raise ConfigError(f"{where}: column for {field} should be text, got {value!r}")
            cols[field].append(value)
        cols["label"].append(parse_label(spec, rec["label"], where))
    if not cols["label"]:
        raise ConfigError(f"{path} has no rows")
    return cols


# ---------------------------------------------------------------------------------------------
# loading


def _features(spec: TaskSpec):
    import datasets

    return datasets.Features(
        {
            **{f: datasets.Value("string") for f in spec.text_fields},
            "label": datasets.ClassLabel(names=list(spec.label_names)),
        }
    )


def _resolve_folder(spec: TaskSpec, data_dir: str | Path) -> Path:
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data folder {str(folder)!r} for task {spec.name!r} does not exist")

    def has_any(d: Path) -> bool:
        return any(all((d / f).is_file() for f in alt) for alts in LAYOUTS[spec.name].values() for alt in alts)

    # Convenience: a folder holding one sub-folder per task (like shared/data) is accepted too.
    sub = folder / spec.name
    if not has_any(folder) and sub.is_dir() and has_any(sub):
        return sub
    return folder


def load_local(spec: TaskSpec, data_dir: str | Path):
    """Load ``train`` and the eval splits of a GLUE task from a local folder.

    For each split the first alternative in ``LAYOUTS[task][split]`` whose files all exist is
    used. With the shared sample data this means:

    * MNLI: train = the two PowerfulPromptFT train samples (9,999 rows); eval = the TextFooler
      1,000-row subsets of dev_matched / dev_mismatched.
    * QQP: train = ``train_sample_8999.json``; **validation = ``train_sample_1000.json``, a
      held-out sample of QQP train, not the official dev set** (which is not available; the
      9-row ``dev_first9.tsv`` is too small to evaluate on). Numbers on it are not comparable
      with published QQP dev results.
    * QNLI: train = the two train samples; validation = the full official ``dev.tsv``.
    * SST-2: the full official ``train.tsv`` / ``dev.tsv``.
    """
    import datasets

    folder = _resolve_folder(spec, data_dir)
    features = _features(spec)
    splits = {}
    for split in ("train", *spec.eval_splits):
        alternatives = LAYOUTS[spec.name][split]
        chosen = next((alt for alt in alternatives if all((folder / f).is_file() for f in alt)), None)
        if chosen is None:
            looked = " or ".join(" + ".join(alt) for alt in alternatives)
            raise ConfigError(
                f"no file for split {split!r} of task {spec.name!r} in data folder {str(folder)!r}; looked for: {looked}"
            )
        cols: dict[str, list] = {c: [] for c in (*spec.text_fields, "label")}
        for name in chosen:
            part = read_file(spec, folder / name)
            for c in cols:
                cols[c].extend(part[c])
        log.info("task %s, split %s: %d rows from %s", spec.name, split, len(cols["label"]), " + ".join(chosen))
        splits[split] = datasets.Dataset.from_dict(cols, features=features)
    return datasets.DatasetDict(splits)


def load_hub(spec: TaskSpec):
    """Load a GLUE task with ``datasets.load_dataset(*spec.hub)`` and map it to canonical columns."""
    import datasets

    if spec.hub is None:
        raise ConfigError(f"task {spec.name!r} has no hub copy; set task.data_dir to a local folder")
    path, name = spec.hub
    try:
        raw = datasets.load_dataset(path, name)
    except Exception as e:  # network, auth, offline mode, missing cache ...
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"could not load task {spec.name!r} from the hub ({type(e).__name__}: {detail}); "
            "set task.data_dir to a local folder"
        ) from e
    rename = HUB_COLUMNS[spec.name]
    features = _features(spec)
    splits = {}
    for split in ("train", *spec.eval_splits):
        if split not in raw:
            raise ConfigError(f"hub dataset {path}/{name} has no split {split!r}; it has {', '.join(raw)}")
        ds = raw[split]
        missing = [c for c in rename if c not in ds.column_names]
        if missing:
            raise ConfigError(
                f"hub dataset {path}/{name}, split {split!r}: missing column(s) {', '.join(missing)}; "
                f"columns found: {', '.join(ds.column_names)}"
            )
        ds = ds.select_columns(list(rename)).rename_columns({k: v for k, v in rename.items() if k != v})
        labels = ds["label"]
        bad = sorted({int(x) for x in labels if not 0 <= int(x) < spec.num_labels})
        if bad:
            raise ConfigError(f"hub dataset {path}/{name}, split {split!r}: label ids {bad} outside 0..{spec.num_labels - 1}")
        ds = ds.select_columns([*spec.text_fields, "label"]).cast(features)
        splits[split] = ds
    return datasets.DatasetDict(splits)
