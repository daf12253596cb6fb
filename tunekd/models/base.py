"""What a model family must provide: the one interface the rest of tunekd uses to run models.

A family knows where its layer stacks live, how to run a batch and return logits, hidden states
and masks, how to load a model for a task, which parameters form the task head, how to tokenize
the task kinds it runs (`encode`) and how to evaluate a model on them (`evaluate`).
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
    # whether the first k hidden states of a stack can be had by running only its first k layers
    # (false for encoder-decoders: the decoder reads the encoder's last state)
    truncatable: bool = True
    # module names LoRA adapts by default (student.lora.target_modules: null); () = must be given
    lora_targets: tuple[str, ...] = ()

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

    def vocab_size(self, config) -> int | None:
        return getattr(config, "vocab_size", None)

    def student_config(self, teacher_config, layers: int, *, hidden_size=None, num_attention_heads=None,
                       intermediate_size=None, copied: list[int] | None = None):
        """The student's config: `layers` deep; `copied` the teacher layers it copies (None: random
        init), for families whose config has per-layer settings to keep in step."""
        raise NotImplementedError

    def copy_source(self, student_key: str, teacher_key: str, teacher_state: dict) -> str:
        """The teacher parameter that copy init puts into `student_key`; `teacher_key` is the default
        (same name, layer index mapped to the copied teacher layer)."""
        return teacher_key

    def head_prefixes(self, model: nn.Module) -> tuple[str, ...]:
        """State-dict prefixes of the task head, which a copy-initialised student keeps random."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor], *, hidden: bool = True) -> Output:
        raise NotImplementedError

    def ce_loss(self, out: Output, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, out: Output, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Classification: the predicted label ids of a batch."""
        raise NotImplementedError

    def encode(self, dataset, tokenizer, spec, max_length: int, *, train: bool):
        """A non-classification split as `data.Encoded` (`train`: the training layout, else the
        evaluation layout). Classification is encoded by `data.encode` for every family."""
        raise NotImplementedError(f"the {self.name} family does not encode {spec.kind} tasks")

    def evaluate(self, model: nn.Module, spec, splits: dict, *, batch_size: int, precision: str = "fp32",
                 generation=None) -> dict[str, float]:
        """Metrics of a non-classification task (classification: `distill.evaluate` takes the argmax of
        `predict`). `generation` is the study's `task.generation` (beams, new tokens, eval samples)."""
        raise NotImplementedError(f"the {self.name} family does not evaluate {spec.kind} tasks")


def stack_prefixes(model: nn.Module, family: Family) -> dict[str, str]:
    """State-dict prefix of each layer stack, found by identity (e.g. {"encoder": "bert.encoder.layer."})."""
    wanted = {id(mod): name for name, mod in family.stacks(model).items()}
    out = {}
    for mod_name, mod in model.named_modules():
        if id(mod) in wanted:
            out[wanted[id(mod)]] = mod_name + "."
    return out
