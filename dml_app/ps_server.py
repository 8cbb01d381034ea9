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
* GET /ps/status: {"mode", "version", "steps", "done", "accepted", "rejected", "pending"};
  GET /ps/model: the current parameters (safetensors, meta {version}), for inspection.

It evaluates on its test parts every `eval_every` versions and at the last one, logging
`Aggregate: accuracy=..., round=V,` where the round V is the VERSION (the number of SGD
steps applied so far), and calls the controller's /finish after `steps` versions. Each
update is logged as `Step: version=V, ...`.

Structure conf (ps_structure_conf.py): {"role": "server", "workers": [...], "connect",
"mode", "steps", "lr", "momentum", "max_staleness", "eval_every", "step_timeout_s",
"seed"} (ps.PsConfig holds the defaults).
"""
from __future__ import annotations

import dataclasses
import threading
import time

import torch
from flask import Response, jsonify, request
from werkzeug.exceptions import BadRequest, Conflict, Gone

import net
import nns
from algorithms import weighted_mean
from learn import evaluate
from ps import MAX_PUSH_ID_CHARS, Finished, ParameterServer, PsConfig, Rejected
from runtime import WEIGHTS_MIME, Runtime, main

MAX_WAIT_S = 10.0
MAX_VERSION = 10_000_000      # PsConfig's largest `steps`
MAX_SAMPLES = 10**12          # a batch's sample count: far beyond any dataset, far below overflow
MAX_WAITERS = 4          # long polls held at once: the node serves 8 requests at a time


def check_structure(conf: dict) -> dict:
    """Validate the server's structure conf (ValueError names the key)."""
    if conf.get("role") != "server":
        raise ValueError(f"'role' must be 'server' for ps_server.py, got {conf.get('role')!r}")
    fields = {f.name for f in dataclasses.fields(PsConfig)}
    PsConfig(**{k: v for k, v in conf.items() if k in fields})
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
        self._cond = threading.Condition()
        self._evals: list[tuple[int, dict]] = []            # (version, params) to evaluate
        self._losses: dict[str, tuple[float, int]] = {}      # sync: this step's losses
        self._waiters = threading.BoundedSemaphore(MAX_WAITERS)
        rt.on_structure(check_structure)
        rt.on_dataset(self._check_data)
        rt.on_start(self.run)
        rt.declare_model(nns.build_model)     # gradients are the model's size
        rt.route("/ps/pull", methods=["POST"])(self.pull)
        rt.route("/ps/push", methods=["POST"], weights=True)(self.push)
        rt.route("/ps/status", methods=["GET"])(self.status)
        rt.route("/ps/model", methods=["GET"])(self.model)

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
            have = net.number(body.get("have"), "'have' (the version held, -1 for none)", -1,
                              MAX_VERSION, integer=True)
            wait_s = net.number(body.get("wait_s", 0), "'wait_s'", 0, 3600)
        except ValueError as e:
            raise BadRequest(f"{self.rt.name}: /ps/pull: {e}") from None
        with self._cond:
            ps = self._running()
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
            self.rt.send_weights(self.rt.peer(name), "/ps/params", params, {"version": version})
        except net.HttpError as e:
            return jsonify(error=f"sending version {version} to {name} failed: {e}"), 502
        return jsonify(version=version, sent=True)

    def push(self):
        tensors, meta = self.rt.receive_weights()
        name = meta.get("name")
        if not isinstance(name, str):
            raise BadRequest("gradient metadata must carry 'name' (str), 'version' (int) and "
                             "'samples' (int >= 1)")
        try:
            version = net.number(meta.get("version"), "gradient metadata 'version'", 0, MAX_VERSION,
                                 integer=True)
            samples = net.number(meta.get("samples"), "gradient metadata 'samples'", 1, MAX_SAMPLES,
                                 integer=True)
            loss = net.number(meta["loss"], "gradient metadata 'loss'") if "loss" in meta else float("nan")
        except ValueError as e:
            raise BadRequest(f"{self.rt.name}: gradient from {name[:64]}: {e}") from None
        push_id = meta.get("push_id")
        if push_id is not None and (not isinstance(push_id, str) or not 0 < len(push_id) <= MAX_PUSH_ID_CHARS):
            raise BadRequest(f"{self.rt.name}: gradient from {name[:64]}: 'push_id' must be a string "
                             f"of 1 to {MAX_PUSH_ID_CHARS} characters")
        with self._cond:
            ps = self._running()
            before = ps.version
            prev = ps.seen(name, push_id)
            if prev is not None:
                self.rt.log.info("push %s from %s again: applied once already, not again", push_id, name)
                return jsonify(applied=prev, version=ps.version, duplicate=True)
            try:
                applied = ps.push(name, version, tensors, samples, push_id=push_id)
            except Finished as e:
                raise Gone(str(e)) from None
            except Rejected as e:
                self.rt.log.warning("refused: %s", e)
                raise Conflict(str(e)) from None
            except ValueError as e:
                raise BadRequest(f"{self.rt.name}: {e}") from None
            self._losses[name] = (loss, samples)
            if applied:
                self._applied(f"from={name}, staleness={before - version}," if ps.config.mode == "async"
                              else f"gradients={len(self._losses)},")
            return jsonify(applied=applied, version=ps.version)

    def status(self):
        with self._cond:
            ps = self.ps
            if ps is None:
                return jsonify(version=None, done=False, started=False)
            return jsonify(mode=ps.config.mode, version=ps.version, steps=ps.config.steps, done=ps.done,
                           accepted=ps.accepted, rejected=ps.rejected, pending=sorted(ps.pending),
                           started=True)

    def model(self):
        """GET /ps/model: the current parameters (meta {version}); an inspection, not counted."""
        with self._cond:
            ps = self._running()
            version, params = ps.version, ps.params
        return Response(net.pack_weights(params, {"version": version}), mimetype=WEIGHTS_MIME)

    def _running(self) -> ParameterServer:
        if self.ps is None:
            raise Conflict(f"{self.rt.name}: not started (GET /start first)")
        return self.ps

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

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        rt, conf = self.rt, self.rt.structure
        config = self._config()
        torch.manual_seed(config.seed)
        model = nns.build_model(rt.data.meta)
        with self._cond:
            self.ps = ParameterServer({k: v.detach().clone() for k, v in model.state_dict().items()},
                                      list(conf["workers"]), config,
                                      grad_keys=[k for k, _ in model.named_parameters()])
        rt.set_state("serving", 0)
        acc, _ = evaluate(model, rt.data.test_x, rt.data.test_y)
        rt.log.info("%s parameter server: %d steps, %d workers, lr %g, momentum %g%s; initial "
                    "accuracy %.4f", config.mode, config.steps, len(conf["workers"]), config.lr,
                    config.momentum, f", max_staleness {config.max_staleness}"
                    if config.mode == "async" else "", acc)
        for w in conf["workers"]:
            try:
                net.call("GET", f"http://{rt.peer(w)}/start", token=rt.peer_token, timeout_s=30, retries=5)
            except net.HttpError as e:
                rt.log.warning("worker %s did not begin: %s", w, e)
        while not rt.stopping.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._evals or self.ps.done, timeout=1.0)
                evals, self._evals = self._evals, []
                done = self.ps.done and not evals
                self._step_timeout()
            for version, params in evals:
                model.load_state_dict(params)
                acc, _ = evaluate(model, rt.data.test_x, rt.data.test_y)
                rt.log_aggregate(acc, version)
            if done:
                break
        if not rt.stopping.is_set():
            rt.log.info("training done: version %d, %d gradients accepted, %d refused",
                        self.ps.version, self.ps.accepted, self.ps.rejected)
            rt.finish()

    def _step_timeout(self) -> None:
        """Sync (lock held): a step open longer than step_timeout_s is applied with what came."""
        ps = self.ps
        if ps.pending_since is None or time.monotonic() - ps.pending_since < ps.config.step_timeout_s:
            return
        missing = sorted(set(ps.workers) - set(ps.pending))
        names = ps.apply_pending()
        self.rt.log.warning("version %d: no gradient from %s within %g s; applied the average of %s",
                            ps.version - 1, missing, ps.config.step_timeout_s, names)
        self._applied(f"gradients={len(names)},")


if __name__ == "__main__":
    main("ps_server", PsServer)
