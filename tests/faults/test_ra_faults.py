"""Ring all-reduce survives dead members: a member that dies ends the step at
once (its port refuses) or by the step deadline; the survivors re-form the ring in the
same order without it and redo the round's all-reduce from their trained models, so
every survivor ends the round with the mean of the survivors' models; the controller
records who took part and who was missing (summary.json "participants").

* ra_peer's /ra/reform and its successor rules, in-process (what is refused changes
  nothing);
* five real ra_peer processes on netns nodes, the real RaManager and auto.drive: one
  node SIGKILLed (Manager.node_fault, the agent's cgroup kill) in the middle of round 1's
  reduce-scatter, another right after round 2's /ra/train. Every node starts from
  different known weights (init per_rank) and skips training (epoch 0), so the mean of
  the survivors is known exactly;
* on loopback, three nodes of which two die: the run fails in bounded time, saying so.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import torch

from tests.support.procs import TOKEN, wait_until
from tests.support.workflow import run_workflow
from tests.support.peers import loopback_run, netns_run, ra_node, tiny_dataset
from dml_app import net
from dml_app import peer_role
from controller.ra_run import RaManager, RingAllReduce

HDR = {net.TOKEN_HEADER: TOKEN}
SEED = 3


# ----------------------------------------------------------------------------- routes in-process

# rz2 sends to rz3 (its next_name); the home ring is rz1 -> rz2 -> rz3 -> rz4
CONF = {"epoch": 0, "sync": 2, "next_name": "rz3", "connect": {"rz3": "127.0.0.1:9", "rz1": "127.0.0.1:8"}}
HOME = ["rz1", "rz2", "rz3", "rz4"]


@pytest.fixture
def node(scratch):
    with ra_node(scratch, "rz2") as it:
        yield it


def post(client, path, body):
    return client.post(path, json=body, headers=HDR)


def wait_state(rt, state, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while rt.state != state:
        assert rt.state != "error" and time.monotonic() < deadline, rt.state
        time.sleep(0.02)


def test_reform_and_successor_rules(node):
    rt, peer, client = node
    for path, body in (("/conf/structure", CONF), ("/conf/dataset", {"train_len": 1, "test_len": 1})):
        assert post(client, path, body).status_code == 200
    assert client.get("/start", headers=HDR).status_code == 200
    wait_state(rt, "ready")
    without3 = ["rz1", "rz2", "rz4"]          # rz3 lost: rz2 now sends to rz4, not in its connect
    for body, message in (
            ({"ring": without3, "home": HOME}, "'successor' must give it as 'ip:port'"),
            ({"ring": without3, "home": HOME, "successor": {"name": "rz1", "address": "127.0.0.1:7"}},
             "'successor' must be"),
            ({"ring": without3, "home": HOME, "successor": {"name": "rz4", "address": "rz4; rm -rf"}},
             "as 'ip:port'"),
            ({"ring": ["rz2", "rz1", "rz4"], "home": HOME}, "is not the ring rz1 -> rz2 -> rz3 -> rz4"),
            ({"ring": without3, "home": ["rz1", "rz2", "rz4", "rz3"]}, "sends from rz2 to rz4, but its next_name"),
            ({"ring": ["rz1", "rz3"], "home": HOME}, "'ring' does not hold this node"),
            ({"ring": ["rz2", "rz3", "rz5"], "home": HOME}, "is not the ring"),
            # connect knows rz1: an address that differs from it is refused
            ({"ring": ["rz1", "rz2"], "home": HOME, "successor": {"name": "rz1", "address": "127.0.0.1:7"}},
             "but 'connect' has 127.0.0.1:8")):
        r = post(client, "/ra/train", {"round": 1, **body})
        assert r.status_code == 400 and message in r.get_data(as_text=True), (body, r.get_data(as_text=True))
    assert rt.state == "ready"                                    # nothing changed
    ok = {"round": 1, "ring": without3, "home": HOME, "successor": {"name": "rz4", "address": "127.0.0.1:6"}}
    assert post(client, "/ra/train", ok).status_code == 200
    wait_state(rt, "trained")
    assert peer.successor == ("rz4", "127.0.0.1:6") and (peer.ar.rank, peer.ar.size) == (1, 3)
    trained = peer.trained.clone()

    # a chunk of attempt 0 is applied (rank 1 receives chunk 0 at reduce step 0) ...
    n = peer.ar.bounds[0][1]
    chunk = net.pack_weights({"chunk": torch.ones(n)}, {"round": 1, "phase": "reduce", "step": 0, "index": 0,
                                                        "name": "rz1", "attempt": 0})
    hdr = {**HDR, "Content-Type": "application/octet-stream"}
    assert client.post("/ra/chunk", data=chunk, headers=hdr).status_code == 200
    assert not torch.equal(peer.ar.vector, trained)
    # ... then rz4 is lost too: the ring re-forms as rz1 -> rz2, from the trained vector
    for body, status, message in (
            ({"round": 1, "attempt": 0, "ring": ["rz1", "rz2"]}, 400, "'attempt'"),
            ({"round": 2, "attempt": 1, "ring": ["rz1", "rz2"]}, 409, "cannot re-form the ring for round 2"),
            ({"round": 1, "attempt": 1, "ring": ["rz1", "rz2", "rz3"]}, 400, "is not the ring rz1 -> rz2 -> rz4"),
            ({"round": 1, "attempt": 1, "ring": ["rz2", "rz4"]}, 400, "'successor' must give it")):
        r = post(client, "/ra/reform", body)
        assert r.status_code == status and message in r.get_data(as_text=True), (body, r.get_data(as_text=True))
    assert peer.attempt == 0 and peer.ar.size == 3
    r = post(client, "/ra/reform", {"round": 1, "attempt": 1, "ring": ["rz1", "rz2"]})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert (peer.attempt, peer.ar.rank, peer.ar.size, peer.successor) == (1, 1, 2, ("rz1", "127.0.0.1:8"))
    assert torch.equal(peer.ar.vector, trained)                  # the partial sum is gone
    assert rt.state == "trained"
    assert post(client, "/ra/reform", {"round": 1, "attempt": 1, "ring": ["rz1", "rz2"]}).status_code == 409
    # a late chunk or step of the old attempt is refused and changes nothing
    r = client.post("/ra/chunk", data=chunk, headers=hdr)
    assert r.status_code == 409 and "too late" in r.get_data(as_text=True)
    r = post(client, "/ra/step", {"round": 1, "phase": "reduce", "step": 0, "attempt": 0})
    assert r.status_code == 409 and "attempt 1, not 0" in r.get_data(as_text=True)
    assert post(client, "/ra/step", {"round": 1, "phase": "reduce", "step": 0, "attempt": 1,
                                     "timeout_s": float("nan")}).status_code == 400
    assert torch.equal(peer.ar.vector, trained) and peer.ar.sent == {"reduce": 0, "gather": 0}
    # rz1 is not listening (127.0.0.1:8): the step says the successor is dead (refused, no wait)
    r = post(client, "/ra/step", {"round": 1, "phase": "reduce", "step": 0, "attempt": 1, "timeout_s": 5})
    assert r.status_code == 502
    said = r.get_json()
    assert said["successor"] == "rz1" and said["why"] == "dead", said


# ----------------------------------------------------------------------------- a real ring, members killed

NAMES = ["f1", "f2", "f3", "f4", "f5"]
NODE_LIST = ["f1", "f5", "f4", "f3", "f2"]     # EdgeTB's rule: the ring runs f1 -> f2 -> f3 -> f4 -> f5
LINKS = {n: [{"dest": NAMES[(i + 1) % 5], "bw": "100mbit"}] for i, n in enumerate(NAMES)}
SYNC = 3


class FaultyRing(RingAllReduce):
    """The ring all-reduce driver putting a fault on a node (Run.node_fault, through its
    agent: kill, pause, resume) at given points of the run: plan {key: (action, node)} with
    key (round, phase, step) before that step, (round, "trained") right after the round's
    /ra/train calls were answered, (round, "evaluate") before its /ra/evaluate calls."""

    def __init__(self):
        super().__init__()
        self.plan: dict = {}
        self.done: list[tuple] = []
        self.states: dict[str, str] = {}       # each node's state when its fault came

    def _fault(self, key) -> None:
        action, node = self.plan.pop(key, (None, None))
        if action:
            if action != "resume":        # a paused node answers nothing
                n = self.run.tb.all_nodes()[node]
                self.states[node] = net.get_json(f"{n.ip}:{n.port}/stats", token=self.run.tb.node_token(node),
                                                 timeout_s=10)["state"]
            out = self.run.node_fault(node, action)
            self.done.append((key, action, node, out["ok"], out["detail"]))

    def _step(self, ring, r, attempt, phase, step):
        self._fault((r, phase, step))
        return super()._step(ring, r, attempt, phase, step)

    def _post(self, names, path, body, timeout_s, missing, r):
        if path == "/ra/evaluate":
            self._fault((r, "evaluate"))
        out = super()._post(names, path, body, timeout_s, missing, r)
        if path == "/ra/train":
            self._fault((r, "trained"))
        return out


class FaultyRa(RaManager):
    algorithm_class = FaultyRing


@pytest.fixture
def faulty_ring(tmp_path):
    with netns_run(FaultyRa, "ra_peer", NAMES, tmp_path, links=LINKS, port=3452,
                   subnet="10.247.16.0/24", emulator="emu-raf") as (tb, manager):
        yield tb, manager, tmp_path


@pytest.mark.root
@pytest.mark.timeout(240)
def test_survivors_reform_the_ring_and_hold_their_exact_mean(faulty_ring, capsys):
    tb, manager, tmp = faulty_ring
    plan = {(1, "reduce", 1): ("kill", "f3"), (2, "trained"): ("kill", "f5"),
            # frozen mid all-gather: it answers nothing until the step deadline; resumed
            # before the evaluation, its late chunk (of the old attempt) is refused
            (3, "gather", 1): ("pause", "f4"), (3, "evaluate"): ("resume", "f4")}
    manager.algo.plan = dict(plan)
    t0 = time.monotonic()
    summary = run_workflow(tb, manager, tmp, alg="ra", root=None, timeout_s=150,
                           structure={"sync": SYNC, "seed": SEED, "init": "per_rank", "step_timeout_s": 20,
                                      "node_list": [{"name": n, "epoch": 0} for n in NODE_LIST]},
                           dataset={n: {"train_len": 1, "test_len": 1, "batch_size": 32} for n in NAMES})
    wall = time.monotonic() - t0
    out = capsys.readouterr().out
    assert [(k, a, n, ok) for k, a, n, ok, _ in manager.algo.done] == [(k, *v, True) for k, v in plan.items()], manager.algo.done
    # f5 is killed once the controller saw round 2's training done; its own /stats may
    # still say training for a moment (the state is the node's, read just before the kill)
    assert {n: s for n, s in manager.algo.states.items() if n != "f5"} == {"f3": "reducing", "f4": "gathering"}
    assert manager.algo.states["f5"] in ("training", "trained"), manager.algo.states
    assert "error" not in summary, summary["error"]
    # a dead port refuses at once (dead, below); the frozen node cost one step deadline
    # (4 x the slowest step seen + 5 s), below the 20 s cap: the slowest step only grows,
    # so the deadline in force at the end bounds the one f4 was given
    assert manager.algo.slowest_step is not None and manager.algo.step_deadline() < manager.algo.step_cap_s, \
        (manager.algo.slowest_step, manager.algo.step_deadline(), manager.algo.step_cap_s)
    reformed = [line for line in out.splitlines() if "ring re-formed" in line]
    assert reformed == [
        "controller: round 1: ring re-formed without f3 (dead): f1 -> f2 -> f4 -> f5 -> f1 (attempt 2)",
        "controller: round 2: ring re-formed without f3 (dead), f5 (dead): f1 -> f2 -> f4 -> f1 (attempt 2)",
        "controller: round 3: ring re-formed without f3 (dead), f4 (timeout), f5 (dead): f1 -> f2 -> f1 "
        "(attempt 2)"], out
    parts = [p for p in summary["participants"] if p["node"] == "controller"]
    assert [(p["round"], p["participants"], p["missing"], p["attempts"]) for p in parts] == [
        (1, ["f1", "f2", "f4", "f5"], {"f3": "dead"}, 2),
        (2, ["f1", "f2", "f4"], {"f3": "dead", "f5": "dead"}, 2),
        (3, ["f1", "f2"], {"f3": "dead", "f5": "dead", "f4": "timeout"}, 2)], parts
    assert all(p["ring"] == p["participants"] for p in parts)
    assert summary["missing_nodes"] == {
        "f3": {"first_round": 1, "last_round": 3, "why": "dead", "rounds_missed": 3},
        "f4": {"first_round": 3, "last_round": 3, "why": "timeout", "rounds_missed": 1},
        "f5": {"first_round": 2, "last_round": 3, "why": "dead", "rounds_missed": 2}}, summary["missing_nodes"]
    saved = json.loads((tmp / "runs").glob("*-ra/summary.json").__next__().read_text())
    assert saved["participants"] == summary["participants"] and saved["rounds"] == SYNC

    # every survivor holds the mean of round 1's survivors' models (f1, f2, f4, f5: per_rank
    # seeds SEED + their index in node_list); rounds 2 and 3 averaged identical models
    meta = json.loads((tmp / "dataset" / "meta.json").read_text())
    rank = {n: i for i, n in enumerate(NODE_LIST)}
    initial = {n: peer_role.initial_model(meta, SEED + rank[n]).state_dict() for n in ("f1", "f2", "f4", "f5")}
    mean = {k: sum(m[k].double() for m in initial.values()) / 4 for k in initial["f1"]}
    nodes = tb.all_nodes()
    got = {}
    for n in ("f1", "f2"):
        node = nodes[n]
        body = net.call("GET", f"{node.ip}:{node.port}/ra/weights", token=tb.node_token(n), timeout_s=30).content
        got[n], info = net.unpack_weights(body)
        assert info == {"name": n, "round": SYNC}
        err = max(float((got[n][k].double() - mean[k]).abs().max()) for k in mean)
        assert err <= 1e-6, f"{n}: max abs error {err}"
        assert all(torch.equal(got[n][k], got["f1"][k]) for k in mean)   # the same bytes everywhere
    # and not the mean with f3's model in it (which the partial sums of attempt 1 held)
    f3 = peer_role.initial_model(meta, SEED + rank["f3"]).state_dict()
    with_f3 = {k: (mean[k] * 4 + f3[k].double()) / 5 for k in mean}
    assert max(float((got["f1"][k].double() - with_f3[k]).abs().max()) for k in mean) > 0.01
    logs = {n: (tmp / "runs").glob(f"*-ra/{n}.log").__next__().read_text() for n in ("f1", "f2", "f4")}
    evaluated = {n: re.findall(r"Aggregate: accuracy=\d\.\d{4}, round=(\d),", log) for n, log in logs.items()}
    assert evaluated == {"f1": ["1", "2", "3"], "f2": ["1", "2", "3"], "f4": ["1", "2"]}, evaluated
    # f4, resumed, still sent its chunk of round 3's first attempt: f1 refused it (f4's log
    # read live: it may have got there after the logs were collected)
    f4 = nodes["f4"]
    wait_until(lambda: re.search(r"round 3: gather step 1: chunk \d to f1 failed \(refused\)",
                                 net.call("GET", f"{f4.ip}:{f4.port}/log", token=tb.node_token("f4"), timeout_s=10).text),
               20, "f4's late chunk to be refused")
    assert set(summary["logs_missing"]) == {"f3", "f5"}
    print(f"\nring of 5, f3 killed mid reduce-scatter, f5 after round 2's training, f4 frozen mid all-gather "
          f"of round 3: {SYNC} rounds in {wall:.1f} s\n" + "\n".join(reformed))


@pytest.fixture
def training_ring(tmp_path):
    names = ["g1", "g2", "g3", "g4"]
    links = {n: [{"dest": names[(i + 1) % 4], "bw": "50mbit"}] for i, n in enumerate(names)}
    with netns_run(FaultyRa, "ra_peer", names, tmp_path, links=links, port=3456,
                   subnet="10.247.20.0/24", emulator="emu-rat") as (tb, manager):
        yield tb, manager, tmp_path


@pytest.mark.root
@pytest.mark.timeout(240)
def test_a_member_killed_while_training_is_left_out_of_that_rounds_mean(training_ring, capsys):
    """Real training (LeNet-5 on the MNIST subset); g3 SIGKILLed while it trains round 2.
    The three others' all-reduce of round 2 and round 3 goes on without it: the same
    model everywhere after each round."""
    tb, manager, tmp = training_ring
    manager.algo.plan = {(2, "trained"): ("kill", "g3")}
    t0 = time.monotonic()
    summary = run_workflow(tb, manager, tmp, alg="ra", root=None, timeout_s=150,
                           structure={"sync": 3, "node_list": [{"name": n, "epoch": 1} for n in ("g1", "g4", "g3", "g2")]},
                           dataset={n: {"train_len": 4, "train_start_index": 1 + 4 * i, "test_len": 2,
                                        "test_start_index": 1, "batch_size": 32} for i, n in enumerate(["g1", "g2", "g3", "g4"])})
    wall = time.monotonic() - t0
    out = capsys.readouterr().out
    assert [(k, a, n, ok) for k, a, n, ok, _ in manager.algo.done] == [((2, "trained"), "kill", "g3", True)], manager.algo.done
    assert manager.algo.states["g3"] in ("training", "trained") and len(manager.algo.states) == 1, manager.algo.states
    assert "error" not in summary, summary["error"]
    assert "controller: g3 lost during round 2's training (dead); the ring goes on without it" in out, out
    assert "controller: round 2: ring re-formed without g3 (dead): g1 -> g2 -> g4 -> g1 (attempt 2)" in out, out
    parts = [(p["round"], p["participants"], p["missing"], p["attempts"]) for p in summary["participants"]]
    assert parts == [(1, ["g1", "g2", "g3", "g4"], {}, 1), (2, ["g1", "g2", "g4"], {"g3": "dead"}, 2),
                     (3, ["g1", "g2", "g4"], {"g3": "dead"}, 1)], parts
    nodes = tb.all_nodes()
    weights = [net.unpack_weights(net.call("GET", f"{nodes[n].ip}:{nodes[n].port}/ra/weights",
                                           token=tb.node_token(n), timeout_s=30).content)[0] for n in ("g1", "g2", "g4")]
    assert all(torch.equal(w[k], weights[0][k]) for w in weights[1:] for k in weights[0])
    accs = {}
    for n in ("g1", "g2", "g4"):
        log = (tmp / "runs").glob(f"*-ra/{n}.log").__next__().read_text()
        accs[n] = re.findall(r"Aggregate: accuracy=(\d\.\d{4}), round=(\d),", log)
        assert len(re.findall(r"Train: loss=", log)) == 3
    assert accs["g1"] == accs["g2"] == accs["g4"] and [r for _, r in accs["g1"]] == ["1", "2", "3"], accs
    print(f"\nring of 4 training, g3 killed while training round 2: 3 rounds in {wall:.1f} s, accuracy "
          f"{[a for a, _ in accs['g1']]}")


# ----------------------------------------------------------------------------- too few left

class LoopbackKillingRing(RingAllReduce):
    """Before round 1's first reduce step, SIGKILL the process groups of `victims`."""

    victims: list = []
    procs: dict = {}

    def _step(self, ring, r, attempt, phase, step):
        while self.victims:
            p = self.procs[self.victims.pop()].proc
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        return super()._step(ring, r, attempt, phase, step)


