"""Ring all-reduce node: local training, then an all-reduce of the whole model around
the ring, every step of it driven by the controller (RingAllReduce, controller/ra_run.py).

Routes (JSON bodies unless said; a call out of order gets 409 and changes nothing):
  GET  /start        build the initial model (state `ready`, round 0)
  POST /ra/train     {"round": r, "ring": [...], "home"?: [...], "successor"?: {...}}:
                     `home` (default: `ring`) lists every member in the order the chunks
                     travel (each sends to the next, the last to the first; the driver
                     follows the confs' next_name to make it), and this node's next one
                     in it must be its next_name. `ring` is this round's ring: `home`
                     without the members that died, in the same order. Where this node's
                     next one in `ring` (its successor) is not its next_name, `successor`
                     {"name", "address": "ip:port"} says where to send (checked: the
                     ring's next node, and `connect`'s address if it has one). Answered
                     at once; trains `epoch` epochs on the train parts (`Train: loss=...,
                     round=r,`; epoch 0 skips training), then keeps the flattened model
                     (the trained vector) and readies the all-reduce (state `trained`)
  POST /ra/reform    {"round": r, "attempt": a, "ring": [...], "successor"?: {...}}: a
                     member died during round r's all-reduce: start it again (attempt a,
                     above the current one) from the trained vector, on `ring`, the
                     current ring without some members in the same order (`successor`
                     as for /ra/train). Allowed once trained, at any step (state `trained`)
  POST /ra/step      {"round": r, "phase": "reduce"|"gather", "step": s, "attempt"?: a
                     (default 0), "timeout_s"?: t (default 300, at most 3600)}: sends
                     this step's chunk to the successor (safetensors, through the shaped
                     link) and answers once that node has applied it; a send that fails
                     within t seconds gives 502 {"successor", "why" (runtime's
                     dead/refused/timeout/error), "error"}
  POST /ra/chunk     the predecessor's chunk (safetensors; meta {round, phase, step,
                     index, name, attempt}): added (reduce) or taken (gather), see
                     ring.AllReduce; a chunk of another attempt is refused (409)
  POST /ra/evaluate  {"round": r}: the mean becomes the model; evaluates on the test parts,
                     logs `Aggregate: accuracy=..., round=r,` (state `ready` again)
  GET  /ra/weights   the current model as safetensors (for checks; not counted as sent)

Structure conf: EdgeTB's (ra_structure_conf.py writes it): {"epoch", "sync",
"next_name", "connect", "ring_size", "pos"}: chunks go to next_name, whose address
`connect` must have; `ring_size` (optional) is the number of nodes in node_list, which
the ring a /ra/train gives as `home` must have; `pos` (optional) is the node's 0-based
index in node_list. "rank" is ours for the same index: a conf may give either or both,
both are then the same number (a conf where they differ is refused), and the node keeps
both. Optional keys of ours: "seed" (default 0), "lr" (0.05), "init": "common"
(default: every node starts from the model seeded with `seed`) or "per_rank" (with rank
k: the model seeded with `seed + k`, i.e. different, reproducible weights, as the
exactness test uses). "step_timeout_s" is the driver's (controller/ra_run.py: the
deadline of one all-reduce step).

The steps are not run by the round loop (rounds.py): the controller drives them
(controller/ra_run.py, RingAllReduce.drive, the one owner of the ring's rounds, steps, step
deadlines and re-forming); this node answers each call of a step and keeps the ring
maths (ring.py).
"""
from __future__ import annotations

import threading

import torch
from flask import Response, jsonify, request
from werkzeug.exceptions import BadRequest, Conflict

from dml_app import bounded_input, formats, nns, peer_role, weights
from dml_app.ring import PHASES, AllReduce, Entry, flatten, is_subring, unflatten
from dml_app.runtime import PEER_RE, WEIGHTS_MIME, Runtime, main, reply_for

