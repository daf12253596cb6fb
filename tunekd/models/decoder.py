"""Decoder-only causal language models (Qwen3, Qwen2, Llama, Mistral) for multiple-choice tasks.

One stack, `model.model.layers` ("decoder"); the embeddings are not matched by default. Training
runs on the context followed by the right choice, with CE and KL on the choice's tokens only (the
logits are token-level, `logits_mask` = the positions that predict a choice token). Evaluation
scores every choice by its log-likelihood given the context, as lm-evaluation-harness does:
`accuracy` takes the choice with the highest sum, `accuracy_norm` the highest sum per character of
the choice's own text (the leading target delimiter, a space, not counted: `tasks.choice.choice_chars`).
KL runs on the answer tokens (`distill.kl_positions: targets`) or on every position of the
sequence (`sequence`, the paper's Qwen3 code). The last hidden state Hugging Face returns is the one
after the final norm; a cut-down teacher skips that norm (`final_norms`).

Copy init takes the embeddings, the final norm, the LM head and the chosen layers; per-layer config
lists (such as `layer_types`) keep the entries of the copied layers.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tunekd.errors import ConfigError
from tunekd.models._text import pad_id, pad_rows
from tunekd.models.base import Family, Output


def _sequence(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Input ids of context + continuation (the context cut from the left to fit `max_length`) and
    the shifted targets: targets[t] = ids[t + 1] where that token is a continuation token, else -100."""
    cont = cont[:max_length - 1] if len(cont) >= max_length else cont
    ctx = ctx[-(max_length - len(cont)):] if ctx else []
    if not ctx:  # nothing to condition the first continuation token on: it is not scored
        ids = cont
        targets = cont[1:] + [-100]
    else:
        ids = ctx + cont
        targets = [-100] * (len(ctx) - 1) + cont + [-100]
    return ids, targets


