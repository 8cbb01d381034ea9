"""The one HTTP helper of the testbed: client calls, the token check, the WSGI server
and the safetensors wire format for model weights.

It is used by the controller, the agents and every node app, so it lives in dml_app/
(the only folder a node sees) and imports nothing else from the project.
"""
from __future__ import annotations

import hashlib
import heapq
import hmac
import json as jsonlib
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import requests

TOKEN_HEADER = "X-Testbed-Token"
TOKEN_ENV = "EDGE_TB_TOKEN"              # a node's own credential; an agent's admin token
PEER_TOKEN_ENV = "EDGE_TB_PEER_TOKEN"    # what the nodes of one testbed show each other
SERVICE_KEY_ENV = "EDGE_TB_SERVICE_KEY"  # a node's key for checking its clients' credentials

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


# ----------------------------------------------------------------------------- server side

def token_from_env() -> str:
    tok = os.environ.get(TOKEN_ENV, "")
    if not tok:
        raise RuntimeError(f"{TOKEN_ENV} is not set: the testbed token is required")
    return tok


# Credentials. The admin token opens the controller and the agents. Everything a node
# gets is derived from it, so the controller and every agent compute the same values
# and no node credential is ever stored or sent in a deployment body:
#   node_token(admin, n)  the node's own credential: n calls the controller with it (its
#                         heartbeat, log, finish) and the controller calls n with it;
#                         it speaks for n alone and opens nothing on an agent;
#   peer_token(admin)     what the nodes of one testbed show each other (role routes);
#   service_key(admin, s) node s's key for the credentials of its clients:
#   client_token(admin, s, c)  what node c shows node s's client routes (a serverless
#                         worker to its server); s checks it with its key alone
#                         (token_client), so it knows which node calls, and can mint
#                         credentials only for its own routes.
def _mac(admin: str, label: str) -> str:
    return hmac.new(admin.encode(), label.encode(), hashlib.sha256).hexdigest()[:40]


def node_token(admin: str, node: str) -> str:
    return f"node.{node}.{_mac(admin, 'node:' + node)}"


def peer_token(admin: str) -> str:
    return f"peer.{_mac(admin, 'peer')}"


def service_key(admin: str, node: str) -> str:
    return _mac(admin, "service:" + node)


def client_token(admin: str, server: str, client: str) -> str:
    return f"svc.{client}.{_mac(service_key(admin, server), 'client:' + client)}"


def token_client(key: str, given: str | None) -> str | None:
    """The node a client credential speaks for, checked with the server's service key;
    None when it is not a valid one."""
    if not key or not given or not given.startswith("svc.") or len(given) > 200:
        return None
    name = given[4:].rpartition(".")[0]
    if not name:
        return None
    want = f"svc.{name}.{_mac(key, 'client:' + name)}"
    return name if same_token(given, want) else None


def same_token(given: str | None, want: str | None) -> bool:
    """Constant-time comparison; an empty credential never matches."""
    return bool(given) and bool(want) and hmac.compare_digest(given.encode(), want.encode())


def token_node(admin: str, given: str | None) -> str | None:
    """The node a node credential speaks for, or None when it is not a valid one."""
    if not given or not given.startswith("node.") or len(given) > 200:
        return None
    name = given[5:].rpartition(".")[0]
    return name if name and same_token(given, node_token(admin, name)) else None


def require_token(app, token: str, *, peer_token: str | None = None,
                  owner_only: Iterable[str] = (), client_key: str | None = None,
                  client_routes: Iterable[str] | None = None) -> None:
    """Answer 401 to any request without a credential this server knows, before any
    handler runs.

    `token` opens every route (an agent's admin token; a node's own credential, which
    the controller holds too). `peer_token` (nodes: what the testbed's other nodes show)
    opens every route except the `owner_only` ones and the client routes. A client
    credential (client_token, checked with `client_key`) opens only the paths in
    `client_routes` (a set the caller may fill later), and `flask.g.client` is then the
    node it speaks for (None for the others). The controller has its own, finer check
    (controller/access.py).
    """
    from flask import g, request

    owner_only = frozenset(owner_only)
    clients = client_routes if client_routes is not None else set()

    @app.before_request
    def _check_token():
        g.client = None
        given = request.headers.get(TOKEN_HEADER, "")
        if same_token(given, token):
            return None
        if request.path in clients and client_key:
            node = token_client(client_key, given)
            if node is not None:
                g.client = node
                return None
        if peer_token and same_token(given, peer_token):
            if request.path in owner_only:
                return (f"{request.path} takes the controller's credential, not a peer's\n", 403)
            if request.path in clients:
                return (f"{request.path} takes a worker credential of this node's clients (the "
                        f"api_key its invoker passed), not the testbed's peer credential\n", 403)
            return None
        return ("missing or wrong testbed token (header " + TOKEN_HEADER + ")\n", 401)


