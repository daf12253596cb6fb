"""Loading GLUE-like tasks (classification and regression entries of the task table,
``tunekd.tasks.table``): local folders in the GLUE layout, and hub copies.

Everything task-specific is data in the task's entry (``TaskSpec.local_files``, ``local_columns``,
``headerless``, ``hub``, ``hub_columns``); this module is the same code for every such task. Local folders (``task.data_dir``) are read by a per-task, per-split list of alternatives; each
alternative is a list of file names, the first alternative whose files all exist is used, and
its files are concatenated in order. Two kinds of files are read:

* ``.tsv`` (GLUE layout): tab-separated, read with ``quoting=csv.QUOTE_NONE``. A header row is
  recognised by known GLUE column names (``sentence``, ``sentence1``, ``gold_label``, ...); a file
  without one is read by the task's ``headerless`` layout (MNLI: TextFooler's
  ``label<TAB>premise<TAB>hypothesis``; CoLA: GLUE's ``source<TAB>label<TAB>mark<TAB>sentence``), and
  is an error for a task without one. A UTF-8 byte-order mark (GLUE's MRPC) is skipped.
* ``.json`` / ``.jsonl`` (PowerfulPromptFT layout): ``{"0": {"text_a", "text_b", "label"}, ...}``,
  a JSON list of such records, or one record per line.

String labels are mapped through ``TaskSpec.label_names``; digit strings and ints are ids.
Regression labels (STS-B) are read as floats.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tunekd.errors import ConfigError, not_utf8, read_utf8

from .base import TaskSpec

log = logging.getLogger(__name__)

# Any of these in the first row of a TSV marks it as a header row (with the tasks' own column names).
_HEADER_NAMES = {
    "index", "id", "idx", "qid1", "qid2", "promptID", "pairID", "genre", "label1", "filename", "year",
    "old_index", "source1", "source2", "#1 ID", "#2 ID",
    "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse",
}  # fmt: skip


def _header_names(spec: TaskSpec) -> set[str]:
    return _HEADER_NAMES | {name for names in spec.local_columns.values() for name in names}


# ---------------------------------------------------------------------------------------------
# labels


def parse_label(spec: TaskSpec, raw: Any, where: str) -> int | float:
    """A label id from a label name (``"entailment"``), a digit string (``"1"``) or an int; for a
    regression task a finite float."""
    if spec.kind == "regression":
        return parse_score(spec, raw, where)
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


def parse_score(spec: TaskSpec, raw: Any, where: str) -> float:
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(raw, bool) or not math.isfinite(value):
        raise ConfigError(f"{where}: label {raw!r} of regression task {spec.name!r} is not a finite number")
    return value


# ---------------------------------------------------------------------------------------------
# readers: each yields (where, record) with record keyed by source column names


def _resolve_columns(spec: TaskSpec, available: Iterable[str], path: Path) -> dict[str, str]:
    """canonical column -> source column, or ConfigError naming the missing one."""
    available = list(available)
    resolved: dict[str, str] = {}
    for canon in (*spec.text_fields, "label"):
        names = spec.local_columns[canon]
        found = next((n for n in names if n in available), None)
        if found is None:
            also = f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
            raise ConfigError(
                f"{path}: required column {names[0]!r}{also} is missing; columns found: {', '.join(available) or 'none'}"
            )
        resolved[canon] = found
    return resolved


def _check_layout(spec: TaskSpec, header: list[str], path: Path) -> None:
    """A TSV whose header is exactly another GLUE task's own (and not this task's) is that task's file: a
    folder of the wrong task (SST-2's `sentence, label` read as CoLA would load, with the wrong data)."""
    from .table import TASKS

    if tuple(header) == spec.glue_header:
        return
    owners = [t.name for t in TASKS.values() if t.glue_header == tuple(header)]
    if owners:
        ours = "has no header" if spec.glue_header is None and spec.headerless else \
            f"has the header {', '.join(spec.glue_header or ())}"
        raise ConfigError(f"{path}: this is a {' / '.join(owners)} file (GLUE's header {', '.join(header)}), not "
                          f"one of task {spec.name!r} (whose GLUE file {ours}); check task.name and task.data_dir")


def _read_tsv(spec: TaskSpec, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            first = next(reader, None)
            while first is not None and not first:  # leading blank lines
                first = next(reader, None)
            if first is None:
                return
            header_like = any(cell.strip() in _header_names(spec) for cell in first)
            if header_like:
                header = [cell.strip() for cell in first]
                _check_layout(spec, header, path)
                mapping = _resolve_columns(spec, header, path)
                pending: list[tuple[int, list[str]]] = []
            elif spec.headerless is not None:
                header = list(spec.headerless)
                mapping = {c: c for c in (*spec.text_fields, "label")}
                pending = [(reader.line_num, first)]
            else:
                expected = ", ".join(spec.local_columns[c][0] for c in (*spec.text_fields, "label"))
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

    label = (datasets.Value("float32") if spec.kind == "regression"
             else datasets.ClassLabel(names=list(spec.label_names)))
    return datasets.Features({**{f: datasets.Value("string") for f in spec.text_fields}, "label": label})


def _resolve_folder(spec: TaskSpec, data_dir: str | Path) -> Path:
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data folder {str(folder)!r} for task {spec.name!r} does not exist")

    def has_any(d: Path) -> bool:
        return any(all((d / f).is_file() for f in alt) for alts in spec.local_files.values() for alt in alts)

    # Convenience: a folder holding one sub-folder per task (like shared/data) is accepted too.
    sub = folder / spec.name
    if not has_any(folder) and sub.is_dir() and has_any(sub):
        return sub
    return folder


def load_local(spec: TaskSpec, data_dir: str | Path):
    """Load ``train`` and the eval splits of a GLUE task from a local folder.

    For each split the first alternative in ``spec.local_files[split]`` whose files all exist is
    used. With the shared sample data this means:

    * MNLI: train = the two PowerfulPromptFT train samples (9,999 rows); eval = the TextFooler
      1,000-row subsets of dev_matched / dev_mismatched.
    * QQP: train = ``train_sample_8999.json``; **validation = ``train_sample_1000.json``, a
      held-out sample of QQP train, not the official dev set** (which is not available; the
      9-row ``dev_first9.tsv`` is too small to evaluate on). Numbers on it are not comparable
      with published QQP dev results.
    * QNLI: train = the two train samples; validation = the full official ``dev.tsv``.
    * SST-2: the full official ``train.tsv`` / ``dev.tsv``.
    * CoLA, MRPC, RTE: train = the two PowerfulPromptFT ``train_part_*.json`` files (together the
      GLUE train split, less one row for MRPC and RTE); validation = the full official ``dev.tsv``.
    * STS-B, WNLI: only GLUE's ``train.tsv`` / ``dev.tsv`` (not in the shared data).
    """
    import datasets

    folder = _resolve_folder(spec, data_dir)
    features = _features(spec)
    splits = {}
    for split in ("train", *spec.eval_splits):
        alternatives = spec.local_files[split]
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


def call_load_dataset(spec: TaskSpec, data: dict[str, Any], *, hint: str):
    """``datasets.load_dataset(**data)`` (only the keys given), any failure one ConfigError line."""
    import datasets

    kwargs = {k: v for k, v in data.items() if v is not None and k != "options"}
    kwargs.update(data.get("options") or {})
    if Path(str(kwargs.get("path", ""))).expanduser().is_dir():
        # a local folder: datasets keys its cache by the folder's name and file patterns, not by the files,
        # so another folder of the same name (or edited files) would read stale data; rebuild it instead
        kwargs["download_mode"] = "force_redownload"
        kwargs["verification_mode"] = "no_checks"  # split sizes recorded for the old files do not apply
    quiet = logging.getLogger("datasets")  # its loaders log the error themselves before raising it
    level = quiet.level
    quiet.setLevel(logging.CRITICAL + 1)
    try:
        return datasets.load_dataset(**kwargs)
    except Exception as e:  # network, auth, offline mode, missing cache, missing files ...
        e = _unwrap(e)
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', detail)
        if empty:  # datasets' words for a split whose files hold no rows
            raise ConfigError(f"task {spec.name!r} ({describe(data)}), split {empty.group(1)!r} has no rows") from e
        where = "the hub" if spec.builtin and data.get("path") == (spec.hub or (None,))[0] else describe(data)
        raise ConfigError(f"could not load task {spec.name!r} from {where} ({type(e).__name__}: {detail}); {hint}") from e
    finally:
        quiet.setLevel(level)


def _unwrap(exc: BaseException) -> BaseException:
    """The error under `datasets`' wrapper ("DatasetGenerationError: An error occurred while generating the
    dataset" says nothing): its cause."""
    from datasets.exceptions import DatasetGenerationError

    while isinstance(exc, DatasetGenerationError) and (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def describe(data: dict[str, Any]) -> str:
    """``nyu-mll/glue/cola`` or ``csv {'train': 'a.csv'}``: a data spec in a few words."""
    bits = [str(data.get("path"))]
    if data.get("name"):
        bits.append(f"config {data['name']!r}")
    if data.get("data_files") is not None:
        bits.append(f"files {data['data_files']}")
    if data.get("data_dir"):
        bits.append(f"data_dir {data['data_dir']!r}")
    return " ".join(bits)


def load_hub(spec: TaskSpec, data: dict[str, Any] | None = None):
    """Load a GLUE-like task with ``datasets.load_dataset(*spec.hub)`` (or ``data``: other
    ``load_dataset`` arguments giving the same layout, e.g. a local copy of the hub's files) and map
    ``spec.hub_columns`` to canonical columns. Hub labels are ids (``ClassLabel``) or, for regression,
    floats."""
    if data is None:
        if spec.hub is None:
            raise ConfigError(f"task {spec.name!r} has no hub copy; set task.data_dir to a local folder")
        data = {"path": spec.hub[0], "name": spec.hub[1]}
    raw = call_load_dataset(spec, data, hint="set task.data_dir to a local folder")
    where = describe(data)
    rename = dict(spec.hub_columns)
    features = _features(spec)
    splits = {}
    for split in ("train", *spec.eval_splits):
        if split not in raw:
            raise ConfigError(f"dataset {where} has no split {split!r}; it has {', '.join(raw)}")
        ds = raw[split]
        missing = [c for c in rename if c not in ds.column_names]
        if missing:
            raise ConfigError(
                f"dataset {where}, split {split!r}: missing column(s) {', '.join(missing)}; "
                f"columns found: {', '.join(ds.column_names)}"
            )
        if len(ds) == 0:
            raise ConfigError(f"dataset {where}, split {split!r} has no rows")
        ds = ds.select_columns(list(rename)).rename_columns({k: v for k, v in rename.items() if k != v})
        labels = ds["label"]
        if spec.kind == "regression":
            for i, x in enumerate(labels):
                parse_score(spec, x, f"dataset {where}, split {split!r}, row {i}")
        else:
            bad = sorted({int(x) for x in labels if not 0 <= int(x) < spec.num_labels})
            if bad:
                raise ConfigError(f"dataset {where}, split {split!r}: label ids {bad} outside 0..{spec.num_labels - 1}")
        ds = ds.select_columns([*spec.text_fields, "label"]).cast(features)
        splits[split] = ds
    import datasets

    return datasets.DatasetDict(splits)
