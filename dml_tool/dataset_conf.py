"""Write each node's dataset conf from a dataset json file (EdgeTB's dataset_conf.py).

    python3 dml_tool/dataset_conf.py -d fl_dataset.json [-o DIR]

FILE maps node names to EdgeTB's keys (parts are 1-based, contiguous; lengths 0..100000,
starts 1..1000000, batch_size 1..1048576):
    {"n1": {"test_len": 10, "test_start_index": 1, "batch_size": 32},
     "n2": {"train_len": 10, "train_start_index": 1, "batch_size": 32}}
An optional top-level "defaults" object holds keys every node gets unless its own entry
sets them. Each node's entry goes to DIR/<node>_dataset.conf (default ROOT/dml_file/conf).
A relative -d is looked up from the current folder, then from dml_tool/.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from dml_tool import conf_utils as cu

DATASET_KEYS = tuple(cu.formats.DATASET_KEYS)
DEFAULTS_KEY = cu.formats.DATASET_DEFAULTS_KEY


def build_confs(dataset: Any, file: str = "dataset.json") -> dict[str, dict[str, int]]:
    """Check a parsed dataset json and return {node: conf}; ConfError names file and key
    (formats.parse_dataset: EdgeTB's keys, each an integer in its range)."""
    return cu.formats.parse_dataset(dataset, file)


def write_confs(dataset_json_path: str, out_dir: str = cu.DEFAULT_CONF_DIR) -> list[str]:
    """Read `dataset_json_path`, check it all, then write <node>_dataset.conf files."""
    confs = build_confs(cu.read_json(dataset_json_path), cu.short(dataset_json_path))
    return cu.write_confs(out_dir, confs, "dataset")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write <node>_dataset.conf files from a dataset json.")
    ap.add_argument("-d", "--dataset", required=True, help="dataset json, e.g. fl_dataset.json")
    ap.add_argument("-o", "--output", default=cu.DEFAULT_CONF_DIR,
                    help="output folder (default ROOT/dml_file/conf)")
    a = ap.parse_args(argv)
    try:
        paths = write_confs(cu.resolve_input(a.dataset), a.output)
    except cu.ConfError as e:
        print(f"dataset_conf.py: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
