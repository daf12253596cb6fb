"""Trial groups (`tune.group_by`): the trials that differ only in the grouped dimensions run as one Ray trial.

A group's members see one stream of batches and share each teacher forward (`distill.SharedForward`), each
with its own student, projections, optimizer, schedule and random generators (`distill.fit_members`), so a
member's numbers are those of the same trial run alone. Everywhere a user looks a member is still a trial:
its own MLflow child run (id `<ray trial id>/<i>`, same name and params), its own checkpoint (subfolder
`m<i>/` of the group's), its own report row.

A grouped Ray trial's config holds the values every member shares (the other search dimensions) and, under
`MEMBERS` (as JSON), each member's values of the grouped dimensions; `members(config)` gives each member's own trial
config. A group's result holds each member's metrics under `m<i>/` (a member that failed: `m<i>/error`, its
error text), and the study's metric at the top level (the best member's), which Tune needs.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tunekd.study import Study

# a grouped Ray trial's config: JSON of [{grouped dimension: value}, ...], one per member (text: Tune would read
# a list of mappings in a config as nested search dimensions)
MEMBERS = "tunekd.group"
ERROR = "error"  # a failed member's key in the group's result (under its prefix)


def prefix(i: int) -> str:
    """Where member i's metrics are in the group's result, and its checkpoint subfolder (without the '/')."""
    return f"m{i}/"


def locate(trial_id: str) -> tuple[str, str]:
    """(the Ray trial's id, the checkpoint subfolder) of a trial id as the driver records it (MLflow tag
    `tunekd.trial_id`): a member's `<ray trial id>/<i>` gives (`<ray trial id>`, `m<i>`), a plain trial's (it, '')."""
    ray_id, sep, i = trial_id.rpartition("/")
    if sep and i.isdigit():
        return ray_id, prefix(int(i)).rstrip("/")
    return trial_id, ""


def member_values(study: Study) -> list[dict[str, Any]]:
    """Each member's values of the grouped dimensions (their grid's product, in the search's order)."""
    keys = list(study.tune.group_by)
    grids = [list(study.search[k].grid) for k in keys]
    return [dict(zip(keys, values)) for values in itertools.product(*grids)]


def grouped_space(space: dict[str, Any], study: Study) -> dict[str, Any]:
    """Tune's param space with the grouped dimensions replaced by the constant `MEMBERS` list."""
    if not study.tune.group_by:
        return space
    out = {k: v for k, v in space.items() if k not in study.tune.group_by}
    out[MEMBERS] = json.dumps(member_values(study))
    return out


def group_points(points: list[dict[str, Any]], group_by: list[str]) -> list[dict[str, Any]]:
    """Trial configs (a round of adaptive seeds) → grouped configs: those that agree on every other key are one
    group, in the order of their first member."""
    if not group_by:
        return points
    found: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for p in points:
        shared = {k: v for k, v in p.items() if k not in group_by}
        found.setdefault(repr(sorted(shared.items())), (shared, []))[1].append({k: p[k] for k in group_by if k in p})
    return [{**shared, MEMBERS: json.dumps(values)} for shared, values in found.values()]


def is_group(config: dict[str, Any]) -> bool:
    return MEMBERS in config


def members(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Each member's own trial config; a plain trial's config is its only member."""
    if not is_group(config):
        return [dict(config)]
    shared = {k: v for k, v in config.items() if k != MEMBERS}
    return [{**shared, **values} for values in json.loads(config[MEMBERS])]


@dataclass
class MemberView:
    """One member of a Ray trial as the driver sees it."""

    trial_id: str  # the member's trial id (tracker key, MLflow tag): the Ray trial's, plus /<i> in a group
    config: dict[str, Any]  # its own trial config
    result: dict[str, Any]  # its own metrics out of the Ray trial's last result
    folder: str  # its checkpoint's subfolder in the Ray trial's checkpoint ('' for a plain trial)

    @property
    def error(self) -> str | None:
        return self.result.get(ERROR)


def views(trial_id: str, config: dict[str, Any], result: dict[str, Any] | None = None) -> Iterator[MemberView]:
    """The members of Ray trial `trial_id` (one for a plain trial), with their part of `result`."""
    result = result or {}
    if not is_group(config):
        yield MemberView(trial_id, dict(config), result, "")
        return
    for i, member in enumerate(members(config)):
        p = prefix(i)
        own = {k[len(p):]: v for k, v in result.items() if k.startswith(p)}
        yield MemberView(f"{trial_id}/{i}", member, own, p.rstrip("/"))


def group_result(per_member: dict[int, dict[str, Any]], errors: dict[int, str], metric: str) -> dict[str, Any]:
    """The result a group reports for an epoch: each member's metrics under its prefix, each failed member's
    error, and at the top level the epoch and the best `metric` of the members that report it."""
    out: dict[str, Any] = {}
    for i, metrics in per_member.items():
        out.update({prefix(i) + k: v for k, v in metrics.items()})
    for i, text in errors.items():
        out[prefix(i) + ERROR] = text
    scores = [m[metric] for m in per_member.values() if metric in m]
    if scores:
        out[metric] = max(scores)
    out["epoch"] = max(int(m["epoch"]) for m in per_member.values())
    return out
