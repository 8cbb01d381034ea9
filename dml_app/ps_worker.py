"""Parameter-server worker: pulls parameters when their version changed, computes the
gradient of one batch of its train parts and pushes it (dml_app/ps_server.py).

The server starts the loop with the runtime's GET /start (once both confs are in):
  1. POST the server's /ps/pull {"name", "have": last version, "wait_s"}; the server
     POSTs the new parameters to this node's /ps/params (safetensors, meta {version})
     before it answers {"sent": true}; {"sent": false} means no new version yet (sync
     mode: not every worker has pushed this step), so ask again;
  2. compute the gradient of the next batch (a seeded permutation of the train parts per
     epoch, `batch_size` from the dataset conf) and log `Train: loss=..., round=V,`
     (V = the version it was computed on);
  3. POST it to the server's /ps/push (safetensors, meta {name, version, samples,
     loss, push_id}). A 409 (a stale gradient in async mode; in sync mode a version
     closed at its deadline) is logged and the loop goes on with newer parameters; a
     410 from either route means training is over.

Faults: a pull the server could not answer with parameters (502: sending them failed,
e.g. a link down) or that got no answer is asked again, and a push with no answer (after
its resends) is given up: the loop pulls again. Only a server silent (or not started)
for SERVER_GONE_S ends the worker with an error. A worker started again (the
controller restarts a node and GETs its /start) begins with a pull of the current
version: the server takes it back.

Structure conf (ps_structure_conf.py): {"role": "worker", "server": name, "connect"}.
"""
from __future__ import annotations

import os
import threading
import time
import zlib

from werkzeug.exceptions import BadRequest

from dml_app import bounded_input, calls, nns
from dml_app.algorithms import shapes
from dml_app.ps import batch_gradient, batches
from dml_app.runtime import Runtime, main

PULL_WAIT_S = 5.0
PUSH_RESENDS = 2         # a push whose answer was lost is sent again (same push_id)
SERVER_GONE_S = 60.0     # give up when the server does not answer (or has not started) for this long


def check_structure(conf: dict) -> dict:
    """Validate a worker's structure conf (ValueError names the key)."""
    if conf.get("role") != "worker":
        raise ValueError(f"'role' must be 'worker' for ps_worker.py, got {conf.get('role')!r}")
    server, connect = conf.get("server"), conf.get("connect")
    if not isinstance(server, str) or not isinstance(connect, dict) or server not in connect:
        raise ValueError(f"'server' must name a node whose address is in 'connect', got {server!r}")
    return conf


class PsWorker:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self._lock = threading.Lock()
        self._params: tuple[int, dict] | None = None     # (version, tensors) the server sent
        self._fit: dict[str, tuple] | None = None        # the model's keys and shapes, once the loop runs
        rt.on_structure(check_structure)
        rt.on_dataset(self._check_data)
        rt.on_start(self.loop)
        rt.declare_model(nns.build_model)
        rt.route("/ps/params", methods=["POST"], weights=True)(self.params)

    @staticmethod
    def _check_data(data) -> None:
        if data.train_samples == 0:
            raise ValueError("a worker computes gradients: give it train parts (train_len > 0)")

    def params(self):
        """POST /ps/params: the server's parameters of some version (kept if newer)."""
        tensors, meta = self.rt.receive_weights(self._fit, what="the parameters")
        try:
            version = bounded_input.number(meta.get("version"), "parameters metadata 'version'", 0, 10_000_000,
                                 integer=True)
        except ValueError as e:
            raise BadRequest(f"{self.rt.name}: {e}") from None
        with self._lock:
            if self._params is None or version > self._params[0]:
                self._params = (version, tensors)
        return "ok\n"

    def _push(self, server: str, grad: dict, meta: dict) -> None:
        """POST a gradient; resent (same push_id, so the server applies it once) when its
        answer was lost (a read timeout, a dropped connection), at most PUSH_RESENDS times."""
        for attempt in range(PUSH_RESENDS + 1):
            try:
                self.rt.send_weights(server, "/ps/push", grad, meta)
                return
            except calls.HttpError as e:
                if e.status is not None or attempt == PUSH_RESENDS:
                    raise
                self.rt.log.warning("push %s: no answer (%s); sending it again", meta["push_id"], e.message)

    def loop(self) -> None:
        rt, data = self.rt, self.rt.data
        server = rt.peer(rt.structure["server"])
        model = nns.build_model(data.meta)
        self._fit = shapes(model.state_dict())
        stream = batches(data.train_samples, data.batch_size, seed=zlib.crc32(rt.name.encode()))
        have, silent_since = -1, None
        run_id, pushes = os.urandom(6).hex(), 0     # push ids: this process's, numbered
        while not rt.stopping.is_set():
            try:
                ans = calls.post_json(f"http://{server}/ps/pull", {"name": rt.name, "have": have,
                                                                "wait_s": PULL_WAIT_S},
                                    token=rt.peer_token, timeout_s=PULL_WAIT_S + 120)
                silent_since = None
            except calls.HttpError as e:
                if e.status == 410:
                    break
                # no answer, 409 (not started yet) or 502 (it could not send us the parameters)
                silent_since = silent_since or time.monotonic()
                if e.status not in (None, 409, 502) or time.monotonic() - silent_since > SERVER_GONE_S:
                    raise
                rt.stopping.wait(1.0)
                continue
            if not ans.get("sent"):
                continue
            with self._lock:
                have, tensors = self._params
            model.load_state_dict(tensors)
            idx = next(stream)
            rt.set_state("training", have)
            loss, grad = batch_gradient(model, data.train_x[idx], data.train_y[idx])
            rt.log_train(loss, have)
            rt.set_state("uploading", have)
            pushes += 1
            try:
                self._push(server, grad, {"name": rt.name, "version": have, "samples": len(idx),
                                          "loss": loss, "push_id": f"{run_id}-{pushes}"})
            except calls.HttpError as e:
                if e.status == 410:
                    break
                if e.status not in (None, 409):
                    raise
                rt.log.warning("gradient of version %d %s: %s", have,
                               "refused" if e.status else "lost (no answer)", e.message)
        rt.log.info("training over: last version %d", have)
        rt.set_state("finished", have)


if __name__ == "__main__":
    main("ps_worker", PsWorker)
