"""Failures end or bend a run in bounded time, and say what happened.

* a role task that raises puts its node in state `error` with the message, carried by
  the heartbeats to the controller's status, and `progress.follow` ends the run at once
  naming the node and the message;
* a conf pushed while the run is under way is refused with 409 and the run goes on;
* FL with four real trainer processes, one SIGKILLed mid-run: all rounds complete, the
  rounds after the kill have 3 participants, accuracy close to the no-fault run;
* FL on netns nodes, a trainer killed and then restarted through the controller: it
  rejoins, takes part in every later round, and summary.json's participants and
  missing_nodes say so;
  with too few trainers left (min_fraction not met) the round is retried, then the run
  fails with a clear message, in bounded time.
"""
from __future__ import annotations

import json
import os
import re
import signal
import threading
from pathlib import Path

import pytest

from tests.support.peers import loopback_run
from tests.support.procs import TOKEN, free_port, wait_until
from tests.support.procs import wait_until as _wait
from tests.support.workflow import run_workflow
from dml_app import fl_aggregator
from dml_app import net
from dml_app.runtime import Runtime
from dml_tool.splitter import split
from controller import progress
from controller.fl_run import FlManager
from controller.testbed import Testbed


def _runtime_env(work, name: str, ctl_port: int, dataset_dir) -> dict:
    return {"NET_NODE_NAME": name, "EDGE_TB_ID": "1", "DML_PORT": "0",
            net.TOKEN_ENV: net.node_token(TOKEN, name), net.PEER_TOKEN_ENV: net.peer_token(TOKEN),
            "NET_CTL_ADDRESS": f"127.0.0.1:{ctl_port}", "DML_LOG_DIR": str(work / "log"),
            "DML_DATASET_DIR": str(dataset_dir)}


def test_a_task_that_raises_ends_the_auto_run_naming_the_node(scratch):
    """A real runtime (HTTP server, heartbeats) whose start task raises; the real
    FlManager is its controller; progress.follow raises at once (well before its timeout)
    with the node's name and the exception's message."""
    ctl_port = free_port()
    rt = Runtime("boom", env=_runtime_env(scratch, "n7", ctl_port, scratch / "nodata"))
    released = threading.Event()

    def start():
        released.wait(60)
        raise ValueError("the weights went sideways")

    rt.on_start(start, needs=())
    rt.start_serving("127.0.0.1")
    tb = Testbed("127.0.0.1", str(scratch), FlManager, host_port=ctl_port, token=TOKEN)
    node = tb.add_emulated_node("n7", "/home/worker/dml_app", ["python3", "boom.py"])
    node.ip, node.port = "127.0.0.1", rt.port
    manager = FlManager(tb)
    manager.runs_dir = scratch / "runs"
    manager.serve()
    try:
        net.call("GET", f"127.0.0.1:{rt.port}/start", token=rt.token)
        assert rt.running
        # mid-run: confs are refused with 409 (the start task is going)
        with pytest.raises(net.HttpError) as ei:
            net.call("POST", f"127.0.0.1:{rt.port}/conf/structure", json={}, token=rt.token)
        assert ei.value.status == 409 and "run is under way" in ei.value.message, str(ei.value)
        released.set()
        said = []
        with pytest.raises(RuntimeError) as ei:
            progress.follow(manager, tb, "n7", timeout_s=120, rounds=None, say=said.append)
        assert "n7" in str(ei.value) and "ValueError: the weights went sideways" in str(ei.value), str(ei.value)
        st = net.call("GET", f"127.0.0.1:{rt.port}/stats", token=rt.token).json()
        assert st["state"] == "error" and "the weights went sideways" in st["error"], st
        assert manager.status()["nodes"]["n7"]["error"] == st["error"]
        # error is final: a later state change does not hide it
        rt.set_state("training", 3)
        assert rt.state == "error" and rt.round == 3
        # and the run is over: confs are taken again
        wait_until(lambda: not rt.running, 10, "the start task to end")
        net.call("POST", f"127.0.0.1:{rt.port}/conf/structure", json={"x": 1}, token=rt.token)
    finally:
        released.set()
        rt.close()
        manager.close()


