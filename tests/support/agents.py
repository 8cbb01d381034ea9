"""Shared helpers for tests that drive a REAL agent: start/stop it, deploy netns nodes
through its HTTP API, measure links with iperf3, and list what the testbed left behind.

Import from a test module:

    from tests.support import agents as ah
    agent = ah.agent_fixture()                       # a module-level pytest fixture

Everything here only touches loopback and namespaces the test itself made. Names are
unique per call (a short random tag), so tests can run next to each other and next to
other suites in one pytest run.
"""
from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench import common as bench
from bench.common import ideal as goodput_ideal, wait_listening  # noqa: F401  (used by tests)
from dml_app import net
from worker import nodes as nb
from worker.cgroups import Cgroup
from tests.support import ROOT
from tests.support.procs import free_port  # noqa: F401  (the one free_port of the tests)

AGENT = ROOT / "worker" / "agent.py"
IPERF_PORT = 4444
MARKER_ENV = "EDGETB_TEST_NODE"   # set in every planned node's env: finds its processes
TOKEN_HEADER = net.TOKEN_HEADER
# A different /24 per deployment in this process; the random start keeps two pytest
# processes on one machine apart too.
_subnets = itertools.count(random.randrange(0, 200))
_ids = itertools.count(random.randrange(1000, 50000, 100), 100)


# ----------------------------------------------------------------------------- preconditions

# Every environment skip of the suite says which requirement it is about, in a tag at the
# end of its reason that tests/conftest.py reads: "[requires: root]" (root, docker,
# iperf3, browser: with EDGETB_REQUIRE listing it, the test FAILS instead of skipping) or
# "[may skip: netem]" (netem, nfs, gpu, this-machine-has-it: what a CI machine may truly
# lack; it still skips, saying why). Make those reasons only with these helpers.
REQUIREMENTS = ("root", "docker", "iperf3", "browser")
MAY_SKIP = ("netem", "nfs", "gpu", "has-it")


def skip_reason(requirement: str, why: str) -> str:
    """`why`, tagged with its requirement (one of REQUIREMENTS or MAY_SKIP)."""
    if requirement in REQUIREMENTS:
        return f"{why} [requires: {requirement}]"
    if requirement in MAY_SKIP:
        return f"{why} [may skip: {requirement}]"
    raise ValueError(f"unknown requirement {requirement!r}")


def need(requirement: str, why: str | None):
    """pytest.mark.skipif(why is not None) with a tagged reason; `needs` names the
    requirement whether or not this machine has it (tests/conftest.py marks by it)."""
    return pytest.mark.skipif(why is not None, reason=skip_reason(requirement, why or ""), needs=requirement)


def skip(requirement: str, why: str):
    """pytest.skip with a tagged reason (inside a test or fixture)."""
    __tracebackhide__ = True    # the skip is reported at the caller's line
    pytest.skip(skip_reason(requirement, why), allow_module_level=True)