# Serving. Every server of the testbed (controller, agents, node apps, actions) is a
# waitress server made by Server below, so one piece decides what floods of connections
# can do to it:
# * its loop waits with poll(), not select(): no ceiling at descriptor 1024;
# * the process's open-files limit is raised to its hard limit when the first one starts;
# * a connection is *trusted* once one of its requests got past the credential check
#   (any answer but 401 or 403); the untrusted ones (a client that has not yet shown a
#   credential, or showed a wrong one) are capped at UNTRUSTED_MAX per server, the
#   connections of one peer address at PER_PEER_MAX: past a cap the one that has been
#   quiet longest (and is not being answered) is closed, untrusted before trusted, so a
#   flood of idle connections cannot lock out the person at the controller;
# * an untrusted connection quiet for UNTRUSTED_IDLE_S is closed, a trusted one after
#   TRUSTED_IDLE_S (keep-alive between heartbeats);
# * the serving thread cannot die silently: an error in its loop is printed with its
#   traceback and the loop goes on; if it keeps failing, or stops while nobody closed
#   the server, the process is told (`on_fatal`, by default a SIGTERM to itself, which
#   the controller and the agents answer by removing every node).
UNTRUSTED_MAX = 1024
PER_PEER_MAX = 1024
UNTRUSTED_IDLE_S = 30.0
TRUSTED_IDLE_S = 120
ACCEPT_BATCH = 64            # connections accepted per poll() round
EVICT_GRACE_S = 1.0          # a new connection's time to send its request before a cap may close it
LOOP_FAILURES_MAX = 5        # errors of the serving loop within LOOP_FAILURE_WINDOW_S: it gives up
LOOP_FAILURE_WINDOW_S = 10.0
FD_RESERVE = 64              # descriptors left for files, pipes and outgoing calls
# The most connections one server holds at all: waitress stops accepting at this many.
# Every node keeps one to the controller for its heartbeats and one to each peer it sends
# to, so an aggregator of 299 trainers, or a controller of 300 nodes, needs hundreds.
CONNECTION_LIMIT = 16384

