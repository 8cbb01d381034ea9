"""Ring all-reduce node: local training, then an all-reduce of the whole model around
the ring, every step of it driven by the controller (RaManager, controller/ra_run.py).

Routes (JSON bodies unless said; a call out of order gets 409 and changes nothing):
  GET  /start        build the initial model (state `ready`, round 0)
  POST /ra/train     {"round": r}: answered at once; trains `epoch` epochs on the train
                     parts (`Train: loss=..., round=r,`; epoch 0 skips training), then
                     flattens the model for the all-reduce (state `trained`)
  POST /ra/step      {"round": r, "phase": "reduce"|"gather", "step": s}: sends this
                     step's chunk to the ring successor (safetensors, through the shaped
                     link) and answers once the successor has applied it
  POST /ra/chunk     the predecessor's chunk (safetensors; meta {round, phase, step,
                     index, name}): added (reduce) or taken (gather), see ring.AllReduce
  POST /ra/evaluate  {"round": r}: the mean becomes the model; evaluates on the test parts,
                     logs `Aggregate: accuracy=..., round=r,` (state `ready` again)
  GET  /ra/weights   the current model as safetensors (for checks; not counted as sent)

Structure conf (ra_structure_conf.py): {"epoch", "sync", "ring", "rank", "successor",
"connect"}; optional "seed" (default 0), "lr" (0.05) and "init": "common" (default:
every node starts from the model seeded with `seed`) or "per_rank" (node of rank k
from `seed + k`: different, reproducible weights, as the exactness test uses).
"""
from __future__ import annotations

import threading

import torch
from flask import Response, jsonify, request
from werkzeug.exceptions import BadRequest, Conflict

import net
import nns
import peer_role
from ring import PHASES, AllReduce, Entry, flatten, unflatten
from runtime import WEIGHTS_MIME, Runtime, main

INITS = ("common", "per_rank")
MAX_RING = 100_000           # steps and chunk indices are below the ring's size
BUSY = ("trained", "reducing", "gathering")    # the states of a round's all-reduce
STATE_OF = {"reduce": "reducing", "gather": "gathering"}


def _json() -> dict:
    body = request.get_json(silent=True)     # bounded by the runtime (net.limit_bodies)
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object body (Content-Type: application/json)")
    return body


def _int(value, what: str, low: int, high: int = peer_role.MAX_ROUNDS) -> int:
    """An integer from a request (JSON body or chunk metadata); 400 naming it otherwise."""
    try:
        return net.number(value, what, low, high, integer=True)
    except ValueError as e:
        raise BadRequest(str(e)) from None


