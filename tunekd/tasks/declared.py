"""Declared tasks: a task written in the study file (kind, a ``datasets.load_dataset`` spec, text
fields, label field, labels, metrics, eval splits) becomes a `TaskSpec` and its data a DatasetDict in
the canonical columns of its kind, with no task-specific code.

Canonical columns after loading (the same as the built-in tasks of each kind):

* classification / regression: ``text_a`` (, ``text_b``) from ``text_fields`` (one or two columns),
  ``label`` from ``label_field``: an id into ``labels`` (classification) or a float (regression);
* multiple_choice: ``context`` and ``choices`` from ``text_fields: [<context>, <choices>]`` (the
  choices column a list of strings, the same number in every row; each choice is scored with a
  leading space), ``label`` the index of the right choice (an int, or a name in ``labels``);
* generation: ``source`` from ``text_fields: [<source>]``, ``target``/``references`` from
  ``label_field`` (a string or a list of reference strings).

Classification labels: a data value is matched against ``labels`` by name (``str(value)``), then as an
id (an int in ``range(len(labels))``) -- unless the labels are numbers (``[1, 2]``, ``[-1, 1]``): then by
numeric value only, so that a 0 in the data is an error and not the id of the first label. Without ``labels`` they are the names of a ``ClassLabel``
column, else the distinct values of the train split, sorted (numbers numerically). A value outside
the list, a missing column, an empty split, a non-text text field are one ConfigError line each.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tunekd import metrics as _metrics
from tunekd.errors import ConfigError

from .base import TaskSpec
from .glue import call_load_dataset, describe

CANONICAL = {
    "classification": ("text_a", "text_b"),
    "regression": ("text_a", "text_b"),
    "multiple_choice": ("context", "choices"),
    "generation": ("source",),
}


def spec_from(cfg) -> TaskSpec:
    """The `TaskSpec` of a declaration (`study.TaskConfig` with `kind` set). Classification labels not
    listed stay empty until `load_declared` reads them from the data."""
    kind = cfg.kind
    fields = tuple(cfg.text_fields or ())
    canon = CANONICAL[kind]
    if not 1 <= len(fields) <= len(canon) or (kind == "multiple_choice" and len(fields) != 2):
        want = {"classification": "one or two", "regression": "one or two", "multiple_choice": "two",
                "generation": "one"}[kind]
        raise ConfigError(f"task.text_fields: a {kind} task takes {want} column(s) "
                          f"({', '.join(canon[:len(canon)])}), got {list(fields)}")
    metrics = tuple(cfg.metrics or _metrics.DEFAULT_METRICS[kind])
    labels = tuple(str(x) for x in (cfg.labels or ()))
    data = cfg.data if isinstance(cfg.data, dict) else cfg.data.model_dump(exclude_none=True)
    return TaskSpec(
        name=cfg.name or "custom", kind=kind, label_names=labels,
        text_fields=("source", "target") if kind == "generation" else canon[:len(fields)],
        eval_splits=tuple(cfg.eval_splits or ("validation",)), metrics=metrics, hub=None,
        data={k: v for k, v in data.items() if v is not None}, source_fields=fields,
        label_field=cfg.label_field, train_split=cfg.train_split, builtin=False,
    )


def _where(spec: TaskSpec, split: str) -> str:
    return f"task {spec.name!r} ({describe(dict(spec.data))}), split {split!r}"


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected text, got {value!r}")
    return value


def _label_key(value: Any, names: list[str] | None):
    """A raw label as a comparable key: a ClassLabel id as its name; an integral float as an int."""
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _sorted_labels(values: set) -> list[str]:
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _class_id(spec: TaskSpec, key: Any, where: str) -> int:
    """The id of a data value in ``spec.label_names``: by name; then, when the names are numbers
    (``[1, 2]``, ``[-1, 1]``), by numeric value only (a 0 is not the id of the first label, else the
    values 0 and 1 of ``[1, 2]`` would both be id 0); else an int as an id."""
    names = spec.label_names
    if key is None or (isinstance(key, float) and math.isnan(key)):
        raise ConfigError(f"{where}: the label is missing")
    if str(key) in names:
        return names.index(str(key))
    numbers = [_number(n) for n in names]
    numeric = all(n is not None for n in numbers)
    if numeric:
        value = _number(str(key)) if not isinstance(key, bool) else None
        if value is not None and value in numbers:
            return numbers.index(value)
    elif isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(names):
        return key
    how = "the labels are numbers: a value matches by value, not as an id" if numeric else \
        f"names, or ids 0..{len(names) - 1}"
    raise ConfigError(f"{where}: label {key!r} is not in the task's labels {list(names)} ({how})")


TEXT_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt")


def _local_files(data: dict) -> list[tuple[str, str]]:
    """``(split, path)`` of each local file in ``data_files`` (not globs, not URLs)."""
    files = data.get("data_files")
    if files is None:
        return []
    by_split = files if isinstance(files, dict) else {"train": files}
    out = []
    for split, paths in by_split.items():
        for path in [paths] if isinstance(paths, str) else paths:
            if "://" not in path and not any(c in path for c in "*?["):
                out.append((str(split), path))
    return out


def check_files(spec: TaskSpec) -> None:
    """The declared task's local ``data_files`` against what `datasets` will meet, each problem one line
    naming the file: missing, empty, not UTF-8, a CSV without the columns or without rows, a broken JSON
    line, a file named ``.parquet`` that is not one. Before `datasets` reads them (whose own errors name
    no file: "An error occurred while generating the dataset")."""
    import csv
    import json
    from pathlib import Path

    from tunekd.errors import not_utf8

    need = [*spec.source_fields, spec.label_field]
    options = dict(spec.data.get("options") or {})
    for split, name in _local_files(dict(spec.data)):
        path = Path(name).expanduser()
        where = f"task.data.data_files ({split}): {name}"
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(f"{where} {what} (a relative path is read from the working folder {Path.cwd()})")
        data = path.read_bytes()
        if not data.strip():
            raise ConfigError(f"{where} is empty")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            if not (len(data) >= 12 and data[:4] == data[-4:] == b"PAR1"):
                raise ConfigError(f"{where} is not a Parquet file (no PAR1 marks); name it for what it holds")
            continue
        if suffix not in TEXT_SUFFIXES:
            continue
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise not_utf8(path, exc, data) from None
        if suffix in (".csv", ".tsv"):
            sep = str(options.get("sep", options.get("delimiter", "\t" if suffix == ".tsv" else ",")))
            rows = [r for r in csv.reader(text.splitlines(), delimiter=sep[:1] or ",") if any(c.strip() for c in r)]
            header = [c.strip() for c in rows[0]]
            missing = [c for c in need if c not in header]
            if missing:
                raise ConfigError(f"{where}: column {missing[0]!r} is missing; columns found: {', '.join(header)}")
            if len(rows) < 2:
                raise ConfigError(f"{where} has a header but no rows")
        elif suffix == ".jsonl" or (suffix == ".json" and not text.lstrip().startswith(("[", "{\n", "{\r"))):
            for i, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{where}, line {i}: invalid JSON ({exc.msg})") from None


def load_declared(spec: TaskSpec):
    """``(spec with its labels resolved, DatasetDict of train + eval splits in canonical columns)``."""
    import datasets

    check_files(spec)
    raw = call_load_dataset(spec, dict(spec.data),
                            hint="check task.data (any datasets.load_dataset arguments: path, name, data_files, ...)")
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({spec.train_split: raw})
    wanted = (spec.train_split, *spec.eval_splits)
    for split in wanted:
        if split not in raw:
            raise ConfigError(f"task {spec.name!r} ({describe(dict(spec.data))}) has no split {split!r}; it has "
                              f"{', '.join(raw) or 'none'} (name the splits with data_files: {{train: ..., "
                              f"validation: ...}}, or set task.eval_splits / task.train_split)")
        ds = raw[split]
        if len(ds) == 0:
            raise ConfigError(f"{_where(spec, split)} has no rows")
        need = [*spec.source_fields, spec.label_field]
        missing = [c for c in need if c not in ds.column_names]
        if missing:
            raise ConfigError(f"{_where(spec, split)}: column {missing[0]!r} is missing; columns found: "
                              f"{', '.join(ds.column_names)}")

    if spec.kind == "classification" and not spec.label_names:
        feature = raw[spec.train_split].features[spec.label_field]
        if isinstance(feature, datasets.ClassLabel):
            labels = list(feature.names)
        else:
            keys = {_label_key(v, None) for v in raw[spec.train_split][spec.label_field]}
            if None in keys or any(isinstance(k, float) and math.isnan(k) for k in keys):
                raise ConfigError(f"{_where(spec, spec.train_split)}: some rows have no label")
            labels = _sorted_labels(keys)
        if len(labels) < 2:
            raise ConfigError(f"{_where(spec, spec.train_split)}: a classification task needs at least 2 labels, "
                              f"the data has {labels}")
        spec = dataclasses.replace(spec, label_names=tuple(labels))

    if spec.kind == "multiple_choice" and not spec.label_names:
        first = raw[spec.train_split][0][spec.source_fields[1]]
        n = len(first) if isinstance(first, (list, tuple)) else 0
        spec = dataclasses.replace(spec, label_names=tuple(str(k) for k in range(n)))

    out = {}
    for split in wanted:
        out["train" if split == spec.train_split else split] = _convert(spec, raw[split], split)
    return spec, datasets.DatasetDict(out)


def _convert(spec: TaskSpec, ds, split: str):
    import datasets

    where = _where(spec, split)
    feature = ds.features[spec.label_field]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    columns = {f: list(ds[f]) for f in spec.source_fields}
    raw_labels = list(ds[spec.label_field])

    if spec.kind in ("classification", "regression"):
        cols = {}
        for canon, src in zip(spec.text_fields, spec.source_fields):
            cols[canon] = [_text(v, f"{where}, row {i}, column {src!r}") for i, v in enumerate(columns[src])]
        if spec.kind == "regression":
            from .glue import parse_score

            cols["label"] = [parse_score(spec, v, f"{where}, row {i}") for i, v in enumerate(raw_labels)]
            label = datasets.Value("float32")
        else:
            cols["label"] = [_class_id(spec, _label_key(v, names), f"{where}, row {i}") for i, v in enumerate(raw_labels)]
            label = datasets.ClassLabel(names=list(spec.label_names))
        features = datasets.Features({**{c: datasets.Value("string") for c in spec.text_fields}, "label": label})
        return datasets.Dataset.from_dict(cols, features=features)

    if spec.kind == "multiple_choice":
        ctx_col, ch_col = spec.source_fields
        contexts = [_text(v, f"{where}, row {i}, column {ctx_col!r}") for i, v in enumerate(columns[ctx_col])]
        choices = []
        for i, cs in enumerate(columns[ch_col]):
            if not isinstance(cs, (list, tuple)) or not cs or not all(isinstance(c, str) for c in cs):
                raise ConfigError(f"{where}, row {i}, column {ch_col!r}: expected a list of choice strings, got {cs!r}")
            choices.append([c if c[:1].isspace() else " " + c for c in cs])
        widths = {len(c) for c in choices}
        if len(widths) != 1:
            raise ConfigError(f"{where}: rows have different numbers of choices {sorted(widths)}")
        n = widths.pop()
        if len(spec.label_names) != n:
            raise ConfigError(f"{where}: {n} choices per row but the task has {len(spec.label_names)} labels "
                              f"{list(spec.label_names)}")
        labels = [_class_id(spec, _label_key(v, names), f"{where}, row {i}") for i, v in enumerate(raw_labels)]
        return datasets.Dataset.from_dict({"context": contexts, "choices": choices, "label": labels})

    # generation
    from .generation import _dataset

    (src_col,) = spec.source_fields
    sources = [_text(v, f"{where}, row {i}, column {src_col!r}") for i, v in enumerate(columns[src_col])]
    refs = []
    for i, v in enumerate(raw_labels):
        rs = [v] if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else None
        if not rs or not all(isinstance(r, str) and r.strip() for r in rs):
            raise ConfigError(f"{where}, row {i}, column {spec.label_field!r}: expected a reference text or a "
                              f"list of them, got {v!r}")
        refs.append([r.strip() for r in rs])
    return _dataset(sources, refs, train=(split == spec.train_split))
