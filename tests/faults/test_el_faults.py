"""E-tree learning tolerates failing nodes at every aggregator.

Seven real el_peer processes on netns nodes, driven as `el_run.py --auto` drives them
(controller/auto.py's drive), a 3-layer tree:

    h1 (layer 3, the top; evaluates)
    +- h2 (layer 2) -- h4, h5, h6 (trainers; h2 reaches h6 only through h5, `forward`)
    +- h3 (layer 2) -- h3, h7    (trainers; h3 trains too, its own child)

and a real SIGKILL to a node's cgroup mid-run (Manager.node_fault(name, "kill")) once
the top has aggregated round 2:

(a) trainer h6, behind the relay h5: every top round completes; from the kill on h2's
    participants events say h6 is missing as dead (the relay h5 answers 502 for it);
    the top's accuracy stays within ACC_TOLERANCE of the same run without the fault;
(b) the middle aggregator h3: its subtree is reported at the top (layer 3) as h3 dead,
    and the run completes on h2's subtree;
(c) the trainer h5, which is also the relay to h6: h2 is left with 1 of 3 children
    (min_fraction 0.5 needs 2), tries the round again once (round_retries 1), then
    fails; the run ends at once with h2's message naming h5 and h6 as dead;
(d) h6 killed, then restarted: asked again every round, it takes part again.

And, in-process: min_fraction and round_retries are checked per layer and passed through
by the conf tool; a relay whose next hop is dead answers 502, one whose next hop does not
answer 504 within its share of the sender's wait, for messages and probes alike.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.support import agents as ah
from tests.support.procs import TOKEN, free_port, wait_until
from tests.support.workflow import netns_testbed, run_workflow
from tests.support.peers import node_addrs, tiny_dataset

from dml_app import el_peer
from dml_tool import el_structure_conf
from controller.el_run import ElManager
from dml_app import net
from dml_app.runtime import DEAD, REFUSED, TIMEOUT, Reply, Runtime

NAMES = [f"h{i}" for i in range(1, 8)]
TRAINERS = ["h3", "h4", "h5", "h6", "h7"]
SYNC = 5                   # the top's rounds; each middle aggregator runs 1 round per top round
KILL_AFTER = 2             # the kill comes once the top has aggregated this round
ACC_TOLERANCE = 0.05       # the top's final accuracy, one trainer of five lost, vs no fault (measured: see the report)
PORT, SUBNET = 3436, "10.234.0.0/24"   # the controller; its embedded agent takes PORT + 1


def _links() -> dict:
    pairs = [("h1", "h2"), ("h1", "h3"), ("h2", "h4"), ("h2", "h5"), ("h5", "h6"), ("h3", "h7")]
    links: dict = {n: [] for n in NAMES}
    for a, b in pairs:
        links[a].append({"dest": b, "bw": "40mbit"})
        links[b].append({"dest": a, "bw": "40mbit"})
    return links


def _structure(h1: dict | None = None, h2: dict | None = None) -> dict:
    return {"node_list": [
        {"name": "h1", "layer": 3, "sync": SYNC, "child_num": 2, "round_timeout_s": 60, "seed": 1, **(h1 or {})},
        {"name": "h2", "layer": 2, "sync": 1, "child_num": 3, "round_timeout_s": 30, **(h2 or {})},
        {"name": "h3", "layer": 2, "sync": 1, "child_num": 2, "round_timeout_s": 30},
        *({"name": n, "layer": 1, "epoch": 1} for n in ("h4", "h5", "h6", "h3", "h7"))]}


# h2 only aggregates: a test part, for it needs a dataset conf like every node
DATASET = {"defaults": {"batch_size": 32}, "h1": {"test_len": 10, "test_start_index": 1},
           "h2": {"test_len": 1, "test_start_index": 1},
           **{n: {"train_len": 8, "train_start_index": 1 + 8 * i} for i, n in enumerate(TRAINERS)}}


def _metrics(tb, name: str) -> list[dict] | None:
    """A live node's metrics records (None when its app is gone)."""
    node = tb.all_nodes()[name]
    try:
        text = net.call("GET", f"{node.ip}:{node.port}/metrics", token=tb.node_token(name), timeout_s=10).text
    except net.HttpError:
        return None
    return [json.loads(l) for l in text.splitlines() if l.strip()]


