"""experiments/rederive.py: the committed run logs parse into trials that reproduce the committed paired tables
(n, mean_diff, sd per pair), and the corrected rules re-derive a committed verdict. No Ray, no MLflow, no files
written."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
GR = ROOT / "experiments" / "glue_repro" / "results"


@pytest.fixture(scope="module")
def rederive():
    spec = importlib.util.spec_from_file_location("rederive", ROOT / "experiments" / "rederive.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rederive"] = mod  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("rederive", None)


@pytest.fixture(scope="module")
def sst2_copy(rederive):
    return rederive.parse_log(GR / "logs" / "sst2_copy.txt")


def test_log_parses_into_trials_and_design(sst2_copy):
    t = sst2_copy.trials
    assert len(t) == 19 and set(t["init"]) == {"copy"} and set(t["metric"]) == {"eval/accuracy"}
    assert (t["epoch"] == 2).all() and (t["status"] == "completed").all() and (t["rows"] == 872).all()
    # 4 seeds for the pairs still undecided after 3, 3 for reverse (decided at 3): the adaptive rounds
    assert t.groupby("strategy")["seed"].max().to_dict() == {"all_to_one": 3, "forward": 3, "none": 3,
                                                             "random": 3, "reverse": 2}
    assert sst2_copy.seeds == {"min": 3, "max": 4, "margin": 1.0, "reference": "forward"}
    assert sst2_copy.chance == 50.92
    # the exact accuracy is a count of the 872 dev rows that prints as the logged value
    row = t[t["trial"] == "forward·copy·S3·λ3·s3"].iloc[0]
    assert row["correct"] == 736 and row["value"] == 736 / 872 * 100 and row["printed"] == "84.40"


def test_parsed_pairs_reproduce_the_committed_paired_csv(rederive, sst2_copy):
    runs = rederive.runs_frame(sst2_copy.trials)
    committed = pd.read_csv(GR / "sst2" / "vs_forward" / "paired.csv")
    committed = committed[committed["init"] == "copy"]
    assert len(committed) == 4
    check = rederive.check_old(runs, committed, "forward", "distill.strategy")
    assert check["match"].all()
    # by hand as well: n and mean difference of each pair against the committed numbers
    wide = runs.pivot(index="seed", columns="distill.strategy", values="eval/accuracy")
    for r in committed.itertuples():
        d = (wide[r.strategy] - wide["forward"]).dropna()
        assert len(d) == r.n and d.mean() == pytest.approx(r.mean_diff, abs=1e-12)
        assert d.std(ddof=1) == pytest.approx(r.sd_diff, rel=1e-9)


def test_corrected_rules_re_derive_the_committed_verdicts(rederive, sst2_copy):
    runs = rederive.runs_frame(sst2_copy.trials)
    # reverse - forward, copy init: "different" at the first look under the old rules; the sequential design's
    # difference boundary at 3 of 3..4 seeds (α/4, O'Brien–Fleming) is far wider
    old = pd.read_csv(GR / "sst2" / "vs_forward" / "paired.csv")
    old = old[old["init"] == "copy"]
    new, claims = rederive.rederive([sst2_copy], runs, old, rederive.Table("x", "forward"))
    rev = new.set_index("strategy").loc["reverse"]
    assert old.set_index("strategy").loc["reverse", "verdict"] == "different"
    assert rev["verdict"] == "inconclusive" and rev["look"] == 3 and rev["c_diff"] > 10
    assert abs(rev["mean_diff"]) / (rev["sd_diff"] / math.sqrt(3)) < rev["c_diff"]
    assert list(claims["headline"]) == ["not shown"]
    # reverse - none, copy init: 9 of 872 rows apart at each seed: identical differences decide nothing
    old = pd.read_csv(GR / "sst2" / "vs_none" / "paired.csv")
    old = old[old["init"] == "copy"]
    new, _ = rederive.rederive([sst2_copy], runs, old, rederive.Table("x", "none"))
    rev = new.set_index("strategy").loc["reverse"]
    assert old.set_index("strategy").loc["reverse", "verdict"] == "different"
    assert rev["verdict"] == "inconclusive" and rev["sd_diff"] == 0.0 and rev["warning"].startswith("identical")
