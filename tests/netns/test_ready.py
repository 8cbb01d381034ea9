"""Readiness (agent side): GET /status says per node whether its app answers.

A real agent, real namespaces (and containers, and a physical node in a namespace that
plays the host), real apps: one that listens only once the test tells it to (a UDP
datagram "go" on its port) becomes ready then and not before; one that never listens
stays not ready while the prober keeps trying (its refusals counted in the node's own
namespace); a node without a command is idle and not ready; stop and reset end probing.
worker/ready.py's Prober is also driven directly on loopback.
"""
import os
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path


import pytest

from tests.support import agents as ah
from dml_app import net
from worker import nodes as nb
from worker import ready

PORT = 4461
# The app: listens on its port; with a second argument only once a datagram "go" came to
# that port (so the test decides when it starts to answer).
APP = """
import socket, sys
port = int(sys.argv[1])
if len(sys.argv) > 2:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", port))
    while u.recv(16) != b"go":
        pass
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(16)
while True:
    s.accept()[0].close()
"""
LISTEN = ["python3", "-c", APP, str(PORT)]
LISTEN_LATE = LISTEN + ["late"]
NEVER = ["sleep", "300"]


def _status(agent_, names=None) -> dict:
    st = agent_.get("/status")
    assert set(st) == {"agent", "nodes"}
    return st["nodes"] if names is None else {n: st["nodes"][n] for n in names}


