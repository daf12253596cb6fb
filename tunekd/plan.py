"""A trial's plan, resolved from its config and the teacher's depth: the layer map and the copied layers.

`Trials` is the one memoised resolution per trial, `config → Trial(study, plan)`, shared by the
driver (pre-flight checks, MLflow params, the export of a trained student), the teacher-output cache
(which layers to store) and the trainable (what to train): all of them ask it, so they agree, and
a config is validated and resolved once per process. `trial_points` lists the configs that stand
for the whole search space when checking it. `describe_loss` is the one-line account of the loss a trial computes (printed by `--dry-run`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tunekd import describe, mapping
from tunekd.study import SearchDim, Study, flatten

# a randint dimension with at most this many values is checked (and cached) at every value
RANDINT_EVERY_VALUE = 1024


@dataclass(frozen=True)
class Plan:
    layer_map: list[tuple[int, int]]
    copied_layers: list[int] | None
    match_embeddings: bool
    permutation: list[int] | None = None  # π(1..S) of a `random` map; None for other strategies
    map_seed: int | None = None  # the seed π was drawn from (distill.map_seed, else the trial's seed)

    def params(self, study: Study) -> dict[str, Any]:
        """The trial's MLflow params: its whole resolved config, dotted, plus the resolved map."""
        raw = study.model_dump(mode="json", exclude={"search", "tune", "tracking", "name"})
        params = flatten(raw)
        params["distill.match_embeddings"] = self.match_embeddings
        params["distill.layer_map"] = [list(p) for p in self.layer_map]
        # one numbering in every output (`describe.NUMBERING`): the copied teacher layers 1-based, like the map
        params["student.copied_teacher_layers"] = describe.copied_teacher_layers(self.copied_layers)
        if self.permutation is not None:
            params["distill.random_permutation"] = list(self.permutation)
            params["distill.map_seed_used"] = self.map_seed
        return params


def resolve(study: Study, teacher_layers: int, match_embeddings_default: bool) -> Plan:
    d = study.distill
    mapping.validate_depths(teacher_layers, study.student.layers)
    match = match_embeddings_default if d.match_embeddings is None else d.match_embeddings
    draw = d.random_draw
    map_seed = d.map_seed
    seed = study.seed if map_seed is None else map_seed
    layer_map = mapping.resolve_layer_map(d.strategy, teacher_layers, study.student.layers,
                                          match_embeddings=match, seed=seed, random_draw=draw)
    perm = (mapping.random_permutation(study.student.layers, seed, draw=draw)
            if isinstance(d.strategy, str) and d.strategy == "random" else None)
    copied = (mapping.copy_layer_indices(study.student.copy_layers, teacher_layers, study.student.layers)
              if study.student.init == "copy" else None)
    return Plan(layer_map=[tuple(p) for p in layer_map], copied_layers=copied, match_embeddings=match,
                permutation=perm, map_seed=seed if perm is not None else None)


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


# --- the loss a trial computes, in words (printed by `python -m tunekd.run ... --dry-run`) ----------

_REDUCTION = {
    "element_mean": "Σ(t−s)² / (N·H)",
    "token_sum": "Σ(t−s)² / N",
    "paper": "Σ(t−s)² / (B·N)",
    "token_sum_padded": "[Σ_H(t−s)² at every position, padding included] / (B·L) × N/(B·L)",
}
_NORMALIZE = {
    "none": "no normalisation",
    "layernorm": "layer norm per position",
    "l2": "l2 per position",
    "layernorm_tensor": "layer norm over each pair's whole tensor (statistics of valid positions)",
    "layernorm_tensor_padded": "layer norm over each pair's whole (B, L, H) tensor (padding in the statistics)",
}


