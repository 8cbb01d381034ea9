"""HTTP calls between the parts of the testbed (controller, agents, node apps): one
deadline for a whole exchange, a cap on the answer, retries only of what cannot have
arrived, and the classification of a failed call (Reply: dead, refused, timeout, error).
"""
from __future__ import annotations

import heapq
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

import requests

from dml_app.bounded_input import human_bytes
from dml_app.node_auth import TOKEN_HEADER

_session_local = threading.local()


class HttpError(RuntimeError):
    """A call that did not get a 2xx answer; `status` is None when nothing answered.

    `sent` says whether the request may have reached the peer: False only when the TCP
    connection was refused or timed out before it was made (nothing left this host), so
    sending it again cannot apply it twice; True for an answer and for a read timeout or
    a connection dropped after the request went out. `not_sent` is its negation."""

    def __init__(self, method: str, url: str, status: int | None, message: str, *, sent: bool = True):
        self.method, self.url, self.status, self.message = method, url, status, message
        self.sent = bool(sent) or status is not None
        where = f"{method} {url}"
        super().__init__(f"{where}: HTTP {status}: {message}" if status else f"{where}: {message}")

    @property
    def not_sent(self) -> bool:
        return not self.sent


# Why a peer gave nothing (Reply.why; a Gather's missing): its port refused the connection
# (nothing listens: the app is dead or not up), it answered with an HTTP error, nothing
# came back in time (a read timeout, a dropped connection, a deadline), or the call failed
# before it was made (a bad address, weights that do not pack).
DEAD, REFUSED, TIMEOUT, ERROR = "dead", "refused", "timeout", "error"


@dataclass
class Reply:
    """What one peer gave back to a call: `ok` with `value`, or why not (`why` one of
    dead, refused, timeout, error; `status` the HTTP status of a refusal; `message` the
    reason in words: a refusal's is the peer's own answer)."""
    peer: str
    ok: bool
    value: Any = None
    why: str | None = None
    status: int | None = None
    message: str = ""


def reply_for(peer: str, e: Exception) -> Reply:
    """The Reply for a call to `peer` that raised `e` (the node runtime's fan_out and the
    controller's drivers classify failures this one way)."""
    if isinstance(e, HttpError):
        if e.status is not None:
            return Reply(peer, False, why=REFUSED, status=e.status, message=e.message)
        return Reply(peer, False, why=DEAD if e.not_sent else TIMEOUT, message=str(e))
    return Reply(peer, False, why=ERROR, message=f"{type(e).__name__}: {e}")


def _not_sent(e: Exception) -> bool:
    """Whether a requests failure happened before the request left: the connection was
    refused (or the name did not resolve) or the connect timed out. A read timeout, a
    reset or a dropped connection may have delivered it."""
    if isinstance(e, requests.ConnectTimeout):
        return True
    if not isinstance(e, requests.ConnectionError) or isinstance(e, requests.Timeout):
        return False
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    seen: set[int] = set()
    stack: list = [e]
    while stack:           # requests wraps urllib3's MaxRetryError, whose .reason says why
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, (NewConnectionError, ConnectTimeoutError)):
            return True
        stack.extend([getattr(cur, "reason", None), cur.__cause__]
                     + [a for a in getattr(cur, "args", ()) if isinstance(a, BaseException)])
    return False


# Every call has one deadline for the whole exchange (connect, send, headers, body) and a
# cap on the answer. A per-read timeout alone (what requests' `timeout` is) lets a peer
# that trickles a byte a second hold the caller forever, so: each socket operation waits
# at most what is left of the deadline, the body is read in chunks with the deadline
# checked between them, and a watchdog thread shuts the connection's socket down
# DEADLINE_SLACK_S after the deadline (a read that keeps getting bytes never times out).
ANSWER_LIMIT = 64 << 20     # the answer a call reads when it names no max_bytes (64 MiB)
DEADLINE_SLACK_S = 0.5      # the watchdog's margin: a silent peer ends as a read timeout first


