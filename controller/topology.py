"""The testbed definition, with EdgeTB's method names, and its validation.

A Topology is plain data: emulators, emulated and physical nodes, shared folders
(add_nfs) and links (load_link). `validate()` checks all of it at once and raises
DefinitionError naming the file and key of every problem. `assign_addresses()` gives
every node its ip and id, `node_info()` and `agent_links()` are what the agents and the
nodes are told. Nothing here makes a call or starts a process: controller/deploy.py
builds a validated topology on the workers, controller/testbed.py puts the two together
behind EdgeTB's Testbed object.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from dml_app import formats
from dml_app import net

DEFAULT_NODE_PORT = 4444
DEFAULT_SUBNET = "10.233.0.0/16"
_UNITS_MB = {"M": 1, "MB": 1, "G": 1024, "GB": 1024}
BACKENDS = ("netns", "docker")


class DefinitionError(ValueError):
    """Everything wrong with a testbed definition, one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("testbed definition refused, nothing deployed:\n  " + "\n  ".join(problems))


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


class Topology:
    """The definition: add_* the parts, load_link, validate()."""

    def __init__(self, ip: str, dir_name: str, node_port: int = DEFAULT_NODE_PORT):
        self.ip = ip                    # the controller's address as workers reach it
        self.dir_name = str(dir_name)
        self.node_port = node_port
        self.nfs: dict[str, Nfs] = {}
        self.emulators: dict[str, Emulator] = {}
        self.emulated: dict[str, EmulatedNode] = {}
        self.physical: dict[str, PhysicalNode] = {}
        self.links: dict[str, list[dict]] = {}
        self.links_file = "links.json"
        self._problems: list[str] = []

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


    # ------------------------------------------------------------------ places
    @staticmethod
    def is_local(ip: str, embedded: bool) -> bool:
        """A worker on the controller's own machine: its nodes bind-mount the folders."""
        try:
            return embedded or ipaddress.IPv4Address(ip).is_loopback
        except ValueError:
            return False

    def remote_workers(self) -> list:
        """The emulators and physical nodes whose worker is not this machine."""
        remote = [e for e in self.emulators.values() if not self.is_local(e.ip, e.agent_port is None)]
        return remote + [n for n in self.physical.values() if not self.is_local(n.ip, False)]
