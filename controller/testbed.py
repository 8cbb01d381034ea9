"""The testbed definition (EdgeTB's API names) and its deployment.

A Testbed is plain data until `start()`: emulators, emulated and physical nodes, shared
folders and links. `validate()` checks all of it at once and raises DefinitionError
naming the file and key of every problem; nothing is deployed unless it passes. `start()`
then asks every worker's agent to build its part, in parallel, and prints `tc finish`
only when every agent has read its links back from the kernel. If any worker fails,
what was already deployed elsewhere is removed and the error names that worker.
After `tc finish` it waits until every node's app answers on its DML port (each agent's
`GET /status` says `ready`), printing `apps answering: k/N` while it waits, with a
deadline that grows with the node count (`ready_timeout_s`); a node that did not answer
or whose app exited is named and everything is removed again.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from controller import share, stopping
from dml_app import formats
from dml_app import net
from testbed_core import credentials

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_NODE_PORT = 4444
DEFAULT_SUBNET = "10.233.0.0/16"
_UNITS_MB = {"M": 1, "MB": 1, "G": 1024, "GB": 1024}
BACKENDS = ("netns", "docker")
CONNECT_RETRIES = 5         # a call repeated only while its connection is refused (~2.5 s)
FANOUT = 32                 # calls in flight at once when the controller calls every node or worker
READY_BASE_S = 30.0         # the readiness deadline: READY_BASE_S + READY_PER_NODE_S per app
READY_PER_NODE_S = 0.5
READY_POLL_S = 0.5          # how often every agent's /status is read while waiting
READY_SHOW_S = 2.0          # at most one `apps answering: k/N` line this often
APP_ENDED = ("exited", "dead", "gone", "stopped")   # agent states of an app that will not answer


class DefinitionError(ValueError):
    """Everything wrong with a testbed definition, one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("testbed definition refused, nothing deployed:\n  " + "\n  ".join(problems))


class DeployError(RuntimeError):
    pass


class NotReady(DeployError):
    """Apps that did not answer on their DML port by the readiness deadline, or exited
    first; `not_answering` and `exited` name them."""

    def __init__(self, message: str, not_answering: list[str], exited: list[str]):
        self.not_answering, self.exited = not_answering, exited
        super().__init__(message)


def fan_out(fn, items, limit: int = FANOUT) -> list:
    """[fn(item) for item in items], at most `limit` calls at once, in the items' order."""
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(min(limit, len(items))) as ex:
        return list(ex.map(fn, items))


def not_sent(e: net.HttpError) -> bool:
    """Whether a failed call cannot have reached its peer: the TCP connection was refused
    or timed out before it was made (requests' NewConnectionError, ConnectTimeout), so
    sending it again cannot apply it twice. A read timeout or a dropped connection may
    have delivered it."""
    return e.not_sent


def call_once(method: str, url: str, **kw):
    """net.call sent once; repeated (up to CONNECT_RETRIES, waits from 0.1 s to 1 s) only
    where it cannot have arrived (not_sent)."""
    for attempt in range(CONNECT_RETRIES + 1):
        try:
            return net.call(method, url, retries=0, **kw)
        except net.HttpError as e:
            if attempt == CONNECT_RETRIES or not not_sent(e):
                raise
        time.sleep(min(0.1 * 2 ** attempt, 1.0))


