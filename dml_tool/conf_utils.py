"""Reading and checking the inputs of the conf tools (dataset_conf.py, *_structure_conf.py).

The formats themselves (node names, links.json, node_info.json, the dataset json, the
node_list of a structure json) are dml_app/formats.py's; this module gives the tools
their names for them, the default paths and the file writing. Every error is a ConfError
(formats.FormatError) whose message names the file and the key, e.g.
`fl_structure.json: node_list[2] "n9": unknown node (node_info.json has n1, n2, n3)`.
All checks run before any file is written, so a bad input leaves no half-written confs.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from typing import Any, Callable, Mapping, Sequence

from dml_app import formats
from dml_app.formats import (NAME_RE, NodeAddr, check_keys, check_name, connect_map,  # noqa: F401
                             get_int, get_number, name_list, node_list)

TOOL_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOL_DIR)

DEFAULT_LINKS = os.path.join(ROOT, "links.json")
DEFAULT_NODE_INFO = os.path.join(ROOT, "node_info.json")
DEFAULT_CONF_DIR = os.path.join(ROOT, "dml_file", "conf")

ConfError = formats.FormatError   # an input the tools cannot use; the message names the file and the key


def resolve_input(path: str) -> str:
    """A relative path is looked up from the current folder, then from dml_tool/ (as EdgeTB did)."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.join(TOOL_DIR, path)


def short(path: str) -> str:
    """The file name as shown in error messages."""
    return os.path.basename(path)


def read_json(path: str) -> Any:
    """JSON from `path`; missing files, bad syntax and repeated keys name the file."""
    return formats.read_json(path, short(path))


def load_node_info(path: str) -> dict[str, NodeAddr]:
    """node_info.json -> {name: NodeAddr} over emulated and physical nodes (ports as
    integers or strings, as EdgeTB writes them)."""
    return formats.parse_node_info(read_json(path), short(path))


def load_links(path: str, nodes: Mapping[str, NodeAddr], *,
               nodes_file: str = "node_info.json") -> dict[str, list[str]]:
    """links.json -> {src: [dest, ...]}; every name must be a known node, no link twice,
    units as tc(8) (formats.parse_links)."""
    links = formats.parse_links(read_json(path), file=short(path), nodes=nodes, nodes_file=nodes_file)
    return {src: [link.dest for link in lst] for src, lst in links.items()}


