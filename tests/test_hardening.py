"""What the controller and the nodes take from peers that need not be trusted: answers
bounded in size and in time, files read only inside the project, text shown on the
console without terminal escapes, finished runs closed, gossip senders checked."""
from __future__ import annotations

import socket
import threading
import tracemalloc

import pytest

from dml_testutil import wait_until  # noqa: F401  (puts dml_app on sys.path)
from controller import ra_run
from controller.ra_run import RaManager
from dml_app import net
from test_controller import make_testbed


# ----------------------------------------------------------------------------- bounded answers

class BadPeer:
    """An HTTP peer on loopback that never finishes an answer. Modes:
    head: a status line, then a header one byte every 0.2 s, forever;
    body: full headers (Content-Length 1 MB), then the body one byte every 0.2 s;
    endless: headers without a length, then 16 KiB chunks as fast as they go, forever."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.sent = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                if self.mode == "head":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                elif self.mode == "body":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                block = b"x" * (16 << 10)
                while not self.stop.is_set():
                    if self.mode == "endless":
                        conn.sendall(block)
                        self.sent += len(block)
                    else:
                        conn.sendall(b"a")
                        self.sent += 1
                        self.stop.wait(0.2)
            except OSError:
                return      # the caller gave up: what we want

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def bad_peer():
    made = []

    def make(mode):
        made.append(BadPeer(mode))
        return made[-1]
    yield make
    for p in made:
        p.close()


def ends(fn, *, within_s: float = 90.0):
    """fn() run in a thread: (its result, its exception); fails if it is still running
    after within_s (a generous bound: the verdict is that it ended)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:   # noqa: BLE001
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(within_s)
    assert not t.is_alive(), f"the call is still running after {within_s} s"
    return out.get("value"), out.get("error")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["head", "body"])
def test_a_trickling_peer_cannot_hold_a_call_past_its_deadline(bad_peer, mode):
    peer = bad_peer(mode)
    _, err = ends(lambda: net.call("GET", f"127.0.0.1:{peer.port}/stats", timeout_s=1.5, retries=2))
    assert isinstance(err, net.HttpError), err
    assert err.status is None and err.sent, str(err)
    assert "no answer within 1.5 s" in err.message and "deadline" in err.message, err.message
    assert peer.sent >= 1      # it did trickle: a per-read timeout alone would never have fired


@pytest.mark.timeout(120)
def test_an_endless_answer_is_cut_at_the_cap_with_bounded_memory(bad_peer):
    peer = bad_peer("endless")
    cap = 2 * net.MiB
    tracemalloc.start()
    try:
        _, err = ends(lambda: net.call("GET", f"127.0.0.1:{peer.port}/log", timeout_s=60, max_bytes=cap))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(err, net.HttpError), err
    assert "over the limit of 2 MiB" in err.message, err.message
    assert peak < 4 * cap, f"{peak} bytes held for an answer capped at {cap}"


@pytest.mark.timeout(180)
def test_an_answer_without_a_cap_gets_the_default_cap(bad_peer):
    peer = bad_peer("endless")
    _, err = ends(lambda: net.call("GET", f"127.0.0.1:{peer.port}/x", timeout_s=120))
    assert isinstance(err, net.HttpError), err
    assert f"over the limit of {net.human_bytes(net.ANSWER_LIMIT)}" in err.message, err.message


@pytest.fixture
def ra_manager(tmp_path):
    tb = make_testbed(tmp_path, {}, names=("n1",))
    m = RaManager(tb)
    yield m
    m.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["head", "body"])
def test_the_ring_driver_loses_a_trickling_member_at_its_deadline(ra_manager, bad_peer, mode):
    peer = bad_peer(mode)
    node = ra_manager._nodes()["n1"]
    node.ip, node.port = "127.0.0.1", peer.port
    missing: dict[str, str] = {}
    got, err = ends(lambda: ra_manager._post(["n1"], "/ra/train", lambda n: {"round": 0}, 1.0, missing, 0))
    assert err is None and got == {} and missing == {"n1": ra_run.TIMEOUT}, (got, err, missing)


@pytest.mark.timeout(120)
def test_the_ring_driver_takes_no_endless_answer(ra_manager, bad_peer):
    peer = bad_peer("endless")
    node = ra_manager._nodes()["n1"]
    node.ip, node.port = "127.0.0.1", peer.port
    _, err = ends(lambda: ra_manager._post(["n1"], "/ra/train", lambda n: {"round": 0}, 60.0, {}, 0))
    assert isinstance(err, RuntimeError) and "over the limit of 1 MiB" in str(err), err

