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
    sequence-level logits ([B, C]) and a [B, L] mask for token-level logits ([B, L, V]): the positions
    whose predictions are trained (the answer tokens of a causal LM, the target tokens of a seq2seq)."""

    logits: torch.Tensor
    hidden: dict[str, tuple[torch.Tensor, ...]]
    masks: dict[str, torch.Tensor]
    logits_mask: torch.Tensor | None = None
    # token-level logits: every non-padding position of the sequence the logits cover (for a causal LM
    # the context and the answer); None = the same as `logits_mask`. KL uses it when
    # `distill.kl_positions` is `sequence`.
    sequence_mask: torch.Tensor | None = None


class Family:
    """Base class of a model family adapter."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    match_embeddings_default: bool = True
    task_kinds: tuple[str, ...] = ()
    # whether the first k hidden states of the stacks can be had by running fewer layers (see
    # `cut_stacks` and `final_norms`; `distill.truncated` builds the cut-down teacher from them)
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

    def cut_stacks(self, model: nn.Module) -> tuple[str, ...]:
        """The stacks a cut-down teacher runs only partly (default: all of them). An encoder-decoder
        cuts only its decoder: the decoder reads the encoder's last state."""
        return tuple(self.stacks(model))

    def final_norms(self, model: nn.Module) -> dict[str, nn.Module]:
        """Per stack, a module applied after the stack's last layer whose output Hugging Face returns as
        the stack's last hidden state (Llama/Qwen `model.norm`, T5's `final_layer_norm`). A stack cut
        to fewer layers must skip it, else its state `keep` would be `norm(h_keep)`, not `h_keep`."""
        return {}

    def embedding_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules `student.freeze_embeddings` freezes (the paper's `--freeze_embeds`): the token
        embeddings and, where the model has them, learned position embeddings."""
        return [model.get_input_embeddings()]

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
