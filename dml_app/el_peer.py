"""E-tree (hierarchical) learning peer: one process per node, acting in every layer the
node is in (its structure conf lists them) and forwarding for others.

Layer 1 trains: it takes a model, trains `epoch` local epochs (`Train: loss=..., round=k,`,
k counting this node's trainings) and sends it up with its number of train samples.
Layer l > 1 aggregates: for `sync` rounds it sends its model down to its children,
gathers their results until every child answered or was given up on, or
`round_timeout_s`, and averages them weighted by samples (etree.aggregate); then it
sends the model up with the sum of its children's samples.
The top starts on GET /start from its seeded initial model, evaluates after each of its
rounds (`Aggregate: accuracy=..., round=r, layer=L,`) and calls the controller's
/finish at the end. Other layers log `Layer aggregate: layer=l, round=k, ...`. A child
or father that is the node itself (`"self"`) is called in-process.

Failures, at every aggregating layer (the top's included), as FL's aggregator: a child
that does not take the model (dead, refused, unreachable through a dead relay) is left
out of the round at once; a pending child is probed every second (GET /el/hi relayed
along the same hops) and dropped as `dead` when it, or a node on the way to it, no
longer listens; one that sends nothing within `round_timeout_s` is `timeout`. A dead
aggregator below takes its whole subtree with it: it is the child reported missing.
The round is aggregated when at least `min_fraction` of the children answered,
otherwise it is tried again (at most `round_retries` times) and then the node fails
(state error with the reason; --auto ends the run on it; a father that asks it again
gets 409 with that reason). Every child is asked again
each round, so a restarted one rejoins. Each attempt writes a metrics event
{"event": "participants", "round", "layer", "attempt", "children", "participants",
"missing" {child: why}, "accepted"}. The rounds, attempts and quorum are the round
loop's (rounds.py), the waiting and probing the runtime's (`rt.fan_out`, `Gather`);
this role keeps the E-tree maths and its choices.

Every message is POST /el/message: safetensors weights with meta {kind: "down"|"up",
src, dst, layer (the child's layer), round (the father's round), samples (up), hops,
timeout_s (how long the sender waits for the answer)}.
A node sends straight to a node of its `connect`, else to the address `forward` gives
for it (EdgeTB's next hop); a node that is not `dst` passes the message on the same way
(waiting at most 0.8 x the message's timeout_s, so its answer comes back before the
sender gives up) and logs `Forward: from=src, to=dst, round=r, layer=l, kind=..., next=hop,`.
The destination's answer comes back along the way, so a refusal (400/409) reaches the
sender; a relay whose next hop refuses the connection (a dead node) answers 502, one
whose next hop does not answer in time 504; nothing is sent again once it may have
arrived. A message that has passed MAX_HOPS nodes is refused (a loop in hand-written
`forward` tables). GET /el/model answers the model of the node's highest layer that has
aggregated (meta {layer, round}), 404 before that.

Structure conf: EdgeTB's (el_structure_conf.py writes it): {"layer": [...],
"father_node": [...], "child_node": [[...], ...], "sync": [...], "epoch", "connect",
"forward"}, one list entry per layer from the lowest to the highest, "self" for the node
itself, "top" as the top's father, sync 0 on layer 1; `epoch` when the node is in layer
1. Keys of ours, all optional: "lr", per aggregating layer {"<layer>": value}:
"round_timeout_s" (default 600), "min_fraction" (in (0, 1], default 0.5) and
"round_retries" (0..100, default 2); "seed" (top: the initial model) and
"test_known_weights_seed" (test only: trainers answer etree.known_weights instead of
training).
"""
from __future__ import annotations

import threading
import zlib
from typing import Any

import torch
from flask import Response, jsonify, request
from werkzeug.exceptions import BadRequest, Conflict, HTTPException, NotFound

