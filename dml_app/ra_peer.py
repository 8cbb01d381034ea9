"""Ring all-reduce node: local training, then an all-reduce of the whole model around
the ring, every step of it driven by the controller (RaManager, controller/ra_run.py).

Routes (JSON bodies unless said; a call out of order gets 409 and changes nothing):
  GET  /start        build the initial model (state `ready`, round 0)
  POST /ra/train     {"round": r, "ring": [...]}: `ring` lists the nodes in the order the
                     chunks travel (each sends to the next, the last to the first; the
                     driver follows the confs' next_name to make it), and this node's
                     next one in it must be its next_name. Answered at once; trains
                     `epoch` epochs on the train parts (`Train: loss=..., round=r,`;
                     epoch 0 skips training), then flattens the model for the all-reduce
                     (state `trained`)
  POST /ra/step      {"round": r, "phase": "reduce"|"gather", "step": s}: sends this
                     step's chunk to next_name (safetensors, through the shaped link)
                     and answers once that node has applied it
  POST /ra/chunk     the predecessor's chunk (safetensors; meta {round, phase, step,
                     index, name}): added (reduce) or taken (gather), see ring.AllReduce
  POST /ra/evaluate  {"round": r}: the mean becomes the model; evaluates on the test parts,
                     logs `Aggregate: accuracy=..., round=r,` (state `ready` again)
  GET  /ra/weights   the current model as safetensors (for checks; not counted as sent)

Structure conf: EdgeTB's (ra_structure_conf.py writes it): {"epoch", "sync",
"next_name", "connect"}: chunks go to next_name, whose address `connect` must have.
Optional keys of ours: "seed" (default 0), "lr" (0.05), "init": "common" (default:
every node starts from the model seeded with `seed`) or "per_rank" (with "rank" k, the
node's index in node_list: the model seeded with `seed + k`, i.e. different,
reproducible weights, as the exactness test uses).
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
        self.ring: list[str] = []     # this round's ring, in the order the chunks travel
        self.pos = 0                  # this node's place in it
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
        nxt = conf.get("next_name")
        if not isinstance(nxt, str) or not nxt or nxt == self.rt.name:
            raise ValueError(f"'next_name' must name the node this one sends its chunks to, got {nxt!r}")
        if nxt not in conf["connect"]:
            raise ValueError(f"'connect' has no address for next_name {nxt!r} (no link from "
                             f"{self.rt.name} to {nxt})")
        conf["init"] = conf.get("init", "common")
        if conf["init"] not in INITS:
            raise ValueError(f"'init' must be one of {INITS}, got {conf['init']!r}")
        if "rank" in conf or conf["init"] == "per_rank":
            if "rank" not in conf:
                raise ValueError("init 'per_rank' needs 'rank' (the node's index in node_list)")
            conf["rank"] = peer_role.number(conf, "rank", int, 0, MAX_RING)
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
        rt.log.info("ring all-reduce: next_name %s, init %s (seed %d)", conf["next_name"], conf["init"], seed)

    def _round_arg(self, body: dict) -> int:
        return _int(body.get("round"), "'round'", 1)

    def _ring_arg(self, body: dict) -> tuple[list[str], int]:
        """The ring of a /ra/train body and this node's place in it; 400 unless this node
        is in it once and its next node there is its next_name."""
        ring, me = body.get("ring"), self.rt.name
        if (not isinstance(ring, list) or not 2 <= len(ring) <= MAX_RING
                or not all(isinstance(n, str) for n in ring) or len(set(ring)) != len(ring)):
            raise BadRequest("'ring' must list 2 or more distinct node names in the order the chunks travel")
        if me not in ring:
            raise BadRequest(f"{me}: 'ring' does not hold this node")
        pos = ring.index(me)
        nxt = (self.rt.structure or {}).get("next_name")
        if ring[(pos + 1) % len(ring)] != nxt:
            raise BadRequest(f"{me}: the ring sends from {me} to {ring[(pos + 1) % len(ring)]}, but its "
                             f"next_name is {nxt!r}")
        return list(ring), pos

    def _expect(self, r: int, what: str) -> None:
        """409 unless this node is in round r's all-reduce (call with the lock held)."""
        if self.model is None:
            raise Conflict(f"{self.rt.name}: {what} before /start")
        if self.ar is None or self.rt.state not in BUSY or self.rt.round != r:
            raise Conflict(f"{self.rt.name}: cannot {what} for round {r}: node is "
                           f"{self.rt.state} in round {self.rt.round}")

    # ------------------------------------------------------------------ routes

    def train(self):
        """POST /ra/train {"round": r, "ring": [...]}: train in the background, then ready the all-reduce."""
        body = _json()
        r = self._round_arg(body)
        with self._lock:
            if self.model is None or self.rt.state != "ready" or self.rt.round != r - 1:
                raise Conflict(f"{self.rt.name}: cannot train round {r}: node is {self.rt.state} "
                               f"in round {self.rt.round} (training needs ready in round {r - 1})")
            ring, pos = self._ring_arg(body)
            self.ring, self.pos = ring, pos
            self.rt.set_state("training", r)
        self.rt.spawn(self._train, r, name=f"train-{r}")
        return jsonify(node=self.rt.name, round=r, state="training")

    def _train(self, r: int) -> None:
        rt, conf = self.rt, self.rt.structure
        if conf["epoch"] > 0:
            peer_role.train_round(rt, self.model, r)
        vector, layout = flatten(self.model.state_dict())
        with self._lock:
            self.ar = AllReduce(vector, self.pos, len(self.ring))
            self.layout = layout
            rt.set_state("trained", r)

    def step(self):
        """POST /ra/step: send this step's chunk to next_name (answered after delivery)."""
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
            rt.send_weights(rt.peer(conf["next_name"]), "/ra/chunk", {"chunk": chunk}, meta)
        except net.HttpError as e:
            rt.log.warning("round %d: %s step %d: chunk %d to %s failed: %s", r, phase, step, index,
                           conf["next_name"], e)
            return Response(f"{rt.name}: sending chunk {index} to {conf['next_name']} failed: {e}\n",
                            status=502, mimetype="text/plain")
        return jsonify(node=rt.name, round=r, phase=phase, step=step, index=index,
                       elements=int(chunk.numel()))

    def chunk(self):
        """POST /ra/chunk: the predecessor's chunk for this step."""
        rt = self.rt
        if rt.structure is None:
            raise Conflict(f"{rt.name}: /conf/structure must come before /ra/chunk")
        tensors, meta = rt.receive_weights()
        if "chunk" not in tensors:
            raise BadRequest("a chunk carries tensor 'chunk' and metadata round, phase, step, index (ints)")
        phase = meta.get("phase")
        r = _int(meta.get("round"), "chunk metadata 'round'", 1)
        step = _int(meta.get("step"), "chunk metadata 'step'", 0, MAX_RING)
        index = _int(meta.get("index"), "chunk metadata 'index'", 0, MAX_RING)
        with self._lock:
            self._expect(r, f"take a {phase} chunk")
            predecessor = self.ring[self.pos - 1]
            if meta.get("name") != predecessor:
                raise Conflict(f"{rt.name}: chunks come from the node before it in the ring, "
                               f"{predecessor}, not {str(meta.get('name'))[:64]!r}")
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