class DecoderFamily(Family):
    name = "decoder"
    model_types = ("qwen3", "qwen2", "llama", "mistral")
    match_embeddings_default = False
    task_kinds = ("multiple_choice",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def load(self, path, spec, *, trust_remote_code=False):
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)

    def from_config(self, config, spec):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))

    def stacks(self, model):
        return {"decoder": model.model.layers}

    def num_layers(self, config):
        return int(config.num_hidden_layers)

    def student_config(self, teacher_config, layers, *, hidden_size=None, num_attention_heads=None,
                       intermediate_size=None, copied=None):
        config = copy.deepcopy(teacher_config)
        t_layers = int(config.num_hidden_layers)
        keep = list(copied) if copied is not None else list(range(layers))
        for key, value in config.to_dict().items():
            if isinstance(value, list) and len(value) == t_layers and key != "architectures":
                setattr(config, key, [value[i] for i in keep])
        config.num_hidden_layers = layers
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = min(int(config.max_window_layers), layers)
        if hidden_size is not None:
            config.hidden_size = hidden_size
            if getattr(config, "head_dim", None) is not None and num_attention_heads:
                config.head_dim = hidden_size // num_attention_heads
        if num_attention_heads is not None:
            config.num_attention_heads = num_attention_heads
            kv = getattr(config, "num_key_value_heads", None)
            if kv is not None and num_attention_heads % kv:
                config.num_key_value_heads = num_attention_heads
        if intermediate_size is not None:
            config.intermediate_size = intermediate_size
        return config

    def head_prefixes(self, model):
        return ()  # the LM head is pretrained: copied

    # --- running -------------------------------------------------------------------------------

    def forward(self, model, batch, *, hidden=True):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden,
                    use_cache=False)
        hs = tuple(out.hidden_states) if hidden else ()
        return Output(logits=out.logits, hidden={"decoder": hs}, masks={"decoder": batch["attention_mask"]},
                      logits_mask=(batch["targets"] != -100).long(), sequence_mask=batch["attention_mask"])

    def final_norms(self, model):
        return {"decoder": model.model.norm}

    def ce_loss(self, out, batch):
        logits = out.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), ignore_index=-100)

    # --- data ----------------------------------------------------------------------------------

    def encode(self, dataset, tokenizer, spec, max_length, *, train):
        from tunekd.data import Encoded
        from tunekd.tasks.choice import choice_chars

        if spec.kind != "multiple_choice":
            raise ConfigError(f"the decoder family runs multiple-choice tasks, not {spec.kind}")
        pad = pad_id(tokenizer)
        contexts = list(dataset["context"])
        choices = [list(c) for c in dataset["choices"]]
        labels = np.asarray(list(dataset["label"]), dtype=np.int64)
        ctx_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
        if train:  # the context followed by the right choice
            gold = tokenizer([c[int(y)] for c, y in zip(choices, labels)], add_special_tokens=False)["input_ids"]
            seqs = [_sequence(c, g, max_length) for c, g in zip(ctx_ids, gold)]
            input_ids, lengths = pad_rows([s[0] for s in seqs], pad)
            targets, _ = pad_rows([s[1] for s in seqs], -100)
            mask = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
            return Encoded(arrays={"input_ids": input_ids, "attention_mask": mask, "targets": targets,
                                   "labels": labels}, lengths=lengths)
        n_choices = {len(c) for c in choices}
        if len(n_choices) != 1:
            raise ConfigError(f"task {spec.name!r}: rows have different numbers of choices {sorted(n_choices)}")
        c = n_choices.pop()
        flat = tokenizer([x for cs in choices for x in cs], add_special_tokens=False)["input_ids"]
        seqs = [_sequence(ctx_ids[i // c], flat[i], max_length) for i in range(len(flat))]
        ids, flat_len = pad_rows([s[0] for s in seqs], pad)
        tg, _ = pad_rows([s[1] for s in seqs], -100, ids.shape[1])
        n, width = len(contexts), ids.shape[1]
        mask = (np.arange(width)[None, :] < flat_len[:, None]).astype(np.int64)
        lengths = flat_len.reshape(n, c).max(axis=1)
        chars = np.asarray([[choice_chars(x) for x in cs] for cs in choices], dtype=np.int64)
        arrays = {"input_ids": ids.reshape(n, c, width), "attention_mask": mask.reshape(n, c, width),
                  "targets": tg.reshape(n, c, width), "labels": labels, "choice_chars": chars}
        return Encoded(arrays=arrays, lengths=lengths, lengths_of={"choice_chars": None})

    @torch.no_grad()
    def choice_loglik(self, model, batch) -> torch.Tensor:
        """[B, C] summed log-likelihood of each choice's tokens given the context."""
        b, c, width = batch["input_ids"].shape
        flat = {k: batch[k].reshape(b * c, width) for k in ("input_ids", "attention_mask", "targets")}
        logits = model(input_ids=flat["input_ids"], attention_mask=flat["attention_mask"], use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        tg = flat["targets"]
        valid = tg != -100
        tok = logp.gather(-1, tg.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
        return tok.sum(dim=1).reshape(b, c)

    def evaluate(self, model, spec, splits, *, batch_size, precision="fp32", generation=None):
        from tunekd.data import batch_indices
        from tunekd.device import autocast
        from tunekd.tasks.base import choice_metrics

        model.eval()
        device = next(model.parameters()).device
        data = splits[spec.eval_splits[0]]
        scores = np.zeros(data.arrays["choice_chars"].shape, dtype=np.float64)
        per_row = max(1, batch_size // data.arrays["choice_chars"].shape[1])
        for index in batch_indices(data.lengths, per_row, shuffle=False, bucket=True):
            batch = {k: v.to(device) for k, v in data.batch(index).items() if k != "index"}
            with autocast(device, precision):
                scores[index] = self.choice_loglik(model, batch).cpu().numpy()
        return choice_metrics(scores, data.arrays["choice_chars"], data.arrays["labels"])