def _log(tb, name: str) -> str:
    node = tb.all_nodes()[name]
    return net.call("GET", f"{node.ip}:{node.port}/log", token=tb.node_token(name), timeout_s=10).text


def _run(tmp: Path, tag: str, *, victim: str | None = None, structure: dict | None = None,
         expect_error: bool = False, restart_after: int | None = None):
    """One E-tree run; `victim` SIGKILLed through the manager once the top's aggregate of
    round KILL_AFTER is in its metrics (and restarted once that of `restart_after` is).
    -> (summary or the AssertionError of a failed run, {node: metrics of the live
    nodes}, {node: log}, wall seconds, seconds from the kill to the end)."""
    work = tmp / tag
    work.mkdir()
    outcome: dict = {}
    with netns_testbed(work, ElManager, {n: "el_peer.py" for n in NAMES}, _links(), port=PORT,
                       subnet=SUBNET, emulator="emu-elf", ram_mb=512) as (tb, manager):
        stop = threading.Event()

        def after(rnd: int) -> bool:
            wait_until(lambda: stop.is_set() or any(r["event"] == "aggregate" and r["round"] >= rnd
                                                    for r in _metrics(tb, "h1") or []),
                       150, f"h1's aggregate of round {rnd}", period_s=0.2)
            return not stop.is_set()

        def killer():
            try:
                if after(KILL_AFTER):
                    outcome["t"] = time.monotonic()
                    outcome["kill"] = manager.node_fault(victim, "kill")
                if restart_after is not None and after(restart_after):
                    outcome["restart"] = manager.node_fault(victim, "restart")
            except Exception as e:      # shown by the test
                outcome["error"] = e
        t = threading.Thread(target=killer, daemon=True)
        if victim:
            t.start()
        t0 = time.monotonic()
        try:
            summary = run_workflow(tb, manager, work, alg="el", root="h1", timeout_s=150,
                                   structure=structure or _structure(), dataset=DATASET)
        except AssertionError as e:        # run_workflow's wrapper of drive's RuntimeError
            if not expect_error:
                raise
            summary = e
        end = time.monotonic()
        stop.set()
        if victim:
            t.join(30)
        metrics = {n: _metrics(tb, n) for n in NAMES}
        logs = {n: _log(tb, n) for n in NAMES if metrics[n] is not None}
        status = manager.status()["nodes"]
    assert "error" not in outcome, outcome
    if victim and restart_after is None:
        assert outcome["kill"]["ok"], outcome
        assert status[victim]["app"] == "exited", status[victim]
        assert metrics[victim] is None
    elif victim:
        assert outcome["kill"]["ok"] and outcome["restart"]["ok"], outcome
        assert "structure conf pushed again" in outcome["restart"]["detail"], outcome
    took = end - t0
    print(f"\n{tag}: {took:.1f} s" + (f", {end - outcome['t']:.1f} s after the kill" if victim else ""))
    return summary, metrics, logs, took, (end - outcome["t"]) if victim else None


def _parts(recs: list[dict], layer: int) -> list[dict]:
    return [r for r in recs if r["event"] == "participants" and r["layer"] == layer]


def _dead(after: int):
    """What a round `after` rounds past the victim's last one says of it: dead, or in the
    first such round also `timeout` (killed while a message to it, or through it, was
    on its way: it may have arrived, so it is not called dead)."""
    return "dead" if after > 1 else _OneOf("dead", "timeout")


class _OneOf:
    def __init__(self, *values):
        self.values = values

    def __eq__(self, other):
        return other in self.values

    def __repr__(self):
        return " or ".join(map(repr, self.values))


def _accs(recs: list[dict]) -> list[float]:
    return [r["accuracy"] for r in recs if r["event"] == "aggregate"]


