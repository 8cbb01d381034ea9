"""Node backends: netns (emulated nodes as network namespaces) and physical (the host);
docker (containers) is in worker/docker_nodes.py.

All hand the same thing to traffic control, a (netns name or None, device) pair (a
container's namespace is attached under its node's name), so there is one way to shape
links; netns and physical nodes run their app through the same process code.

Every kernel object the testbed makes carries the `etb` prefix: namespaces `etb-<node>`
(so `ip netns exec etb-n1 ...` works for users), host veth ends `etbv<hash of the node name>`, bridges
`etbbr<hash>`, cgroups under `edgetb/`, iptables rules with the comment `edgetb`.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from worker import tc
from worker.cgroups import Cgroup

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
NS_PREFIX = "etb-"
VETH_PREFIX = "etbv"
BRIDGE_PREFIX = "etbbr"
NODE_DEV = "eth0"
LAUNCH = str(Path(__file__).resolve().with_name("launch.py"))
PARALLEL = 8


class NodeError(RuntimeError):
    pass


def check_name(name: str, what: str = "node name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise NodeError(f"bad {what} {name!r}: use a letter then letters, digits, '-' or '_' (max 32)")
    return name


def link_exists(ifname: str) -> bool:
    """In this process's network namespace (sysfs may show another one's)."""
    try:
        socket.if_nametoindex(ifname)
        return True
    except OSError:
        return False


def veth_name(node: str) -> str:
    """Host end of a node's veth: from its name, which is unique on the machine as its
    namespace is (ids are only unique within one testbed)."""
    return f"{VETH_PREFIX}{zlib.crc32(node.encode()):08x}"


def bridge_name(emulator: str) -> str:
    return f"{BRIDGE_PREFIX}{zlib.crc32(emulator.encode()):08x}"


def _run(argv: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, input=input, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise NodeError(f"{' '.join(argv[:4])}...: {p.stderr.strip() or p.stdout.strip()}")
    return p


@dataclass
class NodeSpec:
    """What the controller asks for one node (see docs/internals.md)."""
    name: str
    id: int
    ip: str
    port: int
    cpu: float
    ram_mb: int
    cmd: list[str]
    working_dir: str
    volumes: list[dict] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    nic: str | None = None          # physical nodes: the NIC links are shaped on
    image: str = ""                 # docker nodes: the image to run
    gpu: int = 0                    # docker nodes: GPUs asked (a Docker device request)

    @classmethod
    def from_dict(cls, d: dict) -> "NodeSpec":
        try:
            spec = cls(name=check_name(d["name"]), id=int(d["id"]),
                       ip=str(ipaddress.IPv4Address(d["ip"])), port=int(d["port"]),
                       cpu=float(d.get("cpu", 1)), ram_mb=int(d.get("ram_mb", 1024)),
                       cmd=[str(a) for a in d.get("cmd", [])], working_dir=str(d.get("working_dir", "")),
                       volumes=list(d.get("volumes", [])), env={str(k): str(v) for k, v in d.get("env", {}).items()},
                       nic=d.get("nic"), image=str(d.get("image") or ""), gpu=int(d.get("gpu") or 0))
        except NodeError:
            raise
        except (KeyError, ValueError, TypeError) as e:
            raise NodeError(f"bad node {d.get('name')!r}: {type(e).__name__}: {e}") from None
        if not 0 <= spec.id < 60000:
            raise NodeError(f"bad node {spec.name}: id {spec.id} out of range")
        if spec.gpu < 0:
            raise NodeError(f"bad node {spec.name}: gpu {spec.gpu} must be 0 or more")
        if not 1 <= spec.port <= 65535 or spec.cpu <= 0 or spec.ram_mb < 16:
            raise NodeError(f"bad node {spec.name}: port, cpu or ram out of range")
        for v in spec.volumes:
            if not (isinstance(v, dict) and os.path.isabs(str(v.get("host", "")))
                    and os.path.isabs(str(v.get("node", ""))) and ".." not in Path(v["node"]).parts):
                raise NodeError(f"bad volume for {spec.name}: {v!r} (host and node paths must be absolute, the node path without '..')")
            if not os.path.isdir(v["host"]):
                raise NodeError(f"volume for {spec.name}: {v['host']} is not a directory on this worker")
        if spec.working_dir and (not os.path.isabs(spec.working_dir) or ".." in Path(spec.working_dir).parts):
            raise NodeError(f"bad node {spec.name}: working_dir {spec.working_dir!r} must be absolute, without '..'")
        if spec.nic is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", str(spec.nic)):
            raise NodeError(f"bad node {spec.name}: nic {spec.nic!r}")
        return spec


@dataclass
class Node:
    """A node this agent made, with everything needed to remove it (persisted as JSON)."""
    spec: NodeSpec
    kind: str                       # "netns" | "physical" | "docker"
    netns: str | None
    dev: str
    rundir: str
    veth: str | None = None
    bridge: str | None = None
    pgid: int | None = None
    state: str = "created"
    container: str | None = None    # docker nodes: container id
    cpuset: str | None = None       # docker nodes: the cores it got
    host_port: int | None = None    # docker nodes: the host port its DML port is published on

    def to_json(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Node":
        d = dict(d)
        d["spec"] = NodeSpec(**d["spec"])
        return cls(**d)


def app_env(spec: NodeSpec, extra_env: dict, log_dir: str, base=None) -> dict:
    """The environment a node app gets, whatever runs it: `base` (the agent's own for a
    process it starts, nothing for a container), the node's (EdgeTB's variables), the
    agent's (the token), unbuffered output, and where logs go and how much cpu it has
    unless already set."""
    env = dict(base or {})
    env.update(spec.env)
    env.update(extra_env)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DML_LOG_DIR", log_dir)
    env.setdefault("DML_CPU", f"{spec.cpu:g}")
    return env


def stop_group(p: subprocess.Popen, timeout_s: float = 5.0) -> int | None:
    """End a process started with start_new_session=True: SIGTERM its process group,
    SIGKILL the group if the leader lingers past timeout_s; returns its exit code."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
    return p.returncode


