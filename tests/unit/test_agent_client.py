"""The controller's agent client answers the same in process as over HTTP: the same
answers, the same HttpError status and message for a refused request, a deadline, and a
registry that says which worker has which node. Pure: a stand-in agent, no root."""
import threading

import pytest

from controller import agents
from dml_app import net
from worker.agent import BadRequest, NotFound, make_app

TOKEN = "agent-client-token"


class StandIn:
    """The part of worker.agent.Agent the routes used here call."""

    def __init__(self):
        self.name, self.token = "stand-in", TOKEN
        self.release = threading.Event()
        self.release.set()

    def status(self):
        self.release.wait(10)
        return {"nodes": {"n1": {"state": "running", "ready": True}}}

    def node_fault(self, body):
        if body.get("node") != "n1":
            raise NotFound(f"no node {body.get('node')!r} here")
        if body.get("action") == "explode":
            raise RuntimeError("the stand-in broke")
        return {"state": "paused"}

    def link_fault(self, body):
        raise BadRequest("action: 'sideways' is not one of down, up")

    def reset(self, kind):
        return {"removed": [kind]}


@pytest.fixture
def pair():
    """(the stand-in, a LocalAgent and an HttpAgent to the same stand-in)."""
    agent = StandIn()
    app = make_app(agent)
    srv = net.serve(app, "127.0.0.1", 0, threads=4)
    local_app = make_app(agent)
    local_app.config["PROPAGATE_EXCEPTIONS"] = True
    try:
        yield (agent,
               agents.LocalAgent("emulator e1", "emulated", f"127.0.0.1:{srv.port}", TOKEN, lambda: local_app),
               agents.HttpAgent("emulator e1", "emulated", f"127.0.0.1:{srv.port}", TOKEN))
    finally:
        agent.release.set()
        srv.close()


def test_both_give_the_same_answers(pair):
    _, local, http = pair
    for client in (local, http):
        assert client.status()["nodes"]["n1"]["ready"] is True
        assert client.node_fault("n1", "pause") == {"state": "paused"}
        assert client.reset() == {"removed": ["emulated"]}


def test_both_refuse_the_same_way(pair):
    _, local, http = pair
    got = []
    for client in (local, http):
        with pytest.raises(net.HttpError) as missing:
            client.node_fault("n9", "kill")
        with pytest.raises(net.HttpError) as bad:
            client.link_fault("n1", "n2", "sideways")
        got.append((missing.value.status, missing.value.message, bad.value.status, bad.value.message,
                    missing.value.url))
    assert got[0] == got[1], got
    assert got[0][0] == 404 and "no node 'n9' here" in got[0][1]
    assert got[0][2] == 400 and "sideways" in got[0][3]


def test_in_process_names_an_unexpected_error(pair):
    _, local, _ = pair
    with pytest.raises(net.HttpError) as ei:
        local.node_fault("n1", "explode")
    assert ei.value.status == 500 and ei.value.message == "RuntimeError: the stand-in broke"


def test_in_process_keeps_the_deadline(pair):
    agent, local, _ = pair
    agent.release.clear()
    with pytest.raises(net.HttpError) as ei:
        local.status(timeout_s=0.3)
    assert ei.value.status is None and "no answer within 0.3 s" in ei.value.message


def test_the_registry_says_which_worker_has_which_node():
    w1 = agents.HttpAgent("emulator e1", "emulated", "10.0.0.1:3334", TOKEN)
    w2 = agents.HttpAgent("physical 10.0.0.2:3333", "physical", "10.0.0.2:3333", TOKEN)
    reg = agents.Agents(lambda: [w1, w2])
    assert reg.workers("physical") == [w2] and reg.of("n1") is None and reg.deployed() == []
    reg.record(w1, {"nodes": {"n1": {"links": 1}, "n2": {"links": 0}}})
    reg.record(w2, {"nodes": {"p1": {"links": 0}}})
    assert reg.of("n2") is w1 and reg.of("p1") is w2 and reg.nodes_of(w1) == ["n1", "n2"]
    assert reg.answers()["physical 10.0.0.2:3333"] == {"addr": "10.0.0.2:3333", "kind": "physical",
                                                        "answer": {"nodes": {"p1": {"links": 0}}}}
    reg.forget("emulated")
    assert reg.deployed() == [w2] and reg.of("n1") is None
