"""Scenarios (controller/scenario.py): a file is checked whole and every
problem listed; the scheduler fires each event at its offset after the start of training
(a fake clock: no timed assertions), stops at /finish, resumes what it left paused; the
events reach the run's summary.json, the table and the plots; POST /scenario sets one
(409 during a run); --scenario refuses a bad file before deploying anything; and one real
FL run on netns nodes with a trainer paused and resumed."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import ROOT

from controller import results, scenario
from tests.support.procs import wait_until
from controller.scenario import ScenarioError, Scheduler
from tests.unit.test_controller import manager  # noqa: F401  (a fixture: a real Manager on loopback)
from tests.security.test_controller_bad_input import node_stub  # noqa: F401
from tests.security.test_bounded_input import ctl, http

NODES = ["n1", "n2", "n3", "n4"]
LINKS = {"n1": [{"dest": "n2", "bw": "10mbit"}, {"dest": "n3", "bw": "10mbit"}],
         "n2": [{"dest": "n1", "bw": "5mbit"}], "n3": [{"dest": "n1", "bw": "5mbit"}]}


def parse(doc):
    return scenario.parse(doc, nodes=NODES, links=LINKS)


# ----------------------------------------------------------------------------- validation
def test_a_good_file_is_taken_and_expanded_in_time_order():
    evs = parse({"events": [
        {"at": 30, "node": "n3", "action": "kill"},
        {"at": 40, "link": ["n1", "n2"], "action": "down", "for": 20, "dir": "both"},
        {"at": 50, "link": ["n1", "n2"], "action": "rate", "bw": "5mbit"},
        {"at": 10, "node": "n2", "action": "pause", "for": 5},
        {"at": 31.5, "node": "n3", "action": "restart"}],
        "availability": {"n4": [[0, 30], [50, 80], [90, None]]}})
    got = [(e.at, e.label()) for e in evs]
    assert got == [(10, "pause n2"), (15, "resume n2"), (30, "kill n3"), (30, "pause n4"), (31.5, "restart n3"),
                   (40, "down n1<->n2"), (50, "rate n1->n2 5mbit"), (50, "resume n4"), (60, "up n1<->n2"),
                   (80, "pause n4"), (90, "resume n4")], got
    assert evs[1].source == "events[3].for"
    # a bare list of events is a scenario too, and kill mode turns availability into kill/restart
    assert [e.label() for e in parse([{"at": 0, "node": "n1", "action": "pause"}])] == ["pause n1"]
    evs = parse({"availability": {"n2": [[5, 10]]}, "availability_mode": "kill"})
    assert [(e.at, e.action) for e in evs] == [(0, "kill"), (5, "restart"), (10, "kill")]
    assert parse({}) == [] and parse([]) == []


def test_a_file_with_many_problems_lists_them_all():
    bad = {"events": [
        {"at": float("nan"), "node": "n1", "action": "kill"},                  # NaN time
        {"at": -1, "node": "n2", "action": "pause"},                           # negative
        {"at": float("inf"), "node": "n2", "action": "pause"},                 # infinite
        {"at": 5, "node": "zz", "action": "kill"},                             # unknown node
        {"at": 5, "node": "n1", "action": "explode"},                          # bad action
        {"at": 5, "link": ["n2", "n3"], "action": "down"},                     # not in links.json
        {"at": 5, "link": ["n1", "n4"], "action": "down", "dir": "both", "for": 0},  # for 0
        {"at": 6, "link": ["n2", "n1"], "action": "rate", "bw": "5"},          # bare number
        {"at": 7, "node": "n4", "action": "resume"},                           # resume without pause
        {"at": 8, "link": ["n1", "n2"], "action": "up"},                       # up of a link that is up
        {"at": 9, "node": "n1", "action": "kill", "for": 3},                   # for on kill
        {"at": 9, "node": "n1"},                                               # no action
        {"at": True, "node": "n1", "action": "kill"},                          # a bool
        {"node": "n1", "action": "kill", "colour": "red"},                     # no at, unknown key
        "kill n1"],
        "availability": {"n2": [[0, 30], [20, 40]], "n3": [[5, 4]], "n9": [[0, 1]], "n4": [[0, None], [5, 6]]},
        "availability_mode": "sometimes", "extra": 1}
    with pytest.raises(ScenarioError) as ei:
        parse(bad)
    msg, problems = str(ei.value), ei.value.problems
    expected = ["events[0].at", "got nan", "events[1].at", "got -1", "events[2].at", "got inf",
                "events[3].node: 'zz' is not a node", "events[4].action", "'explode'",
                "events[5].link: n2 -> n3 is not a link of links.json", "events[6].link: n1 -> n4 is not a link", "n4 -> n1 is not a link",
                "events[6].for", "events[7].bw", "events[8]: resume n4 at 7 s, but n4 is up",
                "events[9]: up n1->n2 at 8 s, but that link is up", "events[10].for: only a node's \"pause\"",
                "events[11].action", "events[12].at", "events[13]: no \"at\"", "events[13]: unknown key(s) 'colour'",
                "events[14]: expected an object", "availability.n2[1]: starts at 20",
                "availability.n3[0]: ends (4) at or before it starts (5)", "availability.n9: 'n9' is not a node",
                "availability.n4[0][1]: only the last interval may end with null", "availability_mode",
                "unknown key(s) 'extra'"]
    for words in expected:
        assert words in msg, (words, msg)
    assert len(problems) >= len(expected) - 4 and msg.startswith("scenario refused, nothing started")


def test_the_sequence_is_played_in_order():
    ok = [{"at": 1, "node": "n1", "action": "pause"}, {"at": 2, "node": "n1", "action": "resume"},
          {"at": 3, "node": "n1", "action": "kill"}, {"at": 4, "node": "n1", "action": "restart"},
          {"at": 5, "link": ["n1", "n2"], "action": "down"}, {"at": 6, "link": ["n1", "n2"], "action": "up"},
          {"at": 7, "node": "n2", "action": "pause"}, {"at": 8, "node": "n2", "action": "kill"},
          {"at": 9, "node": "n2", "action": "restart"}, {"at": 10, "node": "n2", "action": "restart"},
          {"at": 11, "node": "n2", "action": "pause"}, {"at": 12, "node": "n2", "action": "restart"}]
    assert len(parse(ok)) == 12
    for bad, words in [
        ([{"at": 1, "node": "n1", "action": "pause"}, {"at": 2, "node": "n1", "action": "pause"}], "n1 is paused"),
        ([{"at": 1, "node": "n1", "action": "kill"}, {"at": 2, "node": "n1", "action": "pause"}], "n1 is dead"),
        ([{"at": 1, "node": "n1", "action": "pause", "for": 5}, {"at": 3, "node": "n1", "action": "kill"}],
         "events[0].for: resume n1 at 6 s, but n1 is dead"),
        ([{"at": 1, "node": "n1", "action": "kill"}, {"at": 2, "node": "n1", "action": "kill"}], "n1 is dead"),
        ([{"at": 1, "link": ["n1", "n2"], "action": "down", "for": 9},
          {"at": 2, "link": ["n2", "n1"], "action": "down", "dir": "both"}], "down n1->n2 at 2 s, but that link is down"),
        ({"availability": {"n2": [[0, 5]]}, "events": [{"at": 6, "node": "n2", "action": "pause"}]}, "n2 is paused"),
    ]:
        with pytest.raises(ScenarioError) as ei:
            parse(bad)
        assert words in str(ei.value), (words, str(ei.value))


def test_load_names_the_file_and_refuses_nan_in_json(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('[{"at": NaN, "node": "n1", "action": "kill"}]')
    with pytest.raises(ScenarioError) as ei:
        scenario.load(str(f), nodes=NODES, links=LINKS)
    assert str(f) in str(ei.value) and "NaN" in str(ei.value)
    f.write_text(json.dumps({"events": [{"at": 3, "node": "n1", "action": "kill"}]}))
    assert [e.label() for e in scenario.load(str(f), nodes=NODES, links=LINKS)] == ["kill n1"]
    with pytest.raises(ScenarioError, match="no such file"):
        scenario.load(str(tmp_path / "none.json"), nodes=NODES, links=LINKS)


# ----------------------------------------------------------------------------- scheduler
class FakeClock:
    """Time moves only when the scheduler waits."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, timeout: float) -> bool:
        assert timeout > 0 and math.isfinite(timeout)
        self.waits.append(timeout)
        self.now += timeout
        return False


