"""Gossip learning as pure functions: mixing two models and choosing whom to tell.

No HTTP, no threads: gl_peer.py calls these and the tests check them exactly.
`gossip_round` is a round's choice under failures: the sending itself (bounded, with
its reason for failing) is the caller's `send`.
"""
from __future__ import annotations

import random
from typing import Callable, Collection, Mapping, Sequence

import torch

from dml_app.algorithms import check_fits

StateDict = Mapping[str, torch.Tensor]


def check_compatible(own: StateDict, received: StateDict) -> None:
    """ValueError unless `received` has exactly `own`'s keys and shapes (algorithms.check_fits)."""
    check_fits(own, received)


def mix(own: StateDict, received: StateDict, weight: float = 0.5) -> dict[str, torch.Tensor]:
    """(1 - weight) * own + weight * received, key by key; new tensors, inputs untouched.

    Computed in float64 and cast back to each key's dtype (integer buffers rounded), so
    mix(a, b) == mix(b, a) exactly for the plain average (weight 0.5).
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"mix: weight must be a number in [0, 1], got {weight!r}")
    check_compatible(own, received)
    out = {}
    for k, a in own.items():
        a64 = a.detach().to("cpu", torch.float64)
        b64 = received[k].detach().to("cpu", torch.float64)
        v = a64 * (1.0 - weight) + b64 * weight
        if not a.dtype.is_floating_point:
            v = v.round()
        out[k] = v.to(a.dtype)
    return out


def choose_peer(peers: Sequence[str], rng: random.Random) -> str:
    """One peer, uniformly at random from `peers` (the caller owns and seeds `rng`)."""
    if not peers:
        raise ValueError("choose_peer: no peers to gossip with (the node has no links to peers)")
    return rng.choice(sorted(peers))


def peer_rng(seed: int, name: str) -> random.Random:
    """A peer's own random stream: reproducible from the run's seed, distinct per peer."""
    return random.Random(f"gossip:{seed}:{name}")


def gossip_round(peers: Sequence[str], down: Collection[str], rng: random.Random,
                 send: Callable[[str], str | None]) -> tuple[str | None, dict[str, str]]:
    """One round's gossip: choose a peer at random among `peers` not `down`; send(peer)
    returns None when the model got there, else why not (a short word: dead, refused,
    timeout, error); on a failure choose again among those not tried yet, until one
    took it or none is left. -> (the peer that took it or None, {peer tried: why}).

    Without failures this is exactly one choose_peer(peers, rng), so a run's choices do
    not depend on whether it could have failed. Which failures make a peer `down` for
    later rounds is the caller's choice."""
    left = sorted(set(peers) - set(down))
    missing: dict[str, str] = {}
    while left:
        peer = choose_peer(left, rng)
        why = send(peer)
        if why is None:
            return peer, missing
        missing[peer] = why
        left.remove(peer)
    return None, missing
