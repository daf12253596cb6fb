"""BERT-like encoders (BERT, RoBERTa, ELECTRA, MiniLM) for sequence classification and, through a
multiple-choice head (`AutoModelForMultipleChoice`: one score per (context, choice) pair, softmax over
the choices), for multiple-choice tasks. For those, batches hold [B, C, L] arrays; the hidden states
the map uses are those of the B*C pairs, [B*C, L, d], with their [B*C, L] mask."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification

from tunekd.models.base import Family, Output


class EncoderFamily(Family):
    name = "encoder"
    model_types = ("bert", "roberta", "electra", "xlm-roberta")
    match_embeddings_default = True
    task_kinds = ("classification", "regression", "multiple_choice")
    lora_targets = ("query", "key", "value", "dense")

    def load(self, path, spec, *, trust_remote_code=False):
        if spec.kind == "multiple_choice":
            return AutoModelForMultipleChoice.from_pretrained(path, trust_remote_code=trust_remote_code)
        # a checkpoint whose head has another number of outputs (a 2-class model for a regression or
        # 3-class task) gets a new random head, as a base model to fine-tune does
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=spec.num_labels, trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True
        )

    def from_config(self, config, spec):
        config = copy.deepcopy(config)
        if spec.kind == "multiple_choice":
            return AutoModelForMultipleChoice.from_config(config)
        config.num_labels = spec.num_labels
        return AutoModelForSequenceClassification.from_config(config)

    def stacks(self, model):
        return {"encoder": model.base_model.encoder.layer}

    def num_layers(self, config):
        return int(config.num_hidden_layers)

    def student_config(self, teacher_config, layers, *, hidden_size=None, num_attention_heads=None,
                       intermediate_size=None, copied=None):
        config = copy.deepcopy(teacher_config)
        config.num_hidden_layers = layers
        if hidden_size is not None:
            config.hidden_size = hidden_size
        if num_attention_heads is not None:
            config.num_attention_heads = num_attention_heads
        if intermediate_size is not None:
            config.intermediate_size = intermediate_size
        return config

    def head_prefixes(self, model):
        return ("classifier.",)

    def forward(self, model, batch, *, hidden=True):
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        out = model(**kwargs, output_hidden_states=hidden)
        hs = tuple(out.hidden_states) if hidden else ()
        mask = batch["attention_mask"]
        if mask.dim() == 3:  # multiple choice: the states are those of the B*C (context, choice) pairs
            mask = mask.reshape(-1, mask.shape[-1])
        return Output(logits=out.logits, hidden={"encoder": hs}, masks={"encoder": mask})

    def ce_loss(self, out, batch):
        if out.logits.shape[-1] == 1:  # a regression head (num_labels 1, as in transformers): MSE
            return F.mse_loss(out.logits.float()[:, 0], batch["labels"].float())
        return F.cross_entropy(out.logits.float(), batch["labels"])

    def predict(self, out, batch):
        if out.logits.shape[-1] == 1:  # regression: the score itself
            return out.logits.float()[:, 0]
        return out.logits.argmax(dim=-1)

    # --- multiple choice -----------------------------------------------------------------------

    def encode(self, dataset, tokenizer, spec, max_length, *, train):
        """Multiple choice: each (context, choice) pair tokenized as a sentence pair, [N, C, L]."""
        import numpy as np

        from tunekd.data import Encoded
        from tunekd.errors import ConfigError

        if spec.kind != "multiple_choice":
            raise ConfigError(f"the encoder family encodes {spec.kind} tasks with data.encode")
        contexts, choices = list(dataset["context"]), [list(c) for c in dataset["choices"]]
        n_choices = {len(c) for c in choices}
        if len(n_choices) != 1:
            raise ConfigError(f"task {spec.name!r}: rows have different numbers of choices {sorted(n_choices)}")
        c = n_choices.pop()
        first = [ctx for ctx in contexts for _ in range(c)]
        second = [x.strip() for cs in choices for x in cs]
        enc = tokenizer(first, second, truncation=True, max_length=max_length, padding="longest", return_tensors="np")
        n = len(contexts)
        arrays = {k: np.asarray(v, dtype=np.int64).reshape(n, c, -1) for k, v in enc.items()
                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        arrays["labels"] = np.asarray(list(dataset["label"]), dtype=np.int64)
        lengths = arrays["attention_mask"].sum(axis=2).max(axis=1).astype(np.int64)
        return Encoded(arrays=arrays, lengths=lengths)

    def evaluate(self, model, spec, splits, *, batch_size, precision="fp32", generation=None):
        """Multiple choice: accuracy of the head's highest-scoring choice (no length-normalised score:
        the head scores pairs, not token likelihoods)."""
        import numpy as np

        from tunekd.data import batch_indices
        from tunekd.device import autocast
        from tunekd.tasks.base import accuracy

        model.eval()
        device = next(model.parameters()).device
        data = splits[spec.eval_splits[0]]
        pred = np.zeros(len(data), dtype=np.int64)
        per_row = max(1, batch_size // data.arrays["input_ids"].shape[1])
        with torch.no_grad():
            for index in batch_indices(data.lengths, per_row, shuffle=False, bucket=True):
                batch = {k: v.to(device) for k, v in data.batch(index).items() if k != "index"}
                with autocast(device, precision):
                    pred[index] = self.forward(model, batch, hidden=False).logits.argmax(-1).cpu().numpy()
        return {"accuracy": accuracy(pred, data.arrays["labels"])}