class RaPeer:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.model: torch.nn.Module | None = None
        self.layout: list[Entry] = []
        self.ar: AllReduce | None = None
        self._lock = threading.Lock()
        rt.on_structure(self.check_structure)
        rt.on_dataset(lambda data: peer_role.check_data(data, needs_train=False))
        rt.on_start(self.start)
        rt.declare_model(nns.build_model)     # a chunk is a slice of the flattened model
        rt.route("/ra/train", methods=["POST"])(self.train)
        rt.route("/ra/step", methods=["POST"])(self.step)
        rt.route("/ra/chunk", methods=["POST"], weights=True)(self.chunk)
        rt.route("/ra/evaluate", methods=["POST"])(self.evaluate)
        rt.route("/ra/weights", methods=["GET"])(self.weights)

    def check_structure(self, conf: dict) -> dict:
        """Validate and normalise the structure conf (ValueError names the key)."""
        conf = peer_role.check_common(conf, "ring all-reduce node", min_epoch=0)
        ring = conf.get("ring")
        if (not isinstance(ring, list) or len(ring) < 2 or len(set(ring)) != len(ring)
                or not all(isinstance(n, str) for n in ring)):
            raise ValueError(f"'ring' must list at least 2 distinct node names, got {ring!r}")
        if self.rt.name not in ring:
            raise ValueError(f"'ring' {ring} does not hold this node ({self.rt.name})")
        rank = ring.index(self.rt.name)
        if conf.get("rank") != rank:
            raise ValueError(f"'rank' is {conf.get('rank')!r}, but {self.rt.name} is at {rank} in 'ring'")
        successor = ring[(rank + 1) % len(ring)]
        if conf.get("successor") != successor:
            raise ValueError(f"'successor' is {conf.get('successor')!r}, the ring says {successor!r}")
        if successor not in conf["connect"]:
            raise ValueError(f"'connect' has no address for the successor {successor!r} (no link)")
        conf["init"] = conf.get("init", "common")
        if conf["init"] not in INITS:
            raise ValueError(f"'init' must be one of {INITS}, got {conf['init']!r}")
        return conf

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        rt, conf = self.rt, self.rt.structure
        if conf["epoch"] > 0 and rt.data.train_samples == 0:
            raise ValueError(f"epoch {conf['epoch']} but no train parts (train_len 0)")
        seed = conf["seed"] + (conf["rank"] if conf["init"] == "per_rank" else 0)
        model = peer_role.initial_model(rt.data.meta, seed)
        with self._lock:
            self.model = model
            rt.set_state("ready", 0)
        rt.log.info("ring all-reduce: rank %d of %s, successor %s, init %s (seed %d)", conf["rank"],
                    conf["ring"], conf["successor"], conf["init"], seed)

    def _round_arg(self, body: dict) -> int:
        return _int(body.get("round"), "'round'", 1)

    def _expect(self, r: int, what: str) -> None:
        """409 unless this node is in round r's all-reduce (call with the lock held)."""
        if self.model is None:
            raise Conflict(f"{self.rt.name}: {what} before /start")
        if self.ar is None or self.rt.state not in BUSY or self.rt.round != r:
            raise Conflict(f"{self.rt.name}: cannot {what} for round {r}: node is "
                           f"{self.rt.state} in round {self.rt.round}")

    # ------------------------------------------------------------------ routes

    def train(self):
        """POST /ra/train {"round": r}: train in the background, then ready the all-reduce."""
        r = self._round_arg(_json())
        with self._lock:
            if self.model is None or self.rt.state != "ready" or self.rt.round != r - 1:
                raise Conflict(f"{self.rt.name}: cannot train round {r}: node is {self.rt.state} "
                               f"in round {self.rt.round} (training needs ready in round {r - 1})")
            self.rt.set_state("training", r)
        self.rt.spawn(self._train, r, name=f"train-{r}")
        return jsonify(node=self.rt.name, round=r, state="training")

    def _train(self, r: int) -> None:
        rt, conf = self.rt, self.rt.structure
        if conf["epoch"] > 0:
            peer_role.train_round(rt, self.model, r)
        vector, layout = flatten(self.model.state_dict())
        with self._lock:
            self.ar = AllReduce(vector, conf["rank"], len(conf["ring"]))
            self.layout = layout
            rt.set_state("trained", r)

    def step(self):
        """POST /ra/step: send this step's chunk to the successor (answered after delivery)."""
        rt, conf = self.rt, self.rt.structure
        body = _json()
        r, phase = self._round_arg(body), body.get("phase")
        if phase not in PHASES:
            raise BadRequest(f"expected {{'round', 'phase' ({'|'.join(PHASES)}), 'step' (int)}}, "
                             f"got phase {str(phase)[:40]!r}")
        step = _int(body.get("step"), "'step'", 0, MAX_RING)
        with self._lock:
            self._expect(r, f"send {phase} step {step}")
            try:
                index, chunk = self.ar.outgoing(phase, step)
            except ValueError as e:
                raise Conflict(f"{rt.name}: {e}") from None
            rt.set_state(STATE_OF[phase], r)
        meta = {"round": r, "phase": phase, "step": step, "index": index, "name": rt.name}
        try:
            rt.send_weights(rt.peer(conf["successor"]), "/ra/chunk", {"chunk": chunk}, meta)
        except net.HttpError as e:
            rt.log.warning("round %d: %s step %d: chunk %d to %s failed: %s", r, phase, step, index,
                           conf["successor"], e)
            return Response(f"{rt.name}: sending chunk {index} to {conf['successor']} failed: {e}\n",
                            status=502, mimetype="text/plain")
        return jsonify(node=rt.name, round=r, phase=phase, step=step, index=index,
                       elements=int(chunk.numel()))

    def chunk(self):
        """POST /ra/chunk: the predecessor's chunk for this step."""
        rt, conf = self.rt, self.rt.structure
        if conf is None:
            raise Conflict(f"{rt.name}: /conf/structure must come before /ra/chunk")
        tensors, meta = rt.receive_weights()
        predecessor = conf["ring"][conf["rank"] - 1]
        if "chunk" not in tensors:
            raise BadRequest("a chunk carries tensor 'chunk' and metadata round, phase, step, index (ints)")
        phase = meta.get("phase")
        r = _int(meta.get("round"), "chunk metadata 'round'", 1)
        step = _int(meta.get("step"), "chunk metadata 'step'", 0, MAX_RING)
        index = _int(meta.get("index"), "chunk metadata 'index'", 0, MAX_RING)
        if meta.get("name") != predecessor:
            raise Conflict(f"{rt.name}: chunks come from the predecessor {predecessor}, "
                           f"not {meta.get('name')!r}")
        with self._lock:
            self._expect(r, f"take a {phase} chunk")
            try:
                self.ar.incoming(phase, step, index, tensors["chunk"])
            except ValueError as e:
                raise Conflict(f"{rt.name}: {e}") from None
        return "ok\n"

    def evaluate(self):
        """POST /ra/evaluate {"round": r}: take the mean as the model and evaluate it."""
        rt = self.rt
        r = self._round_arg(_json())
        with self._lock:
            self._expect(r, "evaluate")
            try:
                mean = self.ar.result()
            except ValueError as e:
                raise Conflict(f"{rt.name}: {e}") from None
            self.model.load_state_dict(unflatten(mean, self.layout))
            self.ar = None
            rt.set_state("evaluating", r)
        acc = peer_role.evaluate_round(rt, self.model, r)
        rt.set_state("ready", r)
        return jsonify(node=rt.name, round=r, accuracy=acc)

    def weights(self):
        """GET /ra/weights: the model as it is now."""
        if self.model is None:
            raise Conflict(f"{self.rt.name}: no model before /start")
        with self._lock:
            body = net.pack_weights(self.model.state_dict(), {"name": self.rt.name, "round": self.rt.round})
        return Response(body, mimetype=WEIGHTS_MIME)


if __name__ == "__main__":
    main("ra_peer", RaPeer)
