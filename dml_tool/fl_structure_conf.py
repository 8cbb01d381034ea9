"""Write each node's FL structure conf (EdgeTB's fl_structure_conf.py).

    python3 dml_tool/fl_structure_conf.py -s fl_structure.json [-l links.json]
        [-n node_info.json] [-o DIR]

fl_structure.json: {"node_list": [{"name": "n1", "trainer_fraction": 1.0, "sync": 10},
{"name": "n2", "epoch": 2}, ...]}; the first node is the aggregator, the others its
trainers. Written per node (DIR/<node>_structure.conf, default ROOT/dml_file/conf):
the aggregator {"trainer_fraction", "sync", "child_node", "connect"} and each trainer
{"epoch", "father_node", "connect"}, where `connect` maps every node it has a link to
(links.json) to its 'ip:port' (node_info.json, written by the controller at start).
Optional keys pass through: aggregator "seed", "round_timeout_s", "min_fraction",
"round_retries"; trainer "lr".
Defaults: -l ROOT/links.json, -n ROOT/node_info.json; a relative path is looked up
from the current folder, then from dml_tool/.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from dml_tool import conf_utils as cu

AGGREGATOR_KEYS = ("name", "trainer_fraction", "sync", "seed", "round_timeout_s", "min_fraction",
                   "round_retries")
TRAINER_KEYS = ("name", "epoch", "lr")


def build_confs(structure: Any, links: Mapping[str, list[str]], nodes: Mapping[str, cu.NodeAddr],
                *, file: str = "fl_structure.json", links_file: str = "links.json",
                nodes_file: str = "node_info.json") -> dict[str, dict[str, Any]]:
    """Check the structure against the links and nodes; return {node: structure conf}."""
    if not isinstance(structure, dict) or not isinstance(structure.get("node_list"), list):
        raise cu.ConfError(f"{file}: expected {{\"node_list\": [{{\"name\": ..., ...}}, ...]}}")
    cu.check_keys(structure, ("node_list",), file)
    node_list = structure["node_list"]
    if len(node_list) < 2:
        raise cu.ConfError(f"{file}: node_list needs an aggregator and at least one trainer")

    cu.node_list(structure, nodes, file=file, nodes_file=nodes_file)   # names: valid, known, once

    agg = node_list[0]
    agg_name = agg["name"]
    where = f"{file}: node_list[0] {agg_name!r} (aggregator)"
    cu.check_keys(agg, AGGREGATOR_KEYS, where)
    agg_conf: dict[str, Any] = {
        "trainer_fraction": cu.get_number(agg, "trainer_fraction", where, low=0.0, high=1.0, low_open=True),
        "sync": cu.get_int(agg, "sync", where, low=1),
        "child_node": [],
        "connect": cu.connect_map(agg_name, links, nodes),
    }
    if "seed" in agg:
        agg_conf["seed"] = cu.get_int(agg, "seed", where, low=0)
    if "round_timeout_s" in agg:
        agg_conf["round_timeout_s"] = cu.get_number(agg, "round_timeout_s", where, low=0.1, high=1e6)
    if "min_fraction" in agg:
        agg_conf["min_fraction"] = cu.get_number(agg, "min_fraction", where, low=0.0, high=1.0, low_open=True)
    if "round_retries" in agg:
        agg_conf["round_retries"] = cu.get_int(agg, "round_retries", where, low=0, high=100)
    confs: dict[str, dict[str, Any]] = {agg_name: agg_conf}

    for i, entry in enumerate(node_list[1:], start=1):
        name = entry["name"]
        where = f"{file}: node_list[{i}] {name!r} (trainer)"
        cu.check_keys(entry, TRAINER_KEYS, where)
        conf: dict[str, Any] = {
            "epoch": cu.get_int(entry, "epoch", where, low=1),
            "father_node": agg_name,
            "connect": cu.connect_map(name, links, nodes),
        }
        if "lr" in entry:
            conf["lr"] = cu.get_number(entry, "lr", where, low=0.0, high=10.0, low_open=True)
        # Weights go both ways: the aggregator sends to /train, the trainer uploads to /combine.
        if agg_name not in conf["connect"]:
            raise cu.ConfError(f"{links_file}: no link from trainer {name!r} to its aggregator "
                               f"{agg_name!r} ({where}); add {{\"dest\": \"{agg_name}\", \"bw\": ...}} "
                               f"under {name!r}")
        if name not in agg_conf["connect"]:
            raise cu.ConfError(f"{links_file}: no link from aggregator {agg_name!r} to its trainer "
                               f"{name!r} ({where}); add {{\"dest\": \"{name}\", \"bw\": ...}} "
                               f"under {agg_name!r}")
        agg_conf["child_node"].append(name)
        confs[name] = conf
    return confs


def write_confs(structure_path: str, links_path: str = cu.DEFAULT_LINKS,
                node_info_path: str = cu.DEFAULT_NODE_INFO,
                out_dir: str = cu.DEFAULT_CONF_DIR) -> list[str]:
    """Read the three inputs, check them all, then write <node>_structure.conf files."""
    return cu.write_structure_confs(structure_path, links_path, node_info_path, out_dir, build_confs)


def main(argv: Sequence[str] | None = None) -> int:
    return cu.structure_tool_main(argv, prog="fl_structure_conf.py", algorithm="FL", write=write_confs)


if __name__ == "__main__":
    sys.exit(main())
