"""BERT-like encoders (BERT, RoBERTa, ELECTRA, MiniLM) for sequence classification."""

from __future__ import annotations

import copy

import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from tunekd.models.base import Family, Output


class EncoderFamily(Family):
    name = "encoder"
    model_types = ("bert", "roberta", "electra", "xlm-roberta")
    match_embeddings_default = True
    task_kinds = ("classification",)

    def load(self, path, spec, *, trust_remote_code=False):
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=spec.num_labels, trust_remote_code=trust_remote_code
        )

    def from_config(self, config, spec):
        config = copy.deepcopy(config)
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
        return Output(logits=out.logits, hidden={"encoder": hs}, masks={"encoder": batch["attention_mask"]})

    def ce_loss(self, out, batch):
        return F.cross_entropy(out.logits.float(), batch["labels"])

    def predict(self, out, batch):
        return out.logits.argmax(dim=-1)
