"""A multi-host test harness: several "machines" on one, each with its own address and
its own real agent process; the controller runs beside them in the test process.

    with multihost.Harness() as h:
        a = h.add_host()                       # namespace m<tag>h1, 10.246.0.11 on the test bridge
        a.start_agent()                        # nsenter --net=... python3 worker/agent.py --port P (token in its env)
        d = h.root_agent()                     # an agent in the real root namespace (drives dockerd)
        h.route("10.246.16.0/24", a)           # an emulator subnet behind host a, for everyone else

Layout (all under 10.246.0.0/16, names prefixed `m`):
* a test bridge `m<tag>br` in the root namespace holding the controller's address
  10.246.0.1/24 (what `Testbed(ip=...)` gets) and an accept rule for bridged frames (Docker
  sets FORWARD to DROP);
* per host a network namespace `m<tag>h<i>` joined to the bridge by a veth (`eth1` inside,
  like a board's NIC), address 10.246.0.<10+i>/24, ip_forward on, default route via the
  controller. Its agent runs inside it with nsenter, so the agent keeps the machine's /sys
  (cgroups) and makes its emulator bridge, namespaces and qdiscs inside that host;
* emulator subnets 10.246.<16*i>.0/24 are routed by the test (`route`): on a real
  deployment the emulator subnets must be routable between workers and to the
  controller (the workers' own networks do that, as EdgeTB's did);
* docker nodes live on the real host's daemon: their agent (`root_agent`) runs in the
  root namespace, listening on the controller's test address.

Everything is removed on exit, failed or not: agents (reset, then SIGTERM to their
process group), namespaces, veths, the bridge, its rule, routes, agents' share caches.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


from dml_app import net
from worker import nodes as nb
from worker import shares

CONTROLLER_IP = "10.246.0.1"
PORTS = range(3380, 3390)        # controller and agents


def sh(*argv, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def missing() -> str | None:
    """Why the harness cannot run here (a reason tagged with its requirement), or None."""
    from tests.support import agents as ah

    why = ah.missing_requirements()
    if why:
        return why
    if shutil.which("nsenter") is None:
        return ah.skip_reason("root", "needs nsenter (util-linux)")
    if shutil.which("iperf3") is None:
        return ah.skip_reason("iperf3", "needs iperf3")
    return None


def need():
    """Skip mark for tests that drive the harness, saying why it cannot run here."""
    import pytest

    why = missing()
    return pytest.mark.skipif(why is not None, reason=str(why), needs=("root", "multihost", "iperf3"))


def emulator_subnet(i: int) -> str:
    """The emulator subnet of host i (10.246.16.0/24, 10.246.32.0/24, ...)."""
    return f"10.246.{16 * i}.0/24"


@dataclass
class Agent:
    """A real agent process (in a host namespace or the root one)."""
    ip: str
    port: int
    token: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def addr(self) -> str:
        return f"{self.ip}:{self.port}"

    def get(self, path: str, **kw):
        return net.get_json(f"{self.addr}{path}", token=self.token, timeout_s=kw.pop("timeout_s", 60), **kw)

    def post(self, path: str, body=None, **kw):
        return net.post_json(f"{self.addr}{path}", body if body is not None else {}, token=self.token,
                             timeout_s=kw.pop("timeout_s", 120), **kw)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except (OSError, AttributeError):
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, reset: bool = True, timeout_s: float = 30) -> list[str]:
        """Reset what it made (unless told not to), then end its process group; the
        resets' errors."""
        errors = []
        if self.proc is None:
            return errors
        if reset and self.alive():
            for path in ("/emulated/reset", "/physical/reset"):
                try:
                    self.post(path, timeout_s=timeout_s)
                except net.HttpError as e:
                    errors.append(f"{path} on {self.addr}: {e}")
        nb.stop_group(self.proc, timeout_s)
        return errors


@dataclass
class Host:
    index: int
    ns: str
    veth: str
    ip: str
    nic: str = "eth1"
    agent: Agent | None = None
    harness: "Harness | None" = field(default=None, repr=False)

    @property
    def subnet(self) -> str:
        return emulator_subnet(self.index)

    def run(self, *argv, check=True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns, *argv, check=check)

    def start_agent(self, port: int | None = None) -> Agent:
        self.agent = self.harness._start_agent(["nsenter", f"--net=/run/netns/{self.ns}"], self.ip,
                                               port, name=self.ns)
        return self.agent


