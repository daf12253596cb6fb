"""Model family adapters, chosen by the `model_type` of a model's config."""

from __future__ import annotations

from tunekd.errors import ConfigError
from tunekd.models.base import Family, Output, stack_prefixes
from tunekd.models.decoder import DecoderFamily
from tunekd.models.encoder import EncoderFamily
from tunekd.models.seq2seq import Seq2SeqFamily

FAMILIES: dict[str, Family] = {f.name: f for f in (EncoderFamily(), Seq2SeqFamily(), DecoderFamily())}


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ConfigError(f"no model family supports model_type {model_type!r}; supported: {', '.join(known)}")


__all__ = ["FAMILIES", "Family", "Output", "family_for", "stack_prefixes"]
