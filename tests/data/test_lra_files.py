"""Text, Retrieval, Image and Pathfinder loaders on fixtures in the official formats."""

from __future__ import annotations

import numpy as np
import pytest

from effseq.data import MissingDataError, load_task
from effseq.data.generators import generate_pathfinder
from effseq.data.lra.image import grayscale
from tests.data.fixtures import write_aan, write_cifar, write_imdb, write_pathfinder


def byte_ids(text: str) -> list[int]:
    return [b + 1 for b in text.encode("utf-8")]


def test_text_bytes_labels_truncation_and_val(tmp_path):
    write_imdb(tmp_path, "train", {"pos": ["great", "fine film"], "neg": ["bad é"]})
    write_imdb(tmp_path, "test", {"pos": ["yes"], "neg": ["no", "nope", "never"]})
    train = load_task("lra/text", "train", data_dir=tmp_path, max_length=6)
    assert len(train) == 3
    examples = {tuple(e["inputs"][e["mask"]]): int(e["label"]) for e in train}
    assert examples == {
        tuple(byte_ids("bad é")): 0,  # 6 bytes: é is two
        tuple(byte_ids("great")): 1,
        tuple(byte_ids("fine f")): 1,  # truncated to max_length
    }
    great = next(e for e in train if e["mask"].sum() == 5)
    assert great["inputs"][5] == 0 and not great["mask"][5]
    val = load_task("lra/text", "val", data_dir=tmp_path, max_length=6)
    test = load_task("lra/text", "test", data_dir=tmp_path, max_length=6)
    assert len(val) == len(test) == 4  # LRA evaluated on the test set
    assert sorted(int(e["label"]) for e in test) == [0, 0, 0, 1]


def test_text_holdout_val(tmp_path):
    texts = [f"review {i}" for i in range(10)]
    write_imdb(tmp_path, "train", {"pos": texts, "neg": texts})
    train = load_task("lra/text", "train", data_dir=tmp_path, val_fraction=0.25)
    val = load_task("lra/text", "val", data_dir=tmp_path, val_fraction=0.25)
    assert (len(train), len(val)) == (15, 5)
    key = lambda e: (bytes(e["inputs"][e["mask"]] - 1), int(e["label"]))  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in val}
    assert len({key(e) for e in train} | {key(e) for e in val}) == 20


def test_text_missing_folder(tmp_path):
    with pytest.raises(MissingDataError, match="aclImdb/train/neg.*missing"):
        load_task("lra/text", "train", data_dir=tmp_path)


def test_retrieval_two_documents_and_eval_is_val(tmp_path):
    write_aan(tmp_path, "eval", [("1", "a", "b", "x y", "zz"), ("0.0", "c", "d", "long doc", "")])
    ds = load_task("lra/retrieval", "val", data_dir=tmp_path, max_length=4)
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    np.testing.assert_array_equal(first["inputs"], byte_ids("x y") + [0])
    np.testing.assert_array_equal(first["inputs2"], byte_ids("zz") + [0, 0])
    np.testing.assert_array_equal(first["mask2"], [1, 1, 0, 0])
    assert first["label"] == 1 and second["label"] == 0
    np.testing.assert_array_equal(second["inputs"], byte_ids("long"))
    assert not second["mask2"].any()
    assert first["label"].dtype == np.int32 and first["inputs2"].dtype == np.int32


@pytest.mark.parametrize(
    "row, why",
    [
        ("1\ta\tb\tonly four", "expected 5 tab-separated fields, got 4"),
        ("yes\ta\tb\tt1\tt2", "label must be 0 or 1"),
    ],
)
def test_retrieval_malformed_row(tmp_path, row, why):
    write_aan(tmp_path, "test", [("1", "a", "b", "t1", "t2"), ("0", "a", "b", "t1", "t2")])
    path = tmp_path / "tsv_data" / "new_aan_pairs.test.tsv"
    path.write_bytes(path.read_bytes() + row.encode() + b"\n")
    ds = load_task("lra/retrieval", "test", data_dir=tmp_path)
    assert len(ds) == 3
    with pytest.raises(ValueError, match=f"new_aan_pairs.test.tsv:3: malformed row: {why}"):
        ds[2]


def test_retrieval_missing_file_names_official_name(tmp_path):
    with pytest.raises(MissingDataError) as info:
        load_task("lra/retrieval", "train", data_dir=tmp_path)
    assert str(tmp_path / "tsv_data" / "new_aan_pairs.train.tsv") in str(info.value)


@pytest.fixture
def cifar(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 4, 3, 32, 32), dtype=np.uint8)
    for i in range(5):
        write_cifar(tmp_path, f"data_batch_{i + 1}", rgb[i], [i, i + 1, i + 2, (i + 3) % 10])
    test_rgb = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    write_cifar(tmp_path, "test_batch", test_rgb, [7, 8, 9])
    return tmp_path, rgb.reshape(20, 3, 32, 32), test_rgb