_nofile_lock = threading.Lock()


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (capped at 1 << 20);
    -> the soft limit now in force."""
    import resource

    with _nofile_lock:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
        if soft == resource.RLIM_INFINITY or soft >= want:
            return int(want if soft == resource.RLIM_INFINITY else soft)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError):
            return soft


def wait_fd(fd: int, timeout_s: float | None, *, write: bool = False) -> bool:
    """Whether `fd` is readable (writable) within timeout_s (None: wait); with poll(),
    which has no ceiling at descriptor 1024 as select() has."""
    import select

    p = select.poll()
    p.register(fd, select.POLLOUT if write else select.POLLIN)
    return bool(p.poll(None if timeout_s is None else max(0, int(timeout_s * 1000))))


def _fatal_default(message: str) -> None:
    import signal

    os.kill(os.getpid(), signal.SIGTERM)


class Server:
    """A waitress WSGI server on its own thread; `close()` stops it. See the comment
    above for what it does against floods of connections."""

    def __init__(self, app, host: str, port: int, *, threads: int = 8, max_body: int | None = None,
                 on_fatal: Callable[[str], None] | None = None):
        """`max_body`: the largest request body waitress takes at all (answered 413 from
        the headers, before the body is read); default: the largest limit the app's
        `limit_bodies` gives any route, DEFAULT_WEIGHTS_LIMIT for an app without.
        `on_fatal(message)`: called (once) if the serving loop cannot go on; default:
        SIGTERM to this process."""
        import logging

        from waitress.adjustments import Adjustments
        from waitress.task import ThreadedTaskDispatcher

        # "Task queue depth is N" at every queued request: a busy server says it hundreds
        # of times a second; the requests are served all the same.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)

        if max_body is None:
            limits = body_limits(app)
            max_body = limits.largest() if limits is not None else DEFAULT_WEIGHTS_LIMIT
        self.max_body = int(max_body)
        nofile = raise_open_files_limit()
        limit = max(64, min(CONNECTION_LIMIT, nofile - FD_RESERVE))
        # waitress refuses a body of max_request_body_size bytes or more: + 1 takes max_body itself.
        adj = Adjustments(host=host, port=port, threads=threads, ident="edgetb",
                          clear_untrusted_proxy_headers=True,
                          max_request_body_size=self.max_body + 1,
                          connection_limit=limit, asyncore_use_poll=True,
                          channel_timeout=TRUSTED_IDLE_S, cleanup_interval=1)
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(adj.threads)
        self._srv = _server_class()(app, {}, True, None, dispatcher=dispatcher, adj=adj,
                                    sockinfo=adj.listen[0])
        self._srv.untrusted_max = max(16, min(UNTRUSTED_MAX, limit // 2))
        self._srv.per_peer_max = max(16, min(PER_PEER_MAX, limit // 2))
        self.port = int(self._srv.effective_port)
        self.on_fatal = on_fatal or _fatal_default
        self._closing = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"http:{port}")

    def _run(self):
        import sys
        import traceback

        from waitress import wasyncore

        failures: list[float] = []
        while not self._closing:
            try:
                wasyncore.loop(timeout=self._srv.adj.asyncore_loop_timeout, map=self._srv._map,
                               use_poll=True)
            except Exception:  # noqa: BLE001 - said below, and the loop goes on or gives up
                if self._closing:
                    return
                now = time.monotonic()
                failures = [t for t in failures if now - t < LOOP_FAILURE_WINDOW_S] + [now]
                print(f"server on port {self.port}: error in its serving loop "
                      f"({len(failures)} in {LOOP_FAILURE_WINDOW_S:.0f} s):\n{traceback.format_exc()}",
                      file=sys.stderr, flush=True)
                if len(failures) < LOOP_FAILURES_MAX:
                    continue
                why = f"its serving loop failed {len(failures)} times in {LOOP_FAILURE_WINDOW_S:.0f} s"
                break
            else:
                why = "its serving loop ended"   # the map emptied: nobody closed us
                break
        else:
            return
        if self._closing:
            return
        message = f"server on port {self.port} stopped serving: {why}; shutting down"
        print(message, file=sys.stderr, flush=True)
        self.on_fatal(message)

    def start(self) -> "Server":
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._run()

    def connections(self) -> dict:
        """{'open': n, 'untrusted': n}: the connections this server holds now."""
        chans = list(self._srv.active_channels.values())
        return {"open": len(chans), "untrusted": sum(1 for c in chans if not c.trusted)}

    def close(self) -> None:
        self._closing = True
        # Let handler threads finish before the socket and trigger go, or waitress
        # raises EBADF in threads still answering.
        self._srv.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        self._srv.close()
        # Open keep-alive connections outlive the listening socket: a client's pooled
        # connection would hand its next request (even one meant for a new server on this
        # port) to the stopped dispatcher, and it would hang. Close them; the loop ends.
        from waitress import wasyncore

        wasyncore.close_all(self._srv._map, ignore_all=True)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)   # its loop ends within a poll timeout; then the port is free


def serve(app, host: str, port: int, *, threads: int = 8, max_body: int | None = None,
          on_fatal: Callable[[str], None] | None = None) -> Server:
    return Server(app, host, port, threads=threads, max_body=max_body, on_fatal=on_fatal).start()


def _evictable(ch) -> bool:
    """Not being answered (no complete request queued or in a handler) and not closing."""
    return not ch.requests and not ch.will_close and not ch.close_when_flushed and ch.connected


_SERVER_CLASS = None


def _server_class():
    """waitress's TCP server with the caps described above (one class, made once)."""
    global _SERVER_CLASS
    if _SERVER_CLASS is not None:
        return _SERVER_CLASS
    import errno

    from waitress.server import TcpWSGIServer

    class GuardedServer(TcpWSGIServer):
        channel_class = _channel_class()
        untrusted_max = UNTRUSTED_MAX
        per_peer_max = PER_PEER_MAX

        def _close_quietest(self, chans, n: int, now: float, *, grace_s: float = EVICT_GRACE_S) -> None:
            """Close up to n of `chans`: those quiet longest that are not being answered,
            untrusted before trusted, none younger than grace_s (a new connection gets
            that long to send its request)."""
            idle = sorted((c for c in chans if _evictable(c) and now - c.creation_time >= grace_s),
                          key=lambda c: (c.trusted, c.last_activity))
            for ch in idle[:n]:
                ch.handle_close()

        def _cap(self, now: float) -> None:
            """Hold at most per_peer_max connections of one peer address and untrusted_max
            untrusted ones (a burst may pass them for EVICT_GRACE_S, up to the server's
            connection limit)."""
            by_peer: dict = {}
            for ch in list(self.active_channels.values()):
                if ch.connected:
                    by_peer.setdefault(ch.addr[0] if isinstance(ch.addr, tuple) else ch.addr, []).append(ch)
            for chans in by_peer.values():
                if len(chans) > self.per_peer_max:
                    self._close_quietest(chans, len(chans) - self.per_peer_max, now)
            untrusted = [c for c in self.active_channels.values() if c.connected and not c.trusted]
            if len(untrusted) > self.untrusted_max:
                self._close_quietest(untrusted, len(untrusted) - self.untrusted_max, now)

        def handle_accept(self):
            # Up to ACCEPT_BATCH at a time: one per poll() round would keep a burst of
            # thousands waiting (every round walks every connection).
            accepted = 0
            for _ in range(ACCEPT_BATCH):
                try:
                    v = self.accept()
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        # Out of descriptors: make room, or the listening socket stays
                        # readable and the loop spins.
                        self._close_quietest(list(self.active_channels.values()), 1, time.time(), grace_s=0)
                    break
                if v is None:
                    break
                conn, addr = v
                try:
                    self.set_socket_options(conn)
                except OSError:
                    conn.close()
                    continue
                self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)
                accepted += 1
            if accepted:
                self._cap(time.time())

        def maintenance(self, now):
            super().maintenance(now)
            cutoff = now - UNTRUSTED_IDLE_S
            for ch in list(self.active_channels.values()):
                if not ch.trusted and _evictable(ch) and ch.last_activity < cutoff:
                    ch.will_close = True
            self._cap(now)

    _SERVER_CLASS = GuardedServer
    return GuardedServer


