"""The invoker: runs serverless activations on a pool of action containers, as
OpenWhisk's invoker does with the containers beside it.

Each container is an emulated node running an action server (dml_app/sl_action.py on
`DML_ACTION_PORT`, OpenWhisk's action protocol: `POST /init` once, then `POST /run` per
activation). The invoker

* keeps the pool's state: a container is cold (not initialised), warm (initialised and
  free), busy (one activation at a time, as OpenWhisk runs one per container) or lost;
* takes a warm container first, else a cold one, which it initialises (`/init`: the cold
  start); at most `concurrency` activations run at once; a caller waits for a free
  container at most `queue_timeout_s` (then the activation is a "timeout" that ran
  nowhere);
* gives every activation a new id (32 hex digits, as OpenWhisk's) and a deadline
  (`deadline_s` after its /run is sent, in the /run body in ms since the epoch: the
  action stops by it); the invoker's own wait for the answer ends at the deadline plus
  `grace_s`;
* records it: `{"activation_id", "node", "cold", "init_s" (cold only), "queued_s",
  "start", "end" (epoch s), "run_s", "start_s" (the start overhead: init_s + run_s minus
  the action's own training time, result.timings.train_s), "status", "result",
  "error", "attempt", "retry_of"}` with OpenWhisk's status names: "success" (200 and a
  JSON object), "application error" (the action's own {"error": ...}, answered 502),
  "action developer error" (anything else the container answered: a failed /init, a
  refused credential, an answer that is not a JSON object), plus "timeout" (the action
  stopped at its deadline, or no container was free in time) and "lost";
* treats a container whose /init or /run got no answer (connection refused, reset or
  dropped: the node was killed; or nothing by the deadline plus grace: it hangs) or that
  says it is busy with another run as lost: that activation's record says "lost", its
  worker id is unregistered on the server with the server's own credential (when
  `server` is given), and the activation is retried as a NEW activation (new id,
  `retry_of` the lost one's) on another container, at most `retries` times. Action
  errors are never retried (OpenWhisk does not either). A lost container is probed on
  its node runtime's /hi every second; once it answers it is cold again (a restarted
  app needs /init; one that kept its /init answers 403 "more than once" and is used
  as it is). A warm container whose /run is refused as not initialised (its app
  restarted unseen: nothing ran) is cold at once, and that activation is retried the
  same way;
* says one line per activation start and end (and per container lost or back).
"""
from __future__ import annotations

import json
import re
import statistics
import threading
import time
import uuid
from typing import Callable, Mapping
from urllib.parse import urlsplit

from controller import results
from controller.testbed import fan_out
from dml_app import net

GRACE_S = 10.0               # the /run wait beyond the activation's deadline
INIT_TIMEOUT_S = 60.0        # the /init wait
INIT_CONNECT_RETRIES = 4     # /init resent only where it cannot have arrived (~1.5 s)
PROBE_PERIOD_S = 1.0         # how often a lost container's node is asked /hi
PROBE_TIMEOUT_S = 2.0
UNREGISTER_TIMEOUT_S = 5.0
RESULT_LIMIT = 1 * net.MiB   # the largest /run answer taken (a result is a small object)
MAX_CONCURRENCY = 1024
MAX_RETRIES = 10
RUNTIME_PORT = 4444          # a node runtime's port (DML_PORT) when `runtime` is not given

SUCCESS, APP_ERROR, DEV_ERROR = "success", "application error", "action developer error"
TIMEOUT, LOST = "timeout", "lost"
STATUSES = (SUCCESS, APP_ERROR, DEV_ERROR, TIMEOUT, LOST)


class _Container:
    def __init__(self, node: str, address: str, runtime: str):
        self.node, self.address, self.runtime = node, address, runtime
        self.initialized = False     # /init done (warm when free)
        self.busy = False            # an activation holds it
        self.lost = False            # no answer: out of use until its node answers /hi
        self.activations = 0

    @property
    def state(self) -> str:
        return ("lost" if self.lost else "busy" if self.busy else "warm" if self.initialized else "cold")


class _Lost(Exception):
    """The container gave no answer (or said it is busy): retry elsewhere. `cold`: it
    answers but lost its /init (its app restarted unseen): cold, not lost."""

    def __init__(self, message: str, *, cold: bool = False):
        super().__init__(message)
        self.cold = cold


NOT_INITIALIZED = re.compile(r"not (been )?initiali[sz]ed", re.I)