def _tcp_open(ip: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ip:port (for an agent whose /status
    does not say `ready`)."""
    try:
        with socket.create_connection((ip, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


MAX_CPU = 1024              # cores an emulator or a node may have
MAX_RAM_MB = 1 << 22        # 4 TiB
# A node's box beyond cpu and ram (worker/nodes.py has the same bounds and defaults):
# processes and threads at most, and the size of its log dir (MiB).
PIDS_RANGE = (16, 1 << 16)      # default 512
LOG_MB_RANGE = (1, 1 << 16)     # default 64


def _ram_mb(ram: float, unit: str, where: str, problems: list[str] | None = None) -> int:
    """ram in `unit` -> MB; a bad unit raises DefinitionError, a bad number (bool, string,
    NaN, infinite, <= 0, beyond 4 TiB) goes to `problems` (validate() lists it) as 0."""
    if unit not in _UNITS_MB:
        raise DefinitionError([f"{where}: unit {unit!r} is not one of M, G"])
    try:
        mb = net.number(ram, f"{where}: ram", 0, MAX_RAM_MB / _UNITS_MB[unit], lo_open=True) * _UNITS_MB[unit]
    except ValueError as e:
        if problems is None:
            raise DefinitionError([str(e)]) from None
        problems.append(str(e))
        return 0
    return int(mb)


@dataclass
class Nfs:
    """A folder of the controller shared with nodes (EdgeTB's add_nfs).

    On a worker that is this machine the share is a bind mount of the folder itself.
    """
    tag: str
    path: str


@dataclass
class Volume:
    host: str
    node: str
    ro: bool = False
    nfs: str | None = None          # the add_nfs tag, when the folder is a controller share


@dataclass
class _Node:
    name: str
    working_dir: str = ""
    cmd: list[str] = field(default_factory=list)
    volumes: list[Volume] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    ip: str = ""
    port: int = DEFAULT_NODE_PORT
    id: int = 0
    root: bool = False              # run the app as root with the host's view (README)

    def mount_local_path(self, local_path: str, node_path: str, ro: bool = False) -> None:
        self.volumes.append(Volume(str(local_path), str(node_path), ro))

    def mount_nfs(self, nfs: Nfs, node_path: str, ro: bool = True) -> None:
        """A shared folder (the app, the dataset): read-only for nodes unless ro=False, so
        no node can change what the others run; results come back over HTTP."""
        self.volumes.append(Volume(nfs.path, str(node_path), ro, nfs=nfs.tag))

    def set_cmd(self, working_dir: str, cmd, root: bool | None = None) -> None:
        """root=True: the app runs as root with the host's view (README, "How a node sees
        the testbed"); by default as the unprivileged node user."""
        self.working_dir = working_dir
        self.cmd = list(cmd) if not isinstance(cmd, str) else cmd.split()
        if root is not None:
            if not isinstance(root, bool):
                raise DefinitionError([f"node {self.name}: root must be True or False, not {root!r}"])
            self.root = root


@dataclass
class EmulatedNode(_Node):
    image: str = ""
    cpu: float = 1.0
    ram_mb: int = 1024
    emulator: "Emulator | None" = None
    gpu: int = 0
    pids: int | None = None         # None: the agent's default (512)
    log_mb: int | None = None       # None: the agent's default (64)


@dataclass
class PhysicalNode(_Node):
    nic: str = ""
    agent_port: int = 3333


@dataclass
class Emulator:
    name: str
    ip: str
    cpu: float
    ram_mb: int
    backend: str = "netns"
    agent_port: int | None = None      # None: the controller runs this worker's agent itself
    subnet: str = DEFAULT_SUBNET
    nodes: list[EmulatedNode] = field(default_factory=list)
    gpu: int = 0

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.IPv4Network(self.subnet).hosts()))


