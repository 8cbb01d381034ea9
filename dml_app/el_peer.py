"""E-tree (hierarchical) learning peer: one process per node, acting in every layer the
node is in (its structure conf lists them) and forwarding for others.

Layer 1 trains: it takes a model, trains `epoch` local epochs (`Train: loss=..., round=k,`,
k counting this node's trainings) and sends it up with its number of train samples.
Layer l > 1 aggregates: for `sync` rounds it sends its model down to its children,
waits for their results (or `round_timeout_s`) and averages them weighted by samples
(etree.aggregate); then it sends the model up with the sum of its children's samples.
The top starts on GET /start from its seeded initial model, evaluates after each of its
rounds (`Aggregate: accuracy=..., round=r, layer=L,`) and calls the controller's
/finish at the end. Other layers log `Layer aggregate: layer=l, round=k, ...`. A child
or father that is the node itself (`"self"`) is called in-process.

Every message is POST /el/message: safetensors weights with meta {kind: "down"|"up",
src, dst, layer (the child's layer), round (the father's round), samples (up), hops}.
A node sends straight to a node of its `connect`, else to the address `forward` gives
for it (EdgeTB's next hop); a node that is not `dst` passes the message on the same way
and logs `Forward: from=src, to=dst, round=r, layer=l, kind=..., next=hop,`. The
destination's answer comes back along the way, so a refusal (400/409) reaches the
sender; a message that has passed MAX_HOPS nodes is refused (a loop in hand-written
`forward` tables). GET /el/model answers the model of the node's highest layer that has
aggregated (meta {layer, round}), 404 before that.

Structure conf: EdgeTB's (el_structure_conf.py writes it): {"layer": [...],
"father_node": [...], "child_node": [[...], ...], "sync": [...], "epoch", "connect",
"forward"}, one list entry per layer from the lowest to the highest, "self" for the node
itself, "top" as the top's father, sync 0 on layer 1; `epoch` when the node is in layer
1. Keys of ours, all optional: "lr", "round_timeout_s" ({"<layer>": s}), "seed" (top:
the initial model) and "test_known_weights_seed" (test only: trainers answer
etree.known_weights instead of training).
"""
from __future__ import annotations

import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from flask import Response
from werkzeug.exceptions import BadRequest, Conflict, HTTPException, NotFound

import etree
import net
import nns
from learn import evaluate, train_epochs
from runtime import WEIGHTS_MIME, Runtime, main

SELF = "self"
TOP = "top"
MAX_HOPS = 64                  # nodes a message may pass: more means a forwarding loop
DEFAULT_LR = 0.05
DEFAULT_ROUND_TIMEOUT_S = 600.0


MAX_LAYERS = 64
MAX_ROUNDS = 1_000_000
MAX_SAMPLES = 10**12          # a subtree's sample count: far beyond any dataset, far below overflow
MAX_SEED = 2**32 - 1


def _int(v: Any, what: str, low: int, high: int = MAX_ROUNDS) -> int:
    return net.number(v, what, low, high, integer=True)


def _positive(v: Any, what: str, high: float) -> float:
    return net.number(v, what, 0, high, lo_open=True)


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
            timeouts = conf.get("round_timeout_s", {})
            if not isinstance(timeouts, dict):
                raise ValueError("'round_timeout_s' must map layer numbers to seconds")
            lc["round_timeout_s"] = _positive(timeouts.get(str(layer), DEFAULT_ROUND_TIMEOUT_S),
                                              f"round_timeout_s[{str(layer)!r}]", 1e6)
        layers[layer] = lc
    peers = {p for lc in layers.values() for p in [lc["father"], *lc["children"]]}
    for peer in sorted(peers - {None, SELF, me}):
        if peer not in conf["connect"] and peer not in conf["forward"]:
            raise ValueError(f"no way to {peer!r}: it is in neither 'connect' nor 'forward'")
    for key in ("seed", "test_known_weights_seed"):
        if key in conf:
            conf[key] = _int(conf[key], key, 0, MAX_SEED)
    conf["_layers"] = layers
    return conf


