"""Shared fixtures: the offline environment, the real data folder, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("TUNEKD_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data folder {DATA_DIR} not found (set TUNEKD_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from tunekd.teacher import resolve_model

    return resolve_model("minilm")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model("bart" | "t5" | "qwen3" | "bert" | "bert_mc")`: the folder of that tiny fixture
    model (tunekd.fixtures: 4 layers, width 32, MiniLM's tokenizer), built once per session."""
    from tunekd.fixtures import build

    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, root / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_bert_dir(tiny_model) -> Path:
    """A tiny random-init 4-layer BERT sequence classifier (width 32) with MiniLM's tokenizer."""
    return tiny_model("bert")


@pytest.fixture(scope="session")
def tiny_encoded(tiny_bert_dir):
    """The synthetic task (64 train / 32 eval rows) tokenized for the tiny BERT, max length 32."""
    from transformers import AutoTokenizer

    from tunekd.data import encode_splits
    from tunekd.tasks import get_task, load_task

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    raw = load_task("synthetic", None, synthetic={"train_size": 64, "eval_size": 32})
    return encode_splits(raw, tok, get_task("synthetic"), 32)