class Testbed:
    """EdgeTB's testbed object: add_* the parts, load_link, then start()."""

    __test__ = False  # not a pytest class

    def __init__(self, ip: str, dir_name: str, manager_class=None, host_port: int = 3333,
                 node_port: int = DEFAULT_NODE_PORT, token: str | None = None,
                 allowed_hosts=()):
        self.ip = ip
        self.dir_name = str(dir_name)
        self.host_port = host_port
        self.node_port = node_port
        # The admin token: opens the controller and every agent (docs/security.md).
        self.token = token or secrets.token_hex(16)
        # Names besides this machine's own that requests may give as Host (e.g. a DNS
        # name users reach the controller by).
        self.allowed_hosts = tuple(str(h).lower() for h in allowed_hosts)
        self.manager_class = manager_class
        self.nfs: dict[str, Nfs] = {}
        self.emulators: dict[str, Emulator] = {}
        self.emulated: dict[str, EmulatedNode] = {}
        self.physical: dict[str, PhysicalNode] = {}
        self.links: dict[str, list[dict]] = {}
        self.links_file = "links.json"
        self._problems: list[str] = []
        self.embedded = None          # (Agent, Server) when the controller runs the agent
        self.deployed: dict[str, dict] = {}   # worker key -> agent answer
        self.manager = None
        self.node_info_path = ROOT / "node_info.json"
        # Shares for workers that are not this machine: None picks NFS where it works,
        # HTTP otherwise (controller/share.py); "http" or "nfs" forces one.
        self.share_mode: str | None = None
        self.share_store = share.Store()
        self._exports: list[tuple[str, str]] = []    # (path, client) exported over NFS
        # Readiness: start() (and a conf push) waits until every app answers on its DML
        # port. ready_timeout_s: the deadline after `tc finish`, None for READY_BASE_S +
        # READY_PER_NODE_S per app; wait_for_apps=False: do not wait (EdgeTB's behaviour).
        self.ready_timeout_s: float | None = None
        # How the embedded agent starts netns node apps: "auto" forks runtime roles from one
        # preloaded interpreter (worker/zygote.py), "exec" starts a Python per node.
        self.launcher = "auto"
        self.wait_for_apps = True
        self.ready_names: set[str] = set()          # apps seen answering since the last deploy
        self._ready_deadline: float | None = None   # time.monotonic() of this deployment's deadline
        self._ready_lock = threading.Lock()

    def node_token(self, name: str) -> str:
        """The credential node `name` and the controller use with each other."""
        return credentials.node_token(self.token, name)

    # ------------------------------------------------------------------ definition
    def _name(self, name: str, what: str) -> str:
        try:
            formats.check_name(name, "testbed definition", f"{what} name")
        except formats.FormatError as e:
            self._problems.append(str(e))
            return name
        if name in self.emulated or name in self.physical or name in self.emulators:
            self._problems.append(f"duplicate name {name!r}: every node and emulator needs its own")
        return name

    def _cpu(self, cpu, where: str) -> float:
        """A cpu share through net.number (no bools, strings, NaN, infinities; in
        (0, MAX_CPU]); a bad one is a problem validate() lists, counted as 0 meanwhile."""
        try:
            return net.number(cpu, f"{where}: cpu", 0, MAX_CPU, lo_open=True)
        except ValueError as e:
            self._problems.append(str(e))
            return 0.0

    def _root(self, root, name: str) -> bool:
        """A node's root flag: a real bool (validate() lists anything else)."""
        if not isinstance(root, bool):
            self._problems.append(f"node {name}: root must be True or False, not {root!r}")
            return False
        return root

    def add_nfs(self, tag: str, path: str) -> Nfs:
        p = os.path.join(self.dir_name, path) if not os.path.isabs(path) else path
        n = Nfs(tag, os.path.abspath(p))
        if tag in self.nfs:
            self._problems.append(f"add_nfs: duplicate tag {tag!r}")
        self.nfs[tag] = n
        return n

    def add_emulator(self, name: str, ip: str, cpu: float, ram: float, unit: str = "G",
                     backend: str = "netns", agent_port: int | None = None,
                     subnet: str | None = None, gpu: int = 0) -> Emulator:
        self._name(name, "emulator")
        if subnet is None:
            subnet = f"10.{233 + len(self.emulators)}.0.0/16"
        emu = Emulator(name, ip, self._cpu(cpu, f"emulator {name}"),
                       _ram_mb(ram, unit, f"emulator {name}", self._problems), backend,
                       agent_port, subnet, gpu=gpu)
        self.emulators[name] = emu
        return emu

    def _bounded(self, value, what: str, bounds: tuple[int, int], name: str) -> int | None:
        """An optional whole number within bounds (None: the agent's default); a bad one
        is a problem validate() lists, naming the node."""
        if value is None:
            return None
        try:
            return net.number(value, f"node {name}: {what}", *bounds, integer=True)
        except ValueError as e:
            self._problems.append(str(e))
            return None

    def add_emulated_node(self, name: str, working_dir: str, cmd, image: str = "", cpu: float = 1,
                          ram: float = 1, unit: str = "G", emulator: Emulator | None = None,
                          gpu: int = 0, root: bool = False, pids: int | None = None,
                          log_mb: int | None = None) -> EmulatedNode:
        """pids: processes and threads the node may have at once (default 512); log_mb:
        the size of its log dir and stdout.log (default 64 MiB)."""
        self._name(name, "node")
        node = EmulatedNode(name=name, working_dir=working_dir,
                            cmd=list(cmd) if not isinstance(cmd, str) else cmd.split(),
                            image=image, cpu=self._cpu(cpu, f"node {name}"),
                            ram_mb=_ram_mb(ram, unit, f"node {name}", self._problems),
                            emulator=emulator, port=self.node_port, gpu=gpu,
                            pids=self._bounded(pids, "pids", PIDS_RANGE, name),
                            log_mb=self._bounded(log_mb, "log_mb", LOG_MB_RANGE, name))
        node.root = self._root(root, name)
        self.emulated[name] = node
        if emulator is not None:
            emulator.nodes.append(node)
        return node

    def add_physical_node(self, name: str, nic: str, ip: str, agent_port: int = 3333,
                          root: bool = False) -> PhysicalNode:
        self._name(name, "node")
        node = PhysicalNode(name=name, nic=nic, ip=ip, agent_port=agent_port, port=self.node_port)
        node.root = self._root(root, name)
        self.physical[name] = node
        return node

    def load_link(self, path: str) -> None:
        """Read links.json (relative: to dir_name); validate() checks it (formats.py)."""
        p = Path(path if os.path.isabs(path) else os.path.join(self.dir_name, path))
        self.links_file = str(p)
        try:
            data = formats.read_json(str(p), str(p))
        except formats.FormatError as e:
            self._problems.append(str(e))
            return
        self.links = data if isinstance(data, dict) else {}
        if not isinstance(data, dict):
            self._problems += formats.link_problems(data, file=str(p))[1]

    # ------------------------------------------------------------------ validation
    def all_nodes(self) -> dict[str, _Node]:
        return {**self.emulated, **self.physical}

    def link_problems(self, links: dict, where: str) -> list[str]:
        """Every problem of a links.json document (formats.link_problems), naming file and key."""
        return formats.link_problems(links, file=where, nodes=self.all_nodes())[1]

    def validate(self) -> None:
        problems = list(self._problems)
        for emu in self.emulators.values():
            try:
                ipaddress.IPv4Address(emu.ip)
                net_ = ipaddress.IPv4Network(emu.subnet)
            except ValueError as e:
                problems.append(f"emulator {emu.name}: {e}")
                continue
            if emu.backend not in BACKENDS:
                problems.append(f"emulator {emu.name}: backend {emu.backend!r} is not one of {', '.join(BACKENDS)}")
            elif emu.backend == "docker":
                for n in emu.nodes:
                    if not n.image:
                        problems.append(f"node {n.name}: emulator {emu.name} runs docker nodes, give it an image "
                                        f"(add_emulated_node(..., image=\"edgetb-node:latest\"))")
            if len(emu.nodes) > net_.num_addresses - 3:
                problems.append(f"emulator {emu.name}: {len(emu.nodes)} nodes do not fit in {emu.subnet}")
            cpu = sum(n.cpu for n in emu.nodes)
            ram = sum(n.ram_mb for n in emu.nodes)
            if cpu > emu.cpu + 1e-9:
                problems.append(f"emulator {emu.name}: its nodes ask {cpu:g} cpu, it has {emu.cpu:g}")
            if ram > emu.ram_mb:
                problems.append(f"emulator {emu.name}: its nodes ask {ram} MB ram, it has {emu.ram_mb} MB")
            problems += self._gpu_problems(emu)
        for n in self.emulated.values():
            if n.emulator is None or n.emulator.name not in self.emulators:
                problems.append(f"node {n.name}: no emulator given (add_emulated_node(..., emulator=emu))")
            if n.cpu <= 0 or n.ram_mb < 64:
                problems.append(f"node {n.name}: cpu must be > 0 and ram at least 64 MB")
        for n in self.all_nodes().values():
            if not n.cmd:
                problems.append(f"node {n.name}: no command")
            if n.working_dir and not os.path.isabs(n.working_dir):
                problems.append(f"node {n.name}: working_dir {n.working_dir!r} must be an absolute node path")
            for v in n.volumes:
                if not os.path.isabs(v.node):
                    problems.append(f"node {n.name}: node path {v.node!r} must be absolute")
                elif ".." in Path(v.node).parts:
                    problems.append(f"node {n.name}: node path {v.node!r} must not contain '..'")
                if not os.path.isdir(v.host):
                    problems.append(f"node {n.name}: {v.host} is not a folder on the controller")
        for n in self.physical.values():
            try:
                ipaddress.IPv4Address(n.ip)
            except ValueError:
                problems.append(f"physical node {n.name}: bad ip {n.ip!r}")
        problems += self.link_problems(self.links, self.links_file)
        if problems:
            raise DefinitionError(problems)

    @staticmethod
    def _gpu_problems(emu: Emulator) -> list[str]:
        out = []
        if not isinstance(emu.gpu, int) or isinstance(emu.gpu, bool) or emu.gpu < 0:
            return [f"emulator {emu.name}: gpu={emu.gpu!r} must be a whole number of GPUs, 0 or more"]
        asked = 0
        for n in emu.nodes:
            if not isinstance(n.gpu, int) or isinstance(n.gpu, bool) or n.gpu < 0:
                out.append(f"node {n.name}: gpu={n.gpu!r} must be a whole number of GPUs, 0 or more")
            elif n.gpu and emu.backend != "docker":
                out.append(f"node {n.name}: gpu={n.gpu} needs a docker emulator; emulator {emu.name} runs "
                           f"{emu.backend} nodes, which cannot have GPUs")
            else:
                asked += n.gpu
        if asked > emu.gpu:
            out.append(f"emulator {emu.name}: its nodes ask {asked} GPU(s), it has {emu.gpu} "
                       f"(add_emulator(..., gpu=K))")
        return out

    # ------------------------------------------------------------------ addressing
    def assign_addresses(self) -> None:
        nid = 1
        for emu in self.emulators.values():
            hosts = ipaddress.IPv4Network(emu.subnet).hosts()
            next(hosts)  # the gateway
            for n in emu.nodes:
                n.ip, n.id = str(next(hosts)), nid
                nid += 1
        for n in self.physical.values():
            n.id = nid
            nid += 1

    def node_info(self) -> dict:
        return {
            "emulator": {e.name: {"ip": e.ip, "port": e.agent_port, "backend": e.backend,
                                  "subnet": e.subnet} for e in self.emulators.values()},
            "emulated_node": {n.name: {"ip": n.ip, "port": n.port, "emulator": n.emulator.name}
                              for n in self.emulated.values()},
            "physical_node": {n.name: {"ip": n.ip, "port": n.port} for n in self.physical.values()},
        }

    def agent_links(self, links: dict, names) -> dict[str, list[dict]]:
        """links.json entries of the nodes `names`, as the agent takes them (units parsed
        once, by formats.parse_links; the document was checked by validate())."""
        nodes = self.all_nodes()
        parsed = formats.parse_links(links, file=self.links_file, nodes=nodes)
        return {src: [{"dest": link.dest, "ip": nodes[link.dest].ip, "port": nodes[link.dest].port,
                       **link.shaping()} for link in parsed.get(src, [])] for src in names}

    # ------------------------------------------------------------------ workers
    def agent_address(self, emu: Emulator) -> str:
        if emu.agent_port is None:
            return self.agent_address_embedded()
        return f"{emu.ip}:{emu.agent_port}"

    def agent_address_embedded(self) -> str:
        return f"127.0.0.1:{self.embedded[1].port}"

    def workers(self) -> list[tuple[str, str]]:
        """(label, agent address) of every worker, emulators first."""
        out = [(f"emulator {e.name}", self.agent_address(e)) for e in self.emulators.values()
               if e.agent_port is not None or self.embedded is not None]
        seen = set()
        for n in self.physical.values():
            addr = f"{n.ip}:{n.agent_port}"
            if addr not in seen:
                seen.add(addr)
                out.append((f"physical {addr}", addr))
        return out

    def _ensure_embedded_agent(self) -> None:
        if self.embedded is not None or all(e.agent_port is not None for e in self.emulators.values()):
            return
        if os.geteuid() != 0:
            raise DeployError("the embedded agent must run as root (sudo python3 ...): it creates "
                              "network namespaces, qdiscs and cgroups")
        from worker.agent import Agent, make_app

        agent = Agent(name="embedded", port=self.host_port + 1, token=self.token, launcher=self.launcher)
        srv = net.serve(make_app(agent), "0.0.0.0", self.host_port + 1, threads=16)
        self.embedded = (agent, srv)

    def ctl_address(self, emu: "Emulator | None") -> str:
        """The controller as the nodes of `emu` see it (their NET_CTL_ADDRESS): the
        gateway of their bridge when the controller's embedded agent runs them, else the
        controller's ip; physical nodes (emu None) use its ip."""
        if emu is not None and emu.agent_port is None:
            return f"{emu.gateway}:{self.host_port}"
        return f"{self.ip}:{self.host_port}"

    def _node_body(self, n: _Node, ctl: str, agent: str, shares: dict | None = None) -> dict:
        """`shares`: for a worker that is not this machine, {nfs tag: volume source}
        (controller/share.py); its nodes get those instead of the controller's paths."""
        def volume(v: Volume) -> dict:
            if shares is not None and v.nfs in shares:
                return {**shares[v.nfs], "node": v.node, "ro": v.ro}
            return {"host": v.host, "node": v.node, "ro": v.ro}
        body = {"name": n.name, "id": n.id, "ip": n.ip, "port": n.port,
                "cpu": getattr(n, "cpu", 1.0), "ram_mb": getattr(n, "ram_mb", 1024),
                "cmd": n.cmd, "working_dir": n.working_dir,
                "volumes": [volume(v) for v in n.volumes],
                "nic": getattr(n, "nic", None), "image": getattr(n, "image", ""),
                "env": {**n.env, "EDGE_TB_ID": str(n.id), "NET_NODE_NAME": n.name,
                        "DML_PORT": str(n.port), "NET_CTL_ADDRESS": ctl, "NET_AGENT_ADDRESS": agent}}
        if getattr(n, "gpu", 0):
            body["gpu"] = n.gpu
        for key in ("pids", "log_mb"):
            if getattr(n, key, None) is not None:
                body[key] = getattr(n, key)
        if n.root:
            body["root"] = True
        return body

    @staticmethod
    def _is_local(ip: str, embedded: bool) -> bool:
        """A worker on the controller's own machine: its nodes bind-mount the folders."""
        try:
            return embedded or ipaddress.IPv4Address(ip).is_loopback
        except ValueError:
            return False

    def _nfs_export(self, path: str, client: str) -> None:
        import subprocess

        if (path, client) in self._exports:
            return
        p = subprocess.run(share.export_argv(path, client), capture_output=True, text=True)
        if p.returncode != 0:
            raise DeployError(f"exporting {path} to {client} over NFS: {p.stderr.strip() or p.stdout.strip()}")
        self._exports.append((path, client))

    def _nfs_unexport(self) -> None:
        import subprocess

        while self._exports:
            path, client = self._exports.pop()
            subprocess.run(share.unexport_argv(path, client), capture_output=True)

    def _remote_shares(self, say) -> dict | None:
        """{tag: volume source} for workers that are not this machine, or None when every
        worker is local. Says once how the folders are shared."""
        remote = [e for e in self.emulators.values() if not self._is_local(e.ip, e.agent_port is None)]
        remote += [n for n in self.physical.values() if not self._is_local(n.ip, False)]
        tags = {v.nfs for x in remote for n in (x.nodes if isinstance(x, Emulator) else [x])
                for v in n.volumes if v.nfs}
        if not tags:
            return None
        try:
            how, line = share.mode(self.share_mode)
        except share.ShareError as e:
            raise DeployError(str(e)) from None
        say(line)
        out = {}
        for tag in sorted(tags):
            path = self.nfs[tag].path
            if how == "nfs":
                for ip in sorted({x.ip for x in remote}):      # only to the workers that use it
                    self._nfs_export(path, ip)
                out[tag] = {"nfs": {"server": self.ip, "path": path, "tag": tag}}
                continue
            if self.manager is None or self.manager.server is None:
                raise DeployError("sharing folders over HTTP needs the controller serving: use start()")
            digest = self.share_store.add(path)
            out[tag] = {"share": {"tag": tag, "sha256": digest,
                                  "url": f"{self.ip}:{self.host_port}/share/{digest}"}}
        return out

    def deploy(self, say=print) -> None:
        """Validate, then build every worker's part in parallel; all or nothing."""
        self.validate()
        self.assign_addresses()
        self.write_node_info()
        self._ensure_embedded_agent()
        remote = self._remote_shares(say)
        jobs = []
        for emu in self.emulators.values():
            gw = emu.gateway
            ctl = self.ctl_address(emu)
            agent_addr = f"{gw}:{self.embedded[1].port}" if emu.agent_port is None else f"{emu.ip}:{emu.agent_port}"
            body = {"emulator": emu.name, "backend": emu.backend, "cpu": emu.cpu,
                    "bridge": {"cidr": emu.subnet, "gateway": gw},
                    "nodes": [self._node_body(n, ctl, agent_addr,
                                              None if self._is_local(emu.ip, emu.agent_port is None) else remote)
                              for n in emu.nodes],
                    "links": self.agent_links(self.links, [n.name for n in emu.nodes])}
            jobs.append((f"emulator {emu.name}", self.agent_address(emu), "/emulated/deploy", body))
        by_agent: dict[str, list[PhysicalNode]] = {}
        for n in self.physical.values():
            by_agent.setdefault(f"{n.ip}:{n.agent_port}", []).append(n)
        for addr, ns in by_agent.items():
            body = {"nodes": [self._node_body(n, self.ctl_address(None), addr,
                                              None if self._is_local(n.ip, False) else remote) for n in ns],
                    "links": self.agent_links(self.links, [n.name for n in ns])}
            jobs.append((f"physical {addr}", addr, "/physical/deploy", body))

        errors = []
        lock = threading.Lock()

        def run(job):
            label, addr, path, body = job
            try:
                ans = call_once("POST", f"{addr}{path}", json=body, token=self.token, timeout_s=600).json()
            except net.HttpError as e:
                with lock:
                    why = f"HTTP {e.status}: {e.message}" if e.status else e.message
                    errors.append(f"{label} ({addr}): {why}")
                return
            with lock:
                self.deployed[label] = {"addr": addr, "kind": path.split("/")[1], "answer": ans}
            nl = sum(v["links"] for v in ans["nodes"].values())
            say(f"{label}: {len(ans['nodes'])} node(s) up, {nl} link(s) in place")

        with ThreadPoolExecutor(max(1, len(jobs))) as ex:
            list(ex.map(run, jobs))
        if errors:
            self.reset(say=say)
            raise DeployError("deployment failed, everything deployed was removed:\n  " + "\n  ".join(errors))
        self._ready_deadline = time.monotonic() + self.ready_deadline_s()

    # ------------------------------------------------------------------ readiness
    def ready_deadline_s(self) -> float:
        """Seconds after `tc finish` that apps have to answer: ready_timeout_s, or
        READY_BASE_S + READY_PER_NODE_S for every node that runs an app."""
        if self.ready_timeout_s is not None:
            return float(self.ready_timeout_s)
        return READY_BASE_S + READY_PER_NODE_S * sum(1 for n in self.all_nodes().values() if n.cmd)

    def _app_places(self, names=None) -> dict[str, tuple[str, str]]:
        """{node: (worker label, agent address)} of the deployed nodes that run an app."""
        nodes = self.all_nodes()
        out = {}
        for label, info in list(self.deployed.items()):
            for name in info["answer"].get("nodes", {}):
                if name in nodes and nodes[name].cmd and (names is None or name in names):
                    out[name] = (label, info["addr"])
        return out

    def _stdout_log(self, name: str, label: str, addr: str) -> str:
        """Where node `name`'s app output is on its worker, and its last lines when that
        worker is this controller's embedded agent."""
        port = addr.rpartition(":")[2]
        path = Path(f"/run/edgetb/agent-{port}/nodes/{name}/stdout.log")
        where = f"see {path} on {label}"
        if self.embedded is not None and int(port) == self.embedded[1].port:
            try:
                tail = path.read_text(errors="replace").strip().splitlines()[-3:]
            except OSError:
                tail = []
            if tail:
                where += "; it ends: " + " | ".join(line.strip()[:200] for line in tail)
        return where

    def wait_ready(self, names=None, *, say=None, deadline: float | None = None) -> None:
        """Wait until every deployed node among `names` (default all) that runs an app
        answers on its DML port: every agent's `GET /status` is read in parallel every
        READY_POLL_S. `say` gets `apps answering: k/N` when k changed (at most every
        READY_SHOW_S) and once all answer. Raises NotReady naming the nodes at the
        deadline (default this deployment's: ready_deadline_s() after deploy), at once
        when an app exited. Nothing is removed here: start() resets on failure."""
        if not self.wait_for_apps:
            return
        places = self._app_places(names)
        with self._ready_lock:
            if not set(places) - self.ready_names:
                return
        if deadline is None:
            deadline = self._ready_deadline or time.monotonic() + self.ready_deadline_s()
        total, shown, shown_at = len(places), None, float("-inf")
        addrs = sorted({addr for _, addr in places.values()})
        while True:
            def status(addr):
                try:
                    return net.get_json(f"{addr}/status", token=self.token, timeout_s=10)["nodes"]
                except (net.HttpError, ValueError, KeyError, TypeError) as e:
                    return e
            seen = dict(zip(addrs, fan_out(status, addrs)))
            ready, ended, missing, unsure = set(), {}, [], []
            for name, (label, addr) in places.items():
                got = seen[addr]
                a = got.get(name) if isinstance(got, dict) else None
                if isinstance(got, dict) and not isinstance(a, dict):
                    missing.append(name)            # its worker no longer has it (reset)
                elif a is None:
                    continue                        # the agent did not answer this time
                elif a.get("ready") is True:
                    ready.add(name)
                elif a.get("state") in APP_ENDED:
                    ended[name] = a["state"]
                elif "ready" not in a:              # an agent that does not report readiness
                    unsure.append(name)
            nodes = self.all_nodes()
            for name, ok in zip(unsure, fan_out(lambda n: _tcp_open(nodes[n].ip, nodes[n].port), unsure)):
                if ok:
                    ready.add(name)
            with self._ready_lock:
                self.ready_names |= ready
            now = time.monotonic()
            done = len(ready) == total
            if say is not None and len(ready) != shown and (done or now - shown_at >= READY_SHOW_S):
                say(f"apps answering: {len(ready)}/{total}")
                shown, shown_at = len(ready), now
            if done:
                return
            if ended or missing or now >= deadline:
                raise self._not_ready(places, ready, ended, missing, seen)
            time.sleep(min(READY_POLL_S, max(0.0, deadline - now)))

    def _not_ready(self, places, ready, ended, missing, seen) -> NotReady:
        lines = []
        for name in sorted(ended):
            label, addr = places[name]
            lines.append(f"{name}: its app {ended[name]} before answering on port {self.all_nodes()[name].port} "
                         f"({self._stdout_log(name, label, addr)})")
        for name in sorted(missing):
            lines.append(f"{name}: no longer deployed on {places[name][0]}")
        silent = sorted(set(places) - ready - set(ended) - set(missing))
        if not ended and not missing:
            for name in silent:
                label, addr = places[name]
                n = self.all_nodes()[name]
                why = (f"its agent did not answer /status: {seen[addr]}" if isinstance(seen[addr], Exception)
                       else f"nothing accepts connections on {n.ip}:{n.port}")
                lines.append(f"{name}: app not answering ({why}; {self._stdout_log(name, label, addr)})")
        head = (f"{len(ready)}/{len(places)} apps answer on their DML port"
                + ("" if ended or missing else f" after the readiness deadline ({self.ready_deadline_s():g} s "
                                              f"after tc finish; Testbed.ready_timeout_s sets it)"))
        if silent and (ended or missing):
            head += f"; not answering yet: {', '.join(silent)}"
        return NotReady(head + ":\n  " + "\n  ".join(lines), silent, sorted(ended))

    def write_node_info(self) -> Path:
        path = Path(self.node_info_path)
        path.write_text(json.dumps(self.node_info(), indent=2) + "\n")
        return path

    def reset(self, say=print, kinds=("emulated", "physical")) -> list[str]:
        """Ask every worker to remove what it made; returns problems (workers unreachable)."""
        problems = []
        for label, addr in self.workers():
            for kind in kinds:
                if (kind == "emulated") != label.startswith("emulator"):
                    continue
                try:
                    if self.embedded is not None and addr == self.agent_address_embedded():
                        # In process: a reset never depends on the state of a server (a
                        # flooded or dead one must not keep nodes alive at Ctrl-C).
                        self.embedded[0].reset(kind)
                    else:
                        net.call("POST", f"{addr}/{kind}/reset", token=self.token, timeout_s=120)
                except net.HttpError as e:
                    problems.append(f"{label}: {e}")
                except Exception as e:  # noqa: BLE001 - the embedded agent's own error, said
                    problems.append(f"{label}: {type(e).__name__}: {e}")
        self.deployed.clear()
        with self._ready_lock:
            self.ready_names.clear()
        self._ready_deadline = None
        for p in problems:
            say(f"reset: {p}")
        return problems

    def close(self) -> None:
        """Reset everything and stop the embedded agent."""
        self.reset(say=lambda m: print(m, file=sys.stderr))
        self._nfs_unexport()
        if self.embedded is not None:
            agent, srv = self.embedded
            agent.close()           # everything removed, the zygote stopped
            srv.close()
            self.embedded = None

    # ------------------------------------------------------------------ start
    def start(self, *, serve_forever: bool = True, say=print):
        """Deploy, serve the manager on host_port, print `tc finish`; EdgeTB's start()."""
        if self.manager_class is None:
            raise DeployError("no manager_class given to the testbed")
        self.validate()
        self.manager = self.manager_class(self)
        self.manager.serve()
        show = (lambda m: print(m, flush=True)) if say is print else say  # noqa: E731
        deployed = False
        try:
            # Ctrl-C or SIGTERM while deploying or waiting: everything made is removed.
            with stopping.stop_on_signals(stopping.interrupt):
                self.deploy(say=say)
                deployed = True
                show("tc finish")
                self.wait_ready(say=show)
        except BaseException as e:
            with stopping.shielded():
                self.manager.close()
                self.close()
            if not deployed:
                raise
            if isinstance(e, NotReady):
                raise NotReady(f"{e}\neverything deployed was removed", e.not_answering, e.exited) from None
            raise
        if serve_forever:
            self.manager.wait_forever()
        return self.manager