# ----------------------------------------------------------------------------- FL under faults

FL_TRAINERS = ["n2", "n3", "n4", "n5"]
FL_SYNC = 6


@pytest.fixture(scope="module")
def fl_work(module_scratch):
    split("mnist-subset", str(module_scratch / "dataset"), train_parts=40, test_parts=10,
          partition="iid", seed=0)
    return module_scratch


def _metrics(path) -> list[dict]:
    try:
        return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    except FileNotFoundError:
        return []


def _fl_run(work, tag: str, *, kill_after_round: int | None = None, kill: list[str] = (),
            agg_extra: dict | None = None, expect_error: bool = False):
    """One FL run of an aggregator n1 and FL_TRAINERS as real processes (FlManager their
    controller, controller/auto.py's drive); `kill` SIGKILLed (their process groups) once
    the aggregate of `kill_after_round` is in the metrics. Returns (summary or the
    RuntimeError, n1's metrics, said, the conf pushed mid-run's error)."""
    run_dir = work / tag
    run_dir.mkdir()
    names = ["n1", *FL_TRAINERS]
    roles = {n: "fl_aggregator" if n == "n1" else "fl_trainer" for n in names}
    outcome = {}
    with loopback_run(FlManager, roles, names, run_dir, work / "dataset") as (manager, procs):
        links = {"n1": [{"dest": c, "bw": "100mbit"} for c in FL_TRAINERS]}
        links.update({c: [{"dest": "n1", "bw": "100mbit"}] for c in FL_TRAINERS})
        (run_dir / "links.json").write_text(json.dumps(links))
        metrics = run_dir / "log" / "n1.metrics.jsonl"

        def killer():
            try:
                _wait(lambda: any(r["event"] == "aggregate" and r["round"] >= kill_after_round
                                  for r in _metrics(metrics)), 120, f"round {kill_after_round}")
                # mid-run: a conf push is refused and changes nothing
                try:
                    procs["n1"].call("POST", "/conf/structure", json={"sync": 1})
                    outcome["conf"] = "accepted"
                except net.HttpError as e:
                    outcome["conf"] = e
                for n in kill:
                    os.killpg(procs[n].proc.pid, signal.SIGKILL)
                    procs[n].proc.wait(10)
                outcome["killed"] = True
            except Exception as e:     # shown by the test
                outcome["killer"] = e
        t = threading.Thread(target=killer, daemon=True)
        if kill_after_round is not None:
            t.start()
        said: list[str] = []
        try:
            summary = run_workflow(
                manager.tb, manager, run_dir, alg="fl", root="n1", timeout_s=240, said=said,
                structure={"node_list": [{"name": "n1", "trainer_fraction": 1.0, "sync": FL_SYNC,
                                          "round_timeout_s": 60, **(agg_extra or {})}]
                           + [{"name": c, "epoch": 2} for c in FL_TRAINERS]},
                dataset={"defaults": {"batch_size": 32}, "n1": {"test_len": 10, "test_start_index": 1},
                         **{c: {"train_len": 8, "train_start_index": 1 + 8 * i} for i, c in enumerate(FL_TRAINERS)}})
        except AssertionError as e:       # run_workflow's wrapper of drive's RuntimeError
            if not expect_error:
                raise
            summary = e
        if kill_after_round is not None:
            t.join(130)
        stats = procs["n1"].call("GET", "/stats").json()
    assert "killer" not in outcome, outcome
    return summary, _metrics(metrics), said, outcome, stats


