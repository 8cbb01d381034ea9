"""Write each node's ring all-reduce structure conf (EdgeTB's ra_structure_conf.py).

    python3 dml_tool/ra_structure_conf.py -s ra_structure.json [-l links.json]
        [-n node_info.json] [-o DIR]

ra_structure.json: {"sync": 5, "node_list": [{"name": "n1", "epoch": 1}, ...]}. As in
EdgeTB, node_list[i]'s `next_name` (where it sends its chunks) is node_list[i - 1], and
node_list[0]'s is the last entry: the ring runs BACKWARDS through the list
(n1 -> n5 -> n4 -> n3 -> n2 -> n1 for n1..n5). `epoch` may be 0 (all-reduce without
local training). Optional top-level "seed", "lr", "init" ("common": every node starts
from the same seeded model, the default; "per_rank": the node at node_list[k] starts
from seed + k, i.e. different known weights), "step_timeout_s" (the longest the
controller waits for one all-reduce step before it leaves out a member that has not
answered; default 60); per node "lr".
Written per node (DIR/<node>_structure.conf, default ROOT/dml_file/conf):
{"epoch", "sync", "ring_size", "pos", "next_name", "connect", ...}, EdgeTB's keys:
`ring_size` the number of nodes in node_list, `pos` the node's 0-based index in it,
`connect` every link of the node; ours beside them: "rank" (the same index as "pos",
which ra_peer.py takes under either name), "seed", "lr", "init", "step_timeout_s". links.json must have a link from every node to its
next_name (the chunks travel over it), or this fails naming both. Defaults: -l ROOT/links.json,
-n ROOT/node_info.json; a relative path is looked up from the current folder, then from
dml_tool/.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

from dml_tool import conf_utils as cu, peer_structure as ps

INITS = ("common", "per_rank")


def build_confs(structure: Any, links: Mapping[str, list[str]], nodes: Mapping[str, cu.NodeAddr],
                *, file: str = "ra_structure.json", links_file: str = "links.json",
                nodes_file: str = "node_info.json") -> dict[str, dict[str, Any]]:
    """Check the ring against the links and nodes; return {node: structure conf}."""
    peers = ps.read_peers(structure, nodes, file=file, nodes_file=nodes_file, extra_top_keys=("init", "step_timeout_s"),
                          min_epoch=0)
    extra = {}
    if "init" in structure:
        if structure["init"] not in INITS:
            raise cu.ConfError(f"{file}.init: expected one of {', '.join(INITS)}, got {structure['init']!r}")
        extra["init"] = structure["init"]
    if "step_timeout_s" in structure:
        extra["step_timeout_s"] = cu.get_number(structure, "step_timeout_s", file, low=0.1, high=3600.0)
    names = [p["name"] for p in peers]
    confs: dict[str, dict[str, Any]] = {}
    for rank, p in enumerate(peers):
        name, next_name = p["name"], names[rank - 1]  # EdgeTB: entry i sends to entry i - 1
        connect = cu.connect_map(name, links, nodes)
        if next_name not in connect:
            travel = names[:1] + names[:0:-1] + names[:1]
            raise cu.ConfError(f"{links_file}: no link from {name!r} to its next_name {next_name!r} "
                               f"({p['where']}; entry i sends to entry i - 1, so the ring is "
                               f"{' -> '.join(travel)}); add {{\"dest\": \"{next_name}\", \"bw\": ...}} "
                               f"under {name!r} or reorder node_list")
        confs[name] = {**p["conf"], **extra, "ring_size": len(names), "pos": rank, "next_name": next_name,
                       "connect": connect, "rank": rank}
    return confs


# write_confs(structure, links, node_info, out_dir) and main(argv), as every conf tool has
write_confs, main = ps.tool(build_confs, "ra_structure_conf.py", "ring all-reduce")


if __name__ == "__main__":
    sys.exit(main())