def test_image_splits_grayscale_tokens_and_continuous(cifar):
    root, rgb, test_rgb = cifar
    train = load_task("lra/image", "train", data_dir=root)
    val = load_task("lra/image", "val", data_dir=root)
    test = load_task("lra/image", "test", data_dir=root)
    assert (len(train), len(val), len(test)) == (18, 2, 3)  # 90% / 10% of the training batches
    # Luma computed here in float64 per pixel, rounded half to even like the loader.
    r, g, b = (rgb[-1].astype(np.float64)[c] for c in range(3))
    gray = np.round(0.2989 * r + 0.5870 * g + 0.1140 * b).astype(np.int32)
    last = val[1]
    np.testing.assert_array_equal(last["inputs"], gray.reshape(-1) + 1)
    assert last["label"] == (4 + 3) % 10 and last["mask"].all()
    assert test[2]["label"] == 9
    cont = load_task("lra/image", "test", data_dir=root, continuous=True)[0]
    assert cont["inputs"].shape == (1024, 1) and cont["inputs"].dtype == np.float32
    expected = grayscale(test_rgb[:1])[0].reshape(-1) / 127.5 - 1
    np.testing.assert_allclose(cont["inputs"][:, 0], expected, rtol=0, atol=1e-6)
    assert -1 <= cont["inputs"].min() and cont["inputs"].max() <= 1


def test_pathfinder_layout_split_and_pixels(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(20)]
    labels = [i % 2 for i in range(20)]
    # Batches numbered 10 and 2: numeric order puts 2 first (a string sort would not).
    write_pathfinder(
        tmp_path,
        32,
        "curv_contour_length_14",
        {
            10: list(zip(images[10:], labels[10:], strict=True)),
            2: list(zip(images[:10], labels[:10], strict=True)),
        },
    )
    train = load_task("lra/pathfinder32", "train", data_dir=tmp_path)
    val = load_task("lra/pathfinder32", "val", data_dir=tmp_path)
    test = load_task("lra/pathfinder32", "test", data_dir=tmp_path)
    assert (len(train), len(val), len(test)) == (16, 2, 2)
    np.testing.assert_array_equal(train[0]["inputs"], images[0].reshape(-1).astype(np.int32) + 1)
    np.testing.assert_array_equal(test[1]["inputs"], images[19].reshape(-1).astype(np.int32) + 1)
    assert [int(e["label"]) for e in val] == labels[16:18]
    cont = load_task("lra/pathfinder32", "val", data_dir=tmp_path, continuous=True)[0]
    assert cont["inputs"].shape == (1024, 1)


def test_pathfinder_missing_and_malformed(tmp_path):
    with pytest.raises(MissingDataError, match="pathfinder64/curv_baseline/metadata"):
        load_task("lra/pathfinder64", "train", data_dir=tmp_path, difficulty="curv_baseline")
    image = np.zeros((32, 32), np.uint8)
    directory = write_pathfinder(tmp_path, 32, "curv_baseline", {0: [(image, 1), (image, 0)]})
    meta = directory / "metadata" / "0.npy"
    meta.write_text(meta.read_text() + "imgs/0 sample_9.png 9\n")
    with pytest.raises(ValueError, match="0.npy:3: malformed row"):
        load_task("lra/pathfinder32", "train", data_dir=tmp_path, difficulty="curv_baseline")
    with pytest.raises(ValueError, match="difficulty must be one of"):
        load_task("lra/pathfinder32", "train", data_dir=tmp_path, difficulty="hard")


def test_pathfinder_generator_writes_a_loadable_balanced_set(tmp_path):
    root = generate_pathfinder(
        tmp_path,
        resolution=32,
        num_images=20,
        contour_length=9,
        seed=5,
        images_per_batch=8,
        progress=False,
    )
    assert root == tmp_path / "pathfinder32" / "curv_contour_length_9"
    assert sorted(p.name for p in (root / "metadata").iterdir()) == ["0.npy", "1.npy", "2.npy"]
    assert (root / "imgs" / "2" / "sample_19.png").exists()
    splits = [
        load_task("lra/pathfinder32", s, data_dir=tmp_path, difficulty="curv_contour_length_9")
        for s in ("train", "val", "test")
    ]
    assert [len(s) for s in splits] == [16, 2, 2]
    examples = [e for s in splits for e in s]
    assert sum(int(e["label"]) for e in examples) == 10
    for e in examples:
        assert e["inputs"].max() == 256  # white pixels (255 + 1) of the markers
        assert (e["inputs"] == 1).mean() > 0.5  # mostly black background
    again = generate_pathfinder(
        tmp_path / "again",
        resolution=32,
        num_images=20,
        contour_length=9,
        seed=5,
        images_per_batch=8,
        progress=False,
    )
    assert (again / "imgs/1/sample_9.png").read_bytes() == (
        root / "imgs/1/sample_9.png"
    ).read_bytes()