class LoopbackKillingRa(RaManager):
    algorithm_class = LoopbackKillingRing


@pytest.mark.timeout(120)
def test_a_ring_with_fewer_than_two_left_fails_clearly(scratch):
    data = tiny_dataset(scratch / "dataset", num_classes=10)
    names = ["fx1", "fx2", "fx3"]
    with loopback_run(LoopbackKillingRa, "ra_peer", names, scratch, data) as (manager, procs):
        manager.algo.procs, manager.algo.victims = procs, ["fx2", "fx3"]
        (scratch / "links.json").write_text(json.dumps({n: [{"dest": names[i - 1], "bw": "1gbit"}]
                                                        for i, n in enumerate(names)}))
        t0 = time.monotonic()
        summary = run_workflow(manager.tb, manager, scratch, alg="ra", root=None, timeout_s=90,
                               structure={"sync": 3, "node_list": [{"name": n, "epoch": 0} for n in names]},
                               dataset={n: {"train_len": 1, "test_len": 1, "batch_size": 4} for n in names})
        wall = time.monotonic() - t0
    assert summary["error"].startswith("round 1: ring all-reduce needs 2 or more members, but only fx1 of "
                                       "fx1, fx3, fx2 is left (lost: fx3 (dead), fx2 (dead))"), summary["error"]
    assert summary["participants"][-1] == {"node": "controller", "round": 1, "participants": [],
                                           "missing": {"fx3": "dead", "fx2": "dead"}, "ring": []}
    print(f"\nring of 3, two killed in round 1: failed in {wall:.1f} s")
