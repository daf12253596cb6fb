"""Trial groups (issue 21): the strategies of one seed trained side by side on one stream of batches, one
teacher forward per batch, give each member exactly the numbers of its trial run alone; a member with a
non-finite loss ends alone; a group restores every member from its checkpoint; `tune.group_by` is checked
up front; a grouped study records each member as its own child run, equal to the ungrouped study's."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from tunekd import distill, groups
from tunekd.errors import ConfigError
from tunekd.study import Study, validate

pytestmark = pytest.mark.usefixtures("one_thread")

STRATEGIES = ["none", "forward", "reverse", "all_to_one", "random"]


def group_study(epochs=2, search=None, **tune) -> Study:
    return Study.model_validate({
        "name": "g", "task": {"name": "synthetic", "max_length": 32}, "teacher": {"model": "minilm"},
        "student": {"layers": 3, "init": "random"},
        "distill": {"strategy": "forward", "alpha_ce": 0.5, "alpha_kl": 1.0, "lambda_hid": 1.0},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 1e-3},
        "search": search or {"distill.strategy": {"grid": STRATEGIES}},
        "tune": {"scheduler": "fifo", "group_by": ["distill.strategy"], **tune}})


def _comparable(history):
    return [{k: v for k, v in h.items() if k.startswith(("train/", "eval/")) or k == "epoch"} for h in history]


def _grouped_config(study):
    (config,) = [groups.grouped_space({}, study)]
    return config


class Forwards:
    """Counts the teacher model's forwards (a pre-hook on the worker's memoised teacher)."""

    def __init__(self, shared):
        from tunekd.tasks import spec_for

        self.n = 0
        self.handle = shared.teacher(spec_for(shared.trials()({}).study.task)).register_forward_pre_hook(self.hook)

    def hook(self, *args):
        self.n += 1


def test_a_group_of_all_five_strategies_equals_each_trial_alone(family, teacher, encoded):
    """Bitwise on the CPU in fp32: every loss and metric of every epoch of each member equals its trial run
    alone; the teacher runs once per batch for the group instead of once per batch per trial."""
    from tunekd.trainable import make_shared, run_group, run_trial

    assert teacher.config.hidden_dropout_prob > 0  # dropout draws: the members' own generators matter
    study = group_study()
    shared = make_shared(study, family.name, teacher, encoded)
    forwards = Forwards(shared)
    alone = {s: run_trial({"distill.strategy": s}, shared) for s in STRATEGIES}
    solo_forwards, forwards.n = forwards.n, 0
    torch.rand(1000)  # the global generator moves on in between: each member starts from its trial's state
    together = run_group(groups.members(_grouped_config(study)), shared)
    batches = 2 * -(-len(encoded["train"]) // 16)
    assert solo_forwards == 5 * batches and forwards.n == batches
    assert [m[0]["perf/group_size"] for m in together] == [5.0] * 5
    for s, history in zip(STRATEGIES, together):
        assert _comparable(history) == _comparable(alone[s]), s
        assert [h["perf/teacher_rows"] for h in history] == [h["perf/teacher_rows"] for h in alone[s]]
    # the strategies do train different students (the comparison can fail)
    assert len({h[-1]["train/loss_hid"] for h in together}) == 5


def test_without_their_own_generators_the_members_would_differ(family, teacher, encoded, monkeypatch):
    """The control: members drawing dropout from one global generator do not reproduce their trials."""
    from tunekd.trainable import make_shared, run_group, run_trial

    study = group_study(epochs=1, search={"distill.strategy": {"grid": ["forward", "reverse"]}})
    shared = make_shared(study, family.name, teacher, encoded)
    alone = [run_trial({"distill.strategy": s}, shared) for s in ("forward", "reverse")]
    monkeypatch.setattr(distill, "set_generator_states", lambda states: None)
    together = run_group(groups.members(_grouped_config(study)), shared)
    assert [_comparable(h) != _comparable(a) for h, a in zip(together, alone)] == [True, True]


def test_a_member_with_a_non_finite_loss_ends_alone(family, teacher, encoded):
    """λ_hid 1e38 makes one member's loss infinite: it ends with NonFiniteLoss, the other trains on and its
    numbers are still those of its trial alone; the group reports the failure under the member's prefix."""
    from tunekd.trainable import make_shared, run_group, run_trial

    study = group_study(epochs=2, search={"distill.lambda_hid": {"grid": [1.0, 1e38]}},
                        group_by=["distill.lambda_hid"])
    shared = make_shared(study, family.name, teacher, encoded)
    alone = run_trial({"distill.lambda_hid": 1.0}, shared)
    with pytest.raises(distill.NonFiniteLoss):
        run_trial({"distill.lambda_hid": 1e38}, shared)
    reports = []
    together = run_group(groups.members(_grouped_config(study)), shared,
                         report=lambda metrics, folder: reports.append(dict(metrics)))
    assert _comparable(together[0]) == _comparable(alone) and together[1] == []
    assert [r["epoch"] for r in reports] == [1, 2]
    assert all("non-finite loss" in r["m1/error"] and "m0/eval/accuracy" in r for r in reports)
    assert reports[-1]["eval/accuracy"] == alone[-1]["eval/accuracy"]
    with pytest.raises(distill.NonFiniteLoss):  # none left: the group fails
        run_group([{"distill.lambda_hid": 1e38}] * 2, shared)


