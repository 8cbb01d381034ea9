"""Parameter server: keeps the model and its version; workers pull parameters and push
gradients (the update rules are dml_app/ps.py, pure).

On GET /start (the root) it builds the seeded model (version 0) and starts every worker
(their runtime's GET /start). Then:

* POST /ps/pull, JSON {"name", "have", "wait_s"}: when the version differs from `have`
  the server POSTs the parameters (safetensors, meta {version}) to the worker's
  /ps/params, so they travel over the server -> worker link, and answers
  {"version": v, "sent": true}. When it does not, the server waits up to `wait_s`
  (at most 10 s) for a new version, else answers {"version": v, "sent": false}.
* POST /ps/push, a gradient (safetensors, meta {name, version, samples, loss, push_id?}):
  200 {"applied", "version"}; a push_id this worker's push was already accepted with is
  not applied again (a worker resending a push whose answer it lost): 200 {"applied"
  (the first outcome), "version", "duplicate": true}; 409 with the reason when refused (async: older than
  `max_staleness` versions; sync: not of the current version, or pushed twice); 400
  for a gradient that does not fit the model; 410 once training is over.
* GET /ps/status: {"mode", "version", "steps", "done", "accepted", "rejected", "pending",
  "gone"} (serverless mode adds "serverless": true, "registered"); GET /ps/model: the
  current parameters (safetensors, meta {version}), for inspection.

Sync mode under failures: each version's gradients are a runtime Gather (rt.gather) of
the workers; the step is applied as soon as every live worker pushed, else at the
version's deadline, `step_timeout_s` after the version was served (it became current),
with the average of the gradients that came. A worker is not waited for ("gone") once
it is found dead (its /ps/params refused the connection, or the Gather's /hi probe found
its port closed) or it missed a deadline without having pulled that version (its pulls
stopped); it is waited for again from the version after its next pull (a restarted
worker, started again by the controller, rejoins so). A version with no gradient at its
deadline waits again, at most `step_retries` more deadlines, then the run fails (state
error, naming the workers and why). Each version applied without every worker, or
after more than one deadline, goes to the metrics as {"event": "participants", "round":
V (the version the step made), "participants", "missing" {worker: why}, "attempt" (the
deadlines it took), "waited_s" (from served to applied)}; versions every worker took
part in write nothing, so the metrics stay small over many steps. Async mode is as
before (no waiting: each gradient is applied on arrival).

It evaluates on its test parts every `eval_every` versions and at the last one, logging
`Aggregate: accuracy=..., round=V,` where the round V is the VERSION (the number of SGD
steps applied so far), and calls the controller's /finish after `steps` versions. Each
update is logged as `Step: version=V, ...`.

Structure conf (ps_structure_conf.py): {"role": "server", "workers": [...], "connect",
"mode", "steps", "lr", "lr_end", "momentum", "max_staleness", "eval_every",
"step_timeout_s", "step_retries", "seed"} (ps.PsConfig holds the defaults).

Serverless mode (structure conf {"role": "server", "serverless": true, "mode": "async",
"actions": [node names], "steps", "lr", "lr_end", "momentum", "max_staleness",
"eval_every", "seed"}; no "workers"): the workers are stateless actions
(dml_app/sl_action.py) that come and go. GET /start builds the seeded model (version 0) and starts nobody; workers
register themselves and train on the same versioned model with the async rule. These
routes take a client credential (testbed_core.credentials.client_token(admin, <this
node>, <calling node>): the api_key an invoker passes its action), which names the calling node; the node's own
credential (the controller's) may read and unregister, not register or push; the
testbed's peer credential gets 403, no credential 401:

* POST /registerWorker JSON {"worker_id"} (1..64 characters of [A-Za-z0-9._-]) -> 200
  {"worker_id", "version", "registered" (how many now)}; the same id again from the same
  node: 200 again; an id registered by another node: 409; a node not in "actions" (or
  the controller): 403; ps.MAX_WORKERS (1024) registered already: 429; 410 once
  training is over.
* POST /unregisterWorker JSON {"worker_id"} -> 200 {"unregistered": bool}; only the node
  that registered it, or the controller, may (403).
* GET /getVersion -> {"version", "accuracy" (the last evaluated: the initial model's
  until the first `eval_every`), "accuracy_version", "steps", "done", "registered"}.
* GET /getParameter -> the current parameters (safetensors, meta {version}); still 200
  once training is over. Its bodies count in /stats "bytes_sent".
* POST /putGradient, a gradient (safetensors, meta {worker_id, version, samples, loss?,
  push_id?}) -> as /ps/push: 200 {"applied", "version"} (a push_id seen from this worker
  id: the first outcome, "duplicate": true); 409 stale (staleness > max_staleness) or a
  version never served; 403 the worker id is not registered by the calling node; 400 a
  gradient that does not fit the model or bad metadata; 410 once training is over.

Each accepted gradient is logged `Step: version=V, from=<worker_id>, staleness=S,
loss=...,`. Every route answers 409 before GET /start. /ps/pull and /ps/push answer
409 in serverless mode; GET /getVersion and
/getParameter also serve a long-lived server's model (the register and push routes
answer 409 there).
"""
from __future__ import annotations

