"""Encoder-decoder language models (BART, T5) for generation tasks (DART, WMT16 en→ro).

Both stacks are matched: `Output.hidden = {"encoder": ..., "decoder": ...}` with the encoder's
attention mask and the decoder's target mask; the Distiller sums the hidden loss over the stacks,
with the same layer map for each. Logits are token-level ([B, L, V], `logits_mask` = the
non-padding target tokens): KL over target tokens, CE = the LM loss on the labels.

T5 keeps its relative attention bias only in block 0 of each stack, so a student's block 0 gets
the teacher's block-0 bias when the block copied into it has none (`copy_source`). The last hidden
state of a T5 stack is the one after the stack's final layer norm (as Hugging Face returns it); a
cut-down teacher runs the whole encoder and only the decoder's first layers, skipping that norm.
Each stack's matched states get their own width projections (`Distiller`, per stack).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSeq2SeqLM

from tunekd.errors import ConfigError
from tunekd.models._text import pad_id, pad_rows
from tunekd.models.base import Family, Output

# per model type: (encoder depth, decoder depth, width, encoder heads, decoder heads, ffn keys)
_KEYS = {
    "bart": dict(layers=("encoder_layers", "decoder_layers"), heads=("encoder_attention_heads", "decoder_attention_heads"),
                 ffn=("encoder_ffn_dim", "decoder_ffn_dim")),
    "t5": dict(layers=("num_layers", "num_decoder_layers"), heads=("num_heads",), ffn=("d_ff",)),
}


class Seq2SeqFamily(Family):
    name = "seq2seq"
    model_types = ("bart", "t5")
    match_embeddings_default = True
    task_kinds = ("generation",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2",  # BART
                    "q", "k", "v", "o", "wi", "wo")  # T5

    def _keys(self, config):
        return _KEYS[config.model_type]

    def load(self, path, spec, *, trust_remote_code=False):
        return AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=trust_remote_code)

    def from_config(self, config, spec):
        return AutoModelForSeq2SeqLM.from_config(copy.deepcopy(config))

    def stacks(self, model):
        enc, dec = model.get_encoder(), model.get_decoder()
        return {"encoder": enc.layers if hasattr(enc, "layers") else enc.block,
                "decoder": dec.layers if hasattr(dec, "layers") else dec.block}

    def cut_stacks(self, model):
        return ("decoder",)  # the decoder reads the encoder's last state: the encoder always runs in full

    def final_norms(self, model):
        out = {}
        for stack, part in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
            norm = getattr(part, "final_layer_norm", None) or getattr(part, "layer_norm", None)  # T5 / mBART
            if isinstance(norm, nn.Module):
                out[stack] = norm
        return out

    def embedding_modules(self, model):
        """As the paper's `--freeze_embeds` (Hugging Face seq2seq examples): the shared token embeddings,
        each stack's token embeddings and BART's learned position embeddings. The LM head is tied to the
        shared embeddings, so it stays frozen with them."""
        mods = [model.get_input_embeddings()]
        for part in (model.get_encoder(), model.get_decoder()):
            for name in ("embed_tokens", "embed_positions"):
                m = getattr(part, name, None)
                if isinstance(m, nn.Module):
                    mods.append(m)
        return list({id(m): m for m in mods}.values())

    def num_layers(self, config):
        enc, dec = (int(getattr(config, k)) for k in self._keys(config)["layers"])
        if enc != dec:
            raise ConfigError(f"the seq2seq family matches both stacks with one layer map, so they need equal depths; "
                              f"this {config.model_type} has {enc} encoder and {dec} decoder layers")
        return enc

    def hidden_size(self, config):
        return int(config.d_model)

    def student_config(self, teacher_config, layers, *, hidden_size=None, num_attention_heads=None,
                       intermediate_size=None, copied=None):
        config = copy.deepcopy(teacher_config)
        keys = self._keys(config)
        for k in keys["layers"]:
            setattr(config, k, layers)
        if hidden_size is not None:
            config.d_model = hidden_size
        if num_attention_heads is not None:
            for k in keys["heads"]:
                setattr(config, k, num_attention_heads)
            if config.model_type == "t5" and hidden_size is not None:
                config.d_kv = hidden_size // num_attention_heads
        if intermediate_size is not None:
            for k in keys["ffn"]:
                setattr(config, k, intermediate_size)
        return config

    def head_prefixes(self, model):
        return ()  # the LM head is part of the pretrained model: copied like the embeddings

    def copy_source(self, student_key, teacher_key, teacher_state):
        if teacher_key not in teacher_state and "relative_attention_bias" in student_key:
            # T5: only block 0 of a stack has the bias; the student's block 0 needs one
            for stack in ("encoder.block.", "decoder.block."):
                if teacher_key.startswith(stack):
                    _, _, rest = teacher_key[len(stack):].partition(".")
                    return f"{stack}0.{rest}"
        return teacher_key

    # --- running -------------------------------------------------------------------------------

    def forward(self, model, batch, *, hidden=True):
        labels = batch["labels"]
        dec_in = model.prepare_decoder_input_ids_from_labels(labels=labels)
        dec_mask = batch["decoder_attention_mask"]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec_in,
                    decoder_attention_mask=dec_mask, output_hidden_states=hidden, use_cache=False)
        hs = ({"encoder": tuple(out.encoder_hidden_states), "decoder": tuple(out.decoder_hidden_states)}
              if hidden else {"encoder": (), "decoder": ()})
        return Output(logits=out.logits, hidden=hs,
                      masks={"encoder": batch["attention_mask"], "decoder": dec_mask}, logits_mask=dec_mask)

    def ce_loss(self, out, batch):
        logits = out.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=-100)

    # --- data ----------------------------------------------------------------------------------

    def encode(self, dataset, tokenizer, spec, max_length, *, train):
        from tunekd.data import Encoded

        if spec.kind != "generation":
            raise ConfigError(f"the seq2seq family runs generation tasks, not {spec.kind}")
        pad = pad_id(tokenizer)
        src = tokenizer(list(dataset["source"]), truncation=True, max_length=max_length)["input_ids"]
        tgt = tokenizer(text_target=list(dataset["target"]), truncation=True, max_length=max_length)["input_ids"]
        input_ids, src_len = pad_rows(src, pad)
        labels, tgt_len = pad_rows(tgt, -100)
        attention_mask = (np.arange(input_ids.shape[1])[None, :] < src_len[:, None]).astype(np.int64)
        dec_mask = (np.arange(labels.shape[1])[None, :] < tgt_len[:, None]).astype(np.int64)
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                  "decoder_attention_mask": dec_mask}
        extras = {} if train else {"references": [list(r) for r in dataset["references"]], "tokenizer": tokenizer}
        return Encoded(arrays=arrays, lengths=src_len, lengths_of={"labels": tgt_len, "decoder_attention_mask": tgt_len},
                       extras=extras)

    @torch.no_grad()
    def generate(self, model, data, rows, *, batch_size, precision="fp32", generation=None) -> list[str]:
        """Greedy or beam-search outputs for `rows` of `data`, decoded, in the order of `rows`."""
        from tunekd.data import batch_indices
        from tunekd.device import autocast

        from tunekd.study import GenerationConfig

        generation = generation or GenerationConfig()  # the schema's defaults
        tok = data.extras["tokenizer"]
        device = next(model.parameters()).device
        cfg = model.config
        kwargs = {"num_beams": int(generation.num_beams), "max_new_tokens": int(generation.max_new_tokens),
                  "do_sample": False}
        for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
            if getattr(cfg, key, None) is not None:
                kwargs[key] = getattr(cfg, key)
        out: list[str] = [""] * len(rows)
        rows = np.asarray(rows)
        for idx in batch_indices(data.lengths[rows], batch_size, shuffle=False, bucket=True):
            b = data.batch(rows[idx])
            with autocast(device, precision):
                ids = model.generate(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                                     **kwargs)
            for i, text in zip(idx, tok.batch_decode(ids, skip_special_tokens=True)):
                out[int(i)] = text.strip()
        return out

    def evaluate(self, model, spec, splits, *, batch_size, precision="fp32", generation=None):
        from tunekd.tasks.base import bleu

        model.eval()
        limit = generation.eval_samples if generation is not None else None
        split = spec.eval_splits[0]
        data = splits[split]
        n = len(data) if limit is None else min(limit, len(data))
        hyps = self.generate(model, data, np.arange(n), batch_size=batch_size, precision=precision,
                             generation=generation)
        return {"bleu": bleu(spec, hyps, data.extras["references"][:n])}