def test_a_restored_group_continues_every_member_exactly(family, teacher, encoded, tmp_path):
    """Epoch 1, the group's checkpoint (one subfolder per member), a fresh group restored from it for epochs
    2-3: every member's numbers equal the uninterrupted group's."""
    from tunekd import checkpoints
    from tunekd.trainable import make_shared, run_group

    study = group_study(epochs=3, search={"distill.strategy": {"grid": ["forward", "reverse", "none"]}})
    shared = make_shared(study, family.name, teacher, encoded)
    members = groups.members(_grouped_config(study))
    straight = run_group(members, shared)

    class Stop(Exception):
        pass

    def stop_after_first(metrics, folder):
        shutil.copytree(folder, tmp_path / "ckpt1")
        raise Stop

    with pytest.raises(Stop):
        run_group(members, shared, report=stop_after_first)
    assert sorted(p.name for p in (tmp_path / "ckpt1").iterdir()) == ["m0", "m1", "m2"]
    assert (tmp_path / "ckpt1" / "m1" / checkpoints.RNG).is_file()
    torch.rand(1000)
    resumed = run_group(members, shared, restore_dir=str(tmp_path / "ckpt1"))
    for a, b in zip(resumed, straight):
        assert [h["epoch"] for h in a] == [2, 3]
        assert _comparable(a) == _comparable(b[1:])


def test_group_points_and_views():
    points = [{"seed": s, "distill.strategy": t} for s in (3, 4) for t in ("forward", "reverse")]
    grouped = groups.group_points(points, ["distill.strategy"])
    assert grouped == [{"seed": 3, groups.MEMBERS: [{"distill.strategy": "forward"}, {"distill.strategy": "reverse"}]},
                       {"seed": 4, groups.MEMBERS: [{"distill.strategy": "forward"}, {"distill.strategy": "reverse"}]}]
    assert [m for g in grouped for m in groups.members(g)] == points
    result = groups.group_result({0: {"epoch": 2, "eval/accuracy": 60.0}, 1: {"epoch": 2, "eval/accuracy": 70.0}},
                                 {2: "NonFiniteLoss: x"}, "eval/accuracy")
    assert result["eval/accuracy"] == 70.0 and result["epoch"] == 2
    config = {"seed": 3, groups.MEMBERS: [{"distill.strategy": s} for s in ("a", "b", "c")]}
    views = list(groups.views("t1", config, result))
    assert [(v.trial_id, v.folder, v.error) for v in views] == [
        ("t1/0", "m0", None), ("t1/1", "m1", None), ("t1/2", "m2", "NonFiniteLoss: x")]
    assert views[1].result == {"epoch": 2, "eval/accuracy": 70.0} and views[1].config == {"seed": 3,
                                                                                           "distill.strategy": "b"}
    (plain,) = groups.views("t2", {"seed": 1}, {"epoch": 1})
    assert (plain.trial_id, plain.folder, plain.result) == ("t2", "", {"epoch": 1})


BASE = {"name": "g", "task": {"name": "synthetic"}, "teacher": {"model": "minilm"}, "search": {"distill.strategy": {"grid": ["forward", "none"]},
                                                                "train.batch_size": {"grid": [8, 16]}},
        "tune": {"scheduler": "fifo", "group_by": ["distill.strategy"]}}


@pytest.mark.parametrize("edit, words", [
    ({"scheduler": "asha"}, "tune.group_by needs tune.scheduler 'fifo'"),
    ({"group_by": ["train.batch_size"]}, "'train.batch_size' changes the teacher or the batches"),
    ({"group_by": ["distill.lambda_hid"]}, "'distill.lambda_hid' is not a grid dimension of the search; allowed: "
                                           "distill.strategy"),
    ({"group_by": ["distill.strategy", "distill.strategy"]}, "names a dimension twice"),
])
def test_bad_group_by_is_one_clear_line(edit, words):
    raw = {**BASE, "tune": {**BASE["tune"], **edit}}
    with pytest.raises(ConfigError) as exc:
        validate(raw, "s.yaml")
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_grouped_space_keeps_the_other_dimensions():
    study = validate(BASE)
    space = groups.grouped_space({"distill.strategy": "S", "train.batch_size": "B"}, study)
    assert space == {"train.batch_size": "B", groups.MEMBERS: [{"distill.strategy": "forward"},
                                                                {"distill.strategy": "none"}]}