class Runner:
    """Starts and stops node apps: own process group, cgroup, stdout to a file."""

    def __init__(self):
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def start(self, node: Node, extra_env: dict) -> None:
        spec = node.spec
        if not spec.cmd:
            node.state = "idle"
            return
        cg = Cgroup(spec.name)
        cg.create(spec.cpu, spec.ram_mb)
        root = Path(node.rundir) / "root"
        binds = [{"source": v["host"], "target": str(root / v["node"].lstrip("/")), "ro": bool(v.get("ro"))}
                 for v in spec.volumes]
        # A node path is resolved inside the node's own root, so a volume at
        # /home/worker/dml_app never touches the host's /home.
        cwd = str(root / spec.working_dir.lstrip("/")) if spec.volumes else (spec.working_dir or node.rundir)
        argv = list(spec.cmd)
        if argv[0] in ("python3", "python"):
            argv[0] = sys.executable  # the agent's interpreter has torch and friends
        env = app_env(spec, extra_env, str(Path(node.rundir) / "log"), base=os.environ)
        launch = {"cgroup_procs": cg.procs_files, "netns": node.netns, "binds": binds, "cwd": cwd,
                  "argv": argv, "env": env}
        os.makedirs(cwd, exist_ok=True)
        out = open(Path(node.rundir) / "stdout.log", "ab")
        try:
            p = subprocess.Popen([sys.executable, LAUNCH, "--spec", json.dumps(launch)],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        finally:
            out.close()
        with self._lock:
            self._procs[spec.name] = p
        node.pgid = p.pid
        node.state = "running"

    def stop(self, node: Node, timeout_s: float = 5.0) -> None:
        """SIGTERM the app's process group, SIGKILL after timeout_s; then empty its cgroup."""
        with self._lock:
            p = self._procs.pop(node.spec.name, None)
        if p is not None:
            stop_group(p, timeout_s)
        cg = Cgroup(node.spec.name)
        cg.kill_all(timeout_s)   # children that left the group, or an app from before a restart
        cg.remove()
        node.pgid = None
        node.state = "stopped"

    def alive(self, name: str) -> bool | None:
        with self._lock:
            p = self._procs.get(name)
        return None if p is None else p.poll() is None


# ----------------------------------------------------------------------------- netns backend

def ensure_bridge(name: str, gateway_cidr: str) -> None:
    """Bridge with the gateway address; idempotent."""
    if not link_exists(name):
        _run(["ip", "link", "add", name, "type", "bridge"])
    have = _run(["ip", "-o", "addr", "show", "dev", name]).stdout
    if f" {gateway_cidr} " not in have:
        _run(["ip", "addr", "add", gateway_cidr, "dev", name])
    _run(["ip", "link", "set", name, "up"])
    _bridge_firewall(name, add=True)


def remove_bridge(name: str) -> None:
    _bridge_firewall(name, add=False)
    if link_exists(name):
        _run(["ip", "link", "del", name], check=False)


def _bridge_firewall(bridge: str, *, add: bool) -> None:
    """With br_netfilter loaded and Docker's FORWARD policy DROP, bridged frames between
    namespaces are silently dropped; own an accept rule for our bridge while it exists.
    Added whenever iptables is there: Docker may start (and load br_netfilter) later."""
    if shutil.which("iptables") is None:
        return
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-m", "comment", "--comment", "edgetb", "-j", "ACCEPT"]
    present = subprocess.run(["iptables", "-w", "-C"] + rule, capture_output=True).returncode == 0
    if add and not present:
        subprocess.run(["iptables", "-w", "-I"] + rule, capture_output=True)
    elif not add:
        while present:
            subprocess.run(["iptables", "-w", "-D"] + rule, capture_output=True)
            present = subprocess.run(["iptables", "-w", "-C"] + rule, capture_output=True).returncode == 0


def create_netns_nodes(specs: list[NodeSpec], bridge: str, prefixlen: int, gateway: str,
                       rundir_base: Path) -> list[Node]:
    """Namespaces, veths on the bridge and addresses for many nodes at once.

    The host side is one `ip -batch` process; each namespace is configured by one more,
    run in parallel. Returns the nodes; on failure removes what it made and raises.
    """
    nodes = []
    host_lines = []
    for s in specs:
        ns, veth = NS_PREFIX + s.name, veth_name(s.name)
        if Path(f"/run/netns/{ns}").exists():
            raise NodeError(f"node {s.name}: namespace {ns} already exists (reset first)")
        if link_exists(veth):
            # The rollback below removes every veth of this batch: never one we did not make.
            raise NodeError(f"node {s.name}: host link {veth} already exists (another testbed's node of that name?)")
        rundir = rundir_base / s.name
        nodes.append(Node(spec=s, kind="netns", netns=ns, dev=NODE_DEV, rundir=str(rundir),
                          veth=veth, bridge=bridge))
        host_lines += [f"netns add {ns}",
                       f"link add {veth} type veth peer name {NODE_DEV} netns {ns}",
                       f"link set {veth} master {bridge} up"]
    try:
        _run(["ip", "-batch", "-"], input="\n".join(host_lines) + "\n")

        def inside(n: Node) -> None:
            os.makedirs(n.rundir, exist_ok=True)
            _run(["ip", "-n", n.netns, "-batch", "-"], input="\n".join([
                f"addr add {n.spec.ip}/{prefixlen} dev {NODE_DEV}",
                f"link set {NODE_DEV} up", "link set lo up",
                f"route add default via {gateway}"]) + "\n")

        with ThreadPoolExecutor(PARALLEL) as ex:
            list(ex.map(inside, nodes))
    except Exception:
        for n in nodes:
            remove_netns_node(n)
        raise
    for n in nodes:
        n.state = "up"
    return nodes


def remove_netns_node(n: Node) -> None:
    if n.veth and link_exists(n.veth):
        _run(["ip", "link", "del", n.veth], check=False)
    if n.netns and Path(f"/run/netns/{n.netns}").exists():
        _run(["ip", "netns", "del", n.netns], check=False)
    shutil.rmtree(n.rundir, ignore_errors=True)


def install_links(nodes: list[Node], links: dict[str, list[tc.Link]],
                  tables: dict[str, tc.LinkTable]) -> dict[str, int]:
    """One tc batch per node, in parallel; then read every table back. -> links per node."""
    def one(n: Node) -> tuple[str, int]:
        table = tc.LinkTable(dev=n.dev, netns=n.netns)
        mine = links.get(n.spec.name, [])
        if n.kind == "physical":
            tc.clear(None, n.dev)
        tc.install(table, mine)
        tables[n.spec.name] = table
        return n.spec.name, tc.verify(table)

    with ThreadPoolExecutor(PARALLEL) as ex:
        return dict(ex.map(one, nodes))
