"""Servers that survive floods of connections, and a controller that always cleans up.

Another local user (uid 65534, a real process: tests/support/flood.py under setpriv) holds
1,500 idle TCP connections to a server; meanwhile root's plain `curl` is answered, a
whole `fl_run.py --auto` run beside the flood completes, and Ctrl-C or SIGTERM still
removes every node and link. Every server of the project is net.Server, so the unit
tests here stand for the controller, the agents, the node apps and the actions alike.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.support import ROOT

from tests.support import agents as ah
from dml_app import net

NOBODY = 65534
FLOOD = ROOT / "tests" / "support" / "flood.py"
SYSTEM_PYTHON = "/usr/bin/python3"     # another user cannot run root's own interpreter under /root
TOKEN = "flood-test-token"
FL_NODES = [f"n{i}" for i in range(1, 6)]     # controller/fl_run.py's nodes

need_root = ah.need("root", "needs root: the flood runs as another user" if os.geteuid() != 0 else None)


class Flood:
    """tests/support/flood.py run as uid 65534 against host:port; `open` is how many it holds."""

    def __init__(self, host: str, port: int, count: int, *, slow: bool = False, hold_s: float = 300):
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                SYSTEM_PYTHON, "-c", FLOOD.read_text(), host, str(port), str(count), "--hold-s", str(hold_s)]
        if slow:
            argv.append("--slow")
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        line = self.p.stdout.readline()     # "open N" once every connection is open
        m = re.match(r"open (\d+)", line)
        if not m:
            self.stop()
            raise AssertionError(f"the flood did not open its connections: {line!r} {self.p.stderr.read()[-500:]}")
        self.open = int(m.group(1))

    def stop(self) -> int:
        """End the flood; -> how many of its connections the server had closed."""
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(60)          # it checks its stdin every second
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        out = self.p.stdout.read()
        m = re.search(r"closed-by-server (\d+)", out or "")
        return int(m.group(1)) if m else -1


def curl(url: str, *headers: str, max_time_s: float = 2) -> int:
    """HTTP status of root's `curl`, 0 when it got no answer within max_time_s."""
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(max_time_s)]
    for h in headers:
        argv += ["-H", h]
    p = subprocess.run(argv + [url], capture_output=True, text=True, timeout=max_time_s + 10)
    return int(p.stdout or 0)


def small_app(token: str = TOKEN):
    from flask import Flask

    app = Flask("flood-target")
    net.require_token(app, token)

    @app.route("/hi")
    def hi():
        return "hi\n"
    return app


@pytest.fixture
def server():
    made = []

    def make(**kw):
        srv = net.Server(small_app(), "0.0.0.0", 0, threads=4, **kw).start()
        made.append(srv)
        return srv
    try:
        yield make
    finally:
        for srv in made:
            srv.close()


# ----------------------------------------------------------------------------- one server

@need_root
@pytest.mark.parametrize("slow", [False, True], ids=["idle", "slow-headers"])
def test_a_flood_of_1500_connections_leaves_a_credentialed_caller_served(server, slow):
    srv = server()
    url = f"http://127.0.0.1:{srv.port}/hi"
    flood = Flood("127.0.0.1", srv.port, 1500, slow=slow)
    try:
        assert flood.open == 1500
        for _ in range(5):
            assert curl(url, f"{net.TOKEN_HEADER}: {TOKEN}") == 200
        assert curl(url) == 401          # and a caller without a credential is still told so
        # within a moment of the burst the server holds no more untrusted ones than its cap
        deadline = time.monotonic() + 30
        while srv.connections()["untrusted"] > net.UNTRUSTED_MAX:
            assert time.monotonic() < deadline, srv.connections()
            time.sleep(0.1)
    finally:
        closed = flood.stop()
    # the server closed the flood's connections beyond its cap, the ones quiet longest
    assert closed >= 1500 - net.UNTRUSTED_MAX - 1, closed


@need_root
def test_trusted_keep_alive_connections_outlast_a_flood(server):
    srv = server()
    s = requests.Session()
    s.trust_env = False
    url = f"http://127.0.0.1:{srv.port}/hi"
    assert s.get(url, headers={net.TOKEN_HEADER: TOKEN}, timeout=5).status_code == 200
    flood = Flood("127.0.0.1", srv.port, 1500)
    try:
        # the pooled connection that showed its credential is still open: its next request
        # goes over it (no new connection), while the untrusted ones went first
        before = srv.connections()
        assert s.get(url, headers={net.TOKEN_HEADER: TOKEN}, timeout=5).status_code == 200
        assert before["open"] - before["untrusted"] >= 1, before
    finally:
        flood.stop()


