"""MQAR, selective copying and induction heads: structure, targets, determinism."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from effseq.data import load_task, task_info


def test_mqar_structure_and_targets():
    seq_len, vocab, pairs = 64, 40, 8
    ds = load_task(
        "synthetic/mqar",
        "train",
        seq_len=seq_len,
        vocab_size=vocab,
        num_kv_pairs=pairs,
        num_examples=30,
    )
    num_keys = (vocab - 2) // 2
    for e in ds:
        x, y, w = e["inputs"], e["label"], e["weights"]
        assert x.shape == y.shape == w.shape == e["mask"].shape == (seq_len,)
        assert x.dtype == y.dtype == np.int32 and w.dtype == np.float32 and e["mask"].all()
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        assert ((2 <= keys) & (keys < 2 + num_keys)).all()
        assert ((2 + num_keys <= values) & (values < vocab)).all()
        table = dict(zip(keys.tolist(), values.tolist(), strict=True))
        scored = np.flatnonzero(w)
        assert len(scored) == pairs and (scored >= 2 * pairs).all()
        assert sorted(x[scored].tolist()) == sorted(keys.tolist())  # every key asked once
        for p in scored:
            assert y[p] == table[int(x[p])]
        rest = np.setdiff1d(np.arange(2 * pairs, seq_len), scored)
        assert (x[rest] == 1).all() and (y[rest] == 0).all()


def test_mqar_gaps_favour_short_distances():
    ds = load_task(
        "synthetic/mqar", "train", seq_len=256, vocab_size=200, num_kv_pairs=4, num_examples=200
    )
    first = [np.flatnonzero(e["weights"]).min() - 8 for e in ds]
    # power_a=0.01: the first query offset is almost always near the start of the query region.
    assert np.median(first) < 20
    uniform = load_task(
        "synthetic/mqar",
        "train",
        seq_len=256,
        vocab_size=200,
        num_kv_pairs=4,
        num_examples=200,
        power_a=1.0,
    )
    assert np.median([np.flatnonzero(e["weights"]).min() - 8 for e in uniform]) > np.median(first)


def test_examples_are_a_function_of_seed_split_and_index():
    opts = dict(seq_len=32, vocab_size=20, num_kv_pairs=4, num_examples=50, num_eval_examples=7)
    a = load_task("synthetic/mqar", "train", **opts)
    b = load_task("synthetic/mqar", "train", **opts)
    for i in (0, 49, 13):  # any order
        np.testing.assert_array_equal(a[i]["inputs"], b[i]["inputs"])
    assert not np.array_equal(a[0]["inputs"], a[1]["inputs"])
    val = load_task("synthetic/mqar", "val", **opts)
    assert len(val) == 7 and not np.array_equal(val[0]["inputs"], a[0]["inputs"])
    other = load_task("synthetic/mqar", "train", seed=1, **opts)
    assert not np.array_equal(other[0]["inputs"], a[0]["inputs"])


def test_selective_copy_targets_are_the_tokens_in_order():
    ds = load_task(
        "synthetic/selective_copy",
        "test",
        seq_len=40,
        vocab_size=12,
        num_tokens=6,
        num_eval_examples=20,
    )
    for e in ds:
        x, y, w = e["inputs"], e["label"], e["weights"]
        region = 40 - 6
        data = x[:region][x[:region] != 1]
        assert len(data) == 6 and (data >= 3).all() and (data < 12).all()
        assert (x[region:] == 2).all()
        np.testing.assert_array_equal(y[region:], data)
        np.testing.assert_array_equal(w, np.r_[np.zeros(region), np.ones(6)])


def test_induction_heads_target_follows_the_first_trigger():
    ds = load_task("synthetic/induction_heads", "train", seq_len=30, vocab_size=8, num_examples=40)
    for e in ds:
        x, y, w = e["inputs"], e["label"], e["weights"]
        triggers = np.flatnonzero(x == 1)
        assert len(triggers) == 2 and triggers[1] == 29
        assert y[29] == x[triggers[0] + 1] and x[triggers[0] + 1] >= 2
        assert w[29] == 1.0 and w.sum() == 1.0


def test_info_and_option_errors():
    info = task_info("synthetic/mqar", seq_len=128, vocab_size=100)
    assert (info.vocab_size, info.num_classes, info.max_length) == (100, 100, 128)
    assert info.sequence_labels and not info.two_sequence
    with pytest.raises(ValueError, match="num_kv_pairs=40 needs seq_len >= 160"):
        task_info("synthetic/mqar", seq_len=64, num_kv_pairs=40)
    with pytest.raises(ValueError, match="vocab_size=10 has 4 keys"):
        load_task("synthetic/mqar", "train", vocab_size=10, num_kv_pairs=8)
    with pytest.raises(ValueError, match="unknown option.*'num_kv_pairs'"):
        load_task("synthetic/selective_copy", "train", num_kv_pairs=3)
    with pytest.raises(ValueError, match="option seq_len must be an integer"):
        task_info("synthetic/induction_heads", seq_len=2.5)


def _digest(name, **options) -> str:
    h = hashlib.sha256()
    for split in ("train", "val"):
        ds = load_task(name, split, **options)
        for i in (0, 1, 255, 256, 700):
            if i < len(ds):
                ex = ds[i]
                for k in sorted(ex):
                    h.update(k.encode())
                    h.update(np.ascontiguousarray(ex[k]).tobytes())
                    h.update(str(ex[k].dtype).encode())
    return h.hexdigest()[:8]


# Recorded before the min_len / length_dist options existed: the defaults generate the same
# examples bit for bit.
@pytest.mark.parametrize(
    "name, options, digest",
    [
        ("synthetic/mqar", {}, "d622eaa1"),
        ("synthetic/mqar", dict(seq_len=64, vocab_size=64, num_kv_pairs=4, seed=3), "4faa68c8"),
        ("synthetic/selective_copy", {}, "cc4751d2"),
        ("synthetic/selective_copy", dict(seq_len=40, num_tokens=5, seed=2), "a68fdc88"),
        ("synthetic/induction_heads", {}, "09037cdf"),
        ("synthetic/induction_heads", dict(seq_len=17, vocab_size=5, seed=1), "2189a1b2"),
    ],
)
def test_default_lengths_unchanged_bit_for_bit(name, options, digest):
    assert _digest(name, **options) == digest


def _lengths_ok(ds, seq_len, min_len):
    lengths = []
    for e in ds:
        n = int(e["mask"].sum())
        assert min_len <= n <= seq_len and e["mask"][:n].all()
        assert (e["inputs"][n:] == 0).all() and (e["label"][n:] == 0).all()
        assert (e["weights"][n:] == 0).all() and (e["inputs"][:n] != 0).all()
        lengths.append(n)
    assert len(set(lengths)) > 5  # they vary
    return lengths


@pytest.mark.parametrize("dist", ["uniform", "log_uniform"])
def test_mqar_variable_lengths(dist):
    pairs = 4
    ds = load_task(
        "synthetic/mqar",
        "train",
        seq_len=64,
        vocab_size=40,
        num_kv_pairs=pairs,
        min_len=16,
        length_dist=dist,
        num_examples=60,
    )
    lengths = _lengths_ok(ds, 64, 16)
    for e, n in zip(ds, lengths, strict=True):
        x, y, w = e["inputs"], e["label"], e["weights"]
        table = dict(zip(x[0 : 2 * pairs : 2].tolist(), x[1 : 2 * pairs : 2].tolist(), strict=True))
        scored = np.flatnonzero(w)
        assert len(scored) == pairs and (scored >= 2 * pairs).all() and (scored < n).all()
        assert sorted(x[scored].tolist()) == sorted(table)
        assert all(y[p] == table[int(x[p])] for p in scored)
    if dist == "log_uniform":  # a long tail: most documents in the lower half of the range
        assert np.median(lengths) < 40


def test_selective_copy_and_induction_variable_lengths():
    k = 5
    copy = load_task(
        "synthetic/selective_copy",
        "train",
        seq_len=40,
        vocab_size=12,
        num_tokens=k,
        min_len=10,
        num_examples=60,
    )
    for e, n in zip(copy, _lengths_ok(copy, 40, 10), strict=True):
        x, y, w = e["inputs"], e["label"], e["weights"]
        region = n - k
        data = x[:region][x[:region] != 1]
        assert len(data) == k and (data >= 3).all()
        assert (x[region:n] == 2).all()
        np.testing.assert_array_equal(y[region:n], data)
        assert w[region:n].all() and w.sum() == k
    induction = load_task(
        "synthetic/induction_heads", "train", seq_len=30, vocab_size=8, min_len=3, num_examples=60
    )
    for e, n in zip(induction, _lengths_ok(induction, 30, 3), strict=True):
        x, y, w = e["inputs"], e["label"], e["weights"]
        triggers = np.flatnonzero(x == 1)
        assert len(triggers) == 2 and triggers[1] == n - 1
        assert y[n - 1] == x[triggers[0] + 1] and w[n - 1] == 1.0 and w.sum() == 1.0


def test_length_option_errors():
    with pytest.raises(ValueError, match=r"min_len=10 must be 0 .* \[16, seq_len=64\]"):
        task_info("synthetic/mqar", seq_len=64, num_kv_pairs=4, min_len=10)
    with pytest.raises(ValueError, match="min_len=50 must be 0"):
        task_info("synthetic/selective_copy", seq_len=40, num_tokens=5, min_len=50)
    with pytest.raises(ValueError, match="length_dist must be one of"):
        load_task("synthetic/induction_heads", "train", min_len=4, length_dist="zipf")
