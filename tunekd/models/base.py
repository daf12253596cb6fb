"""What a model family must provide: the one interface the rest of tunekd uses to run models.

A family knows where its layer stacks live, how to run a batch and return logits, hidden states
and masks, how to load a model for a task, and which parameters form the task head.
Adding a family means adding one file in this package and registering it in `__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Output:
    """One forward pass. `hidden[stack]` is the tuple of hidden states of that stack (index 0: the
    embedding output) and `masks[stack]` its [B, L] validity mask. `logits_mask` is None for
    sequence-level logits ([B, C]) and a [B, L] mask for token-level logits ([B, L, V])."""

    logits: torch.Tensor
    hidden: dict[str, tuple[torch.Tensor, ...]]
    masks: dict[str, torch.Tensor]
    logits_mask: torch.Tensor | None = None


class Family:
    """Base class of a model family adapter."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    match_embeddings_default: bool = True
    task_kinds: tuple[str, ...] = ()

    def load(self, path: str, spec, *, trust_remote_code: bool = False) -> nn.Module:
        raise NotImplementedError

    def from_config(self, config, spec) -> nn.Module:
        raise NotImplementedError

    def stacks(self, model: nn.Module) -> dict[str, nn.ModuleList]:
        """The layer stacks, by name (e.g. {"encoder": model.bert.encoder.layer})."""
        raise NotImplementedError

    def num_layers(self, config) -> int:
        raise NotImplementedError

    def hidden_size(self, config) -> int:
        return int(config.hidden_size)

    def student_config(self, teacher_config, layers: int, *, hidden_size=None, num_attention_heads=None,
                       intermediate_size=None):
        raise NotImplementedError

    def head_prefixes(self, model: nn.Module) -> tuple[str, ...]:
        """State-dict prefixes of the task head, which a copy-initialised student keeps random."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor], *, hidden: bool = True) -> Output:
        raise NotImplementedError

    def ce_loss(self, out: Output, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, out: Output, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def stack_prefixes(model: nn.Module, family: Family) -> dict[str, str]:
    """State-dict prefix of each layer stack, found by identity (e.g. {"encoder": "bert.encoder.layer."})."""
    wanted = {id(mod): name for name, mod in family.stacks(model).items()}
    out = {}
    for mod_name, mod in model.named_modules():
        if id(mod) in wanted:
            out[wanted[id(mod)]] = mod_name + "."
    return out