@dataclass
class Box:
    """The results one aggregating (layer, round) waits for."""
    expected: set[str]
    shapes: dict[str, tuple]
    results: dict[str, tuple[dict, int]] = field(default_factory=dict)


class ElPeer:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self._cond = threading.Condition()
        self._boxes: dict[tuple[int, int], Box] = {}
        self._rounds: dict[int, int] = {}                # layer -> rounds run so far
        self._train_lock = threading.Lock()
        self._trainings = 0
        self._latest: tuple[int, int, dict] | None = None  # (layer, round, model)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="el-send")
        rt.on_structure(self._check_structure)
        rt.on_dataset(self._check_data)
        rt.declare_model(nns.build_model)
        rt.route("/el/message", methods=["POST"], weights=True)(self.message)
        rt.route("/el/model", methods=["GET"])(self.model)

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
        return Response(net.pack_weights(sd, {"layer": layer, "round": rnd, "name": self.rt.name}),
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
        try:
            rt.send_weights(addr, "/el/message", tensors, {**meta, "hops": meta["hops"] + 1})
        except net.HttpError as e:
            return Response(f"{rt.name}: forwarding to {hop} failed: {e.message}\n",
                            status=e.status or 502, mimetype="text/plain")
        return "forwarded\n"

    def _take_down(self, src: str, layer: int, rnd: int, tensors: dict):
        lc = self.layers.get(layer)
        if lc is None or lc["father"] is None or self._who(lc["father"]) != src:
            raise Conflict(f"{self.rt.name}: {src} is not this node's father in layer {layer}")
        if self.rt.data is not None:
            want = {k: tuple(v.shape) for k, v in nns.build_model(self.rt.data.meta).state_dict().items()}
            if {k: tuple(v.shape) for k, v in tensors.items()} != want:
                raise BadRequest(f"{self.rt.name}: the model from {src} does not fit this dataset's "
                                 f"{nns.model_name_for(self.rt.data.meta.get('name', ''))} model")
        self.rt.spawn(self._on_down, layer, tensors, rnd, name=f"layer{layer}-r{rnd}")
        return "ok\n"

    def _deliver(self, layer: int, rnd: int, child: str, sd: dict, samples: int) -> None:
        with self._cond:
            box = self._boxes.get((layer, rnd))
            if box is None:
                raise Conflict(f"{self.rt.name}: layer {layer} round {rnd} is not waiting for results")
            if child not in box.expected:
                raise Conflict(f"{self.rt.name}: {child} is not expected in layer {layer} round {rnd}")
            if child in box.results:
                raise Conflict(f"{self.rt.name}: {child} already answered layer {layer} round {rnd}")
            got = {k: tuple(v.shape) for k, v in sd.items()}
            if got != box.shapes:
                raise BadRequest(f"{self.rt.name}: weights from {child} do not match the model sent "
                                 f"(keys or shapes differ: {sorted(set(got.items()) ^ set(box.shapes.items()))[:3]})")
            box.results[child] = (sd, samples)
            self._cond.notify_all()

    # ------------------------------------------------------------------ the layers
    def run_top(self) -> None:
        rt, conf = self.rt, self.rt.structure
        top = max(self.layers)
        torch.manual_seed(conf.get("seed", 0))
        model = nns.build_model(rt.data.meta).state_dict()
        rt.log.info("top of %d layers: %d rounds", top, self.layers[top]["sync"])
        self._aggregate_rounds(top, model)
        if not rt.stopping.is_set():
            rt.finish()

    def _on_down(self, layer: int, model: dict, father_round: int) -> None:
        if layer == 1:
            result, samples = self._train(model)
        else:
            result, samples = self._aggregate_rounds(layer, model)
        father = self._who(self.layers[layer]["father"])
        try:
            if father == self.rt.name:
                self._deliver(layer + 1, father_round, father, result, samples)
            else:
                self._send(father, "up", layer, father_round, result, samples)
        except (net.HttpError, HTTPException) as e:  # e.g. the father's round timed out (409)
            self.rt.log.warning("layer %d: result for %s's round %d not taken: %s", layer, father,
                                father_round, getattr(e, "description", e))

    def _send(self, dst: str, kind: str, layer: int, rnd: int, sd: dict, samples: int | None = None) -> None:
        addr, _ = self._next_hop(dst)
        meta = {"kind": kind, "src": self.rt.name, "dst": dst, "layer": layer, "round": rnd, "hops": 0}
        if samples is not None:
            meta["samples"] = samples
        self.rt.send_weights(addr, "/el/message", sd, meta)

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

    def _aggregate_rounds(self, layer: int, model: dict) -> tuple[dict, int]:
        """`sync` rounds of this layer from `model`; (its final model, its samples)."""
        rt, lc = self.rt, self.layers[layer]
        samples = 0
        for _ in range(lc["sync"]):
            if rt.stopping.is_set():
                break
            with self._cond:
                rnd = self._rounds[layer] = self._rounds.get(layer, 0) + 1
            results = self._one_round(layer, rnd, model)
            rt.set_state("aggregating", rnd)
            if results:
                model, samples = etree.aggregate(results)
            else:
                rt.log.warning("layer %d round %d: no child answered; the model is unchanged", layer, rnd)
            if self._latest is None or self._latest[0] <= layer:
                self._latest = (layer, rnd, model)
            if lc["father"] is None:
                self._evaluate(model, layer, rnd)
            else:
                rt.log.info("Layer aggregate: layer=%d, round=%d, children=%d, samples=%d,",
                            layer, rnd, len(results), samples)
                rt.log_metric("layer_aggregate", rnd, layer=layer, children=len(results), samples=samples)
        return model, samples

    def _one_round(self, layer: int, rnd: int, model: dict) -> list[tuple[dict, int]]:
        """Send `model` to every child of (layer, rnd) and collect their results in conf order."""
        rt, lc = self.rt, self.layers[layer]
        kids = [self._who(c) for c in lc["children"]]
        box = Box(set(kids), {k: tuple(v.shape) for k, v in model.items()})
        with self._cond:
            self._boxes[layer, rnd] = box
        rt.set_state("waiting", rnd)
        sends = {}
        for kid in kids:
            if kid == rt.name:
                rt.spawn(self._on_down, layer - 1, model, rnd, name=f"layer{layer - 1}-r{rnd}")
            else:
                sends[kid] = self._pool.submit(self._send, kid, "down", layer - 1, rnd, model)
        for kid, fut in sends.items():
            try:
                fut.result()
            except (net.HttpError, KeyError, ValueError) as e:
                rt.log.warning("layer %d round %d: child %s did not take the model: %s", layer, rnd, kid, e)
                with self._cond:
                    box.expected.discard(kid)
        with self._cond:
            self._cond.wait_for(lambda: len(box.results) >= len(box.expected) or rt.stopping.is_set(),
                                timeout=lc["round_timeout_s"])
            del self._boxes[layer, rnd]  # late results get 409 from now on
            missing = sorted(box.expected - set(box.results))
        if missing:
            rt.log.warning("layer %d round %d: no result from %s within %g s; aggregating the others",
                           layer, rnd, missing, lc["round_timeout_s"])
        return [box.results[k] for k in kids if k in box.results]

    def _evaluate(self, model: dict, layer: int, rnd: int) -> None:
        net_ = nns.build_model(self.rt.data.meta)
        net_.load_state_dict(model, strict=True)
        acc, _ = evaluate(net_, self.rt.data.test_x, self.rt.data.test_y)
        self.rt.log_aggregate(acc, rnd, layer=layer)


if __name__ == "__main__":
    main("el_peer", ElPeer)
