"""ListOps: the generator against an independent evaluator, and the loader on official files."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest

from effseq.data import MissingDataError, load_task
from effseq.data.generators import generate_listops
from effseq.data.generators import listops as listops_generator
from effseq.data.lra import listops
from tests.data.fixtures import write_listops

OPS = ("[MIN", "[MAX", "[MED", "[SM")


def evaluate(source: str) -> int:
    """Stack machine over the tokens, parentheses dropped (not the generator's recursion)."""
    stack: list = []
    for tok in source.split():
        if tok in "()":
            continue
        if tok == "]":
            args = []
            while stack[-1] not in OPS:
                args.append(stack.pop())
            op = stack.pop()
            args.sort()
            n = len(args)
            if op == "[MIN":
                stack.append(args[0])
            elif op == "[MAX":
                stack.append(args[-1])
            elif op == "[MED":
                mid = args[n // 2] if n % 2 else (args[n // 2 - 1] + args[n // 2]) / 2
                stack.append(int(mid))
            else:
                stack.append(sum(args) % 10)
        else:
            stack.append(tok if tok in OPS else int(tok))
    assert len(stack) == 1
    return stack[0]


def render_official(source: str) -> str:
    """Re-renders the paren-free tokens as LRA's nested pairs: (((op, a1), a2), ..., ']')."""
    tokens = iter(t for t in source.split() if t not in "()")

    def node(tok):
        if tok not in OPS:
            return tok
        tree = tok
        for nxt in tokens:
            if nxt == "]":
                return ("pair", tree, "]")
            tree = ("pair", tree, node(nxt))
        raise AssertionError("unclosed operator")

    def text(t):
        return t if isinstance(t, str) else f"( {text(t[1])} {text(t[2])} )"

    return text(node(next(tokens)))


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("lra") / "listops-1000"
    paths = generate_listops(out, 40, 6, 5, seed=3, min_length=10, max_length=80, progress=False)
    return out.parent, paths


def test_generator_files_labels_lengths_and_rendering(generated):
    _, paths = generated
    seen = set()
    for split, count in (("train", 40), ("val", 6), ("test", 5)):
        rows = read_tsv(paths[split])
        assert rows[0] == ["Source", "Target"]
        assert len(rows) == count + 1
        assert paths[split].read_bytes().count(b"\r\n") == count + 1  # csv line ends, as LRA
        for source, target in rows[1:]:
            assert int(target) == evaluate(source)
            length = sum(tok not in "()" for tok in source.split())
            assert 10 < length < 80
            assert source == render_official(source)
            seen.add(source)
    assert len(seen) == 51  # no duplicates, within or across splits


def test_generator_is_seeded(tmp_path):
    a = generate_listops(
        tmp_path / "a", 5, 1, 1, seed=7, min_length=5, max_length=40, progress=False
    )
    b = generate_listops(
        tmp_path / "b", 5, 1, 1, seed=7, min_length=5, max_length=40, progress=False
    )
    c = generate_listops(
        tmp_path / "c", 5, 1, 1, seed=8, min_length=5, max_length=40, progress=False
    )
    assert a["train"].read_bytes() == b["train"].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()


def test_generator_depth_and_arguments_follow_the_spec():
    rng = random.Random(0)
    max_depth, max_args, min_args = 0, 0, 99
    for _ in range(300):
        source, _, _ = listops_generator.sample_expression(rng)
        depth, stack = 0, []
        for tok in source.split():
            if tok in OPS:
                if stack:
                    stack[-1] += 1  # a nested operator is one argument of its parent
                stack.append(0)
                depth = max(depth, len(stack))
            elif tok == "]":
                num_args = stack.pop()
                max_args, min_args = max(max_args, num_args), min(min_args, num_args)
            elif tok not in "()":
                if stack:
                    stack[-1] += 1
        max_depth = max(max_depth, depth)
    assert max_depth <= 9  # operators live at depths 1..9, digits down to depth 10
    assert 2 <= min_args and max_args <= 10


def test_generator_rejects_impossible_window(tmp_path):
    with pytest.raises(ValueError, match="min_length"):
        generate_listops(tmp_path, 1, 1, 1, min_length=50, max_length=50, progress=False)
    with pytest.raises(ValueError, match="distinct expressions"):
        generate_listops(
            tmp_path, 50, 0, 0, min_length=1, max_length=4, progress=False, max_attempts=2000
        )


def test_loader_reads_generated_files(generated):
    root, paths = generated
    ds = load_task("lra/listops", "val", data_dir=root, max_length=128)
    rows = read_tsv(paths["val"])[1:]
    assert len(ds) == len(rows) == 6
    for example, (source, target) in zip(ds, rows, strict=True):
        n = sum(tok not in "()" for tok in source.split())
        assert example["inputs"].shape == (128,) and example["inputs"].dtype == np.int32
        assert example["mask"].sum() == n and example["mask"][:n].all()
        assert (example["inputs"][n:] == 0).all() and (example["inputs"][:n] > 0).all()
        assert example["label"].shape == () and example["label"] == int(target)


def test_tokenization_and_padding(tmp_path):
    write_listops(tmp_path, "train", [("( ( ( [MAX 2 ) 9 ) ] )", "9"), ("( [SM 0 ] )", "0")])
    ds = load_task("lra/listops", "train", data_dir=tmp_path, max_length=6)
    first, second = ds[0], ds[1]
    v = listops.VOCAB
    np.testing.assert_array_equal(first["inputs"], [v["[MAX"], v["2"], v["9"], v["]"], 0, 0])
    np.testing.assert_array_equal(first["mask"], [1, 1, 1, 1, 0, 0])
    assert first["label"] == 9
    np.testing.assert_array_equal(second["inputs"][:3], [v["[SM"], 1, v["]"]])
    assert len(set(v.values())) == len(v) and 0 not in v.values()
    assert max(v.values()) < listops.VOCAB_SIZE


@pytest.mark.parametrize(
    "row, why",
    [
        ("( [MAX 2 ] )", "2 tab-separated fields"),
        ("( [MAX 2 ] )\t12", "target must be 0-9"),
        ("( [MAX 2 x ] )\t2", "unknown token 'x'"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, row, why):
    path = write_listops(tmp_path, "test", [("( [MIN 1 ] )", "1")])
    path.write_bytes(path.read_bytes() + row.encode() + b"\r\n")
    ds = load_task("lra/listops", "test", data_dir=tmp_path)
    assert ds[0]["label"] == 1
    with pytest.raises(ValueError, match=f"basic_test.tsv:3: malformed row: .*{why}"):
        ds[1]


def test_bad_header(tmp_path):
    path = tmp_path / "listops-1000" / "basic_val.tsv"
    path.parent.mkdir()
    path.write_text("Input\tOutput\n( [MIN 1 ] )\t1\n")
    with pytest.raises(ValueError, match="basic_val.tsv:1: malformed row: expected the header"):
        load_task("lra/listops", "val", data_dir=tmp_path)


def test_missing_file_lists_path_and_generator(tmp_path):
    with pytest.raises(MissingDataError) as info:
        load_task("lra/listops", "train", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "listops-1000" / "basic_train.tsv") in message
    assert "lra_release.gz" in message and "generate_listops" in message


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_listops(tmp_path, "train", [("( [MIN 1 ] )", "1")])
    monkeypatch.setenv("EFFSEQ_DATA_DIR", str(tmp_path))
    assert len(load_task("lra/listops", "train")) == 1
    monkeypatch.delenv("EFFSEQ_DATA_DIR")
    with pytest.raises(MissingDataError, match="no data_dir was given and \\$EFFSEQ_DATA_DIR"):
        load_task("lra/listops", "train")
