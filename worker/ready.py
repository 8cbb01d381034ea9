"""Readiness: whether a node's app answers, found by one background thread for all nodes.

After the agent starts an app it asks the Prober to watch it: (node name, the address its
app serves on as seen from the agent, a cheap "is it still running" check). The prober's
one thread TCP-connects to every watched address, non-blocking and all at once (so a few
hundred nodes cost one thread and a few hundred sockets), about every PERIOD_S: a node is
ready once a connection is accepted, and is then no longer probed. It stops probing a node
whose app stopped or exited (running() says False) or that the agent forgets (stop,
reset). There is no deadline here: how long to wait is the controller's to decide, which
polls `GET /status` ("ready": true|false per node).

The probe opens a connection and closes it without sending anything: the runtime's HTTP
server and `iperf3 -s` alike take it as a client that went away.
"""
from __future__ import annotations

import errno
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

PERIOD_S = 0.2            # between two attempts on one node
ATTEMPT_S = 1.0           # one connect attempt (an address that drops SYNs says nothing)


@dataclass(eq=False)
class _Watch:
    addr: tuple[str, int]
    running: Callable[[], bool | None]
    next_at: float = 0.0
    sock: socket.socket | None = field(default=None, repr=False)
    give_up_at: float = 0.0


def _running(w: _Watch) -> bool | None:
    try:
        return w.running()
    except Exception:  # noqa: BLE001 - not known; the next attempt asks again
        return None


class Prober:
    """Which watched nodes answer; thread-safe; one thread, started on the first watch."""

    def __init__(self, *, period_s: float = PERIOD_S, attempt_s: float = ATTEMPT_S):
        self.period_s, self.attempt_s = period_s, attempt_s
        self._cond = threading.Condition()
        self._watched: dict[str, _Watch] = {}
        self._ready: set[str] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ----------------------------------------------------------------- the agent's side
    def watch(self, name: str, addr: tuple[str, int], running: Callable[[], bool | None]) -> None:
        """Probe `addr` until it accepts, running() is False, or forget(name)."""
        with self._cond:
            if self._closed:
                return
            self._ready.discard(name)
            self._watched[name] = _Watch(addr=(str(addr[0]), int(addr[1])), running=running)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="edgetb-ready", daemon=True)
                self._thread.start()
            self._cond.notify()

    def forget(self, name: str) -> None:
        """No longer probed, and not ready (its app was stopped or removed)."""
        with self._cond:
            self._watched.pop(name, None)
            self._ready.discard(name)

    def ready(self, name: str) -> bool:
        with self._cond:
            return name in self._ready

    def watching(self) -> set[str]:
        with self._cond:
            return set(self._watched)

    def close(self, timeout_s: float = 5.0) -> None:
        """End the thread (an agent that shuts down)."""
        with self._cond:
            self._closed = True
            self._watched.clear()
            self._cond.notify()
            t = self._thread
        if t is not None:
            t.join(timeout_s)

    # ----------------------------------------------------------------- the thread
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        mine: dict[str, _Watch] = {}          # what this thread probes (sockets are its alone)
        try:
            while True:
                with self._cond:
                    while not self._watched and not self._closed:
                        self._settle(sel, mine, {})
                        self._cond.wait()      # nothing to probe: no polling at all
                    if self._closed:
                        break
                    wanted = dict(self._watched)
                self._settle(sel, mine, wanted)
                now = time.monotonic()
                for name, w in list(mine.items()):
                    if w.sock is None and w.next_at <= now:
                        if _running(w) is False:      # exited: nothing will answer
                            self._drop(sel, name, w, mine, ready=False)
                        else:
                            self._connect(sel, name, w, mine, now)
                    elif w.sock is not None and w.give_up_at <= now:
                        self._retry(sel, w, now)
                waits = [w.give_up_at if w.sock else w.next_at for w in mine.values()]
                timeout = max(0.0, min([now + self.period_s] + waits) - time.monotonic())
                if not sel.get_map():
                    with self._cond:               # nothing in flight: wait, woken by watch/close
                        self._cond.wait(timeout)
                    continue
                for key, _ in sel.select(timeout):
                    name, w = key.data
                    err = w.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err == 0:
                        self._drop(sel, name, w, mine, ready=True)
                    else:
                        self._retry(sel, w, time.monotonic())
        finally:
            for w in mine.values():
                self._close(sel, w)
            sel.close()
            with self._cond:
                self._thread = None

    def _settle(self, sel, mine: dict, wanted: dict) -> None:
        """Let go of what the agent forgot or watches anew; take up what it added."""
        for name, w in list(mine.items()):
            if wanted.get(name) is not w:
                self._close(sel, w)
                del mine[name]
        for name, w in wanted.items():
            mine.setdefault(name, w)

    def _connect(self, sel, name: str, w: _Watch, mine: dict, now: float) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(w.addr)
        if err == 0:
            s.close()
            self._drop(sel, name, w, mine, ready=True)
        elif err in (errno.EINPROGRESS, errno.EAGAIN):
            w.sock, w.give_up_at = s, now + self.attempt_s
            sel.register(s, selectors.EVENT_WRITE, (name, w))
        else:                                   # refused at once (loopback), unreachable, ...
            s.close()
            w.next_at = now + self.period_s

    def _retry(self, sel, w: _Watch, now: float) -> None:
        self._close(sel, w)
        w.next_at = now + self.period_s

    @staticmethod
    def _close(sel, w: _Watch) -> None:
        if w.sock is not None:
            try:
                sel.unregister(w.sock)
            except (KeyError, ValueError):
                pass
            w.sock.close()
            w.sock = None

    def _drop(self, sel, name: str, w: _Watch, mine: dict, *, ready: bool) -> None:
        """Done with a node: it answered (ready) or its app is gone."""
        self._close(sel, w)
        mine.pop(name, None)
        with self._cond:
            if self._watched.get(name) is w:      # not forgotten or watched anew meanwhile
                del self._watched[name]
                if ready:
                    self._ready.add(name)
