"""Docker nodes' links: shaped from the host inside the containers' namespaces, measured
with iperf3, and in place before the app starts.

iperf3 is the host's: `ip netns exec etb-<node> iperf3 ...` runs it in the container's
network namespace, which the agent attached under the node's name (no docker exec, no
iperf3 or tc in the image).
"""
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


from tests.support import agents as ah
from tests.support import containers as dt
from worker import docker_nodes as dn
from worker import nodes as nb
from worker import tc

pytestmark = [dt.need_docker(), ah.need_iperf3()]

TOLERANCE = 0.03
RATE_BPS = 20_000_000


@contextlib.contextmanager
def iperf_server(ns: str, port: int):
    """The host's iperf3 as a server inside ns, in its own process group; always killed."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)     # nothing of it is worth keeping
        p.wait(10)


def test_shaped_link_between_containers_within_3_percent(agent):
    dep = dt.plan(2)
    a, b = dep.names
    dep.links = {a: [ah.link(dep, a, b, RATE_BPS)]}
    try:
        with dt.deployed(agent, dep) as answer:
            assert answer["nodes"][a]["links"] == 1 and answer["nodes"][b]["links"] == 0
            # the namespace attached as etb-<a> is the container's: its eth0 has a's address
            addr = ah.ns_run(dep.ns(a), ["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
            assert f" {dep.ip(a)}/24 " in addr, addr
            classes = subprocess.run(["tc", "-n", dep.ns(a), "class", "show", "dev", "eth0"],
                                     capture_output=True, text=True).stdout
            assert "rate 20Mbit" in classes, classes
            ideal = ah.goodput_ideal(RATE_BPS)
            with iperf_server(dep.ns(b), ah.IPERF_PORT):
                got = ah.iperf(dep.ns(a), dep.ns(b), dep.ip(b), ah.IPERF_PORT, seconds=5,
                               rate_hint_bps=RATE_BPS)
                if abs(got / ideal - 1) > TOLERANCE:
                    # Once more: a full-suite run saw 0.943 of the ideal once (a sender
                    # starved of cpu right after the browser tests), 1.00 alone.
                    got = ah.iperf(dep.ns(a), dep.ns(b), dep.ip(b), ah.IPERF_PORT, seconds=5,
                                   rate_hint_bps=RATE_BPS)
            print(f"docker link {RATE_BPS / 1e6:g} Mbit/s: goodput {got / 1e6:.3f} Mbit/s, ideal {ideal / 1e6:.3f}")
            assert abs(got / ideal - 1) <= TOLERANCE, \
                f"goodput {got / 1e6:.3f} Mbit/s vs ideal {ideal / 1e6:.3f} Mbit/s ({got / ideal:.3f})"
    finally:
        dt.assert_clean(dep)


_SEND = """
import socket, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 120
while True:
    try:
        s = socket.create_connection((ip, port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("no sink to send to")
        time.sleep(0.05)
s.sendall(bytes(n))
s.close()
time.sleep(1e6)
"""

_SINK = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4)
while True:
    c, _ = s.accept()
    while c.recv(65536):
        pass
    c.close()
"""


def _class_bytes(ns: str) -> dict[str, int]:
    """Bytes sent per HTB class on eth0 in ns ({'1:1': ..., '1:10': ...}), from `tc -s`."""
    out = ah.ns_run(ns, ["tc", "-s", "class", "show", "dev", "eth0"]).stdout
    got, cls = {}, None
    for line in out.splitlines():
        words = line.split()
        if words[:2] == ["class", "htb"]:
            cls = words[2]
        elif words[:1] == ["Sent"] and cls:
            got[cls] = int(words[1])
            cls = None
    return got


def test_agent_installs_links_before_the_app_sends_its_first_byte(agent):
    """Through the agent: a's app, started by the agent, sends SIZE bytes to b at once;
    had it run before its link, they would have left unshaped and uncounted by the link's
    class (and at veth speed, long before the class existed)."""
    SIZE = 1_000_000
    dep = dt.plan(2)
    a, b = dep.names
    port = dep.node(b)["port"]
    dep.node(a)["cmd"] = ["python3", "-c", _SEND, dep.ip(b), str(port), str(SIZE)]
    dep.node(b)["cmd"] = ["python3", "-c", _SINK, str(port)]
    dep.links = {a: [ah.link(dep, a, b, RATE_BPS)]}
    try:
        with dt.deployed(agent, dep) as answer:
            assert answer["nodes"][a]["links"] == 1
            deadline = time.monotonic() + 60
            while (sent := _class_bytes(dep.ns(a))).get("1:10", 0) < SIZE:
                assert time.monotonic() < deadline, f"a's bytes never all went through its link: {sent}"
                time.sleep(0.1)
            # every byte of the app went through the 20 Mbit/s class: payload plus headers,
            # and nothing of it through the default class
            assert SIZE <= sent["1:10"] <= SIZE * 1.1, sent
            assert sent.get("1:1", 0) < SIZE // 100, sent
            assert tc.read_back(dep.ns(a), "eth0")["rates_bps"][0x10] == RATE_BPS
    finally:
        dt.assert_clean(dep)


def test_app_starts_only_after_its_links_are_in_place():
    """Below the agent: containers made, nothing of their command has run; links go in;
    only the gate starts the command, which then finds its links there."""
    dep = dt.plan(2, cmd=["sh", "-c", "touch /run/edgetb-node/log/started; exec sleep infinity"])
    a, b = dep.names
    specs = [nb.NodeSpec.from_dict(n) for n in dep.nodes]
    client = dt.client()
    agent_id = f"/run/edgetb/test-{dep.emulator}"
    lab = dn.labels(agent_id, 0)
    made = []
    try:
        network = dn.ensure_network(client, dep.emulator, str(dep.network), dep.gateway, lab)
        made = dn.create_nodes(client, specs, network=network, rundir_base=Path(f"/run/edgetb/test-{dep.emulator}"),
                               lab=lab, cores=dn.emulator_cores(2), load={}, extra_env={})
        # ready and held: each container's gate shell is up (blocked on its FIFO); a
        # command not held back would have run before it, in its place
        deadline = time.monotonic() + 30
        while not all(any(p[-1].startswith("/bin/sh -c read") for p in client.containers.get(n.container).top()["Processes"])
                      for n in made):
            assert time.monotonic() < deadline, "no container reached its gate"
            time.sleep(0.05)
        for n in made:
            assert not (Path(n.rundir) / "log" / "started").exists(), f"{n.spec.name} started before its gate"
            top = client.containers.get(n.container).top()["Processes"]
            others = [p[-1] for p in top if not p[-1].startswith(("/sbin/docker-init", "/bin/sh -c read"))]
            assert others == [], f"{n.spec.name} runs more than its gate: {others}"
        tables: dict[str, tc.LinkTable] = {}
        links = {a: [tc.Link.from_dict(ah.link(dep, a, b, RATE_BPS))]}
        assert nb.install_links(made, links, tables) == {a: 1, b: 0}
        runner = dn.DockerRunner(lambda: client)
        for n in made:
            runner.start(n, {})
        deadline = time.monotonic() + 20
        while not all((Path(n.rundir) / "log" / "started").exists() for n in made):
            assert time.monotonic() < deadline, "the gate opened but the command did not run"
            time.sleep(0.05)
        assert tc.read_back(dep.ns(a), "eth0")["filters"] == 1
        assert all(runner.alive(n.spec.name, n) for n in made)
    finally:
        for n in made:
            dn.remove_node(client, n, agent_id)
        dn.remove_network(client, dn.network_name(dep.emulator), agent_id)
        with contextlib.suppress(OSError):
            os.rmdir(f"/run/edgetb/test-{dep.emulator}")
        client.close()
    dt.assert_clean(dep)
