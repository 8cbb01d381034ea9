"""The runtime's many-peer helpers on real HTTP: rt.fan_out (bounded, with a deadline,
per peer what came back or why not), rt.broadcast_weights and rt.gather; and the round
loop on them (rounds.Rounds: an attempt's answers, its quorum, the run's stop)."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from flask import Flask, request
from werkzeug.exceptions import Conflict

from tests.support.procs import TOKEN, free_port, wait_until
from dml_app import net
from dml_app.rounds import Rounds
from dml_app.runtime import Gather, Reply, Runtime


@pytest.fixture
def rt(scratch):
    r = Runtime("peers", env={"NET_NODE_NAME": "p1", "DML_PORT": "0", net.TOKEN_ENV: TOKEN,
                              "DML_LOG_DIR": str(scratch / "log"), "DML_DATASET_DIR": str(scratch / "none")})
    yield r
    r.close()


@pytest.fixture
def peer():
    """A peer with /ok, /busy (409) and /hold (answers only once released); counts bodies."""
    app = Flask("peer")
    net.require_token(app, TOKEN)
    release = threading.Event()
    got: list[tuple[str, int]] = []

    @app.post("/ok")
    def ok():
        got.append(("ok", len(request.get_data())))
        return "fine"

    @app.post("/busy")
    def busy():
        return "not now", 409

    @app.post("/hold")
    def hold():
        got.append(("hold", len(request.get_data())))
        release.wait(60)
        return "late"

    srv = net.Server(app, "127.0.0.1", 0).start()
    yield f"127.0.0.1:{srv.port}", got, release
    release.set()
    srv.close()


def test_fan_out_says_per_peer_what_came_back_or_why_not(rt, peer):
    addr, got, release = peer
    dead = f"127.0.0.1:{free_port()}"       # nothing listens there
    route = {"a": f"{addr}/ok", "b": f"{addr}/busy", "c": f"{dead}/ok", "d": f"{addr}/hold", "e": "bad addr"}

    def call(name):
        if " " in route[name]:
            raise ValueError("not an address")
        return net.call("POST", route[name], token=TOKEN, data=b"x", timeout_s=30, retries=2).text

    out = rt.fan_out(list(route), call, deadline_s=2)
    release.set()
    assert list(out) == list(route)
    assert out["a"].ok and out["a"].value == "fine" and out["a"].why is None
    assert not out["b"].ok and out["b"].why == "refused" and out["b"].status == 409 and "not now" in out["b"].message
    assert out["c"].why == "dead", out["c"]
    assert out["d"].why == "timeout" and "deadline" in out["d"].message, out["d"]
    assert out["e"].why == "error" and "ValueError" in out["e"].message
    # a peer whose own call times out (nothing comes back: it may have arrived) is `timeout`
    release.clear()
    out = rt.fan_out(["d"], lambda n: net.call("POST", f"{addr}/hold", token=TOKEN, data=b"y", timeout_s=0.3),
                     deadline_s=60)
    release.set()
    assert out["d"].why == "timeout" and out["d"].status is None and "ReadTimeout" in out["d"].message
    # each sent once (the second is recorded by the peer's thread, maybe after our timeout)
    wait_until(lambda: len([g for g in got if g[0] == "hold"]) >= 2, 10, "the second /hold to arrive")
    assert [g for g in got if g[0] == "hold"] == [("hold", 1), ("hold", 1)]
    with pytest.raises(ValueError):
        rt.fan_out(["a"], call, deadline_s=float("nan"))
    assert rt.fan_out([], call, deadline_s=1) == {}


def test_fan_out_is_bounded(rt):
    running, peak, lock = [0], [0], threading.Lock()
    gate = threading.Barrier(3, timeout=30)

    def work(n):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            gate.wait()          # 3 at a time meet here; a 4th at once would be left waiting
        finally:
            with lock:
                running[0] -= 1
        return n
    out = rt.fan_out([f"n{i}" for i in range(9)], work, deadline_s=60, limit=3)
    assert all(r.ok for r in out.values()) and peak[0] == 3, (out, peak)


def test_broadcast_weights_packs_once_and_reports_each_peer(rt, peer):
    addr, got, release = peer
    release.set()
    sd = {"w": torch.ones(4, 3)}
    out = rt.broadcast_weights({"a": addr, "c": f"127.0.0.1:{free_port()}"}, "/ok", sd, {"round": 1},
                               deadline_s=30)
    assert out["a"].ok and out["c"].why == "dead"
    size = len(net.pack_weights(sd, {"round": 1}))
    assert ("ok", size) in got and rt.bytes_sent == size


def test_gather_takes_each_expected_peer_once_until_closed():
    g = Gather(["a", "b", "c"], tag="round 4")
    assert g.add("a", lambda: 10) == 10
    with pytest.raises(Conflict, match="already sent for round 4"):
        g.add("a", lambda: 11)
    with pytest.raises(Conflict, match="z was not asked in round 4"):
        g.add("z")
    g.drop("b", "dead")
    assert g.pending() == {"c"} and g.wait(0) is False
    t = threading.Thread(target=lambda: g.add("c", lambda: 30))
    t.start()
    assert g.wait(60) is True
    t.join()
    assert g.close() == ({"a": 10, "c": 30}, {"b": "dead"})
    with pytest.raises(Conflict, match="round 4 is closed"):
        g.add("b")
    g2 = Gather(["x", "y"])
    g2.add("y")
    assert g2.close() == ({"y": None}, {"x": "timeout"})


def test_a_peer_killed_while_it_read_the_weights_is_dead_not_timeout(rt, peer):
    """A broadcast whose connection drops (the peer died while it read) cannot tell
    whether the request arrived, so its reply is `timeout`; the gather probes such peers
    before giving up on them: one whose port now refuses is `dead`, one that still answers
    stays `timeout` (the FL round's `missing` a user reads)."""
    import socket
    addr, _, _ = peer
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    dying = f"127.0.0.1:{lsock.getsockname()[1]}"

    def die_mid_read():
        conn, _ = lsock.accept()
        conn.recv(1024)
        lsock.close()           # the app is gone: its port refuses from now on
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()            # RST, as the kernel does for a killed process's sockets
    t = threading.Thread(target=die_mid_read, daemon=True)
    t.start()
    try:
        sent = rt.broadcast_weights({"gone": dying}, "/train", {"w": torch.ones(256, 256)}, {"round": 1},
                                    deadline_s=30)
        t.join(30)
    finally:
        lsock.close()           # closed already unless the call never connected
    assert sent["gone"].why == "timeout", sent["gone"]
    g = rt.gather(["gone", "alive", "quiet"], tag="round 1", addresses={"gone": dying, "alive": addr, "quiet": addr})
    g.drop_all({"gone": "timeout", "alive": "timeout"})
    assert g.pending() == {"quiet"}
    assert g.close() == ({}, {"gone": "dead", "alive": "timeout", "quiet": "timeout"})


# A node frozen (a scenario's pause: its cgroup frozen) past a deadline: on thaw, what a
# peer sent it meanwhile waits in its sockets. A child process, SIGSTOPped by the test,
# must not call that peer missing for its own stall.
FROZEN_NODE = r'''
import json, os, sys, threading, time
from dml_app import net
from dml_app.rounds import Rounds
from dml_app.runtime import Gather, Reply, Runtime
rt = Runtime("frozen", env={"NET_NODE_NAME": "fz", "DML_PORT": "0", net.TOKEN_ENV: os.environ[net.TOKEN_ENV],
                            "DML_LOG_DIR": sys.argv[3], "DML_DATASET_DIR": sys.argv[3]})
# 1: a call whose answer comes while this node is frozen past the fan-out's deadline
print("fan-out", flush=True)
out = rt.fan_out(["d"], lambda n: net.call("POST", f"http://{sys.argv[2]}/hold", token=os.environ[net.TOKEN_ENV],
                                           data=b"z", timeout_s=30).text, deadline_s=1.0)
print(json.dumps({"ok": out["d"].ok, "why": out["d"].why, "value": out["d"].value}), flush=True)
# 2: a gather whose peer arrives (here: a thread of this node) while it is frozen
g = Gather(["x"])
threading.Thread(target=lambda: (time.sleep(1.5), g.add("x", lambda: "got"))).start()
print("gather", flush=True)
print(json.dumps({"complete": g.wait(1.0), "arrived": g.close()[0]}), flush=True)
rt.close()
'''


def test_a_node_frozen_past_its_deadline_does_not_blame_the_peers(peer, scratch):
    import json, os, signal, subprocess, sys, time
    from pathlib import Path

    addr, got, release = peer
    app_dir = str(Path(net.__file__).resolve().parent)
    child = subprocess.Popen([sys.executable, "-c", FROZEN_NODE, app_dir, addr, str(scratch)], text=True,
                             stdout=subprocess.PIPE, env={**os.environ, net.TOKEN_ENV: TOKEN, "PYTHONPATH": app_dir})

    def freeze(seconds: float, before_thaw=lambda: None):
        child.send_signal(signal.SIGSTOP)
        time.sleep(seconds)       # the pause itself: frozen past the 1 s deadline
        before_thaw()
        child.send_signal(signal.SIGCONT)
    try:
        assert child.stdout.readline().strip() == "fan-out"
        wait_until(lambda: ("hold", 1) in got, 10, "the frozen node's call to arrive")
        freeze(2.5, release.set)               # the peer answers while the node is frozen
        assert json.loads(child.stdout.readline()) == {"ok": True, "why": None, "value": "late"}
        assert child.stdout.readline().strip() == "gather"
        time.sleep(0.3)
        freeze(2.5)
        assert json.loads(child.stdout.readline()) == {"complete": True, "arrived": {"x": "got"}}
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
            child.wait(10)


def test_a_round_collects_answers_until_the_deadline_then_refuses_late_ones(rt):
    rounds = Rounds(rt)
    said = {}

    def send(key):
        # b answers during the send; c's ask failed (dead); d never answers
        assert rounds.deliver(key, "b", lambda ctx: ctx + 1, late=lambda: "late") == 8
        with pytest.raises(Conflict, match="already sent for round 3"):
            rounds.deliver(key, "b", late=lambda: "late")
        return {"b": Reply("b", True), "c": Reply("c", False, why="dead", message="refused"),
                "d": Reply("d", True)}
    arrived, missing = rounds.collect(3, ["b", "c", "d"], send, deadline_s=0.2, tag="round 3", context=7,
                                      probe=lambda pending: {},
                                      on_refused=lambda p, why, msg: said.setdefault("refused", (p, why, msg)),
                                      on_late=lambda late: said.setdefault("late", late))
    assert (arrived, missing) == ({"b": 8}, {"c": "dead", "d": "timeout"})
    assert said == {"refused": ("c", "dead", "refused"), "late": ["d"]}
    assert not rounds.is_open(3) and rounds.context(3) is None
    with pytest.raises(Conflict, match="round 3 is over"):
        rounds.deliver(3, "d", late=lambda: "round 3 is over")


def test_the_quorum_retries_then_fails_the_node_naming_who_was_missing(rt):
    rounds = Rounds(rt)
    tries = []

    def attempt(k):
        tries.append(k)
        return ["a", "b", "c"], ({"a": 1, "b": 2} if k == 2 else {"a": 1}), {"b": "dead", "c": "timeout"}
    got = rounds.quorum(1, attempt, min_fraction=0.6, retries=2, what="round 1", peers="trainers")
    assert tries == [1, 2] and got[1] == {"a": 1, "b": 2}
    assert rounds.quorum(2, lambda k: (["a", "b"], {}, {"a": "dead", "b": "dead"}), min_fraction=0.5,
                         retries=1, what="round 2", peers="trainers") is None
    assert rt.state == "error" and rt.error.startswith("round 2: fewer than min_fraction 0.5 of the trainers "
                                                       "answered in 2 attempt(s): attempt 1: 0/2 answered")
    events = [json.loads(line) for line in open(rt.metrics_path)]
    assert [(e["round"], e["attempt"], e["accepted"]) for e in events if e["event"] == "participants"] == \
        [(1, 1, False), (1, 2, True), (2, 1, False), (2, 2, False)]


def test_the_run_ends_when_a_round_fails_or_the_node_stops(rt):
    rounds = Rounds(rt)
    ran = []
    assert rounds.run(range(1, 4), ran.append) is True and ran == [1, 2, 3]
    assert rounds.run(range(1, 4), lambda r: ran.append(r) or r < 2) is False and ran[3:] == [1, 2]
    rt.stop()
    assert rounds.run(range(1, 4), ran.append) is False and ran[5:] == []