INITS = ("common", "per_rank")
MAX_RING = 100_000           # steps and chunk indices are below the ring's size
MAX_ATTEMPTS = MAX_RING      # a round's all-reduce starts again at most once per lost member
SEND_TIMEOUT_S = 300.0       # a step's chunk delivery, unless the driver says otherwise
MAX_SEND_TIMEOUT_S = 3600.0  # as the structure's step_timeout_s (ra_structure_conf.py)
BUSY = ("trained", "reducing", "gathering")    # the states of a round's all-reduce
STATE_OF = {"reduce": "reducing", "gather": "gathering"}


def _json() -> dict:
    body = request.get_json(silent=True)     # bounded by the runtime (bounded_input.limit_bodies)
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object body (Content-Type: application/json)")
    return body


def _int(value, what: str, low: int, high: int = peer_role.MAX_ROUNDS) -> int:
    """An integer from a request (JSON body or chunk metadata); 400 naming it otherwise."""
    try:
        return bounded_input.number(value, what, low, high, integer=True)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def check_position(conf: dict) -> dict:
    """Normalise the node's place in node_list: EdgeTB's `pos` and our `rank` are the
    same 0-based index (either given sets both; ValueError when they differ), below
    EdgeTB's `ring_size` (2 or more) when that is given."""
    for key in ("pos", "rank"):
        if key in conf:
            conf[key] = peer_role.number(conf, key, int, 0, MAX_RING - 1)
    if "pos" in conf and "rank" in conf and conf["pos"] != conf["rank"]:
        raise ValueError(f"'pos' {conf['pos']} and 'rank' {conf['rank']} differ: both are the node's index in "
                         "node_list (EdgeTB's name and ours); give one, or the same number")
    if "pos" in conf or "rank" in conf:
        conf["pos"] = conf["rank"] = conf.get("pos", conf.get("rank"))
    if "ring_size" in conf:
        conf["ring_size"] = peer_role.number(conf, "ring_size", int, 2, MAX_RING)
        if "pos" in conf and conf["pos"] >= conf["ring_size"]:
            raise ValueError(f"'pos' {conf['pos']} is not an index of a ring of ring_size {conf['ring_size']} "
                             f"(0 to {conf['ring_size'] - 1})")
    return conf


