"""What the peer roles (gl_peer.py, ra_peer.py) share on top of the runtime.

Every peer trains on its own train parts and evaluates on its own test parts, starts
from the same seeded model (so that averaging models makes sense), and validates the
same structure-conf keys: `epoch`, `sync`, `connect`, and optional `seed` and `lr`.
"""
from __future__ import annotations

import ipaddress
import socket
import zlib
from typing import Any

import torch

from dml_app import bounded_input, nns
from dml_app.learn import evaluate, train_epochs
from dml_app.runtime import Runtime

DEFAULT_LR = 0.05
MAX_EPOCHS = 10_000
MAX_ROUNDS = 1_000_000
MAX_SEED = 2**32 - 1


def meta_int(meta: dict, key: str, low: int, high: int = MAX_ROUNDS) -> int:
    """An integer of a peer's weights metadata (round, step, index, ...); ValueError names it."""
    return bounded_input.number(meta.get(key), f"weights metadata {key!r}", low, high, integer=True)


def number(conf: dict, key: str, kind: type, low: float, high: float | None = None,
           default: Any = None) -> Any:
    """conf[key] as `kind` within [low, high] (`default` when absent); ValueError names the
    key (bounded_input.number: no bools, strings, NaN or infinities)."""
    return bounded_input.number(conf.get(key, default), repr(key), low, high, integer=kind is int)


def check_common(conf: dict, role: str, *, min_epoch: int = 1) -> dict:
    """Normalise the keys every peer has; `role` names it in messages."""
    for key in ("epoch", "sync", "connect"):
        if key not in conf:
            raise ValueError(f"missing key {key!r} (a {role} needs epoch, sync, connect)")
    conf["epoch"] = number(conf, "epoch", int, min_epoch, MAX_EPOCHS)
    conf["sync"] = number(conf, "sync", int, 1, MAX_ROUNDS)
    conf["seed"] = number(conf, "seed", int, 0, MAX_SEED, default=0)
    conf["lr"] = number(conf, "lr", float, 1e-9, 10.0, default=DEFAULT_LR)
    connect = conf["connect"]
    if not isinstance(connect, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in connect.items()):
        raise ValueError("'connect' must map node names to 'ip:port'")
    return conf


def _addresses(host: str) -> set[str]:
    """The ip addresses `host` (an ip, or a name of the conf) stands for, normalised."""
    host = host.strip().strip("[]")
    try:
        ips = {host} if ipaddress.ip_address(host) else set()
    except ValueError:
        try:
            ips = {a[4][0] for a in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
        except OSError:
            ips = set()
    return {_normal_ip(ip) for ip in ips}


def _normal_ip(ip: str) -> str:
    try:
        a = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    mapped = getattr(a, "ipv4_mapped", None)      # ::ffff:10.0.0.2 is 10.0.0.2
    return str(mapped or a)


def check_sender(rt: Runtime, claimed: Any, address: str | None = None) -> str:
    """The node a peer's message says it comes from, checked against the request that
    brought it: `claimed` must be a node this one knows (at `address`, or else at its
    structure conf's `connect` address) and the request must come from that address.
    403 naming the mismatch otherwise (400 for a name that is not a string).

    Only the ip is compared: the port a request comes from is an ephemeral one. On
    emulated nodes (a netns or a container each) every node has its own ip, so this
    names the sending node; physical nodes of one host share its ip, so among them it
    tells only that the sender is on that host (the peer credential still says it is
    one of the testbed's nodes)."""
    from flask import request
    from werkzeug.exceptions import BadRequest, Forbidden

    if not isinstance(claimed, str) or not claimed:
        raise BadRequest(f"{rt.name}: the weights metadata must name the sending node ('name')")
    shown = claimed[:64]
    if address is None:
        address = ((rt.structure or {}).get("connect") or {}).get(claimed)
    if not isinstance(address, str) or not address:
        raise Forbidden(f"{rt.name}: a message from {shown!r}, a node it does not know "
                        f"(its structure conf's 'connect' has no address for it)")
    host = address.rsplit(":", 1)[0]
    remote = _normal_ip(request.remote_addr or "")
    if remote not in _addresses(host):
        raise Forbidden(f"{rt.name}: a message that says it is from {shown} came from {remote or 'an unknown address'}, "
                        f"but {shown} is at {host}")
    return claimed


def check_data(data, *, needs_train: bool = True) -> None:
    """A peer evaluates what it holds (test parts) and, usually, trains (train parts)."""
    if data.test_samples == 0:
        raise ValueError("a peer evaluates its model: give it test parts (test_len > 0)")
    if needs_train and data.train_samples == 0:
        raise ValueError("a peer trains: give it train parts (train_len > 0)")


def initial_model(meta: dict, seed: int) -> torch.nn.Module:
    """The model every peer starts from: the dataset's model, initialised from `seed`."""
    torch.manual_seed(seed)
    return nns.build_model(meta)


def train_round(rt: Runtime, model: torch.nn.Module, rnd: int) -> float:
    """`epoch` local epochs on the node's train parts; logs `Train: loss=..., round=rnd,`."""
    conf, data = rt.structure, rt.data
    seed = zlib.crc32(rt.name.encode()) * 1009 + rnd  # reproducible, distinct per node and round
    loss = train_epochs(model, data.train_x, data.train_y, epochs=conf["epoch"],
                        batch_size=data.batch_size, lr=conf["lr"], seed=seed)
    rt.log_train(loss, rnd)
    return loss


def evaluate_round(rt: Runtime, model: torch.nn.Module, rnd: int) -> float:
    """Accuracy on the node's test parts; logs `Aggregate: accuracy=..., round=rnd,`."""
    acc, _ = evaluate(model, rt.data.test_x, rt.data.test_y)
    rt.log_aggregate(acc, rnd)
    return acc
