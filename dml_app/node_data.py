"""The node side of the dataset layout written by dml_tool/splitter.py.

`dataset/meta.json` describes the data; `dataset/{train,test}/<i>_x.npy` and
`<i>_y.npy` are the numbered parts (from 1). A node's dataset conf picks a contiguous
range of parts with EdgeTB's keys. Parts are loaded with `allow_pickle=False`: a part
file is data, never code.

A serverless worker (sl_action.py) has no dataset folder: it fetches its train parts as
one bundle over HTTP. `pack_train_parts` makes that bundle (safetensors of {"x": float32
[N, *input_shape], "y": int64 [N]}, with what nns.build_model needs in its metadata; the
same parts give the same bytes, so the bundle's sha256 names it) and `unpack_parts`
reads and checks one (ValueError when it is not a bundle). Never pickle.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from dml_app import bounded_input, formats, weights


class DatasetError(ValueError):
    """A dataset conf or dataset folder that cannot be used; the message says why."""


@dataclass
class NodeData:
    """What a node trains and tests on, plus the conf it came from."""

    meta: dict[str, Any]
    conf: dict[str, int]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_parts: list[int] = field(default_factory=list)
    test_parts: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.conf["batch_size"]

    @property
    def train_samples(self) -> int:
        return int(len(self.train_y))

    @property
    def test_samples(self) -> int:
        return int(len(self.test_y))


def read_meta(dataset_dir: str) -> dict[str, Any]:
    path = os.path.join(dataset_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path} not found: split a dataset first "
                           "(python3 dml_tool/splitter.py)") from None
    except ValueError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "input_shape" not in meta or "name" not in meta:
        raise DatasetError(f"{path}: expected an object with 'name' and 'input_shape'")
    return meta


def normalize_conf(conf: Mapping[str, Any]) -> dict[str, int]:
    """EdgeTB dataset conf -> ints with defaults (absent lengths are 0, starts 1)."""
    try:
        return formats.dataset_conf(conf)
    except formats.FormatError as e:
        raise DatasetError(str(e)) from None


def load_part(dataset_dir: str, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One numbered part; shapes and dtypes are checked, pickles refused."""
    base = os.path.join(dataset_dir, split, str(index))
    try:
        x = np.load(base + "_x.npy", allow_pickle=False)
        y = np.load(base + "_y.npy", allow_pickle=False)
    except FileNotFoundError as e:
        raise DatasetError(f"{split} part {index} not found ({e.filename})") from None
    except ValueError as e:  # an object array (pickle) or a corrupt file
        raise DatasetError(f"{split} part {index} unreadable: {e}") from None
    if len(x) != len(y):
        raise DatasetError(f"{split} part {index}: {len(x)} inputs but {len(y)} labels")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def _load_range(dataset_dir: str, split: str, start: int, length: int,
                input_shape: list[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    parts = list(range(start, start + length))
    xs, ys = [], []
    for i in parts:
        x, y = load_part(dataset_dir, split, i)
        if list(x.shape[1:]) != list(input_shape):
            raise DatasetError(f"{split} part {i}: inputs shaped {list(x.shape[1:])}, "
                               f"meta.json says {list(input_shape)}")
        xs.append(x)
        ys.append(y)
    if not xs:
        return (np.zeros((0, *input_shape), np.float32), np.zeros((0,), np.int64), parts)
    return np.concatenate(xs), np.concatenate(ys), parts


def load_node_data(dataset_dir: str, conf: Mapping[str, Any]) -> NodeData:
    """Load the parts an EdgeTB dataset conf names (1-based, contiguous ranges)."""
    meta = read_meta(dataset_dir)
    c = normalize_conf(conf)
    shape = list(meta["input_shape"])
    for split in ("train", "test"):
        n_parts = meta.get(f"{split}_parts")
        last = c[f"{split}_start_index"] + c[f"{split}_len"] - 1
        if c[f"{split}_len"] and isinstance(n_parts, int) and last > n_parts:
            raise DatasetError(f"{split} parts {c[f'{split}_start_index']}..{last} asked, "
                               f"the dataset has {n_parts} {split} parts")
    tx, ty, tparts = _load_range(dataset_dir, "train", c["train_start_index"], c["train_len"], shape)
    vx, vy, vparts = _load_range(dataset_dir, "test", c["test_start_index"], c["test_len"], shape)
    return NodeData(meta=meta, conf=c, train_x=tx, train_y=ty, test_x=vx, test_y=vy,
                    train_parts=tparts, test_parts=vparts)


# ----------------------------------------------------------------------------- data bundles

BUNDLE_KEYS = ("x", "y")
MAX_BUNDLE_CLASSES = 100_000


def pack_train_parts(dataset_dir: str, start: int, count: int) -> bytes:
    """Train parts start..start+count-1 as one safetensors bundle: {"x": float32 [N,
    *input_shape], "y": int64 [N]}, metadata (weights.pack_weights: one JSON object) with
    meta.json's name, input_shape and num_classes plus train_start_index, train_len and
    samples. Deterministic: the same parts give the same bytes (and sha256)."""
    import torch

    meta = read_meta(dataset_dir)
    conf = normalize_conf({"train_start_index": start, "train_len": count})
    if conf["train_len"] < 1:
        raise DatasetError(f"a data bundle needs at least one train part, got train_len {count!r}")
    n_parts = meta.get("train_parts")
    last = conf["train_start_index"] + conf["train_len"] - 1
    if isinstance(n_parts, int) and last > n_parts:
        raise DatasetError(f"train parts {conf['train_start_index']}..{last} asked, the dataset has "
                           f"{n_parts} train parts")
    shape = [int(d) for d in meta["input_shape"]]
    x, y, _ = _load_range(dataset_dir, "train", conf["train_start_index"], conf["train_len"], shape)
    info = {"name": str(meta["name"]), "input_shape": shape,
            "num_classes": int(meta.get("num_classes", int(y.max()) + 1 if len(y) else 1)),
            "train_start_index": conf["train_start_index"], "train_len": conf["train_len"],
            "samples": int(len(y))}
    return weights.pack_weights({"x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                             "y": torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))}, info)


def unpack_parts(body: bytes) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A bundle of pack_train_parts -> (x float32 [N, *input_shape], y int64 [N], meta);
    ValueError naming what is wrong: not safetensors, other tensors, dtypes or shapes
    that do not match the metadata, labels outside 0..num_classes-1."""
    try:
        tensors, meta = weights.unpack_weights(body)
    except ValueError as e:
        raise ValueError(f"data bundle: {e}") from None
    if sorted(tensors) != sorted(BUNDLE_KEYS):
        raise ValueError(f"data bundle: expected the tensors x and y, got {sorted(tensors)[:8]}")
    import torch

    x, y = tensors["x"], tensors["y"]
    if x.dtype != torch.float32 or y.dtype != torch.int64:
        raise ValueError(f"data bundle: x must be float32 and y int64, got {x.dtype} and {y.dtype}")
    if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0] or y.shape[0] < 1:
        raise ValueError(f"data bundle: x {list(x.shape)} and y {list(y.shape)} are not N inputs "
                         f"and N labels (N >= 1)")
    shape = meta.get("input_shape")
    if not isinstance(shape, list) or list(x.shape[1:]) != shape:
        raise ValueError(f"data bundle: inputs shaped {list(x.shape[1:])}, its metadata says {shape!r}")
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ValueError("data bundle: metadata has no dataset 'name'")
    classes = bounded_input.number(meta.get("num_classes"), "data bundle 'num_classes'", 1, MAX_BUNDLE_CLASSES,
                         integer=True)
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise ValueError(f"data bundle: labels {int(y.min())}..{int(y.max())} outside 0..{classes - 1}")
    if not torch.isfinite(x).all():
        raise ValueError("data bundle: inputs hold NaN or infinite values")
    meta = dict(meta, num_classes=classes, samples=int(y.shape[0]))
    return x.numpy(), y.numpy(), meta