class _Deadline:
    """One call's deadline (time.monotonic() `at`) and the connections it is using."""

    def __init__(self, at: float):
        self.at = at
        self.expired = False      # the watchdog shut its connections down
        self.done = False
        self._conns: list = []
        self._lock = threading.Lock()

    def left(self) -> float:
        return self.at - time.monotonic()

    def attach(self, conn) -> None:
        """A connection this call uses (in the caller's thread); shut at once when late."""
        with self._lock:
            if self.done:
                return
            if not any(c is conn for c in self._conns):
                self._conns.append(conn)
            if self.expired:
                _shut(conn)

    def expire(self) -> None:
        """From the watchdog: the deadline passed with the call still under way."""
        with self._lock:
            if self.done:
                return
            self.expired = True
            for c in self._conns:
                _shut(c)

    def bound_reads(self) -> None:
        """Make the next socket reads wait at most what is left of the deadline."""
        left = max(self.left(), 0.001)
        with self._lock:
            for c in self._conns:
                sock = getattr(c, "sock", None)
                if sock is not None:
                    try:
                        sock.settimeout(left)
                    except OSError:
                        pass

    def finish(self) -> None:
        with self._lock:
            self.done = True
            self._conns.clear()


def _shut(conn) -> None:
    """Shut a connection's socket down (from any thread): a blocked connect, send or recv
    returns at once. The plain socket's shutdown, also under TLS (SSLSocket.shutdown would
    drop the TLS object another thread is reading through)."""
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


class _Watchdog:
    """One daemon thread for the deadlines of every call of the process."""

    def __init__(self):
        self._cv = threading.Condition()
        self._heap: list = []
        self._seq = 0
        self._thread: threading.Thread | None = None

    def add(self, d: _Deadline) -> None:
        with self._cv:
            self._seq += 1
            heapq.heappush(self._heap, (d.at + DEADLINE_SLACK_S, self._seq, d))
            if len(self._heap) > 4096:      # calls that ended long before their deadline
                self._heap = [e for e in self._heap if not e[2].done]
                heapq.heapify(self._heap)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="net-deadlines")
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    while self._heap and self._heap[0][2].done:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cv.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        d = heapq.heappop(self._heap)[2]
                        break
                    self._cv.wait(wait)
            try:
                d.expire()
            except Exception:   # noqa: BLE001  the watchdog must outlive any one call
                pass


_watchdog = _Watchdog()


def _new_watchdog() -> None:
    global _watchdog
    _watchdog = _Watchdog()     # a forked child (the zygote's) has no thread of its parent


os.register_at_fork(after_in_child=_new_watchdog)


def _attach(conn) -> None:
    d = getattr(_session_local, "deadline", None)
    if d is not None:
        d.attach(conn)


def _deadline_connection(base):
    """A urllib3 connection class that registers with the calling thread's deadline and
    waits in each socket operation at most what is left of it."""

    class Conn(base):
        def connect(self):
            super().connect()
            _attach(self)

        def request(self, *a, **kw):
            _attach(self)
            d = getattr(_session_local, "deadline", None)
            if d is not None and self.sock is not None:
                self.sock.settimeout(max(d.left(), 0.001))
            return super().request(*a, **kw)

        def getresponse(self, *a, **kw):
            d = getattr(_session_local, "deadline", None)
            if d is not None:
                left = max(d.left(), 0.001)
                if self.timeout is None or not isinstance(self.timeout, (int, float)) or self.timeout > left:
                    self.timeout = left
            return super().getresponse(*a, **kw)

    Conn.__name__ = Conn.__qualname__ = "Deadline" + base.__name__
    return Conn


def _deadline_adapter() -> requests.adapters.HTTPAdapter:
    import urllib3

    class Pool(urllib3.HTTPConnectionPool):
        ConnectionCls = _deadline_connection(urllib3.connection.HTTPConnection)

    class TlsPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = _deadline_connection(urllib3.connection.HTTPSConnection)

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *a, **kw):
            super().init_poolmanager(*a, **kw)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TlsPool}

    return Adapter()


def _session() -> requests.Session:
    s = getattr(_session_local, "s", None)
    if s is None:
        s = requests.Session()
        s.trust_env = False  # testbed addresses never go through a user's proxy
        adapter = _deadline_adapter()
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        _session_local.s = s
    return s


