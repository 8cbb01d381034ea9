"""The node runtime every DML role runs on.

The runtime owns what all roles share: the environment, the token-checked HTTP server,
the conf routes, heartbeats to the controller, EdgeTB log lines and metrics, weight
transfer (safetensors, with byte counters) and a clean exit on SIGTERM. A role only
decides and computes (as a Flower strategy does); it is a small object that registers
its routes and hooks:

    rt = Runtime("fl_trainer")
    rt.declare_model(nns.build_model)             # sizes the weights routes' body limit

    @rt.route("/train", methods=["POST"], weights=True)   # other routes take 1 MiB of JSON
    def train():
        tensors, meta = rt.receive_weights()      # 400 for anything not safetensors
        rt.spawn(work, tensors, meta)             # answer at once, train in the background
        return "ok"

    rt.on_structure(check_conf)                   # validate /conf/structure (ValueError -> 400)
    rt.on_start(start)                            # root roles: GET /start runs it in a thread
    rt.run()                                      # serve until SIGTERM

Waiting on peers lives here, once: `rt.fan_out(peers, fn, deadline_s=)` runs fn(peer) for
many peers in parallel (bounded) and returns per peer a `Reply` (what came back, or why
not: dead, refused, timeout, error); `rt.broadcast_weights()` is that for one set of
weights; `rt.gather(expected)` collects what peers send back (uploads) until all came,
a deadline, or stop, and says per peer what is missing and why. The round loop built on
them (attempts, quorum, participants) is rounds.py's. A role keeps its maths and its
choice of what to do with the answers it got.

Received weights are checked against the model once, where they are unpacked:
`rt.receive_weights(fit=model.state_dict())` (or `rt.check_weights(tensors, fit)` where
the role knows the model only later) answers 400 naming the keys or shape that differ.

Inside the role: `rt.structure` (dict), `rt.data` (node_data.NodeData), `rt.set_state()`,
`rt.log_train()`, `rt.log_aggregate()`, `rt.send_weights()`, `rt.peer()`, `rt.finish()`,
`rt.spawn()`, `rt.log` (a logging.Logger to <name>.log and stderr), `rt.stopping` (an Event).
States reported in heartbeats and /stats: idle, training, uploading, aggregating,
finished, error (an exception in a spawned task, or `rt.fail(message)`); roles may add
their own. `error` is final: the first failure's message (`rt.error`) goes with every
heartbeat and /stats answer, and the controller's `--auto` ends the run on it.
A conf pushed while a task of the run is going (a started root, a trainer training)
is refused with 409: a role reads its conf once, at the start of its work.
Every metrics record (`rt.log_metric`, log_train, log_aggregate) also goes to the
controller live, with the next heartbeat, once (see HB_RECORDS_MAX): its dashboard.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Callable, Iterable, Mapping

from flask import Flask, Response, has_request_context, jsonify, request
from werkzeug.exceptions import BadRequest, Conflict, HTTPException, NotFound

from dml_app import bounded_input, calls, formats, node_auth, serving, weights
from dml_app.algorithms import check_fits
from dml_app.node_data import DatasetError, NodeData, load_node_data, read_meta

PEER_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
HEARTBEAT_PERIOD_S = 2.0
# Metrics records go to the controller live, with the heartbeats (its dashboard): each
# record gets a sequence number; a heartbeat carries those the controller has not
# acknowledged yet (at most HB_RECORDS_MAX, HB_BYTES_MAX of JSON), the controller answers
# the last one it stored ("ack") and drops what it already has, so an answer that was
# lost makes the next heartbeat send them again without storing them twice. At most
# HB_PENDING_MAX wait (the oldest are dropped and counted: the metrics file keeps all).
HB_RECORDS_MAX = 500
HB_BYTES_MAX = 256 * 1024
HB_RECORD_MAX_BYTES = 64 * 1024     # a record larger than this is not sent live (the file has it)
HB_PENDING_MAX = 20_000
MAX_ERROR_CHARS = 1000        # a failure's message in heartbeats and /stats
WEIGHTS_MIME = "application/octet-stream"
CONF_ROUTE = {"structure": "/conf/structure", "data": "/conf/dataset"}  # what sets each attribute


FAN_OUT_LIMIT = 32           # parallel calls of one fan_out (299 peers are not 299 threads)
MAX_DEADLINE_S = 1e6
PROBE_PERIOD_S = 1.0         # how often a gather asks its pending peers whether they live
# A wait that woke this much past its time was not scheduled: the node was frozen (a
# pause) or starved. Answers that came meanwhile wait in its sockets, so they get
# STALL_GRACE_S more to be read before a peer is called missing for the node's own stall.
STALL_S = 1.0
STALL_GRACE_S = 1.0

# Why a peer gave nothing, and the Reply of one call: calls.py's (the controller's drivers
# classify their calls the same way).
DEAD, REFUSED, TIMEOUT, ERROR = calls.DEAD, calls.REFUSED, calls.TIMEOUT, calls.ERROR
Reply, reply_for = calls.Reply, calls.reply_for


class Gather:
    """What `expected` peers send back (e.g. uploads to a route), until each one either
    arrived or was given up on (`drop`), the deadline passed, or the node stops.

    The route handler calls `add(peer, fold)`: checked (an open gather, an expected peer,
    once), then fold() runs under the gather's lock (aggregate as things arrive: one model
    in memory, not one per peer) and its value is kept. `close()` makes later adds fail
    (409 for the route) and returns (arrived {peer: value}, missing {peer: why})."""

    def __init__(self, expected: Iterable[str], stopping: threading.Event | None = None, *, tag: Any = None,
                 probe: Callable[[set[str]], Mapping[str, str]] | None = None,
                 probe_period_s: float = PROBE_PERIOD_S):
        self.expected = set(expected)
        self.tag = tag
        # probe(pending) -> {peer: why} of those found gone (a dead app does not upload:
        # no use waiting for the deadline); called every probe_period_s while waiting.
        self._probe, self._probe_period_s = probe, probe_period_s
        self.arrived: dict[str, Any] = {}
        self.missing: dict[str, str] = {}       # given up on: peer -> why
        self.closed = False
        self._stopping = stopping
        self._cond = threading.Condition()

    def add(self, peer: str, fold: Callable[[], Any] | None = None) -> Any:
        with self._cond:
            if self.closed:
                raise Conflict(f"{self.tag or 'this round'} is closed")
            if peer not in self.expected:
                raise Conflict(f"{peer} was not asked in {self.tag or 'this round'}")
            if peer in self.arrived:
                raise Conflict(f"{peer} already sent for {self.tag or 'this round'}")
            value = fold() if fold is not None else None
            self.arrived[peer] = value
            self.missing.pop(peer, None)
            self._cond.notify_all()
            return value

    def drop(self, peer: str, why: str) -> None:
        """Stop waiting for `peer` (its request failed: dead, refused, ...)."""
        self.drop_all({peer: why})

    def drop_all(self, failed: Mapping[str, str]) -> None:
        """Stop waiting for each peer of `failed` {peer: why}. A `timeout` (the request
        may have arrived, no answer came: a read timeout, or a connection dropped because
        the peer was killed while it read) is checked with one probe of those peers first,
        so a peer whose port now refuses is said to be `dead`, not `timeout`."""
        failed = dict(failed)
        unsure = {p for p, why in failed.items() if why == TIMEOUT}
        if unsure and self._probe is not None:
            failed.update(self._probe(unsure))
        with self._cond:
            for peer, why in failed.items():
                if peer in self.expected and peer not in self.arrived:
                    self.missing[peer] = why
            self._cond.notify_all()

    def pending(self) -> set[str]:
        with self._cond:
            return self.expected - set(self.arrived) - set(self.missing)

    def wait(self, deadline_s: float) -> bool:
        """Wait until nothing is pending, `deadline_s` seconds passed or the node stops;
        True when nothing is pending. A wait this node overslept (it was frozen) gets
        STALL_GRACE_S more: what peers sent meanwhile is still to be read."""
        deadline_s = bounded_input.number(deadline_s, "deadline_s", 0, MAX_DEADLINE_S)
        end = time.monotonic() + deadline_s
        next_probe = time.monotonic() + self._probe_period_s
        while True:
            with self._cond:
                if not self.expected - set(self.arrived) - set(self.missing):
                    return True
                left = end - time.monotonic()
                if left <= 0 or (self._stopping is not None and self._stopping.is_set()):
                    return False
                nap = min(left, 1.0, max(0.0, next_probe - time.monotonic()))
                due = time.monotonic() + nap
                self._cond.wait(nap)
                if time.monotonic() - due > STALL_S:         # this node stalled: see STALL_S
                    end = max(end, time.monotonic() + STALL_GRACE_S)
            if self._probe is not None and time.monotonic() >= next_probe:
                pending = self.pending()
                if pending:
                    for peer, why in self._probe(pending).items():
                        self.drop(peer, why)
                next_probe = time.monotonic() + self._probe_period_s

    def close(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Close (later adds get 409): (arrived, missing), every pending peer `timeout`."""
        with self._cond:
            self.closed = True
            for p in self.expected - set(self.arrived) - set(self.missing):
                self.missing[p] = TIMEOUT
            return dict(self.arrived), dict(self.missing)