# ----------------------------------------------------------------------------- bounded input
# Every server of the testbed (controller, agents, nodes) bounds what it takes: a body
# limit per route (413, before the handler runs and before the body is read into memory),
# JSON no deeper than MAX_JSON_DEPTH with only finite numbers (400), and one checker for
# every number that comes from outside (`number`, ValueError naming the field).

KiB, MiB = 1 << 10, 1 << 20
JSON_LIMIT = 1 * MiB                # JSON control routes: confs, heartbeats, agent commands
DEFAULT_WEIGHTS_LIMIT = 64 * MiB    # weights routes of a role that declared no model
WEIGHTS_SLACK = 1 * MiB             # safetensors header and metadata on top of 2 x the model
MAX_JSON_DEPTH = 32                 # the testbed's own documents nest 5 deep at most
MAX_JSON_INT = 1 << 63              # no count, id or size of the testbed comes near this


class BodyError(ValueError):
    """A request body (or weights metadata) refused: invalid or too deep JSON, a number
    that is not finite, not the object a route needs. HTTP 400 with the message."""


def human_bytes(n: int) -> str:
    """1048576 -> '1 MiB', 1572864 -> '1.5 MiB', 900 -> '900 bytes'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n} bytes"


def _show(value: Any) -> str:
    """A value as the JSON a user wrote (true, NaN, "4"), cut to 40 characters."""
    try:
        text = jsonlib.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def number(value: Any, name: str, lo: float | None = None, hi: float | None = None, *,
           integer: bool = False, lo_open: bool = False, hi_open: bool = False) -> int | float:
    """`value` as a finite int (integer=True) or float within [lo, hi]; ValueError naming
    `name` for anything else: bools, strings (even "4"), None, NaN, +-Infinity, 1e309,
    fractions where an integer is needed, values out of range. `lo_open`/`hi_open` make
    a bound exclusive. A float with an integral value (2.0) is taken as an integer."""
    kind = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        rng = f" in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f" {'>' if lo_open else '>='} {_fmt(lo)}"
    elif hi is not None:
        rng = f" {'<' if hi_open else '<='} {_fmt(hi)}"
    else:
        rng = ""
    bad = ValueError(f"{name} must be {kind}{rng}, got {_show(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if isinstance(value, float):
        if not math.isfinite(value) or (integer and not value.is_integer()):
            raise bad
        if integer:
            value = int(value)
    elif abs(value) >= MAX_JSON_INT:
        raise bad
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise bad
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise bad
    return int(value) if integer else float(value)


def _check_tree(obj: Any, max_depth: int, what: str) -> None:
    """Depth and numbers of a parsed JSON document, iteratively (no recursion)."""
    stack = [(obj, 1, "")]
    while stack:
        cur, depth, path = stack.pop()
        if isinstance(cur, (dict, list)):
            if depth > max_depth:
                raise BodyError(f"{what}: JSON nested more than {max_depth} levels deep")
            items = cur.items() if isinstance(cur, dict) else enumerate(cur)
            for k, v in items:
                if isinstance(v, (dict, list, float)) or (isinstance(v, int) and not isinstance(v, bool)):
                    sub = f"{path}.{k}" if isinstance(cur, dict) else f"{path}[{k}]"
                    stack.append((v, depth + 1, sub.lstrip(".")))
        elif isinstance(cur, float) and not math.isfinite(cur):
            raise BodyError(f"{what}: {path or 'value'}: {_show(cur)} is not a finite number "
                            "(NaN, Infinity and numbers beyond 1e308 are refused)")
        elif isinstance(cur, int) and not isinstance(cur, bool) and abs(cur) >= MAX_JSON_INT:
            raise BodyError(f"{what}: {path or 'value'}: integer out of range (|n| < 2**63)")


def parse_json_body(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH, want_object: bool = True,
                    what: str = "body") -> Any:
    """Parse a JSON request body; BodyError (a ValueError, HTTP 400) when it is not valid
    JSON, nests deeper than `max_depth` (checked iteratively; the parser's own
    RecursionError is caught too), holds NaN, +-Infinity, 1e309 or an integer beyond
    2**63, or is not an object where `want_object`. `what` starts every message."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise BodyError(f"{what}: not valid JSON (not UTF-8)") from None
    try:
        obj = jsonlib.loads(raw)
    except RecursionError:
        raise BodyError(f"{what}: JSON nested more than {max_depth} levels deep") from None
    except ValueError as e:   # also a number of more than 4300 digits
        raise BodyError(f"{what}: not valid JSON ({e})") from None
    _check_tree(obj, max_depth, what)
    if want_object and not isinstance(obj, dict):
        raise BodyError(f"{what}: expected a JSON object {{...}}, got {type(obj).__name__}")
    return obj


