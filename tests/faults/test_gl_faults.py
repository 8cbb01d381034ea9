"""Gossip learning tolerates failing peers.

* gossip.gossip_round (pure): a failed send is skipped and another peer chosen for the
  round; down peers are not chosen; without failures the choice is the plain one.
* A real GlPeer whose peers are a closed port and a live peer: the dead one is tried
  once, skipped, marked down and not tried again until it answers /hi; the round's
  participants event says so.
* Four bare gl_peer processes, one SIGKILLed from outside: the controller finds it dead
  by its silence and refused port and ends the run.
* Five peers on real netns nodes driven as `gl_run.py --auto` drives them, one of them
  SIGKILLed (Manager.node_fault(.., "kill")) once its heartbeat says round 3 of 10: the
  run ends by itself when the four live peers are done, each of them ran every round,
  the victim is in summary.json's dead_peers and in the survivors' participants events
  as missing, the survivors' final accuracy stays close to the same run without the
  fault, and the reset leaves nothing (netns_testbed checks it after each run).
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.support import agents as ah
from tests.support.procs import TOKEN, free_port, wait_until
from tests.support.workflow import run_workflow
from tests.support.peers import loopback_run, netns_run, tiny_dataset
from dml_app import net
from controller.gl_run import GlManager
from dml_app.gl_peer import GlPeer
from dml_app.gossip import choose_peer, gossip_round, peer_rng
from dml_app.runtime import DEAD, REFUSED, TIMEOUT, Runtime


# ----------------------------------------------------------------------------- the choice, pure

def test_gossip_round_skips_failures_and_chooses_another():
    peers = ["p1", "p2", "p3", "p4"]
    # no failure: exactly the plain choice, one send
    sent = []
    to, missing = gossip_round(peers, set(), peer_rng(3, "n1"), lambda p: sent.append(p))
    assert to == choose_peer(peers, peer_rng(3, "n1")) and sent == [to] and missing == {}
    # the first two tried fail: the third takes it; every failure says why
    whys = iter([DEAD, TIMEOUT])
    sent = []
    to, missing = gossip_round(peers, set(), random.Random(1), lambda p: sent.append(p) or next(whys, None))
    assert len(sent) == 3 and len(set(sent)) == 3 and to == sent[2]
    assert missing == {sent[0]: DEAD, sent[1]: TIMEOUT}
    # down peers are never tried; all the others failing gives nobody, each tried once
    sent = []
    to, missing = gossip_round(peers, {"p2", "p4"}, random.Random(2), lambda p: sent.append(p) or REFUSED)
    assert to is None and sorted(sent) == ["p1", "p3"] and missing == {"p1": REFUSED, "p3": REFUSED}
    assert gossip_round(peers, set(peers), random.Random(2), lambda p: pytest.fail("sent")) == (None, {})
    # over many rounds, with p3 always failing, the others share the rounds evenly
    rng, took = random.Random(7), []
    for _ in range(3000):
        to, missing = gossip_round(peers, set(), rng, lambda p: DEAD if p == "p3" else None)
        took.append(to)
        assert set(missing) <= {"p3"}
    assert {p: took.count(p) for p in ("p1", "p2", "p4")} == pytest.approx({"p1": 1000, "p2": 1000, "p4": 1000},
                                                                           abs=100)


# ----------------------------------------------------------------------------- one real peer

def _runtime(scratch: Path, name: str, data: Path, port: int = 0) -> Runtime:
    return Runtime("gl_peer", env={"NET_NODE_NAME": name, "EDGE_TB_TOKEN": TOKEN, "DML_PORT": str(port),
                                   "DML_LOG_DIR": str(scratch / "log"), "DML_DATASET_DIR": str(data)})


HDR = {net.TOKEN_HEADER: TOKEN}


@contextmanager
def _peer_with(scratch: Path, gz2: str, *, sync: int, gossip_timeout_s: float):
    """gz1, a GlPeer (not serving: the test runs its rounds) whose peers are gz2 at the
    address `gz2` and gz3, a live gl_peer on loopback; the seed is one whose first choice
    is gz2. Yields (gz1's runtime, its GlPeer, the dataset folder)."""
    threads = torch.get_num_threads()
    data = tiny_dataset(scratch / "ds", num_classes=10)
    seed = next(s for s in range(100) if choose_peer(["gz2", "gz3"], peer_rng(s, "gz1")) == "gz2")
    live = _runtime(scratch, "gz3", data)
    GlPeer(live)
    rt = _runtime(scratch, "gz1", data)
    peer = GlPeer(rt)
    try:
        live.start_serving("127.0.0.1")
        structure = {"epoch": 1, "sync": sync, "seed": seed, "wait_s": 0, "gossip_timeout_s": gossip_timeout_s,
                     "connect": {"gz2": gz2, "gz3": f"127.0.0.1:{live.port}"}}
        for r, path, body in ((live, "/conf/structure", {**structure, "connect": {"gz1": "127.0.0.1:9"}}),
                              (live, "/conf/dataset", {"train_len": 1, "test_len": 1}),
                              (rt, "/conf/structure", structure),
                              (rt, "/conf/dataset", {"train_len": 1, "test_len": 1})):
            assert r.app.test_client().post(path, json=body, headers=HDR).status_code == 200
        yield rt, peer, data
    finally:
        rt.close()
        live.close()
        torch.set_num_threads(threads)


def _events(scratch: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (scratch / "log" / "gz1.metrics.jsonl").read_text().splitlines())
            if r["event"] == event]


