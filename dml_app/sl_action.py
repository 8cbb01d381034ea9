"""Serverless worker: an OpenWhisk Docker action that trains against a parameter server.

Two servers in one process on an action node (n2..n5 of the serverless run):
* the node runtime on DML_PORT (4444, as every node: /hi, /log, /metrics, /stats,
  heartbeats, /conf/structure {"role": "action", "server", "connect"});
* the action server on DML_ACTION_PORT (default 8080), speaking OpenWhisk's action
  interface (apache/openwhisk docs/actions-new.md) to the testbed's invoker
  (controller/invoker.py), which plays OpenWhisk's invoker beside its containers:

  POST /init {"value": {"name", "main", "code"?, "binary"?, "env"?}}: once per container
      (its cold start). The action is built into the image (a Docker action), so `code`
      is ignored (logged when given); `main` must be "main" or "train" (default "main"),
      else 502 {"error"}. 200 {"ok": true}; a second /init: 403 {"error": "Cannot
      initialize the action more than once."}.
  POST /run {"value": params, "activation_id", "deadline", "api_key", ...}: one
      activation, one at a time (a second while one runs: 409 {"error"}); before /init:
      502 {"error"}. 200 with the result object, or non-200 {"error": message}: 400 for
      an envelope that is not OpenWhisk's (activation_id not 1..48 of [A-Za-z0-9._-],
      deadline not ms since the epoch, api_key missing), 502 for everything the action
      itself refuses or fails at (bad params, no such device, data that does not match
      its digest, the server refusing, the deadline) -- OpenWhisk's "application error".
      Every failure of this server, 401 and 404 included, is a JSON {"error"}.
  After each activation the log frame marker XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX goes
  to stdout and stderr, as OpenWhisk's proxies write it. The activation context (api_key,
  activation_id, ...) is used by this built-in function directly, not exported as
  __OW_* environment variables (no user code runs here).

Params (`value`): batch_sz_train (int 1..4096), epoch_n (int 1..100), apihost ("host:port"
of the server, an "http://" prefix allowed), update_intv (int 1..10000: push every this
many batches), dataset_url (http(s) URL whose last path segment is the sha256 of the
bundle), device ("cpu"; anything else is refused: no such device here), optional lr
(local SGD rate in (0, 10], default 0.05) and seed (shuffling, default from the
activation id). Other keys are ignored (OpenWhisk merges an action's default params in).

One activation:
  1. the data bundle (node_data.pack_train_parts: safetensors x/y + build_model's meta):
     GET dataset_url, at most MAX_BUNDLE_BYTES, its sha256 must equal the URL's digest;
     kept for warm runs (the last CACHED_BUNDLES digests: result "cached_data": true and
     no download). The node's own credential goes with it only when the URL is the
     controller's (NET_CTL_ADDRESS, whose GET /data/<sha256> a node credential opens);
     to any other host the GET goes without one;
  2. POST apihost/registerWorker {"worker_id": activation_id} with the /run's api_key as
     X-Testbed-Token (testbed_core.credentials.client_token of server and this node,
     which the invoker computes); a 410 (training over) ends the activation at once, successfully, with
     "server_done": true;
  3. cycles until epoch_n epochs of batches (ps.batches: full batches of a seeded
     permutation per epoch) are done: GET /getParameter (version v), update_intv local
     SGD batches at lr from those parameters (`Train: loss=..., round=v,` per cycle),
     then POST /putGradient g = (theta_pulled - theta_local) / lr over the model's
     parameters, meta {worker_id, version v, samples, loss, push_id
     "<activation_id>-<k>"} (a push whose answer was lost is sent once more, same
     push_id: the server applies it once). 409 (stale): counted as refused, go on with a
     new pull; 410: training is over, stop ("server_done": true);
  4. between batches: past the deadline (less than DEADLINE_MARGIN_S left) the
     activation ends with 502 {"error": "deadline exceeded ..."}, and every call is
     bounded by the time left; the node stopping (SIGTERM) ends it likewise;
  5. always (finally, best effort) POST /unregisterWorker.
Result: {"worker_id", "node", "pushes", "applied", "refused", "samples", "loss",
"version_start", "version_end", "server_done", "cached_data", "bytes": {"data_down",
"params_down", "gradients_up"}, "timings": {"fetch_s", "build_s", "train_s", "total_s"}}.
Each activation is also a metrics record {"event": "activation", "round": last version,
"activation_id", "status", ...} in the node's metrics.

Activations are not rounds of the round loop (rounds.py): the controller's invoker
(controller/invoker.py, called round by round by controller/sl_run.py) is the one owner
of their scheduling, deadlines and retries; an action runs the one activation each
/run hands it, bounded by the /run's deadline.

Credentials: /init and /run on the action port take the node's own token (EDGE_TB_TOKEN,
which the controller holds: tb.node_token(node)); anything else gets 401.

`python3 sl_action.py --openwhisk` runs only the action server on port 8080 (or
DML_ACTION_PORT), without the node runtime, for a real OpenWhisk (`wsk action create
NAME --docker IMAGE`; the README says how; untested here). There is NO testbed
credential on /init and /run in this mode: OpenWhisk's invoker reaches the container
over its own network, which isolates it, as every OpenWhisk action is. A /run without
/init then uses the built-in function (OpenWhisk may skip /init for a Docker action
without code). The testbed's credentials come as params there (an OpenWhisk api_key is
OpenWhisk's, not the testbed's): `server_token` for the server's routes (else api_key is
sent) and `data_token` for the data GET (else none); in the testbed these two params are
ignored.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import zlib
from typing import Any, Callable
from urllib.parse import urlsplit

import torch
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from dml_app import bounded_input, calls, nns, node_auth, serving, weights
from dml_app.algorithms import check_fits
from dml_app.node_data import unpack_parts
from dml_app.ps import batches
from dml_app.runtime import PEER_RE, WEIGHTS_MIME, ConfigError, Runtime

ACTION_PORT_ENV = "DML_ACTION_PORT"
DEFAULT_ACTION_PORT = 8080
END_MARKER = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
MAINS = ("main", "train")
ACTIVATION_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,48}$")   # + "-<k>" stays a 64-char push_id
HEADER_VALUE_RE = re.compile(r"^[\x21-\x7e]{1,256}$")       # a credential sent as a header
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_URL_CHARS = 2048
MAX_NAME_CHARS = 256
MAX_INIT_ENV = 64
MAX_INIT_ENV_CHARS = 4096
MAX_BUNDLE_BYTES = 256 * bounded_input.MiB     # MNIST: 3 MB per 1,000 samples
CACHED_BUNDLES = 3                   # warm runs reuse the last few bundles (by digest)
MAX_VERSION = 10_000_000             # ps.PsConfig's largest `steps`
DEFAULT_RUN_S = 300.0                # a /run without a deadline (OpenWhisk always sends one)
MAX_RUN_S = 7 * 24 * 3600.0          # a deadline further ahead is refused
DEADLINE_MARGIN_S = 0.5              # answer this long before the deadline, not after it
CALL_TIMEOUT_S = 60.0                # one call (data, server) at most, never past the deadline
UNREGISTER_TIMEOUT_S = 5.0
PUSH_RESENDS = 1
ACTION_THREADS = 4                   # /run, a refused second /run, /init, a stray request


class ActionError(Exception):
    """A failed activation or init: HTTP `status` with {"error": message}."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.message, self.status = str(message), status


