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
(optional `round_timeout_s`; the top may set `seed`, the initial model's seed). A node
may appear in several layers (at most once per layer); where it is its own child or
father, its conf says `"self"`. Optional top-level key, for tests only:
`"test_known_weights_seed": S` makes every trainer skip training and answer known
weights (dml_app/etree.py:known_weights) so the top's model can be checked exactly.

Written per node (DIR/<node>_structure.conf, default ROOT/dml_file/conf):

    {"layers": {"3": {"father": null, "children": ["self", "n2"], "sync": 5},
                "2": {"father": "self", "children": ["self", "n3"], "sync": 2},
                "1": {"father": "self", "epoch": 1}},
     "routes": {"n2": ["n1", "n2"]}, "connect": {"n2": "ip:port", ...}, "seed": 0}

`routes` holds, for every node this node sends weights to (its children and fathers),
the path over links.json (dml_tool/routes.py: the direct link if there is one, else the
fewest hops, then the widest). Nodes on a path between them forward the weights, so
they get a conf too (with no layers if they are not in the tree). A pair with no path
is an error naming links.json. Defaults: -l ROOT/links.json, -n ROOT/node_info.json;
a relative path is looked up from the current folder, then from dml_tool/.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

try:  # imported as dml_tool.el_structure_conf (the controller's --auto mode)
    from . import conf_utils as cu
    from . import routes as rts
except ImportError:  # run as a script from any folder
    import conf_utils as cu
    import routes as rts

AGGREGATOR_KEYS = ("name", "layer", "sync", "child_num", "round_timeout_s")
TOP_KEYS = AGGREGATOR_KEYS + ("seed",)
TRAINER_KEYS = ("name", "layer", "epoch", "lr")
FILE_KEYS = ("node_list", "test_known_weights_seed")
SELF = "self"


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
                graph: rts.Graph | None = None, file: str = "el_structure.json",
                links_file: str = "links.json", nodes_file: str = "node_info.json") -> dict[str, dict[str, Any]]:
    """Check the structure against the links and nodes; return {node: structure conf}.

    `graph` gives each link's rate for choosing among equally short routes (routes.py);
    without it every link counts the same and ties go to the smallest names."""
    if graph is None:
        graph = {src: {d: 1.0 for d in dests} for src, dests in links.items()}
    entries = parse_tree(structure, nodes, file=file, nodes_file=nodes_file)
    confs: dict[str, dict[str, Any]] = {}

    def conf_of(name: str) -> dict[str, Any]:
        if name not in confs:
            confs[name] = {"layers": {}, "routes": {}, "connect": cu.connect_map(name, links, nodes)}
        return confs[name]

    def rel(name: str, other: str) -> str:
        return SELF if name == other else other

    known_seed = None
    if "test_known_weights_seed" in structure:
        known_seed = cu.get_int(structure, "test_known_weights_seed", file, low=0)
    paths: dict[str, dict[str, list[str]]] = {}

    def add_route(src: str, dst: str, why: str) -> None:
        if src == dst:
            return
        found = paths.setdefault(src, rts.routes_from(graph, src))
        if dst not in found:
            reach = sorted(found)
            raise cu.ConfError(f"{links_file}: no route from {src!r} to {dst!r}, needed because "
                               f"{why}; {src} reaches {', '.join(reach) if reach else 'no node'}: "
                               f"add a link (or a path of links) from {src!r} to {dst!r}")
        conf_of(src)["routes"][dst] = found[dst]
        for hop in found[dst][1:-1]:
            conf_of(hop)  # forwarders need a conf (their links) even outside the tree

    for e in entries:
        conf = conf_of(e.name)
        layer = dict(e.conf)
        layer["father"] = rel(e.name, e.father.name) if e.father else None
        if e.layer > 1:
            layer["children"] = [rel(e.name, k.name) for k in e.children]
            for k in e.children:
                add_route(e.name, k.name, f"{e.where} sends its model to its child {k.name!r}")
                add_route(k.name, e.name, f"{k.name!r} (layer {k.layer}) sends its results "
                                          f"to its father {e.name!r}")
        seed = layer.pop("seed", None)
        if seed is not None:
            conf["seed"] = seed
        if e.layer == 1 and known_seed is not None:
            conf["test_known_weights_seed"] = known_seed
        conf["layers"][str(e.layer)] = layer
    return confs


def write_confs(structure_path: str, links_path: str = cu.DEFAULT_LINKS,
                node_info_path: str = cu.DEFAULT_NODE_INFO,
                out_dir: str = cu.DEFAULT_CONF_DIR) -> list[str]:
    """Read the three inputs, check them all, then write <node>_structure.conf files."""
    graph = rts.link_rates(cu.read_json(links_path), cu.short(links_path))
    return cu.write_structure_confs(structure_path, links_path, node_info_path, out_dir,
                                    functools.partial(build_confs, graph=graph))


main = functools.partial(cu.structure_tool_main, prog="el_structure_conf.py", algorithm="E-tree learning",
                         write=write_confs)


if __name__ == "__main__":
    sys.exit(main())