def test_a_dead_peer_is_skipped_marked_down_and_taken_back_when_it_answers(scratch):
    """gz2 is a port where nothing listens. Round 1 tries gz2 (dead, at once), skips it
    and gives the model to gz3; rounds 2 and 3 go to gz3 without trying gz2 (down); once
    a node listens on gz2's port, the next round's GET /hi takes it back; a model from a
    down peer takes it back too."""
    dead_port = free_port()
    back = None
    with _peer_with(scratch, f"127.0.0.1:{dead_port}", sync=3, gossip_timeout_s=20) as (rt, peer, data):
        peer.run()
        # gz2 refused at once (dead, not a timeout: no wait of gossip_timeout_s's 20 s),
        # then down: never tried again
        assert [(r["to"], r["ok"], r.get("why")) for r in _events(scratch, "gossip")] == \
            [("gz2", False, DEAD), ("gz3", True, None), ("gz3", True, None), ("gz3", True, None)]
        assert [(r["round"], r["participants"], r["missing"], r["down"]) for r in _events(scratch, "participants")] == \
            [(1, ["gz3"], {"gz2": DEAD}, ["gz2"]), (2, ["gz3"], {}, ["gz2"]), (3, ["gz3"], {}, ["gz2"])]
        assert "Receive: from=gz1, round=3," in (scratch / "log" / "gz3.log").read_text()
        # gz2 comes back: a node listens on its port; the next round's /hi takes it back
        assert peer._down == {"gz2"}
        try:
            back = _runtime(scratch, "gz2", data, port=dead_port)
            GlPeer(back)
            back.start_serving("127.0.0.1")
            peer._readmit(4)
            assert peer._down == set()
            assert "round 4: gz2 answer again" in (scratch / "log" / "gz1.log").read_text()
        finally:
            if back is not None:
                back.close()
        # a model from a down peer takes it back too
        peer._down.add("gz3")
        r = rt.app.test_client().post("/gossip", data=net.pack_weights(peer.model.state_dict(),
                                                                       {"name": "gz3", "round": 3}),
                                      headers={**HDR, "Content-Type": "application/octet-stream"})
        assert r.status_code == 200 and peer._down == set()
        wait_until(lambda: rt.state == "finished", 30, "gz1 to merge the late model")


