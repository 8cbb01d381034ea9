"""The testbed's file formats, owned here once for the controller, dml_tool, the agent
and the node roles: node names, `links.json` (bandwidth and time units as tc(8) reads
them), `node_info.json`, the dataset json and per-node dataset conf, the parts every
structure json shares (`node_list`), and the per-node conf keys. They are EdgeTB's
formats with EdgeTB's meaning (docs/internals.md, "Files").

One rule each and one error: FormatError, whose message says the file, the place and
what is expected, e.g. `links.json: n1[1].dest: duplicate link from 'n1' to 'n2' (also
n1[0])`. Pure functions on parsed JSON (plus read_json for a file): nothing here
deploys, writes or talks to the network.

It lives in dml_app/ because node roles run with only that folder on their path: they
`import formats`; the controller, dml_tool and the agent `from dml_app import formats`.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping

from dml_app import bounded_input


# Fault actions, one list for the controller (/fault/node, /fault/link, scenario files)
# and the agents (/node/fault, /link/fault): what a node's app and a link can be made to do.
NODE_FAULTS = ("kill", "pause", "resume", "restart")
LINK_FAULTS = ("down", "up")


class FormatError(ValueError):
    """Input that does not follow a testbed file format. The message names the file,
    the place in it and what is expected; `problems` lists every problem found where a
    caller asked for all of them (the first is the message)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems) if problems else [message]
        super().__init__(message)


def shown(value: Any) -> str:
    """repr(value) for a message, at most 80 characters (input is not trusted to be short)."""
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


