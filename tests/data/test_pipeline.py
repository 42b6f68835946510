"""batches(): checkpointed position, per-process slices, evaluation padding, epochs."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from effseq.data import batches


def numbered(n: int) -> grain.MapDataset:
    """Examples whose ``inputs`` is their index, so batches show which examples they hold."""
    return grain.MapDataset.range(n).map(
        lambda i: {"inputs": np.full(3, i, np.int32), "label": np.int32(i % 2)}
    )


def ids(batch) -> list[int]:
    return batch["inputs"][:, 0].tolist()


def test_restore_from_state_gives_identical_batches():
    it = batches(numbered(23), global_batch_size=4, seed=3)
    for _ in range(7):  # crosses an epoch boundary (23 examples)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    fresh = batches(numbered(23), global_batch_size=4, seed=3)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_process_slices_union_is_the_single_process_batch():
    single = batches(numbered(50), global_batch_size=8, seed=1, num_epochs=2)
    parts = [
        batches(
            numbered(50),
            global_batch_size=8,
            seed=1,
            num_epochs=2,
            process_index=p,
            process_count=4,
        )
        for p in range(4)
    ]
    count = 0
    for whole in single:
        slices = [next(part) for part in parts]
        assert all(len(ids(s)) == 2 for s in slices)
        assert sum((ids(s) for s in slices), []) == ids(whole)
        count += 1
    assert count == 100 // 8
    for part in parts:
        with pytest.raises(StopIteration):
            next(part)


def test_eval_padding_counts_every_example_once():
    n, size = 10, 4
    seen = np.zeros(n)
    for p in range(2):
        for batch in batches(
            numbered(n),
            global_batch_size=size,
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
            process_index=p,
            process_count=2,
        ):
            assert batch["inputs"].shape == (2, 3) and batch["example_weight"].dtype == np.float32
            np.add.at(seen, ids(batch), batch["example_weight"])
    np.testing.assert_array_equal(seen, np.ones(n))
    last = list(
        batches(
            numbered(n), global_batch_size=size, shuffle=False, num_epochs=1, drop_remainder=False
        )
    )[-1]
    assert ids(last) == [8, 9, 9, 9] and last["example_weight"].tolist() == [1, 1, 0, 0]


def test_epochs_are_permutations_reshuffled_each_time():
    n = 12
    stream = batches(numbered(n), global_batch_size=n, seed=0)
    first, second = ids(next(stream)), ids(next(stream))
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second and first != list(range(n))
    assert ids(next(batches(numbered(n), global_batch_size=n, seed=0))) == first
    assert ids(next(batches(numbered(n), global_batch_size=n, seed=1))) != first
    dropped = list(batches(numbered(n), global_batch_size=5, num_epochs=1))
    assert len(dropped) == 2 and all(b["example_weight"].tolist() == [1.0] * 5 for b in dropped)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_batch_size=6, process_count=4), "not divisible by process_count=4"),
        (dict(global_batch_size=4, process_index=2, process_count=2), "process_index < "),
        (dict(global_batch_size=0), "global_batch_size must be a positive int"),
        (dict(global_batch_size=20, num_epochs=1), "fewer than one global batch"),
        (dict(global_batch_size=4, num_epochs=0), "num_epochs must be None or a positive int"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        batches(numbered(10), **kwargs)


def test_kept_examples_are_read_once_and_batches_are_unchanged(monkeypatch):
    from effseq.data import pipeline

    reads = []

    def counted(n):
        def read(i):
            reads.append(i)
            return {"inputs": np.full(3, i, np.int32), "label": np.int32(i % 2)}

        return grain.MapDataset.range(n).map(read)

    kept = counted(37)
    a = batches(kept, global_batch_size=8, seed=2)
    first = [next(a) for _ in range(20)]  # over four epochs
    assert sorted(reads) == list(range(37))  # every example read exactly once
    monkeypatch.setattr(pipeline, "IN_MEMORY_BYTES", 0)
    b = batches(numbered(37), global_batch_size=8, seed=2)
    for want in first:
        got = next(b)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_rows_read_in_runs_from_the_plain_source_equal_single_reads(tmp_path):
    from effseq.data import base, load_task
    from effseq.data.generators import generate_listops
    from effseq.data.pipeline import _rows

    generate_listops(
        tmp_path / "listops-1000", 300, 10, 10, min_length=4, max_length=40, progress=False
    )
    ds = load_task("lra/listops", "train", data_dir=str(tmp_path), max_length=40)
    assert isinstance(base.plain_source(ds), base.LineSource)
    assert base.plain_source(ds.map(lambda x: x)) is None  # a transformed dataset: grain's path
    got = _rows(ds).take(np.arange(len(ds))[::-1])  # every run, read backwards
    for i in range(len(ds)):
        for key, value in ds[i].items():
            np.testing.assert_array_equal(got[key][len(ds) - 1 - i], value)
