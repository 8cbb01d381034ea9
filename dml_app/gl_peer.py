"""Gossip-learning peer: no root, no aggregator; every peer does the same.

On GET /start (the controller starts every peer) the peer builds the common seeded
model, then for `sync` rounds:
  1. trains `epoch` local epochs on its train parts (`Train: loss=..., round=r,`);
  2. gossips: POSTs its model (safetensors) to ONE peer chosen at random from its
     `peers` (the other gossip peers it has links to) that are not down, logging
     `Gossip: to=<peer>, round=r,` (metrics event "gossip", with ok); a send that fails
     (the peer's port refuses: dead; an HTTP error: refused; no answer within
     `gossip_timeout_s`: timeout) is skipped and another live peer is chosen for the
     round, until one took the model or none is left. A peer found dead or silent is
     down: not chosen again until it answers again (a GET /hi each round, or a model
     from it: a restarted peer comes back). Each round writes the metrics event
     "participants" {participants: [the peer that took the model], missing: {peer
     tried: why}, down: [...]};
  3. waits up to `wait_s` for a model from another peer (at once if one came already),
     averages every model received with its own (gossip.mix, a pure function),
     evaluates on its test parts and logs `Aggregate: accuracy=..., round=r,`; the next
     round trains the merged model.
After `sync` rounds it stops initiating but still accepts models: each one is merged
and evaluated (logged with round=sync). Its state is `finished` whenever it has
initiated all its gossips and has no received model left to merge, which is what the
controller (the Gossip algorithm, controller/gl_run.py) watches to end the run by itself.

Structure conf (gl_structure_conf.py): EdgeTB's {"epoch", "sync", "connect"}, where
`connect` maps every node this one has a link to (gossip peers or not) to 'ip:port',
and ours: "peers", the names in `connect` that are gossip peers (without it, as in a
conf from EdgeTB's tool, every node of `connect` is one); optional "seed" (default 0:
the common initial model and each peer's choices), "lr" (0.05), "wait_s" (5) and
"gossip_timeout_s" (30: the bound of one send). The rounds are the round loop's
(rounds.py), the waiting and the failure accounting the runtime's (rt.fan_out, Reply);
this role keeps its choice of whom to tell. A gossip round has no quorum: one peer
told is the round; the controller (the Gossip algorithm) ends the run when every peer is
`finished`, which is each peer's own say after its `sync` rounds.
"""
from __future__ import annotations

import threading

import torch
from werkzeug.exceptions import BadRequest, Conflict

from dml_app import calls, nns, peer_role, weights
from dml_app.algorithms import shapes
from dml_app.gossip import gossip_round, mix, peer_rng
from dml_app.rounds import Rounds
from dml_app.runtime import DEAD, TIMEOUT, Runtime, main

DEFAULT_WAIT_S = 5.0
DEFAULT_GOSSIP_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 2.0          # a GET /hi to a down peer: is it back?
DOWN_WHYS = (DEAD, TIMEOUT)    # not chosen again until it answers; a refusal (4xx/5xx) is per round


def check_structure(conf: dict) -> dict:
    """Validate and normalise a gossip peer's structure conf (ValueError names the key)."""
    conf = peer_role.check_common(conf, "gossip peer")
    conf["wait_s"] = peer_role.number(conf, "wait_s", float, 0.0, 3600.0, default=DEFAULT_WAIT_S)
    conf["gossip_timeout_s"] = peer_role.number(conf, "gossip_timeout_s", float, 0.1, 3600.0,
                                                default=DEFAULT_GOSSIP_TIMEOUT_S)
    peers = conf.setdefault("peers", list(conf["connect"]))
    if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers) or len(set(peers)) != len(peers):
        raise ValueError(f"'peers' must be a list of distinct node names, got {peers!r}")
    if not peers:
        raise ValueError("no gossip peer ('peers', or else 'connect', is empty): a gossip peer needs "
                         "a link to at least one other peer")
    missing = [p for p in peers if p not in conf["connect"]]
    if missing:
        raise ValueError(f"'connect' has no address for peer(s) {missing} (no link)")
    senders = conf.setdefault("senders", {})
    if not isinstance(senders, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in senders.items()):
        raise ValueError("'senders' must map node names to 'ip:port'")
    return conf