def test_fl_goes_on_without_a_killed_trainer_and_says_who_took_part(fl_work):
    base, base_recs, _, _, _ = _fl_run(fl_work, "nofault")
    assert "error" not in base, base
    base_parts = [r for r in base_recs if r["event"] == "participants"]
    assert [(r["round"], r["participants"]) for r in base_parts] == [(r, FL_TRAINERS) for r in range(1, FL_SYNC + 1)]

    victim = "n3"
    summary, recs, said, outcome, stats = _fl_run(fl_work, "kill1", kill_after_round=2, kill=[victim])
    assert outcome.get("killed"), outcome
    assert "error" not in summary, summary
    # the conf pushed mid-run got 409 and the run went on with its own conf (FL_SYNC rounds)
    assert isinstance(outcome["conf"], net.HttpError) and outcome["conf"].status == 409, outcome["conf"]
    aggs = [r for r in recs if r["event"] == "aggregate"]
    assert [r["round"] for r in aggs] == list(range(1, FL_SYNC + 1)), aggs
    assert stats["state"] == "finished" and stats["round"] == FL_SYNC
    parts = [r for r in recs if r["event"] == "participants"]
    assert all(r["accepted"] and r["attempt"] == 1 for r in parts), parts
    assert [r["round"] for r in parts] == list(range(1, FL_SYNC + 1))
    # the victim took part up to round k (killed after round 2's aggregate: k is 2, or 3
    # when it uploaded round 3 before the kill); every later round had the 3 others, and
    # says the victim is dead
    k = max(r["round"] for r in parts if victim in r["participants"])
    assert k in (2, 3), parts
    for r in parts:
        if r["round"] <= k:
            assert r["participants"] == FL_TRAINERS, r
        else:
            others = [n for n in FL_TRAINERS if n != victim]
            assert r["participants"] == others and r["missing"] == {victim: "dead"}, r
    # accuracy close to the no-fault run (the same seeds; one trainer of four lost late)
    acc = [r["accuracy"] for r in aggs]
    base_acc = [r["accuracy"] for r in base_recs if r["event"] == "aggregate"]
    assert abs(acc[-1] - base_acc[-1]) <= 0.05, (acc, base_acc)
    assert acc[:k] == base_acc[:k], (acc, base_acc)   # identical until the kill
    print(f"\nFL 4 trainers, {victim} killed after round 2: accuracy {acc[-1]:.4f} vs {base_acc[-1]:.4f} "
          f"without the fault")


def test_fl_fails_clearly_when_too_few_trainers_are_left(fl_work):
    killed = ["n2", "n3", "n4"]
    err, recs, said, outcome, stats = _fl_run(fl_work, "kill3", kill_after_round=1, kill=killed,
                                              agg_extra={"min_fraction": 0.5, "round_retries": 2},
                                              expect_error=True)
    assert outcome.get("killed"), outcome
    assert isinstance(err, AssertionError), err
    msg = str(err).splitlines()[0]
    assert msg.startswith("node(s) failed: n1: round ") and "fewer than min_fraction 0.5" in msg, msg
    assert "in 3 attempt(s)" in msg and "n2 (dead)" in msg, msg
    assert stats["state"] == "error" and stats["error"] in msg, stats
    parts = [r for r in recs if r["event"] == "participants"]
    failed_round = parts[-1]["round"]
    tries = [r for r in parts if r["round"] == failed_round]
    # the failed round was tried 1 + round_retries times, each with only n5, never accepted
    assert [(r["attempt"], r["participants"], r["accepted"]) for r in tries] == \
        [(a, ["n5"], False) for a in (1, 2, 3)], tries
    # a kill that cuts attempt 1's /train mid-send reads as a timeout (it may have
    # arrived); from then on their ports refuse: dead
    assert set(tries[0]["missing"]) == set(killed) and set(tries[0]["missing"].values()) <= {"dead", "timeout"}, tries
    assert all(r["missing"] == {n: "dead" for n in killed} for r in tries[1:]), tries
    assert not any(r["event"] == "aggregate" and r["round"] >= failed_round for r in recs)