# ----------------------------------------------------------------------------- numbers
def _range(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if hi is None:
        return f" {'>' if lo_open else '>='} {lo}" if lo is not None else ""
    return f" in {'(' if lo_open else '['}{lo}, {hi}]"


def _get(entry: Mapping[str, Any], key: str, where: str, default: Any, expected: str, convert) -> Any:
    """convert(entry[key]) (bounded_input.number's checks), `default` when absent and not None;
    FormatError "where: missing key 'key'" or "where.key: expected ..., got ..."."""
    if key not in entry:
        if default is None:
            raise FormatError(f"{where}: missing key {key!r}")
        return default
    v = entry[key]
    try:
        return convert(v)
    except ValueError:
        raise FormatError(f"{where}.{key}: expected {expected}, got {shown(v)}") from None


def get_int(entry: Mapping[str, Any], key: str, where: str, *, low: int = 0, high: int | None = None,
            default: int | None = None) -> int:
    """entry[key] as an integer in [low, high] (a JSON integer, never a bool, string or
    fraction, nor 2.0); `default` when absent, else FormatError."""
    def convert(v: Any) -> int:
        if isinstance(v, float):
            raise ValueError(v)
        return int(bounded_input.number(v, key, low, high, integer=True))
    return _get(entry, key, where, default, f"an integer{_range(low, high, False)}", convert)


def get_number(entry: Mapping[str, Any], key: str, where: str, *, low: float, high: float,
               low_open: bool = False, default: float | None = None) -> float:
    """entry[key] as a finite number in [low, high] ((low, high] with low_open)."""
    return _get(entry, key, where, default, f"a number{_range(float(low), float(high), low_open)}",
                lambda v: float(bounded_input.number(v, key, low, high, lo_open=low_open)))


def check_keys(entry: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """FormatError naming every key of `entry` that is not `allowed`."""
    allowed = list(allowed)
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise FormatError(f"{where}: unknown key(s) {unknown} (known: {', '.join(allowed)})")


# ----------------------------------------------------------------------------- names
# A node or emulator name becomes a network namespace and a docker container
# (`etb-<name>`), a cgroup folder, file names (`<name>_dataset.conf`, `<name>.log`) and a
# URL path part, so it is kept to what is safe in all of them.
NAME_MAX = 32
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,%d}$" % (NAME_MAX - 1))
NAME_RULE = f"a letter, then letters, digits, '-' or '_'; at most {NAME_MAX} characters"


def is_name(name: Any) -> bool:
    return isinstance(name, str) and NAME_RE.match(name) is not None


def check_name(name: Any, where: str, what: str = "node name") -> str:
    """`name` if it is a valid node (or emulator: `what`) name, else FormatError naming `where`."""
    if not is_name(name):
        raise FormatError(f"{where}: {shown(name)} is not a valid {what} ({NAME_RULE})")
    return name


def name_list(names: Iterable[str]) -> str:
    """Some names for a message: the first 12, sorted."""
    names = sorted(names)
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


# ----------------------------------------------------------------------------- units (tc(8))
RATE_UNITS_BPS = {
    "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12,
}
TIME_UNITS_US = {"us": 1, "usec": 1, "ms": 1000, "msec": 1000, "s": 10**6, "sec": 10**6}
MIN_RATE_BPS = 8_000          # below this HTB cannot shape with a 1-packet burst in sane time
MAX_RATE_BPS = 100 * 10**9
MAX_TIME_US = 60 * 10**6      # a delay or jitter of at most a minute
_AMOUNT = re.compile(r"(\d{1,15}(?:\.\d{1,9})?)\s*([a-zA-Z]+)")

UnitError = FormatError       # worker/units.py's name for it


def _amount(text: Any, what: str, example: str, table: Mapping[str, int]) -> float:
    """A tc amount 'NUMBERunit' -> NUMBER * table[unit] (unit case-insensitive, as tc)."""
    if not isinstance(text, str):
        raise FormatError(f"{what} must be a string like {example!r}, got {shown(text)}")
    m = _AMOUNT.fullmatch(text.strip())
    if not m or m.group(2).lower() not in table:
        raise FormatError(f"bad {what} {shown(text)}: use a number and one of {', '.join(table)}"
                          + (" (as tc: 'mbit' = megabits/s, 'mbps' = megabytes/s)" if table is RATE_UNITS_BPS
                             else ""))
    return float(m.group(1)) * table[m.group(2).lower()]


def parse_rate(text: Any) -> int:
    """A bandwidth as tc reads it -> bits/s: '10mbit' -> 10_000_000; '2mbps' (BYTES/s)
    -> 16_000_000. A bare number is refused (tc would read it as bits/s; EdgeTB's files
    always give a unit), and so is anything outside 8kbit..100gbit."""
    bps = int(round(_amount(text, "bandwidth", "10mbit", RATE_UNITS_BPS)))
    if not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
        raise FormatError(f"bandwidth {shown(text)} is outside 8kbit..100gbit")
    return bps


def parse_time_us(text: Any) -> int:
    """A delay or jitter as tc reads it -> microseconds (netem's unit): '10ms' -> 10000;
    at most a minute."""
    us = int(round(_amount(text, "time", "10ms", TIME_UNITS_US)))
    if us > MAX_TIME_US:
        raise FormatError(f"time {shown(text)} is more than 60s")
    return us


def parse_loss_pct(text: Any) -> float:
    """A loss as a percentage: '1%', '1' or 1 -> 1.0; in [0, 100]."""
    m = re.fullmatch(r"(\d{1,3}(?:\.\d{1,9})?)\s*%?", str(text).strip()) if not isinstance(text, bool) else None
    if not m or not 0 <= float(m.group(1)) <= 100:
        raise FormatError(f"bad loss {shown(text)}: use a percentage like '1%'")
    return float(m.group(1))


def format_rate(bps: int) -> str:
    """bits/s -> the shortest tc bit-rate string: 10_000_000 -> '10mbit'."""
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps % mult == 0 and bps >= mult:
            return f"{bps // mult}{unit}"
    return f"{bps}bit"


def ipv4(value: Any) -> str:
    """An IPv4 address given as a string ("10.0.0.2"); ValueError for anything else
    (ipaddress alone would take the integer 1, or true, as 0.0.0.1)."""
    if not isinstance(value, str):
        raise ValueError(f"expected an IPv4 address string like \"10.0.0.2\", got {type(value).__name__}")
    return str(ipaddress.IPv4Address(value))


def port(value: Any, where: str) -> int:
    """A TCP port, 1..65535, as an integer or a string of digits (EdgeTB writes "8001")."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise FormatError(f"{where}: {shown(value)} is not a port number (1..65535, as 8001 or \"8001\")")
    return value


# ----------------------------------------------------------------------------- JSON files
def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"key {shown(k)} appears twice")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise FormatError(f"{name} is not a JSON number")


def read_json(path: str, shown: str | None = None) -> Any:
    """JSON from `path`; a missing file, bad syntax, NaN/Infinity and repeated keys are a
    FormatError naming the file (as `shown`, default its base name)."""
    f = shown or os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{f}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise FormatError(f"{f}: JSON nested too deeply") from None
    except FormatError as e:
        raise FormatError(f"{f}: {e}") from None


# ----------------------------------------------------------------------------- links.json
LINK_KEYS = ("dest", "bw", "delay", "jitter", "loss")


@dataclass(frozen=True)
class Link:
    """One entry of links.json: src -> dest at rate_bps, with netem's optional extras."""
    src: str
    dest: str
    rate_bps: int
    delay_us: int | None = None
    jitter_us: int | None = None
    loss_pct: float | None = None

    def shaping(self) -> dict[str, Any]:
        """The agent's keys for this link's shaping (rate_bps[, delay_us, jitter_us, loss_pct])."""
        out: dict[str, Any] = {"rate_bps": self.rate_bps}
        for k in ("delay_us", "jitter_us", "loss_pct"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


def _known(nodes: Collection[str], nodes_file: str | None) -> str:
    return f"({nodes_file} has {name_list(nodes)})" if nodes_file else f"(the testbed has {name_list(nodes)})"


def _node_ref(name: Any, where: str, nodes: Collection[str] | None, nodes_file: str | None) -> str | None:
    """The problem with a node named in links.json, or None."""
    if nodes is not None and name not in nodes:
        return f"{where}: unknown node {shown(name)} {_known(nodes, nodes_file)}"
    if nodes is None and not is_name(name):
        return f"{where}: {shown(name)} is not a valid node name ({NAME_RULE})"
    return None


def _one_link(file: str, src: str, i: int, link: Any, seen: dict[str, int],
              nodes: Collection[str] | None, nodes_file: str | None) -> tuple[Link | None, list[str]]:
    where = f"{file}: {src}[{i}]"
    if not isinstance(link, dict):
        return None, [f"{where}: expected an object like {{\"dest\": \"n2\", \"bw\": \"10mbit\"}}"]
    if "dest" not in link:
        return None, [f"{where}: missing key 'dest'"]
    out: list[str] = []
    dest = link["dest"]
    bad = _node_ref(dest, f"{where}.dest", nodes, nodes_file)
    if bad:
        out.append(bad)
    elif dest == src:
        out.append(f"{where}.dest: a link from {src!r} to itself")
    elif dest in seen:
        out.append(f"{where}.dest: duplicate link from {src!r} to {dest!r} (also {src}[{seen[dest]}])")
    else:
        seen[dest] = i
    extra = sorted(set(link) - set(LINK_KEYS))
    if extra:
        out.append(f"{where}: unknown key(s) {extra} (known: {', '.join(LINK_KEYS)})")
    values: dict[str, Any] = {}
    for key, parse, name in (("bw", parse_rate, "rate_bps"), ("delay", parse_time_us, "delay_us"),
                             ("jitter", parse_time_us, "jitter_us"), ("loss", parse_loss_pct, "loss_pct")):
        if key not in link:
            if key == "bw":
                out.append(f"{where}: missing key 'bw' (a bandwidth like \"10mbit\")")
            continue
        try:
            values[name] = parse(link[key])
        except FormatError as e:
            out.append(f"{where}.{key}: {e}")
    if out:
        return None, out
    return Link(src, dest, **values), []


def link_problems(raw: Any, *, file: str = "links.json", nodes: Collection[str] | None = None,
                  nodes_file: str | None = None) -> tuple[dict[str, list[Link]], list[str]]:
    """Parse a links.json document: ({src: [Link, ...]} of the good entries, every problem).

    `nodes`: the node set where it is known (every src and dest must be in it; messages
    say where the set came from: `nodes_file`, else "the testbed"); None checks names only.
    Refused: a link to itself, a second link from one node to the same dest (naming both),
    keys other than dest, bw, delay, jitter, loss, and bad units."""
    if not isinstance(raw, dict):
        return {}, [f"{file}: expected an object of node -> [{{\"dest\": ..., \"bw\": ...}}, ...]"]
    links: dict[str, list[Link]] = {}
    problems: list[str] = []
    for src, entries in raw.items():
        if nodes is not None and src not in nodes:
            problems.append(f"{file}: {shown(src)}: unknown node {_known(nodes, nodes_file)}")
            continue
        if nodes is None and not is_name(src):
            problems.append(f"{file}: {shown(src)} is not a valid node name ({NAME_RULE})")
            continue
        if not isinstance(entries, list):
            problems.append(f"{file}: {shown(src)}: expected a list of links")
            continue
        seen: dict[str, int] = {}
        links[src] = []
        for i, entry in enumerate(entries):
            link, bad_ones = _one_link(file, src, i, entry, seen, nodes, nodes_file)
            problems += bad_ones
            if link:
                links[src].append(link)
    return links, problems


def parse_links(raw: Any, *, file: str = "links.json", nodes: Collection[str] | None = None,
                nodes_file: str | None = None) -> dict[str, list[Link]]:
    """link_problems, with the first problem raised as a FormatError (`problems` has all)."""
    links, problems = link_problems(raw, file=file, nodes=nodes, nodes_file=nodes_file)
    if problems:
        raise FormatError(problems[0], problems)
    return links


# ----------------------------------------------------------------------------- node_info.json
NODE_INFO_SECTIONS = (("emulated_node", "emulated"), ("physical_node", "physical"))
_HOST_RE = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")


@dataclass(frozen=True)
class NodeAddr:
    name: str
    ip: str
    port: int
    kind: str  # "emulated" or "physical"

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


def parse_node_info(info: Any, file: str = "node_info.json") -> dict[str, NodeAddr]:
    """node_info.json -> {name: NodeAddr} over emulated and physical nodes. Ports may be
    integers (the controller here) or strings of digits (EdgeTB's controller)."""
    if not isinstance(info, dict):
        raise FormatError(f"{file}: expected a JSON object with 'emulated_node' and/or 'physical_node'")
    nodes: dict[str, NodeAddr] = {}
    for section, kind in NODE_INFO_SECTIONS:
        entries = info.get(section, {})
        if not isinstance(entries, dict):
            raise FormatError(f"{file}: {section!r} must be an object of node name -> {{ip, port}}")
        for name, e in entries.items():
            where = f"{file}: {section}.{name}"
            check_name(name, f"{file}: {section}")
            if name in nodes:
                raise FormatError(f"{where}: duplicate node (also a {nodes[name].kind} node)")
            if not isinstance(e, dict) or "ip" not in e or "port" not in e:
                raise FormatError(f"{where}: expected {{\"ip\": ..., \"port\": ...}}")
            p = port(e["port"], f"{where}.port")
            if not isinstance(e["ip"], str) or not _HOST_RE.match(e["ip"]):
                raise FormatError(f"{where}.ip: {shown(e['ip'])} is not an address")
            nodes[name] = NodeAddr(name, e["ip"], p, kind)
    if not nodes:
        raise FormatError(f"{file}: lists no nodes (is the controller running? it writes this file at start)")
    return nodes


# ----------------------------------------------------------------------------- dataset
# EdgeTB's per-node dataset conf: contiguous ranges of numbered parts (1-based).
# key: (default on the node, lowest, highest). Lengths are bounded (a range is loaded as
# a list of part numbers); a batch larger than any part set is pointless.
TRAIN_LEN, TRAIN_START, TEST_LEN, TEST_START, BATCH_SIZE = (
    "train_len", "train_start_index", "test_len", "test_start_index", "batch_size")
DATASET_KEYS: dict[str, tuple[int, int, int]] = {
    TRAIN_LEN: (0, 0, 100_000), TRAIN_START: (1, 1, 1_000_000),
    TEST_LEN: (0, 0, 100_000), TEST_START: (1, 1, 1_000_000),
    BATCH_SIZE: (32, 1, 1 << 20)}
DATASET_DEFAULTS_KEY = "defaults"   # dataset json: keys every node gets unless its entry sets them


def check_dataset_entry(entry: Any, where: str) -> dict[str, int]:
    """The EdgeTB keys an entry gives, each checked (unknown keys refused); no defaults."""
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: expected an object with {', '.join(DATASET_KEYS)}")
    check_keys(entry, DATASET_KEYS, where)
    return {k: get_int(entry, k, where, low=lo, high=hi) for k, (_, lo, hi) in DATASET_KEYS.items() if k in entry}


def dataset_conf(conf: Any, where: str = "dataset conf") -> dict[str, int]:
    """A node's dataset conf (as pushed to it) -> every key, absent ones at their default
    (lengths 0, starts 1, batch_size 32). Unknown keys are passed over, as EdgeTB's apps do."""
    if not isinstance(conf, Mapping):
        raise FormatError(f"{where}: expected a JSON object with {', '.join(DATASET_KEYS)}")
    return {k: get_int(conf, k, where, low=lo, high=hi, default=d) for k, (d, lo, hi) in DATASET_KEYS.items()}


def parse_dataset(doc: Any, file: str = "dataset.json") -> dict[str, dict[str, int]]:
    """The dataset json (EdgeTB's dataset_conf.py input: node name -> its keys, plus an
    optional "defaults") -> {node: conf}. A node with neither train_len nor test_len gets
    no data and is refused."""
    if not isinstance(doc, dict) or not doc:
        raise FormatError(f"{file}: expected an object of node name -> {{{', '.join(DATASET_KEYS)}}}")
    defaults = doc.get(DATASET_DEFAULTS_KEY, {})
    if not isinstance(defaults, dict):
        raise FormatError(f"{file}: {DATASET_DEFAULTS_KEY!r} must be an object")
    check_dataset_entry(defaults, f"{file}: {DATASET_DEFAULTS_KEY}")
    confs: dict[str, dict[str, int]] = {}
    for name, entry in doc.items():
        if name == DATASET_DEFAULTS_KEY:
            continue
        where = f"{file}: {name}"
        check_name(name, file)
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: expected an object with {', '.join(DATASET_KEYS)}")
        conf = check_dataset_entry({**defaults, **entry}, where)
        if not conf.get(TRAIN_LEN) and not conf.get(TEST_LEN):
            raise FormatError(f"{where}: neither train_len nor test_len is set: the node gets no data")
        confs[name] = conf
    if not confs:
        raise FormatError(f"{file}: no node entries")
    return confs


# ----------------------------------------------------------------------------- structure inputs
NODE_LIST = "node_list"


@dataclass(frozen=True)
class ListedNode:
    """One entry of a structure json's node_list, checked: its index, name, entry and
    `where` ("fl_structure.json: node_list[2] 'n3'") for messages."""
    index: int
    name: str
    entry: dict
    where: str


def node_list(structure: Any, nodes: Collection[str], *, file: str, nodes_file: str = "node_info.json",
              entry_keys: str = "'name'") -> list[ListedNode]:
    """The node_list of a structure json: a list of objects, each with a valid `name` of a
    known node, none listed twice. The keys beyond `name` are the tool's to check."""
    if not isinstance(structure, dict) or not isinstance(structure.get(NODE_LIST), list):
        raise FormatError(f"{file}: expected {{\"{NODE_LIST}\": [{{\"name\": \"n1\", ...}}, ...]}}")
    out: list[ListedNode] = []
    first: dict[str, int] = {}
    for i, entry in enumerate(structure[NODE_LIST]):
        where = f"{file}: {NODE_LIST}[{i}]"
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: expected an object with {entry_keys}")
        if "name" not in entry:
            raise FormatError(f"{where}: missing key 'name'")
        name = check_name(entry["name"], where)
        where = f"{where} {name!r}"
        if name in first:
            raise FormatError(f"{where}: duplicate node, listed twice (also {NODE_LIST}[{first[name]}])")
        if name not in nodes:
            raise FormatError(f"{where}: unknown node {_known(nodes, nodes_file)}")
        first[name] = i
        out.append(ListedNode(i, name, entry, where))
    return out


# ----------------------------------------------------------------------------- per-node confs
# The conf files the tools write and the controller pushes: dml_file/conf/<node>_<kind>.conf.
CONF_KINDS = ("dataset", "structure")


def conf_file_name(node: str, kind: str) -> str:
    """`<node>_<kind>.conf`; FormatError for a bad name or kind."""
    check_name(node, f"{kind} conf")
    if kind not in CONF_KINDS:
        raise FormatError(f"conf kind {shown(kind)}: expected one of {', '.join(CONF_KINDS)}")
    return f"{node}_{kind}.conf"


# Structure conf keys shared by the tools and the roles (EdgeTB's names).
CONNECT = "connect"                  # {peer: "ip:port"} of the peers the node has a link to
EPOCH, SYNC = "epoch", "sync"
FATHER_NODE, CHILD_NODE = "father_node", "child_node"
TRAINER_FRACTION = "trainer_fraction"
LAYER, FORWARD = "layer", "forward"


def connect_map(node: str, links: Mapping[str, Iterable[Any]], nodes: Mapping[str, NodeAddr]) -> dict[str, str]:
    """The `connect` of a structure conf: every node `node` has a link to -> "ip:port".
    `links` values are dest names or Link objects."""
    return {d: nodes[d].address for d in (getattr(x, "dest", x) for x in links.get(node, ()))}
