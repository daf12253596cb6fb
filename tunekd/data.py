"""Tokenized task data as plain arrays, and the batches the training loop draws from them.

Data is tokenized once on the driver into `Encoded` (numpy arrays, padded to the split's longest
row), which pickles cheaply into Ray's object store; a batch is trimmed to its own longest row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Encoded:
    """One split: `arrays` holds [N, L] int arrays (input_ids, attention_mask, token_type_ids) and labels [N]."""

    arrays: dict[str, np.ndarray]
    lengths: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        width = int(self.lengths[index].max())
        out = {}
        for key, arr in self.arrays.items():
            rows = arr[index]
            if rows.ndim == 2:
                rows = rows[:, :width]
            out[key] = torch.from_numpy(np.ascontiguousarray(rows)).long()
        return out

    def digest(self) -> str:
        h = hashlib.sha256()
        for key in sorted(self.arrays):
            h.update(key.encode())
            h.update(np.ascontiguousarray(self.arrays[key]).tobytes())
        return h.hexdigest()


def encode(dataset, tokenizer, text_fields, max_length: int) -> Encoded:
    """Tokenize a `datasets.Dataset` with columns `text_fields` + `label`."""
    texts = [list(dataset[f]) for f in text_fields]
    enc = tokenizer(*texts, truncation=True, max_length=max_length, padding="longest", return_tensors="np")
    arrays = {k: np.asarray(v, dtype=np.int32) for k, v in enc.items()
              if k in ("input_ids", "attention_mask", "token_type_ids")}
    arrays["labels"] = np.asarray(list(dataset["label"]), dtype=np.int64)
    lengths = arrays["attention_mask"].sum(axis=1).astype(np.int64)
    return Encoded(arrays=arrays, lengths=lengths)


def encode_splits(dsd, tokenizer, text_fields, max_length: int) -> dict[str, Encoded]:
    return {name: encode(ds, tokenizer, text_fields, max_length) for name, ds in dsd.items()}


def batches(data: Encoded, batch_size: int, *, shuffle: bool, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    order = np.random.default_rng(seed).permutation(len(data)) if shuffle else np.arange(len(data))
    for start in range(0, len(order), batch_size):
        yield data.batch(order[start:start + batch_size])


def num_batches(data: Encoded, batch_size: int) -> int:
    return -(-len(data) // batch_size)