def write_confs(out_dir: str, confs: Mapping[str, Mapping[str, Any]], kind: str) -> list[str]:
    """Write `<node>_<kind>.conf` for every node; each file appears whole or not at all."""
    files = {name: formats.conf_file_name(name, kind) for name in confs}   # every name checked first
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, conf in confs.items():
        path = os.path.join(out_dir, files[name])
        fd, tmp = tempfile.mkstemp(prefix=f".{name}_{kind}.", dir=out_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(conf, f, indent=2)
                f.write("\n")
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; confs are not secret
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        paths.append(path)
    return paths


def write_structure_confs(structure_path: str, links_path: str, node_info_path: str, out_dir: str,
                          build: Callable[..., Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """The body of every <alg>_structure_conf.py: read node_info.json, links.json and the
    structure json, let `build(structure, links, nodes, file=, links_file=, nodes_file=)`
    check them all and make {node: conf}, then write <node>_structure.conf files."""
    nodes = load_node_info(node_info_path)
    links = load_links(links_path, nodes, nodes_file=short(node_info_path))
    confs = build(read_json(structure_path), links, nodes, file=short(structure_path),
                  links_file=short(links_path), nodes_file=short(node_info_path))
    return write_confs(out_dir, confs, "structure")


def structure_tool_main(argv: Sequence[str] | None = None, *, prog: str, algorithm: str,
                        write: Callable[[str, str, str, str], list[str]]) -> int:
    """The command line of every <alg>_structure_conf.py (-s, -l, -n, -o); `write` is the
    tool's write_confs(structure, links, node_info, out_dir). Exit 2 with the ConfError."""
    ap = argparse.ArgumentParser(prog=prog, description=f"Write <node>_structure.conf files for {algorithm}.")
    ap.add_argument("-s", "--structure", required=True, help="structure json, e.g. " + prog.replace("_conf.py", ".json"))
    ap.add_argument("-l", "--link", default=DEFAULT_LINKS, help="links json (default ROOT/links.json)")
    ap.add_argument("-n", "--node", default=DEFAULT_NODE_INFO,
                    help="node info json (default ROOT/node_info.json)")
    ap.add_argument("-o", "--output", default=DEFAULT_CONF_DIR,
                    help="output folder (default ROOT/dml_file/conf)")
    a = ap.parse_args(argv)
    try:
        paths = write(resolve_input(a.structure), resolve_input(a.link), resolve_input(a.node), a.output)
    except ConfError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


def structure_tool(build: Callable[..., Mapping[str, Mapping[str, Any]]], *, prog: str,
                   algorithm: str) -> tuple[Callable[..., list[str]], Callable[..., int]]:
    """(write_confs, main) of a conf tool whose checks are `build` (write_structure_confs):
    write_confs(structure, links=ROOT/links.json, node_info=ROOT/node_info.json,
    out_dir=ROOT/dml_file/conf) -> paths, and main(argv=None) -> exit status."""
    def write_confs(structure_path: str, links_path: str = DEFAULT_LINKS, node_info_path: str = DEFAULT_NODE_INFO,
                    out_dir: str = DEFAULT_CONF_DIR) -> list[str]:
        return write_structure_confs(structure_path, links_path, node_info_path, out_dir, build)
    return write_confs, functools.partial(structure_tool_main, prog=prog, algorithm=algorithm, write=write_confs)


def server_and_members(structure: Mapping[str, Any], nodes: Mapping[str, Any], *, file: str, nodes_file: str,
                       member_role: str, members_what: str) -> tuple[str, list[str], dict[str, int]]:
    """A node_list of one node with "role": "server" and members (role `member_role`, the
    default): (server, members in order, {name: its index in node_list}). Entries take
    only 'name' and 'role'; ConfError names the entry otherwise."""
    server, members, seen = None, [], {}
    for listed in node_list(structure, nodes, file=file, nodes_file=nodes_file, entry_keys="'name' (and 'role')"):
        name, entry, where = listed.name, listed.entry, listed.where
        check_keys(entry, ("name", "role"), where)
        seen[name] = listed.index
        role = entry.get("role", member_role)
        if role == "server":
            if server is not None:
                raise ConfError(f"{where}: a second server (node_list[{seen[server]}] {server!r} is one)")
            server = name
        elif role == member_role:
            members.append(name)
        else:
            raise ConfError(f"{where}.role: expected 'server' or {member_role!r}, got {role!r}")
    if server is None or not members:
        raise ConfError(f"{file}: node_list needs one node with \"role\": \"server\" and at least one "
                        f"{members_what}")
    return server, members, seen


def member_confs(server: str, members: Sequence[str], seen: Mapping[str, int], links: Mapping[str, list[str]],
                 nodes: Mapping[str, Any], *, role: str, file: str, links_file: str) -> dict[str, dict[str, Any]]:
    """Each member's conf {"role", "server", "connect"} for a server <-> members
    structure (parameters go server -> member, gradients member -> server); ConfError
    naming the entry and the link when either direction is missing from links.json."""
    confs = {}
    for m in members:
        where = f"{file}: node_list[{seen[m]}] {m!r} ({role})"
        for src, dst, carries in ((m, server, "gradients"), (server, m, "parameters")):
            if dst not in links.get(src, []):
                raise ConfError(f"{links_file}: no link from {src!r} to {dst!r} ({where}): it carries "
                                f"the {carries}; add {{\"dest\": \"{dst}\", \"bw\": ...}} under {src!r}")
        confs[m] = {"role": role, "server": server, "connect": connect_map(m, links, nodes)}
    return confs


def server_rule(structure: Mapping[str, Any], file: str, *, steps: int, max_staleness: int) -> dict[str, Any]:
    """The parameter server's SGD rule as both server tools (ps, sl) write it: "lr",
    "lr_end" (only when given: the lr falls linearly to it at `steps`), "momentum",
    "max_staleness" (default `max_staleness`) and "eval_every" (default steps / 10);
    bounded as ps.PsConfig checks them on the node."""
    rule: dict[str, Any] = {"lr": get_number(structure, "lr", file, low=0.0, high=10.0, low_open=True)}
    if "lr_end" in structure:
        rule["lr_end"] = get_number(structure, "lr_end", file, low=0.0, high=10.0)
    rule.update({
        "momentum": get_number(structure, "momentum", file, low=0.0, high=0.999, default=0.0),
        "max_staleness": get_int(structure, "max_staleness", file, low=0, high=10_000_000, default=max_staleness),
        "eval_every": get_int(structure, "eval_every", file, low=1, high=10_000_000, default=max(1, steps // 10)),
    })
    return rule
