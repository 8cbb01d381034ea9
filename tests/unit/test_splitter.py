"""dml_tool/splitter.py: partitions are disjoint, cover the split and follow the seed."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.procs import DML_TOOL
from dml_tool.splitter import SplitError, parse_partition, partition_dirichlet, partition_iid, partition_shards, split


def labels(n_per_class: int = 100, classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), n_per_class)


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "parts must cover every sample"
    assert len(np.unique(allidx)) == n, "parts must be disjoint"


def read_parts(out: Path, split_name: str, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.load(out / split_name / f"{i}_x.npy", allow_pickle=False),
             np.load(out / split_name / f"{i}_y.npy", allow_pickle=False)) for i in range(1, count + 1)]


# ----------------------------------------------------------------------------- pure partitions

@pytest.mark.parametrize("kind", ["iid", "shards:2", "shards:1", "dirichlet:0.1", "dirichlet:1", "dirichlet:50"])
def test_partitions_are_disjoint_and_cover(kind):
    y = labels()
    rng = np.random.default_rng(3)
    k, arg = parse_partition(kind)
    if k == "iid":
        parts = partition_iid(len(y), 20, rng)
    elif k == "shards":
        parts = partition_shards(y, 20, int(arg), rng)
    else:
        parts = partition_dirichlet(y, 20, arg, rng)
    assert len(parts) == 20
    assert_disjoint_cover(parts, len(y))
    assert all(len(p) > 0 for p in parts)


def test_same_seed_same_parts_other_seed_other_parts():
    y = labels()
    for fn in (lambda r: partition_iid(len(y), 10, r), lambda r: partition_shards(y, 10, 2, r),
               lambda r: partition_dirichlet(y, 10, 0.5, r)):
        a, b, c = fn(np.random.default_rng(7)), fn(np.random.default_rng(7)), fn(np.random.default_rng(8))
        assert all(np.array_equal(p, q) for p, q in zip(a, b))
        assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_shards_give_few_labels_per_part():
    y = labels()
    parts = partition_shards(y, 20, 2, np.random.default_rng(0))
    per_part = [len(np.unique(y[p])) for p in parts]
    assert max(per_part) <= 4          # 2 shards, each may straddle one label boundary
    assert np.mean(per_part) <= 2.5
    iid = [len(np.unique(y[p])) for p in partition_iid(len(y), 20, np.random.default_rng(0))]
    assert min(iid) >= 8


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = labels(200)
    global_dist = np.bincount(y, minlength=10) / len(y)

    def skew(alpha: float) -> float:  # mean total-variation distance from the global label mix
        parts = partition_dirichlet(y, 40, alpha, np.random.default_rng(0))
        return float(np.mean([0.5 * np.abs(np.bincount(y[p], minlength=10) / len(p) - global_dist).sum()
                              for p in parts]))

    s100, s1, s01, s001 = skew(100.0), skew(1.0), skew(0.1), skew(0.01)
    assert s100 < s1 < s01 < s001
    assert s100 < 0.3 and s01 > 0.6  # ~sampling noise of 50-image parts vs strong skew


def test_dirichlet_parts_have_equal_sizes():
    parts = partition_dirichlet(labels(), 30, 0.1, np.random.default_rng(1))
    sizes = {len(p) for p in parts}
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("spec, message", [
    ("foo", "expected iid, shards:K or dirichlet:ALPHA"),
    ("shards", "expected iid"),
    ("shards:0", "positive integer"),
    ("shards:x", "positive integer"),
    ("dirichlet:-1", "positive number"),
    ("dirichlet:abc", "positive number"),
    ("dirichlet:nan", "positive number"),
])
def test_bad_partition_spec(spec, message):
    with pytest.raises(SplitError, match=message):
        parse_partition(spec)


# ----------------------------------------------------------------------------- split() on real data

@pytest.fixture(scope="module")
def subset_split(module_scratch):
    out = module_scratch
    meta = split("mnist-subset", str(out), train_parts=40, test_parts=10, partition="iid", seed=0)
    return out, meta


def test_mnist_subset_layout_and_meta(subset_split):
    out, meta = subset_split
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["name"] == "mnist-subset" and meta["input_shape"] == [1, 28, 28]
    assert meta["train_parts"] == 40 and meta["test_parts"] == 10 and meta["seed"] == 0
    assert meta["train_samples"] == 4000 and meta["test_samples"] == 1000
    train = read_parts(out, "train", 40)
    test = read_parts(out, "test", 10)
    assert not (out / "train" / "41_x.npy").exists()
    for x, y in train + test:
        assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == np.int64 and len(x) == len(y)
        assert 0.0 <= x.min() and x.max() <= 1.0
    assert [len(y) for _, y in train] == [100] * 40  # the default experiment's 100 images per part
    # stratified hold-out: 20 % of each digit's 500 images
    assert np.array_equal(np.bincount(np.concatenate([y for _, y in test])), [100] * 10)
    assert np.array_equal(np.bincount(np.concatenate([y for _, y in train])), [400] * 10)


def test_train_and_test_images_are_disjoint(subset_split):
    out, _ = subset_split
    def keys(split_name, n):
        return {x.tobytes() for xs, _ in read_parts(out, split_name, n) for x in xs}
    tr, te = keys("train", 40), keys("test", 10)
    assert len(tr) > 3900 and len(te) > 980  # (a few MNIST images may repeat)
    assert len(tr & te) <= 2


def test_same_seed_same_files_and_stale_parts_removed(subset_split, scratch):
    out, _ = subset_split
    split("mnist-subset", str(scratch), train_parts=40, test_parts=10, seed=0)
    for i in (1, 17, 40):
        for s in ("x", "y"):
            assert (scratch / "train" / f"{i}_{s}.npy").read_bytes() == (out / "train" / f"{i}_{s}.npy").read_bytes()
    split("mnist-subset", str(scratch), train_parts=8, test_parts=2, seed=1, partition="shards:2")
    assert sorted(p.name for p in (scratch / "train").iterdir()) == sorted(
        f"{i}_{s}.npy" for i in range(1, 9) for s in "xy")
    assert not (scratch / "test" / "3_x.npy").exists()
    y1 = np.load(scratch / "train" / "1_y.npy", allow_pickle=False)
    assert len(np.unique(y1)) <= 4


def write_idx(path: Path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_idx_source_uses_its_own_test_files(scratch):
    src = scratch / "fashion"
    src.mkdir()
    rng = np.random.default_rng(0)
    xtr, ytr = rng.integers(0, 256, (300, 28, 28)), np.repeat(np.arange(10), 30)
    xte, yte = rng.integers(0, 256, (50, 28, 28)), np.repeat(np.arange(10), 5)
    write_idx(src / "train-images-idx3-ubyte.gz", xtr)
    write_idx(src / "train-labels-idx1-ubyte.gz", ytr)
    write_idx(src / "t10k-images-idx3-ubyte", xte)
    write_idx(src / "t10k-labels-idx1-ubyte", yte)
    out = scratch / "out"
    meta = split(f"fashion:{src}", str(out), train_parts=6, test_parts=5, partition="dirichlet:0.5")
    assert meta["name"] == "fashion-mnist"
    assert meta["train_samples"] == 300 and meta["test_samples"] == 50
    x, y = read_parts(out, "test", 5)[0]
    assert len(y) == 10 and x.max() <= 1.0
    total = sum(len(y) for _, y in read_parts(out, "train", 6))
    assert total == 300


def test_idx_errors_name_the_file(scratch):
    with pytest.raises(SplitError, match="no such directory"):
        split(f"mnist:{scratch / 'nope'}", str(scratch / "o"))
    (scratch / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04garbage")
    write_idx(scratch / "train-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(SplitError, match="train-images-idx3-ubyte: not an IDX file"):
        split(f"mnist:{scratch}", str(scratch / "o"))
    with pytest.raises(SplitError, match="expected mnist-subset, mnist:DIR or fashion:DIR"):
        split("cifar:/x", str(scratch / "o"))


def test_cli_errors_are_clear_and_exit_2(scratch):
    for args, message in ((["--partition", "shards:zero"], "K must be a positive integer"),
                          (["--test-fraction", "1.5"], "--test-fraction must be in (0, 1)"),
                          (["--train-parts", "0"], "--train-parts and --test-parts must be >= 1")):
        r = subprocess.run([sys.executable, str(DML_TOOL / "splitter.py"), "--out", str(scratch), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr
        assert "Traceback" not in r.stderr


def test_too_many_shards(scratch):
    with pytest.raises(SplitError, match="shards"):
        partition_shards(labels(1), 10, 2, np.random.default_rng(0))


def test_write_dataset_is_read_by_the_nodes_and_removes_stale_parts(scratch):
    """splitter.write_dataset (the writer split uses) for data from elsewhere: the nodes'
    own loader (dml_app/node_data.py) reads back exactly what was given."""
    from dml_app import node_data
    from dml_tool.splitter import write_dataset

    rng = np.random.default_rng(5)
    x, y = rng.random((9, 1, 28, 28), dtype=np.float32), rng.integers(0, 3, 9)
    parts = [np.array([4, 0]), np.array([8, 1, 2]), np.array([3, 5, 6, 7])]
    out = scratch / "ds"
    meta = write_dataset(str(out), name="mine", num_classes=3, train=(x, y, parts), test=(x, y, parts[:1]),
                         partition="by-hand", seed=7, extra={"note": "x"})
    assert meta == {"name": "mine", "input_shape": [1, 28, 28], "num_classes": 3, "train_parts": 3,
                    "test_parts": 1, "partition": "by-hand", "seed": 7, "note": "x"}
    assert node_data.read_meta(str(out)) == meta == json.loads((out / "meta.json").read_text())
    for i, idx in enumerate(parts, start=1):
        px, py = node_data.load_part(str(out), "train", i)
        assert px.dtype == np.float32 and py.dtype == np.int64
        assert np.array_equal(px, x[idx]) and np.array_equal(py, y[idx])
    write_dataset(str(out), name="mine", num_classes=3, train=(x, y, parts[:1]), test=(x, y, parts[:1]))
    assert sorted(p.name for p in (out / "train").iterdir()) == ["1_x.npy", "1_y.npy"]
    with pytest.raises(SplitError, match="train images must be a float32 array"):
        write_dataset(str(out), name="m", num_classes=3, train=(x.astype(np.float64), y, parts), test=(x, y, parts))
    with pytest.raises(SplitError, match="test: 9 images, 8 labels"):
        write_dataset(str(out), name="m", num_classes=3, train=(x, y, parts), test=(x, y[:8], parts))
