"""The study file: schema validation with one clear line, --set overrides, search dimensions."""

from __future__ import annotations

import pytest
import yaml

from tunekd.errors import ConfigError
from tunekd.study import SEARCHABLE, apply_overrides, load_study, validate

BASE = {
    "name": "t",
    "task": {"name": "synthetic"},
    "teacher": {"model": "minilm"},
}


def _with(**sections):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in sections.items():
        raw[key] = value
    return raw


def test_defaults_follow_the_paper():
    s = validate(BASE)
    assert (s.distill.alpha_ce, s.distill.alpha_kl, s.distill.lambda_hid) == (1.0, 1.0, 3.0)
    assert s.distill.reduction == "element_mean" and s.distill.hidden_normalize == "none"
    assert s.tracking.uri == "sqlite:///mlflow.db" and s.experiment == "t"


@pytest.mark.parametrize("raw, words", [
    (_with(distill={"strategy": "foward"}), ["unknown strategy 'foward'", "did you mean 'forward'"]),
    (_with(distill={"lamda_hid": 3}), ["unknown key 'lamda_hid' in distill", "did you mean 'lambda_hid'"]),
    (_with(distill={"lambda_hid": -1}), ["distill.lambda_hid", "greater than or equal to 0"]),
    (_with(distill={"temperature": 0}), ["distill.temperature", "greater than 0"]),
    (_with(distill={"reduction": "sum"}), ["distill.reduction", "'element_mean'"]),
    (_with(student={"layers": 0}), ["student.layers"]),
    (_with(student={"layers": "three"}), ["student.layers", "integer"]),
    (_with(student={"init": "copied"}), ["student.init", "'random'", "'copy'"]),
    (_with(student={"copy_layers": "spred"}), ["unknown copy_layers 'spred'", "did you mean 'spread'"]),
    (_with(tune={"searcher": "bayes"}), ["tune.searcher"]),
    ({"name": "t", "task": {"name": "sst2"}}, ["teacher: required key is missing"]),
    (_with(search={"distill.strategy": {"grid": ["forward", "bogus"]}}), ["search.distill.strategy", "'bogus'"]),
    (_with(search={"distill.lambda": {"grid": [1]}}), ["unknown search dimension 'distill.lambda'", "lambda_hid"]),
    (_with(search={"train.lr": {"loguniform": [0.1, 0.01]}}), ["low < high"]),
    (_with(search={"train.lr": {"uniform": [0.1, 0.2]}}), ["searcher 'grid' takes only grid"]),
    (_with(search={"train.lr": {"grid": [1e-4]}}, tune={"searcher": "optuna"}), ["optuna use 'choice'"]),
])
def test_bad_input_is_one_clear_line(raw, words):
    with pytest.raises(ConfigError) as info:
        validate(raw, "s.yaml")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("s.yaml: ")
    for w in words:
        assert w in msg, msg


def test_malformed_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: t\ntask: {name: synthetic\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        load_study(f)


def test_yaml_never_executes_code(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\ntask: {name: synthetic}\nteacher: {model: minilm}\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_study(f)


def test_overrides_set_values_and_search_dims():
    raw = apply_overrides(BASE, ["train.epochs=2", "distill.strategy=reverse", "task.data_dir=/x/y",
                                 "search.distill.lambda_hid.grid=[0, 3]", "search.seed={grid: [1, 2]}"])
    s = validate(raw)
    assert s.train.epochs == 2 and s.distill.strategy == "reverse" and s.task.data_dir == "/x/y"
    assert s.search["distill.lambda_hid"].grid == [0, 3]
    assert s.search["seed"].grid == [1, 2]
    s2 = validate(apply_overrides(raw, ["search.seed=null"]))
    assert "seed" not in s2.search


def test_trial_applies_overrides_and_drops_search():
    s = validate(_with(search={"distill.strategy": {"grid": ["forward", "reverse"]}}))
    t = s.trial({"distill.strategy": "reverse", "student.layers": 2, "seed": 7})
    assert t.distill.strategy == "reverse" and t.student.layers == 2 and t.seed == 7 and t.search == {}
    with pytest.raises(Exception):
        s.trial({"distill.strategy": "nope"})


def test_per_value_settings_go_with_their_value_only():
    """`per_value`: a learning rate per init. Each trial at that value has the setting, the others keep the study's;
    it survives the JSON the trials receive (keys become text there), and numeric grid values match too."""
    from tunekd.study import Study

    s = validate(_with(train={"lr": 5e-4}, search={
        "student.init": {"grid": ["copy", "random"], "per_value": {"random": {"train.lr": 1e-3, "train.epochs": 5}}},
        "distill.lambda_hid": {"grid": [1, 3], "per_value": {3: {"distill.temperature": 2.0}}}}))
    for study in (s, Study.model_validate_json(s.model_dump_json())):
        random, copy = (study.trial({"student.init": init, "distill.lambda_hid": 1}) for init in ("random", "copy"))
        assert (random.train.lr, random.train.epochs) == (1e-3, 5)
        assert (copy.train.lr, copy.train.epochs) == (5e-4, s.train.epochs)
        assert study.trial({"student.init": "copy", "distill.lambda_hid": 3}).distill.temperature == 2.0
        assert study.trial({"student.init": "copy", "distill.lambda_hid": 1}).distill.temperature == s.distill.temperature
    assert s.linked_settings({"student.init": "random"}) == {"train.lr": 1e-3, "train.epochs": 5}
    assert s.linked_settings({"student.init": "copy"}) == {}


def test_explicit_layer_map_is_a_strategy():
    s = validate(_with(distill={"strategy": [[1, 2], [2, 4]]}))
    assert s.distill.strategy == [(1, 2), (2, 4)]


def test_searchable_paths_cover_the_paper_dimensions():
    for p in ("distill.strategy", "distill.lambda_hid", "student.init", "student.layers", "train.lr",
              "distill.temperature", "student.copy_layers"):
        assert p in SEARCHABLE


def test_shipped_study_files_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "search_spaces"
    files = sorted(root.rglob("*.yaml"))
    assert files
    for f in files:
        load_study(f)
