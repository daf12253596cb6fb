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
os.environ.setdefault("TUNEKD_REPORT", "0")  # no report at the end of every study (the quickstart's test turns it on)

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


@pytest.fixture(scope="module")
def teacher(tiny_bert_dir):
    """The tiny BERT classifier as a frozen teacher (eval mode, no gradients), once per module."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models gain nothing from more, and a busy shared machine makes them crawl."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def family(teacher):
    """The model family of the module's `teacher` fixture."""
    from tunekd.models import family_for

    return family_for(teacher.config)


@pytest.fixture(scope="module")
def encoded(tiny_encoded):
    return tiny_encoded


@pytest.fixture(scope="session")
def tiny_encoded(tiny_bert_dir):
    """The synthetic task (64 train / 32 eval rows) tokenized for the tiny BERT, max length 32."""
    from transformers import AutoTokenizer

    from tunekd.data import encode_splits
    from tunekd.tasks import get_task, load_task

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    raw = load_task("synthetic", None, synthetic={"train_size": 64, "eval_size": 32})
    return encode_splits(raw, tok, get_task("synthetic"), 32)


# --- one Ray and one MLflow store for the CLI tests that can share them --------------------------


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray (2 CPUs, loopback), started once per test process (each pytest-xdist worker that needs
    one) the way the driver starts one (`driver.connect_ray`); studies run in-process use it
    (`StudyDriver.connect` leaves it running) and subprocesses can attach to its address."""
    from tunekd.driver import connect_ray

    ray = connect_ray(None, 2, log=lambda msg: None)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite MLflow store per test process for the end-to-end studies (each its own experiment): its
    tables are created once, not once per study."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def study_cli(ray_session, capsys, monkeypatch):
    """`study_cli(args, cwd, env={})` → (exit code, stdout): `python -m tunekd.run ARGS` run in this process
    (`tunekd.run.main`) in folder `cwd`, on the session's Ray."""

    def run(args, cwd, env=None):
        from tunekd import run as cli

        monkeypatch.chdir(cwd)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, str(value))
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out + err

    return run