def test_the_open_files_limit_is_raised_to_the_hard_limit():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        got = net.raise_open_files_limit()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert got == now
        assert now == (hard if hard != resource.RLIM_INFINITY else 1 << 20) or now == 1 << 20
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_serving_loop_that_keeps_failing_says_so_and_tells_the_process(server, monkeypatch, capfd):
    from waitress import wasyncore

    told: list[str] = []
    failed = threading.Event()

    def broken_loop(*a, **kw):
        raise ValueError("filedescriptor out of range in select()")

    def on_fatal(message):
        told.append(message)
        failed.set()

    monkeypatch.setattr(wasyncore, "loop", broken_loop)
    srv = server(on_fatal=on_fatal)
    assert failed.wait(30), "the server never said its loop had stopped"
    assert told and f"server on port {srv.port} stopped serving" in told[0], told
    err = capfd.readouterr().err
    assert "filedescriptor out of range in select()" in err     # the cause, with its traceback
    assert f"server on port {srv.port}: error in its serving loop" in err


def test_one_error_of_the_serving_loop_does_not_end_serving(server, monkeypatch, capfd):
    from waitress import wasyncore

    real = wasyncore.loop
    calls = []

    def once_broken(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("one bad poll")
        return real(*a, **kw)

    monkeypatch.setattr(wasyncore, "loop", once_broken)
    told = []
    srv = server(on_fatal=told.append)
    r = net.call("GET", f"127.0.0.1:{srv.port}/hi", token=TOKEN, timeout_s=10, retries=20)
    assert r.status_code == 200 and not told
    assert "one bad poll" in capfd.readouterr().err


# ----------------------------------------------------------------------------- the controller

def _controller(port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "controller/fl_run.py", "--port", str(port), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _read_until(p: subprocess.Popen, pattern: str, lines: list[str], timeout_s: float = 300) -> None:
    """Wait until a line of p's output (gathered by _pump) matches `pattern`."""
    deadline = time.monotonic() + timeout_s
    while not any(re.search(pattern, x) for x in list(lines)):
        if p.poll() is not None:
            time.sleep(0.5)      # the pump's last lines
            if any(re.search(pattern, x) for x in list(lines)):
                return
            raise AssertionError(f"exited {p.returncode} before {pattern!r}:\n" + "".join(lines[-40:]))
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout_s} s:\n" + "".join(lines[-40:])
        time.sleep(0.1)


def _pump(p: subprocess.Popen) -> list[str]:
    lines: list[str] = []

    def run():
        for line in p.stdout:
            lines.append(line)
    threading.Thread(target=run, daemon=True).start()
    return lines


def _end(p: subprocess.Popen) -> None:
    """The controller's own process group ends (SIGINT, then SIGKILL) whatever the test did."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)


@contextlib.contextmanager
def _controller_run(port: int, *extra: str):
    """fl_run.py on `port` -> (process, its output lines, floods to end with it); then
    the controller ends whatever happened, and nothing of its nodes may be left."""
    p = _controller(port, *extra)
    floods: list[Flood] = []
    try:
        yield p, _pump(p), floods
    finally:
        for f in floods:
            f.stop()
        _end(p)
    ah.assert_clean(extra_names=FL_NODES)


@need_root
def test_fl_auto_completes_beside_a_flood_and_root_is_answered_meanwhile():
    port = 3394
    with _controller_run(port, "--auto") as (p, lines, floods):
        _read_until(p, r"serving on port", lines, 120)
        floods.append(Flood("127.0.0.1", port, 1500))
        assert floods[0].open == 1500
        answered = []
        while p.poll() is None and len(answered) < 20:
            answered.append(curl(f"http://localhost:{port}/status"))
            time.sleep(0.5)
        assert p.wait(600) == 0, "".join(lines[-60:])
        out = "".join(lines)
        assert set(answered[:-1]) <= {200}, answered    # the last one may meet the controller leaving
        assert answered.count(200) >= 5, answered
        summary = json.loads((Path(re.search(r"summary.json in (\S+)", out).group(1)) / "summary.json").read_text())
        assert summary["final_accuracy"] >= 0.9


@need_root
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_removes_every_node_even_while_the_controller_is_flooded(sig):
    port = 3396
    with _controller_run(port) as (p, lines, floods):
        _read_until(p, r"apps answering: 5/5", lines, 300)
        floods.append(Flood("127.0.0.1", port, 1500))
        assert curl(f"http://localhost:{port}/status") == 200
        # Ctrl-C reaches the terminal's whole process group; `kill` the controller alone.
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        assert p.wait(120) == 0, "".join(lines[-40:])
        assert "removing every node and link" in "".join(lines)


@need_root
def test_sigterm_during_an_auto_run_removes_every_node():
    with _controller_run(3398, "--auto") as (p, lines, _):
        _read_until(p, r"started n1", lines, 300)
        p.send_signal(signal.SIGTERM)
        assert p.wait(120) == 130, "".join(lines[-40:])
        out = "".join(lines)
        assert "reset: every node and link removed" in out and "interrupted" in out


# ----------------------------------------------------------------------------- an agent


@need_root
def test_an_agent_keeps_answering_its_controller_under_a_flood(agent):
    flood = Flood("127.0.0.1", agent.port, 1500)
    try:
        assert flood.open == 1500
        for _ in range(3):
            assert agent.get("/hi", timeout_s=2)["backends"]
        assert curl(f"{agent.url}/hi") == 401      # without the token: refused, as ever
    finally:
        flood.stop()
    assert agent.alive() and agent.get("/hi")["backends"]