def _wait(what: str, cond, timeout_s: float = 30):
    """cond() until truthy (-> its value), every 50 ms, failing after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)


def _refusals(ns: str) -> int:
    """TCP resets sent from inside namespace ns (Tcp OutRsts of its /proc/net/snmp): each
    connection attempt to a port nobody listens on adds one."""
    lines = [l.split() for l in ah.ns_run(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines() if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("OutRsts")])


def _go(ip: str, port: int = PORT) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.sendto(b"go", (ip, port))


# ----------------------------------------------------------------------------- netns nodes

def test_netns_app_that_listens_late_becomes_ready_one_that_never_listens_stays_not(clean_agent):
    dep = ah.plan(3, cmd=LISTEN_LATE, port=PORT)
    late, never, idle = dep.names
    dep.node(never)["cmd"] = NEVER
    dep.node(idle)["cmd"] = []
    ah.deploy(clean_agent, dep)
    try:
        # probed and refused (the resets come from the nodes' own stacks), so not ready
        _wait("probes refused by both", lambda: _refusals(dep.ns(late)) >= 2 and _refusals(dep.ns(never)) >= 2)
        st = _status(clean_agent, dep.names)
        assert [st[n]["state"] for n in dep.names] == ["running", "running", "idle"]
        assert [st[n]["ready"] for n in dep.names] == [False, False, False]
        assert _refusals(dep.ns(idle)) == 0          # a node without an app is not probed

        # the late app starts listening: ready, and the prober leaves it alone from then on
        _wait("the late app ready", lambda: _go(dep.ip(late)) or _status(clean_agent)[late]["ready"])
        st = _status(clean_agent, dep.names)
        assert (st[late]["state"], st[never]["ready"], st[idle]["ready"]) == ("running", False, False)
        before = _refusals(dep.ns(never))
        _wait("the never-listening app still probed", lambda: _refusals(dep.ns(never)) >= before + 2)
        assert not _status(clean_agent)[never]["ready"]

        # stop: apps gone, namespaces kept; nobody ready, and probing has ended
        clean_agent.post("/emulated/stop")
        st = _status(clean_agent, dep.names)
        assert [st[n]["ready"] for n in dep.names] == [False, False, False]
        assert st[late]["state"] != "running" and st[never]["state"] != "running"
        before = _refusals(dep.ns(never))
        time.sleep(5 * ready.PERIOD_S)                # five probe periods: none may come
        assert _refusals(dep.ns(never)) == before
    finally:
        clean_agent.post("/emulated/reset")
    ah.assert_clean(dep)
    assert _status(clean_agent) == {}


def test_an_app_that_exits_is_not_ready_and_not_probed(clean_agent):
    dep = ah.plan(1, cmd=["sh", "-c", "exit 3"], port=PORT)
    (name,) = dep.names
    ah.deploy(clean_agent, dep)
    _wait("the app seen exited", lambda: _status(clean_agent)[name]["state"] == "exited")
    before = _refusals(dep.ns(name))
    time.sleep(5 * ready.PERIOD_S)
    assert _refusals(dep.ns(name)) <= before + 1      # at most the attempt under way when it exited
    assert _status(clean_agent)[name]["ready"] is False


def test_reset_stops_probing_in_process(tmp_path):
    """The agent object itself: what its prober watches after deploy, stop and reset."""
    if ah.missing_requirements():
        pytest.skip(ah.missing_requirements())
    from worker import agent as agent_mod

    a = agent_mod.Agent(name="t", port=1, token="x", state_dir=tmp_path / "state")
    dep = ah.plan(2, cmd=NEVER, port=PORT)
    try:
        a.deploy_emulated(dep.body())
        assert a.prober.watching() == set(dep.names)
        a.reset("emulated")
        assert a.prober.watching() == set()
        assert a.status()["nodes"] == {}
        a.deploy_emulated(dep.body())                 # again: watched again
        assert a.prober.watching() == set(dep.names)
        a.stop("emulated")
        assert a.prober.watching() == set()
    finally:
        a.reset("all")
        a.prober.close()
    ah.assert_clean(dep)


# ----------------------------------------------------------------------------- docker nodes

@pytest.mark.docker
def test_docker_app_ready_when_it_answers(clean_agent):
    from tests.support import containers as dt

    why = dt.why_not()
    if why:
        pytest.skip(f"docker: {why}")   # why is tagged (dt.why_not)
    dep = dt.plan(2, cmd=LISTEN_LATE, port=PORT, cpu=0.5, ram_mb=128)
    late, never = dep.names
    dep.node(never)["cmd"] = NEVER
    with dt.deployed(clean_agent, dep):
        _wait("probes refused by both", lambda: _refusals(dep.ns(late)) >= 2 and _refusals(dep.ns(never)) >= 2)
        st = _status(clean_agent, dep.names)
        assert [(st[n]["state"], st[n]["ready"]) for n in dep.names] == [("running", False), ("running", False)]
        _wait("the late app ready", lambda: _go(dep.ip(late)) or _status(clean_agent)[late]["ready"])
        st = _status(clean_agent, dep.names)
        assert st[late]["kind"] == "docker" and st[late]["container"] and st[never]["ready"] is False
        clean_agent.post("/emulated/stop")
        st = _status(clean_agent, dep.names)
        assert [(st[n]["state"], st[n]["ready"]) for n in dep.names] == [("exited", False), ("exited", False)]


# ----------------------------------------------------------------------------- a physical node

@pytest.fixture
def host_ns():
    """A namespace that plays the host (NIC eth1, a veth to this one), its agent in it."""
    if ah.missing_requirements():
        pytest.skip(ah.missing_requirements())
    tag = secrets.token_hex(2)
    ns, veth, subnet = f"trd{tag}", f"trd{tag}v", f"10.237.{int(tag, 16) % 250}"
    port, token = ah.free_port(), secrets.token_hex(16)
    proc = None
    try:
        for argv in (["ip", "netns", "add", ns],
                     ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth1", "netns", ns],
                     ["ip", "addr", "add", f"{subnet}.1/24", "dev", veth], ["ip", "link", "set", veth, "up"],
                     ["ip", "-n", ns, "addr", "add", f"{subnet}.2/24", "dev", "eth1"],
                     ["ip", "-n", ns, "link", "set", "eth1", "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]):
            subprocess.run(argv, check=True, capture_output=True)
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgetb-test-agent-{tag}.log"
        proc = ah.launch_agent(["nsenter", f"--net=/run/netns/{ns}"], "0.0.0.0", port, f"t{tag}", token, log)
        base = f"{subnet}.2:{port}"
        net.get_json(f"{base}/hi", token=token, retries=60)
        yield {"ns": ns, "base": base, "token": token, "ip": f"{subnet}.2", "tag": tag}
    finally:
        if proc is not None:
            try:
                net.post_json(f"{subnet}.2:{port}/physical/reset", {}, token=token)
            finally:
                nb.stop_group(proc, 30)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_physical_app_ready_on_the_hosts_loopback(host_ns):
    h = host_ns
    get = lambda: net.get_json(f"{h['base']}/status", token=h["token"])["nodes"]  # noqa: E731
    name = f"p{h['tag']}"
    node = {"name": name, "id": 1, "ip": h["ip"], "port": PORT, "cpu": 0.5, "ram_mb": 128,
            "cmd": LISTEN_LATE, "working_dir": "/tmp", "nic": "eth1"}
    net.post_json(f"{h['base']}/physical/deploy", {"nodes": [node], "links": {}}, token=h["token"])
    _wait("probes refused", lambda: _refusals(h["ns"]) >= 2)
    assert (get()[name]["state"], get()[name]["ready"]) == ("running", False)
    # the datagram goes to the host's address; the prober connects to its loopback
    _wait("the late app ready", lambda: _go(h["ip"]) or get()[name]["ready"])
    net.post_json(f"{h['base']}/physical/reset", {}, token=h["token"])
    assert get() == {}
    assert not [d for d in ah.cgroup_dirs(name) if d.exists()]


# ----------------------------------------------------------------------------- the Prober itself

def test_prober_on_loopback():
    """Ready once a listener accepts (and then left alone); not ready while refused; an
    exited app and a forgotten node are dropped; one thread for all."""
    p = ready.Prober()
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    port = lst.getsockname()[1]                 # bound, not yet listening: refused
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    other = closed.getsockname()[1]
    alive = {"gone": True}
    try:
        before = threading.active_count()
        p.watch("a", ("127.0.0.1", port), lambda: None)
        p.watch("b", ("127.0.0.1", other), lambda: True)
        p.watch("c", ("127.0.0.1", other), lambda: not alive["gone"])
        assert threading.active_count() == before + 1
        _wait("c dropped (its app exited)", lambda: p.watching() == {"a", "b"}, 10)
        assert not p.ready("a") and not p.ready("b") and not p.ready("c")
        lst.listen(4)
        _wait("a ready", lambda: p.ready("a"), 10)
        assert p.watching() == {"b"}
        lst.settimeout(5)
        lst.accept()[0].close()                 # its one probe
        lst.settimeout(5 * ready.PERIOD_S)
        with pytest.raises(socket.timeout):     # and no more
            lst.accept()
        p.forget("b")
        assert p.watching() == set() and not p.ready("b")
        p.forget("a")
        assert not p.ready("a")
    finally:
        p.close()
        lst.close()
        closed.close()
