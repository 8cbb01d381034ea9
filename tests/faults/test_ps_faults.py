"""The parameter server under real faults: netns nodes, the --auto workflow
(auto.drive), real SIGKILL to a worker's cgroup through the controller
(Manager.node_fault), real PyTorch on the MNIST subset.

* sync, 4 workers, one killed mid-run and restarted later: every step is applied; the
  versions after the kill wait for the 3 live workers only (applied well within the
  deadline, the Gather's probe finds the dead one at once), with their mean; the
  restarted worker is started by the controller (ParameterServer.on_rejoin), pulls, and is
  waited for again; accuracy close to the no-fault run's;
* async, one worker killed: the run completes, and nothing the victim trained after
  the kill is applied;
* the sync deadline counts from when the version was served (a real server process,
  fake workers): a gradient pushed late in the window leaves only the rest of it.
"""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.loopback.test_ps_server import data, gradients, make_server, pull, push  # noqa: F401
from tests.support.procs import wait_until
from tests.support.workflow import netns_testbed, run_workflow
from dml_app import net

from controller.ps_run import PsManager

NAMES = [f"k{i}" for i in range(1, 6)]
SERVER, WORKERS = NAMES[0], NAMES[1:]
VICTIM = "k3"
LINKS = {SERVER: [{"dest": w, "bw": "200mbit"} for w in WORKERS], **{w: [{"dest": SERVER, "bw": "100mbit"}] for w in WORKERS}}
DATASET = {SERVER: {"test_len": 10, "test_start_index": 1, "batch_size": 32},
           **{w: {"train_len": 10, "train_start_index": 1 + 10 * i, "batch_size": 32} for i, w in enumerate(WORKERS)}}
SYNC = {"mode": "sync", "steps": 150, "lr": 0.05, "momentum": 0.9, "eval_every": 30, "step_timeout_s": 10}
ASYNC = {"mode": "async", "steps": 240, "lr": 0.1, "momentum": 0.0, "eval_every": 60, "max_staleness": 3}
KILL_AT, RESTART_AT = 30, 75      # server versions at which the victim is killed, then restarted


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _ps_run(tmp: Path, conf: dict, faults=(), *, port: int, subnet: str):
    """A PS run of SERVER and WORKERS on netns nodes; `faults` [(version, node, action)]
    fired in order (Manager.node_fault) once the server's version reached each one.
    Returns (summary, the server's metrics, the server's log, the victim's log, fired)."""
    roles = {SERVER: "ps_server.py", **{w: "ps_worker.py" for w in WORKERS}}
    fired, errors = [], []
    with netns_testbed(tmp, PsManager, roles, LINKS, port=port, subnet=subnet) as (tb, m):
        srv = tb.all_nodes()[SERVER]

        def version() -> int:
            try:
                v = net.get_json(f"http://{srv.ip}:{srv.port}/ps/status", token=tb.node_token(SERVER),
                                 timeout_s=5).get("version")
            except net.HttpError:
                return -1
            return v if isinstance(v, int) else -1

        def injector():
            try:
                for at, node, action in faults:
                    wait_until(lambda: version() >= at, 150, f"the server at version {at}", period_s=0.05)
                    v = version()
                    out = m.node_fault(node, action)
                    fired.append({"version": v, "after": version(), "node": node, "action": action,
                                  "ok": out["ok"], "detail": out["detail"]})
            except Exception as e:     # shown by the test
                errors.append(e)
        t = threading.Thread(target=injector, daemon=True)
        if faults:
            t.start()
        structure = {**conf, "node_list": [{"name": SERVER, "role": "server"}] + [{"name": w} for w in WORKERS]}
        summary = run_workflow(tb, m, tmp, alg="ps", dataset=DATASET, structure=structure, root=SERVER,
                               timeout_s=180)
        if faults:
            t.join(60)
    assert not errors and not t.is_alive(), errors
    run_dir = Path(summary["run_dir"])
    victim_log = run_dir / f"{VICTIM}.log"       # none when it was dead at the end (logs_missing)
    return (summary, _metrics(run_dir / f"{SERVER}.metrics.jsonl"), (run_dir / f"{SERVER}.log").read_text(),
            victim_log.read_text() if victim_log.exists() else None, fired)


