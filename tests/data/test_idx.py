"""Sequential MNIST / Fashion-MNIST from IDX files, gzipped or plain; permuted variant."""

from __future__ import annotations

import numpy as np
import pytest

from effseq.data import MissingDataError, load_task
from effseq.data import idx as idx_module
from tests.data.fixtures import write_idx


def write_set(folder, gz, num_train=12, num_test=3, seed=0):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8)
    train_labels = np.arange(num_train, dtype=np.uint8) % 10
    test_labels = np.arange(num_test, dtype=np.uint8)[::-1] % 10
    write_idx(folder / "train-images-idx3-ubyte", train, gz)
    write_idx(folder / "train-labels-idx1-ubyte", train_labels, gz)
    write_idx(folder / "t10k-images-idx3-ubyte", test, gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", test_labels, gz)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_splits_pixels_labels(tmp_path, gz):
    train, train_labels, test, test_labels = write_set(tmp_path / "mnist", gz)
    ds = {s: load_task("image/mnist", s, data_dir=tmp_path) for s in ("train", "val", "test")}
    assert [len(ds[s]) for s in ("train", "val", "test")] == [11, 1, 3]  # 11/12 of train
    e = ds["val"][0]
    assert e["inputs"].shape == (784, 1) and e["inputs"].dtype == np.float32
    np.testing.assert_allclose(e["inputs"][:, 0], train[11].reshape(-1) / 127.5 - 1, atol=1e-6)
    assert e["label"] == train_labels[11] and e["label"].dtype == np.int32
    assert [int(x["label"]) for x in ds["test"]] == test_labels.tolist()
    tokens = load_task("image/mnist", "test", data_dir=tmp_path, continuous=False)[0]
    np.testing.assert_array_equal(tokens["inputs"], test[0].reshape(-1).astype(np.int32) + 1)


def test_permuted_is_one_fixed_permutation(tmp_path):
    write_set(tmp_path / "fashion_mnist", gz=True)
    plain = load_task("image/fashion_mnist", "train", data_dir=tmp_path, continuous=False)
    perm = load_task(
        "image/fashion_mnist", "train", data_dir=tmp_path, continuous=False, permuted=True
    )
    a, b = plain[0]["inputs"], perm[0]["inputs"]
    assert not np.array_equal(a, b) and sorted(a) == sorted(b)
    # The documented permutation, the same for every image.
    permutation = np.random.default_rng(0).permutation(784)
    for i in (0, 5):
        np.testing.assert_array_equal(perm[i]["inputs"], plain[i]["inputs"][permutation])
    other = load_task(
        "image/fashion_mnist",
        "train",
        data_dir=tmp_path,
        continuous=False,
        permuted=True,
        permutation_seed=1,
    )
    assert not np.array_equal(other[0]["inputs"], b)


def test_missing_and_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_module, "SYSTEM_DIRS", {})
    with pytest.raises(MissingDataError, match="mnist/train-images-idx3-ubyte"):
        load_task("image/mnist", "train", data_dir=tmp_path)
    write_set(tmp_path / "mnist", gz=False)
    bad = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: header declares shape"):
        load_task("image/mnist", "test", data_dir=tmp_path)


def test_fashion_falls_back_to_the_debian_folder(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    write_set(system, gz=True, num_train=24)
    monkeypatch.setattr(idx_module, "SYSTEM_DIRS", {"image/fashion_mnist": system})
    monkeypatch.delenv("EFFSEQ_DATA_DIR", raising=False)
    assert len(load_task("image/fashion_mnist", "train")) == 22
    assert len(load_task("image/fashion_mnist", "train", data_dir=tmp_path / "empty")) == 22