from dml_app import bounded_input, calls, etree, nns, weights
from dml_app.algorithms import DEFAULT_MIN_FRACTION, DEFAULT_ROUND_RETRIES, MAX_ROUND_RETRIES, shapes
from dml_app.learn import evaluate, train_epochs
from dml_app.rounds import Rounds
from dml_app.runtime import DEAD, PROBE_PERIOD_S, REFUSED, TIMEOUT, WEIGHTS_MIME, Reply, Runtime, main

SELF = "self"
TOP = "top"
MAX_HOPS = 64                  # nodes a message may pass: more means a forwarding loop
DEFAULT_LR = 0.05
DEFAULT_ROUND_TIMEOUT_S = 600.0
UP_TIMEOUT_S = 300.0           # a result going up: one model's transfer, bounded
MAX_TIMEOUT_S = 1e6
RELAY_SHARE = 0.8              # a relay waits this share of its sender's wait: its answer comes first
RELAY_DEAD = 502               # a relay's answer when its next hop refused the connection (dead)
RELAY_TIMEOUT = 504            # ... when its next hop did not answer in time
PROBE_TIMEOUT_S = 2 * PROBE_PERIOD_S   # one liveness probe of a pending child, relays included
MAX_PROBE_TIMEOUT_S = 30.0     # what a probe may ask a relay to wait: a request thread, not a round


MAX_LAYERS = 64
MAX_ROUNDS = 1_000_000
MAX_SAMPLES = 10**12          # a subtree's sample count: far beyond any dataset, far below overflow
MAX_SEED = 2**32 - 1


def _int(v: Any, what: str, low: int, high: int = MAX_ROUNDS) -> int:
    return bounded_input.number(v, what, low, high, integer=True)


def _positive(v: Any, what: str, high: float) -> float:
    return bounded_input.number(v, what, 0, high, lo_open=True)


def _address(v: Any, where: str) -> str:
    if not isinstance(v, str) or ":" not in v:
        raise ValueError(f"{where}: expected 'ip:port', got {v!r}")
    return v


def check_structure(conf: dict, me: str) -> dict:
    """Validate EdgeTB's E-tree conf; add "_layers", {layer: {"father" (None for the top),
    "children", "sync" | "epoch", "lr", "round_timeout_s"}} (ValueError names the key)."""
    keys = ("layer", "father_node", "child_node", "sync")
    for key in keys:
        if not isinstance(conf.get(key), list):
            raise ValueError(f"missing or bad key {key!r}: an E-tree conf has the lists "
                             "layer, father_node, child_node, sync (one entry per layer) and connect")
    if len({len(conf[k]) for k in keys}) != 1:
        raise ValueError("layer, father_node, child_node and sync must have one entry per layer each, "
                         f"got lengths {[len(conf[k]) for k in keys]}")
    for key in ("connect", "forward"):
        table = conf.setdefault(key, {}) if key == "forward" else conf.get(key)
        if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
            raise ValueError(f"{key!r} must map node names to 'ip:port'")
        for name, addr in table.items():
            _address(addr, f"{key}[{name!r}]")
    layers: dict[int, dict] = {}
    quorum: dict[int, dict] = {}
    numbers = [_int(layer, f"layer[{i}]", 1, MAX_LAYERS) for i, layer in enumerate(conf["layer"])]
    if numbers != sorted(set(numbers)):
        raise ValueError(f"'layer' must go from the node's lowest layer to its highest, got {numbers}")
    for i, (layer, father, kids, sync) in enumerate(zip(numbers, *(conf[k] for k in keys[1:]))):
        top = i == len(numbers) - 1
        if not isinstance(father, str) or not father or (father == TOP and not top):
            raise ValueError(f"father_node[{i}] (layer {layer}) must be a node name, 'self' or, for the "
                             f"node's highest layer only, 'top'; got {father!r}")
        if not isinstance(kids, list) or not all(isinstance(k, str) and k not in ("", TOP) for k in kids) \
                or len(set(kids)) != len(kids):
            raise ValueError(f"child_node[{i}] (layer {layer}) must be a list of distinct node names, got {kids!r}")
        lc: dict[str, Any] = {"father": None if father == TOP else father, "children": kids}
        if layer == 1:
            if kids or sync != 0:
                raise ValueError(f"layer 1 trains: its child_node entry is [] and its sync 0, got {kids!r} "
                                 f"and {sync!r}")
            lc["epoch"] = _int(conf.get("epoch"), "'epoch' (the node is in layer 1)", 1, 10_000)
            lc["lr"] = _positive(conf.get("lr", DEFAULT_LR), "'lr'", 10.0)
        else:
            if not kids:
                raise ValueError(f"child_node[{i}] (layer {layer}) is empty: an aggregating layer needs children")
            lc["sync"] = _int(sync, f"sync[{i}] (layer {layer})", 1)
            lc["round_timeout_s"] = _positive(_per_layer(conf, "round_timeout_s", layer, DEFAULT_ROUND_TIMEOUT_S),
                                              f"round_timeout_s[{str(layer)!r}]", MAX_TIMEOUT_S)
            quorum[layer] = {
                "min_fraction": bounded_input.number(_per_layer(conf, "min_fraction", layer, DEFAULT_MIN_FRACTION),
                                           f"min_fraction[{str(layer)!r}]", 0, 1, lo_open=True),
                "round_retries": bounded_input.number(_per_layer(conf, "round_retries", layer, DEFAULT_ROUND_RETRIES),
                                            f"round_retries[{str(layer)!r}]", 0, MAX_ROUND_RETRIES,
                                            integer=True)}
        layers[layer] = lc
    peers = {p for lc in layers.values() for p in [lc["father"], *lc["children"]]}
    for peer in sorted(peers - {None, SELF, me}):
        if peer not in conf["connect"] and peer not in conf["forward"]:
            raise ValueError(f"no way to {peer!r}: it is in neither 'connect' nor 'forward'")
    for key in ("seed", "test_known_weights_seed"):
        if key in conf:
            conf[key] = _int(conf[key], key, 0, MAX_SEED)
    conf["_layers"] = layers
    conf["_quorum"] = quorum      # {layer: {"min_fraction", "round_retries"}} of the aggregating layers
    return conf