@pytest.mark.root
@pytest.mark.timeout(400)
def test_sync_goes_on_without_a_killed_worker_and_takes_it_back(tmp_path):
    base, base_recs, base_log, _, _ = _ps_run(tmp_path / "nofault", SYNC, port=3484, subnet="10.251.0.0/24")
    steps = SYNC["steps"]
    assert base["rounds"] == steps and "error" not in base, base
    assert base["participants"] == [] and base["missing_nodes"] == {}       # nobody ever missing
    assert re.findall(r"Step: version=\d+, (gradients=\d),", base_log) == ["gradients=4"] * steps

    summary, recs, log, victim_log, fired = _ps_run(
        tmp_path / "kill", SYNC, [(KILL_AT, VICTIM, "kill"), (RESTART_AT, VICTIM, "restart")],
        port=3484, subnet="10.251.0.0/24")
    assert [(f["node"], f["action"], f["ok"]) for f in fired] == [(VICTIM, "kill", True), (VICTIM, "restart", True)], fired
    assert "started" in fired[1]["detail"], fired     # ParameterServer.on_rejoin started the worker again
    assert summary["rounds"] == steps and "error" not in summary, summary
    others = [w for w in WORKERS if w != VICTIM]

    # every step applied once, in order; each with 4 gradients, or 3 while the victim was out
    applied = [(int(v), int(g)) for v, g in re.findall(r"Step: version=(\d+), gradients=(\d),", log)]
    assert [v for v, _ in applied] == list(range(1, steps + 1)), applied
    out = [v for v, g in applied if g == 3]
    assert all(g in (3, 4) for _, g in applied) and out, applied
    first, last = out[0], out[-1]
    assert out == list(range(first, last + 1)), out     # one stretch: from the kill to the rejoin
    assert KILL_AT <= fired[0]["version"] < first <= fired[0]["after"] + 2, (first, fired)
    assert fired[1]["version"] <= last < steps, (last, fired)

    # the participants events: exactly the versions made without the victim, each by the
    # 3 live workers' mean, the victim dead, applied within the deadline (one attempt)
    parts = [r for r in recs if r["event"] == "participants"]
    assert [r["round"] for r in parts] == out, parts
    for r in parts:
        assert r["participants"] == others and r["missing"] == {VICTIM: "dead"} and r["attempt"] == 1, r
        assert r["waited_s"] < SYNC["step_timeout_s"], r
    # after the first (where it was found dead), the victim is not waited for at all
    waits = [r["waited_s"] for r in parts]
    assert max(waits[1:]) < 3.0, waits
    assert f"{VICTIM} pulled version" in log and "waited for again" in log
    # one log for both lives (the restarted app appends): gradients on versions up to the
    # kill, then again on versions after its restart, nothing in between; it may have
    # trained version `first` itself and been killed before that gradient was all sent
    trained = [int(v) for v in re.findall(r"Train: loss=[\d.]+, round=(\d+),", victim_log)]
    before = [v for v in trained if v < fired[1]["version"]]
    after = [v for v in trained if v >= fired[1]["version"]]
    assert trained == before + after and before and max(before) <= first, (trained, first)
    assert after and max(after) >= last, (after, last)

    # summary.json says the same
    assert [(p["node"], p["round"]) for p in summary["participants"]] == [(SERVER, v) for v in out]
    assert summary["missing_nodes"] == {VICTIM: {"first_round": first, "last_round": last, "why": "dead",
                                                 "rounds_missed": len(out)}}, summary["missing_nodes"]

    # identical to the no-fault run until the kill (the same seeds, the same batches, the
    # mean in the conf's order), then close to it
    acc = {p["round"]: p["accuracy"] for p in summary["accuracy_per_round"]}
    base_acc = {p["round"]: p["accuracy"] for p in base["accuracy_per_round"]}
    assert acc[SYNC["eval_every"]] == base_acc[SYNC["eval_every"]]
    assert abs(summary["final_accuracy"] - base["final_accuracy"]) <= 0.05, (acc, base_acc)
    print(f"\nPS sync, {VICTIM} killed at version {fired[0]['version']} and restarted at {fired[1]['version']}: "
          f"versions {first}..{last} without it (waited at most {max(waits):.2f} s, step_timeout_s "
          f"{SYNC['step_timeout_s']}); final accuracy {summary['final_accuracy']:.4f} vs "
          f"{base['final_accuracy']:.4f} without the fault; wall {summary['wall_seconds']:.1f} s vs "
          f"{base['wall_seconds']:.1f} s")