class StubManager:
    """The three fault methods, recording (clock time, call); `fail` makes one raise."""

    def __init__(self, clock, fail: str | None = None):
        self.clock, self.fail, self.calls = clock, fail, []
        self.fired = threading.Event()

    def _do(self, *call):
        self.calls.append((self.clock(), call))
        self.fired.set()
        if self.fail and self.fail in call:
            raise ValueError(f"no such thing as {self.fail}")
        return {"ok": True, "detail": f"did {' '.join(map(str, call))}"}

    def node_fault(self, node, action):
        return self._do("node", node, action)

    def link_fault(self, src, dest, action, both=False):
        return self._do("link", src, dest, action, both)

    def link_rate(self, src, dest, bw, both=False):
        return self._do("rate", src, dest, bw, both)


def test_the_scheduler_fires_each_event_at_its_offset_in_order():
    clock = FakeClock()
    m = StubManager(clock, fail="kill")
    evs = parse({"events": [{"at": 0, "node": "n2", "action": "pause", "for": 12.5},
                            {"at": 3, "node": "n3", "action": "kill"},
                            {"at": 3, "link": ["n1", "n2"], "action": "down", "dir": "both", "for": 4},
                            {"at": 20, "link": ["n1", "n3"], "action": "rate", "bw": "2mbit"}]})
    said = []
    s = Scheduler(evs, m, say=said.append, clock=clock)
    s.wait = clock.wait
    s.t0 = 1000.0
    s.run()      # in this thread: the fake clock moves only through wait()
    assert [(t - 1000.0, c) for t, c in m.calls] == [
        (0, ("node", "n2", "pause")), (3, ("node", "n3", "kill")), (3, ("link", "n1", "n2", "down", True)),
        (7, ("link", "n1", "n2", "up", True)), (12.5, ("node", "n2", "resume")),
        (20, ("rate", "n1", "n3", "2mbit", False))]
    recs = s.records
    assert [(r["at"], r["t"], r["action"], r["ok"]) for r in recs] == [
        (0, 0, "pause", True), (3, 3, "kill", False), (3, 3, "down", True), (7, 7, "up", True),
        (12.5, 12.5, "resume", True), (20, 20, "rate", True)]
    assert recs[1]["node"] == "n3" and "ValueError: no such thing as kill" in recs[1]["detail"]
    assert recs[2]["link"] == ["n1", "n2"] and recs[2]["dir"] == "both" and recs[5]["bw"] == "2mbit"
    assert len(said) == 6 and said[1].startswith("scenario: t=3.0 s (at 3 s) kill n3: FAILED")
    assert said[0] == "scenario: t=0.0 s (at 0 s) pause n2: ok: did node n2 pause"
    assert s.stop() == recs    # nothing left paused: nothing more