@pytest.mark.parametrize("key, value, message", [
    ("min_fraction", 0, "'min_fraction' must be a number in (0, 1], got 0"),
    ("min_fraction", 1.5, "'min_fraction' must be a number in (0, 1], got 1.5"),
    ("min_fraction", float("nan"), "'min_fraction' must be a number in (0, 1], got NaN"),
    ("min_fraction", "0.5", "'min_fraction' must be a number"),
    ("round_retries", -1, "'round_retries' must be an integer in [0, 100], got -1"),
    ("round_retries", 1.5, "'round_retries' must be an integer"),
])
def test_min_fraction_and_retries_are_checked(key, value, message):
    conf = {"trainer_fraction": 1, "sync": 1, "child_node": ["t"], "connect": {"t": "1.2.3.4:5"}, key: value}
    with pytest.raises(ValueError) as ei:
        fl_aggregator.check_structure(conf)
    assert str(ei.value).startswith(message), str(ei.value)


def test_min_fraction_defaults_and_quorum():
    conf = fl_aggregator.check_structure({"trainer_fraction": 1, "sync": 1, "child_node": ["t"],
                                          "connect": {"t": "1.2.3.4:5"}})
    assert conf["min_fraction"] == 0.5 and conf["round_retries"] == 2
    assert [fl_aggregator.needed(0.5, n) for n in (1, 2, 3, 4, 10)] == [1, 1, 2, 2, 5]
    assert fl_aggregator.needed(1.0, 4) == 4 and fl_aggregator.needed(0.01, 4) == 1
    assert fl_aggregator.needed(0.3, 10) == 3


def test_the_conf_tool_passes_min_fraction_and_round_retries(scratch):
    from dml_tool import fl_structure_conf
    from tests.support.peers import node_addrs
    nodes, _ = node_addrs(["n1", "n2"])
    links = {"n1": ["n2"], "n2": ["n1"]}
    base = {"name": "n1", "trainer_fraction": 1, "sync": 2}
    confs = fl_structure_conf.build_confs(
        {"node_list": [{**base, "min_fraction": 0.75, "round_retries": 4}, {"name": "n2", "epoch": 1}]},
        links, nodes)
    assert confs["n1"]["min_fraction"] == 0.75 and confs["n1"]["round_retries"] == 4
    for bad in ({"min_fraction": 0}, {"min_fraction": 2}, {"round_retries": -1}, {"round_retries": 101}):
        with pytest.raises(Exception) as ei:
            fl_structure_conf.build_confs({"node_list": [{**base, **bad}, {"name": "n2", "epoch": 1}]}, links, nodes)
        assert list(bad)[0] in str(ei.value), str(ei.value)


# ----------------------------------------------------------------------------- FL: a trainer restarted
REJOIN_NODES = ["rj1", "rj2", "rj3", "rj4", "rj5"]
REJOIN_SYNC = 10


