"""Docker nodes' lifecycle through a real agent: stop, clear, reset (twice), a failed
deploy, an agent restarted after a crash; and never a container or network that is not
this agent's, even one labelled edgetb or named etb-."""
import contextlib
import os
import signal


import pytest

from tests.support import agents as ah
from tests.support import containers as dt
from dml_app import net
from worker import docker_nodes as dn

pytestmark = dt.need_docker()


@pytest.fixture
def client():
    c = dt.client()
    try:
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def foreign(client, tag: str):
    """What others own: a container and a network named like ours and labelled edgetb,
    but another agent's, and an unlabelled container. Always removed afterwards."""
    other = {"edgetb": "1", "edgetb.agent": f"/run/edgetb/agent-foreign-{tag}", "edgetb.node": f"{tag}f1"}
    made = []
    try:
        made.append(client.networks.create(f"etb-{tag}foreign", driver="bridge", labels=other))
        made.append(client.containers.create(dt.TAG, ["sleep", "infinity"], name=f"etb-{tag}f1",
                                             labels=other, network_mode="none"))
        made.append(client.containers.create(dt.TAG, ["sleep", "infinity"], name=f"{tag}-plain",
                                             network_mode="none"))
        yield made
    finally:
        for obj in reversed(made):
            with contextlib.suppress(Exception):
                obj.remove(force=True) if hasattr(obj, "image") else obj.remove()


def _ns_list() -> set[str]:
    return set(ah.netns_list())


def test_hi_lists_docker(agent):
    assert "docker" in agent.get("/hi")["backends"]


def test_build_route_reuses_the_image_and_checks_its_input(agent):
    res = agent.post("/emulated/build", {"tag": dt.TAG}, timeout_s=1800)   # built already: reused
    assert res["image"] == dt.TAG and res["method"] in ("present", "offline", "dockerfile")
    for bad, why in (({"tag": "Bad Tag"}, "bad image tag"), ({"method": "magic"}, "bad method")):
        r = agent.raw("POST", "/emulated/build", json=bad)
        assert r.status_code == 400 and why in r.json()["error"], r.text
    assert agent.raw("POST", "/emulated/build", token=None, json={}).status_code == 401


def test_stop_clear_reset_and_nothing_of_others(agent, client):
    dep = dt.plan(2, cpu=1, ram_mb=128)
    a, b = dep.names
    dep.links = {a: [ah.link(dep, a, b, 10_000_000)]}
    tag = ah.new_tag()
    with foreign(client, tag) as theirs:
        try:
            answer = dt.deploy(agent, dep)
            assert answer["nodes"][a]["links"] == 1
            assert {dep.ns(a), dep.ns(b)} <= _ns_list()
            st = agent.get("/status")["nodes"]
            assert [st[n]["state"] for n in dep.names] == ["running", "running"]
            assert st[a]["cpuset"] != st[b]["cpuset"] or len(dn.emulator_cores(2)) == 1
            assert client.containers.get(f"etb-{a}").attrs["HostConfig"]["Memory"] == 128 * 2**20

            # stop: containers stop (kept), links stay
            agent.post("/emulated/stop")
            st = agent.get("/status")["nodes"]
            assert [st[n]["state"] for n in dep.names] == ["exited", "exited"]
            assert client.containers.get(f"etb-{a}").status == "exited"
            # clear: links go too; harmless on a stopped container whose eth0 is gone
            assert sorted(agent.post("/emulated/clear")["cleared"]) == sorted(dep.names)
            assert agent.get("/status")["nodes"][a]["links"] == 0

            assert sorted(agent.post("/emulated/reset")["removed"]) == sorted(dep.names)
            dt.assert_clean(dep)
            assert agent.post("/emulated/reset") == {"removed": []}      # twice is harmless
            assert not ({dep.ns(a), dep.ns(b)} & _ns_list())
            # others' objects are all still there
            for obj in theirs:
                obj.reload()
            assert client.containers.get(f"etb-{tag}f1").labels["edgetb"] == "1"
        finally:
            with contextlib.suppress(net.HttpError):
                agent.post("/emulated/reset")
    dt.assert_clean(dep)


def test_failed_deploy_leaves_nothing(agent):
    dep = dt.plan(2)
    dep.nodes[1]["image"] = "edgetb-no-such-image:never"
    try:
        with pytest.raises(net.HttpError) as err:
            dt.deploy(agent, dep)
        assert err.value.status == 422 and "no image edgetb-no-such-image:never" in err.value.message
        dep.nodes[1]["image"] = ""
        with pytest.raises(net.HttpError) as err:
            dt.deploy(agent, dep)
        assert err.value.status == 400 and "need an image" in err.value.message
    finally:
        with contextlib.suppress(net.HttpError):
            agent.post("/emulated/reset")
    dt.assert_clean(dep)


def test_restarted_agent_removes_what_a_crashed_one_left():
    dep = dt.plan(2)
    port = ah.free_port()
    try:
        with ah.running_agent(port=port) as first:
            dt.deploy(first, dep)
            assert {dep.ns(n) for n in dep.names} <= _ns_list()
            os.killpg(first.proc.pid, signal.SIGKILL)      # a crash: no reset
            first.proc.wait(10)
            assert dt.docker_leftovers(dep)["containers"], "the containers should outlive the agent"
        with ah.running_agent(port=port) as second:        # recovers from the state file at start
            assert second.get("/status")["nodes"] == {}
            dt.assert_clean(dep)
            assert not (second.state_dir / "state.json").exists()
    finally:
        c = dt.client()     # whatever happened: nothing of this test survives it
        try:
            dn.sweep(c, f"/run/edgetb/agent-{port}")
        finally:
            c.close()
    dt.assert_clean(dep)