class RaPeer:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.model: torch.nn.Module | None = None
        self.layout: list[Entry] = []
        self.ar: AllReduce | None = None
        self.trained: torch.Tensor | None = None   # this round's trained vector, kept for a re-formed ring
        self.attempt = 0              # this round's all-reduce attempt (a re-formed ring is the next)
        self.ring: list[str] = []     # this round's ring, in the order the chunks travel
        self.pos = 0                  # this node's place in it
        self.successor = ("", "")     # (name, 'ip:port') this node sends its chunks to
        self._lock = threading.Lock()
        rt.on_structure(self.check_structure)
        rt.on_dataset(lambda data: peer_role.check_data(data, needs_train=False))
        rt.on_start(self.start)
        rt.declare_model(nns.build_model)     # a chunk is a slice of the flattened model
        rt.route("/ra/train", methods=["POST"])(self.train)
        rt.route("/ra/reform", methods=["POST"])(self.reform)
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
        check_position(conf)
        if conf["init"] == "per_rank" and "rank" not in conf:
            raise ValueError("init 'per_rank' needs 'rank' (or EdgeTB's 'pos': the node's index in node_list)")
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

    @staticmethod
    def _names(value, what: str) -> list[str]:
        if (not isinstance(value, list) or not 2 <= len(value) <= MAX_RING
                or not all(formats.is_name(n) for n in value) or len(set(value)) != len(value)):
            raise BadRequest(f"'{what}' must list 2 or more distinct node names in the order the chunks travel "
                             f"(a name: {formats.NAME_RULE})")
        return list(value)

    def _ring_arg(self, body: dict, within: list[str] | None = None) -> tuple[list[str], int, tuple[str, str]]:
        """The ring of a /ra/train or /ra/reform body, this node's place in it and its
        successor (name, address); 400 unless this node is in it once, it is `within`
        (/ra/reform: the current ring) or the body's `home` (whose next node after this
        one must be its next_name) without some members in the same order, and a successor
        other than next_name comes with its address."""
        me, conf = self.rt.name, self.rt.structure or {}
        ring = self._names(body.get("ring"), "ring")
        nxt = conf.get("next_name")
        if within is None:
            home = self._names(body.get("home", ring), "home")
            if me not in home:
                raise BadRequest(f"{me}: 'home' does not hold this node")
            size = conf.get("ring_size")
            if size is not None and len(home) != size:
                raise BadRequest(f"{me}: the ring {' -> '.join(home)[:300]} has {len(home)} members, but this "
                                 f"node's structure conf says ring_size {size}")
            after = home[(home.index(me) + 1) % len(home)]
            if after != nxt:
                raise BadRequest(f"{me}: the ring sends from {me} to {after}, but its next_name is {nxt!r}")
            within = home
        if me not in ring:
            raise BadRequest(f"{me}: 'ring' does not hold this node")
        if not is_subring(ring, within):
            raise BadRequest(f"{me}: 'ring' {' -> '.join(ring)[:300]} is not the ring "
                             f"{' -> '.join(within)[:300]} without some members in the same order")
        pos = ring.index(me)
        succ = ring[(pos + 1) % len(ring)]
        given = body.get("successor")
        if given is not None and (not isinstance(given, dict) or given.get("name") != succ):
            raise BadRequest(f"{me}: 'successor' must be {{\"name\": {succ!r}, \"address\": \"ip:port\"}}, "
                             "the node after this one in 'ring'")
        known = (conf.get("connect") or {}).get(succ)     # next_name's is always there
        offered = given.get("address") if given else None
        if known:
            if offered is not None and offered != known:
                raise BadRequest(f"{me}: 'successor' gives {succ} at {str(offered)[:64]}, but 'connect' has {known}")
            address = known
        elif isinstance(offered, str) and PEER_RE.match(offered):
            address = offered
        else:
            raise BadRequest(f"{me}: its successor {succ} is not its next_name {nxt!r} and 'connect' has no "
                             f"address for it: 'successor' must give it as 'ip:port', got {str(offered)[:64]!r}")
        return ring, pos, (succ, address)

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
            self.ring, self.pos, self.successor = self._ring_arg(body)
            self.attempt, self.trained = 0, None
            self.rt.set_state("training", r)
        self.rt.spawn(self._train, r, name=f"train-{r}")
        return jsonify(node=self.rt.name, round=r, state="training")

    def _train(self, r: int) -> None:
        rt, conf = self.rt, self.rt.structure
        if conf["epoch"] > 0:
            peer_role.train_round(rt, self.model, r)
        vector, layout = flatten(self.model.state_dict())
        with self._lock:
            self.trained, self.layout = vector, layout   # AllReduce works on its own copy
            self.ar = AllReduce(vector, self.pos, len(self.ring))
            rt.set_state("trained", r)

    def reform(self):
        """POST /ra/reform {"round": r, "attempt": a, "ring": [...]}: round r's all-reduce
        again, from the trained vector, on the ring without the members that died."""
        rt = self.rt
        body = _json()
        r = self._round_arg(body)
        attempt = _int(body.get("attempt"), "'attempt'", 1, MAX_ATTEMPTS)
        with self._lock:
            self._expect(r, "re-form the ring")
            if attempt <= self.attempt:
                raise Conflict(f"{rt.name}: round {r}'s all-reduce is at attempt {self.attempt}; "
                               f"attempt {attempt} is not a later one")
            ring, pos, successor = self._ring_arg(body, within=self.ring)
            self.ar = AllReduce(self.trained, pos, len(ring))
            self.ring, self.pos, self.successor, self.attempt = ring, pos, successor, attempt
            rt.set_state("trained", r)
        rt.log.info("round %d: all-reduce attempt %d on the ring %s (sending to %s)", r, attempt,
                    " -> ".join(ring), successor[0])
        return jsonify(node=rt.name, round=r, attempt=attempt, successor=successor[0], state="trained")

    def step(self):
        """POST /ra/step: send this step's chunk to next_name (answered after delivery)."""
        rt = self.rt
        body = _json()
        r, phase = self._round_arg(body), body.get("phase")
        if phase not in PHASES:
            raise BadRequest(f"expected {{'round', 'phase' ({'|'.join(PHASES)}), 'step' (int)}}, "
                             f"got phase {str(phase)[:40]!r}")
        step = _int(body.get("step"), "'step'", 0, MAX_RING)
        attempt = _int(body.get("attempt", 0), "'attempt'", 0, MAX_ATTEMPTS)
        try:
            timeout_s = bounded_input.number(body.get("timeout_s", SEND_TIMEOUT_S), "'timeout_s'", 0.1, MAX_SEND_TIMEOUT_S)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        with self._lock:
            self._expect(r, f"send {phase} step {step}")
            if attempt != self.attempt:
                raise Conflict(f"{rt.name}: round {r}'s all-reduce is at attempt {self.attempt}, not {attempt}")
            try:
                index, chunk = self.ar.outgoing(phase, step)
            except ValueError as e:
                raise Conflict(f"{rt.name}: {e}") from None
            rt.set_state(STATE_OF[phase], r)
            succ, address = self.successor
        meta = {"round": r, "phase": phase, "step": step, "index": index, "name": rt.name, "attempt": attempt}
        try:
            rt.send_weights(address, "/ra/chunk", {"chunk": chunk}, meta, timeout_s=timeout_s)
        except Exception as e:   # noqa: BLE001  (the driver decides what a lost successor means)
            why = reply_for(succ, e)
            rt.log.warning("round %d: %s step %d: chunk %d to %s failed (%s): %s", r, phase, step, index,
                           succ, why.why, why.message)
            # short: the driver reads this from the first 500 characters of the answer
            return jsonify(successor=succ, why=why.why,
                           error=f"sending chunk {index} to {succ} failed: {why.message[:160]}"), 502
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
        attempt = _int(meta.get("attempt", 0), "chunk metadata 'attempt'", 0, MAX_ATTEMPTS)
        with self._lock:
            self._expect(r, f"take a {phase} chunk")
            if attempt != self.attempt:    # a late chunk of a ring that has re-formed since
                raise Conflict(f"{rt.name}: round {r}'s all-reduce is at attempt {self.attempt}; "
                               f"a chunk of attempt {attempt} is too late")
            predecessor = self.ring[self.pos - 1]
            if meta.get("name") != predecessor:
                raise Conflict(f"{rt.name}: chunks come from the node before it in the ring, "
                               f"{predecessor}, not {str(meta.get('name'))[:64]!r}")
            # ... and from its address (403 otherwise) where this node knows it: its
            # `connect` has the nodes it has a link to, which need not hold its predecessor.
            if predecessor in ((rt.structure or {}).get("connect") or {}):
                peer_role.check_sender(rt, predecessor)
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
            self.ar, self.trained = None, None
            rt.set_state("evaluating", r)
        acc = peer_role.evaluate_round(rt, self.model, r)
        rt.set_state("ready", r)
        return jsonify(node=rt.name, round=r, accuracy=acc)

    def weights(self):
        """GET /ra/weights: the model as it is now."""
        if self.model is None:
            raise Conflict(f"{self.rt.name}: no model before /start")
        with self._lock:
            body = weights.pack_weights(self.model.state_dict(), {"name": self.rt.name, "round": self.rt.round})
        return Response(body, mimetype=WEIGHTS_MIME)


if __name__ == "__main__":
    main("ra_peer", RaPeer)
