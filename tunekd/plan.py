"""A trial's plan, resolved from its config and the teacher's depth: the layer map and the copied layers.

`Trials` is the one memoised resolution per trial, `config → Trial(study, plan)`, shared by the
driver (pre-flight checks, MLflow params, the export of a trained student), the teacher-output cache
(which layers to store) and the trainable (what to train): all of them ask it, so they agree, and
a config is validated and resolved once per process. `trial_points` lists the configs that stand
for the whole search space when checking it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tunekd import mapping
from tunekd.study import SearchDim, Study, flatten

# a randint dimension with at most this many values is checked (and cached) at every value
RANDINT_EVERY_VALUE = 1024


@dataclass(frozen=True)
class Plan:
    layer_map: list[tuple[int, int]]
    copied_layers: list[int] | None
    match_embeddings: bool

    def params(self, study: Study) -> dict[str, Any]:
        """The trial's MLflow params: its whole resolved config, dotted, plus the resolved map."""
        raw = study.model_dump(mode="json", exclude={"search", "tune", "tracking", "name"})
        params = flatten(raw)
        params["distill.match_embeddings"] = self.match_embeddings
        params["distill.layer_map"] = [list(p) for p in self.layer_map]
        params["student.copied_layers"] = self.copied_layers
        return params


def resolve(study: Study, teacher_layers: int, match_embeddings_default: bool) -> Plan:
    d = study.distill
    mapping.validate_depths(teacher_layers, study.student.layers)
    match = match_embeddings_default if d.match_embeddings is None else d.match_embeddings
    layer_map = mapping.resolve_layer_map(d.strategy, teacher_layers, study.student.layers,
                                          match_embeddings=match, seed=study.seed)
    copied = (mapping.copy_layer_indices(study.student.copy_layers, teacher_layers, study.student.layers)
              if study.student.init == "copy" else None)
    return Plan(layer_map=[tuple(p) for p in layer_map], copied_layers=copied, match_embeddings=match)


@dataclass(frozen=True)
class Trial:
    """One trial, resolved: its own study (the search's values applied, `search` emptied) and its plan."""

    study: Study
    plan: Plan

    def params(self) -> dict[str, Any]:
        return self.plan.params(self.study)


def config_key(config: Mapping[str, Any]) -> str:
    """A canonical text of a trial config (dotted search values), for memoising."""
    return json.dumps({str(k): config[k] for k in sorted(config)}, sort_keys=True, default=repr)


class Trials:
    """`trials(config)`: the memoised resolution of one trial config (a dict of dotted search values, as
    Tune hands it to the trainable and the callbacks) against the teacher's depth."""

    def __init__(self, study: Study, teacher_layers: int, match_embeddings_default: bool):
        self.study = study
        self.teacher_layers = teacher_layers
        self.match_embeddings_default = match_embeddings_default
        self._memo: dict[str, Trial] = {}

    def __call__(self, config: Mapping[str, Any] | None = None) -> Trial:
        config = config or {}
        key = config_key(config)
        found = self._memo.get(key)
        if found is None:
            t_study = self.study.trial(dict(config))
            found = Trial(t_study, resolve(t_study, self.teacher_layers, self.match_embeddings_default))
            self._memo[key] = found
        return found


# --- the configs that stand for a search space -------------------------------------------------


def dimension_values(dim: SearchDim) -> list[Any]:
    """The values of one dimension that stand for it when checking a study: every grid/choice value,
    every integer of a randint (up to RANDINT_EVERY_VALUE of them, else its bounds), the bounds of a
    uniform/loguniform."""
    if dim.kind == "randint":
        low, high = int(dim.value[0]), int(dim.value[1])
        if high - low + 1 <= RANDINT_EVERY_VALUE:
            return list(range(low, high + 1))
    return list(dim.value)


def trial_points(study: Study, limit: int = 10_000) -> Iterator[dict[str, Any]]:
    """Every combination of the values of `dimension_values` (at most `limit` of them)."""
    names = list(study.search)
    values = [dimension_values(study.search[n]) for n in names]
    for combo in itertools.islice(itertools.product(*values), limit):
        yield dict(zip(names, combo))