def test_stop_ends_the_thread_and_resumes_a_paused_node():
    """Real clock, event-driven: the first event fires, stop() ends the wait for the next
    (an hour away) and resumes the node the scenario paused."""
    m = StubManager(time.time)
    evs = parse([{"at": 0, "node": "n2", "action": "pause"}, {"at": 3600, "node": "n2", "action": "resume"}])
    s = Scheduler(evs, m, say=lambda _: None)
    s.start(time.time())
    assert m.fired.wait(30), "the first event did not fire"
    recs = s.stop()
    assert not s.alive()
    assert [(r["action"], r["source"], r["ok"]) for r in recs] == [("pause", "events[0]", True),
                                                                   ("resume", "end of run", True)]
    assert [c for _, c in m.calls] == [("node", "n2", "pause"), ("node", "n2", "resume")]
    assert all(math.isfinite(r["t"]) and 0 <= r["t"] < 3600 for r in recs)


# ----------------------------------------------------------------------------- results
def test_event_marks_fall_on_the_round_axis_and_change_the_plots(tmp_path):
    t0 = 1000.0
    metrics = {"a": [{"event": "aggregate", "round": r, "accuracy": 0.5 + r / 20, "t": t0 + 10 * r} for r in (1, 2, 3)],
               "b": [{"event": "train", "round": r, "loss": 1 / r, "t": t0 + 10 * r - 5} for r in (1, 2, 3)]}
    events = [{"at": 0, "t": 0.0, "action": "pause", "node": "b", "ok": True, "detail": ""},
              {"at": 10, "t": 10.0, "action": "down", "link": ["a", "b"], "dir": "one", "ok": False, "detail": "x"},
              {"at": 99, "t": 99.0, "action": "resume", "node": "b", "ok": True, "detail": ""},
              {"at": 1, "t": float("nan"), "action": "kill", "node": "b", "ok": True, "detail": ""}]
    marks = results.event_rounds(events, metrics, t0)
    # round r starts at t0 + 10r - 5 (b's train record); 10 s is between round 1 (5 s) and 2 (15 s)
    assert marks == [(0.0, "pause b", True), (1.5, "down a->b", False), (3.0, "resume b", True)], marks
    assert results.event_rounds(events, metrics, None) == [] and results.event_rounds(None, metrics, t0) == []
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    plain.mkdir()
    marked.mkdir()
    results.draw(plain, metrics, "a")
    results.draw(marked, metrics, "a", events=events, t0=t0)
    for png in ("accuracy.png", "loss.png", "summary.png"):
        assert (marked / png).read_bytes() != (plain / png).read_bytes(), png
    summary = results.summarize("fl", metrics, "a", 30.0, {"a": 1, "b": 2})
    summary["events"] = events[:3]
    table = results.table(summary)
    assert "pause b: ok" in table and "down a->b: FAILED x" in table, table


