"""Serving: the waitress server every part of the testbed answers on (controller, agents,
node apps, actions), with caps against floods of connections and a serving loop that
cannot die silently.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

from dml_app.bounded_input import DEFAULT_WEIGHTS_LIMIT, body_limits, human_bytes

# Every server of the testbed is a waitress server made by Server below, so one piece
# decides what floods of connections can do to it:
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