@pytest.mark.root
@pytest.mark.timeout(300)
def test_async_completes_with_a_killed_worker(tmp_path):
    summary, recs, log, _, fired = _ps_run(tmp_path, ASYNC, [(60, VICTIM, "kill")], port=3484,
                                           subnet="10.251.0.0/24")
    steps = ASYNC["steps"]
    assert fired[0]["ok"] and summary["rounds"] == steps and "error" not in summary, (fired, summary)
    applied = [(int(v), w, int(s)) for v, w, s in
               re.findall(r"Step: version=(\d+), from=(\w+), staleness=(\d+),", log)]
    assert [v for v, _, _ in applied] == list(range(1, steps + 1))
    # nothing trained after the kill: a gradient the victim had already written to its
    # socket still reaches the server after SIGKILL (the kernel sends what is queued),
    # so one may be applied later, but only one, and pulled before the kill
    # (a step's pulled version is version - 1 - staleness)
    by_victim = [(v, v - 1 - s) for v, w, s in applied if w == VICTIM]
    late = [(v, pulled) for v, pulled in by_victim if v > fired[0]["after"]]
    assert by_victim and len(late) <= 1 and all(pulled <= fired[0]["after"] for _, pulled in late), \
        (by_victim, fired)
    assert not [r for r in recs if r["event"] == "participants"]      # async waits for nobody
    assert VICTIM in summary["logs_missing"]          # dead at the end: its log could not be fetched
    accs = [p["accuracy"] for p in summary["accuracy_per_round"]]
    assert accs[-1] > accs[0], accs
    print(f"\nPS async, {VICTIM} killed at version {fired[0]['version']}: {steps} steps, accuracy {accs}")


# ----------------------------------------------------------------------------- the deadline