def stub_faults(m, clock=time.time) -> StubManager:
    stub = StubManager(clock)
    m.node_fault, m.link_fault, m.link_rate = stub.node_fault, stub.link_fault, stub.link_rate
    return stub


def test_the_route_sets_checks_and_refuses_during_a_run(manager, node_stub):
    m = manager
    m.tb.links = {"c1": [{"dest": "c2", "bw": "10mbit"}]}
    m.node_fault = None          # a manager without fault actions takes no scenario
    r = http("POST", ctl(m, "/scenario"), json=[{"at": 0, "node": "c2", "action": "kill"}])
    assert r.status_code == 400 and "no fault actions (node_fault)" in r.json()["error"], r.text
    stub = stub_faults(m)
    r = http("POST", ctl(m, "/scenario"), json={"events": [{"at": -1, "node": "zz", "action": "kill"},
                                                           {"at": 1, "link": ["c2", "c1"], "action": "down"}]})
    assert r.status_code == 400, r.text
    for words in ("events[0].at", "'zz' is not a node", "c2 -> c1 is not a link"):
        assert words in r.json()["error"], r.text
    assert m.scenario is None
    doc = {"events": [{"at": 0, "node": "c2", "action": "pause", "for": 3600},
                      {"at": 0, "link": ["c1", "c2"], "action": "rate", "bw": "1mbit"}]}
    r = http("POST", ctl(m, "/scenario"), json=doc)
    assert r.status_code == 200 and len(r.json()["events"]) == 3, r.text
    assert http("GET", ctl(m, "/scenario")).json()["events"] == r.json()["events"]
    # a run under way (what /start does: started_at, then the scenario starts)
    m.started_at = time.time()
    m.start_scenario()
    # both events at 0 fired (the scheduler's thread fires them one after the other)
    wait_until(lambda: len(stub.calls) >= 2, 30, "both events at 0")
    for method in ("POST", "DELETE"):
        r = http(method, ctl(m, "/scenario"), json=doc)
        assert r.status_code == 409 and "under way" in r.json()["error"], r.text
    r = http("GET", ctl(m, "/finish"), timeout_s=180)
    assert r.status_code == 200, r.text
    summary = r.json()
    evs = summary["events"]
    assert [(e["action"], e.get("node") or e.get("link"), e["ok"], e["source"]) for e in evs] == [
        ("pause", "c2", True, "events[0]"), ("rate", ["c1", "c2"], True, "events[1]"),
        ("resume", "c2", True, "end of run")], evs
    assert all(math.isfinite(e["t"]) and 0 <= e["t"] < 600 for e in evs)
    on_disk = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert on_disk["events"] == evs
    # after /finish the next run's scenario may be set again, or cleared
    assert http("DELETE", ctl(m, "/scenario")).status_code == 200 and m.scenario is None


