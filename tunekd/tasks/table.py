"""The built-in tasks: one table of declarations (`TaskSpec` entries).

A GLUE-like task is one entry here and nothing else: its kind, label names (the ids of the Hugging
Face ``nyu-mll/glue`` configs), text columns, eval splits, metrics (``tunekd.metrics``), the hub
config and its columns, and the files and column names of its local GLUE-layout folder (GLUE's own
TSVs, and the layouts of ``../shared/data``). Generation, multiple-choice and synthetic entries are
declared in their kind's module (which also holds the per-task row readers they need) and listed here.
"""

from __future__ import annotations

from .base import TaskSpec
from .choice import COMMONSENSEQA, HELLASWAG
from .generation import DART, WMT16_EN_RO
from .synthetic import SYNTHETIC

_PAIR = {"text_a": ("sentence1", "text_a"), "text_b": ("sentence2", "text_b"), "label": ("label",)}
_GLUE_TSV = {"train": (("train.tsv",),), "validation": (("dev.tsv",),)}


def _glue(name: str, **kw) -> TaskSpec:
    kw.setdefault("kind", "classification")
    kw.setdefault("eval_splits", ("validation",))
    kw.setdefault("metrics", ("accuracy",))
    return TaskSpec(name=name, hub=("nyu-mll/glue", name), **kw)


GLUE: tuple[TaskSpec, ...] = (
    _glue("sst2", label_names=("negative", "positive"), text_fields=("text_a",),
          hub_columns={"sentence": "text_a", "label": "label"},
          local_files=_GLUE_TSV, local_columns={"text_a": ("sentence", "text_a", "text"), "label": ("label",)},
          glue_header=("sentence", "label")),
    _glue("mnli", label_names=("entailment", "neutral", "contradiction"), text_fields=("text_a", "text_b"),
          eval_splits=("validation_matched", "validation_mismatched"), metrics=("accuracy", "accuracy_mm"),
          hub_columns={"premise": "text_a", "hypothesis": "text_b", "label": "label"},
          local_files={"train": (("train.tsv",), ("train_sample_8999.json", "train_sample_1000.json")),
                       "validation_matched": (("dev_matched.tsv",), ("dev_matched_textfooler_1k.tsv",)),
                       "validation_mismatched": (("dev_mismatched.tsv",), ("dev_mismatched_textfooler_1k.tsv",))},
          local_columns={"text_a": ("sentence1", "premise", "text_a"), "text_b": ("sentence2", "hypothesis", "text_b"),
                         "label": ("gold_label", "label")},
          headerless=("label", "text_a", "text_b")),  # TextFooler's MNLI files
    _glue("qqp", label_names=("not_duplicate", "duplicate"), text_fields=("text_a", "text_b"),
          metrics=("accuracy", "f1"),
          hub_columns={"question1": "text_a", "question2": "text_b", "label": "label"},
          # train_sample_1000.json is a held-out sample of QQP *train*, not the official dev set (which is
          # not in the shared data); dev_first9.tsv is far too small to evaluate on.
          local_files={"train": (("train.tsv",), ("train_sample_8999.json",)),
                       "validation": (("dev.tsv",), ("train_sample_1000.json",))},
          local_columns={"text_a": ("question1", "text_a"), "text_b": ("question2", "text_b"),
                         "label": ("is_duplicate", "label")},
          glue_header=("id", "qid1", "qid2", "question1", "question2", "is_duplicate")),
    _glue("qnli", label_names=("entailment", "not_entailment"), text_fields=("text_a", "text_b"),
          hub_columns={"question": "text_a", "sentence": "text_b", "label": "label"},
          local_files={"train": (("train.tsv",), ("train_sample_8999.json", "train_sample_1000.json")),
                       "validation": (("dev.tsv",),)},
          local_columns={"text_a": ("question", "text_a"), "text_b": ("sentence", "text_b"), "label": ("label",)},
          glue_header=("index", "question", "sentence", "label")),
    _glue("cola", label_names=("unacceptable", "acceptable"), text_fields=("text_a",), metrics=("matthews",),
          hub_columns={"sentence": "text_a", "label": "label"},
          local_files={"train": (("train.tsv",), ("train_part_7695.json", "train_part_856.json")),
                       "validation": (("dev.tsv",),)},
          local_columns={"text_a": ("sentence", "text_a"), "label": ("label",)},
          headerless=("source", "label", "mark", "text_a")),  # GLUE's CoLA TSVs have no header
    _glue("stsb", kind="regression", label_names=(), text_fields=("text_a", "text_b"),
          metrics=("pearson", "spearman"),
          hub_columns={"sentence1": "text_a", "sentence2": "text_b", "label": "label"},
          local_files=_GLUE_TSV, local_columns={**_PAIR, "label": ("score", "label")},
          glue_header=("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                       "sentence2", "score")),
    _glue("mrpc", label_names=("not_equivalent", "equivalent"), text_fields=("text_a", "text_b"),
          metrics=("accuracy", "f1"),
          hub_columns={"sentence1": "text_a", "sentence2": "text_b", "label": "label"},
          local_files={"train": (("train.tsv",), ("train_part_3300.json", "train_part_367.json")),
                       "validation": (("dev.tsv",),)},
          local_columns={"text_a": ("#1 String", "sentence1", "text_a"), "text_b": ("#2 String", "sentence2", "text_b"),
                         "label": ("Quality", "label")},
          glue_header=("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")),
    _glue("rte", label_names=("entailment", "not_entailment"), text_fields=("text_a", "text_b"),
          hub_columns={"sentence1": "text_a", "sentence2": "text_b", "label": "label"},
          local_files={"train": (("train.tsv",), ("train_part_2240.json", "train_part_249.json")),
                       "validation": (("dev.tsv",),)},
          local_columns=_PAIR, glue_header=("index", "sentence1", "sentence2", "label")),
    _glue("wnli", label_names=("not_entailment", "entailment"), text_fields=("text_a", "text_b"),
          hub_columns={"sentence1": "text_a", "sentence2": "text_b", "label": "label"},
          local_files=_GLUE_TSV, local_columns=_PAIR, glue_header=("index", "sentence1", "sentence2", "label")),
)

TASKS: dict[str, TaskSpec] = {t.name: t for t in (*GLUE, SYNTHETIC, DART, WMT16_EN_RO, HELLASWAG, COMMONSENSEQA)}