import dataclasses
import threading
import time

import torch
from flask import Response, jsonify, request
from werkzeug.exceptions import BadRequest, Conflict, Forbidden, Gone, TooManyRequests

from dml_app import bounded_input, calls, nns, weights
from dml_app.algorithms import weighted_mean
from dml_app.learn import evaluate
from dml_app.ps import (MAX_PUSH_ID_CHARS, Finished, NotAllowed, ParameterServer, PsConfig, Registry, Rejected,
                TooMany, check_worker_id)
from dml_app.runtime import DEAD, TIMEOUT, WEIGHTS_MIME, Gather, Runtime, main, reply_for

MAX_WAIT_S = 10.0
MAX_VERSION = 10_000_000      # PsConfig's largest `steps`
MAX_SAMPLES = 10**12          # a batch's sample count: far beyond any dataset, far below overflow
MAX_WAITERS = 4          # long polls held at once: the node serves 8 requests at a time
PARAMS_TIMEOUT_S = 60.0  # sending one worker its parameters (LeNet: ~250 kB) may take this long
START_DEADLINE_S = 60.0  # starting every worker (their GET /start, in parallel)
MAX_ACTIONS = 1024       # serverless: action nodes a conf may name
REGISTER_BODY = 4096     # {"worker_id": ...} is tens of bytes


def check_structure(conf: dict) -> dict:
    """Validate the server's structure conf (ValueError names the key)."""
    if conf.get("role") != "server":
        raise ValueError(f"'role' must be 'server' for ps_server.py, got {conf.get('role')!r}")
    fields = {f.name for f in dataclasses.fields(PsConfig)}
    config = PsConfig(**{k: v for k, v in conf.items() if k in fields})
    serverless = conf.get("serverless", False)
    if not isinstance(serverless, bool):
        raise ValueError(f"'serverless' must be true or false, got {serverless!r}")
    if serverless:
        actions = conf.get("actions")
        if config.mode != "async":
            raise ValueError(f"serverless mode takes 'mode': 'async' (workers come and go), "
                             f"got {config.mode!r}")
        if "workers" in conf:
            raise ValueError("serverless mode: workers register themselves; give 'actions' (the nodes "
                             "allowed to register), not 'workers'")
        if not isinstance(actions, list) or not 0 < len(actions) <= MAX_ACTIONS \
                or not all(isinstance(a, str) and 0 < len(a) <= 64 for a in actions) \
                or len(set(actions)) != len(actions):
            raise ValueError(f"serverless mode: 'actions' must be a non-empty list of at most {MAX_ACTIONS} "
                             f"distinct node names, got {str(actions)[:200]}")
        return conf
    workers, connect = conf.get("workers"), conf.get("connect")
    if not isinstance(workers, list) or not workers or not all(isinstance(w, str) for w in workers) \
            or len(set(workers)) != len(workers):
        raise ValueError(f"'workers' must be a non-empty list of distinct node names, got {workers!r}")
    if not isinstance(connect, dict) or any(w not in connect for w in workers):
        raise ValueError("'connect' must give the address of every worker (the server sends them parameters)")
    return conf


