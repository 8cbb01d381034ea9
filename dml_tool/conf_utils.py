"""Reading and checking the inputs of the conf tools (dataset_conf.py, *_structure_conf.py).

Every error is a ConfError whose message names the file and the key, e.g.
`fl_structure.json: node_list[2] "n9": unknown node (node_info.json has n1, n2, n3)`.
All checks run before any file is written, so a bad input leaves no half-written confs.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

TOOL_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOL_DIR)
DEFAULT_LINKS = os.path.join(ROOT, "links.json")
DEFAULT_NODE_INFO = os.path.join(ROOT, "node_info.json")
DEFAULT_CONF_DIR = os.path.join(ROOT, "dml_file", "conf")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConfError(ValueError):
    """An input the tools cannot use; the message names the file and the key."""


@dataclass(frozen=True)
class NodeAddr:
    name: str
    ip: str
    port: int
    kind: str  # "emulated" or "physical"

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


def resolve_input(path: str) -> str:
    """A relative path is looked up from the current folder, then from dml_tool/ (as EdgeTB did)."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.join(TOOL_DIR, path)


def short(path: str) -> str:
    """The file name as shown in error messages."""
    return os.path.basename(path)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfError(f"key {k!r} appears twice")
        out[k] = v
    return out


def read_json(path: str) -> Any:
    """JSON from `path`; missing files, bad syntax and repeated keys name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise ConfError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfError(f"{short(path)}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except ConfError as e:
        raise ConfError(f"{short(path)}: {e}") from None


def check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfError(f"{where}: {name!r} is not a valid node name "
                        "(letters, digits, '_', '-', '.'; starting with a letter or digit)")
    return name


def load_node_info(path: str) -> dict[str, NodeAddr]:
    """node_info.json -> {name: NodeAddr} over emulated and physical nodes."""
    info = read_json(path)
    f = short(path)
    if not isinstance(info, dict):
        raise ConfError(f"{f}: expected a JSON object with 'emulated_node' and/or 'physical_node'")
    nodes: dict[str, NodeAddr] = {}
    for section, kind in (("emulated_node", "emulated"), ("physical_node", "physical")):
        entries = info.get(section, {})
        if not isinstance(entries, dict):
            raise ConfError(f"{f}: {section!r} must be an object of node name -> {{ip, port}}")
        for name, e in entries.items():
            where = f"{f}: {section}.{name}"
            check_name(name, f"{f}: {section}")
            if name in nodes:
                raise ConfError(f"{where}: duplicate node (also a {nodes[name].kind} node)")
            if not isinstance(e, dict) or "ip" not in e or "port" not in e:
                raise ConfError(f"{where}: expected {{\"ip\": ..., \"port\": ...}}")
            port = e["port"]
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ConfError(f"{where}.port: {port!r} is not a port number")
            if not isinstance(e["ip"], str) or not e["ip"]:
                raise ConfError(f"{where}.ip: {e['ip']!r} is not an address")
            nodes[name] = NodeAddr(name, e["ip"], port, kind)
    if not nodes:
        raise ConfError(f"{f}: lists no nodes (is the controller running? it writes this file at start)")
    return nodes


def load_links(path: str, nodes: Mapping[str, NodeAddr], *,
               nodes_file: str = "node_info.json") -> dict[str, list[str]]:
    """links.json -> {src: [dest, ...]}; every name must be a known node, no link twice."""
    raw = read_json(path)
    f = short(path)
    if not isinstance(raw, dict):
        raise ConfError(f"{f}: expected an object of node -> [{{\"dest\": ..., \"bw\": ...}}, ...]")
    out: dict[str, list[str]] = {}
    for src, links in raw.items():
        if src not in nodes:
            raise ConfError(f"{f}: {src!r}: unknown node ({nodes_file} has {name_list(nodes)})")
        if not isinstance(links, list):
            raise ConfError(f"{f}: {src!r}: expected a list of links")
        dests: list[str] = []
        for i, link in enumerate(links):
            where = f"{f}: {src}[{i}]"
            if not isinstance(link, dict) or "dest" not in link:
                raise ConfError(f"{where}: missing key 'dest'")
            dest = link["dest"]
            if dest not in nodes:
                raise ConfError(f"{where}.dest: unknown node {dest!r} "
                                f"({nodes_file} has {name_list(nodes)})")
            if dest == src:
                raise ConfError(f"{where}.dest: a link from {src!r} to itself")
            if dest in dests:
                raise ConfError(f"{where}.dest: duplicate link from {src!r} to {dest!r}")
            dests.append(dest)
        out[src] = dests
    return out


def connect_map(node: str, links: Mapping[str, list[str]], nodes: Mapping[str, NodeAddr]) -> dict[str, str]:
    """The 'connect' of a structure conf: every peer `node` has a link to -> 'ip:port'."""
    return {dest: nodes[dest].address for dest in links.get(node, [])}


def name_list(nodes: Iterable[str]) -> str:
    names = sorted(nodes)
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


def get_int(entry: Mapping[str, Any], key: str, where: str, *, low: int = 0,
            default: int | None = None) -> int:
    if key not in entry:
        if default is None:
            raise ConfError(f"{where}: missing key {key!r}")
        return default
    v = entry[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfError(f"{where}.{key}: expected an integer >= {low}, got {v!r}")
    return v


def get_number(entry: Mapping[str, Any], key: str, where: str, *, low: float, high: float,
               low_open: bool = False, default: float | None = None) -> float:
    if key not in entry:
        if default is None:
            raise ConfError(f"{where}: missing key {key!r}")
        return default
    v = entry[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok or v > high or v < low or (low_open and v == low):
        rng = f"{'(' if low_open else '['}{low}, {high}]"
        raise ConfError(f"{where}.{key}: expected a number in {rng}, got {v!r}")
    return float(v)


def check_keys(entry: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    allowed = list(allowed)
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ConfError(f"{where}: unknown key(s) {unknown} (known: {', '.join(allowed)})")


def write_confs(out_dir: str, confs: Mapping[str, Mapping[str, Any]], kind: str) -> list[str]:
    """Write `<node>_<kind>.conf` for every node; each file appears whole or not at all."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, conf in confs.items():
        check_name(name, f"{kind} conf")
        path = os.path.join(out_dir, f"{name}_{kind}.conf")
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
