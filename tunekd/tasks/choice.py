"""Multiple-choice tasks: HellaSwag (4 endings) and CommonsenseQA (5 answers).

Every split has the columns ``context`` (str), ``choices`` (list of str, the continuations as
scored: each starts with a space) and ``label`` (the index of the right choice). The contexts
follow lm-evaluation-harness: HellaSwag ``"<activity_label>: <ctx_a> <Ctx_b>"`` with its text
preprocessing, CommonsenseQA ``"Question: <question>\\nAnswer:"``.

Hub by default (``Rowan/hellaswag``, ``tau/commonsense_qa``: their train and validation splits), or a
local folder (``task.data_dir``) in the layout of ``../shared/data``: ``hellaswag_val_full.jsonl``
and ``dev_rand_split.jsonl`` (plus ``train*.jsonl`` when there is one). The shared data has only the
validation split of each, so without a train file it is split deterministically (a fixed
permutation, seed 0, independent of the study seed): 80% ``train``, 20% ``validation``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tunekd.errors import ConfigError, read_utf8

from .base import TaskSpec
from .generation import _folder, _hub, _take, split_local

TARGET_DELIMITER = " "  # lm-evaluation-harness's target_delimiter: joins context and continuation


def choice_chars(choice: str) -> int:
    """The length that `accuracy_norm` divides a choice's log-likelihood by: the characters of the
    choice's own text, as lm-evaluation-harness counts them (``len(choice)`` of ``doc_to_choice``),
    i.e. without the target delimiter that the scored continuation starts with."""
    if choice.startswith(TARGET_DELIMITER):
        choice = choice[len(TARGET_DELIMITER):]
    return len(choice)


HELLASWAG = TaskSpec(
    name="hellaswag",
    kind="multiple_choice",
    label_names=("0", "1", "2", "3"),
    text_fields=("context", "choices"),
    eval_splits=("validation",),
    metrics=("accuracy", "accuracy_norm"),
    hub=("Rowan/hellaswag", None),
)
COMMONSENSEQA = TaskSpec(
    name="commonsenseqa",
    kind="multiple_choice",
    label_names=("A", "B", "C", "D", "E"),
    text_fields=("context", "choices"),
    eval_splits=("validation",),
    metrics=("accuracy", "accuracy_norm"),
    hub=("tau/commonsense_qa", None),
)
CHOICE_TASKS: dict[str, TaskSpec] = {t.name: t for t in (HELLASWAG, COMMONSENSEQA)}


def _hs_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag text cleaning."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_row(rec: dict, where: str) -> tuple[str, list[str], int]:
    try:
        if "ctx_a" in rec:
            ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
        else:
            ctx = rec["ctx"]
        context = _hs_preprocess(rec["activity_label"] + ": " + ctx)
        choices = [" " + _hs_preprocess(e) for e in rec["endings"]]
        label = int(rec["label"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: not a HellaSwag row ({type(e).__name__}: {e})") from None
    if len(choices) != 4 or not 0 <= label < 4:
        raise ConfigError(f"{where}: expected 4 endings and a label in 0..3, got {len(choices)} and {label}")
    return context, choices, label


def commonsenseqa_row(rec: dict, where: str) -> tuple[str, list[str], int]:
    try:
        letters = list(rec["choices"]["label"])
        choices = [" " + t for t in rec["choices"]["text"]]
        context = "Question: " + rec["question"].strip() + "\nAnswer:"
        label = letters.index(rec["answerKey"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: not a CommonsenseQA row with an answer ({type(e).__name__}: {e})") from None
    if letters != list(COMMONSENSEQA.label_names):
        raise ConfigError(f"{where}: expected choices labelled A..E, got {letters}")
    return context, choices, label


ROWS = {"hellaswag": hellaswag_row, "commonsenseqa": commonsenseqa_row}
LOCAL_FILES = {"hellaswag": ("hellaswag_val_full.jsonl", "hellaswag_train.jsonl"),
               "commonsenseqa": ("dev_rand_split.jsonl", "train_rand_split.jsonl")}


def _read_jsonl(spec: TaskSpec, path: Path):
    rows = []
    lines = read_utf8(path).split("\n")  # not splitlines(): U+2028 may stand unescaped in a JSON string
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {i}: invalid JSON ({e.msg})") from None
        rows.append(ROWS[spec.name](rec, f"{path}, line {i}"))
    if not rows:
        raise ConfigError(f"{path} has no rows")
    return rows


def _dataset(rows):
    import datasets

    return datasets.Dataset.from_dict({"context": [r[0] for r in rows], "choices": [r[1] for r in rows],
                                       "label": [r[2] for r in rows]})


def load_local_choice(spec: TaskSpec, data_dir):
    import datasets

    folder = _folder(spec, data_dir)
    valid_name, train_name = LOCAL_FILES[spec.name]
    if not (folder / valid_name).is_file():
        raise ConfigError(f"task {spec.name!r}: {folder} has no {valid_name}")
    valid = _read_jsonl(spec, folder / valid_name)
    if (folder / train_name).is_file():
        train = _read_jsonl(spec, folder / train_name)
    else:
        tr, va = split_local(len(valid))
        train, valid = _take(valid, tr), _take(valid, va)
    return datasets.DatasetDict({"train": _dataset(train), "validation": _dataset(valid)})


def load_hub_choice(spec: TaskSpec):
    import datasets

    raw = _hub(spec)
    out = {}
    for split in ("train", "validation"):
        if split not in raw:
            raise ConfigError(f"hub dataset {spec.hub[0]} has no split {split!r}; it has {', '.join(raw)}")
        out[split] = _dataset([ROWS[spec.name](rec, f"{spec.hub[0]} {split} row {i}")
                               for i, rec in enumerate(raw[split])])
    return datasets.DatasetDict(out)
