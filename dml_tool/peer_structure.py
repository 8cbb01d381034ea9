"""EdgeTB's structure json for the peer algorithms (gossip, ring all-reduce), read
and checked once for both of their conf tools.

    {"sync": 10, "node_list": [{"name": "n1", "epoch": 1}, {"name": "n2", "epoch": 1}, ...]}

`sync` is the number of rounds; every listed node is a peer with its own `epoch`.
Optional top-level keys: "seed" (int, the common initial model and the random choices)
and "lr" (SGD learning rate for every peer; a node's own "lr" wins), plus the keys an
algorithm adds (gossip "wait_s", ring all-reduce "init").
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from dml_tool import conf_utils as cu

COMMON_TOP_KEYS = ("sync", "node_list", "seed", "lr")
NODE_KEYS = ("name", "epoch", "lr")


def read_peers(structure: Any, nodes: Mapping[str, cu.NodeAddr], *, file: str, nodes_file: str,
               extra_top_keys: Sequence[str] = (), min_epoch: int = 1,
               min_peers: int = 2) -> list[dict[str, Any]]:
    """Check the structure; return, in node_list order, every peer's {"name", "where" (for
    messages), "conf": {"sync", "epoch"[, "seed", "lr"]}}, the start of its structure conf.
    The caller checks its `extra_top_keys` and adds them and the links to each conf."""
    if not isinstance(structure, dict) or not isinstance(structure.get("node_list"), list):
        raise cu.ConfError(f"{file}: expected {{\"sync\": R, \"node_list\": [{{\"name\": \"n1\", "
                           f"\"epoch\": 1}}, ...]}}")
    cu.check_keys(structure, COMMON_TOP_KEYS + tuple(extra_top_keys), file)
    common: dict[str, Any] = {"sync": cu.get_int(structure, "sync", file, low=1)}
    if "seed" in structure:
        common["seed"] = cu.get_int(structure, "seed", file, low=0)
    if "lr" in structure:
        common["lr"] = cu.get_number(structure, "lr", file, low=0.0, high=10.0, low_open=True)
    node_list = structure["node_list"]
    if len(node_list) < min_peers:
        raise cu.ConfError(f"{file}: node_list needs at least {min_peers} peers, it has {len(node_list)}")
    peers: list[dict[str, Any]] = []
    for listed in cu.node_list(structure, nodes, file=file, nodes_file=nodes_file, entry_keys="'name' and 'epoch'"):
        name, entry, where = listed.name, listed.entry, listed.where
        cu.check_keys(entry, NODE_KEYS, where)
        conf = {**common, "epoch": cu.get_int(entry, "epoch", where, low=min_epoch)}
        if "lr" in entry:
            conf["lr"] = cu.get_number(entry, "lr", where, low=0.0, high=10.0, low_open=True)
        peers.append({"name": name, "where": where, "conf": conf})
    return peers


def tool(build_confs: Callable[..., dict], prog: str, algorithm: str) -> tuple[Callable, Callable]:
    """(write_confs, main) of a peer conf tool whose checks are `build_confs`:
    write_confs(structure, links=ROOT/links.json, node_info=ROOT/node_info.json,
    out_dir=ROOT/dml_file/conf) -> paths, and main(argv) -> exit status."""
    def write_confs(structure_path: str, links_path: str = cu.DEFAULT_LINKS,
                    node_info_path: str = cu.DEFAULT_NODE_INFO, out_dir: str = cu.DEFAULT_CONF_DIR) -> list[str]:
        return cu.write_structure_confs(structure_path, links_path, node_info_path, out_dir, build_confs)

    def main(argv: Sequence[str] | None = None) -> int:
        return cu.structure_tool_main(argv, prog=prog, algorithm=algorithm, write=write_confs)
    return write_confs, main
