"""Write each node's E-tree structure conf (EdgeTB's el_structure_conf.py).

    python3 dml_tool/el_structure_conf.py -s el_structure.json [-l links.json]
        [-n node_info.json] [-o DIR]

el_structure.json, EdgeTB's format, read BREADTH FIRST:

    {"node_list": [
      {"name": "n1", "layer": 3, "sync": 5, "child_num": 2},     <- the top (one entry)
      {"name": "n1", "layer": 2, "sync": 2, "child_num": 2},     <- its 2 children, in order
      {"name": "n2", "layer": 2, "sync": 2, "child_num": 3},
      {"name": "n1", "layer": 1, "epoch": 1},                    <- n1@2's 2 children
      {"name": "n3", "layer": 1, "epoch": 1},
      {"name": "n2", "layer": 1, "epoch": 1}, ...]}              <- n2@2's 3 children

The first entry is the top; every entry of layer l > 1 takes the next `child_num`
entries of layer l - 1 as its children, in list order. Layer-1 entries are trainers
(`epoch`, optional `lr`); the others aggregate after `sync` rounds of their children
(optional `round_timeout_s`, `min_fraction`, `round_retries`: the round's deadline, the
share of the children that must answer, the retries of a round without them; the top
may set `seed`, the initial model's seed). A node
may appear in several layers (at most once per layer); where it is its own child or
father, its conf says `"self"`. Optional top-level key, for tests only:
`"test_known_weights_seed": S` makes every trainer skip training and answer known
weights (dml_app/etree.py:known_weights) so the top's model can be checked exactly.

Written per node (DIR/<node>_structure.conf, default ROOT/dml_file/conf), EdgeTB's
keys with EdgeTB's meaning: one list entry per layer the node sits in, from its lowest
layer to its highest; "self" where the father or a child is the node itself, "top" as
the father of the top, `sync` 0 on layer 1 (it trains `epoch` epochs instead):

    {"layer": [1, 2, 3], "father_node": ["self", "self", "top"],
     "child_node": [[], ["self", "n3"], ["self", "n2"]], "sync": [0, 2, 5], "epoch": 1,
     "connect": {"n2": "ip:port", ...}, "forward": {"n4": "ip:port of the next hop", ...}}

`connect` maps every node this node has a link to (links.json) to its 'ip:port';
`forward` maps every other node it reaches to the 'ip:port' of the next hop on a
shortest path over the links that exist in both directions (dml_tool/routes.py; ties
go to the smallest next-hop name). `epoch` is written for nodes in layer 1 only. Keys
of ours beside them: "lr" (a trainer's), "round_timeout_s" ({"<layer>": seconds}),
"min_fraction" ({"<layer>": share}), "round_retries" ({"<layer>": count}), "seed" (the top's) and "test_known_weights_seed". Nodes on the way between a father and
a child forward the weights, so they get a conf too (empty layer lists if they are not
in the tree). A father or child that a node can reach neither over a link nor through
`forward` is an error naming links.json. Defaults: -l ROOT/links.json,
-n ROOT/node_info.json; a relative path is looked up from the current folder, then
from dml_tool/.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from dml_tool import conf_utils as cu
from dml_tool import routes as rts

AGGREGATOR_KEYS = ("name", "layer", "sync", "child_num", "round_timeout_s", "min_fraction", "round_retries")
TOP_KEYS = AGGREGATOR_KEYS + ("seed",)
TRAINER_KEYS = ("name", "layer", "epoch", "lr")
FILE_KEYS = ("node_list", "test_known_weights_seed")
SELF = "self"
TOP = "top"     # the father of the top, in EdgeTB's confs


@dataclass
class Entry:
    """One (node, layer) of the tree."""
    index: int
    name: str
    layer: int
    conf: dict[str, Any]
    father: "Entry | None" = None
    children: list["Entry"] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"node_list[{self.index}] {self.name!r} (layer {self.layer})"


def parse_tree(structure: Any, nodes: Mapping[str, cu.NodeAddr], *, file: str = "el_structure.json",
               nodes_file: str = "node_info.json") -> list[Entry]:
    """Check el_structure.json and link every entry to its father and children (breadth first)."""
    if not isinstance(structure, dict) or not isinstance(structure.get("node_list"), list):
        raise cu.ConfError(f"{file}: expected {{\"node_list\": [{{\"name\": ..., \"layer\": ...}}, ...]}}")
    cu.check_keys(structure, FILE_KEYS, file)
    node_list = structure["node_list"]
    if len(node_list) < 2:
        raise cu.ConfError(f"{file}: node_list needs a top node and at least one child")
    entries: list[Entry] = []
    seen: dict[tuple[str, int], int] = {}
    for i, raw in enumerate(node_list):
        where = f"{file}: node_list[{i}]"
        if not isinstance(raw, dict) or "name" not in raw:
            raise cu.ConfError(f"{where}: expected an object with 'name' and 'layer'")
        name = raw["name"]
        if name not in nodes:
            raise cu.ConfError(f"{where} {name!r}: unknown node ({nodes_file} has {cu.name_list(nodes)})")
        layer = cu.get_int(raw, "layer", f"{where} {name!r}", low=1)
        where = f"{where} {name!r} (layer {layer})"
        if (name, layer) in seen:
            raise cu.ConfError(f"{where}: {name} is in layer {layer} twice (also node_list[{seen[name, layer]}])")
        seen[name, layer] = i
        if i == 0 and layer < 2:
            raise cu.ConfError(f"{where}: the first entry is the top and needs layer >= 2")
        if i > 0 and layer >= entries[0].layer:
            raise cu.ConfError(f"{where}: only the first entry may be in the top layer "
                               f"{entries[0].layer}; list the tree from the top down, breadth first")
        if i > 0 and layer > entries[-1].layer:
            raise cu.ConfError(f"{where}: comes after a layer-{entries[-1].layer} entry; "
                               "list the tree breadth first (layers never go up)")
        if layer == 1:
            cu.check_keys(raw, TRAINER_KEYS, where)
            conf: dict[str, Any] = {"epoch": cu.get_int(raw, "epoch", where, low=1)}
            if "lr" in raw:
                conf["lr"] = cu.get_number(raw, "lr", where, low=0.0, high=10.0, low_open=True)
        else:
            cu.check_keys(raw, TOP_KEYS if i == 0 else AGGREGATOR_KEYS, where)
            conf = {"sync": cu.get_int(raw, "sync", where, low=1),
                    "child_num": cu.get_int(raw, "child_num", where, low=1)}
            if "round_timeout_s" in raw:
                conf["round_timeout_s"] = cu.get_number(raw, "round_timeout_s", where, low=0.1, high=1e6)
            if "min_fraction" in raw:
                conf["min_fraction"] = cu.get_number(raw, "min_fraction", where, low=0.0, high=1.0, low_open=True)
            if "round_retries" in raw:
                conf["round_retries"] = cu.get_int(raw, "round_retries", where, low=0, high=100)
            if "seed" in raw:
                conf["seed"] = cu.get_int(raw, "seed", where, low=0)
        entries.append(Entry(i, name, layer, conf))

    nxt = 1
    for e in entries:
        if e.layer == 1:
            continue
        want = e.conf.pop("child_num")
        kids = entries[nxt:nxt + want]
        if len(kids) < want:
            raise cu.ConfError(f"{file}: {e.where}: child_num {want}, but only {len(kids)} "
                               "entries are left for it (read breadth first)")
        for k in kids:
            if k.layer != e.layer - 1:
                raise cu.ConfError(f"{file}: {e.where} would take {k.where} as a child, but a "
                                   f"child must be in layer {e.layer - 1} (check the child_num of "
                                   "this and earlier entries; the list is read breadth first)")
            k.father = e
        e.children = kids
        nxt += want
    if nxt < len(entries):
        raise cu.ConfError(f"{file}: {entries[nxt].where} and later entries have no father: the "
                           f"child_num values add up to {nxt - 1}, node_list has {len(entries) - 1} "
                           "entries below the top")
    return entries


def build_confs(structure: Any, links: Mapping[str, list[str]], nodes: Mapping[str, cu.NodeAddr], *,
                file: str = "el_structure.json", links_file: str = "links.json",
                nodes_file: str = "node_info.json") -> dict[str, dict[str, Any]]:
    """Check the structure against the links and nodes; return {node: structure conf}."""
    entries = parse_tree(structure, nodes, file=file, nodes_file=nodes_file)
    known_seed = None
    if "test_known_weights_seed" in structure:
        known_seed = cu.get_int(structure, "test_known_weights_seed", file, low=0)
    hops = rts.next_hops(links, nodes)
    confs: dict[str, dict[str, Any]] = {}

    def conf_of(name: str) -> dict[str, Any]:
        if name not in confs:
            confs[name] = {"layer": [], "father_node": [], "child_node": [], "sync": []}
        return confs[name]

    def rel(name: str, other: str) -> str:
        return SELF if name == other else other

    def need_route(src: str, dst: str, why: str) -> None:
        if src == dst:
            return
        way = rts.path(links, hops, src, dst)
        if way is None:
            raise cu.ConfError(f"{links_file}: no route from {src!r} to {dst!r}, needed because {why}: "
                               f"{src} has no link to {dst} and no path to it over links that exist in "
                               f"both directions (it has them with {', '.join(rts.both_ways(links).get(src, [])) or 'no node'}); "
                               f"add {{\"dest\": \"{dst}\", \"bw\": ...}} under {src!r}, or links both ways")
        for hop in way[1:-1]:
            conf_of(hop)  # forwarders need a conf (connect, forward) even outside the tree

    # one list entry per layer, from the node's lowest layer to its highest
    for e in sorted(entries, key=lambda e: e.layer):
        conf = conf_of(e.name)
        conf["layer"].append(e.layer)
        conf["father_node"].append(rel(e.name, e.father.name) if e.father else TOP)
        conf["child_node"].append([rel(e.name, k.name) for k in e.children])
        conf["sync"].append(e.conf.get("sync", 0))
        if e.layer == 1:
            conf["epoch"] = e.conf["epoch"]
            if "lr" in e.conf:
                conf["lr"] = e.conf["lr"]
            if known_seed is not None:
                conf["test_known_weights_seed"] = known_seed
        for key in ("round_timeout_s", "min_fraction", "round_retries"):   # per layer: a node may aggregate in several
            if key in e.conf:
                conf.setdefault(key, {})[str(e.layer)] = e.conf[key]
        if "seed" in e.conf:
            conf["seed"] = e.conf["seed"]
        for k in e.children:
            need_route(e.name, k.name, f"{e.where} sends its model to its child {k.name!r}")
            need_route(k.name, e.name, f"{k.name!r} (layer {k.layer}) sends its results to its father {e.name!r}")
    for name, conf in confs.items():
        conf["connect"] = cu.connect_map(name, links, nodes)
        conf["forward"] = {dst: nodes[hop].address for dst, hop in sorted(hops[name].items())}
    return confs


def write_confs(structure_path: str, links_path: str = cu.DEFAULT_LINKS,
                node_info_path: str = cu.DEFAULT_NODE_INFO,
                out_dir: str = cu.DEFAULT_CONF_DIR) -> list[str]:
    """Read the three inputs, check them all, then write <node>_structure.conf files."""
    return cu.write_structure_confs(structure_path, links_path, node_info_path, out_dir, build_confs)


main = functools.partial(cu.structure_tool_main, prog="el_structure_conf.py", algorithm="E-tree learning",
                         write=write_confs)


if __name__ == "__main__":
    sys.exit(main())
