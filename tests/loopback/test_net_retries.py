"""net.call's retry rule on real sockets: a request that may have arrived is never sent
again (a read timeout, a dropped connection, an answer); one that cannot have arrived
(connection refused) is retried; HttpError.sent says which case it was."""
from __future__ import annotations

import socket
import struct
import threading

import pytest
import requests

from dml_app import net
from controller import testbed as tbm


class RecordingServer:
    """Accepts connections one at a time, in order; records each request line. A request
    for /slow is held unanswered until close(); /drop is closed without an answer; any
    other path gets 200 at once. Requests reach it in the order they were sent (one
    accept loop over one backlog), so once a later marker request is recorded, every
    earlier request is recorded too."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.paths: list[str] = []
        self.held: list[socket.socket] = []
        self.seen = threading.Condition()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            path = data.split(b" ")[1].decode() if data.count(b" ") >= 2 else "?"
            with self.seen:
                self.paths.append(path)
                self.seen.notify_all()
            if path == "/slow":
                self.held.append(conn)
            elif path == "/drop":
                conn.close()
            elif path == "/cut":    # the peer dies mid-answer: headers, part of the body, RST
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                conn.close()

    def recorded_before_marker(self) -> list[str]:
        """Every request sent so far (a marker request, waited for, flushes the backlog)."""
        net.call("GET", f"127.0.0.1:{self.port}/marker", timeout_s=10)
        with self.seen:
            assert self.seen.wait_for(lambda: "/marker" in self.paths, timeout=10)
            paths = list(self.paths)
        self.paths.clear()
        return paths[:paths.index("/marker")]

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture
def server():
    s = RecordingServer()
    yield s
    s.close()


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_no_resend_after_a_read_timeout(server, method):
    with pytest.raises(net.HttpError) as ei:
        net.call(method, f"127.0.0.1:{server.port}/slow", json={"x": 1}, timeout_s=0.5, retries=3)
    e = ei.value
    assert e.status is None and e.sent and not e.not_sent and "ReadTimeout" in str(e), str(e)
    assert server.recorded_before_marker() == ["/slow"]      # once, not 4 times
    assert not tbm.not_sent(e)


def test_no_resend_after_a_dropped_connection(server):
    with pytest.raises(net.HttpError) as ei:
        net.call("POST", f"127.0.0.1:{server.port}/drop", data=b"g", timeout_s=5, retries=3)
    assert ei.value.status is None and ei.value.sent, str(ei.value)
    assert server.recorded_before_marker() == ["/drop"]


def test_an_answer_cut_halfway_is_a_sent_call_without_an_answer(server):
    """requests raises ChunkedEncodingError (not a ConnectionError) for a body cut short;
    it is an HttpError like any answer that never came whole, never an error of its own
    (an E-tree relay answered 500 when the node it forwarded to was killed mid-answer)."""
    with pytest.raises(net.HttpError) as ei:
        net.call("POST", f"127.0.0.1:{server.port}/cut", data=b"g", timeout_s=5, retries=3)
    e = ei.value
    assert e.status is None and e.sent and "ChunkedEncodingError" in str(e), str(e)
    assert net.reply_for("p", e).why == "timeout"
    assert server.recorded_before_marker() == ["/cut"]


def test_an_answer_is_never_resent(server):
    r = net.call("POST", f"127.0.0.1:{server.port}/ok", data=b"g", retries=3)
    assert r.status_code == 200 and r.text == "ok\n"
    assert server.recorded_before_marker() == ["/ok"]


def test_a_refused_connection_is_retried_until_the_peer_listens(monkeypatch):
    """The port is bound but not listening (the kernel refuses); after the first refusal
    it starts listening, and the retry is answered."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    attempts: list[str] = []
    real = requests.Session.request

    def counting(self, method, url, **kw):
        attempts.append(url)
        try:
            return real(self, method, url, **kw)
        finally:
            if len(attempts) == 1:
                srv.listen(4)
                threading.Thread(target=answer_one, daemon=True).start()

    def answer_one():
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nyes")

    monkeypatch.setattr(requests.Session, "request", counting)
    try:
        r = net.call("POST", f"127.0.0.1:{port}/x", json={}, timeout_s=5, retries=2)
    finally:
        srv.close()
    assert r.text == "yes" and len(attempts) == 2, attempts


def test_refused_every_time_says_not_sent(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]      # bound, never listening: every connect is refused
        attempts = []
        real = requests.Session.request
        monkeypatch.setattr(requests.Session, "request",
                            lambda self, m, u, **kw: (attempts.append(u), real(self, m, u, **kw))[1])
        with pytest.raises(net.HttpError) as ei:
            net.call("POST", f"127.0.0.1:{port}/x", json={}, timeout_s=5, retries=3)
    e = ei.value
    assert e.status is None and e.not_sent and not e.sent and len(attempts) == 4, (str(e), attempts)
    assert tbm.not_sent(e)


def test_an_http_error_answer_counts_as_sent():
    e = net.HttpError("POST", "u", 409, "no", sent=False)
    assert e.sent and not e.not_sent
