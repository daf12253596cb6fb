"""Tokenized task data as plain arrays, and the batches the training loop draws from them.

Data is tokenized once on the driver into `Encoded` (numpy arrays, padded to the split's longest
row), which pickles cheaply into Ray's object store; a batch is trimmed to its own longest row and
carries the row numbers it holds (`index`), which is how cached teacher outputs are looked up.
With `bucket=True` rows of similar length share a batch, so little of a batch is padding.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tunekd.tasks.base import TaskSpec

# rows sorted together by length when bucketing: this many batches' worth of a shuffled epoch
BUCKET_POOL = 64


@dataclass
class Encoded:
    """One split: `arrays` holds [N, ...] arrays (input_ids, attention_mask, token_type_ids, labels, ...): int,
    except the float32 labels of a regression task (batched as float tensors, the rest as int64).

    An array with two or more axes is trimmed on its last axis to the batch's longest row, measured
    by `lengths` unless `lengths_of[key]` gives that array its own length vector (e.g. a seq2seq
    target, whose length axis is not the source's) or None (never trimmed, e.g. [N, C] per-choice
    values). `extras` holds what is not batched (generation references, the tokenizer that decodes
    generated ids); of it, only the references are part of `digest`.
    """

    arrays: dict[str, np.ndarray]
    lengths: np.ndarray = field(repr=False)
    lengths_of: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows `index`, trimmed to their longest row, plus `index` itself (int64, the row numbers)."""
        index = np.asarray(index, dtype=np.int64)
        width = int(self.lengths[index].max()) if len(index) else 0
        out = {}
        for key, arr in self.arrays.items():
            rows = arr[index]
            if rows.ndim >= 2:
                if key in self.lengths_of:
                    own = self.lengths_of[key]
                    if own is not None:
                        rows = rows[..., :int(own[index].max())]
                else:
                    rows = rows[..., :width]
            t = torch.from_numpy(np.ascontiguousarray(rows))
            out[key] = t.float() if t.is_floating_point() else t.long()  # regression labels stay real
        out["index"] = torch.from_numpy(index.copy())
        return out

    def digest(self) -> str:
        h = hashlib.sha256()
        for key in sorted(self.arrays):
            h.update(key.encode())
            h.update(np.ascontiguousarray(self.arrays[key]).tobytes())
        if "references" in self.extras:  # what generation outputs are scored against
            h.update(json.dumps(self.extras["references"], ensure_ascii=False).encode())
        return h.hexdigest()


def encode(dataset, tokenizer, text_fields, max_length: int) -> Encoded:
    """Tokenize a `datasets.Dataset` with columns `text_fields` + `label` (int class ids, or float
    regression targets, kept as float32)."""
    texts = [list(dataset[f]) for f in text_fields]
    enc = tokenizer(*texts, truncation=True, max_length=max_length, padding="longest", return_tensors="np")
    arrays = {k: np.asarray(v, dtype=np.int32) for k, v in enc.items()
              if k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = np.asarray(list(dataset["label"]))
    arrays["labels"] = labels.astype(np.float32 if labels.dtype.kind == "f" else np.int64)
    lengths = arrays["attention_mask"].sum(axis=1).astype(np.int64)
    return Encoded(arrays=arrays, lengths=lengths)


def encode_splits(dsd, tokenizer, task: TaskSpec, max_length: int, *, family=None) -> dict[str, Encoded]:
    """Tokenize every split of `task`. Classification and regression are encoded here; other task kinds
    by the model family (`family.encode`), which knows its input layout: split `train` in the training
    layout, the others in the eval layout."""
    if task.kind in ("classification", "regression"):
        return {name: encode(ds, tokenizer, task.text_fields, max_length) for name, ds in dsd.items()}
    if family is None:
        raise ValueError(f"encoding a {task.kind!r} task needs the model family")
    return {name: family.encode(ds, tokenizer, task, max_length, train=(name == "train"))
            for name, ds in dsd.items()}


def batch_indices(lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                  bucket: bool = False, pool: int = BUCKET_POOL) -> list[np.ndarray]:
    """The row numbers of each batch of one pass over the data; every row exactly once.

    - no shuffle, no bucket: rows in order;  no shuffle, bucket: rows sorted by length (evaluation);
    - shuffle, no bucket: a seeded permutation cut into batches;
    - shuffle, bucket: a seeded permutation cut into pools of `pool` batches, each pool sorted by
      length and cut into batches, then the order of all batches shuffled (same seed, same batches).
    """
    n = int(len(lengths))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable") if bucket else np.arange(n)
        return [order[s:s + batch_size] for s in range(0, n, batch_size)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if not bucket:
        return [order[s:s + batch_size] for s in range(0, n, batch_size)]
    out: list[np.ndarray] = []
    span = batch_size * max(1, pool)
    for p in range(0, n, span):
        chunk = order[p:p + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out.extend(chunk[s:s + batch_size] for s in range(0, len(chunk), batch_size))
    return [out[i] for i in rng.permutation(len(out))]


def batches(data: Encoded, batch_size: int, *, shuffle: bool, seed: int = 0,
            bucket: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    for index in batch_indices(data.lengths, batch_size, shuffle=shuffle, seed=seed, bucket=bucket):
        yield data.batch(index)


def num_batches(data: Encoded, batch_size: int) -> int:
    return -(-len(data) // batch_size)


def padding_fraction(lengths: np.ndarray, index_batches: list[np.ndarray]) -> float:
    """Share of the token slots of these batches (each trimmed to its longest row) that are padding."""
    lengths = np.asarray(lengths)
    slots = sum(len(b) * int(lengths[b].max()) for b in index_batches if len(b))
    real = sum(int(lengths[b].sum()) for b in index_batches)
    return 0.0 if slots == 0 else 1.0 - real / slots


def padding_report(data: Encoded, batch_size: int, *, seed: int = 0) -> dict[str, float]:
    """Padding fraction of one training epoch: every row padded to the split's width (`full_width`),
    shuffled batches trimmed to their longest row (`random`, without bucketing) and length buckets
    (`bucketed`)."""
    lengths = data.lengths
    width = max(int(v.shape[-1]) for k, v in data.arrays.items() if v.ndim >= 2 and k not in data.lengths_of)
    full = 1.0 - float(lengths.sum()) / max(1, len(lengths) * width)
    return {
        "full_width": full,
        "random": padding_fraction(lengths, batch_indices(lengths, batch_size, shuffle=True, seed=seed)),
        "bucketed": padding_fraction(lengths, batch_indices(lengths, batch_size, shuffle=True, seed=seed,
                                                            bucket=True)),
    }
