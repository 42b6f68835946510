"""Registry: names, metadata before any data, option and split errors; stats."""

from __future__ import annotations

import pytest

from effseq.data import TaskInfo, list_tasks, load_task, task_info
from effseq.data.stats import format_stats, task_stats
from tests.data.fixtures import write_listops

EXPECTED = {
    "lra/listops": (16, None, 10, 2048),
    "lra/text": (257, None, 2, 4096),
    "lra/retrieval": (257, None, 2, 4000),
    "lra/image": (257, None, 10, 1024),
    "lra/pathfinder32": (257, None, 2, 1024),
    "lra/pathfinder64": (257, None, 2, 4096),
    "lra/pathx": (257, None, 2, 128 * 128),
    "lra/pathx256": (257, None, 2, 256 * 256),
    "synthetic/mqar": (8192, None, 8192, 256),
    "synthetic/selective_copy": (16, None, 16, 256),
    "synthetic/induction_heads": (16, None, 16, 256),
    "image/mnist": (None, 1, 10, 784),
    "image/fashion_mnist": (None, 1, 10, 784),
}


def test_every_task_has_metadata_without_data():
    assert set(list_tasks()) == set(EXPECTED)
    for name, (vocab, dim, classes, length) in EXPECTED.items():
        info = task_info(name)
        assert isinstance(info, TaskInfo) and info.name == name
        assert (info.vocab_size, info.input_dim, info.num_classes, info.max_length) == (
            vocab,
            dim,
            classes,
            length,
        )
        assert info.splits == ("train", "val", "test")
        assert info.two_sequence == (name == "lra/retrieval")
        assert info.sequence_labels == name.startswith("synthetic/")
    assert task_info("lra/image", continuous=True).vocab_size is None
    assert task_info("lra/pathx", continuous=True).input_dim == 1
    assert task_info("lra/text", max_length=1000).max_length == 1000


def test_unknown_names_options_and_splits():
    with pytest.raises(ValueError, match="unknown task 'lra/foo'; known tasks: .*lra/listops"):
        task_info("lra/foo")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['seq_len'\] for task 'lra/text'"):
        load_task("lra/text", "train", seq_len=3)
    with pytest.raises(ValueError, match="unknown split='eval'"):
        load_task("synthetic/mqar", "eval")
    with pytest.raises(ValueError, match="option continuous must be True or False"):
        task_info("lra/image", continuous="yes")


def test_stats_counts_lengths_and_labels(tmp_path):
    write_listops(
        tmp_path, "val", [("( [MIN 1 2 ] )", "1"), ("( [SM 3 4 5 ] )", "2"), ("( [MAX 7 ] )", "7")]
    )
    stats = task_stats("lra/listops", "val", data_dir=tmp_path, max_length=10)
    assert stats["count"] == 3
    assert stats["labels"] == {1: 1, 2: 1, 7: 1}
    length = stats["length"]
    assert (length["min"], length["max"], length["mean"]) == (3, 5, 4.0)
    assert len(length["bin_edges"]) == len(length["counts"]) + 1 and sum(length["counts"]) == 3
    assert length["counts"][3] == 1 and length["counts"][4] == 1 and length["counts"][5] == 1
    text = format_stats(stats)
    assert "lra/listops [val]: 3 examples" in text and "mean 4.0" in text


def test_stats_of_sequence_labels_counts_scored_positions():
    stats = task_stats(
        "synthetic/induction_heads", "val", seq_len=16, vocab_size=6, num_eval_examples=25
    )
    assert stats["count"] == 25 and sum(stats["labels"].values()) == 25
    assert set(stats["labels"]) <= set(range(2, 6))
    assert stats["length"]["min"] == stats["length"]["max"] == 16