@ah.need_root()
@pytest.mark.timeout(400)
def test_a_killed_trainer_behind_a_relay_is_left_out_and_reported(tmp_path):
    base, base_m, _, _, _ = _run(tmp_path, "nofault")
    assert base["rounds"] == SYNC, base
    for layer, node, kids in ((3, "h1", ["h2", "h3"]), (2, "h2", ["h4", "h5", "h6"]), (2, "h3", ["h3", "h7"])):
        parts = _parts(base_m[node], layer)
        assert [(p["round"], p["attempt"], p["participants"], p["missing"], p["accepted"]) for p in parts] == \
            [(r, 1, kids, {}, True) for r in range(1, SYNC + 1)], (node, parts)

    victim = "h6"
    summary, m, logs, _, _ = _run(tmp_path, "kill-h6", victim=victim)
    acc, base_acc = _accs(m["h1"]), _accs(base_m["h1"])
    assert summary["rounds"] == SYNC and len(acc) == SYNC, (summary, acc)
    parts = _parts(m["h2"], 2)
    assert [p["round"] for p in parts] == list(range(1, SYNC + 1)) and all(p["accepted"] for p in parts), parts
    # h6 took part up to round k (killed after the top's round 2: k is 2, or 3 when its
    # result of round 3 was in before the kill, later on a slow machine); every later
    # round had h4 and h5, h6 dead (in round k + 1 maybe `timeout`: killed while a
    # message to it was on its way)
    k = max(p["round"] for p in parts if victim in p["participants"])
    assert KILL_AFTER <= k < SYNC - 1, parts      # at least two rounds without it
    for p in parts:
        if p["round"] <= k:
            assert p["participants"] == ["h4", "h5", "h6"] and p["missing"] == {}, p
        else:
            assert p["participants"] == ["h4", "h5"] and p["missing"] == {victim: _dead(p["round"] - k)}, p
    # the rounds after k found h6 dead at once through the relay h5 (502), not at the deadline
    assert "child h6 did not take the model (dead): " in logs["h2"] and "h5: forwarding to h6 failed" in logs["h2"]
    assert all(p["missing"] == {} for p in _parts(m["h1"], 3)), _parts(m["h1"], 3)
    assert list(summary["missing_nodes"]) == [victim], summary["missing_nodes"]   # summary.json says it too
    assert abs(acc[-1] - base_acc[-1]) <= ACC_TOLERANCE, (acc, base_acc)
    assert acc[:KILL_AFTER] == base_acc[:KILL_AFTER], (acc, base_acc)    # the same seeds: identical until the kill
    print(f"E-tree, 5 trainers, {victim} killed after round {KILL_AFTER}: accuracy {acc[-1]:.4f} vs "
          f"{base_acc[-1]:.4f} without the fault (|diff| {abs(acc[-1] - base_acc[-1]):.4f}); "
          f"rounds 1..{k}: {acc[:k]} vs {base_acc[:k]}")


@ah.need_root()
@pytest.mark.timeout(240)
def test_a_killed_middle_aggregator_is_reported_at_the_top_and_the_run_completes(tmp_path):
    summary, m, logs, _, _ = _run(tmp_path, "kill-h3", victim="h3")
    assert summary["rounds"] == SYNC and len(_accs(m["h1"])) == SYNC, summary
    parts = _parts(m["h1"], 3)
    assert [p["round"] for p in parts] == list(range(1, SYNC + 1)) and all(p["accepted"] for p in parts), parts
    k = max(p["round"] for p in parts if "h3" in p["participants"])
    assert KILL_AFTER <= k < SYNC - 1, parts      # at least two rounds without it
    for p in parts[k:]:          # the subtree under h3 (h3 and h7) is gone with it
        assert p["participants"] == ["h2"] and p["missing"] == {"h3": _dead(p["round"] - k)} and p["layer"] == 3, p
    # h2's subtree went on undisturbed; h7, below the dead h3, got no model after it
    assert all(p["participants"] == ["h4", "h5", "h6"] for p in _parts(m["h2"], 2))
    assert logs["h7"].count("Train: loss=") in (k, k + 1), logs["h7"]
    assert summary["final_accuracy"] > 0.5, summary
    assert list(summary["missing_nodes"]) == ["h3"], summary["missing_nodes"]