def describe_loss(study: Study, family=None) -> str:
    """One line: the loss this trial config computes, with its formula (docs/method.md "The loss"). `family` (a
    `models.Family`, or None) decides whether logits are per example or per token (None: from the
    task kind alone) and the default for matching embeddings."""
    from tunekd.tasks import spec_for

    d = study.distill
    kind = spec_for(study.task).kind
    name = getattr(family, "name", None)
    token_level = name in ("seq2seq", "decoder") if name is not None else kind == "generation"
    if not token_level:
        kl_where = "per example"
    elif d.kl_positions == "sequence":
        kl_where = "over every position of the sequence (context and answer)"
    else:
        kl_where = "over the target tokens"
    if d.hidden_loss == "cosine":
        pair = "1 − cos per valid position, mean"
    else:
        pair = f"mse {_REDUCTION[d.reduction]} [{d.reduction}]"
    hid = (f"L_hid = {'Σ' if d.aggregate == 'sum' else 'mean'} over pairs of ({pair}; "
           f"{_NORMALIZE[d.hidden_normalize]} [{d.hidden_normalize}])")
    if name == "seq2seq" or (name is None and kind == "generation"):
        hid += ", encoder + decoder stacks added"
    if (isinstance(d.strategy, str) and d.strategy == "none") or d.lambda_hid == 0:
        hid = "L_hid off (strategy none or λ = 0)"
    if kind == "regression":  # a one-output head: no distribution, so no KL and no temperature
        parts = [f"loss = {d.alpha_ce:g}·MSE(label) + {d.alpha_kl:g}·MSE(teacher output) + {d.lambda_hid:g}·L_hid",
                 "output term: mean squared difference of the student's and the teacher's outputs, per example "
                 "(regression: no KL, distill.temperature not used; logged as loss_out_mse)", hid]
    else:
        parts = [f"loss = {d.alpha_ce:g}·CE + {d.alpha_kl:g}·KL + {d.lambda_hid:g}·L_hid",
                 f"KL: τ = {d.temperature:g}, × τ², {kl_where} [kl_positions: {d.kl_positions}]", hid]
    match = d.match_embeddings if d.match_embeddings is not None else getattr(family, "match_embeddings_default", None)
    parts.append(f"embeddings matched: {({None: 'family default', True: 'yes', False: 'no'})[match]}")
    if isinstance(d.strategy, str) and d.strategy == "random":
        seed = "the trial's seed" if d.map_seed is None else f"map_seed {d.map_seed}"
        draw = ("neither forward nor reverse" if d.random_draw == "nontrivial"
                else "unrestricted, the paper's (may equal forward or reverse)")
        parts.append(f"random π: {draw}, from {seed}")
    if study.student.freeze_embeddings:
        parts.append("student embeddings frozen")
    return "; ".join(parts)


def describe_losses(trials: "Trials", points, family=None) -> list[str]:
    """The distinct `describe_loss` lines over the trials at `points`, each with how many trials use it."""
    seen: dict[str, int] = {}
    for point in points:
        line = describe_loss(trials(point).study, family)
        seen[line] = seen.get(line, 0) + 1
    return [f"  {line}  ({n} trial{'s' if n != 1 else ''})" for line, n in seen.items()]


def identical_trials(trials: "Trials", points) -> list[str]:
    """Warnings for strategies that run the same trial as another strategy of the same configuration and seed:
    the same resolved layer map (a 1-layer student, a `random` draw equal to forward), or λ = 0 (no hidden loss,
    every matching strategy is `none`). Their pairs compare identical values, which decide nothing."""
    groups: dict[str, dict[str, tuple]] = {}
    for point in points:
        if "distill.strategy" not in point:
            continue
        trial = trials(point)
        rest = {k: v for k, v in point.items() if k != "distill.strategy"}
        d = trial.study.distill
        same = ("no hidden loss",) if d.lambda_hid == 0 or not trial.plan.layer_map else tuple(trial.plan.layer_map)
        groups.setdefault(config_key(rest), {})[str(point["distill.strategy"])] = same
    out, seen = [], set()
    for key, by_strategy in groups.items():
        classes: dict[tuple, list[str]] = {}
        for strategy, same in by_strategy.items():
            classes.setdefault(same, []).append(strategy)
        for same, names in classes.items():
            if len(names) < 2:
                continue
            what = ("λ = 0 or no pairs: no hidden-state loss" if same == ("no hidden loss",)
                    else f"the same layer map {[list(p) for p in same]}")
            text = f"strategies {', '.join(names)} run the same trial ({what})"
            if text not in seen:
                seen.add(text)
                out.append(f"{text} at {json.loads(key) or 'every configuration'}: their paired differences are "
                           "identical values and decide nothing")
    return out
