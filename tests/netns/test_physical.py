"""A physical node: the agent's own host runs the app and its links are shaped on a NIC.

The "host" is a network namespace made by this test (so the real host's NIC is never
touched), with a NIC `eth1` on a test bridge and a peer namespace behind it. The agent
runs in the host namespace with `nsenter --net` (it keeps the machine's /sys, so its
cgroups work), exactly as `sudo python3 worker/agent.py` runs on a board.
"""
import os
import secrets
import subprocess
import sys

import pytest

from tests.support import ROOT

from tests.support import agents as ah
from dml_app import net
from worker import nodes as nb

pytestmark = pytest.mark.skipif(ah.missing_requirements() is not None,
                                reason=str(ah.missing_requirements()))


def sh(*argv, check=True):
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


@pytest.fixture
def host_and_peer():
    tag = secrets.token_hex(2)
    host, peer, br = f"tph{tag}h", f"tph{tag}p", f"tphbr{tag}"
    subnet = f"10.236.{int(tag, 16) % 250}"
    procs = []
    try:
        sh("ip", "link", "add", br, "type", "bridge")
        sh("ip", "addr", "add", f"{subnet}.1/24", "dev", br)
        sh("ip", "link", "set", br, "up")
        nb._bridge_firewall(br, add=True)
        for i, ns in ((2, host), (3, peer)):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"tph{tag}v{i}", "type", "veth", "peer", "name", "eth1", "netns", ns)
            sh("ip", "link", "set", f"tph{tag}v{i}", "master", br, "up")
            sh("ip", "-n", ns, "addr", "add", f"{subnet}.{i}/24", "dev", "eth1")
            sh("ip", "-n", ns, "link", "set", "eth1", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        procs.append(subprocess.Popen(["ip", "netns", "exec", peer, "iperf3", "-s", "-p", "5201"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        yield {"host": host, "peer": peer, "subnet": subnet, "procs": procs, "tag": tag}
    finally:
        for p in procs:
            nb.stop_group(p, 20)
        for ns in (host, peer):
            sh("ip", "netns", "del", ns, check=False)
        nb._bridge_firewall(br, add=False)
        sh("ip", "link", "del", br, check=False)


def test_physical_node_shaped_on_its_nic(host_and_peer):
    h = host_and_peer
    port, token = ah.free_port(), secrets.token_hex(16)
    agent = subprocess.Popen(["nsenter", f"--net=/run/netns/{h['host']}", sys.executable,
                              str(ROOT / "worker" / "agent.py"), "--port", str(port)],
                             env={**os.environ, net.TOKEN_ENV: token},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    h["procs"].append(agent)
    base = f"{h['subnet']}.2:{port}"
    net.get_json(f"{base}/hi", token=token, retries=60)
    name = f"p{h['tag']}"
    node = {"name": name, "id": 1, "ip": f"{h['subnet']}.2", "port": 4444, "cpu": 0.5, "ram_mb": 128,
            "cmd": ["sleep", "300"], "working_dir": "/tmp", "nic": "eth1"}
    link = {"dest": "peer", "ip": f"{h['subnet']}.3", "port": 5201, "rate_bps": 10_000_000}

    with pytest.raises(net.HttpError) as ei:   # a NIC the host does not have
        net.post_json(f"{base}/physical/deploy", {"nodes": [{**node, "nic": "nope0"}], "links": {}}, token=token)
    assert ei.value.status == 400 and "nope0" in ei.value.message

    ans = net.post_json(f"{base}/physical/deploy", {"nodes": [node], "links": {name: [link]}}, token=token)
    assert ans["nodes"][name]["links"] == 1
    status = net.get_json(f"{base}/status", token=token)["nodes"][name]
    assert status["kind"] == "physical" and status["state"] == "running"
    assert ah.cgroup_limits(name)["cpu_quota_us"] == 50_000

    got = ah.iperf(h["host"], h["peer"], link["ip"], 5201, seconds=3)
    assert abs(got / ah.goodput_ideal(10e6) - 1) < 0.03, got

    net.post_json(f"{base}/physical/reset", {}, token=token)
    qd = sh("tc", "-n", h["host"], "qdisc", "show", "dev", "eth1").stdout
    assert "htb" not in qd, qd
    assert not any(d.exists() for d in ah.cgroup_dirs(name))
    assert name not in net.get_json(f"{base}/status", token=token)["nodes"]
    net.post_json(f"{base}/physical/reset", {}, token=token)   # harmless twice