class GlPeer:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.model: torch.nn.Module | None = None
        self._ref: dict[str, tuple] = {}   # the model's keys and shapes
        self._cond = threading.Condition()
        self._inbox: list[tuple[dict, str, int]] = []   # (weights, sender, sender's round)
        self._initiating = True     # False once the peer has gossiped `sync` times
        self._late_merging = False  # a thread merges models that came after that
        self._down: set[str] = set()  # peers found dead or silent: not chosen until they answer
        rt.on_structure(check_structure)
        rt.on_dataset(peer_role.check_data)
        rt.on_start(self.run)
        rt.declare_model(nns.build_model)
        rt.route("/gossip", methods=["POST"], weights=True)(self.receive)

    def _ensure_model(self) -> None:
        """Build the common initial model once (at start, or at a gossip that comes first)."""
        with self._cond:
            if self.model is None:
                self.model = peer_role.initial_model(self.rt.data.meta, self.rt.structure["seed"])
                self._ref = shapes(self.model.state_dict())

    # ------------------------------------------------------------------ HTTP: a peer's model

    def receive(self):
        """POST /gossip: another peer's weights with meta {name, round}; answered at once."""
        rt = self.rt
        if rt.structure is None or rt.data is None:
            raise Conflict(f"{rt.name}: /conf/structure and /conf/dataset must come before /gossip")
        tensors, meta = rt.receive_weights()
        sender = meta.get("name")
        if not isinstance(sender, str):
            raise BadRequest("gossip metadata must carry 'name' (str) and 'round' (int)")
        # The sender must be a node this peer knows, and the request must come from its
        # address: a peer cannot slip a model in under another's name (403). "senders"
        # (the controller adds it) has the nodes with a link to this one, `connect` the
        # nodes it has a link to.
        peer_role.check_sender(rt, sender, (rt.structure.get("senders") or {}).get(sender))
        try:
            rnd = peer_role.meta_int(meta, "round", 0)
        except ValueError as e:
            raise BadRequest(f"{rt.name}: gossip from {sender[:64]}: {e}") from None
        self._ensure_model()
        rt.check_weights(tensors, self._ref, what=f"weights gossiped by {sender}")
        with self._cond:
            self._inbox.append((tensors, sender, rnd))
            rt.log.info("Receive: from=%s, round=%d,", sender, rnd)
            if sender in self._down:
                self._down.discard(sender)
                rt.log.info("%s is back (a model from it): it may be chosen again", sender)
            if not self._initiating and not self._late_merging:
                # Said before answering: the sender becomes `finished` only after this.
                self._late_merging = True
                rt.set_state("merging")
                rt.spawn(self._merge_late, name="merge-late")
            self._cond.notify_all()
        return "ok\n"

    # ------------------------------------------------------------------ the rounds

    def run(self) -> None:
        rt, conf = self.rt, self.rt.structure
        self._ensure_model()
        rng = peer_rng(conf["seed"], rt.name)
        peers = sorted(conf["peers"])
        rt.log.info("gossip: %d rounds, peers %s, wait up to %g s for a model", conf["sync"],
                    peers, conf["wait_s"])
        if not Rounds(rt).run(range(1, conf["sync"] + 1), lambda r: self._round(peers, rng, r)):
            return
        with self._cond:
            self._initiating = False
            if self._inbox:
                self._late_merging = True
                rt.set_state("merging", conf["sync"])
                rt.spawn(self._merge_late, name="merge-late")
            else:
                rt.set_state("finished", conf["sync"])
        rt.log.info("gossip done: %d rounds initiated", conf["sync"])

    def _round(self, peers: list[str], rng, r: int) -> None:
        """Round r: train, tell one live peer, wait up to wait_s for a model, merge."""
        rt = self.rt
        rt.set_state("training", r)
        peer_role.train_round(rt, self.model, r)
        rt.set_state("gossiping", r)
        self._readmit(r)
        self._gossip(peers, rng, r)
        rt.set_state("waiting", r)
        with self._cond:
            self._cond.wait_for(lambda: self._inbox or rt.stopping.is_set(), timeout=rt.structure["wait_s"])
        rt.set_state("merging", r)
        self._merge(r)

    def _gossip(self, peers: list[str], rng, r: int) -> None:
        """Tell one live peer (gossip.gossip_round chooses; a failed send is skipped and
        another chosen); each send bounded by gossip_timeout_s through rt.fan_out."""
        rt, timeout_s = self.rt, self.rt.structure["gossip_timeout_s"]
        body = weights.pack_weights(self.model.state_dict(), {"name": rt.name, "round": r,
                                                          "samples": rt.data.train_samples})

        def send(peer: str) -> str | None:
            rt.log.info("Gossip: to=%s, round=%d,", peer, r)
            rep = rt.fan_out([peer], lambda n: rt.post_weights_body(rt.peer(n), "/gossip", body, timeout_s=timeout_s),
                             deadline_s=timeout_s + 1.0)[peer]
            if rep.ok:
                rt.log_metric("gossip", r, to=peer, ok=True)
                return None
            rt.log.warning("round %d: gossip to %s failed (%s): %s; skipping it", r, peer, rep.why, rep.message)
            rt.log_metric("gossip", r, to=peer, ok=False, why=rep.why)
            if rep.why in DOWN_WHYS:
                with self._cond:
                    self._down.add(peer)
            return rep.why

        with self._cond:
            down = set(self._down)
        to, missing = gossip_round(peers, down, rng, send)
        if to is None:
            rt.log.warning("round %d: no live peer took the model (down: %s)", r,
                           ", ".join(sorted(set(down) | set(missing))) or "none")
        with self._cond:
            down = sorted(self._down)
        rt.log_metric("participants", r, participants=[to] if to else [], missing=missing, down=down)

    def _readmit(self, r: int) -> None:
        """Ask the down peers GET /hi (bounded); one that answers may be chosen again."""
        rt = self.rt
        with self._cond:
            down = sorted(self._down)
        if not down:
            return
        got = rt.fan_out(down, lambda n: calls.call("GET", f"http://{rt.peer(n)}/hi", token=rt.peer_token,
                                                  timeout_s=PROBE_TIMEOUT_S),
                         deadline_s=PROBE_TIMEOUT_S + 1.0)
        back = [n for n, rep in got.items() if rep.ok]
        if back:
            with self._cond:
                self._down.difference_update(back)
            rt.log.info("round %d: %s answer again: back among the peers to choose", r, ", ".join(back))

    def _merge(self, r: int) -> None:
        """Average every model received so far into ours, then evaluate (one Aggregate line)."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
        for tensors, _, _ in inbox:
            self.model.load_state_dict(mix(self.model.state_dict(), tensors))
        if inbox:
            self.rt.log.info("round %d: merged %d model(s) from %s", r, len(inbox),
                             ", ".join(s for _, s, _ in inbox))
        peer_role.evaluate_round(self.rt, self.model, r)

    def _merge_late(self) -> None:
        """Models that came after the last round: merge until none is left, then finished."""
        sync = self.rt.structure["sync"]
        while True:
            self._merge(sync)
            with self._cond:
                if not self._inbox:
                    self._late_merging = False
                    self.rt.set_state("finished", sync)
                    return


if __name__ == "__main__":
    main("gl_peer", GlPeer)
