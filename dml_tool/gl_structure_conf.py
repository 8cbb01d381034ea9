"""Write each peer's gossip-learning structure conf (EdgeTB's gl_structure_conf.py).

    python3 dml_tool/gl_structure_conf.py -s gl_structure.json [-l links.json]
        [-n node_info.json] [-o DIR]

gl_structure.json: {"sync": 10, "node_list": [{"name": "n1", "epoch": 1}, ...]}; every
listed node is a peer that gossips `sync` times. Optional top-level "seed", "lr",
"wait_s" (how long a peer waits for a model after gossiping, default 5), "gossip_timeout_s"
(the longest one send may take before the peer tries another, default 30); per node "lr".
Written per peer (DIR/<node>_structure.conf, default ROOT/dml_file/conf):
{"epoch", "sync", "connect", "peers", ...}: `connect` is EdgeTB's, every node the node
has a link to (links.json, participants or not) -> its 'ip:port' (node_info.json);
"peers" is ours, the OTHER PEERS of node_list among them, in links.json's order: the
ones it may gossip to. A peer without a link to another peer is an error. Defaults: -l ROOT/links.json,
-n ROOT/node_info.json; a relative path is looked up from the current folder, then
from dml_tool/.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

from dml_tool import conf_utils as cu, peer_structure as ps


def build_confs(structure: Any, links: Mapping[str, list[str]], nodes: Mapping[str, cu.NodeAddr],
                *, file: str = "gl_structure.json", links_file: str = "links.json",
                nodes_file: str = "node_info.json") -> dict[str, dict[str, Any]]:
    """Check the structure against the links and nodes; return {peer: structure conf}."""
    peers = ps.read_peers(structure, nodes, file=file, nodes_file=nodes_file, extra_top_keys=("wait_s", "gossip_timeout_s"))
    extra = {}
    for key, low in (("wait_s", 0.0), ("gossip_timeout_s", 0.1)):
        if key in structure:
            extra[key] = cu.get_number(structure, key, file, low=low, high=3600.0)
    names = {p["name"] for p in peers}
    confs: dict[str, dict[str, Any]] = {}
    for p in peers:
        name = p["name"]
        connect = cu.connect_map(name, links, nodes)
        gossip_to = [d for d in connect if d in names]
        if not gossip_to:
            raise cu.ConfError(f"{links_file}: peer {name!r} ({p['where']}) has no link to another "
                               f"peer of {file}, so it cannot gossip; add e.g. "
                               f"{{\"dest\": \"{sorted(names - {name})[0]}\", \"bw\": ...}} under {name!r}")
        confs[name] = {**p["conf"], **extra, "connect": connect, "peers": gossip_to}
    return confs


# write_confs(structure, links, node_info, out_dir) and main(argv), as every conf tool has
write_confs, main = ps.tool(build_confs, "gl_structure_conf.py", "gossip learning")


if __name__ == "__main__":
    sys.exit(main())