@pytest.mark.root
@pytest.mark.timeout(300)
def test_fl_trainer_killed_then_restarted_rejoins_and_catches_up(tmp_path):
    """FL on netns nodes (the --auto workflow's drive): a trainer SIGKILLed after round 2
    (Manager.node_fault kill: its cgroup) and restarted after the next round (node_fault
    restart: the controller pushes its confs again). It is missing (dead) while down,
    takes part in every round after it came back (it gets the global weights with each
    round's /train: caught up), all rounds complete, summary.json's participants and
    missing_nodes say so, the table shows it; netns_testbed checks nothing is left."""
    from controller import results
    from tests.support.workflow import netns_testbed, run_workflow as run_netns

    agg, trainers, victim = REJOIN_NODES[0], REJOIN_NODES[1:], REJOIN_NODES[2]
    links = {agg: [{"dest": n, "bw": "40mbit"} for n in trainers], **{n: [{"dest": agg, "bw": "20mbit"}] for n in trainers}}
    roles = {n: "fl_aggregator.py" if n == agg else "fl_trainer.py" for n in REJOIN_NODES}
    fired, errors = [], []
    with netns_testbed(tmp_path, FlManager, roles, links, port=3488, subnet="10.251.8.0/24") as (tb, m):
        node = tb.all_nodes()[agg]

        def aggregated() -> int:
            try:
                text = net.call("GET", f"{node.ip}:{node.port}/metrics", token=tb.node_token(agg), timeout_s=5).text
            except net.HttpError:
                return 0
            return max((r["round"] for r in map(json.loads, text.splitlines()) if r.get("event") == "aggregate"),
                       default=0)

        def injector():
            try:
                for after, action in ((2, "kill"), (3, "restart")):
                    _wait(lambda: aggregated() >= after, 150, f"round {after}'s aggregate", period_s=0.05)
                    out = m.node_fault(victim, action)
                    fired.append({"round": aggregated(), "action": action, "ok": out["ok"], "detail": out["detail"]})
            except Exception as e:      # shown by the test
                errors.append(e)
        t = threading.Thread(target=injector, daemon=True)
        t.start()
        summary = run_netns(tb, m, tmp_path, alg="fl", root=agg, timeout_s=240, dataset={
            agg: {"test_len": 10, "test_start_index": 1, "batch_size": 64},
            **{n: {"train_len": 10, "train_start_index": 1 + 10 * i, "batch_size": 32} for i, n in enumerate(trainers)}},
            structure={"node_list": [{"name": agg, "trainer_fraction": 1.0, "sync": REJOIN_SYNC, "round_timeout_s": 60}]
                       + [{"name": n, "epoch": 2} for n in trainers]})
        t.join(60)
    assert not errors and not t.is_alive(), errors
    assert [(f["action"], f["ok"]) for f in fired] == [("kill", True), ("restart", True)], fired
    assert "conf pushed again" in fired[1]["detail"], fired
    assert summary["rounds"] == REJOIN_SYNC and "error" not in summary, summary
    assert [p["round"] for p in summary["accuracy_per_round"]] == list(range(1, REJOIN_SYNC + 1))

    parts = summary["participants"]
    assert [(p["node"], p["round"], p["attempt"], p["accepted"]) for p in parts] == \
        [(agg, r, 1, True) for r in range(1, REJOIN_SYNC + 1)], parts
    took_part = [p["round"] for p in parts if victim in p["participants"]]
    out = [p["round"] for p in parts if victim in p["missing"]]
    # in up to round 2 (or 3, had it uploaded round 3 before the kill), out while down,
    # in again every round after it came back: a rejoin, up to the last round
    assert out and took_part == [r for r in range(1, REJOIN_SYNC + 1) if r not in out], (took_part, out)
    first, last = out[0], out[-1]
    assert out == list(range(first, last + 1)) and first in (3, 4) and last < REJOIN_SYNC, out
    assert last >= fired[1]["round"] - 1 and took_part[-1] == REJOIN_SYNC, (out, fired)
    whys = [p["missing"][victim] for p in parts if victim in p["missing"]]
    # dead (its port refused the /train or the probe), or timeout when the kill cut a /train
    # on its way (connection reset: it may have arrived); refused while it came back (no confs yet)
    assert whys[0] in ("dead", "timeout") and set(whys) <= {"dead", "refused", "timeout"}, whys
    for p in parts:
        assert sorted(p["participants"] + list(p["missing"])) == trainers, p
    assert summary["missing_nodes"] == {victim: {"first_round": first, "last_round": last, "why": whys[0],
                                                 "rounds_missed": len(out)}}, summary["missing_nodes"]
    table = results.table(summary)
    assert f"{first:>5}  {victim} ({whys[0]})" in table and f"{victim:<8} {first:>6} {last:>6}" in table, table
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text())["missing_nodes"] == summary["missing_nodes"]
    # one log for both lives (the restarted app appends): the rounds it trained before the
    # kill, then those after its return; plus round `first` when the kill cut its upload
    # (trained, but its weights never arrived)
    trained = [int(x) for x in re.findall(r"Train: loss=[\d.]+, round=(\d+),", (run_dir / f"{victim}.log").read_text())]
    assert trained in (took_part, sorted(took_part + [first])), (trained, took_part)
    print(f"\nFL, {victim} killed after round {fired[0]['round']} and restarted after round {fired[1]['round']}: "
          f"missing in rounds {first}..{last}, back from round {last + 1}; final accuracy "
          f"{summary['final_accuracy']:.4f}, wall {summary['wall_seconds']:.1f} s")