class Harness:
    """See the module docstring. Use as a context manager."""

    def __init__(self, tag: str | None = None):
        self.tag = tag or "m" + secrets.token_hex(2)
        self.bridge = f"{self.tag}br"
        self.hosts: list[Host] = []
        self.agents: list[Agent] = []
        self.root_routes: list[str] = []
        self._ports = iter(PORTS)
        self.controller_port = next(self._ports)
        self.token = secrets.token_hex(16)

    # ------------------------------------------------------------------ life
    def __enter__(self) -> "Harness":
        try:
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{CONTROLLER_IP}/24", "dev", self.bridge)
            sh("ip", "link", "set", self.bridge, "up")
            nb._bridge_firewall(self.bridge, add=True)
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close(check=exc[0] is None)    # an exception from the body wins

    def close(self, *, check: bool = True) -> None:
        """Remove everything; then, with `check`, fail when a reset reported an error or
        anything of the testbed remains on this machine (agents_helpers.leftovers)."""
        from tests.support import agents as ah

        errors = []
        for a in reversed(self.agents):
            try:
                errors += a.stop()
            except Exception as e:       # the rest of the cleanup still runs
                errors.append(f"stopping the agent on {a.addr}: {e!r}")
            shutil.rmtree(shares.cache_dir(a.port).parent, ignore_errors=True)
            if a.log_path:
                with contextlib.suppress(OSError):
                    a.log_path.unlink()
        for r in self.root_routes:
            sh("ip", "route", "del", r, check=False)
        for h in self.hosts:
            sh("ip", "netns", "del", h.ns, check=False)
            sh("ip", "link", "del", h.veth, check=False)
        nb._bridge_firewall(self.bridge, add=False)
        sh("ip", "link", "del", self.bridge, check=False)
        if check:
            assert not errors, f"resets failed: {errors}"
            ah.assert_clean()

    # ------------------------------------------------------------------ parts
    def next_port(self) -> int:
        return next(self._ports)

    def add_host(self) -> Host:
        i = len(self.hosts) + 1
        h = Host(index=i, ns=f"{self.tag}h{i}", veth=f"{self.tag}v{i}", ip=f"10.246.0.{10 + i}", harness=self)
        self.hosts.append(h)
        sh("ip", "netns", "add", h.ns)
        sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", h.nic, "netns", h.ns)
        sh("ip", "link", "set", h.veth, "master", self.bridge, "up")
        h.run("ip", "addr", "add", f"{h.ip}/24", "dev", h.nic)
        h.run("ip", "link", "set", h.nic, "up")
        h.run("ip", "link", "set", "lo", "up")
        h.run("ip", "route", "add", "default", "via", CONTROLLER_IP)
        h.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        return h

    def route(self, subnet: str, via: Host) -> None:
        """`subnet` lives behind host `via`: route it there from the root namespace and from
        every other host (what the workers' own network does on a real deployment)."""
        sh("ip", "route", "replace", subnet, "via", via.ip)
        self.root_routes.append(subnet)
        for h in self.hosts:
            if h is not via:
                h.run("ip", "route", "replace", subnet, "via", via.ip)

    def root_agent(self, port: int | None = None) -> Agent:
        """An agent in the real root namespace, on the controller's test address (it drives
        this machine's dockerd)."""
        return self._start_agent([], CONTROLLER_IP, port, name=f"{self.tag}root")

    def _start_agent(self, prefix: list[str], ip: str, port: int | None, *, name: str,
                     ready_timeout_s: float = 30) -> Agent:
        from tests.support import agents as ah

        port = port or self.next_port()
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgetb-{self.tag}-agent-{port}.log"
        proc = ah.launch_agent(prefix, ip, port, name, self.token, log_path)   # token in its env
        agent = Agent(ip=ip, port=port, token=self.token, proc=proc, log_path=log_path)
        self.agents.append(agent)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if not agent.alive():
                raise RuntimeError(f"agent {name} exited before answering:\n{agent.log()}")
            with contextlib.suppress(net.HttpError):
                agent.get("/hi", timeout_s=2)
                return agent
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent {name} not ready after {ready_timeout_s}s:\n{agent.log()}")
            time.sleep(0.1)

    # ------------------------------------------------------------------ checks
    def leftovers(self, names: list[str]) -> dict[str, list[str]]:
        """What any worker still holds of these node names (agents.leftovers:
        namespaces, cgroups, processes, mounts, containers ...), and bridges, veths and
        iptables rules inside the hosts' namespaces."""
        from tests.support import agents as ah

        out = ah.leftovers(extra_names=names)
        out["host links"], out["host iptables"] = [], []
        nets = set(ah.netns_list())
        for h in self.hosts:
            if h.ns in nets:
                links = h.run("ip", "-o", "link", "show").stdout
                out["host links"] += [f"{h.ns}: {l.split(':')[1].strip()}" for l in links.splitlines()
                                      if nb.BRIDGE_PREFIX in l or nb.VETH_PREFIX in l]
                rules = h.run("iptables", "-w", "-S", check=False).stdout
                out["host iptables"] += [f"{h.ns}: {r}" for r in rules.splitlines() if "edgetb" in r]
        return out
