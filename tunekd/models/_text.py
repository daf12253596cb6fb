"""Helpers shared by the family adapters: padding token-id lists into arrays, batching eval rows."""

from __future__ import annotations

import numpy as np


def pad_rows(rows: list[list[int]], pad: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[N, W] int array of `rows` right-padded with `pad`, and the [N] lengths."""
    lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
    width = int(lengths.max()) if width is None and len(rows) else (width or 1)
    out = np.full((len(rows), max(width, 1)), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, lengths


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