def call(method: str, url: str, *, token: str | None = None, json: Any = None,
         data: bytes | str | None = None, params: Mapping[str, Any] | None = None,
         headers: Mapping[str, str] | None = None, timeout_s: float = 30.0,
         retries: int = 0, max_bytes: int | None = None) -> requests.Response:
    """One HTTP call; raises HttpError on a connection failure or a non-2xx answer.

    `timeout_s` bounds the whole exchange of one attempt: connecting, sending, the
    answer's headers and its body (a peer that trickles its answer is cut off at the
    deadline: HttpError "no answer within N s", sent). `max_bytes` caps the answer
    (HttpError beyond; default ANSWER_LIMIT, 64 MiB), whatever the peer.
    `retries` repeats only a call that cannot have reached the peer (connection refused,
    connect timeout: the peer not listening yet), never one that was answered or may have
    arrived (read timeout, dropped connection), so a POST is never applied twice; waits
    grow from 0.1 s to 1 s. The HttpError's `sent` says which case ended the call.
    """
    if not url.startswith("http://") and not url.startswith("https://"):
        url = "http://" + url
    limit = ANSWER_LIMIT if max_bytes is None else int(max_bytes)
    hdrs = dict(headers or {})
    hdrs.setdefault("Accept-Encoding", "identity")   # the cap counts what the peer sends
    if token:
        hdrs[TOKEN_HEADER] = token
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.1 * 2 ** (attempt - 1), 1.0))
        deadline = _Deadline(time.monotonic() + timeout_s)
        _session_local.deadline = deadline
        _watchdog.add(deadline)
        try:
            r = _session().request(method, url, json=json, data=data, params=params,
                                   headers=hdrs, timeout=(timeout_s, timeout_s), stream=True)
            _read_bounded(r, limit, method, url, deadline, timeout_s)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as e:
            # the last two: an answer cut short or garbled (the peer died while it answered)
            last = e
            if _not_sent(e) and not deadline.expired:
                continue
            if deadline.expired or deadline.left() <= 0:
                raise HttpError(method, url, None, f"no answer within {timeout_s:g} s, the deadline of the "
                                                   f"whole call ({type(e).__name__}: {e})", sent=True) from None
            raise HttpError(method, url, None, f"no answer ({type(e).__name__}: {e})", sent=True) from None
        finally:
            deadline.finish()
            _session_local.deadline = None
        if r.status_code >= 300:
            raise HttpError(method, url, r.status_code, r.text.strip()[:500])
        return r
    raise HttpError(method, url, None, f"no answer ({type(last).__name__}: {last})", sent=False)


def _read_bounded(r: requests.Response, max_bytes: int, method: str, url: str,
                  deadline: _Deadline | None = None, timeout_s: float | None = None) -> None:
    """Read a streamed answer into r.content, refusing more than max_bytes and, with a
    deadline, an answer still coming when it passes (checked between chunks; the socket
    reads wait at most what is left; the watchdog cuts a read that keeps getting bytes)."""
    def over(n: str) -> HttpError:
        r.close()
        return HttpError(method, url, r.status_code, f"answer of {n} bytes is over the limit of "
                                                     f"{human_bytes(max_bytes)} ({max_bytes} bytes)")

    def late(got: int) -> HttpError:
        r.close()
        return HttpError(method, url, None, f"no answer within {timeout_s:g} s, the deadline of the whole "
                                            f"call ({got} bytes of the answer had come)", sent=True)
    declared = r.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise over(declared)
    buf = bytearray()
    try:
        for chunk in r.iter_content(16 << 10):
            buf += chunk
            if len(buf) > max_bytes:
                raise over(f"more than {max_bytes}")
            if deadline is not None:
                if deadline.expired or deadline.left() <= 0:
                    raise late(len(buf))
                deadline.bound_reads()
    except BaseException:
        r.close()
        raise
    # A connection shut by the watchdog ends a body without a length as if it were whole.
    if deadline is not None and deadline.expired:
        raise late(len(buf))
    r._content = bytes(buf)


def get_json(url: str, **kw) -> Any:
    return call("GET", url, **kw).json()


def post_json(url: str, body: Any, **kw) -> Any:
    r = call("POST", url, json=body, **kw)
    return r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else r.text