def _per_layer(conf: dict, key: str, layer: int, default: Any) -> Any:
    """conf[key][str(layer)], or `default`: our per-layer keys map layer numbers to values."""
    table = conf.get(key, {})
    if not isinstance(table, dict):
        raise ValueError(f"{key!r} must map layer numbers (\"2\") to values, got {str(table)[:64]}")
    return table.get(str(layer), default)


def why_not(rep: Reply) -> str:
    """Why a child gave nothing, seen through relays: a relay's 502 means a node on the
    way (or the child) no longer listens, its 504 that it did not answer in time."""
    if rep.why == REFUSED and rep.status == RELAY_DEAD:
        return DEAD
    if rep.why == REFUSED and rep.status == RELAY_TIMEOUT:
        return TIMEOUT
    return rep.why or TIMEOUT


def _arg(name: str, default: float, lo: float, hi: float, *, integer: bool = False) -> int | float:
    """A number from the query string (BadRequest naming it otherwise)."""
    raw = request.args.get(name)
    try:
        return bounded_input.number(default if raw is None else float(raw), f"query {name!r}", lo, hi, integer=integer)
    except ValueError as e:
        raise BadRequest(str(e)) from None


class ElPeer:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self._lock = threading.Lock()
        self.rounds = Rounds(rt)    # its open (layer, round)s, each with the shapes its results must have
        self._rounds: dict[int, int] = {}                # layer -> rounds run so far
        self._train_lock = threading.Lock()
        self._trainings = 0
        self._latest: tuple[int, int, dict] | None = None  # (layer, round, model)
        rt.on_structure(self._check_structure)
        rt.on_dataset(self._check_data)
        rt.declare_model(nns.build_model)
        rt.route("/el/message", methods=["POST"], weights=True)(self.message)
        rt.route("/el/model", methods=["GET"])(self.model)
        rt.route("/el/hi", methods=["GET"])(self.hi)

    # ------------------------------------------------------------------ confs
    @property
    def layers(self) -> dict[int, dict]:
        return (self.rt.structure or {}).get("_layers", {})

    def _is_top(self, layers: dict[int, dict]) -> bool:
        return bool(layers) and layers[max(layers)]["father"] is None

    def _check_structure(self, conf: dict) -> dict:
        conf = check_structure(conf, self.rt.name)
        if self.rt.data is not None:
            self._check_fit(conf["_layers"], self.rt.data)
        if self._is_top(conf["_layers"]):
            self.rt.on_start(self.run_top)
        return conf

    def _check_data(self, data) -> None:
        self._check_fit(self.layers, data)

    def _check_fit(self, layers: dict[int, dict], data) -> None:
        if 1 in layers and data.train_samples == 0:
            raise ValueError("this node trains (layer 1): give it train parts (train_len > 0)")
        if self._is_top(layers) and data.test_samples == 0:
            raise ValueError("the top node evaluates the model: give it test parts (test_len > 0)")

    def _who(self, name: str) -> str:
        return self.rt.name if name == SELF else name

    def _next_hop(self, dst: str) -> tuple[str, str]:
        """(address, name or address for the log) of the next hop to `dst`: straight over a
        link of `connect`, else `forward`'s next hop; KeyError when there is neither."""
        conf = self.rt.structure
        if dst in conf["connect"]:
            return conf["connect"][dst], dst
        if dst in conf["forward"]:
            addr = conf["forward"][dst]
            names = [n for n, a in conf["connect"].items() if a == addr]
            return addr, names[0] if len(names) == 1 else addr
        raise KeyError(f"no way to {dst}: it is in neither 'connect' nor 'forward'")

    # ------------------------------------------------------------------ HTTP
    def message(self):
        """POST /el/message: a model going down, a result going up, or one to forward."""
        rt = self.rt
        if rt.structure is None:
            raise Conflict(f"{rt.name}: /conf/structure must come before E-tree messages")
        tensors, meta = rt.receive_weights()
        kind, src, dst = meta.get("kind"), meta.get("src"), meta.get("dst")
        layer, rnd = meta.get("layer"), meta.get("round")
        try:
            if kind not in ("down", "up") or not isinstance(src, str) or not isinstance(dst, str):
                raise ValueError("meta needs kind ('down' or 'up'), src, dst, layer, round")
            layer = meta["layer"] = _int(layer, "meta 'layer'", 1, MAX_LAYERS)
            rnd = meta["round"] = _int(rnd, "meta 'round'", 1)
            hops = meta["hops"] = _int(meta.get("hops", 0), "meta 'hops'", 0, MAX_HOPS)
            meta["timeout_s"] = bounded_input.number(meta.get("timeout_s", UP_TIMEOUT_S), "meta 'timeout_s'", 0.1,
                                           MAX_TIMEOUT_S)
            if dst != rt.name:
                if hops >= MAX_HOPS:
                    # a loop in the forward tables: each hop would wait on the next forever
                    raise ValueError(f"a message from {src} to {dst} has passed {hops} nodes: "
                                     "is there a loop in the 'forward' tables?")
                return self._forward(tensors, meta)
            if kind == "down":
                return self._take_down(src, layer, rnd, tensors)
            samples = _int(meta.get("samples"), "meta 'samples'", 1, MAX_SAMPLES)
        except ValueError as e:
            raise BadRequest(f"{rt.name}: {e}") from None
        self._deliver(layer + 1, rnd, src, tensors, samples)
        return "ok\n"

    def model(self):
        """GET /el/model: the latest model of this node's highest aggregating layer."""
        if self._latest is None:
            raise NotFound(f"{self.rt.name}: no aggregation yet")
        layer, rnd, sd = self._latest
        # An inspection, not experiment traffic: not counted in the node's bytes sent.
        return Response(weights.pack_weights(sd, {"layer": layer, "round": rnd, "name": self.rt.name}),
                        mimetype=WEIGHTS_MIME)

    def _forward(self, tensors: dict, meta: dict):
        rt = self.rt
        try:
            addr, hop = self._next_hop(meta["dst"])
        except KeyError as e:
            raise BadRequest(f"{rt.name}: cannot forward to {meta['dst']}: {e.args[0]}") from None
        rt.log.info("Forward: from=%s, to=%s, round=%d, layer=%d, kind=%s, next=%s,", meta["src"],
                    meta["dst"], meta["round"], meta["layer"], meta["kind"], hop)
        rt.log_metric("forward", meta["round"], src=meta["src"], dst=meta["dst"],
                      layer=meta["layer"], kind=meta["kind"], next=hop)
        onward = max(0.1, meta["timeout_s"] * RELAY_SHARE)
        try:   # send_weights repeats only a send that cannot have arrived (connection refused)
            rt.send_weights(addr, "/el/message", tensors, {**meta, "hops": meta["hops"] + 1, "timeout_s": onward},
                            timeout_s=onward)
        except calls.HttpError as e:
            return self._relay_failed(hop, e)
        return "forwarded\n"

    def _relay_failed(self, hop: str, e: calls.HttpError) -> Response:
        """A relay's answer when the next hop gave no 2xx: its refusal passed on as it is;
        502 when its connection was refused (dead), 504 when no answer came in time."""
        if e.status is not None:
            status, what = e.status, e.message
        elif e.not_sent:
            status, what = RELAY_DEAD, f"{hop} does not listen (dead?): {e.message}"
        else:
            status, what = RELAY_TIMEOUT, f"no answer from {hop} in time: {e.message}"
        return Response(f"{self.rt.name}: forwarding to {hop} failed: {what}\n", status=status,
                        mimetype="text/plain")

    def hi(self):
        """GET /el/hi?dst=&hops=&timeout_s=: whether `dst` lives, asked along the message
        hops (an aggregator's probe of a pending child): 200 from dst itself, else the
        next hop's answer passed back (502: a node on the way or dst does not listen)."""
        rt = self.rt
        dst = request.args.get("dst", rt.name)
        if dst == rt.name:
            return jsonify(node=rt.name, state=rt.state, round=rt.round)
        hops = _arg("hops", 0, 0, MAX_HOPS - 1, integer=True)
        timeout_s = _arg("timeout_s", PROBE_TIMEOUT_S, 0.1, MAX_PROBE_TIMEOUT_S)
        if rt.structure is None:
            raise Conflict(f"{rt.name}: /conf/structure must come before E-tree messages")
        try:
            addr, hop = self._next_hop(dst)
        except KeyError as e:
            raise BadRequest(f"{rt.name}: cannot reach {dst[:64]}: {e.args[0]}") from None
        try:
            r = self._ask_hi(addr, dst, hops + 1, max(0.1, timeout_s * RELAY_SHARE))
        except calls.HttpError as e:
            return self._relay_failed(hop, e)
        return Response(r.content, mimetype="application/json")

    def _ask_hi(self, addr: str, dst: str, hops: int, timeout_s: float):
        return calls.call("GET", f"http://{addr}/el/hi", token=self.rt.peer_token, timeout_s=timeout_s, retries=1,
                        params={"dst": dst, "hops": hops, "timeout_s": timeout_s}, max_bytes=4096)

    def _probe(self, pending: set[str]) -> dict[str, str]:
        """Gather's probe: {child: dead} of the pending children that, or a node on the
        way to which, no longer listens (a frozen or slow one is waited for)."""
        kids = sorted(pending - {self.rt.name})
        got = self.rt.fan_out(kids, lambda k: self._ask_hi(self._next_hop(k)[0], k, 0, PROBE_TIMEOUT_S),
                              deadline_s=PROBE_TIMEOUT_S * 1.5)
        return {k: DEAD for k, rep in got.items() if why_not(rep) == DEAD}

    def _take_down(self, src: str, layer: int, rnd: int, tensors: dict):
        lc = self.layers.get(layer)
        if lc is None or lc["father"] is None or self._who(lc["father"]) != src:
            raise Conflict(f"{self.rt.name}: {src} is not this node's father in layer {layer}")
        if self.rt.error is not None:   # failed (too few children below): the father hears why
            raise Conflict(f"{self.rt.name} has failed: {self.rt.error}")
        if self.rt.data is not None:
            self.rt.check_weights(tensors, nns.build_model(self.rt.data.meta).state_dict(),
                                  what=f"the weights from {src}",
                                  model=f"this dataset's {nns.model_name_for(self.rt.data.meta.get('name', ''))} model")
        self.rt.spawn(self._on_down, layer, tensors, rnd, name=f"layer{layer}-r{rnd}")
        return "ok\n"

    def _deliver(self, layer: int, rnd: int, child: str, sd: dict, samples: int) -> None:
        def late() -> str:
            return f"{self.rt.name}: layer {layer} round {rnd} is not waiting for results"
        sent = self.rounds.context((layer, rnd))
        if sent is None:
            raise Conflict(late())
        self.rt.check_weights(sd, sent, what=f"the weights from {child}", model="the model sent")
        # 409 when closed (meanwhile), not asked, or sent already
        self.rounds.deliver((layer, rnd), child, lambda _sent: (sd, samples), late=late)

    # ------------------------------------------------------------------ the layers
    def run_top(self) -> None:
        rt, conf = self.rt, self.rt.structure
        top = max(self.layers)
        torch.manual_seed(conf.get("seed", 0))
        model = nns.build_model(rt.data.meta).state_dict()
        rt.log.info("top of %d layers: %d rounds", top, self.layers[top]["sync"])
        if self._aggregate_rounds(top, model) is not None:   # None: failed (rt.fail said why) or stopping
            rt.finish()

    def _on_down(self, layer: int, model: dict, father_round: int) -> None:
        if layer == 1:
            result, samples = self._train(model)
        else:
            done = self._aggregate_rounds(layer, model)
            if done is None:          # this node failed (too few children) or stops
                return
            result, samples = done
        father = self._who(self.layers[layer]["father"])
        try:
            if father == self.rt.name:
                self._deliver(layer + 1, father_round, father, result, samples)
            else:
                self._send(father, "up", layer, father_round, result, samples)
        except (calls.HttpError, HTTPException, KeyError) as e:  # the father's round closed (409), it is dead...
            self.rt.log.warning("layer %d: result for %s's round %d not taken: %s", layer, father,
                                father_round, getattr(e, "description", e))

    def _send(self, dst: str, kind: str, layer: int, rnd: int, sd: dict, samples: int | None = None, *,
              timeout_s: float = UP_TIMEOUT_S) -> None:
        """POST one message to `dst` (straight or through its next hop), answered within
        timeout_s; sent again only when it cannot have arrived (send_weights)."""
        addr, _ = self._next_hop(dst)
        meta = {"kind": kind, "src": self.rt.name, "dst": dst, "layer": layer, "round": rnd, "hops": 0,
                "timeout_s": timeout_s}
        if samples is not None:
            meta["samples"] = samples
        self.rt.send_weights(addr, "/el/message", sd, meta, timeout_s=timeout_s)

    def _train(self, model: dict) -> tuple[dict, int]:
        rt, conf, data = self.rt, self.rt.structure, self.rt.data
        lc = self.layers[1]
        with self._train_lock:
            self._trainings += 1
            k = self._trainings
            rt.set_state("training", k)
            if "test_known_weights_seed" in conf:
                seed = conf["test_known_weights_seed"]
                rt.log.info("Train: skipped (test_known_weights_seed=%d), known weights k=%d,", seed, k)
                return etree.known_weights(model, rt.name, seed, k), data.train_samples
            net_ = nns.build_model(data.meta)
            net_.load_state_dict(model, strict=True)
            loss = train_epochs(net_, data.train_x, data.train_y, epochs=lc["epoch"],
                                batch_size=data.batch_size, lr=lc["lr"],
                                seed=zlib.crc32(rt.name.encode()) * 1009 + k)
            rt.log_train(loss, k)
            return {k_: v.detach().clone() for k_, v in net_.state_dict().items()}, data.train_samples

    def _aggregate_rounds(self, layer: int, model: dict) -> tuple[dict, int] | None:
        """`sync` rounds of this layer from `model`: (its final model, its samples); None
        when the node failed (a round without enough children) or stops."""
        rt, lc = self.rt, self.layers[layer]
        samples = 0

        def one_round(_i: int) -> bool:
            nonlocal model, samples
            with self._lock:
                rnd = self._rounds[layer] = self._rounds.get(layer, 0) + 1
            results = self._round_with_retries(layer, rnd, model)
            if results is None:
                return False
            rt.set_state("aggregating", rnd)
            model, samples = etree.aggregate(results)
            if self._latest is None or self._latest[0] <= layer:
                self._latest = (layer, rnd, model)
            if lc["father"] is None:
                self._evaluate(model, layer, rnd)
            else:
                rt.log.info("Layer aggregate: layer=%d, round=%d, children=%d, samples=%d,",
                            layer, rnd, len(results), samples)
                rt.log_metric("layer_aggregate", rnd, layer=layer, children=len(results), samples=samples)
            return True
        if not self.rounds.run(range(lc["sync"]), one_round):
            return None
        return model, samples

    def _round_with_retries(self, layer: int, rnd: int, model: dict) -> list[tuple[dict, int]] | None:
        """Round rnd of `layer`, tried up to 1 + round_retries times until at least
        min_fraction of the children answered (the round loop's quorum): their results in conf order;
        None when the node failed (rt.fail says why) or stops."""
        lc, q = self.layers[layer], self.rt.structure["_quorum"][layer]
        kids = [self._who(c) for c in lc["children"]]
        got = self.rounds.quorum(rnd, lambda _k: (kids, *self._attempt(layer, rnd, kids, model)),
                                 min_fraction=q["min_fraction"], retries=q["round_retries"],
                                 what=f"layer {layer} round {rnd}", peers="children", asked_as="children",
                                 layer=layer)
        if got is None:
            return None
        results = got[1]
        return [results[k] for k in kids if k in results]

    def _attempt(self, layer: int, rnd: int, kids: list[str], model: dict) -> tuple[dict, dict]:
        """Send `model` to every child of (layer, rnd) and gather their results until all
        came or were given up on, or round_timeout_s: ({child: (model, samples)}, {child: why})."""
        rt, timeout_s = self.rt, self.layers[layer]["round_timeout_s"]

        def send(_key) -> dict[str, Reply]:
            rt.set_state("waiting", rnd)
            if rt.name in kids:
                rt.spawn(self._on_down, layer - 1, model, rnd, name=f"layer{layer - 1}-r{rnd}")
            return rt.fan_out([k for k in kids if k != rt.name],
                              lambda k: self._send(k, "down", layer - 1, rnd, model, timeout_s=timeout_s),
                              deadline_s=timeout_s)
        return self.rounds.collect(
            (layer, rnd), kids, send, deadline_s=timeout_s, tag=f"{rt.name}: layer {layer} round {rnd}",
            context=shapes(model), probe=self._probe, why=why_not,
            on_refused=lambda kid, why, message: rt.log.warning(
                "layer %d round %d: child %s did not take the model (%s): %s", layer, rnd, kid, why, message),
            on_late=lambda late: rt.log.warning("layer %d round %d: no result from %s within %g s", layer, rnd,
                                                late, timeout_s))

    def _evaluate(self, model: dict, layer: int, rnd: int) -> None:
        net_ = nns.build_model(self.rt.data.meta)
        net_.load_state_dict(model, strict=True)
        acc, _ = evaluate(net_, self.rt.data.test_x, self.rt.data.test_y)
        self.rt.log_aggregate(acc, rnd, layer=layer)


if __name__ == "__main__":
    main("el_peer", ElPeer)