@ah.need_root()
@pytest.mark.timeout(240)
def test_a_restarted_trainer_is_asked_again_and_takes_part(tmp_path):
    """h6 killed after the top's round 2, restarted (the controller pushes its confs
    again) after round 3: h2 asks it every round, so once it is back it takes part
    again, up to the last round."""
    sync = 12
    summary, m, logs, _, _ = _run(tmp_path, "restart-h6", victim="h6", restart_after=KILL_AFTER + 1,
                                  structure=_structure(h1={"sync": sync}))
    assert summary["rounds"] == sync, summary
    parts = _parts(m["h2"], 2)
    assert [p["round"] for p in parts] == list(range(1, sync + 1)) and all(p["accepted"] for p in parts), parts
    took = ["h6" in p["participants"] for p in parts]
    gone = took.index(False)                  # the first round without h6: at the kill
    back = took.index(True, gone)             # and the first with it again
    assert gone >= KILL_AFTER and all(took[back:]), parts
    assert all(parts[i]["missing"] and set(parts[i]["missing"]) == {"h6"} for i in range(gone, back)), parts
    print(f"h6 missing in rounds {gone + 1}..{back}, back from round {back + 1} of {sync}")


@ah.need_root()
@pytest.mark.timeout(240)
def test_too_few_children_retries_the_round_then_fails_clearly(tmp_path):
    err, m, logs, _, _ = _run(tmp_path, "kill-h5", victim="h5", expect_error=True,
                              structure=_structure(h2={"min_fraction": 0.5, "round_retries": 1}))
    assert isinstance(err, AssertionError), err
    msg = str(err).splitlines()[0]
    assert msg.startswith("node(s) failed: h2: layer 2 round ") and "fewer than min_fraction 0.5" in msg, msg
    assert "in 2 attempt(s)" in msg and "1/3 answered" in msg, msg
    assert "h5 (dead)" in msg and "h6 (dead)" in msg, msg     # h6 is behind h5: unreachable, dead to h2
    parts = _parts(m["h2"], 2)
    failed = parts[-1]["round"]
    tries = [p for p in parts if p["round"] == failed]
    assert [(p["attempt"], p["participants"], p["accepted"]) for p in tries] == \
        [(1, ["h4"], False), (2, ["h4"], False)], tries
    # the retry found them dead (refused at once), not silent until the 30 s round deadline
    assert tries[1]["missing"] == {"h5": "dead", "h6": "dead"}, tries[1]
    assert set(tries[0]["missing"]) == {"h5", "h6"} and {tries[0]["missing"]["h5"], tries[0]["missing"]["h6"]} \
        <= {"dead", "timeout"}, tries[0]     # a message on its way at the kill is `timeout`
    assert not any(r["event"] == "aggregate" and r["round"] >= failed for r in m["h1"])


# ----------------------------------------------------------------------------- in-process

ET = {"layer": [1, 2, 3], "father_node": ["self", "self", "top"], "child_node": [[], ["self", "x2"], ["self", "x3"]],
      "sync": [0, 2, 2], "epoch": 1, "connect": {"x2": "127.0.0.1:9", "x3": "127.0.0.1:10"}}


@pytest.mark.parametrize("change, message", [
    ({"min_fraction": {"2": 0}}, "min_fraction['2'] must be a number in (0, 1], got 0"),
    ({"min_fraction": {"3": 1.5}}, "min_fraction['3'] must be a number in (0, 1], got 1.5"),
    ({"min_fraction": {"2": float("nan")}}, "min_fraction['2'] must be a number in (0, 1], got NaN"),
    ({"min_fraction": {"2": "0.5"}}, "min_fraction['2'] must be a number"),
    ({"min_fraction": 0.5}, "'min_fraction' must map layer numbers"),
    ({"round_retries": {"2": -1}}, "round_retries['2'] must be an integer in [0, 100], got -1"),
    ({"round_retries": {"3": 1.5}}, "round_retries['3'] must be an integer"),
    ({"round_retries": {"3": 101}}, "round_retries['3'] must be an integer in [0, 100], got 101"),
])
def test_min_fraction_and_round_retries_are_checked_per_layer(change, message):
    with pytest.raises(ValueError) as e:
        el_peer.check_structure({**ET, **change}, "x1")
    assert str(e.value).startswith(message), str(e.value)


