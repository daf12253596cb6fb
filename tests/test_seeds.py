"""Adaptive seeds (`tune.seeds`): the config's checks, the round planner (no Ray), and one tiny study end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from tunekd.errors import ConfigError
from tunekd.seeds import Design, plan_round, results_frame
from tunekd.study import validate

BASE = {
    "name": "s",
    "seed": 10,
    "task": {"name": "synthetic"},
    "teacher": {"model": "minilm"},
    "search": {"student.init": {"grid": ["copy", "random"]},
               "distill.strategy": {"grid": ["forward", "reverse", "none"]}},
    "tune": {"scheduler": "fifo", "seeds": {"min": 3, "max": 5, "margin": 1.0, "reference": "forward"}},
}


def _raw(**edits):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in edits.items():
        node = raw
        *head, last = dotted.split(".")
        if head and head[0] == "search":  # search keys are dotted paths themselves
            head, last = ["search"], dotted.split(".", 1)[1]
        for part in head:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


# --- the config ----------------------------------------------------------------------------------


def test_seeds_config_validates_and_design_follows_the_study():
    study = validate(_raw())
    cfg = study.tune.seeds
    assert (cfg.min, cfg.max, cfg.margin, cfg.reference, cfg.alpha) == (3, 5, 1.0, "forward", 0.05)
    d = Design.from_study(study)
    assert d.cell_keys == ("student.init",)
    assert d.cells == (("copy",), ("random",))
    assert d.strategies == ("forward", "reverse", "none")
    assert d.seeds == (10, 11, 12, 13, 14)  # study.seed + 0..max-1


@pytest.mark.parametrize("edits, words", [
    ({"tune.seeds.reference": "reverse_x"}, "reference 'reverse_x' is not one of the searched values of distill.strategy"),
    ({"search.distill.strategy": None}, "needs a search.distill.strategy grid"),
    ({"search.seed": {"grid": [0, 1]}}, "remove search.seed"),
    ({"tune.scheduler": "asha"}, "needs tune.scheduler 'fifo'"),
    ({"tune.seeds.min": 4, "tune.seeds.max": 3}, "min 4 is more than max 3"),
    ({"tune.seeds.min": 1}, "tune.seeds.min"),
    ({"tune.seeds.margin": 0}, "tune.seeds.margin"),
    ({"tune.seeds.alpha": 0.5}, "tune.seeds.alpha"),
    ({"tune.seeds.min": "3"}, "tune.seeds.min"),
    ({"tune.seeds.extra": 1}, "unknown key 'extra' in tune.seeds"),
    ({"tune.num_samples": 2}, "needs tune.num_samples 1"),
])
def test_bad_seeds_config_is_one_clear_line(edits, words):
    with pytest.raises(ConfigError) as err:
        validate(_raw(**edits))
    assert words in str(err.value) and "\n" not in str(err.value)


# --- the planner ---------------------------------------------------------------------------------


def _design(min_=3, max_=5):
    return Design.from_study(validate(_raw(**{"tune.seeds.min": min_, "tune.seeds.max": max_})))


def _frame(values: dict, design: Design, status: dict | None = None, strings: bool = False) -> pd.DataFrame:
    """values: (strategy, init, seed index) -> final accuracy."""
    records = []
    for (strategy, init, i), v in values.items():
        seed = design.seeds[i]
        params = {"distill.strategy": strategy, "student.init": init, "seed": seed}
        if strings:
            params = {k: str(x) for k, x in params.items()}
        st = (status or {}).get((strategy, init, i), "completed")
        records.append((params, st, {} if v is None else {"eval/accuracy": v}))
    return results_frame(records, design, "eval/accuracy")


def _verdict_by_hand(d, margin=1.0, design=None):
    """The look's verdict from the formulas (float64), with the design's critical values for n pairs: equivalent
    when mean ± c_eq·se lies inside ±margin, different when |mean| > c_diff·se; not via stats.sequential_test.
    Without a design: the fixed-n TOST and 95% interval (t quantiles)."""
    d = np.asarray(d, float)
    n, m, s = len(d), d.mean(), d.std(ddof=1)
    se = s / math.sqrt(n)
    if design is None:
        c_eq, c_diff = stats.t.ppf(0.95, n - 1), stats.t.ppf(0.975, n - 1)
    else:
        b = design.boundaries()
        c_eq, c_diff = b.eq[n - b.n_min], b.diff[n - b.n_min]
    if -margin < m - c_eq * se and m + c_eq * se < margin:
        return "equivalent"
    if abs(m) > c_diff * se:
        return "different"
    return "inconclusive"


def test_round_zero_runs_every_pair_at_min_seeds():
    d = _design()
    plan = plan_round(_frame({}, d), d)
    assert not plan.done
    want = {(s, init, seed) for s in ("forward", "reverse", "none") for init in ("copy", "random")
            for seed in (10, 11, 12)}
    got = {(c["distill.strategy"], c["student.init"], c["seed"]) for c in plan.needed}
    assert got == want and len(plan.needed) == len(want)  # the reference trial once per cell and seed
    assert {p["state"] for p in plan.pairs} == {"running"} and len(plan.pairs) == 4


# copy: reverse - forward = [0.1, 0.2, 0.0] (equivalent within ±1); random: [3, -2, 1] (inconclusive);
# none - forward: copy [5, 6, 5.5] (different), random [0.2, -0.1, 0.1] (equivalent). At the first look of the
# O'Brien–Fleming design (3 of 5 seeds) the boundaries are wide: [0.4, -0.3, 0.2], equivalent at a fixed n = 3,
# is inconclusive there.
DIFFS = {("reverse", "copy"): [0.1, 0.2, 0.0], ("reverse", "random"): [3.0, -2.0, 1.0],
         ("none", "copy"): [5.0, 6.0, 5.5], ("none", "random"): [0.2, -0.1, 0.1]}
REF = {"copy": [80.0, 82.0, 81.0], "random": [60.0, 55.0, 58.0]}


def _values(n=3):
    vals = {("forward", init, i): REF[init][i] for init in REF for i in range(n)}
    for (s, init), ds in DIFFS.items():
        for i in range(n):
            vals[(s, init, i)] = REF[init][i] + ds[i]
    return vals


def test_decided_pairs_stop_and_the_inconclusive_one_gets_one_more_seed():
    d = _design()
    plan = plan_round(_frame(_values(), d), d)
    by = {(p["strategy"], p["student.init"]): p for p in plan.pairs}
    for key, ds in DIFFS.items():
        assert by[key]["verdict"] == _verdict_by_hand(ds, design=d), key
        assert by[key]["n"] == 3 and by[key]["seeds"] == 3
        assert by[key]["mean_diff"] == pytest.approx(np.mean(ds))
    assert [by[k]["verdict"] for k in DIFFS] == ["equivalent", "inconclusive", "different", "equivalent"]
    assert _verdict_by_hand([0.4, -0.3, 0.2]) == "equivalent" != _verdict_by_hand([0.4, -0.3, 0.2], design=d)
    assert by[("reverse", "random")]["state"] == "more"
    assert {by[k]["state"] for k in DIFFS if k != ("reverse", "random")} == {"final"}
    # seed index 3 (= 13) for the strategy and its reference, in that cell only
    assert sorted((c["distill.strategy"], c["student.init"], c["seed"]) for c in plan.needed) == [
        ("forward", "random", 13), ("reverse", "random", 13)]
    # the same trials read back from MLflow (params as strings) plan the same
    again = plan_round(_frame(_values(), d, strings=True), d)
    assert again.needed == plan.needed and [p["verdict"] for p in again.pairs] == [p["verdict"] for p in plan.pairs]


def test_the_next_round_uses_the_new_seed_and_max_ends_it():
    d = _design(min_=3, max_=4)
    vals = _values()
    vals[("forward", "random", 3)] = 57.0
    vals[("reverse", "random", 3)] = 57.5  # d = [3, -2, 1, 0.5]: still inconclusive, but 4 = max
    plan = plan_round(_frame(vals, d), d)
    pair = next(p for p in plan.pairs if (p["strategy"], p["student.init"]) == ("reverse", "random"))
    assert pair["seeds"] == 4 and pair["n"] == 4 and pair["verdict"] == "inconclusive" == _verdict_by_hand(
        [3, -2, 1, 0.5], design=d)
    assert pair["state"] == "final" and plan.done
    # min == max: nothing beyond round 0
    d3 = _design(min_=3, max_=3)
    assert plan_round(_frame(_values(), d3), d3).done


def test_an_interrupted_round_reruns_only_its_missing_trials():
    d = _design()
    vals = _values()
    vals[("reverse", "random", 3)] = 60.0  # the strategy's seed 13 ended, its reference's did not
    plan = plan_round(_frame(vals, d), d)
    assert [(c["distill.strategy"], c["student.init"], c["seed"]) for c in plan.needed] == [("forward", "random", 13)]
    pair = next(p for p in plan.pairs if (p["strategy"], p["student.init"]) == ("reverse", "random"))
    assert pair["state"] == "running" and pair["seeds"] == 4
    # two strategies wanting more seeds in one cell share the reference's trial
    vals = _values()
    for i, dd in enumerate([3.0, -2.0, 1.0]):
        vals[("none", "random", i)] = REF["random"][i] + dd
    plan = plan_round(_frame(vals, d), d)
    assert sorted((c["distill.strategy"], c["seed"]) for c in plan.needed) == [
        ("forward", 13), ("none", 13), ("reverse", 13)]


def test_failed_trials_end_but_give_no_pair():
    d = _design(min_=3, max_=4)
    vals = _values()
    vals[("none", "copy", 1)] = None
    plan = plan_round(_frame(vals, d, status={("none", "copy", 1): "failed"}), d)
    pair = next(p for p in plan.pairs if (p["strategy"], p["student.init"]) == ("none", "copy"))
    assert pair["n"] == 2  # seeds 10 and 12: fewer than min = 3 completed pairs decide nothing
    assert pair["verdict"] == "inconclusive" and pair["state"] == "more"


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_adaptive_study_end_to_end_and_resume(tmp_path, tiny_bert_dir, study_cli, mlflow_uri, monkeypatch):
    """Cells λ=0 and λ=5, forward (reference) vs reverse, seeds min 2. With λ=0 the hidden loss is off, so
    reverse and forward train the same student: the differences are exactly 0 on every seed, which decides
    nothing (sd 0: inconclusive, with a warning; the pre-flight warns first). Every λ=5 trial is made to fail
    (TUNEKD_INJECT_FAULT): that pair has no paired value. Run 1 stops at max 2 (round 0 only); `--resume --set
    tune.seeds.max=3` is refused (a sequential design fixes max); `--resume-force` continues the same parent,
    marks its verdicts "unadjusted", reads round 0 back from MLflow and runs only seed 2 (round 1)."""
    from tests.helpers import runs

    raw = {
        "name": "seeds_e2e", "seed": 0,
        "task": {"name": "synthetic", "synthetic": {"train_size": 48, "eval_size": 16}, "max_length": 16},
        "teacher": {"model": str(tiny_bert_dir)},
        "student": {"layers": 2, "init": "copy"},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
        "search": {"distill.lambda_hid": {"grid": [0.0, 5.0]}, "distill.strategy": {"grid": ["forward", "reverse"]}},
        "tune": {"scheduler": "fifo", "resources": {"cpu": 1}, "max_concurrent_trials": 2,
                 "seeds": {"min": 2, "max": 2, "margin": 0.001, "reference": "forward"}},
    }
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("TUNEKD_INJECT_FAULT", "distill.lambda_hid=5.0")
    code, out = study_cli([study, "--tracking-uri", mlflow_uri], tmp_path)
    assert code == 0, out[-4000:]
    client, parents, children = runs(mlflow_uri, "seeds_e2e")
    assert len(parents) == 1 and len(children) == 8  # 2 cells x 2 strategies x seeds 0, 1
    parent = parents[0]
    assert parent.data.tags["tunekd.seeds.rounds"] == "1" and parent.data.tags["tunekd.seeds.state"] == "final"
    first = {(float(r.data.params["distill.lambda_hid"]), r.data.params["distill.strategy"],
              int(r.data.params["seed"])): r for r in children}
    assert set(first) == {(lam, s, seed) for lam in (0.0, 5.0) for s in ("forward", "reverse") for seed in (0, 1)}
    for (lam, s, seed), r in first.items():
        assert r.data.tags["tunekd.status"] == ("failed" if lam == 5.0 else "completed")
    for seed in (0, 1):  # the λ=0 students are the same model: equal accuracies
        assert first[(0.0, "reverse", seed)].data.metrics["eval/accuracy"] == \
            first[(0.0, "forward", seed)].data.metrics["eval/accuracy"]
    assert "adaptive seeds: eval/accuracy" in out and "reverse - forward" in out
    assert "WARNING: strategies forward, reverse run the same trial (λ = 0" in out

    code, out = study_cli([study, "--tracking-uri", mlflow_uri, "--resume", "latest", "--set", "tune.seeds.max=3"],
                          tmp_path)
    assert code == 2 and "tune.seeds.max 2 → 3" in out, out[-2000:]
    code, out = study_cli([study, "--tracking-uri", mlflow_uri, "--resume", "latest", "--resume-force",
                           "--set", "tune.seeds.max=3"], tmp_path)
    assert code == 0, out[-4000:]
    client, parents, children = runs(mlflow_uri, "seeds_e2e")
    assert len(parents) == 1 and len(children) == 12  # round 0 not run again
    new = [r for r in children if r.info.run_id not in {x.info.run_id for x in first.values()}]
    assert sorted((float(r.data.params["distill.lambda_hid"]), r.data.params["distill.strategy"],
                   int(r.data.params["seed"])) for r in new) == [(lam, s, 2) for lam in (0.0, 5.0)
                                                                  for s in ("forward", "reverse")]
    parent = client.get_run(parents[0].info.run_id)
    assert parent.data.tags["tunekd.seeds.rounds"] == "2" and parent.data.tags["tunekd.seeds.state"] == "final"
    assert parent.data.tags["tunekd.design.unadjusted"] == "true"
    assert json.loads(parent.data.tags["tunekd.design"])["seeds"]["max"] == 2  # as designed; the change is recorded
    assert parent.info.status == "FINISHED"
    path = client.download_artifacts(parent.info.run_id, "seeds/rounds.json", str(tmp_path))
    with open(path) as f:
        doc = json.load(f)
    assert [r["round"] for r in doc["rounds"]] == [0, 1]
    assert len(doc["rounds"][0]["trials"]) == 8 and len(doc["rounds"][1]["trials"]) == 4
    assert doc["rounds"][0]["ray_path"] != doc["rounds"][1]["ray_path"]
    pairs = {p["distill.lambda_hid"]: p for p in doc["pairs"]}
    assert pairs[0.0]["verdict"] == "inconclusive" and pairs[0.0]["seeds"] == 3 and pairs[0.0]["n"] == 3
    assert pairs[0.0]["mean_diff"] == 0.0 and pairs[0.0]["degenerate"]
    assert pairs[5.0]["verdict"] == "inconclusive" and pairs[5.0]["seeds"] == 3 and pairs[5.0]["n"] == 0
    assert parent.data.tags["tunekd.seeds.verdicts"] == "2 inconclusive"
    # the report on the recorded runs: no verdict from identical values, and the trials named
    from tunekd import report

    df = report.load_runs(client, "seeds_e2e")
    paired = report.paired_differences(df, "eval/accuracy", "forward", margin=0.001)
    assert paired[["n", "verdict", "mean_diff"]].values.tolist() == [[3, "inconclusive", 0.0]]  # λ=0 only completed
    assert paired["warning"].iloc[0].startswith("identical differences (sd 0) decide nothing")


def test_cell_values_match_however_they_are_written():
    """`lambda_hid: [0, 5]` in the study file: the trials log 0.0 / 5.0 (float), MLflow gives "0.0" back."""
    raw = _raw(**{"search.distill.lambda_hid": {"grid": [0, 5]}})
    d = Design.from_study(validate(raw))
    recs = [({"distill.strategy": s, "student.init": i, "distill.lambda_hid": lam, "seed": seed}, "completed",
             {"eval/accuracy": 70.0 + 0.01 * k * j})  # pairs: d = 0.01·k·(0, 1, 2), equivalent within ±1
            for k, s in enumerate(d.strategies) for i in ("copy", "random") for lam in ("0.0", 5.0)
            for j, seed in enumerate(d.seeds[:3])]
    plan = plan_round(results_frame(recs, d, "eval/accuracy"), d)
    assert plan.done and {p["verdict"] for p in plan.pairs} == {"equivalent"} and len(plan.pairs) == 8


def test_adaptive_seeds_along_lambda():
    """`compare: distill.lambda_hid`, `reference: 3.0`: the levels are the λ values, the cells the inits; a λ
    pair is planned like a strategy pair (the sequential design's boundaries with 2 pairs per cell)."""
    raw = _raw(**{"search.distill.strategy": None, "search.distill.lambda_hid": {"grid": [1, 3, 10]},
                  "tune.seeds.compare": "distill.lambda_hid", "tune.seeds.reference": 3.0})
    d = Design.from_study(validate(raw))
    assert d.factor == "distill.lambda_hid" and d.strategies == (1, 3, 10) and d.pairs_per_cell == 2
    assert d.cell_keys == ("student.init",)
    plan = plan_round(results_frame([], d, "eval/accuracy"), d)
    assert {c["distill.lambda_hid"] for c in plan.needed} == {1, 3, 10} and len(plan.needed) == 3 * 2 * 3
    recs = [({"distill.lambda_hid": str(float(lam)), "student.init": init, "seed": str(seed)}, "completed",
             {"eval/accuracy": 70.0 + (5.0 if lam == 10 else 0.0) + 0.1 * j * (lam == 1) + 0.3 * (j % 2) * (lam == 10)})
            for lam in (1, 3, 10) for init in ("copy", "random") for j, seed in enumerate(d.seeds[:3])]
    plan = plan_round(results_frame(recs, d, "eval/accuracy"), d)
    by = {(p["strategy"], p["student.init"]): p for p in plan.pairs}
    assert by[(1, "copy")]["verdict"] == _verdict_by_hand([0.0, 0.1, 0.2], design=d) == "equivalent"
    assert by[(10, "copy")]["verdict"] == _verdict_by_hand([5.0, 5.3, 5.0], design=d)
    with pytest.raises(ConfigError, match="reference 7.0 is not one of the searched values of distill.lambda_hid"):
        validate(_raw(**{"search.distill.lambda_hid": {"grid": [1, 3]}, "tune.seeds.compare": "distill.lambda_hid",
                         "tune.seeds.reference": 7.0}))