# The one owner of an activation's scheduling, deadline and retries: the action
# (dml_app/sl_action.py) runs the one activation a /run hands it, so no node round loop
# (dml_app/rounds.py) is involved.
class Invoker:
    """Activations on a pool of action containers (see the module's docstring).

    `pool`: node -> "ip:port" of its action server. `auth(node)`: the credential of that
    node's /init and /run (its own token); `api_key(node)`: the /run body's api_key (the
    credential the action shows the server). `server` ("ip:port") and `server_token`
    (the server node's own token): where a lost activation's worker id is
    unregistered. `runtime`: node -> "ip:port" of its node runtime (for /hi), default
    the pool address's host on port 4444. `say`: where the progress lines go;
    `on_record(record)`: called with each record as it ends (lost ones too).
    `grace_s`: the wait for /run's answer past its deadline; `init_timeout_s`: the wait
    for /init; `queue_timeout_s` (default the larger of 60 s and deadline_s): the wait
    for a free container.
    """

    def __init__(self, pool: Mapping[str, str], *, auth: Callable[[str], str],
                 api_key: Callable[[str], str], concurrency: int, deadline_s: float,
                 retries: int = 1, action_name: str = "sl_train",
                 say: Callable[[str], None] = print,
                 on_record: Callable[[dict], None] | None = None,
                 server: str | None = None, server_token: str | None = None,
                 runtime: Mapping[str, str] | None = None, grace_s: float = GRACE_S,
                 init_timeout_s: float = INIT_TIMEOUT_S, queue_timeout_s: float | None = None):
        if not isinstance(pool, Mapping) or not pool:
            raise ValueError("invoker: the pool needs at least one action container (node -> ip:port)")
        runtime = dict(runtime or {})
        self._containers: list[_Container] = []
        for node, address in pool.items():
            if not isinstance(node, str) or not isinstance(address, str) or not _host_port(address):
                raise ValueError(f"invoker: pool entry {str(node)[:40]!r}: {str(address)[:80]!r} is not ip:port")
            rt = runtime.get(node) or f"{address.rpartition(':')[0]}:{RUNTIME_PORT}"
            self._containers.append(_Container(node, address, rt))
        self.concurrency = net.number(concurrency, "invoker concurrency", 1, MAX_CONCURRENCY, integer=True)
        self.deadline_s = net.number(deadline_s, "invoker deadline_s", 0, 86400, lo_open=True)
        self.retries = net.number(retries, "invoker retries", 0, MAX_RETRIES, integer=True)
        self.grace_s = net.number(grace_s, "invoker grace_s", 0, 3600)
        self.init_timeout_s = net.number(init_timeout_s, "invoker init_timeout_s", 0, 3600, lo_open=True)
        self.queue_timeout_s = net.number(max(60.0, self.deadline_s) if queue_timeout_s is None
                                          else queue_timeout_s, "invoker queue_timeout_s", 0, 86400)
        self.auth, self.api_key = auth, api_key
        self.action_name = action_name
        # Its lines carry what nodes answered: shown with their control characters escaped.
        self.say = lambda line: say(results.printable(line))
        self.on_record = on_record
        self.server, self.server_token = server, server_token
        self._records: list[dict] = []
        self._cv = threading.Condition()
        self._running = 0            # activations holding a container
        self._inflight = 0           # invoke() calls under way
        self._closed = False
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    # ------------------------------------------------------------------ public
    def invoke(self, params: dict, *, deadline_s: float | None = None) -> dict:
        """Run one activation with `params` (the /run body's "value"), retrying a lost
        one elsewhere; blocks; returns the final activation record (the earlier, lost
        ones are in records())."""
        if not isinstance(params, dict):
            raise TypeError(f"invoker: params must be a JSON object, not {type(params).__name__}")
        json.dumps(params, allow_nan=False)    # fails here (TypeError, ValueError), before any container is taken
        dl = self.deadline_s if deadline_s is None else net.number(deadline_s, "deadline_s", 0, 86400, lo_open=True)
        with self._cv:
            if self._closed:
                raise RuntimeError("invoker: closed, it takes no new activations")
            self._inflight += 1
        try:
            tried: set[str] = set()
            rec = self._activate(params, dl, 1, None, tried)
            while rec["status"] == LOST and rec["attempt"] <= self.retries:
                rec = self._activate(params, dl, rec["attempt"] + 1, rec["activation_id"], tried)
            return rec
        finally:
            with self._cv:
                self._inflight -= 1
                self._cv.notify_all()

    def invoke_all(self, params_list: list[dict]) -> list[dict]:
        """invoke() each, at most `concurrency` at once; the final records in order."""
        return fan_out(self.invoke, params_list, limit=self.concurrency)

    def records(self) -> list[dict]:
        """Every activation record so far (lost ones included), in the order they ended."""
        with self._cv:
            return [dict(r) for r in self._records]

    def containers(self) -> dict[str, str]:
        """node -> its container's state (cold, warm, busy, lost)."""
        with self._cv:
            return {c.node: c.state for c in self._containers}

    def summary(self) -> dict:
        """Counts and times over records(): activations, cold and warm starts, errors
        (every status but success), retries, lost, per status, the start overhead
        (start_s) of cold and of warm successful activations, init times, and the bytes
        the actions reported moving."""
        recs = self.records()
        ran = [r for r in recs if r["cold"] is not None]
        ok = [r for r in ran if r["status"] == SUCCESS and r["start_s"] is not None]
        moved = {"data_down": 0, "params_down": 0, "gradients_up": 0}
        for r in recs:
            b = (r["result"] or {}).get("bytes") if isinstance(r["result"], dict) else None
            for k in moved:
                v = b.get(k) if isinstance(b, dict) else None
                if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 2 ** 53:
                    moved[k] += int(v)
        return {"activations": len(recs),
                "cold": sum(1 for r in ran if r["cold"]), "warm": sum(1 for r in ran if not r["cold"]),
                "errors": sum(1 for r in recs if r["status"] != SUCCESS),
                "retries": sum(1 for r in recs if r["retry_of"]),
                "lost": sum(1 for r in recs if r["status"] == LOST),
                "statuses": {s: n for s in STATUSES if (n := sum(1 for r in recs if r["status"] == s))},
                "cold_start_s": _stats([r["start_s"] for r in ok if r["cold"]]),
                "warm_start_s": _stats([r["start_s"] for r in ok if not r["cold"]]),
                "init_s": _stats([r["init_s"] for r in ran if r["init_s"] is not None]),
                "bytes": moved}

    def close(self, timeout_s: float = 60) -> None:
        """Take no new activations (those still waiting for a container, retries too,
        end as "timeout" without running); wait up to `timeout_s` for those running
        (their HTTP waits are bounded by their deadlines); stop probing lost containers."""
        end = time.monotonic() + max(0.0, float(timeout_s))
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            while self._inflight and time.monotonic() < end:
                self._cv.wait(min(1.0, max(0.0, end - time.monotonic())))
            left = self._inflight
            prober = self._prober
        self._stop.set()
        if prober is not None:
            prober.join(PROBE_TIMEOUT_S + 1)
        if left:
            self.say(f"invoker: closed with {left} activation(s) still under way (they end by their deadlines)")

    # ------------------------------------------------------------------ one activation
    def _activate(self, params: dict, deadline_s: float, attempt: int, retry_of: str | None,
                  tried: set[str]) -> dict:
        aid = uuid.uuid4().hex
        t0 = time.monotonic()
        rec = {"activation_id": aid, "node": None, "cold": None, "init_s": None, "queued_s": None,
               "start": None, "end": None, "run_s": None, "start_s": None, "status": None,
               "result": None, "error": None, "attempt": attempt, "retry_of": retry_of}
        c, cold = self._acquire(tried, t0 + self.queue_timeout_s)
        rec["queued_s"] = round(time.monotonic() - t0, 3)
        if c is None:
            rec.update(status=TIMEOUT, start=time.time(), end=time.time(),
                       error="the invoker closed before an action container was free" if self._closed else
                       f"no action container free within {self.queue_timeout_s:g} s (containers: {self.containers()})")
            self.say(f"invoker: activation {aid[:8]} ran nowhere: {rec['error']}")
            return self._record(rec)
        tried.add(c.node)
        rec.update(node=c.node, cold=cold, start=time.time())
        self.say(f"invoker: activation {aid[:8]} starts on {c.node} ({'cold' if cold else 'warm'})"
                 + (f", retry of {retry_of[:8]}" if retry_of else ""))
        lost = False
        try:
            if not cold or self._init(c, rec):
                self._run(c, rec, params, deadline_s)
        except _Lost as e:
            lost = not e.cold
            if e.cold:
                c.initialized = False
            rec.update(status=LOST, error=str(e))
        except Exception as e:  # noqa: BLE001 - a bug here must not leave the container busy
            rec.update(status=DEV_ERROR, error=f"invoker: {type(e).__name__}: {e}")
        finally:
            rec["end"] = time.time()
            self._release(c, lost=lost)
        extra = f" in {rec['run_s']:.1f} s" if rec["run_s"] is not None else ""
        if rec["start_s"] is not None:
            extra += f" (start overhead {rec['start_s']:.2f} s)"
        self.say(f"invoker: activation {aid[:8]} on {c.node}: {rec['status']}{extra}"
                 + (f": {rec['error'][:200]}" if rec["error"] else ""))
        if rec["status"] == LOST:
            self._unregister(aid, c.node)
        return self._record(rec)

    def _init(self, c: _Container, rec: dict) -> bool:
        """POST /init; True when the container is initialised (rec says why not)."""
        body = {"value": {"name": self.action_name, "main": "main", "binary": False, "code": ""}}
        t = time.monotonic()
        try:
            net.call("POST", f"http://{c.address}/init", json=body, token=self.auth(c.node),
                     timeout_s=self.init_timeout_s, retries=INIT_CONNECT_RETRIES, max_bytes=RESULT_LIMIT)
            ok = True
        except net.HttpError as e:
            reply = net.reply_for(c.node, e)
            if reply.status is None:
                raise _Lost(f"{c.node} gave no answer to /init ({reply.why}: {reply.message[:200]})") from None
            # Initialised already (its app kept the /init of an earlier life in our pool).
            ok = reply.status == 403 and "more than once" in reply.message
            if not ok:
                rec.update(status=DEV_ERROR, error=f"/init: HTTP {reply.status}: {_error_text(reply.message)}")
        rec["init_s"] = round(time.monotonic() - t, 3)
        c.initialized = ok           # a failed /init leaves it cold: the next one tries again
        return ok

    def _run(self, c: _Container, rec: dict, params: dict, deadline_s: float) -> None:
        deadline = time.time() + deadline_s
        body = {"value": params, "activation_id": rec["activation_id"], "deadline": int(deadline * 1000),
                "api_key": self.api_key(c.node), "action_name": self.action_name,
                "namespace": "edgetb", "transaction_id": rec["activation_id"]}
        wait = max(0.1, deadline - time.time()) + self.grace_s
        t = time.monotonic()
        try:
            r = net.call("POST", f"http://{c.address}/run", json=body, token=self.auth(c.node),
                         timeout_s=wait, max_bytes=RESULT_LIMIT)
        except net.HttpError as e:
            rec["run_s"] = round(time.monotonic() - t, 3)
            reply = net.reply_for(c.node, e)
            if reply.status is None:
                why = (f"no answer by the deadline + {self.grace_s:g} s grace" if reply.why == net.TIMEOUT
                       and time.monotonic() - t >= wait - 0.5 else
                       "connection dropped mid-run" if reply.why == net.TIMEOUT else "connection refused")
                raise _Lost(f"{c.node}: /run: {why} ({reply.message[:200]})") from None
            err = _error_text(reply.message)
            if reply.status == 409:                 # busy with a run we no longer follow
                raise _Lost(f"{c.node}: /run: busy with another activation ({err[:200]})") from None
            if reply.status == 502 and NOT_INITIALIZED.search(err):   # refused before it ran
                raise _Lost(f"{c.node}: /run: its app restarted since its /init ({err[:200]})", cold=True) from None
            if reply.status == 502 and _error_of(reply.message) is not None:
                rec.update(status=TIMEOUT if err.startswith("deadline exceeded") else APP_ERROR, error=err)
            else:
                rec.update(status=DEV_ERROR, error=f"/run: HTTP {reply.status}: {err}")
            return
        rec["run_s"] = round(time.monotonic() - t, 3)
        try:
            result = r.json()
        except ValueError:
            result = None
        if not isinstance(result, dict):
            rec.update(status=DEV_ERROR, error=f"/run: the action's answer is not a JSON object: {r.text[:200]!r}")
            return
        rec.update(status=SUCCESS, result=result)
        timings = result.get("timings")
        train = timings.get("train_s") if isinstance(timings, dict) else None
        try:
            train = net.number(train, "train_s", 0, 86400)
        except ValueError:
            return                                   # no overhead without the action's own time
        rec["start_s"] = round(max(0.0, (rec["init_s"] or 0.0) + rec["run_s"] - train), 3)

    def _unregister(self, aid: str, node: str) -> None:
        """The lost activation's worker id off the server (the action registers its
        activation id), with the server's own credential; best effort, bounded."""
        if not self.server:
            return
        try:
            net.call("POST", f"http://{self.server}/unregisterWorker", json={"worker_id": aid},
                     token=self.server_token, timeout_s=UNREGISTER_TIMEOUT_S, retries=2, max_bytes=RESULT_LIMIT)
        except net.HttpError as e:
            self.say(f"invoker: could not unregister worker {aid[:8]} of lost {node} on the server: {e}")

    def _record(self, rec: dict) -> dict:
        with self._cv:
            self._records.append(rec)
        if self.on_record is not None:
            try:
                self.on_record(dict(rec))
            except Exception as e:  # noqa: BLE001 - a caller's hook must not lose the record
                self.say(f"invoker: on_record failed: {type(e).__name__}: {e}")
        return dict(rec)

    # ------------------------------------------------------------------ the pool
    def _acquire(self, tried: set[str], until: float) -> tuple[_Container | None, bool]:
        """(a free container, whether it is cold) once fewer than `concurrency` run: warm
        first, then cold, one not in `tried` while the pool has others; (None, False) at
        `until` (monotonic)."""
        with self._cv:
            avoid = tried if len(tried) < len(self._containers) else set()
            while True:
                if self._closed:         # closing: a queued activation (or retry) starts nowhere
                    return None, False
                if self._running < self.concurrency:
                    free = [c for c in self._containers if c.node not in avoid and not c.busy and not c.lost]
                    c = next((c for c in free if c.initialized), None) or next(iter(free), None)
                    if c is not None:
                        c.busy = True
                        c.activations += 1
                        self._running += 1
                        return c, not c.initialized
                left = until - time.monotonic()
                if left <= 0:
                    return None, False
                self._cv.wait(min(left, 1.0))

    def _release(self, c: _Container, *, lost: bool) -> None:
        with self._cv:
            self._running -= 1
            c.busy = False
            c.lost = c.lost or lost
            prober = None
            if lost and self._prober is None and not self._stop.is_set():
                prober = self._prober = threading.Thread(target=self._probe, daemon=True, name="invoker-probe")
            self._cv.notify_all()
        if lost:
            self.say(f"invoker: {c.node}'s container is lost; asking its node /hi every {PROBE_PERIOD_S:g} s")
        if prober is not None:
            prober.start()

    def _probe(self) -> None:
        """Ask each lost container's node /hi until none is lost; one that answers is cold."""
        while not self._stop.is_set():
            with self._cv:
                lost = [c for c in self._containers if c.lost]
                if not lost:
                    self._prober = None
                    return
            for c in lost:
                try:
                    net.call("GET", f"http://{c.runtime}/hi", token=self.auth(c.node), timeout_s=PROBE_TIMEOUT_S,
                             max_bytes=RESULT_LIMIT)
                except net.HttpError:
                    continue
                with self._cv:
                    c.lost, c.initialized = False, False
                    self._cv.notify_all()
                self.say(f"invoker: {c.node} answers again; its container is cold (the next activation there "
                         f"starts with /init)")
            self._stop.wait(PROBE_PERIOD_S)
        with self._cv:
            self._prober = None


def _host_port(address: str) -> bool:
    """Whether `address` is host:port."""
    try:
        parts = urlsplit("//" + address)
        return bool(parts.hostname) and parts.port is not None
    except ValueError:
        return False


_CUT_ERROR = re.compile(r'\{\s*"error"\s*:\s*"?')


def _error_of(message: str) -> str | None:
    """The "error" of an action's JSON answer {"error": ...}, or None."""
    try:
        doc = json.loads(message)
    except ValueError:           # HttpError keeps 500 characters: a long one is cut
        cut = _CUT_ERROR.match(message)
        return message[cut.end():] if cut else None
    if isinstance(doc, dict) and "error" in doc:
        return str(doc["error"])
    return None


def _error_text(message: str) -> str:
    err = _error_of(message)
    return (err if err is not None else message)[:1000]


def _stats(values: list) -> dict:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"n": 0, "mean": None, "p50": None, "max": None}
    return {"n": len(vals), "mean": round(statistics.fmean(vals), 3),
            "p50": round(statistics.median(vals), 3), "max": round(max(vals), 3)}
