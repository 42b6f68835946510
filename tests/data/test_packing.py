"""Packed batches: every document once, intact, in stream order; ids, padding, exact resume."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from effseq.data import batches, load_task
from effseq.data.packing import first_fit

T = 24


def documents(n: int, seed: int = 0, min_len: int = 1):
    """(dataset, lengths): document i has a random length in [min_len, T]; its token at
    position p is i * 100 + p + 1 (so a packed token names its document and position),
    ``label`` the token + 1, ``weights`` 1 on odd positions, ``mask`` a prefix."""
    lengths = np.random.default_rng(seed).integers(min_len, T + 1, n)

    def make(i):
        m = np.arange(T) < lengths[i]
        tokens = np.where(m, i * 100 + np.arange(T) + 1, 0).astype(np.int32)
        return {
            "inputs": tokens,
            "label": np.where(m, tokens + 1, 0).astype(np.int32),
            "weights": (m & (np.arange(T) % 2 == 1)).astype(np.float32),
            "mask": m,
            "tag": np.int32(i),  # a per-example key: dropped by packing
        }

    return grain.MapDataset.range(n).map(make), lengths


def unpack(batch):
    """[(row, document index, length)] in row-major order, checking each row's layout."""
    out = []
    for r, seg in enumerate(batch["segment_ids"]):
        real = int((seg != 0).sum())
        assert (seg[:real] != 0).all() and (seg[real:] == 0).all()  # padding only at the end
        ids = seg[:real]
        assert real and ids[0] == 1 and set(np.diff(ids)) <= {0, 1}  # 1, 2, ... in order
        for k in range(1, int(ids.max()) + 1):
            where = np.flatnonzero(seg == k)
            assert (np.diff(where) == 1).all()  # contiguous
            tokens = batch["inputs"][r, where]
            doc = int(tokens[0] - 1) // 100
            length = len(where)
            np.testing.assert_array_equal(tokens, doc * 100 + np.arange(length) + 1)  # intact
            np.testing.assert_array_equal(batch["label"][r, where], tokens + 1)
            np.testing.assert_array_equal(
                batch["weights"][r, where], (np.arange(length) % 2 == 1).astype(np.float32)
            )
            out.append((r, doc, length))
        pad = seg == 0
        assert (batch["inputs"][r, pad] == 0).all() and (batch["label"][r, pad] == 0).all()
        assert (batch["weights"][r, pad] == 0).all() and not batch["mask"][r, pad].any()
        assert (batch["mask"][r] == ~pad).all()
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_document_once_intact_in_stream_order(shuffle):
    n, b = 60, 4
    ds, lengths = documents(n)
    it = batches(ds, global_batch_size=b, seed=3, shuffle=shuffle, pack=True)
    order = grain.MapDataset.range(n)
    order = (order.shuffle(3) if shuffle else order).repeat()
    position = 0
    for _ in range(12):  # about 2 epochs
        batch = next(it)
        assert set(batch) == {"inputs", "label", "weights", "mask", "segment_ids", "example_weight"}
        assert batch["inputs"].shape == (b, T) and batch["segment_ids"].dtype == np.int32
        np.testing.assert_array_equal(batch["example_weight"], np.ones(b, np.float32))
        placed = unpack(batch)
        # The batch holds the next documents of the stream, each once, whole.
        expect = [int(order[position + j]) for j in range(len(placed))]
        assert sorted(d for _, d, _ in placed) == sorted(expect)
        for _, doc, length in placed:
            assert length == lengths[doc]
        # Within a row the documents keep their stream order (first-fit, in order).
        rank = {d: j for j, d in enumerate(expect)}
        for r in range(b):
            ranks = [rank[d] for row, d, _ in placed if row == r]
            assert ranks == sorted(ranks)
        position += len(placed)
        # The batch ended at the first document that fits in no row.
        free = T - (batch["segment_ids"] != 0).sum(axis=1)
        assert lengths[int(order[position])] > free.max()
        assert it.get_state() == {"next_document": position}


def test_fixed_length_documents_give_the_unpacked_batches():
    ds = load_task("synthetic/mqar", "train", seq_len=32, vocab_size=40, num_kv_pairs=4)
    packed = batches(ds, global_batch_size=8, seed=1, pack=True)
    plain = batches(ds, global_batch_size=8, seed=1)
    for _ in range(3):
        p, q = next(packed), next(plain)
        np.testing.assert_array_equal(p["segment_ids"], np.ones((8, 32), np.int32))
        for key in q:
            np.testing.assert_array_equal(p[key], q[key])


def test_restore_mid_stream_gives_identical_batches():
    ds, _ = documents(50, seed=1)
    it = batches(ds, global_batch_size=4, seed=5, pack=True)
    for _ in range(7):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    expected = [next(it) for _ in range(5)]
    again = batches(ds, global_batch_size=4, seed=5, pack=True)
    again.set_state(state)
    for want in expected:
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_process_rows_concatenate_to_the_global_batch():
    ds, _ = documents(40, seed=2)
    whole = batches(ds, global_batch_size=6, pack=True)
    parts = [
        batches(ds, global_batch_size=6, pack=True, process_index=p, process_count=3)
        for p in range(3)
    ]
    for _ in range(4):
        want = next(whole)
        got = [next(part) for part in parts]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def test_synthetic_variable_lengths_pack_densely():
    ds = load_task("synthetic/mqar", "train", seq_len=64, vocab_size=40, num_kv_pairs=4, min_len=16)
    batch = next(batches(ds, global_batch_size=8, pack=True))
    fill = (batch["segment_ids"] != 0).mean()
    assert fill > 0.8 and batch["segment_ids"].max() >= 2
    # A document's scored positions (its queries) stay inside it.
    assert (batch["weights"][batch["segment_ids"] == 0] == 0).all()


def test_first_fit_rule():
    # 5 fits row 0, 4 row 1, 3 row 0 (5 + 3 <= 8), 6 fits nowhere: the batch ends there.
    placements, used = first_fit([5, 4, 3, 6, 1], rows=2, length=8)
    assert used == 3 and placements == [(0, 0), (1, 0), (0, 5)]
    # Empty documents are placed nowhere and do not end the batch.
    placements, used = first_fit([0, 8, 0, 8], rows=2, length=8)
    assert used == 4 and placements == [(-1, 0), (0, 0), (-1, 0), (1, 0)]


def test_errors():
    ds, _ = documents(10)
    with pytest.raises(ValueError, match="num_epochs=None"):
        batches(ds, global_batch_size=2, num_epochs=1, pack=True)
    no_mask = grain.MapDataset.range(4).map(lambda i: {"inputs": np.zeros(T, np.int32)})
    with pytest.raises(ValueError, match="per-position `mask`"):
        batches(no_mask, global_batch_size=2, pack=True)

    def gap(i):  # real tokens after padding: not a prefix
        return {"inputs": np.ones(T, np.int32), "mask": np.arange(T) % 2 == 0}

    it = batches(grain.MapDataset.range(4).map(gap), global_batch_size=2, pack=True)
    with pytest.raises(ValueError, match="real tokens first"):
        next(it)
