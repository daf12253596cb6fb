"""The per-trial resolution: one memoised `config → (trial study, plan)`, and the configs that stand for a
search space (every grid/choice value, every integer of a randint, the bounds of a continuous range)."""

from __future__ import annotations

import pickle

from tunekd import plan
from tunekd.study import Study


def study(**extra) -> Study:
    return Study.model_validate({"name": "p", "task": {"name": "synthetic"}, "teacher": {"model": "minilm"},
                                 "student": {"layers": 3}, **extra})


def test_trials_resolve_once_per_config():
    trials = plan.Trials(study(), 6, True)
    a = trials({"distill.strategy": "reverse", "seed": 1})
    assert trials({"seed": 1, "distill.strategy": "reverse"}) is a  # key order does not matter
    assert a.study.distill.strategy == "reverse" and a.study.seed == 1 and a.study.search == {}
    assert a.plan == plan.resolve(a.study, 6, True)
    assert a.plan.layer_map == [(0, 0), (1, 6), (2, 4), (3, 2)]
    assert trials({"distill.strategy": "forward", "seed": 1}) is not a
    assert trials() is trials({})  # the study as it is


def test_trial_params_are_the_plans():
    trials = plan.Trials(study(), 6, True)
    t = trials({"student.init": "copy"})
    params = t.params()
    assert params == t.plan.params(t.study)
    # one numbering: the copied teacher layers are the forward map's teacher layers fwd(i) = 2, 4, 6 (1-based),
    # the modules 1, 3, 5 (0-based) the student was built from
    assert t.plan.copied_layers == [1, 3, 5]
    assert params["student.copied_teacher_layers"] == [2, 4, 6] and "student.copied_layers" not in params
    assert params["distill.layer_map"] == [[0, 0], [1, 2], [2, 4], [3, 6]]


def test_trial_points_take_every_discrete_value_and_continuous_bounds():
    s = study(search={"student.layers": {"randint": [1, 3]}, "train.lr": {"loguniform": [1e-5, 1e-3]},
                      "distill.strategy": {"choice": ["forward", "none"]}}, tune={"searcher": "random"})
    points = list(plan.trial_points(s))
    assert len(points) == 3 * 2 * 2
    assert {p["student.layers"] for p in points} == {1, 2, 3}
    assert {p["train.lr"] for p in points} == {1e-5, 1e-3}
    wide = study(search={"seed": {"randint": [0, plan.RANDINT_EVERY_VALUE * 10]}}, tune={"searcher": "random"})
    assert [p["seed"] for p in plan.trial_points(wide)] == [0, plan.RANDINT_EVERY_VALUE * 10]


def test_trial_callback_pickles_without_its_driver():
    """Tune pickles callbacks into its experiment state: the driver (MLflow client, teacher, data) stays out."""
    from tunekd.driver import TrialCallback

    cb = TrialCallback(driver=object())
    back = pickle.loads(pickle.dumps(cb))
    assert isinstance(back, TrialCallback) and back.driver is None


def test_identical_trials_are_warned_about():
    """A 1-layer student: forward and reverse resolve to the same map; λ = 0 makes every matching
    strategy the `none` trial. The warnings name them; distinct maps give none."""
    strategies = {"grid": ["none", "forward", "reverse", "all_to_one"]}
    one = study(student={"layers": 1}, search={"distill.strategy": strategies, "seed": {"grid": [0, 1]}})
    warnings = plan.identical_trials(plan.Trials(one, 6, True), list(plan.trial_points(one)))
    assert len(warnings) == 1
    assert warnings[0].startswith("strategies forward, reverse run the same trial (the same layer map "
                                  "[[0, 0], [1, 6]])") and "decide nothing" in warnings[0]
    zero = study(distill={"lambda_hid": 0.0}, search={"distill.strategy": strategies})
    warnings = plan.identical_trials(plan.Trials(zero, 6, True), list(plan.trial_points(zero)))
    assert len(warnings) == 1 and warnings[0].startswith("strategies none, forward, reverse, all_to_one run the same "
                                                         "trial (λ = 0 or no pairs")
    three = study(search={"distill.strategy": strategies})
    assert plan.identical_trials(plan.Trials(three, 6, True), list(plan.trial_points(three))) == []