@pytest.mark.timeout(120)
def test_the_sync_deadline_counts_from_when_the_version_was_served(make_server, data):
    """A real server, two fake workers (alive: they answer, but one never pushes): the
    first gradient, pushed late in a 3 s window, is applied at the version's deadline
    (3 s after the version was served), before 3 s after that push (the old rule): the
    server's own times put served < pushed < applied < pushed + 3 s. The event says who
    was missing and why (timeout). The silent worker, which did not even pull, is not
    waited for in the next version; once it pulls again it is, from the version after."""
    _, d = data
    srv, fakes, _ = make_server(["pd1", "pd2"], mode="sync", steps=4, lr=0.1, step_timeout_s=3)
    params = pull(srv, fakes["pd1"], -1)           # version 0 was served before this pull
    g = gradients(params, d.meta, d.train_x, d.train_y, 1)[0]
    time.sleep(2.0)                                # the scenario: a push late in the window
    t_push = time.time()
    assert push(srv, "pd1", 0, g).json() == {"applied": False, "version": 0}
    wait_until(lambda: srv.call("GET", "/ps/status").json()["version"] == 1, 10, "version 1")
    recs = [json.loads(line) for line in srv.call("GET", "/metrics").text.splitlines() if line.strip()]
    parts = [r for r in recs if r["event"] == "participants"]
    assert [(r["round"], r["participants"], r["missing"], r["attempt"]) for r in parts] == \
        [(1, ["pd1"], {"pd2": "timeout"}, 1)], parts
    applied = parts[0]["t"]
    served = applied - parts[0]["waited_s"]
    assert parts[0]["waited_s"] >= 3.0, parts                     # not before the deadline
    assert served < t_push < applied < t_push + 3.0, (served, t_push, applied)     # the old rule: >= push + 3 s
    # the step is pd1's gradient alone: p - lr * g
    new, _ = net.unpack_weights(srv.call("GET", "/ps/model").content)
    for k in g:
        assert torch.allclose(new[k], params[k] - 0.1 * g[k], atol=1e-6), k
    # pd2 had not pulled version 0: not waited for in version 1, so pd1's gradient
    # completes version 1 at once
    assert srv.call("GET", "/ps/status").json()["gone"] == {"pd2": "timeout"}

    def step(worker, have, offset, applied, version):
        p = pull(srv, fakes[worker], have)
        gr = gradients(p, d.meta, d.train_x[offset:], d.train_y[offset:], 1)[0]
        assert push(srv, worker, have + 1, gr).json() == {"applied": applied, "version": version}
    step("pd1", 0, 32, True, 2)
    # pd2 pulls again (during version 2): waited for again from version 3 on
    pull(srv, fakes["pd2"], -1)
    assert srv.call("GET", "/ps/status").json()["gone"] == {}
    step("pd1", 1, 64, True, 3)                     # version 2 did not wait for it
    step("pd1", 2, 96, False, 3)                    # version 3 does
    step("pd2", 2, 128, True, 4)


@pytest.mark.timeout(120)
def test_a_version_with_no_gradient_waits_again_then_the_run_fails_clearly(make_server, data):
    """No gradient by a version's deadline: it is served again (another step_timeout_s),
    a gradient in that second window is applied (attempt 2 in the event); a version
    that gets none in 1 + step_retries windows ends the run: state error, naming the
    version and every worker with why."""
    _, d = data
    srv, fakes, ctl = make_server(["pr1", "pr2"], mode="sync", steps=5, lr=0.1, step_timeout_s=2, step_retries=2)
    params = pull(srv, fakes["pr1"], -1)
    g = gradients(params, d.meta, d.train_x, d.train_y, 1)[0]
    # pushed once the server says the first window passed empty: inside the second
    wait_until(lambda: "version 0: no gradient within step_timeout_s 2 s" in srv.call("GET", "/log").text, 10,
               "the first deadline to pass")
    assert push(srv, "pr1", 0, g).json() == {"applied": False, "version": 0}
    wait_until(lambda: srv.call("GET", "/ps/status").json()["version"] == 1, 10, "version 1")
    # version 1: pr2 never pulled (not waited for), pr1 pushes nothing: 3 empty windows
    wait_until(lambda: srv.call("GET", "/stats").json()["state"] == "error", 30, "the server to fail")
    stats = srv.call("GET", "/stats").json()
    assert stats["error"] == ("version 1: no gradient from any worker in 3 deadline(s) of step_timeout_s 2 s: "
                              "pr1 (timeout), pr2 (timeout)"), stats
    recs = [json.loads(line) for line in srv.call("GET", "/metrics").text.splitlines() if line.strip()]
    parts = [(r["round"], r["participants"], r["missing"], r["attempt"]) for r in recs if r["event"] == "participants"]
    assert parts == [(1, ["pr1"], {"pr2": "timeout"}, 2), (1, [], {"pr1": "timeout", "pr2": "timeout"}, 3)], parts
    waited = [r["waited_s"] for r in recs if r["event"] == "participants"]
    assert waited[0] >= 4.0 and waited[1] >= 6.0, waited     # 2 and 3 windows of 2 s (the attempts above)
    assert not ctl.finished.is_set()
    log = srv.call("GET", "/log").text
    assert "version 0: no gradient within step_timeout_s 2 s (pr1 (timeout), pr2 (timeout)); waiting again (1/2)" in log