class BodyLimits:
    """The body limit of each route of one app: a number of bytes or a function giving it
    at request time (weights routes follow the model). Routes are Flask rules
    ("/log", "/share/<digest>"); any other route gets `default`."""

    def __init__(self, default: int = JSON_LIMIT):
        self.default = default
        self.routes: dict[str, int | Callable[[], int]] = {}

    def set(self, rule: str, limit: int | Callable[[], int]) -> None:
        self.routes[rule] = limit

    def limit_for(self, rule: str | None) -> int:
        limit = self.routes.get(rule, self.default) if rule is not None else self.default
        return int(limit() if callable(limit) else limit)

    def largest(self) -> int:
        """What the server must take at all (its waitress bound), as the limits are now."""
        return max([self.default] + [self.limit_for(r) for r in self.routes])


def body_limits(app) -> BodyLimits | None:
    return app.extensions.get("edgetb.body_limits")


def limit_bodies(app, *, default: int = JSON_LIMIT,
                 routes: Mapping[str, int | Callable[[], int]] | None = None,
                 json_errors: bool = True) -> BodyLimits:
    """Bound every request body of `app` (call it once, after the credential check is
    installed, so that nobody without one makes the server parse anything):

    * a body over its route's limit is answered 413 with a message naming the limit,
      from Content-Length before the handler runs (waitress gives Content-Length to
      chunked bodies too, and `request.max_content_length` stops any later read);
    * a JSON body (Content-Type application/json) is parsed here by `parse_json_body`:
      400 for invalid JSON, too deep nesting or a number that is not finite; handlers'
      `request.get_json()` then returns that document, and the app's JSON loader is the
      same bounded parser for every other call;
    * answers are {"error": message} (`json_errors`) or plain text.
    The server's own bound (net.Server) is the largest of these limits.
    """
    from flask import jsonify, request
    from flask.json.provider import DefaultJSONProvider

    limits = BodyLimits(default)
    for rule, limit in (routes or {}).items():
        limits.set(rule, limit)
    app.extensions["edgetb.body_limits"] = limits

    class _BoundedJSON(DefaultJSONProvider):
        def loads(self, s, **kwargs):
            return parse_json_body(s, want_object=False)

    app.json = _BoundedJSON(app)

    def refuse(status: int, message: str):
        if json_errors:
            return jsonify(error=message), status
        return (message + "\n", status, {"Content-Type": "text/plain; charset=utf-8"})

    @app.before_request
    def _bound_body():
        rule = request.url_rule.rule if request.url_rule is not None else None
        limit = limits.limit_for(rule)
        size = request.content_length
        if size is not None and size > limit:
            return refuse(413, f"{request.method} {request.path}: a body of {size} bytes is over this "
                               f"route's limit of {human_bytes(limit)} ({limit} bytes)")
        request.max_content_length = limit
        if request.routing_exception is None and request.is_json and size:
            try:
                doc = parse_json_body(request.get_data(cache=True), want_object=False)
            except BodyError as e:
                return refuse(400, str(e))
            request._cached_json = (doc, doc)   # what get_json() answers from now on
            request.environ["edgetb.json"] = doc
        return None

    return limits