def default_testbed(ip: str, dir_name: str, manager_class, host_port: int = 3333, **kw) -> Testbed:
    """A testbed whose controller is `ip` (EdgeTB's default_testbed)."""
    return Testbed(ip, dir_name, manager_class, host_port=host_port, **kw)


def single_machine(manager_class, roles: list[tuple[str, str]], *, port: int = 3333,
                   links: str = "links.json", cpu: float = 2, ram_gb: float = 6) -> Testbed:
    """The embedded default: one netns emulator on this machine, one node per
    (name, role script), dml_app/ and dataset/ shared at EdgeTB's node paths, the cpu
    split evenly between the nodes. Every run script builds its testbed this way."""
    testbed = default_testbed(ip="127.0.0.1", dir_name=str(ROOT), manager_class=manager_class, host_port=port)
    nfs_app = testbed.add_nfs(tag="dml_app", path=str(ROOT / "dml_app"))
    nfs_dataset = testbed.add_nfs(tag="dataset", path=str(ROOT / "dataset"))
    emu = testbed.add_emulator("emulator-1", "127.0.0.1", cpu=cpu, ram=ram_gb, unit="G")
    share = int(cpu * 1000 / max(1, len(roles))) / 1000   # rounded down: the sum must fit
    ram_mb = min(1024, int(ram_gb * 1024 / max(1, len(roles))))
    for name, role in roles:
        node = testbed.add_emulated_node(name, "/home/worker/dml_app", ["python3", role], "dml:v1.0",
                                         cpu=share, ram=ram_mb, unit="M", emulator=emu)
        node.mount_nfs(nfs_app, "/home/worker/dml_app")
        node.mount_nfs(nfs_dataset, "/home/worker/dataset")
    testbed.load_link(links)
    return testbed

