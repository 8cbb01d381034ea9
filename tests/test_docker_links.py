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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agent_helpers as ah  # noqa: E402
import docker_testutil as dt  # noqa: E402
from worker import docker_nodes as dn  # noqa: E402
from worker import nodes as nb  # noqa: E402
from worker import tc  # noqa: E402

pytestmark = [dt.need_docker(), ah.need_iperf3()]

TOLERANCE = 0.03
RATE_BPS = 20_000_000

agent = ah.agent_fixture()


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
            with iperf_server(dep.ns(b), ah.IPERF_PORT):
                got = ah.iperf(dep.ns(a), dep.ns(b), dep.ip(b), ah.IPERF_PORT, seconds=5,
                               rate_hint_bps=RATE_BPS)
            ideal = ah.goodput_ideal(RATE_BPS)
            print(f"docker link {RATE_BPS / 1e6:g} Mbit/s: goodput {got / 1e6:.3f} Mbit/s, ideal {ideal / 1e6:.3f}")
            assert abs(got / ideal - 1) <= TOLERANCE, \
                f"goodput {got / 1e6:.3f} Mbit/s vs ideal {ideal / 1e6:.3f} Mbit/s ({got / ideal:.3f})"
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
        time.sleep(1.0)     # time enough for a command that was not held back to run
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