def request_json(*, want_object: bool = True, what: str = "body") -> Any:
    """The current request's body as JSON (whatever its Content-Type), through
    parse_json_body; BodyError (HTTP 400) with the reason. Empty body: BodyError."""
    from flask import request

    if "edgetb.json" in request.environ:      # parsed and checked by limit_bodies already
        doc = request.environ["edgetb.json"]
        if want_object and not isinstance(doc, dict):
            raise BodyError(f"{what}: expected a JSON object {{...}}, got {type(doc).__name__}")
        return doc
    raw = request.get_data(cache=True)
    if not raw:
        raise BodyError(f"{what}: expected a JSON {'object' if want_object else 'document'}, got no body")
    return parse_json_body(raw, want_object=want_object, what=what)


def _channel_class():
    """waitress's connection class whose 413 (a body over the server's bound, refused from
    its headers before it is read) names the bound instead of waitress's off-by-one."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask, WSGITask
    from waitress.utilities import RequestEntityTooLarge

    class _WSGITask(WSGITask):
        def service(self):
            super().service()
            # Past the credential check (Server's caps: trusted connections go last).
            if self.wrote_header and not str(self.status).startswith(("401", "403")):
                self.channel.trusted = True

    class _ErrorTask(ErrorTask):
        def execute(self):
            e = self.request.error
            if isinstance(e, RequestEntityTooLarge):
                bound = self.channel.adj.max_request_body_size - 1
                size = self.request.content_length
                e.body = (f"a body{f' of {size} bytes' if size else ''} is over this server's limit "
                          f"of {human_bytes(bound)} ({bound} bytes)")
            super().execute()

    return type("BoundedChannel", (HTTPChannel,), {"error_task_class": _ErrorTask, "task_class": _WSGITask,
                                                   "trusted": False})


# ----------------------------------------------------------------------------- weights

def pack_weights(tensors: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> bytes:
    """State dict (+ JSON-able metadata) -> safetensors bytes."""
    import torch
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()
            if isinstance(v, torch.Tensor)}
    return save(flat, metadata={"edgetb": jsonlib.dumps(dict(meta or {}))})


def unpack_weights(body: bytes) -> tuple[dict, dict]:
    """safetensors bytes -> (tensors, metadata); ValueError for anything else, BodyError
    for metadata that is not a bounded JSON object (parse_json_body)."""
    from safetensors import safe_open  # noqa: F401  (imported for its error type below)
    from safetensors.torch import load

    if not body or len(body) < 8:
        raise ValueError("body is not safetensors (empty or shorter than its header)")
    header_len = int.from_bytes(body[:8], "little")
    if header_len <= 0 or 8 + header_len > len(body):
        raise ValueError("body is not safetensors (bad header length)")
    try:
        header = jsonlib.loads(body[8:8 + header_len])
        tensors = load(bytes(body))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"body is not safetensors ({type(e).__name__}: {e})") from None
    meta_raw = (header.get("__metadata__") or {}).get("edgetb", "{}")
    return tensors, parse_json_body(meta_raw, what="weights metadata")
