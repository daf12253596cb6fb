"""`tunekd report` refuses a --reference before it makes --out: one line, exit 2, no folder left behind (also
when the refusal comes from the statistics, after the folder was made)."""

from __future__ import annotations

import itertools

import pytest

from tests.test_report import Store
from tunekd import report


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("mlflow"))
    exp = s.experiment("refs")
    parent = s.parent(exp)
    for strategy, seed in itertools.product(("forward", "reverse"), (0, 1)):
        s.trial(exp, parent, strategy=strategy, seed=seed, metrics={"eval/accuracy": 70.0 + seed})
    s.trial(exp, parent, strategy="random", seed=0, status="failed", error="RuntimeError: boom")
    return s


@pytest.mark.parametrize("reference, words", [
    ("spread", ["unknown --reference strategy 'spread'; known: forward, reverse, random"]),  # never ran
    ("random", ["unknown reference (no trials at that value) 'random'"]),  # ran, but no trial completed
])
def test_refused_reference_leaves_no_out_folder(reference, words, store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "rr" / "nested"
    code = report.main(["--experiment", "refs", "--tracking-uri", store.uri, "--reference", reference,
                        "--out", str(out), "--no-log"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tunekd: error: ") and "\n" not in err, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "rr").exists()