def test_a_silent_peer_costs_one_bounded_wait_then_is_down(scratch):
    """gz2 accepts connections and never answers (a frozen app): round 1's send to it
    ends after gossip_timeout_s as a timeout and the model goes to gz3; round 2's GET /hi
    finds it still silent (bounded too), so it is not tried again."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)               # the kernel takes the connections; nobody reads them
    try:
        with _peer_with(scratch, f"127.0.0.1:{silent.getsockname()[1]}", sync=2, gossip_timeout_s=1) as (rt, peer, _):
            peer.run()
            # one send to gz2 that ended as a timeout (its bound), then down: not tried again
            assert [(r["to"], r["ok"], r.get("why")) for r in _events(scratch, "gossip")] == \
                [("gz2", False, TIMEOUT), ("gz3", True, None), ("gz3", True, None)]
            assert [(r["participants"], r["missing"], r["down"]) for r in _events(scratch, "participants")] == \
                [(["gz3"], {"gz2": TIMEOUT}, ["gz2"]), (["gz3"], {}, ["gz2"])]
    finally:
        silent.close()


# ----------------------------------------------------------------------------- bare processes, one killed

@pytest.mark.timeout(180)
def test_a_peer_killed_from_outside_is_found_dead_and_the_run_ends(scratch):
    """Four gl_peer processes on loopback (no agent: nothing tells the controller), one
    SIGKILLed mid-run by the test: its heartbeats stop and its port refuses, so
    GlManager counts it dead and ends the run when the other three are done."""
    names, victim, sync = ["gk1", "gk2", "gk3", "gk4"], "gk2", 20
    data = tiny_dataset(scratch / "dataset", num_classes=10)
    with loopback_run(GlManager, "gl_peer", names, scratch, data) as (manager, procs):
        (scratch / "links.json").write_text(json.dumps(
            {n: [{"dest": d, "bw": "1gbit"} for d in names if d != n] for n in names}))
        metrics = scratch / "log" / f"{victim}.metrics.jsonl"

        def killer():
            wait_until(lambda: metrics.exists() and '"round": 3' in metrics.read_text(), 60, f"{victim} round 3",
                       period_s=0.01)
            os.killpg(procs[victim].proc.pid, signal.SIGKILL)
            procs[victim].proc.wait(10)
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        summary = run_workflow(manager.tb, manager, scratch, alg="gl", root=None, timeout_s=90,
                               structure={"sync": sync, "seed": 1, "wait_s": 0.2,
                                          "node_list": [{"name": n, "epoch": 1} for n in names]},
                               dataset={n: {"train_len": 1, "test_len": 1, "batch_size": 4} for n in names})
        t.join(10)
    assert summary["dead_peers"] == [victim] and manager.algo.dead_peers == {victim: "not answering (port refused)"}
    assert "error" not in summary, summary
    survivors = [n for n in names if n != victim]
    assert summary["gossips_sent"] == {n: sync for n in survivors}, summary["gossips_sent"]
    run_dir = Path(summary["run_dir"])
    for n in survivors:
        recs = [json.loads(l) for l in (run_dir / f"{n}.metrics.jsonl").read_text().splitlines()]
        parts = [r for r in recs if r["event"] == "participants"]
        assert [len(p["participants"]) for p in parts] == [1] * sync, parts
        assert all(set(p["missing"]) <= {victim} for p in parts), parts


# ----------------------------------------------------------------------------- netns, one peer killed

PEERS = ["f1", "f2", "f3", "f4", "f5"]
VICTIM = "f3"
KILL_AT_ROUND = 3          # killed once its heartbeat says round 3 (its rounds 1..2 are done)
SYNC = 10
# survivors' mean final accuracy vs the no-fault run: observed differences -0.0125, -0.0060,
# +0.0020, -0.0080 (and up to -0.035 with 8 rounds); which models meet depends on timing,
# so even two no-fault runs differ by ~0.01
ACC_TOLERANCE = 0.04
# every peer links to every other: a dead peer leaves each survivor three to choose from
LINKS = {n: [{"dest": d, "bw": "40mbit"} for d in PEERS if d != n] for n in PEERS}
STRUCTURE = {"sync": SYNC, "seed": 2, "wait_s": 2, "node_list": [{"name": n, "epoch": 1} for n in PEERS]}
DATASET = {n: {"train_len": 8, "train_start_index": 1 + 8 * i, "test_len": 5, "test_start_index": 1 + 5 * (i % 2),
               "batch_size": 32} for i, n in enumerate(PEERS)}


def _run(tmp: Path, tag: str, *, kill: bool, capsys) -> tuple[dict, dict, list, float | None, str, float]:
    """One gossip run on netns nodes through auto.drive; with `kill`, VICTIM SIGKILLed
    through the manager once its heartbeat says round KILL_AT_ROUND. -> (summary,
    {peer: metrics records, None when not collected}, said, the kill's time, the
    controller's output, the run's seconds)."""
    work = tmp / tag
    work.mkdir()
    killed: dict = {}
    with netns_run(GlManager, "gl_peer", PEERS, work, links=LINKS, port=3372, subnet="10.233.0.0/24",
                   emulator="emu-glf") as (tb, manager):
        stop = threading.Event()

        def killer():
            try:
                wait_until(lambda: stop.is_set() or (manager.heartbeats.get(VICTIM) or {}).get("round", 0) >= KILL_AT_ROUND,
                           120, f"{VICTIM} at round {KILL_AT_ROUND}")
                if not stop.is_set():
                    killed["out"] = manager.node_fault(VICTIM, "kill")
                    killed["t"] = time.time()      # its app is gone (node_fault waited for it)
            except Exception as e:      # shown by the test
                killed["error"] = e
        t = threading.Thread(target=killer, daemon=True)
        if kill:
            t.start()
        said: list[str] = []
        t0 = time.monotonic()
        try:
            summary = run_workflow(tb, manager, work, alg="gl", root=None, timeout_s=150, said=said,
                                   structure=STRUCTURE, dataset=DATASET)
        finally:
            stop.set()
            t.join(30) if kill else None
        took = time.monotonic() - t0
        status = manager.status()["nodes"]
    out = capsys.readouterr().out
    assert "error" not in killed, killed
    if kill:
        assert killed["out"]["ok"], killed
        assert status[VICTIM]["app"] == "exited", status[VICTIM]
    run_dir = Path(summary["run_dir"])
    metrics = {}
    for n in PEERS:
        p = run_dir / f"{n}.metrics.jsonl"
        metrics[n] = [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else None
    print(f"{tag}: {took:.1f} s, final accuracy {summary['final_accuracy']:.4f}")
    return summary, metrics, said, killed.get("t"), out, took


def _final(recs: list[dict]) -> float:
    return [r["accuracy"] for r in recs if r["event"] == "aggregate"][-1]


@ah.need_root()
@pytest.mark.timeout(420)
def test_gossip_goes_on_without_a_killed_peer_and_reports_it(tmp_path, capsys):
    base, base_m, _, _, _, base_took = _run(tmp_path, "nofault", kill=False, capsys=capsys)
    assert "error" not in base and base["dead_peers"] == [], base
    assert all(r["missing"] == {} for n in PEERS for r in base_m[n] if r["event"] == "participants")

    summary, m, said, t_kill, out, took = _run(tmp_path, "kill", kill=True, capsys=capsys)
    survivors = [n for n in PEERS if n != VICTIM]
    assert "error" not in summary, summary
    # the fault's cost is counted in tries, not seconds: each survivor sends to the dead
    # victim at most once (refused at once, then down), checked below
    # the victim is reported dead: summary.json, the controller's output, auto's words
    on_disk = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert on_disk["dead_peers"] == [VICTIM] == summary["dead_peers"], on_disk
    assert f"dead: {VICTIM} (killed)" in out, out
    assert f"{VICTIM}: node app exited; the run goes on without it" in said, said
    assert VICTIM in summary.get("logs_missing", {}) and m[VICTIM] is None   # nothing left to collect
    total_backs = 0
    for n in survivors:
        recs = m[n]
        aggs = [r["round"] for r in recs if r["event"] == "aggregate"]
        assert aggs[:SYNC] == list(range(1, SYNC + 1)) and set(aggs[SYNC:]) <= {SYNC}, (n, aggs)
        parts = [r for r in recs if r["event"] == "participants"]
        assert [p["round"] for p in parts] == list(range(1, SYNC + 1)), (n, parts)
        # every round's model reached a live peer; after the kill never the victim
        assert all(len(p["participants"]) == 1 for p in parts), (n, parts)
        assert all(p["participants"] != [VICTIM] for p in parts if p["t"] > t_kill + 1), (n, parts)
        assert all(set(p["missing"]) <= {VICTIM} and set(p["missing"].values()) <= {DEAD, TIMEOUT} for p in parts)
        # tried at most once while dead: then down, not chosen again; unless a model the
        # victim had sent before the kill came after that try (the kernel still delivers
        # what it had queued), which takes it back once (a dead peer never answers /hi)
        tried = [r for r in recs if r["event"] == "gossip" and r["to"] == VICTIM and not r["ok"]]
        log = (Path(summary["run_dir"]) / f"{n}.log").read_text()
        backs = log.count(f"{VICTIM} is back (a model from it)")
        total_backs += backs
        assert f"{VICTIM} answer again" not in log, n
        assert len(tried) <= 1 + backs, (n, tried, backs)
        if tried and not backs:
            assert all(VICTIM in p["down"] for p in parts if p["round"] > tried[-1]["round"]), (n, parts)
    assert total_backs <= 1, total_backs      # the victim had at most one model on its way
    assert summary["gossips_sent"] == {n: SYNC for n in survivors}, summary["gossips_sent"]
    # the survivors saw the victim missing after the kill (each chooses among 4; over 4+ rounds someone tried it)
    missing_after = {(n, p["round"]): p["missing"][VICTIM] for n in survivors for p in m[n]
                     if p["event"] == "participants" and VICTIM in p["missing"]}
    assert DEAD in missing_after.values(), missing_after
    # summary.json's participants (controller/results.py) say the same
    assert summary["missing_nodes"][VICTIM]["why"] in (DEAD, TIMEOUT), summary["missing_nodes"]
    assert set(summary["missing_nodes"]) == {VICTIM}, summary["missing_nodes"]
    # the survivors learn as well as without the fault (the same seed)
    acc = sum(_final(m[n]) for n in survivors) / len(survivors)
    base_acc = sum(_final(base_m[n]) for n in survivors) / len(survivors)
    print(f"\ngossip, {VICTIM} killed at its round {KILL_AT_ROUND} of {SYNC}: survivors' final accuracy "
          f"{acc:.4f} vs {base_acc:.4f} without the fault (diff {acc - base_acc:+.4f}); "
          f"{took:.1f} s vs {base_took:.1f} s; missing seen {missing_after}")
    assert abs(acc - base_acc) <= ACC_TOLERANCE, (acc, base_acc)