class ConfigError(RuntimeError):
    """The node's environment is unusable (missing token, bad port, ...)."""


def _env_float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key, "")
    if raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{key}={raw!r} must be a positive number")
    return v


class Runtime:
    """One node: environment, HTTP server, logging, heartbeats and weight transfer."""

    def __init__(self, role: str, *, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self.role = role
        self.name = env.get("NET_NODE_NAME", "")
        if not formats.is_name(self.name):
            raise ConfigError(f"NET_NODE_NAME={self.name!r}: expected a node name such as n1 "
                              f"({formats.NAME_RULE})")
        self.testbed_id = env.get("EDGE_TB_ID", "")
        # Its own credential (for the controller, which calls it with the same) and the
        # testbed's peer credential (for other nodes); one token serves both when the
        # peer one is not given (a node run by hand).
        self.token = env.get(node_auth.TOKEN_ENV, "")
        if not self.token:
            raise ConfigError(f"{node_auth.TOKEN_ENV} is not set: the testbed token is required")
        self.peer_token = env.get(node_auth.PEER_TOKEN_ENV, "") or self.token
        # Checks the credentials of this node's clients (route(..., clients=True)).
        self.service_key = env.get(node_auth.SERVICE_KEY_ENV, "")
        self._client_routes: set[str] = set()
        port_raw = env.get("DML_PORT", "4444")
        if not port_raw.isdigit() or not 0 <= int(port_raw) <= 65535:
            raise ConfigError(f"DML_PORT={port_raw!r} is not a port number")
        self.port = int(port_raw)  # 0 picks a free port (tests); see `self.port` after start
        self.ctl_address = env.get("NET_CTL_ADDRESS", "")
        self.agent_address = env.get("NET_AGENT_ADDRESS", "")
        self.log_dir = os.path.abspath(env.get("DML_LOG_DIR", "") or "./log")
        self.dataset_dir = os.path.abspath(env.get("DML_DATASET_DIR", "") or "../dataset")
        # The agent's nodes get a log dir of their own per deployment and DML_LOG_APPEND=1:
        # an app restarted by a fault action goes on with the lines of its first life.
        self.log_append = env.get("DML_LOG_APPEND", "") == "1"
        self.cpu = _env_float(env, "DML_CPU", 1.0)
        self.torch_threads = max(1, math.floor(self.cpu))

        self.structure: dict[str, Any] | None = None
        self.data: NodeData | None = None
        self.state = "idle"
        self.round = 0
        self.error: str | None = None      # the first failure's message; state is then 'error'
        self._active = 0                   # spawned tasks running (the run is under way)
        self.stopping = threading.Event()  # roles may wait on it to give up early
        self._lock = threading.Lock()
        self._bytes_sent = 0
        self._bytes_received = 0
        self._start_fn: Callable[[], Any] | None = None
        self._start_needs: tuple[str, ...] = ()
        self._started = False
        self._structure_fn: Callable[[dict], dict | None] | None = None
        self._dataset_fn: Callable[[NodeData], None] | None = None
        self._server: serving.Server | None = None
        self._hb_failing = False
        # Live metrics (see HB_RECORDS_MAX): (seq, JSON text) not acknowledged yet; `boot`
        # tells the controller that a restarted app numbers from 1 again.
        self._hb_boot = os.urandom(8).hex()
        self._hb_seq = 0
        self._hb_pending: collections.deque[tuple[int, str]] = collections.deque()
        self._hb_dropped = 0
        self._model_fn: Callable[[dict], Any] | None = None
        self._weights_limits: dict[str, int] = {}    # meta.json (as JSON) -> bytes

        self._setup_torch()
        self._setup_logging()
        self.app = Flask(f"edgetb-{self.name}")
        node_auth.require_token(self.app, self.token, peer_token=self.peer_token,
                          owner_only=CONF_ROUTE.values(), client_key=self.service_key,
                          client_routes=self._client_routes)
        # JSON routes take 1 MiB; weights routes (route(..., weights=True)) what the model needs.
        self.body_limits = bounded_input.limit_bodies(self.app, json_errors=False)
        self._add_builtin_routes()

    # ------------------------------------------------------------------ setup

    def _setup_torch(self) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)
        try:
            torch.set_num_interop_threads(1)  # nodes share cores; only allowed once, early
        except RuntimeError:
            pass

    def _setup_logging(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        self.log_path = os.path.join(self.log_dir, f"{self.name}.log")
        self.metrics_path = os.path.join(self.log_dir, f"{self.name}.metrics.jsonl")
        # Fresh files per start (a node run by hand): lines of an earlier experiment would
        # mix into this one's plots; appended to after a restart in a deployment.
        mode = "a" if self.log_append else "w"
        open(self.metrics_path, mode).close()
        self.log = logging.getLogger(f"edgetb.{self.name}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        for h in list(self.log.handlers):
            self.log.removeHandler(h)
            h.close()
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        fh = logging.FileHandler(self.log_path, mode=mode, encoding="utf-8")
        sh = logging.StreamHandler(sys.stderr)
        for h in (fh, sh):
            h.setFormatter(fmt)
            self.log.addHandler(h)
        self._metrics_lock = threading.Lock()

    def _add_builtin_routes(self) -> None:
        app = self.app

        @app.errorhandler(HTTPException)
        def _plain_error(e: HTTPException):
            # Plain text so `curl` and calls.HttpError show the message itself.
            return Response(f"{e.description}\n", status=e.code, mimetype="text/plain")

        @app.get("/hi")
        def _hi():
            return jsonify(node=self.name, role=self.role, state=self.state, round=self.round)

        @app.post("/conf/dataset")
        def _conf_dataset():
            self._refuse_mid_run("/conf/dataset")
            conf = self._json_body()
            try:
                data = load_node_data(self.dataset_dir, conf)
            except DatasetError as e:
                raise BadRequest(f"{self.name}: dataset conf refused: {e}") from None
            if self._dataset_fn is not None:
                try:
                    self._dataset_fn(data)
                except ValueError as e:
                    raise BadRequest(f"{self.name}: dataset conf refused: {e}") from None
            self.data = data
            self.log.info("dataset: %d train samples (parts %s), %d test samples (parts %s), "
                          "batch_size %d", data.train_samples, _span(data.train_parts),
                          data.test_samples, _span(data.test_parts), data.batch_size)
            return jsonify(train_samples=data.train_samples, test_samples=data.test_samples)

        @app.post("/conf/structure")
        def _conf_structure():
            self._refuse_mid_run("/conf/structure")
            conf = self._json_body()
            if self._structure_fn is not None:
                try:
                    checked = self._structure_fn(dict(conf))
                except (ValueError, TypeError, KeyError) as e:
                    raise BadRequest(f"{self.name}: structure conf refused: {e}") from None
                if checked is not None:
                    conf = checked
            self.structure = dict(conf)
            self.log.info("structure: %s", json.dumps(self.structure, sort_keys=True))
            return jsonify(ok=True)

        @app.get("/start")
        def _start():
            if self._start_fn is None:
                raise NotFound(f"{self.name}: role {self.role} has no start (it is not a root role)")
            missing = [CONF_ROUTE[n] for n in self._start_needs if getattr(self, n) is None]
            if missing:
                raise Conflict(f"{self.name}: cannot start before {' and '.join(missing)}")
            with self._lock:
                if self._started:
                    raise Conflict(f"{self.name}: already started")
                self._started = True
            self.log.info("start")
            self.spawn(self._start_fn, name="start")
            return "start\n"

        @app.get("/log")
        def _log():
            return Response(_read_text(self.log_path), mimetype="text/plain")

        @app.get("/metrics")
        def _metrics():
            return Response(_read_text(self.metrics_path), mimetype="application/x-ndjson")

        @app.get("/stats")
        def _stats():
            return jsonify(node=self.name, bytes_sent=self.bytes_sent,
                           bytes_received=self.bytes_received, state=self.state, round=self.round,
                           error=self.error)

    @property
    def running(self) -> bool:
        """Whether a task of the run is going (the root's start, a trainer's training)."""
        return self._active > 0

    def _refuse_mid_run(self, route: str) -> None:
        if self.running:
            raise Conflict(f"{self.name}: {route} refused: the run is under way (state {self.state}, "
                           f"round {self.round}); push confs before /start")

    def _json_body(self) -> dict[str, Any]:
        """The request's JSON object (bounded: bounded_input.parse_json_body); HTTP 400 otherwise."""
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise BadRequest(f"{self.name}: expected a JSON object body (Content-Type: application/json)")
        return body

    # ------------------------------------------------------------------ role API

    def route(self, rule: str, *, weights: bool = False, max_body: int | None = None,
              clients: bool = False, **options: Any) -> Callable:
        """Flask's `app.route`: the handler runs after the token check and the body limit.

        A route's body is at most bounded_input.JSON_LIMIT (1 MiB) unless `weights=True` (the
        route takes model weights: see `weights_limit`) or `max_body` (bytes) says
        otherwise; a larger body gets 413 before the handler runs. `clients=True`: a
        client credential (testbed_core.credentials.client_token for this node, e.g. a
        serverless worker's api_key) opens the route, the testbed's peer credential does
        not; `client()` says which node called. `rule` is then a fixed path."""
        if clients:
            self._client_routes.add(rule)
        if weights:
            self.body_limits.set(rule, self.weights_limit)
        elif max_body is not None:
            self.body_limits.set(rule, int(max_body))
        return self.app.route(rule, **options)

    @staticmethod
    def client() -> str | None:
        """On a clients=True route: the node whose client credential the request
        carried, or None when it came with this node's own credential (the controller)."""
        from flask import g
        return getattr(g, "client", None)

    def declare_model(self, build: Callable[[dict], Any]) -> Callable[[dict], Any]:
        """The role's model, `build(meta.json) -> torch.nn.Module`: it sizes the body limit
        of the weights routes (`weights_limit`). Roles call it once, e.g.
        `rt.declare_model(nns.build_model)`."""
        self._model_fn = build
        return build

    def weights_limit(self) -> int:
        """The largest body a weights route takes: 2 x the declared model's safetensors
        size + bounded_input.WEIGHTS_SLACK (header and metadata), for the dataset's meta.json (the
        loaded dataset conf's, else the dataset folder's); bounded_input.DEFAULT_WEIGHTS_LIMIT
        (64 MiB) when the role declared no model or there is no meta.json yet."""
        if self._model_fn is None:
            return bounded_input.DEFAULT_WEIGHTS_LIMIT
        meta = self.data.meta if self.data is not None else None
        if meta is None:
            try:
                meta = read_meta(self.dataset_dir)
            except DatasetError:
                return bounded_input.DEFAULT_WEIGHTS_LIMIT
        key = json.dumps(meta, sort_keys=True, default=str)
        if key not in self._weights_limits:
            try:
                size = len(weights.pack_weights(self._model_fn(meta).state_dict()))
            except Exception as e:   # a meta.json the model cannot take: the default, said once
                self.log.warning("weights limit: the declared model does not build for %s (%s); "
                                 "using %s", meta.get("name"), e, bounded_input.human_bytes(bounded_input.DEFAULT_WEIGHTS_LIMIT))
                size = None
            self._weights_limits[key] = (2 * size + bounded_input.WEIGHTS_SLACK if size is not None
                                         else bounded_input.DEFAULT_WEIGHTS_LIMIT)
        return self._weights_limits[key]

    def on_start(self, fn: Callable[[], Any], *,
                 needs: Iterable[str] = ("structure", "data")) -> Callable[[], Any]:
        """Run `fn` in a background thread on GET /start (once); `needs` must be set first."""
        needs = tuple(needs)
        unknown = set(needs) - set(CONF_ROUTE)
        if unknown:
            raise ValueError(f"on_start needs: unknown {sorted(unknown)}; use 'structure', 'data'")
        self._start_fn, self._start_needs = fn, needs
        return fn

    def on_structure(self, fn: Callable[[dict], dict | None]) -> Callable:
        """Validate /conf/structure: return the conf (or None to keep it), raise ValueError -> 400."""
        self._structure_fn = fn
        return fn

    def on_dataset(self, fn: Callable[[NodeData], None]) -> Callable:
        """Check the loaded data (e.g. a trainer needs train parts); ValueError -> 400."""
        self._dataset_fn = fn
        return fn

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str = "") -> threading.Thread:
        """Run fn(*args) on a daemon thread; an exception is logged and sets state 'error'."""
        task = name or getattr(fn, "__name__", "task")

        def _run() -> None:
            try:
                fn(*args)
            except Exception as e:
                self.log.exception("%s failed", task)
                self.fail(f"{task} failed: {type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._active -= 1

        with self._lock:
            self._active += 1
        t = threading.Thread(target=_run, daemon=True, name=name or getattr(fn, "__name__", "task"))
        t.start()
        return t

    def set_state(self, state: str, round: int | None = None) -> None:
        """The node's state (heartbeats, /stats); once 'error' (fail()) it stays 'error'."""
        if round is not None:
            self.round = round
        if self.error is None:
            self.state = state

    def fail(self, message: str) -> None:
        """End this node's part in the run with `message`: state 'error' for good, the
        message logged and sent with every heartbeat (the first failure's is kept)."""
        message = str(message)[:MAX_ERROR_CHARS]
        with self._lock:
            first = self.error is None
            if first:
                self.error = message
                self.state = "error"
        if first:
            self.log.error("node failed: %s", message)

    # ------------------------------------------------------------------ many peers

    def fan_out(self, peers: Iterable[str], fn: Callable[[str], Any], *, deadline_s: float,
                limit: int = FAN_OUT_LIMIT) -> dict[str, Reply]:
        """fn(peer) for every peer, at most `limit` at once, for at most `deadline_s` seconds
        in all: {peer: Reply}, in the peers' order. A call that raised gives why it failed
        (calls.HttpError: dead if its connection was refused, refused with the status of an
        HTTP error, timeout if nothing came back; anything else: error); a call still
        going at the deadline, or not begun when the node stops, gives timeout (its
        thread ends on its own timeout; its answer is ignored). fn must bound its own
        calls (calls.call's timeout_s). When this node itself stalled past the deadline
        (frozen), calls still going get STALL_GRACE_S more."""
        deadline_s = bounded_input.number(deadline_s, "deadline_s", 0, MAX_DEADLINE_S)
        limit = bounded_input.number(limit, "limit", 1, 1024, integer=True)
        peers = list(dict.fromkeys(peers))
        out: dict[str, Reply] = {}
        if not peers:
            return out
        pool = ThreadPoolExecutor(max_workers=min(limit, len(peers)), thread_name_prefix="fan-out")

        def one(peer: str) -> Reply:
            if self.stopping.is_set():
                return Reply(peer, False, why=TIMEOUT, message="the node is stopping")
            try:
                return Reply(peer, True, value=fn(peer))
            except Exception as e:   # every failure is an answer for the role to weigh
                return reply_for(peer, e)
        try:
            futs = {p: pool.submit(one, p) for p in peers}
            due = time.monotonic() + deadline_s
            wait_futures(list(futs.values()), timeout=deadline_s)
            if time.monotonic() - due > STALL_S:        # this node stalled: see STALL_S
                wait_futures([f for f in futs.values() if not f.done()], timeout=STALL_GRACE_S)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        for p, f in futs.items():
            if f.done() and not f.cancelled():
                out[p] = f.result()
            else:
                out[p] = Reply(p, False, why=TIMEOUT, message=f"no answer within the deadline of {deadline_s:g} s")
        return out

    def broadcast_weights(self, peers: Mapping[str, str], path: str, state_dict: Mapping[str, Any],
                          meta: Mapping[str, Any] | None = None, *, deadline_s: float,
                          timeout_s: float | None = None) -> dict[str, Reply]:
        """POST the same weights (packed once) to every peer {name: 'ip:port'} at `path`,
        through fan_out: {name: Reply}. A send is repeated only when it cannot have
        arrived (connection refused); each call is bounded by `timeout_s` (default the
        deadline)."""
        body = weights.pack_weights(state_dict, meta)
        per_call = min(deadline_s, timeout_s) if timeout_s is not None else deadline_s
        return self.fan_out(peers, lambda n: self.post_weights_body(peers[n], path, body,
                                                                    timeout_s=max(per_call, 0.1)),
                            deadline_s=deadline_s)

    def gather(self, expected: Iterable[str], *, tag: Any = None,
               addresses: Mapping[str, str] | None = None) -> Gather:
        """A Gather of what `expected` peers send back; the node's stop ends its waits.
        With `addresses` {peer: 'ip:port'}, pending peers are asked GET /hi every
        PROBE_PERIOD_S while it waits, and one whose port refuses (its app is dead) is
        dropped as `dead` at once instead of being waited for until the deadline."""
        probe = None
        if addresses is not None:
            addrs = dict(addresses)

            def probe(pending: set[str]) -> dict[str, str]:
                got = self.fan_out(sorted(p for p in pending if p in addrs),
                                   lambda n: calls.call("GET", f"http://{addrs[n]}/hi", token=self.peer_token,
                                                      timeout_s=PROBE_PERIOD_S * 2, retries=1),
                                   deadline_s=PROBE_PERIOD_S * 3)
                return {n: DEAD for n, rep in got.items() if rep.why == DEAD}
        return Gather(expected, self.stopping, tag=tag, probe=probe)

    def peer(self, node: str) -> str:
        """The 'ip:port' of a node this node has a link to (structure conf 'connect')."""
        connect = (self.structure or {}).get("connect") or {}
        addr = connect.get(node)
        if not addr:
            raise KeyError(f"{self.name} has no link to {node!r} (structure conf 'connect')")
        return addr

    # ------------------------------------------------------------------ logs and metrics

    def log_metric(self, event: str, round: int, **values: Any) -> None:
        rec = {"t": round_s(time.time()), "node": self.name, "event": event, "round": round}
        rec.update(values)
        line = json.dumps(rec, allow_nan=True)
        with self._metrics_lock, open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            self._queue_live(rec)

    def _queue_live(self, rec: dict) -> None:
        """Queue a record for the controller (under the metrics lock): strict JSON (a
        NaN loss becomes null: the controller takes finite numbers only), bounded."""
        self._hb_seq += 1
        try:
            text = json.dumps(_finite(rec), allow_nan=False)
        except (TypeError, ValueError):
            text = ""
        if not text or len(text) > HB_RECORD_MAX_BYTES:
            self._hb_dropped += 1
            return
        self._hb_pending.append((self._hb_seq, text))
        while len(self._hb_pending) > HB_PENDING_MAX:
            self._hb_pending.popleft()
            self._hb_dropped += 1

    def _live_metrics(self) -> dict | None:
        """The next heartbeat's metrics: {"boot", "records": [[seq, record], ...],
        "dropped"}, oldest first, bounded; None when nothing waits."""
        with self._metrics_lock:
            if not self._hb_pending and not self._hb_dropped:
                return None
            out, size = [], 0
            for seq, text in self._hb_pending:
                if len(out) >= HB_RECORDS_MAX or (out and size + len(text) > HB_BYTES_MAX):
                    break
                out.append((seq, text))
                size += len(text) + 16
            dropped = self._hb_dropped
        return {"boot": self._hb_boot, "dropped": dropped,
                "records": [[seq, json.loads(text)] for seq, text in out]}

    def _metrics_acked(self, answer, sent: dict | None) -> None:
        """Forget what the controller acknowledged (its answer {"ack": seq}); an answer
        without one (an older controller) acknowledges nothing."""
        if sent is None:
            return
        try:
            ack = answer.json().get("ack") if answer.headers.get("content-type", "").startswith(
                "application/json") else None
            ack = bounded_input.number(ack, "ack", 0, 2**62, integer=True) if ack is not None else None
        except (ValueError, AttributeError):
            ack = None
        if ack is None:
            return
        with self._metrics_lock:
            while self._hb_pending and self._hb_pending[0][0] <= ack:
                self._hb_pending.popleft()
            self._hb_dropped -= min(self._hb_dropped, sent.get("dropped", 0))

    def log_train(self, loss: float, round: int) -> None:
        """EdgeTB's `Train: loss=..., round=...,` line plus a metrics record."""
        self.log.info("Train: loss=%.4f, round=%d,", loss, round)
        self.log_metric("train", round, loss=float(loss))

    def log_aggregate(self, accuracy: float, round: int, layer: int | None = None) -> None:
        """EdgeTB's `Aggregate: accuracy=..., round=...,[ layer=...,]` line plus a record."""
        if layer is None:
            self.log.info("Aggregate: accuracy=%.4f, round=%d,", accuracy, round)
            self.log_metric("aggregate", round, accuracy=float(accuracy))
        else:
            self.log.info("Aggregate: accuracy=%.4f, round=%d, layer=%d,", accuracy, round, layer)
            self.log_metric("aggregate", round, accuracy=float(accuracy), layer=layer)

    # ------------------------------------------------------------------ weights

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._bytes_received

    def send_weights(self, peer: str, path: str, state_dict: Mapping[str, Any],
                     meta: Mapping[str, Any] | None = None, *, timeout_s: float = 300.0,
                     retries: int = 2) -> Any:
        """POST `state_dict` (+ `meta`) as safetensors to http://peer/path.

        Raises calls.HttpError when the peer does not answer 2xx. Bytes count as sent
        once the peer answered, whatever it answered.
        """
        return self.post_weights_body(peer, path, weights.pack_weights(state_dict, meta),
                                      timeout_s=timeout_s, retries=retries)

    def post_weights_body(self, peer: str, path: str, body: bytes, *, timeout_s: float = 300.0,
                          retries: int = 2) -> Any:
        """send_weights with the safetensors body packed already (one pack, many peers)."""
        if not PEER_RE.match(peer):
            raise ValueError(f"peer {peer!r}: expected 'ip:port'")
        try:
            r = calls.call("POST", f"http://{peer}{path}", token=self.peer_token, data=body,
                         headers={"Content-Type": WEIGHTS_MIME}, timeout_s=timeout_s,
                         retries=retries)
        except calls.HttpError as e:
            if e.status is not None:
                self._add_bytes(sent=len(body))
            raise
        self._add_bytes(sent=len(body))
        return r

    def receive_weights(self, fit: Mapping[str, Any] | None = None, *, what: str = "weights",
                        model: str = "the model") -> tuple[dict, dict]:
        """(tensors, meta) of the current request's body; HTTP 400 if it is not safetensors,
        or (with `fit`, the model's state dict or {key: shape}) if the tensors do not fit
        it (check_weights: `what` and `model` name them in the message)."""
        body = request.get_data(cache=False)
        self._add_bytes(received=len(body))
        try:
            tensors, meta = weights.unpack_weights(body)
        except bounded_input.BodyError as e:
            self.log.warning("refused weights from %s on %s: %s", request.remote_addr,
                             request.path, e)
            raise BadRequest(f"{self.name}: {request.path}: {e}") from None
        except ValueError as e:
            self.log.warning("refused weights from %s on %s: %s", request.remote_addr,
                             request.path, e)
            raise BadRequest(f"{self.name}: {request.path} expects model weights as "
                             f"safetensors ({WEIGHTS_MIME}); {e}") from None
        if fit is not None:
            self.check_weights(tensors, fit, what=what, model=model)
        return tensors, meta

    def check_weights(self, tensors: Mapping[str, Any], fit: Mapping[str, Any], *, what: str = "weights",
                      model: str = "the model") -> None:
        """The check of received weights against the model, for every role: the same keys,
        each of the same shape (algorithms.check_fits); HTTP 400 "<node>: <what> do not fit
        <model>: <which keys or shape differ>" otherwise (logged as a refusal)."""
        try:
            check_fits(fit, tensors)
        except ValueError as e:
            where = request.path if has_request_context() else "this node"
            self.log.warning("refused %s on %s: they do not fit %s: %s", what, where, model, e)
            raise BadRequest(f"{self.name}: {what} do not fit {model}: {e}") from None

    def count_bytes(self, *, sent: int = 0, received: int = 0) -> None:
        """Add bytes a role moved outside send_weights/receive_weights to /stats'
        counters (e.g. weights in a GET's answer, an action server's calls)."""
        self._add_bytes(sent=sent, received=received)

    def _add_bytes(self, *, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self._bytes_sent += sent
            self._bytes_received += received

    # ------------------------------------------------------------------ controller

    def _ctl_url(self, path: str) -> str | None:
        return f"http://{self.ctl_address}{path}" if self.ctl_address else None

    def finish(self, timeout_s: float = 300.0) -> bool:
        """Tell the controller training is over (GET /finish); False if that failed."""
        self.set_state("finished")
        url = self._ctl_url("/finish")
        if url is None:
            self.log.warning("NET_CTL_ADDRESS not set: cannot call the controller's /finish")
            return False
        try:
            calls.call("GET", url, token=self.token, timeout_s=timeout_s, retries=2)
        except calls.HttpError as e:
            self.log.warning("controller /finish failed: %s", e)
            return False
        self.log.info("finish reported to the controller")
        return True

    def _heartbeat_loop(self) -> None:
        url = self._ctl_url("/heartbeat")
        if url is None:
            self.log.info("NET_CTL_ADDRESS not set: no heartbeats")
            return
        while not self.stopping.is_set():
            live = self._live_metrics()
            try:
                # Sent once (no retries): a lost answer only means the same records again
                # with the next heartbeat, which the controller drops by their seq.
                r = calls.call("POST", url, token=self.token, timeout_s=HEARTBEAT_PERIOD_S * (2 if live else 1),
                             json={"node": self.name, "state": self.state, "round": self.round,
                                   **({"error": self.error} if self.error else {}),
                                   **({"metrics": live} if live else {})})
                self._metrics_acked(r, live)
                if self._hb_failing:
                    self.log.info("heartbeats reach the controller again")
                self._hb_failing = False
            except calls.HttpError as e:
                if not self._hb_failing:  # once per outage, not every 2 s
                    self.log.warning("heartbeat failed (will keep trying quietly): %s", e)
                self._hb_failing = True
            self.stopping.wait(HEARTBEAT_PERIOD_S)

    # ------------------------------------------------------------------ lifecycle

    def start_serving(self, host: str = "0.0.0.0") -> "Runtime":
        """Bind and serve on a thread (run() does this; tests may call it directly)."""
        # waitress's bound: the largest route limit now (JSON, or the weights of the model
        # for the dataset folder's meta.json, or 64 MiB before there is one).
        self._server = serving.Server(self.app, host, self.port, threads=8).start()
        self.port = self._server.port
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat").start()
        self.log.info("%s %s serving on %s:%d (torch threads %d, dataset %s)", self.role,
                      self.name, host, self.port, self.torch_threads, self.dataset_dir)
        return self

    def stop(self) -> None:
        """Stop serving; run() then returns. Safe to call more than once."""
        self.stopping.set()

    def run(self, host: str = "0.0.0.0") -> None:
        """Serve until SIGTERM/SIGINT or stop(); then close the server and the logs."""
        def _on_signal(signum: int, _frame: Any) -> None:
            self.log.info("signal %d: stopping", signum)
            self.stop()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        try:
            self.start_serving(host)
        except OSError as e:
            self.log.error("cannot serve on %s:%d: %s", host, self.port, e)
            raise SystemExit(1) from None
        while not self.stopping.wait(1.0):  # short waits keep signal handling prompt
            pass
        self.close()

    def close(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        self.log.info("stopped")
        for h in list(self.log.handlers):
            h.flush()
            h.close()
            self.log.removeHandler(h)


def round_s(t: float) -> float:
    return round(t, 3)


def _finite(value: Any, depth: int = 0) -> Any:
    """value with every NaN or infinite float replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > 16:
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, depth + 1) for v in value]
    return value


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _span(parts: list[int]) -> str:
    return f"{parts[0]}..{parts[-1]}" if parts else "none"


def main(role: str, build: Callable[[Runtime], Any]) -> None:
    """Entry point of a role script: make the runtime, let `build` wire the role, serve."""
    try:
        rt = Runtime(role)
    except ConfigError as e:
        print(f"{role}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    build(rt)
    rt.run()
