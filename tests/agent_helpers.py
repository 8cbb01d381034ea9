"""Shared helpers for tests that drive a REAL agent: start/stop it, deploy netns nodes
through its HTTP API, measure links with iperf3, and list what the testbed left behind.

Import from a test module (no conftest needed):

    import agent_helpers as ah                      # tests/ is on sys.path under pytest
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from bench import common as bench  # noqa: E402
from bench.common import ideal as goodput_ideal, wait_listening  # noqa: E402,F401  (used by tests)
from dml_app import net  # noqa: E402
from worker import nodes as nb  # noqa: E402

AGENT = ROOT / "worker" / "agent.py"
IPERF_PORT = 4444
MARKER_ENV = "EDGETB_TEST_NODE"   # set in every planned node's env: finds its processes
TOKEN_HEADER = net.TOKEN_HEADER
# A different /24 per deployment in this process; the random start keeps two pytest
# processes on one machine apart too.
_subnets = itertools.count(random.randrange(0, 200))
_ids = itertools.count(random.randrange(1000, 50000, 100), 100)


# ----------------------------------------------------------------------------- preconditions

def missing_requirements() -> str | None:
    """Why real-namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (namespaces, qdiscs, cgroups)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the {tool} command (iproute2)"
    return None


def need_root():
    """pytest.mark.skipif for tests that need root and iproute2."""
    why = missing_requirements()
    return pytest.mark.skipif(why is not None, reason=why or "")


def need_iperf3():
    return pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")


def new_tag() -> str:
    """A short name prefix unique to this call: a letter and 5 hex digits."""
    return "t" + secrets.token_hex(3)[:5]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _stop_agent(agent: AgentProc, timeout_s: float = 30) -> None:
    """Reset everything it made, then SIGTERM its process group (SIGKILL if it lingers)."""
    if agent.alive():
        for path in ("/emulated/reset", "/physical/reset"):
            try:
                agent.post(path, timeout_s=timeout_s)
            except net.HttpError as e:
                print(f"agent_helpers: {path} on port {agent.port} failed: {e}", file=sys.stderr)
    nb.stop_group(agent.proc, timeout_s)
    # Its state dir holds nothing once it reset; leave it only if it still lists nodes.
    state = agent.state_dir / "state.json"
    try:
        if not json.loads(state.read_text()).get("nodes"):
            shutil.rmtree(agent.state_dir, ignore_errors=True)
    except (OSError, ValueError):
        pass


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
        out = open(log_path, "wb")
        env = {**os.environ, net.TOKEN_ENV: token}
        try:
            proc = subprocess.Popen([sys.executable, str(AGENT), "--port", str(port),
                                     "--host", "127.0.0.1", "--name", f"test-{port}"],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(ROOT), env=env, start_new_session=True)
        finally:
            out.close()
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
            _stop_agent(agent)
            with contextlib.suppress(OSError):
                log_path.unlink()
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
            agent.post("/emulated/reset")
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


def iperf(src_ns: str, dst_ns: str, ip: str, port: int = IPERF_PORT, *, seconds: float = 3,
          omit_s: int = 1, rate_hint_bps: float | None = None, attempts: int = 3) -> float:
    """Receiver goodput in bits/s of a TCP iperf3 run from src_ns to ip:port (a server in
    dst_ns, waited for first): the benches' measurement, so tests and benches agree."""
    wait_listening(dst_ns, port)
    return bench.iperf(src_ns, ip, port, seconds, omit_s, rate_hint_bps=rate_hint_bps,
                       attempts=attempts)["goodput_bps"]


# ----------------------------------------------------------------------------- what is left

def _cgroup_dirs(name: str) -> list[Path]:
    base = Path("/sys/fs/cgroup")
    return [base / "edgetb" / name, base / "cpu" / "edgetb" / name, base / "memory" / "edgetb" / name]