def test_min_fraction_and_round_retries_defaults_and_the_conf_tool():
    conf = el_peer.check_structure({**ET, "min_fraction": {"3": 1}, "round_retries": {"2": 0}}, "x1")
    assert conf["_quorum"] == {2: {"min_fraction": 0.5, "round_retries": 0}, 3: {"min_fraction": 1.0, "round_retries": 2}}
    nodes, _ = node_addrs(["n1", "n2", "n3"])
    links = {"n1": ["n2", "n3"], "n2": ["n1"], "n3": ["n1"]}
    tree = {"node_list": [{"name": "n1", "layer": 3, "sync": 1, "child_num": 1, "min_fraction": 1, "round_retries": 0},
                          {"name": "n1", "layer": 2, "sync": 1, "child_num": 2, "min_fraction": 0.75},
                          {"name": "n2", "layer": 1, "epoch": 1}, {"name": "n3", "layer": 1, "epoch": 1}]}
    confs = el_structure_conf.build_confs(tree, links, nodes)
    assert confs["n1"]["min_fraction"] == {"2": 0.75, "3": 1.0} and confs["n1"]["round_retries"] == {"3": 0}
    assert "min_fraction" not in confs["n2"]
    for bad in ({"min_fraction": 0}, {"min_fraction": 2}, {"round_retries": -1}, {"round_retries": 101}):
        broken = json.loads(json.dumps(tree))
        broken["node_list"][1].update(bad)
        with pytest.raises(Exception) as e:
            el_structure_conf.build_confs(broken, links, nodes)
        assert list(bad)[0] in str(e.value) and "node_list[1]" in str(e.value), str(e.value)


def test_why_not_reads_a_relays_answer():
    assert el_peer.why_not(Reply("c", False, why=REFUSED, status=502)) == DEAD
    assert el_peer.why_not(Reply("c", False, why=REFUSED, status=504)) == TIMEOUT
    assert el_peer.why_not(Reply("c", False, why=REFUSED, status=409)) == REFUSED
    assert el_peer.why_not(Reply("c", False, why=DEAD)) == DEAD


def test_a_relay_answers_502_for_a_dead_next_hop_and_504_in_bounded_time(scratch):
    """A forwarder r1 (in no layer) between a sender and x2 (a port where nothing
    listens) or x3 (a port that takes the connection and never answers): a message or a
    probe gets 502 (dead) or 504, the relay having waited RELAY_SHARE of the wait the
    sender gave it (its answer names the read timeout it used), so it answers first."""
    threads = torch.get_num_threads()
    tiny_dataset(scratch / "ds", num_classes=10)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)                 # the kernel takes connections; nobody ever answers
    rt = Runtime("el_peer", env={"NET_NODE_NAME": "r1", "EDGE_TB_TOKEN": TOKEN, "DML_PORT": "0",
                                 "DML_LOG_DIR": str(scratch / "log"), "DML_DATASET_DIR": str(scratch / "ds")})
    try:
        el_peer.ElPeer(rt)
        client, hdr = rt.app.test_client(), {net.TOKEN_HEADER: TOKEN}
        conf = {"layer": [], "father_node": [], "child_node": [], "sync": [],
                "connect": {"x2": f"127.0.0.1:{free_port()}", "x3": f"127.0.0.1:{silent.getsockname()[1]}"}}
        assert client.post("/conf/structure", json=conf, headers=hdr).status_code == 200
        body = lambda dst: net.pack_weights({"w": torch.zeros(2)}, {"kind": "down", "src": "x0", "dst": dst,  # noqa: E731
                                                                    "layer": 1, "round": 1, "timeout_s": 2})
        for dst, status, words in (("x2", 502, "x2 does not listen"), ("x3", 504, "no answer from x3 in time")):
            r = client.post("/el/message", data=body(dst), headers={**hdr, "Content-Type": "application/octet-stream"})
            text = r.get_data(as_text=True)
            assert r.status_code == status and f"r1: forwarding to {dst} failed: {words}" in text, text
            if status == 504:                # it waited its share (0.8 x 2 s) of the sender's wait
                assert f"read timeout={2 * el_peer.RELAY_SHARE:g}" in text, text
            r = client.get(f"/el/hi?dst={dst}&timeout_s=1", headers=hdr)
            text = r.get_data(as_text=True)
            assert r.status_code == status and words in text, text
            if status == 504:
                assert f"read timeout={1 * el_peer.RELAY_SHARE:g}" in text, text
        assert client.get("/el/hi", headers=hdr).get_json()["node"] == "r1"
        assert client.get("/el/hi?dst=x2&hops=64", headers=hdr).status_code == 400      # a loop ends
        assert client.get("/el/hi?dst=x2&timeout_s=nan", headers=hdr).status_code == 400
    finally:
        rt.close()
        silent.close()
        torch.set_num_threads(threads)
