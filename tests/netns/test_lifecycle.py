"""Deploy, check and reset netns nodes through a real agent; failed deploys leave nothing."""
import os
import signal
import subprocess


import pytest

from tests.support import agents as ah
from dml_app import net

pytestmark = ah.need_root()

APP_PORT = 4455
# A plain TCP server is enough to prove reachability (and cheap under a memory limit).
HTTP_APP = ["python3", "-m", "http.server", str(APP_PORT), "--bind", "0.0.0.0"]


def _http_nodes(n, **kw):
    dep = ah.plan(n, cmd=HTTP_APP, port=APP_PORT, **kw)
    for i, node in enumerate(dep.nodes):   # different limits per node, to see each applied
        node["cpu"] = [0.25, 0.5, 1.0, 1.5, 2.0][i % 5]
        node["ram_mb"] = 64 + 32 * i
    return dep


def _wait_in_cgroup(name, timeout_s=20):
    import time
    deadline = time.monotonic() + timeout_s
    while True:
        lim = ah.cgroup_limits(name)
        if lim["pids"]:
            return lim
        assert time.monotonic() < deadline, f"{name}: app never joined its cgroup"
        time.sleep(0.05)


def _ns_list():
    return ah.netns_list()


def test_five_nodes_deploy_reach_limits_and_reset(clean_agent):
    agent = clean_agent
    dep = _http_nodes(5)
    answer = ah.deploy(agent, dep)
    assert answer == {"nodes": {n: {"links": 0} for n in dep.names}}

    nets = _ns_list()
    for n in dep.names:
        assert dep.ns(n) in nets
        addr = ah.ns_run(dep.ns(n), ["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
        assert f" {dep.ip(n)}/24 " in addr

    for n in dep.names:
        lim = _wait_in_cgroup(n)
        node = dep.node(n)
        assert lim["cpu_period_us"] == 100_000
        assert lim["cpu_quota_us"] == int(node["cpu"] * 100_000)
        assert lim["memory_bytes"] == node["ram_mb"] * 1024 * 1024

    for n in dep.names:                      # every node reaches every other
        others = [dep.ip(m) for m in dep.names if m != n]
        assert ah.unreachable_from(dep.ns(n), others, APP_PORT, timeout_s=20) == []

    st = agent.get("/status")["nodes"]
    assert {n: st[n]["state"] for n in dep.names} == {n: "running" for n in dep.names}
    # the agent adds its FORWARD accept rule whenever iptables is there (br_netfilter may
    # be loaded later, by Docker), and cannot without it
    have_iptables = ah.shutil.which("iptables") is not None
    assert bool(ah.leftovers(dep)["iptables"]) == have_iptables, \
        f"iptables {'present' if have_iptables else 'absent'}, rules: {ah.leftovers(dep)['iptables']}"

    dep.record_pids()
    assert dep.pids, "no process seen inside the nodes' namespaces"
    removed = agent.post("/emulated/reset")
    assert sorted(removed["removed"]) == sorted(dep.names)
    ah.assert_clean(dep)
    assert agent.get("/status")["nodes"] == {}

    again = agent.post("/emulated/reset")     # a second reset is harmless
    assert again == {"removed": []}
    ah.assert_clean(dep)
    assert agent.get("/hi")["backends"]


def test_redeploy_after_reset_reuses_names(clean_agent):
    dep = _http_nodes(2)
    ah.deploy(clean_agent, dep)
    clean_agent.post("/emulated/reset")
    ah.assert_clean(dep)
    ah.deploy(clean_agent, dep)              # same names, ids and subnet again
    assert ah.unreachable_from(dep.ns(dep.names[0]), [dep.ip(dep.names[1])], APP_PORT, timeout_s=20) == []


def test_deploy_naming_a_deployed_node_is_refused_and_changes_nothing(clean_agent):
    agent = clean_agent
    first = _http_nodes(2)
    ah.deploy(agent, first)
    second = _http_nodes(2)
    second.nodes[1]["name"] = first.names[0]          # exists already
    with pytest.raises(net.HttpError) as e:
        ah.deploy(agent, second)
    assert e.value.status == 400 and first.names[0] in e.value.message
    new_only = ah.plan(0)
    new_only.nodes, new_only.bridge = [second.nodes[0]], second.bridge
    ah.assert_clean(new_only)                          # nothing of the refused request
    st = agent.get("/status")["nodes"]
    assert set(st) == set(first.names) and all(s["state"] == "running" for s in st.values())
    assert ah.unreachable_from(first.ns(first.names[1]), [first.ip(first.names[0])], APP_PORT,
                               timeout_s=20) == []


def test_deploy_failing_at_tc_time_leaves_nothing_half_deployed(clean_agent):
    """Two links to one ip:port pass validation but fail when the table is built: by then
    namespaces, veths, the bridge and its firewall rule exist, and must all go."""
    dep = _http_nodes(3)
    a, b, c = dep.names
    dep.links = {a: [ah.link(dep, a, b, 10_000_000), ah.link(dep, a, b, 20_000_000)]}
    with pytest.raises(net.HttpError) as e:
        ah.deploy(clean_agent, dep)
    assert e.value.status in (400, 422) and b in e.value.message
    ah.assert_clean(dep)
    assert clean_agent.get("/status")["nodes"] == {}


def test_taken_veth_name_is_refused_and_the_other_link_is_not_touched(clean_agent):
    """A host link already named like a node's veth (another agent's node, say) makes the
    deploy fail, and the rollback must not delete that link."""
    dep = _http_nodes(2)
    stray = ah.nb.veth_name(dep.names[1])
    subprocess.run(["ip", "link", "add", stray, "type", "veth", "peer", "name", stray + "p"], check=True)
    try:
        with pytest.raises(net.HttpError) as e:
            ah.deploy(clean_agent, dep)
        assert e.value.status == 422 and stray in e.value.message
        assert ah.nb.link_exists(stray), "the rollback deleted a link it did not make"
        left = ah.leftovers(dep)
        left["links"] = [x for x in left["links"] if x != stray]
        assert not any(left.values()), left
    finally:
        subprocess.run(["ip", "link", "del", stray], capture_output=True)


def test_existing_namespace_is_refused_and_kept(clean_agent):
    dep = _http_nodes(2)
    ns = dep.ns(dep.names[1])
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with pytest.raises(net.HttpError) as e:
            ah.deploy(clean_agent, dep)
        assert e.value.status == 422 and "already exists" in e.value.message
        assert ns in _ns_list(), "the rollback deleted a namespace it did not make"
        left = ah.leftovers(dep)
        left["namespaces"] = [x for x in left["namespaces"] if x != ns]
        assert not any(left.values()), left
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_sigterm_to_the_agent_removes_its_nodes():
    with ah.running_agent() as agent:
        dep = _http_nodes(2)
        ah.deploy(agent, dep)
        _wait_in_cgroup(dep.names[0])
        dep.record_pids()
        os.killpg(agent.proc.pid, signal.SIGTERM)
        agent.proc.wait(60)
        ah.assert_clean(dep)