def check_structure(conf: dict) -> dict:
    """An action node's structure conf (sl_structure_conf.py): {"role": "action", ...};
    the server's address comes with each /run (apihost)."""
    if conf.get("role") != "action":
        raise ValueError(f"'role' must be 'action' for sl_action.py, got {conf.get('role')!r}")
    return conf


def check_dataset_url(url: Any) -> tuple[str, str]:
    """(url, sha256 digest named by its last path segment); ActionError otherwise."""
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL_CHARS or any(ord(c) < 33 or ord(c) > 126 for c in url):
        raise ActionError(f"dataset_url must be an http URL of at most {MAX_URL_CHARS} printable characters, "
                          f"got {bounded_input.show_value(url)}")
    try:
        parts = urlsplit(url)
        parts.port      # noqa: B018  (a bad port raises ValueError)
    except ValueError as e:
        raise ActionError(f"dataset_url {url[:100]!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise ActionError(f"dataset_url {url[:100]!r}: expected http://host[:port]/.../<sha256>")
    digest = parts.path.rsplit("/", 1)[-1].lower()
    if not DIGEST_RE.match(digest):
        raise ActionError(f"dataset_url {url[:100]!r}: its last path segment must be the bundle's sha256 "
                          f"(64 hex digits)")
    return url, digest


def check_params(value: Any, activation_id: str) -> dict[str, Any]:
    """The /run params, checked (ActionError 502 naming the param)."""
    if not isinstance(value, dict):
        raise ActionError(f"'value' (the parameters) must be a JSON object, got {type(value).__name__}")
    device = value.get("device", "cpu")
    if device != "cpu":
        raise ActionError(f"device {bounded_input.show_value(device)}: no such device here; this action trains on the cpu "
                          f"(device \"cpu\")")
    try:
        p = {"batch_sz_train": bounded_input.number(value.get("batch_sz_train"), "batch_sz_train", 1, 4096, integer=True),
             "epoch_n": bounded_input.number(value.get("epoch_n"), "epoch_n", 1, 100, integer=True),
             "update_intv": bounded_input.number(value.get("update_intv"), "update_intv", 1, 10_000, integer=True),
             "lr": bounded_input.number(value.get("lr", 0.05), "lr", 0, 10, lo_open=True),
             "seed": bounded_input.number(value.get("seed", zlib.crc32(activation_id.encode())), "seed", 0, 2**32 - 1,
                                integer=True)}
    except ValueError as e:
        raise ActionError(str(e)) from None
    host = value.get("apihost")
    if isinstance(host, str):
        host = host.removeprefix("http://").rstrip("/")
    if not isinstance(host, str) or len(host) > MAX_NAME_CHARS or not PEER_RE.match(host):
        raise ActionError(f"apihost must be the server's \"host:port\", got {bounded_input.show_value(value.get('apihost'))}")
    p["apihost"] = host
    p["dataset_url"], p["digest"] = check_dataset_url(value.get("dataset_url"))
    for key in ("server_token", "data_token"):     # read in --openwhisk mode only
        token = value.get(key)
        if token is not None and (not isinstance(token, str) or not HEADER_VALUE_RE.match(token)):
            raise ActionError(f"{key} must be a credential of 1..256 printable characters")
        p[key] = token
    return p


def _deadline(raw: Any) -> float:
    """The /run's deadline (ms since the epoch, a number or a digit string as OpenWhisk
    sends it) as a time.monotonic() instant."""
    now = time.time()
    if raw is None:
        return time.monotonic() + DEFAULT_RUN_S
    if isinstance(raw, str) and raw.isdigit() and len(raw) <= 16:
        raw = int(raw)
    try:
        ms = bounded_input.number(raw, "deadline (ms since the epoch)", 0, (now + MAX_RUN_S) * 1000)
    except ValueError as e:
        raise ActionError(str(e), 400) from None
    return time.monotonic() + (ms / 1000.0 - now)


class Deadline(ActionError):
    pass


class Action:
    """The built-in action: /init once, /run many (one at a time), the training of one
    activation. `data_token`: the credential for the controller's data route (sent only
    to `ctl_address`); the hooks tie it to the node runtime (logs, state, metrics)."""

    def __init__(self, *, node: str, log: logging.Logger, data_token: str | None = None,
                 ctl_address: str = "", openwhisk: bool = False,
                 on_train: Callable[[float, int], None] | None = None,
                 set_state: Callable[..., None] | None = None,
                 on_record: Callable[[dict], None] | None = None,
                 on_bytes: Callable[..., None] | None = None,
                 stopping: threading.Event | None = None):
        self.node, self.log = node, log
        self._data_token, self._ctl_address = data_token, ctl_address
        self.openwhisk = openwhisk
        self._on_train = on_train or (lambda loss, v: log.info("Train: loss=%.4f, round=%d,", loss, v))
        self._set_state = set_state or (lambda *a, **k: None)
        self._on_record = on_record or (lambda rec: None)
        self._on_bytes = on_bytes or (lambda **kw: None)    # the node's /stats counters
        self.stopping = stopping or threading.Event()
        self._init_lock = threading.Lock()
        self.init_value: dict | None = None
        self._busy = threading.Lock()            # one activation at a time
        self.current: str | None = None          # the activation running
        self._bundles: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self._params_limits: dict[str, int] = {}

    # ------------------------------------------------------------------ HTTP
    def make_app(self, token: str | None) -> Flask:
        """The action server's Flask app; `token` (the node's own) guards /init and /run,
        None only in --openwhisk mode (no testbed credential there)."""
        app = Flask(f"edgetb-action-{self.node}")
        if token:
            node_auth.require_token(app, token)
        bounded_input.limit_bodies(app, json_errors=True)

        @app.errorhandler(HTTPException)
        def _http_error(e: HTTPException):
            return jsonify(error=f"{e.code} {e.name}: {e.description}"), e.code

        @app.after_request
        def _json_errors(resp):
            # OpenWhisk reads a failure's body as {"error": ...}: the credential check's
            # plain-text 401 too
            if resp.status_code >= 400 and not resp.is_json:
                out = jsonify(error=resp.get_data(as_text=True).strip()[:1000] or resp.status)
                out.status_code = resp.status_code
                return out
            return resp

        @app.post("/init")
        def _init():
            return self._answer(self.init)

        @app.post("/run")
        def _run():
            return self._answer(self.run)

        return app

    def _answer(self, fn: Callable[[dict], dict]):
        try:
            body = bounded_input.request_json(what="the request")
            return jsonify(fn(body))
        except bounded_input.BodyError as e:
            return jsonify(error=str(e)), 400
        except ActionError as e:
            return jsonify(error=e.message), e.status

    # ------------------------------------------------------------------ /init
    def init(self, body: dict) -> dict:
        value = body.get("value")
        if not isinstance(value, dict):
            raise ActionError("/init: 'value' must be a JSON object {\"name\", \"main\", \"code\", \"binary\", \"env\"}")
        with self._init_lock:
            if self.init_value is not None:
                raise ActionError("Cannot initialize the action more than once.", 403)
            main, name = value.get("main", "main"), value.get("name", "")
            if main not in MAINS:
                raise ActionError(f"/init: main {bounded_input.show_value(main)}: this action's entry points are "
                                  f"{' and '.join(MAINS)}")
            if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
                raise ActionError(f"/init: name must be a string of at most {MAX_NAME_CHARS} characters")
            code, binary, env = value.get("code"), value.get("binary", False), value.get("env") or {}
            if code is not None and not isinstance(code, str) or not isinstance(binary, bool):
                raise ActionError("/init: code must be a string and binary a boolean")
            if not isinstance(env, dict) or len(env) > MAX_INIT_ENV or any(
                    not isinstance(k, str) or not isinstance(v, str) or len(k) > 128 or len(v) > MAX_INIT_ENV_CHARS
                    for k, v in env.items()):
                raise ActionError(f"/init: env must be an object of at most {MAX_INIT_ENV} string values")
            if code:
                self.log.info("/init: %d characters of code given and ignored: the action is built into "
                              "the image", len(code))
            self.init_value = {"name": name, "main": main, "env": dict(env)}
        self.log.info("action initialized: name %r, main %s", name, main)
        return {"ok": True}

    # ------------------------------------------------------------------ /run
    def run(self, body: dict) -> dict:
        with self._init_lock:
            if self.init_value is None:
                if not self.openwhisk:
                    raise ActionError("The action has not been initialized: POST /init first.")
                self.init_value = {"name": "", "main": "main", "env": {}}   # OpenWhisk skipped /init
        aid = body.get("activation_id")
        if not isinstance(aid, str) or not ACTIVATION_ID_RE.match(aid):
            raise ActionError(f"activation_id must be 1..48 characters of [A-Za-z0-9._-], got "
                              f"{bounded_input.show_value(aid)}", 400)
        deadline = _deadline(body.get("deadline"))
        api_key = body.get("api_key")
        if not isinstance(api_key, str) or not HEADER_VALUE_RE.match(api_key):
            raise ActionError("api_key (the credential for the server's routes) must be 1..256 printable "
                              "characters", 400)
        if not self._busy.acquire(blocking=False):
            raise ActionError(f"activation {self.current or '(ending)'} is running: this action container "
                              f"takes one activation at a time", 409)
        self.current = aid
        t0 = time.monotonic()
        record: dict[str, Any] = {"activation_id": aid}
        try:
            params = check_params(body.get("value"), aid)
            data_token = self._data_token
            if self.openwhisk:     # the testbed's credentials come as params there
                api_key, data_token = params["server_token"] or api_key, params["data_token"]
            result = self._activation(aid, params, api_key, data_token, deadline, t0)
            record.update(status="success", pushes=result["pushes"], applied=result["applied"],
                          refused=result["refused"], cached_data=result["cached_data"],
                          server_done=result["server_done"], version=result["version_end"])
            return result
        except ActionError as e:
            record.update(status="error", error=e.message[:500])
            self.log.warning("activation %s failed: %s", aid, e.message)
            raise
        except Exception as e:     # a bug or torch error: the activation fails, the action lives on
            self.log.exception("activation %s failed", aid)
            record.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
            raise ActionError(f"activation {aid} failed: {type(e).__name__}: {e}") from None
        finally:
            record["total_s"] = round(time.monotonic() - t0, 3)
            try:
                self._on_record(record)
            finally:
                self.current = None
                self._set_state("idle")
                self._busy.release()
                for stream in (sys.stdout, sys.stderr):
                    print(END_MARKER, file=stream, flush=True)

    # ------------------------------------------------------------------ one activation
    def _activation(self, aid: str, p: dict, api_key: str, data_token: str | None, deadline: float,
                    t0: float) -> dict:
        def left() -> float:
            return deadline - time.monotonic() - DEADLINE_MARGIN_S

        def check(what: str) -> float:
            """Seconds left for the next step (`what`); Deadline/stopping ActionError."""
            if self.stopping.is_set():
                raise ActionError(f"activation {aid}: the node is stopping ({what})")
            s = left()
            if s <= 0:
                raise Deadline(f"deadline exceeded before {what} (activation {aid}, {stats['pushes']} pushes, "
                               f"{stats['samples']} samples trained)")
            return s

        def bounded(what: str) -> float:
            return min(CALL_TIMEOUT_S, check(what))

        def call_failed(what: str, e: calls.HttpError) -> ActionError:
            if e.status is None and left() <= 0:
                return Deadline(f"deadline exceeded during {what} (activation {aid}): {e}")
            return ActionError(f"{what} failed: {e}")

        stats = {"pushes": 0, "applied": 0, "refused": 0, "samples": 0}
        byts = {"data_down": 0, "params_down": 0, "gradients_up": 0}
        host, server_done = p["apihost"], False
        server_url = f"http://{host}"
        self._set_state("training")

        # 1. the data
        x, y, meta, cached, got = self._bundle(p["dataset_url"], p["digest"], data_token, bounded, call_failed)
        self._moved(byts, "data_down", got)
        t_fetch = time.monotonic()

        # 2. the model
        try:
            model = nns.build_model(meta)
        except ValueError as e:
            raise ActionError(f"the data bundle's dataset has no model here: {e}") from None
        params_limit = self._params_limit(meta, model)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        opt = torch.optim.SGD(model.parameters(), lr=p["lr"])
        n, bs = len(y), p["batch_sz_train"]
        total = p["epoch_n"] * max(1, n // min(bs, n))      # ps.batches yields full batches only
        stream = batches(n, bs, seed=p["seed"])
        t_build = time.monotonic()

        # 3. register, train, push
        version_start = version_end = None
        loss_last: float | None = None
        registered = False
        try:
            try:
                ans = calls.call("POST", f"{server_url}/registerWorker", token=api_key, json={"worker_id": aid},
                               timeout_s=bounded("registering"), retries=2).json()
                registered = True
                version_start = version_end = bounded_input.number(ans.get("version"), "the server's version", 0,
                                                         MAX_VERSION, integer=True)
            except calls.HttpError as e:
                if e.status != 410:
                    raise call_failed(f"registering worker {aid} at the server {host}", e) from None
                server_done = True
            except (ValueError, AttributeError) as e:
                raise ActionError(f"the server {host} answered /registerWorker with {e}") from None
            done = 0
            while done < total and not server_done:
                # pull
                try:
                    r = calls.call("GET", f"{server_url}/getParameter", token=api_key,
                                 timeout_s=bounded("pulling parameters"), retries=2, max_bytes=params_limit)
                except calls.HttpError as e:
                    raise call_failed(f"GET /getParameter from {host}", e) from None
                self._moved(byts, "params_down", len(r.content))
                try:
                    tensors, pmeta = weights.unpack_weights(r.content)
                    check_fits(model.state_dict(), tensors)     # the weights check every role makes
                    raw_v = pmeta.get("version")
                    v = bounded_input.number(int(raw_v) if isinstance(raw_v, str) and raw_v.isdigit() else raw_v,
                                   "parameters 'version'", 0, MAX_VERSION, integer=True)
                    model.load_state_dict(tensors, strict=True)
                except (ValueError, RuntimeError) as e:
                    raise ActionError(f"the parameters from {host} do not fit the model: {e}"[:1000]) from None
                version_end = max(version_end, v)
                self._set_state("training", v)
                pulled = {k: q.detach().clone() for k, q in model.named_parameters()}
                # local SGD
                loss_sum, samples = 0.0, 0
                model.train()
                for _ in range(min(p["update_intv"], total - done)):
                    check("the next batch")
                    idx = torch.from_numpy(next(stream))
                    opt.zero_grad(set_to_none=True)
                    loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                    loss.backward()
                    opt.step()
                    loss_sum += float(loss.item()) * len(idx)
                    samples += len(idx)
                    done += 1
                stats["samples"] += samples
                loss_last = loss_sum / samples
                # push
                with torch.no_grad():
                    grad = {k: (pulled[k] - q.detach()) / p["lr"] for k, q in model.named_parameters()}
                stats["pushes"] += 1
                gmeta = {"worker_id": aid, "version": v, "samples": samples, "push_id": f"{aid}-{stats['pushes']}"}
                if math.isfinite(loss_last):
                    gmeta["loss"] = loss_last
                self._on_train(loss_last, v)
                body = weights.pack_weights(grad, gmeta)
                outcome = self._push(server_url, body, api_key, gmeta["push_id"], bounded, call_failed, byts)
                if outcome is None:
                    server_done = True
                elif outcome is False:
                    stats["refused"] += 1
                else:
                    stats["applied"] += bool(outcome[0])
                    version_end = max(version_end, outcome[1])
        finally:
            if registered:
                self._unregister(server_url, aid, api_key, left)
        t_end = time.monotonic()
        return {"worker_id": aid, "node": self.node, **stats,
                "loss": loss_last if loss_last is not None and math.isfinite(loss_last) else None,
                "version_start": version_start, "version_end": version_end, "server_done": server_done,
                "cached_data": cached, "bytes": byts,
                "timings": {"fetch_s": round(t_fetch - t0, 3), "build_s": round(t_build - t_fetch, 3),
                            "train_s": round(t_end - t_build, 3), "total_s": round(t_end - t0, 3)}}

    def _moved(self, byts: dict, key: str, n: int) -> None:
        """Count n bytes in the activation's result and in the node's counters."""
        byts[key] += n
        if key == "gradients_up":
            self._on_bytes(sent=n)
        else:
            self._on_bytes(received=n)

    def _push(self, server_url: str, body: bytes, api_key: str, push_id: str, bounded, call_failed,
              byts: dict) -> tuple[bool, int] | bool | None:
        """POST one gradient: (applied, version); False when refused as stale (409); None
        when training is over (410)."""
        for attempt in range(PUSH_RESENDS + 1):
            try:
                r = calls.call("POST", f"{server_url}/putGradient", token=api_key, data=body,
                             headers={"Content-Type": WEIGHTS_MIME}, timeout_s=bounded("pushing a gradient"),
                             retries=2)
            except calls.HttpError as e:
                if e.sent:
                    self._moved(byts, "gradients_up", len(body))
                if e.status == 409:
                    self.log.warning("gradient %s refused: %s", push_id, e.message)
                    return False
                if e.status == 410:
                    self.log.info("gradient %s: training is over at the server (%s)", push_id, e.message)
                    return None
                if e.status is None and e.sent and attempt < PUSH_RESENDS:
                    self.log.warning("gradient %s: no answer (%s); sending it again", push_id, e.message)
                    continue
                raise call_failed(f"pushing gradient {push_id} to {server_url}", e) from None
            self._moved(byts, "gradients_up", len(body))
            try:
                ans = r.json()
                return bool(ans.get("applied")), bounded_input.number(ans.get("version"), "the server's version", 0,
                                                            MAX_VERSION, integer=True)
            except (ValueError, AttributeError) as e:
                raise ActionError(f"the server answered /putGradient with {e}") from None
        raise AssertionError("unreachable")

    def _unregister(self, server_url: str, aid: str, api_key: str, left: Callable[[], float]) -> None:
        try:
            calls.call("POST", f"{server_url}/unregisterWorker", token=api_key, json={"worker_id": aid},
                     timeout_s=max(1.0, min(UNREGISTER_TIMEOUT_S, left() + DEADLINE_MARGIN_S)), retries=1)
        except calls.HttpError as e:
            if e.status != 410:
                self.log.warning("unregistering worker %s failed (the server drops it anyway when it "
                                 "is over): %s", aid, e)

    def _bundle(self, url: str, digest: str, data_token: str | None, bounded, call_failed) -> tuple:
        """(x, y, meta, cached, bytes downloaded) of the bundle `digest` names."""
        if digest in self._bundles:
            self._bundles.move_to_end(digest)
            x, y, meta = self._bundles[digest]
            return x, y, meta, True, 0
        token = data_token if self.openwhisk or urlsplit(url).netloc == self._ctl_address else None
        try:
            r = calls.call("GET", url, token=token, timeout_s=bounded("fetching the data"), retries=2,
                         max_bytes=MAX_BUNDLE_BYTES)
        except calls.HttpError as e:
            err = call_failed(f"fetching the data bundle {url[:200]}", e)
            if e.status == 401 and token is None and data_token:
                err.message += (f" (the node's credential goes only to the controller, NET_CTL_ADDRESS="
                                f"{self._ctl_address or 'unset'})")
            raise err from None
        got = hashlib.sha256(r.content).hexdigest()
        if got != digest:
            raise ActionError(f"the data bundle from {url[:200]} has sha256 {got}, its URL names {digest}: "
                              f"refused")
        try:
            x, y, meta = unpack_parts(r.content)
        except ValueError as e:
            raise ActionError(f"the data bundle from {url[:200]}: {e}") from None
        self._bundles[digest] = (x, y, meta)
        while len(self._bundles) > CACHED_BUNDLES:
            self._bundles.popitem(last=False)
        return x, y, meta, False, len(r.content)

    def _params_limit(self, meta: dict, model: torch.nn.Module) -> int:
        """The largest /getParameter answer taken: 2 x the model's safetensors + slack (as
        runtime.weights_limit sizes weights routes)."""
        key = f"{meta.get('name')}|{meta.get('input_shape')}|{meta.get('num_classes')}"
        if key not in self._params_limits:
            self._params_limits[key] = 2 * len(weights.pack_weights(model.state_dict())) + bounded_input.WEIGHTS_SLACK
        return self._params_limits[key]


def action_port(env) -> int:
    raw = env.get(ACTION_PORT_ENV, "") or str(DEFAULT_ACTION_PORT)
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise ConfigError(f"{ACTION_PORT_ENV}={raw!r} is not a port number")
    return int(raw)


def main_node() -> None:
    """The node runtime on DML_PORT plus the action server on DML_ACTION_PORT."""
    try:
        rt = Runtime("sl_action")
        port = action_port(os.environ)
    except ConfigError as e:
        print(f"sl_action: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    rt.on_structure(check_structure)
    action = Action(node=rt.name, log=rt.log, data_token=rt.token, ctl_address=rt.ctl_address,
                    on_train=rt.log_train, set_state=rt.set_state, stopping=rt.stopping,
                    on_record=lambda rec: rt.log_metric("activation", rec.get("version") or 0, **rec),
                    on_bytes=rt.count_bytes)
    try:
        server = serving.Server(action.make_app(rt.token), "0.0.0.0", port, threads=ACTION_THREADS).start()
    except OSError as e:
        rt.log.error("cannot serve the action on port %d: %s", port, e)
        rt.close()
        raise SystemExit(1) from None
    rt.log.info("action server on 0.0.0.0:%d (POST /init, POST /run)", server.port)
    try:
        rt.run()
    finally:
        server.close()


def main_openwhisk() -> None:
    """Only the action server (port 8080 or DML_ACTION_PORT), for a real OpenWhisk: no
    node runtime and no testbed credential on /init and /run (OpenWhisk's network
    isolates the container)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("sl_action")
    try:
        port = action_port(os.environ)
    except ConfigError as e:
        print(f"sl_action: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    stopping = threading.Event()
    action = Action(node=os.environ.get("NET_NODE_NAME") or socket.gethostname()[:64], log=log,
                    openwhisk=True, stopping=stopping)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    server = serving.Server(action.make_app(None), "0.0.0.0", port, threads=ACTION_THREADS).start()
    log.info("OpenWhisk action server on 0.0.0.0:%d (POST /init, POST /run)", server.port)
    while not stopping.wait(1.0):
        pass
    server.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--openwhisk"]:
        main_openwhisk()
    elif sys.argv[1:]:
        print("usage: python3 sl_action.py [--openwhisk]", file=sys.stderr)
        raise SystemExit(2)
    else:
        main_node()