def test_run_script_refuses_a_bad_scenario_before_deploying(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps([{"at": -5, "node": "n9", "action": "kill"},
                             {"at": 1, "link": ["n3", "n2"], "action": "down"}]))
    p = subprocess.run([sys.executable, str(ROOT / "controller" / "fl_run.py"), "--auto", "--port", "3391",
                        "--scenario", str(f)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    for words in (str(f), "events[0].at", "'n9' is not a node", "n3 -> n2 is not a link of links.json"):
        assert words in p.stderr, p.stderr
    assert "deployed" not in p.stdout and "tc finish" not in p.stdout


# ----------------------------------------------------------------------------- for real
RNAMES = ["sa1", "st2", "st3", "st4"]


@pytest.mark.root
def test_fl_on_netns_nodes_with_a_trainer_paused_and_resumed(tmp_path):
    """FL on netns nodes (the --auto workflow's drive): a trainer frozen at 1 s for 6 s
    (cgroup freezer), a link's rate changed in place at 2 s, another trainer's uplink down
    from 3 s to 5 s; the run completes, and
    summary.json lists the events with ok=true at their times (each fired at or after its
    offset), the table shows them; netns_testbed checks nothing is left."""
    from controller.fl_run import FlManager
    from tests.support.workflow import netns_testbed, run_workflow

    links = {"sa1": [{"dest": n, "bw": "40mbit"} for n in RNAMES[1:]],
             **{n: [{"dest": "sa1", "bw": "20mbit"}] for n in RNAMES[1:]}}
    roles = {n: "fl_aggregator.py" if n == "sa1" else "fl_trainer.py" for n in RNAMES}
    with netns_testbed(tmp_path, FlManager, roles, links, port=3430, subnet="10.249.0.0/24") as (tb, m):
        doc = {"events": [{"at": 1, "node": "st2", "action": "pause", "for": 6},
                          {"at": 2, "link": ["st3", "sa1"], "action": "rate", "bw": "10mbit"},
                          {"at": 3, "link": ["st4", "sa1"], "action": "down", "for": 2}]}
        r = http("POST", ctl(m, "/scenario"), json=doc)
        assert r.status_code == 200 and len(r.json()["events"]) == 5, r.text
        summary = run_workflow(tb, m, tmp_path, alg="fl", root="sa1", timeout_s=300, dataset={
            "sa1": {"test_len": 10, "test_start_index": 1, "batch_size": 64},
            **{n: {"train_len": 10, "train_start_index": 1 + 10 * i, "batch_size": 32}
               for i, n in enumerate(RNAMES[1:])}}, structure={"node_list": [
                {"name": "sa1", "trainer_fraction": 1.0, "sync": 5}] + [{"name": n, "epoch": 2} for n in RNAMES[1:]]})
        assert summary["rounds"] == 5 and summary.get("error") is None, summary
        assert all(math.isfinite(p["accuracy"]) and 0 <= p["accuracy"] <= 1 for p in summary["accuracy_per_round"])
        evs = summary["events"]
        assert [(e["action"], e.get("node") or e.get("link"), e["ok"]) for e in evs] == [
            ("pause", "st2", True), ("rate", ["st3", "sa1"], True), ("down", ["st4", "sa1"], True),
            ("up", ["st4", "sa1"], True), ("resume", "st2", True)], evs
        assert evs[4]["source"] == "events[0].for", "the run ended before the resume was due"
        for e in evs:
            assert math.isfinite(e["t"]) and e["at"] <= e["t"] < e["at"] + 60, e
        run_dir = Path(summary["run_dir"])
        assert json.loads((run_dir / "summary.json").read_text())["events"] == evs
        assert m.tb.links["st3"][0]["bw"] == "10mbit"
        assert "resume st2: ok" in results.table(summary)
        assert not m.scheduler.alive()
        # the plots' marks: each event on the round axis, in order, within the run's rounds
        metrics = {n: results.parse_metrics((run_dir / f"{n}.metrics.jsonl").read_text()) for n in RNAMES}
        marks = results.event_rounds(evs, metrics, m.started_at)
        xs = [x for x, _, _ in marks]
        assert len(marks) == 5 and xs == sorted(xs) and all(0 <= x <= 5 for x in xs), marks
        assert [label for _, label, _ in marks][0] == "pause st2"


def test_a_good_scenario_file_reaches_the_manager_of_a_run_script(tmp_path):
    """--scenario's path without deploying: fl_run's testbed, auto.load_scenario, then the
    manager the testbed makes at start() holds the events for /start."""
    from controller import auto
    from controller.fl_run import build
    f = tmp_path / "good.json"
    f.write_text(json.dumps({"events": [{"at": 5, "link": ["n2", "n1"], "action": "down", "for": 2}],
                             "availability": {"n3": [[0, 4], [6, None]]}}))
    tb = build(port=0)
    auto.load_scenario(tb, str(f))
    m = tb.manager_class(tb)
    try:
        assert [(e.at, e.label()) for e in m.scenario] == [(4, "pause n3"), (5, "down n2->n1"), (6, "resume n3"),
                                                          (7, "up n2->n1")]
        assert m.scheduler is None      # nothing fires before /start
    finally:
        m.close()