def cgroup_limits(name: str) -> dict:
    """{'cpu_quota_us', 'cpu_period_us', 'memory_bytes', 'pids'} of a node's cgroup."""
    base = Path("/sys/fs/cgroup")
    v2 = base / "edgetb" / name
    if (base / "cgroup.controllers").exists():
        quota, period = (v2 / "cpu.max").read_text().split()
        return {"cpu_quota_us": int(quota), "cpu_period_us": int(period),
                "memory_bytes": int((v2 / "memory.max").read_text()),
                "pids": {int(x) for x in (v2 / "cgroup.procs").read_text().split()}}
    cpu, mem = base / "cpu" / "edgetb" / name, base / "memory" / "edgetb" / name
    return {"cpu_quota_us": int((cpu / "cpu.cfs_quota_us").read_text()),
            "cpu_period_us": int((cpu / "cpu.cfs_period_us").read_text()),
            "memory_bytes": int((mem / "memory.limit_in_bytes").read_text()),
            "pids": {int(x) for x in (cpu / "cgroup.procs").read_text().split()}
            | {int(x) for x in (mem / "cgroup.procs").read_text().split()}}


def _cgroup_members(names) -> list[str]:
    out = []
    for n in names:
        for d in _cgroup_dirs(n):
            try:
                out += [f"{pid} {_cmdline(int(pid))}" for pid in (d / "cgroup.procs").read_text().split()]
            except OSError:
                pass
    return out


def _all_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


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


def _pids_left(names: set[str], seen: dict[int, str]) -> list[str]:
    """Processes whose environment marks them as one of these nodes' (node apps and
    their children), and processes once seen inside a test namespace that still run."""
    out = []
    needles = {f"{MARKER_ENV}={n}".encode() for n in names}
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        pid = int(d)
        try:
            if pid in seen and _start_time(pid) == seen[pid]:
                out.append(f"{pid} {_cmdline(pid)}")
                continue
            if needles and needles & set(Path(f"/proc/{d}/environ").read_bytes().split(b"\0")):
                out.append(f"{pid} {_cmdline(pid)}")
        except OSError:
            continue
    return out


def leftovers(*deps: Deployment, extra_names: list[str] = ()) -> dict[str, list[str]]:
    """What the testbed still holds of these deployments (empty lists: nothing).

    Scoped to the names the test made: namespaces etb-<node>, host veths etbv<hash of name>, the
    bridges, cgroups edgetb/<node>, iptables rules naming the bridges, processes marked
    with a node's name in their environment or once seen inside one of its namespaces.
    """
    names = [n for d in deps for n in d.names] + list(extra_names)
    bridges = {d.bridge for d in deps}
    veths = {v for d in deps for v in d.veths()}
    seen = {pid: st for d in deps for pid, st in d.pids.items()}
    nets = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    links = _all_links()
    state_dirs = [p for p in Path("/run/edgetb").glob("agent-*/nodes/*") if p.name in names] \
        if Path("/run/edgetb").is_dir() else []
    return {
        "namespaces": sorted(nb.NS_PREFIX + n for n in names if nb.NS_PREFIX + n in nets),
        "links": sorted((veths | bridges) & links),
        "cgroups": sorted(str(p) for n in names for p in _cgroup_dirs(n) if p.exists()),
        "iptables": [r for r in _iptables_rules() if any(b in r for b in bridges)],
        "processes": sorted(set(_pids_left(set(names), seen)) | set(_cgroup_members(names))),
        "rundirs": sorted(str(p) for p in state_dirs),
    }


def testbed_objects() -> dict[str, list[str]]:
    """Everything of the testbed's kinds on this host, whoever made it (for diagnostics)."""
    nets = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    base = Path("/sys/fs/cgroup")
    groups = []
    for g in (base / "edgetb", base / "cpu" / "edgetb", base / "memory" / "edgetb"):
        if g.is_dir():
            groups += [str(p) for p in g.iterdir() if p.is_dir()]
    return {
        "namespaces": sorted(n for n in nets if n.startswith(nb.NS_PREFIX)),
        "links": sorted(l for l in _all_links()
                        if l.startswith(nb.VETH_PREFIX) or l.startswith(nb.BRIDGE_PREFIX)),
        "cgroups": sorted(groups),
        "iptables": _iptables_rules(),
    }


def assert_clean(*deps: Deployment, extra_names: list[str] = ()) -> None:
    left = leftovers(*deps, extra_names=extra_names)
    assert not any(left.values()), f"testbed left behind: { {k: v for k, v in left.items() if v} }"


@contextlib.contextmanager
def deployed(agent: AgentProc, dep: Deployment):
    """Deploy, yield, and always reset the agent's emulated nodes afterwards."""
    try:
        deploy(agent, dep)
        yield dep
    finally:
        with contextlib.suppress(net.HttpError):
            agent.post("/emulated/reset")
