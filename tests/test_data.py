"""Batches: row numbers travel with each batch; length buckets cover every row once, are seeded, pad less."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunekd.data import Encoded, batch_indices, batches, padding_fraction, padding_report


def make_encoded(lengths, width=None) -> Encoded:
    lengths = np.asarray(lengths, dtype=np.int64)
    width = width or int(lengths.max())
    n = len(lengths)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    ids = (np.arange(n)[:, None] * 1000 + np.arange(width)[None, :] + 1).astype(np.int32) * mask
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask),
              "labels": np.arange(n) % 2}
    return Encoded(arrays=arrays, lengths=lengths)


LENGTHS = np.random.default_rng(0).integers(3, 60, size=203)


def test_batch_carries_its_row_numbers_and_is_trimmed():
    data = make_encoded([5, 9, 2, 7])
    b = data.batch(np.array([2, 0]))
    assert b["index"].tolist() == [2, 0]
    assert b["index"].dtype == torch.int64
    assert b["input_ids"].shape == (2, 5)  # trimmed to the longest of rows 2 and 0
    assert b["input_ids"][1, 0].item() == 1  # row 0's first id
    assert b["attention_mask"].sum(1).tolist() == [2, 5]


@pytest.mark.parametrize("shuffle,bucket", [(False, False), (False, True), (True, False), (True, True)])
def test_every_row_exactly_once(shuffle, bucket):
    got = batch_indices(LENGTHS, 16, shuffle=shuffle, seed=3, bucket=bucket)
    rows = np.concatenate(got)
    assert sorted(rows.tolist()) == list(range(len(LENGTHS)))
    assert all(1 <= len(b) <= 16 for b in got)
    assert sum(len(b) < 16 for b in got) <= 1 + (len(LENGTHS) // (16 * 64))  # one short batch per pool


def test_buckets_are_seeded_and_shuffled_between_buckets():
    a = batch_indices(LENGTHS, 16, shuffle=True, seed=1, bucket=True)
    b = batch_indices(LENGTHS, 16, shuffle=True, seed=1, bucket=True)
    c = batch_indices(LENGTHS, 16, shuffle=True, seed=2, bucket=True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # the batches are not visited shortest-first
    widths = [int(LENGTHS[x].max()) for x in a]
    assert widths != sorted(widths)


def test_unshuffled_bucketed_order_is_by_length():
    got = np.concatenate(batch_indices(LENGTHS, 16, shuffle=False, bucket=True))
    assert np.all(np.diff(LENGTHS[got]) >= 0)


def test_unbucketed_shuffle_is_unchanged():
    """Without buckets the batches are the seeded permutation cut in order (as before bucketing existed)."""
    order = np.random.default_rng(7).permutation(len(LENGTHS))
    got = batch_indices(LENGTHS, 16, shuffle=True, seed=7)
    assert np.array_equal(np.concatenate(got), order)


def test_padding_fraction_and_report():
    lengths = np.array([2, 4, 4, 4])
    assert padding_fraction(lengths, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(2 / 16)
    assert padding_fraction(lengths, [np.array([0, 1, 2, 3])]) == pytest.approx(2 / 16)
    report = padding_report(make_encoded(LENGTHS, width=64), 16, seed=0)
    assert set(report) == {"full_width", "random", "bucketed"}
    assert report["bucketed"] < report["random"] <= report["full_width"]
    assert report["bucketed"] < 0.5 * report["random"]


def test_batches_yields_encoded_rows():
    data = make_encoded(LENGTHS)
    seen = []
    for b in batches(data, 32, shuffle=True, seed=0, bucket=True):
        assert b["input_ids"].shape[1] == int(LENGTHS[b["index"].numpy()].max())
        seen.extend(b["index"].tolist())
    assert sorted(seen) == list(range(len(LENGTHS)))
