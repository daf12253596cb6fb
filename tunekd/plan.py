"""A trial's plan, resolved from its config and the teacher's depth: the layer map and the copied layers.

The driver records it in MLflow and the trial trains with it; both call `resolve`, so they agree.
`describe_loss` is the one-line account of the loss a trial computes (printed by `--dry-run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunekd import mapping
from tunekd.study import Study, flatten


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
        params["student.copied_layers"] = self.copied_layers
        if self.permutation is not None:
            params["distill.random_permutation"] = list(self.permutation)
            params["distill.map_seed_used"] = self.map_seed
        return params


def resolve(study: Study, teacher_layers: int, match_embeddings_default: bool) -> Plan:
    d = study.distill
    mapping.validate_depths(teacher_layers, study.student.layers)
    match = match_embeddings_default if d.match_embeddings is None else d.match_embeddings
    draw = getattr(d, "random_draw", "nontrivial")
    map_seed = getattr(d, "map_seed", None)
    seed = study.seed if map_seed is None else map_seed
    layer_map = mapping.resolve_layer_map(d.strategy, teacher_layers, study.student.layers,
                                          match_embeddings=match, seed=seed, random_draw=draw)
    perm = (mapping.random_permutation(study.student.layers, seed, draw=draw)
            if isinstance(d.strategy, str) and d.strategy == "random" else None)
    copied = (mapping.copy_layer_indices(study.student.copy_layers, teacher_layers, study.student.layers)
              if study.student.init == "copy" else None)
    return Plan(layer_map=[tuple(p) for p in layer_map], copied_layers=copied, match_embeddings=match,
                permutation=perm, map_seed=seed if perm is not None else None)