def missing_requirements() -> str | None:
    """Why real-namespace tests cannot run here (a tagged reason), or None."""
    if os.geteuid() != 0:
        return skip_reason("root", "needs root (namespaces, qdiscs, cgroups)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return skip_reason("root", f"needs the {tool} command (iproute2)")
    return None


def need_root():
    """pytest.mark.skipif for tests that need root and iproute2."""
    why = missing_requirements()
    return pytest.mark.skipif(why is not None, reason=why or "", needs="root")


def need_iperf3():
    return need("iperf3", "needs iperf3" if shutil.which("iperf3") is None else None)


def need_browser():
    """pytest.mark.skipif for tests that drive Debian's chromium (the dashboard's)."""
    from controller import browser

    return need("browser", None if os.access(browser.CHROMIUM, os.X_OK) else
                f"no {browser.CHROMIUM}: run ./install.sh with EDGETB_BROWSER=1")


def new_tag() -> str:
    """A short name prefix unique to this call: a letter and 5 hex digits."""
    return "t" + secrets.token_hex(3)[:5]


# ----------------------------------------------------------------------------- the agent

@dataclass
class AgentProc:
    """A running `worker/agent.py` process; call() talks to it with its token."""
    port: int
    token: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state_dir(self) -> Path:
        return Path("/run/edgetb") / f"agent-{self.port}"

    def get(self, path: str, **kw):
        return net.get_json(self.url + path, token=self.token, timeout_s=kw.pop("timeout_s", 60), **kw)

    def post(self, path: str, body=None, **kw):
        return net.post_json(self.url + path, body if body is not None else {}, token=self.token,
                             timeout_s=kw.pop("timeout_s", 120), **kw)

    def raw(self, method: str, path: str, *, token: str | None = "__own__", timeout_s: float = 60, **kw):
        """A request that may fail: returns the requests.Response whatever its status."""
        import requests
        headers = dict(kw.pop("headers", {}))
        if token == "__own__":
            token = self.token
        if token is not None:
            headers[TOKEN_HEADER] = token
        s = requests.Session()
        s.trust_env = False
        return s.request(method, self.url + path, headers=headers, timeout=timeout_s, **kw)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None


def wait_port(ip: str, port: int, timeout_s: float = 60) -> None:
    """Until something accepts a TCP connection on ip:port (AssertionError at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing answers on {ip}:{port}"
            time.sleep(0.05)


def node_report(agent: AgentProc, name: str, timeout_s: float = 60) -> dict:
    """The JSON line a probe node printed (its stdout.log, kept by the agent)."""
    path = agent.state_dir / "nodes" / name / "stdout.log"
    deadline = time.monotonic() + timeout_s
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            if line.startswith("{"):
                return json.loads(line)
        assert time.monotonic() < deadline, f"{name} printed no report:\n{text[-2000:]}"
        time.sleep(0.05)


def _wait_ready(agent: AgentProc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        if not agent.alive():
            raise RuntimeError(f"agent exited with {agent.proc.returncode} before answering:\n{agent.log()}")
        try:
            hi = net.get_json(agent.url + "/hi", token=agent.token, timeout_s=2)
            if isinstance(hi, dict) and "backends" in hi:
                return
        except net.HttpError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"agent on port {agent.port} not ready after {timeout_s}s:\n{agent.log()}")
        time.sleep(delay)  # polling interval, bounded by the deadline above
        delay = min(delay * 2, 0.2)


def _stop_agent(agent: AgentProc, timeout_s: float = 30) -> list[str]:
    """Reset everything it made, then SIGTERM its process group (SIGKILL if it lingers);
    the resets' errors (the caller fails on them once everything is stopped)."""
    errors = []
    if agent.alive():
        for path in ("/emulated/reset", "/physical/reset"):
            try:
                agent.post(path, timeout_s=timeout_s)
            except net.HttpError as e:
                errors.append(f"{path} on port {agent.port}: {e}")
    nb.stop_group(agent.proc, timeout_s)
    # Its state dir holds nothing once it reset; leave it only if it still lists nodes.
    state = agent.state_dir / "state.json"
    try:
        if not json.loads(state.read_text()).get("nodes"):
            shutil.rmtree(agent.state_dir, ignore_errors=True)
    except (OSError, ValueError):
        pass
    return errors


def launch_agent(prefix: list[str], host: str, port: int, name: str, token: str,
                 log_path: Path) -> subprocess.Popen:
    """Start `<prefix> python3 worker/agent.py --port P --host H --name N` in its own
    process group (session), output to `log_path`, the token in its environment (never on
    a command line); the Popen. Waiting for it and stopping it are the caller's.
    `prefix`: e.g. ["nsenter", "--net=/run/netns/X"] (tests/support/multihost.py), or []."""
    env = {**os.environ, net.TOKEN_ENV: token}
    with open(log_path, "wb") as out:
        return subprocess.Popen([*prefix, sys.executable, str(AGENT), "--port", str(port),
                                 "--host", host, "--name", name],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(ROOT), env=env, start_new_session=True)


@contextlib.contextmanager
def running_agent(*, ready_timeout_s: float = 30, attempts: int = 3, port: int | None = None):
    """Start `python3 worker/agent.py --port P` (token T in its environment, never on a
    command line) in its own process group on
    loopback, wait until GET /hi answers with the token, yield an AgentProc, and always
    tear it down (reset, then SIGTERM the group). `port`: that one (an agent restarted
    where another died), else a free one."""
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    last: Exception | None = None
    wanted = port
    for _ in range(attempts if wanted is None else 1):  # a free port can be taken between probe and bind
        port, token = wanted or free_port(), secrets.token_hex(16)
        log_path = log_dir / f"edgetb-test-agent-{port}.log"
        proc = launch_agent([], "127.0.0.1", port, f"test-{port}", token, log_path)
        agent = AgentProc(port=port, token=token, proc=proc, log_path=log_path)
        try:
            _wait_ready(agent, ready_timeout_s)
        except Exception as e:
            last = e
            _stop_agent(agent)
            if "Address already in use" in agent.log() or "address already in use" in agent.log():
                continue
            raise
        try:
            yield agent
        finally:
            errors = _stop_agent(agent)
            log = agent.log()
            with contextlib.suppress(OSError):
                log_path.unlink()
        # Reached only when the body ended without an exception: one it raised wins.
        assert not errors, f"the agent's resets failed: {errors}\n{log}"
        return
    raise RuntimeError(f"could not start an agent: {last}")


def agent_fixture(scope: str = "module"):
    """A pytest fixture (assign it to a name in a test module) yielding an AgentProc."""
    @pytest.fixture(scope=scope)
    def agent():
        why = missing_requirements()
        if why:
            pytest.skip(why)
        with running_agent() as a:
            yield a
        assert_clean()          # the agent is gone: nothing of the testbed may remain
    return agent


def clean_agent_fixture():
    """A pytest fixture (assign it to a name) over the module's `agent`: after each test,
    failed or not, the agent still answers and holds no emulated node."""
    @pytest.fixture
    def clean_agent(agent):
        try:
            yield agent
        finally:
            assert agent.get("/hi")["backends"], "the agent stopped serving"
            agent.post("/emulated/reset")     # an error fails the test
        assert_clean()
    return clean_agent


class CmdlineWatch(threading.Thread):
    """Every distinct /proc/*/cmdline seen while it runs (a context manager), and, with
    `token_file`, the first content of that file once it exists (a controller's admin
    token), so secrets can be looked for in all of them afterwards."""

    def __init__(self, token_file: Path | None = None):
        super().__init__(daemon=True)
        self.seen: set[bytes] = set()
        self.sweeps = 0
        self.token_file, self.token = token_file, None
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            self.seen.add(f.read())
                    except OSError:
                        pass
            self.sweeps += 1
            if self.token_file is not None and self.token is None:
                with contextlib.suppress(OSError):
                    self.token = self.token_file.read_text().strip() or None

    def leaked(self, secrets_: list[str]) -> list[bytes]:
        return [c for c in self.seen for s in secrets_ if s and s.encode() in c]

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(10)


def linked_pair() -> "Deployment":
    """Two nodes without an app and one 10 mbit link between them: a valid deploy body."""
    dep = plan(2, cmd=[])
    a, b = dep.names
    dep.links = {a: [link(dep, a, b, 10_000_000)]}
    return dep


# ----------------------------------------------------------------------------- deployments

@dataclass
class Deployment:
    """What one deploy call asked for: enough to talk about it and to check it is gone."""
    emulator: str
    bridge: str
    network: ipaddress.IPv4Network
    gateway: str
    nodes: list[dict]
    links: dict = field(default_factory=dict)
    ns_inodes: dict[str, int] = field(default_factory=dict)   # node -> netns inode, once up
    token: str | None = None
    pids: dict[int, str] = field(default_factory=dict)         # pid -> start time, seen inside

    @property
    def names(self) -> list[str]:
        return [n["name"] for n in self.nodes]

    def node(self, name: str) -> dict:
        return next(n for n in self.nodes if n["name"] == name)

    def ip(self, name: str) -> str:
        return self.node(name)["ip"]

    def ns(self, name: str) -> str:
        return nb.NS_PREFIX + name

    def veths(self) -> list[str]:
        return [nb.veth_name(n["name"]) for n in self.nodes]

    def body(self) -> dict:
        return {"emulator": self.emulator, "backend": "netns",
                "bridge": {"name": self.bridge, "cidr": str(self.network), "gateway": self.gateway},
                "nodes": self.nodes, "links": self.links}

    def record_inodes(self) -> None:
        for name in self.names:
            with contextlib.suppress(OSError):
                self.ns_inodes[name] = os.stat(f"/run/netns/{self.ns(name)}").st_ino

    def record_pids(self) -> dict[int, str]:
        """Remember every process now inside this deployment's namespaces (call before a
        reset; leftovers() then checks that each of them is gone)."""
        inodes = set(self.ns_inodes.values())
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{d}/ns/net").st_ino in inodes:
                        self.pids[int(d)] = _start_time(int(d))
        return self.pids


def plan(n: int, *, tag: str | None = None, cmd: list[str] | None = None, cpu: float = 0.5,
         ram_mb: int = 128, port: int = IPERF_PORT) -> Deployment:
    """N node specs with unique names (tag + n1..nN), ids and a fresh 10.251.X.0/24."""
    tag = tag or new_tag()
    x = next(_subnets) % 250 + 1
    network = ipaddress.IPv4Network(f"10.251.{x}.0/24")
    base_id = next(_ids) % 59000 + 100
    nodes = [{"name": f"{tag}n{i}", "id": base_id + i, "ip": str(network[10 + i]), "port": port,
              "cpu": cpu, "ram_mb": ram_mb,
              "cmd": list(cmd) if cmd is not None else ["iperf3", "-s", "-p", str(port)],
              "working_dir": "", "volumes": [], "env": {MARKER_ENV: f"{tag}n{i}"}}
             for i in range(1, n + 1)]
    emulator = f"{tag}emu"
    return Deployment(emulator=emulator, bridge=nb.bridge_name(emulator), network=network,
                      gateway=str(network[1]), nodes=nodes)


def trainer_plan() -> Deployment:
    """One node running this checkout's fl_trainer.py (forked from the zygote) on DML_PORT
    4444, with dml_app/ and dataset/ read-only at EdgeTB's paths."""
    dep = plan(1, cmd=["python3", "fl_trainer.py"], port=4444, cpu=0.5, ram_mb=768)
    node = dep.nodes[0]
    node.update(working_dir="/home/worker/dml_app",
                volumes=[{"host": str(ROOT / "dml_app"), "node": "/home/worker/dml_app", "ro": True},
                         {"host": str(ROOT / "dataset"), "node": "/home/worker/dataset", "ro": True}])
    node["env"].update(NET_NODE_NAME=node["name"], DML_PORT="4444")
    return dep


def link(dep: Deployment, src: str, dest: str, rate_bps: int, **extra) -> dict:
    """A link entry (internals.md) from src to dest's app port."""
    d = {"dest": dest, "ip": dep.ip(dest), "port": dep.node(dest)["port"], "rate_bps": int(rate_bps)}
    d.update(extra)
    return d


def deploy(agent: AgentProc, dep: Deployment, *, timeout_s: float = 120) -> dict:
    """POST /emulated/deploy; raises net.HttpError when refused."""
    dep.token = agent.token
    answer = agent.post("/emulated/deploy", dep.body(), timeout_s=timeout_s)
    dep.record_inodes()
    return answer


def deploy_nodes(agent: AgentProc, n: int, *, links=None, **plan_kw) -> Deployment:
    """Plan and deploy n netns nodes (iperf3 servers by default); links is a callable
    Deployment -> {node: [link]} or a ready dict."""
    dep = plan(n, **plan_kw)
    dep.links = links(dep) if callable(links) else dict(links or {})
    deploy(agent, dep)
    return dep


# ----------------------------------------------------------------------------- inside namespaces

def ns_run(ns: str, argv: list[str], *, timeout_s: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", "netns", "exec", ns] + argv, capture_output=True, text=True, timeout=timeout_s)
    if check and p.returncode != 0:
        raise AssertionError(f"in {ns}: {' '.join(argv)} -> {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


_CONNECT = """
import socket, sys, time
port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
bad = []
for ip in sys.argv[3:]:
    while True:
        try:
            socket.create_connection((ip, port), timeout=1).close()
            break
        except OSError as e:
            if time.monotonic() > deadline:
                bad.append(f"{ip}: {e}")
                break
            time.sleep(0.05)
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""


def unreachable_from(ns: str, ips: list[str], port: int, *, timeout_s: float = 10) -> list[str]:
    """TCP-connect from inside ns to every ip:port (retrying until timeout_s); the failures."""
    p = ns_run(ns, [sys.executable, "-c", _CONNECT, str(port), str(timeout_s)] + list(ips),
               timeout_s=timeout_s * len(ips) + 30, check=False)
    return [l for l in p.stdout.splitlines() if l.strip()] or ([p.stderr.strip()] if p.returncode else [])


LINK_TOLERANCE = 0.03     # goodput against the MTU-limited ideal of a link's rate


def measure(dep: "Deployment", src: str, dst: str, rate_bps: int | None = None, seconds: float = 3) -> float:
    """iperf3 goodput (bits/s) from node src to node dst's app port, in their namespaces."""
    return iperf(dep.ns(src), dep.ns(dst), dep.ip(dst), dep.node(dst)["port"], seconds=seconds,
                 rate_hint_bps=rate_bps)


def assert_near(got_bps: float, rate_bps: int, tolerance: float = LINK_TOLERANCE) -> None:
    ideal = goodput_ideal(rate_bps)
    assert abs(got_bps / ideal - 1) <= tolerance, \
        f"goodput {got_bps / 1e6:.3f} Mbit/s vs ideal {ideal / 1e6:.3f} Mbit/s ({got_bps / ideal:.3f})"


def need_node_user():
    """Skip mark for tests of unprivileged nodes: the edgetb-node user install.sh makes."""
    missing = subprocess.run(["id", nb.NODE_USER], capture_output=True).returncode != 0
    return need("root", f"no user {nb.NODE_USER}: run ./install.sh (as root)" if missing else None)


def iperf(src_ns: str, dst_ns: str, ip: str, port: int = IPERF_PORT, *, seconds: float = 3,
          omit_s: int = 1, rate_hint_bps: float | None = None, attempts: int = 3) -> float:
    """Receiver goodput in bits/s of a TCP iperf3 run from src_ns to ip:port (a server in
    dst_ns, waited for first): the benches' measurement, so tests and benches agree."""
    wait_listening(dst_ns, port)
    return bench.iperf(src_ns, ip, port, seconds, omit_s, rate_hint_bps=rate_hint_bps,
                       attempts=attempts)["goodput_bps"]


# ----------------------------------------------------------------------------- what is left

def cgroup_dirs(name: str) -> list[Path]:
    """A node's cgroup directories, on whichever layout this machine has."""
    return list(Cgroup(name).dirs.values())


def cgroup_limits(name: str) -> dict:
    """{'cpu_quota_us', 'cpu_period_us', 'memory_bytes', 'pids'} of a node's cgroup, as
    the kernel has them (worker/cgroups.py reads either layout)."""
    return Cgroup(name).limits()


def netns_list() -> list[str]:
    """The named network namespaces (`ip netns list`: the first field of each line; the
    suite's one parser of it)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


CGROUP_BASE = Path("/sys/fs/cgroup")
MOUNT_MARKS = ("/run/edgetb", "/var/cache/edgetb", "edgetb-node")   # testbed mounts in mountinfo


def _node_cgroups() -> list[Path]:
    """Every node cgroup: /sys/fs/cgroup/edgetb/* (v2) and /sys/fs/cgroup/*/edgetb/* (v1)."""
    out = {}
    for g in [CGROUP_BASE / "edgetb", *CGROUP_BASE.glob("*/edgetb")]:
        with contextlib.suppress(OSError):
            for p in g.iterdir():
                if p.is_dir():
                    out.setdefault(p.resolve(), p)   # cpu and cpu,cpuacct may be one hierarchy
    return sorted(out.values())


def _iptables_rules() -> list[str]:
    if shutil.which("iptables") is None:
        return []
    p = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True)
    return [l for l in p.stdout.splitlines() if "edgetb" in l]


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: tells a pid from a later process reusing it."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[19]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:100]
    except OSError:
        return "?"


def _testbed_processes(seen: dict[int, str]) -> list[tuple[int, str | None, str]]:
    """(pid, node or None, why) of every process that is in a node cgroup (edgetb/<node>,
    what launch/unshare/tini chains and apps run in), carries the test-node marker in its
    environment, or was once seen inside a test namespace and still runs."""
    out = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        pid = int(d)
        try:
            if pid in seen and _start_time(pid) == seen[pid]:
                out.append((pid, None, "seen in a test namespace"))
                continue
            for line in Path(f"/proc/{d}/cgroup").read_text().splitlines():
                path = line.split(":", 2)[2]
                if path.startswith("/edgetb/"):
                    out.append((pid, path.split("/")[2], f"cgroup {path}"))
                    break
            else:
                env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
                marks = [e for e in env if e.startswith(MARKER_ENV.encode() + b"=")]
                if marks:
                    out.append((pid, marks[0].split(b"=", 1)[1].decode(errors="replace"), MARKER_ENV))
        except (OSError, IndexError):
            continue
    return out


def _docker_objects() -> tuple[list, list] | None:
    """(containers, networks) labelled edgetb=1, or None when no Docker daemon answers."""
    try:
        from worker import image
        c = image.client(timeout_s=10)
    except Exception:        # no SDK, no daemon: nothing of Docker to check
        return None
    try:
        from worker import docker_nodes as dn
        flt = {"label": f"{dn.LABEL}=1"}
        return c.containers.list(all=True, filters=flt), c.networks.list(filters=flt)
    finally:
        c.close()


def leftovers(*deps: Deployment, extra_names: list[str] = (), docker: bool = True) -> dict[str, list[str]]:
    """What the testbed still holds on this host (empty lists: nothing); the suite's one
    leftovers check.

    Without deps or names: EVERYTHING of the testbed's kinds, whoever made it (after a
    workflow test nothing of it should exist at all: tests run one at a time). With
    deps/extra_names: only what belongs to those nodes and emulators (for checks in the
    middle of a module whose other deployments legitimately exist).

    Kinds: namespaces etb-*, links etbv*/etbbr*, node cgroups (edgetb/<node>, v1 or v2),
    iptables rules with the comment edgetb, mounts of /run/edgetb, /var/cache/edgetb and
    node run dirs, processes (in a node cgroup, marked as a test node, or once seen in a
    test namespace), node state dirs under /run/edgetb, when a Docker daemon answers,
    containers and networks labelled edgetb=1, and (unscoped) ARP table thresholds still
    raised (worker/nodes.py size_neighbour_table).
    """
    names = [n for d in deps for n in d.names] + list(extra_names)
    scoped = bool(names or deps)
    nameset = set(names)
    bridges = {d.bridge for d in deps}
    veths = {v for d in deps for v in d.veths()}
    seen = {pid: st for d in deps for pid, st in d.pids.items()}
    emulators = {d.emulator for d in deps}

    nets = [n for n in netns_list() if n.startswith(nb.NS_PREFIX)]
    links = [l for l in os.listdir("/sys/class/net") if l.startswith((nb.VETH_PREFIX, nb.BRIDGE_PREFIX))]
    groups = _node_cgroups()
    rules = _iptables_rules()
    mounts = [l for l in Path("/proc/self/mountinfo").read_text().splitlines()
              if any(m in l for m in MOUNT_MARKS)]
    procs = _testbed_processes(seen)
    rundirs = list(Path("/run/edgetb").glob("agent-*/nodes/*"))
    dock = _docker_objects() if docker else None
    ctrs, dnets = dock or ([], [])
    if scoped:
        nets = [n for n in nets if n[len(nb.NS_PREFIX):] in nameset]
        links = [l for l in links if l in veths | bridges]
        groups = [g for g in groups if g.name in nameset]
        rules = [r for r in rules if any(b in r for b in bridges)]
        mounts = [m for m in mounts if any(f"/nodes/{n}/" in m or m.split()[4].endswith(f"/nodes/{n}")
                                           for n in nameset)]
        procs = [p for p in procs if p[1] is None or p[1] in nameset]
        rundirs = [r for r in rundirs if r.name in nameset]
        ctrs = [c for c in ctrs if (c.labels or {}).get("edgetb.node") in nameset]
        dnets = [n for n in dnets if (n.attrs.get("Labels") or {}).get("edgetb.emulator") in emulators]
    return {
        "namespaces": sorted(nets),
        "links": sorted(links),
        "cgroups": sorted(str(g) for g in groups),
        "iptables": rules,
        "mounts": mounts,
        "processes": sorted(f"{pid} [{why}] {_cmdline(pid)}" for pid, _, why in procs),
        "rundirs": sorted(str(r) for r in rundirs),
        "containers": sorted(c.name for c in ctrs),
        "networks": sorted(n.name for n in dnets),
        # The host's ARP table thresholds, raised for many nodes, are back once no bridge is.
        "sysctls": [str(nb.NEIGH_SAVED)] if not scoped and nb.NEIGH_SAVED.exists() else [],
    }


def testbed_objects() -> dict[str, list[str]]:
    """Everything of the testbed's kinds on this host, whoever made it (for diagnostics)."""
    return leftovers()


def assert_clean(*deps: Deployment, extra_names: list[str] = ()) -> None:
    """Fails listing what remains: of these deployments, or with none given, of anything."""
    left = {k: v for k, v in leftovers(*deps, extra_names=extra_names).items() if v}
    assert not left, f"testbed left behind: {left}"


@contextlib.contextmanager
def deployed(agent: AgentProc, dep: Deployment):
    """Deploy, yield, and always reset the agent's emulated nodes afterwards."""
    try:
        deploy(agent, dep)
        yield dep
    finally:
        agent.post("/emulated/reset")         # an error fails the test
    assert_clean(dep)


def proc_status(pid: int) -> dict | None:
    """/proc/PID/status as {field: value}, None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(l.split(":\t", 1) for l in f.read().splitlines() if ":\t" in l)
    except OSError:
        return None


def assert_clean_after_kill(*deps: "Deployment", timeout_s: float = 60) -> None:
    """assert_clean after a reset that had to SIGKILL: at once nothing may remain but dead
    processes orphaned to PID 1 (a SIGKILLed parent's children, which init here reaps
    late); then, within timeout_s, nothing at all."""
    left = leftovers(*deps)
    assert not {k: v for k, v in left.items() if v and k != "processes"}, left
    for line in left["processes"]:
        st = proc_status(int(line.split()[0]))
        assert st is None or (st["State"].startswith("Z") and st["PPid"] == "1"), (line, st)
    deadline = time.monotonic() + timeout_s
    while any(leftovers(*deps).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_clean(*deps)