class PsServer:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.ps: ParameterServer | None = None
        self.registry: Registry | None = None      # serverless mode: the registered workers
        self._accuracy: tuple[float, int] | None = None    # the last evaluation (accuracy, version)
        self._cond = threading.Condition()
        self._evals: list[tuple[int, dict]] = []            # (version, params) to evaluate
        self._losses: dict[str, tuple[float, int]] = {}      # sync: this step's losses
        self._waiters = threading.BoundedSemaphore(MAX_WAITERS)
        # sync: the current version's gradients (None between versions), how many
        # deadlines it has had, the workers not waited for (-> why) until they pull
        # again, and the last version each worker was sent.
        self._gather: Gather | None = None
        self._attempt = 1
        self._opened = 0.0                 # when the current version was first served
        self._skipped: set[str] = set()    # gone when it was served: dropped at once
        self._gone: dict[str, str] = {}
        self._pulled: dict[str, int] = {}
        # The current version packed once (safetensors): every worker's GET of one version
        # gets the same bytes, not a pack each. Replaced when the version changes.
        self._packed: tuple[int, bytes] | None = None
        rt.on_structure(check_structure)
        rt.on_dataset(self._check_data)
        rt.on_start(self.run)
        rt.declare_model(nns.build_model)     # gradients are the model's size
        rt.route("/ps/pull", methods=["POST"])(self.pull)
        rt.route("/ps/push", methods=["POST"], weights=True)(self.push)
        rt.route("/ps/status", methods=["GET"])(self.status)
        rt.route("/ps/model", methods=["GET"])(self.model)
        # serverless mode's API (client credentials: see the module docstring)
        rt.route("/registerWorker", methods=["POST"], clients=True, max_body=REGISTER_BODY)(self.register)
        rt.route("/unregisterWorker", methods=["POST"], clients=True, max_body=REGISTER_BODY)(self.unregister)
        rt.route("/getVersion", methods=["GET"], clients=True)(self.get_version)
        rt.route("/getParameter", methods=["GET"], clients=True)(self.get_parameter)
        rt.route("/putGradient", methods=["POST"], clients=True, weights=True)(self.put_gradient)

    @staticmethod
    def _check_data(data) -> None:
        if data.test_samples == 0:
            raise ValueError("the server evaluates the model: give it test parts (test_len > 0)")

    def _config(self) -> PsConfig:
        fields = {f.name for f in dataclasses.fields(PsConfig)}
        return PsConfig(**{k: v for k, v in self.rt.structure.items() if k in fields})

    # ------------------------------------------------------------------ HTTP
    def pull(self):
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise BadRequest("expected JSON {\"name\": ..., \"have\": version, \"wait_s\": seconds}")
        name = body.get("name")
        try:
            have = bounded_input.number(body.get("have"), "'have' (the version held, -1 for none)", -1,
                              MAX_VERSION, integer=True)
            wait_s = bounded_input.number(body.get("wait_s", 0), "'wait_s'", 0, 3600)
        except ValueError as e:
            raise BadRequest(f"{self.rt.name}: /ps/pull: {e}") from None
        with self._cond:
            ps = self._long_lived()
            if name not in ps.workers:
                raise Conflict(f"{name!r} is not a worker of this server")
            if ps.version == have and wait_s > 0 and self._waiters.acquire(blocking=False):
                try:
                    self._cond.wait_for(lambda: ps.version != have or ps.done or self.rt.stopping.is_set(),
                                        timeout=min(float(wait_s), MAX_WAIT_S))
                finally:
                    self._waiters.release()
            if ps.done:
                raise Gone(f"training finished at version {ps.version}")
            version, params = ps.version, ps.params   # updates replace params, never change them
        if version == have:
            return jsonify(version=version, sent=False)
        try:
            self.rt.send_weights(self.rt.peer(name), "/ps/params", params, {"version": version},
                                 timeout_s=PARAMS_TIMEOUT_S)
        except calls.HttpError as e:
            self._lost(name, reply_for(name, e).why, f"its /ps/params failed: {e}")
            return jsonify(error=f"sending version {version} to {name} failed: {e}"), 502
        with self._cond:
            self._pulled[name] = version
            why = self._gone.pop(name, None)
            if why is not None and ps.config.mode == "sync":
                self.rt.log.info("%s pulled version %d (it was not waited for: %s): waited for again "
                                 "from the next version", name, version, why)
        return jsonify(version=version, sent=True)

    def _lost(self, worker: str, why: str, what: str) -> None:
        """Sync: stop waiting for `worker` (found dead: `why`) until it pulls again."""
        with self._cond:
            if self.ps is None or self.ps.config.mode != "sync" or worker in self._gone:
                return
            if why == DEAD:
                self._gone[worker] = why
                self.rt.log.warning("%s is not waited for until it pulls again: %s", worker, what)
            gather = self._gather
        if gather is not None and why == DEAD:
            gather.drop(worker, why)

    def _gradient(self, key: str) -> tuple[dict, str, int, int, float, str | None]:
        """The request's gradient: (tensors, worker (meta[key]), version, samples, loss,
        push_id); BadRequest for anything malformed."""
        tensors, meta = self.rt.receive_weights()
        name = meta.get(key)
        if not isinstance(name, str):
            raise BadRequest(f"gradient metadata must carry '{key}' (str), 'version' (int) and "
                             "'samples' (int >= 1)")
        try:
            version = bounded_input.number(meta.get("version"), "gradient metadata 'version'", 0, MAX_VERSION,
                                 integer=True)
            samples = bounded_input.number(meta.get("samples"), "gradient metadata 'samples'", 1, MAX_SAMPLES,
                                 integer=True)
            loss = bounded_input.number(meta["loss"], "gradient metadata 'loss'") if "loss" in meta else float("nan")
        except ValueError as e:
            raise BadRequest(f"{self.rt.name}: gradient from {name[:64]}: {e}") from None
        push_id = meta.get("push_id")
        if push_id is not None and (not isinstance(push_id, str) or not 0 < len(push_id) <= MAX_PUSH_ID_CHARS):
            raise BadRequest(f"{self.rt.name}: gradient from {name[:64]}: 'push_id' must be a string "
                             f"of 1 to {MAX_PUSH_ID_CHARS} characters")
        return tensors, name, version, samples, loss, push_id

    def push(self):
        tensors, name, version, samples, loss, push_id = self._gradient("name")
        with self._cond:
            self._long_lived()
            return self._take(name, version, tensors, samples, loss, push_id)

    def _take(self, name: str, version: int, tensors: dict, samples: int, loss: float,
              push_id: str | None):
        """(lock held) Apply or collect one gradient (/ps/push, /putGradient): the answer."""
        ps = self._running()
        before = ps.version
        prev = ps.seen(name, push_id)
        if prev is not None:
            self.rt.log.info("push %s from %s again: applied once already, not again", push_id, name)
            return jsonify(applied=prev, version=ps.version, duplicate=True)
        try:
            if ps.config.mode == "async":
                applied = ps.push(name, version, tensors, samples, push_id=push_id)
            else:
                applied = self._sync_push(ps, name, version, tensors, samples, loss, push_id)
        except Finished as e:
            raise Gone(str(e)) from None
        except Rejected as e:
            self.rt.log.warning("refused: %s", e)
            raise Conflict(str(e)) from None
        except ValueError as e:
            raise BadRequest(f"{self.rt.name}: {e}") from None
        if ps.config.mode == "async":
            self._losses[name] = (loss, samples)
            self._applied(f"from={name}, staleness={before - version},")
        return jsonify(applied=applied, version=ps.version)

    def _sync_push(self, ps: ParameterServer, name: str, version: int, grad: dict, samples: int,
                   loss: float, push_id: str | None) -> bool:
        """(lock held) Add a gradient to the current version's Gather; the step is applied
        here when no live worker is left to wait for. True when it was."""
        ps.check_push(name, version, grad)
        gather = self._gather
        if gather is None:
            raise Rejected(f"gradient from {name} for version {version}: the version is not open "
                           f"(between steps)")
        try:
            gather.add(name, lambda: (ps.push(name, version, grad, samples, push_id=push_id),
                                      self._losses.__setitem__(name, (loss, samples))))
        except Conflict as e:     # closed at its deadline, or pushed twice
            ps.rejected += 1
            raise Rejected(f"gradient from {name} for version {version}: {e.description}") from None
        if gather.pending():
            return False
        self._close(gather)
        if push_id is not None:
            ps.push_ids[(name, push_id)] = True    # a resend of this push is told it was applied
        return True

    def status(self):
        with self._cond:
            ps = self.ps
            if ps is None:
                return jsonify(version=None, done=False, started=False)
            extra = {} if self.registry is None else {"serverless": True, "registered": len(self.registry)}
            return jsonify(mode=ps.config.mode, version=ps.version, steps=ps.config.steps, done=ps.done,
                           accepted=ps.accepted, rejected=ps.rejected, pending=sorted(ps.pending),
                           gone=dict(sorted(self._gone.items())), started=True, **extra)

    # ------------------------------------------------------------------ serverless API
    def _worker_id(self) -> str:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise BadRequest('expected JSON {"worker_id": ...}')
        try:
            return check_worker_id(body.get("worker_id"))
        except ValueError as e:
            raise BadRequest(f"{self.rt.name}: {request.path}: {e}") from None

    def _serverless(self) -> tuple[ParameterServer, Registry]:
        """(lock held) The model and registry; 409 before /start or for a long-lived server."""
        ps = self._running()
        if self.registry is None:
            raise Conflict(f"{self.rt.name}: {request.path} is for a serverless parameter server (structure "
                           f"conf 'serverless': true); this one has fixed workers (/ps/pull, /ps/push)")
        return ps, self.registry

    def register(self):
        worker_id, node = self._worker_id(), self.rt.client()
        with self._cond:
            ps, reg = self._serverless()
            if ps.done:
                raise Gone(f"training finished at version {ps.version}")
            try:
                new = reg.register(worker_id, node)
            except NotAllowed as e:
                raise Forbidden(str(e)) from None
            except TooMany as e:
                raise TooManyRequests(str(e)) from None
            except Rejected as e:
                raise Conflict(str(e)) from None
            version, count = ps.version, len(reg)
        if new:
            self.rt.log.info("worker %s registered by %s at version %d (%d registered)",
                             worker_id, node, version, count)
        return jsonify(worker_id=worker_id, version=version, registered=count)

    def unregister(self):
        worker_id, node = self._worker_id(), self.rt.client()
        with self._cond:
            _, reg = self._serverless()
            try:
                gone = reg.unregister(worker_id, node)
            except NotAllowed as e:
                raise Forbidden(str(e)) from None
            count = len(reg)
        if gone:
            self.rt.log.info("worker %s unregistered by %s (%d registered)", worker_id,
                             node or "the controller", count)
        return jsonify(unregistered=gone)

    def get_version(self):
        with self._cond:
            ps = self._running()
            acc = self._accuracy
            return jsonify(version=ps.version, accuracy=None if acc is None else acc[0],
                           accuracy_version=None if acc is None else acc[1], steps=ps.config.steps,
                           done=ps.done, registered=None if self.registry is None else len(self.registry))

    def get_parameter(self):
        """GET /getParameter: the current parameters (meta {version}); harmless after done."""
        body = self._current_body()
        self.rt.count_bytes(sent=len(body))     # parameters are this mode's main traffic: /stats counts them
        return Response(body, mimetype=WEIGHTS_MIME)

    def put_gradient(self):
        tensors, worker_id, version, samples, loss, push_id = self._gradient("worker_id")
        node = self.rt.client()
        with self._cond:
            ps, reg = self._serverless()
            if not ps.done:      # after the last step every push is 410, whoever sends it
                try:
                    reg.check(worker_id, node)
                except NotAllowed as e:
                    self.rt.log.warning("refused gradient: %s", e)
                    raise Forbidden(str(e)) from None
            return self._take(worker_id, version, tensors, samples, loss, push_id)

    def model(self):
        """GET /ps/model: the current parameters (meta {version}); an inspection, not counted."""
        return Response(self._current_body(), mimetype=WEIGHTS_MIME)

    def _current_body(self) -> bytes:
        """The current parameters as safetensors (meta {version}), packed once per version."""
        with self._cond:
            ps = self._running()
            version, params = ps.version, ps.params    # updates replace params, never change them
            packed = self._packed
        if packed is not None and packed[0] == version:
            return packed[1]
        body = weights.pack_weights(params, {"version": version})
        with self._cond:
            if self._packed is None or self._packed[0] < version:
                self._packed = (version, body)
        return body

    def _running(self) -> ParameterServer:
        if self.ps is None:
            raise Conflict(f"{self.rt.name}: not started (GET /start first)")
        return self.ps

    def _long_lived(self) -> ParameterServer:
        """(lock held) The model of a server with fixed workers; 409 in serverless mode."""
        ps = self._running()
        if self.registry is not None:
            raise Conflict(f"{self.rt.name}: serverless mode: workers use /registerWorker, /getParameter "
                           f"and /putGradient, not {request.path}")
        return ps

    def _applied(self, what: str) -> None:
        """After an update (lock held): log the step, queue an evaluation, wake pulls."""
        ps = self.ps
        loss = weighted_mean(list(self._losses.values())) if self._losses else float("nan")
        self._losses = {}
        self.rt.log.info("Step: version=%d, %s loss=%.4f,", ps.version, what, loss)
        self.rt.set_state("serving", ps.version)
        if ps.version % ps.config.eval_every == 0 or ps.done:
            self._evals.append((ps.version, ps.params))
        self._cond.notify_all()

    # ------------------------------------------------------------------ sync steps
    def _open(self) -> Gather:
        """(lock held) Serve the current version: a Gather of every worker's gradient,
        the gone ones dropped at once (not waited for; taken if they come)."""
        ps, conf = self.ps, self.rt.structure
        gather = self.rt.gather(ps.workers, tag=f"version {ps.version}",
                                addresses={w: conf["connect"][w] for w in ps.workers})
        for w, why in self._gone.items():
            gather.drop(w, why)
        self._gather, self._attempt, self._skipped = gather, 1, set(self._gone)
        self._opened = time.monotonic()
        ps.serve(self._opened)
        self._cond.notify_all()
        return gather

    def _close(self, gather: Gather) -> None:
        """(lock held) Close the version's Gather, apply the average of what came and
        serve the next version; workers missing without having pulled the version (or
        found dead) are gone."""
        ps = self.ps
        waited = time.monotonic() - self._opened
        arrived, missing = gather.close()
        self._gather = None
        version = ps.version
        names = ps.apply_pending()
        for w, why in missing.items():       # of those waited for (not skipped at the open)
            if w not in self._skipped and (why == DEAD or self._pulled.get(w) != version):
                self._gone[w] = why
                self.rt.log.warning("%s is not waited for until it pulls again (version %d: %s%s)", w,
                                    version, why, "" if why == DEAD else ", it did not pull the version")
        if missing or self._attempt > 1:
            self.rt.log_metric("participants", ps.version, participants=sorted(names),
                               missing=dict(sorted(missing.items())), attempt=self._attempt,
                               waited_s=round(waited, 3))
            self.rt.log.warning("version %d: applied the average of %s after %.1f s; missing %s",
                                version, names, waited, ", ".join(f"{w} ({y})" for w, y in sorted(missing.items())))
        self._applied(f"gradients={len(names)},")
        if not ps.done:
            self._open()       # at once: a worker woken by this step may push before the driver runs

    def _sync_steps(self) -> bool:
        """Serve version after version until the last step; False when the run failed
        (no gradient at all in 1 + step_retries deadlines) or stops.

        Not the round loop of rounds.py: a version is closed by the push that completes
        it (in the route, under the server's lock, so the next version is served before
        that worker hears back) and a deadline without any gradient serves the same
        version again rather than asking anyone anew; the workers pull, the server asks
        nobody. The waiting is the runtime's Gather all the same."""
        rt, ps = self.rt, self.ps

        def left() -> float:
            return ps.time_left(time.monotonic())
        while not rt.stopping.is_set():
            with self._cond:
                if ps.done:
                    return True
                gather = self._gather or self._open()
            gather.wait(max(0.0, left()))   # every live worker pushed, the rest found dead, or the deadline
            with self._cond:
                if self._gather is not gather or rt.stopping.is_set():
                    continue                    # a push completed it
                if gather.arrived and (left() <= 0 or not gather.pending()):
                    self._close(gather)
                    continue
                if left() > 0:
                    # nobody left to wait for and nothing came: a restarted worker may
                    # still push before the deadline (its push completes the version)
                    self._cond.wait_for(lambda: self._gather is not gather or rt.stopping.is_set()
                                        or left() <= 0, timeout=max(0.0, left()))
                    continue
                # the deadline passed with no gradient at all: wait again, or fail
                missing = {w: gather.missing.get(w, TIMEOUT) for w in ps.workers}
                if self._attempt > ps.config.step_retries:
                    gather.close()
                    self._gather = None
                    rt.log_metric("participants", ps.version, participants=[], missing=missing,
                                  attempt=self._attempt, waited_s=round(time.monotonic() - self._opened, 3))
                    rt.fail(f"version {ps.version}: no gradient from any worker in {self._attempt} "
                            f"deadline(s) of step_timeout_s {ps.config.step_timeout_s:g} s: "
                            + ", ".join(f"{w} ({why})" for w, why in sorted(missing.items())))
                    return False
                rt.log.warning("version %d: no gradient within step_timeout_s %g s (%s); waiting again "
                               "(%d/%d)", ps.version, ps.config.step_timeout_s,
                               ", ".join(f"{w} ({why})" for w, why in sorted(missing.items())),
                               self._attempt, ps.config.step_retries)
                self._attempt += 1
                ps.serve(time.monotonic())
        return False

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        rt, conf = self.rt, self.rt.structure
        config = self._config()
        torch.manual_seed(config.seed)
        model = nns.build_model(rt.data.meta)
        serverless = conf.get("serverless") is True
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        acc, _ = evaluate(model, rt.data.test_x, rt.data.test_y)
        with self._cond:
            if serverless:    # workers register themselves (before this: 409 not started)
                self.registry = Registry(conf["actions"])
                self.ps = ParameterServer(params, self.registry, config, dynamic=True,
                                          grad_keys=[k for k, _ in model.named_parameters()])
            else:
                self.ps = ParameterServer(params, list(conf["workers"]), config,
                                          grad_keys=[k for k, _ in model.named_parameters()])
            self._accuracy = (acc, 0)
            if config.mode == "sync":
                self._open()    # before any worker begins: version 0 is served from here
        rt.set_state("serving", 0)
        who = (f"serverless, actions on {', '.join(conf['actions'])}" if serverless
               else f"{len(conf['workers'])} workers")
        rt.log.info("%s parameter server: %d steps, %s, lr %g%s, momentum %g%s; initial "
                    "accuracy %.4f", config.mode, config.steps, who, config.lr,
                    "" if config.lr_end is None else f" falling to {config.lr_end:g}",
                    config.momentum, f", max_staleness {config.max_staleness}" if config.mode == "async"
                    else f", step_timeout_s {config.step_timeout_s:g}, step_retries {config.step_retries}", acc)
        workers = [] if serverless else conf["workers"]
        begun = rt.fan_out(workers, lambda w: calls.call("GET", f"http://{rt.peer(w)}/start",
                                                       token=rt.peer_token, timeout_s=30, retries=5),
                           deadline_s=START_DEADLINE_S)
        for w, rep in begun.items():
            if not rep.ok:
                rt.log.warning("worker %s did not begin (%s): %s", w, rep.why, rep.message)
                if rep.why == DEAD:
                    self._lost(w, DEAD, "its /start was refused")
        evaluator = rt.spawn(self._evaluate, model, name="evaluate")
        if config.mode == "sync":
            ok = self._sync_steps()
        else:
            with self._cond:
                while not (self.ps.done or rt.stopping.is_set()):
                    self._cond.wait(1.0)     # stopping does not notify: look again each second
            ok = self.ps.done
        with self._cond:
            self._cond.notify_all()     # the evaluator ends once its queue is empty
        evaluator.join()
        if ok and not rt.stopping.is_set():
            rt.log.info("training done: version %d, %d gradients accepted, %d refused",
                        self.ps.version, self.ps.accepted, self.ps.rejected)
            rt.finish()

    def _evaluate(self, model: torch.nn.Module) -> None:
        """Evaluate the queued versions until the last step's (or the run ends)."""
        rt = self.rt
        while not rt.stopping.is_set() and rt.error is None:
            with self._cond:
                self._cond.wait_for(lambda: self._evals or self.ps.done or rt.stopping.is_set()
                                    or rt.error is not None, timeout=1.0)
                evals, self._evals = self._evals, []
                done = self.ps.done and not evals
            for version, params in evals:
                model.load_state_dict(params)
                acc, _ = evaluate(model, rt.data.test_x, rt.data.test_y)
                rt.log_aggregate(acc, version)
                with self._cond:
                    if self._accuracy is None or version >= self._accuracy[1]:
                        self._accuracy = (acc, version)
            if done:
                return


if __name__ == "__main__":
    main("ps_server", PsServer)
