"""The maths of the parameter server: the versioned model, the sync and async update
rules and the worker's gradient, with no HTTP and no threads (the roles hold the lock).

* `sgd_step`: torch.optim.SGD's update (momentum without dampening or Nesterov), so one
  step here equals one `optimizer.step()` on the same gradient.
* `ParameterServer.push`: in `sync` mode, gradients of the current version are collected
  (`pending`); the server role decides when the step is due (every live worker pushed,
  or the version's deadline: `step_timeout_s` after it was served, `serve`/`time_left`)
  and `apply_pending` applies the average of what came (weighted by batch samples:
  with equal batches, the plain mean) as one SGD step; the version goes up by one. In
  `async` mode each gradient is applied on arrival (version + 1), unless it was
  computed on a version more than `max_staleness` behind the current one.
  Refusals raise `Rejected` (the server answers HTTP 409 with the message); after
  `steps` updates every push raises `Finished` (HTTP 410).
* `Registry` (serverless mode): the workers are not known in advance; each registers a
  worker id with the node its client credential speaks for, and only that node may push
  for it or unregister it. The registry is the ParameterServer's `workers` then
  (`dynamic=True`), so the async rule is the same for both modes.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from dml_app import bounded_input
from dml_app.algorithms import StateDict, check_fits

MODES = ("sync", "async")
MAX_PUSH_IDS = 4096           # push ids remembered (per server) to answer a resent push
MAX_PUSH_ID_CHARS = 64
MAX_WORKERS = 1024            # serverless: worker ids registered at once
WORKER_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Rejected(ValueError):
    """A push the server refuses (stale, duplicate, unknown worker); HTTP 409."""


class Finished(Rejected):
    """The server has applied all its steps; HTTP 410."""


class NotAllowed(Rejected):
    """Serverless: the calling node may not do this (not an action node, not the node
    that registered the worker id, worker id not registered); HTTP 403."""


class TooMany(Rejected):
    """Serverless: MAX_WORKERS worker ids are registered already; HTTP 429."""


def check_worker_id(worker_id) -> str:
    """`worker_id` if it is 1..64 characters of [A-Za-z0-9._-]; else ValueError (HTTP 400)."""
    if not isinstance(worker_id, str) or not WORKER_ID_RE.fullmatch(worker_id):
        shown = repr(worker_id)[:80]
        raise ValueError(f"'worker_id' must be 1 to 64 characters of A-Z a-z 0-9 . _ -, got {shown}")
    return worker_id


class Registry:
    """Serverless workers: worker id -> the node that registered it (its client
    credential's node). Works as ParameterServer.workers (`in`, len, iteration)."""

    def __init__(self, allowed: Iterable[str], limit: int = MAX_WORKERS):
        self.allowed = frozenset(allowed)
        self.limit = limit
        self.owners: dict[str, str] = {}

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self.owners

    def __len__(self) -> int:
        return len(self.owners)

    def __iter__(self) -> Iterator[str]:
        return iter(self.owners)

    def register(self, worker_id: str, node: str | None) -> bool:
        """Register `worker_id` for `node`; True if new, False if `node` held it already
        (a resent registration). NotAllowed, Rejected (held by another node), TooMany."""
        check_worker_id(worker_id)
        if node is None or node not in self.allowed:
            who = "the server's own credential" if node is None else f"node {node!r}"
            raise NotAllowed(f"{who} may not register workers (action nodes: "
                             f"{', '.join(sorted(self.allowed))})")
        owner = self.owners.get(worker_id)
        if owner == node:
            return False
        if owner is not None:
            raise Rejected(f"worker id {worker_id!r} is registered by another node ({owner})")
        if len(self.owners) >= self.limit:
            raise TooMany(f"{len(self.owners)} workers are registered, the most this server takes; "
                          f"unregister finished ones first")
        self.owners[worker_id] = node
        return True

    def unregister(self, worker_id: str, node: str | None) -> bool:
        """Remove `worker_id`; True if it was registered. `node` None (the server's own
        credential: the controller) may remove any; a node only its own (else NotAllowed)."""
        check_worker_id(worker_id)
        owner = self.owners.get(worker_id)
        if owner is None:
            return False
        if node is not None and owner != node:
            raise NotAllowed(f"worker id {worker_id!r} is registered by another node ({owner}), "
                             f"not by {node}")
        del self.owners[worker_id]
        return True

    def check(self, worker_id: str, node: str | None) -> None:
        """NotAllowed unless `worker_id` is registered by `node` (who may push for it)."""
        owner = self.owners.get(worker_id)
        if node is None:
            raise NotAllowed("the server's own credential may not push gradients (a worker "
                             "pushes with its client credential)")
        if owner is None:
            raise NotAllowed(f"worker id {worker_id!r} is not registered (POST /registerWorker first)")
        if owner != node:
            raise NotAllowed(f"worker id {worker_id!r} is registered by another node ({owner}), "
                             f"not by {node}")


def average_gradients(grads: Sequence[tuple[StateDict, int]]) -> dict[str, torch.Tensor]:
    """The average of the workers' gradients weighted by their batch samples, summed in
    float64 as sum(n * g) / sum(n): with equal batches this is the plain mean
    sum(g) / K to the bit (the samples scale every term alike), in the gradients' dtype.
    The gradients' keys and shapes are checked on arrival (ParameterServer.push)."""
    total = sum(n for _, n in grads)
    if not grads or total <= 0:
        raise ValueError("average_gradients needs (gradient, samples) pairs with samples > 0")
    first = grads[0][0]
    return {k: (sum(g[k].double() * n for g, n in grads) / total).to(first[k].dtype) for k in first}


def sgd_step(params: StateDict, grad: StateDict, *, lr: float, momentum: float = 0.0,
             buf: StateDict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """One SGD step on the keys of `grad`: (new params, new momentum buffer).

    As torch.optim.SGD: buf = grad on the first step, else momentum * buf + grad;
    p = p - lr * buf (p - lr * grad without momentum). Keys without a gradient are kept.
    """
    new = {k: v.detach().clone() for k, v in params.items()}
    new_buf: dict[str, torch.Tensor] | None = None
    if momentum:
        new_buf = {}
        for k, g in grad.items():
            b = g.detach().clone() if buf is None else buf[k].mul(momentum).add_(g)
            new_buf[k] = b
    for k, g in grad.items():
        new[k].add_(new_buf[k] if new_buf is not None else g, alpha=-lr)
    return new, new_buf


_CHECKS = {  # key: bounded_input.number's (lo, hi, integer, lo_open, hi_open)
    "steps": (1, 10_000_000, True, False, False),
    "lr": (0, 10, False, True, False),
    "momentum": (0, 1, False, False, True),
    "max_staleness": (0, 10_000_000, True, False, False),
    "eval_every": (1, 10_000_000, True, False, False),
    "step_timeout_s": (0, 1e6, False, True, False),     # seconds
    "step_retries": (0, 100, True, False, False),
    "seed": (0, 2**32 - 1, True, False, False),
}


@dataclass(frozen=True)
class PsConfig:
    """What the server's structure conf sets; a bad value raises ValueError naming the key."""

    mode: str = "sync"
    steps: int = 100
    lr: float = 0.05
    # the lr falls linearly from `lr` (version 0) to this at `steps`: late steps move the
    # model less, so the last version is not left wherever one noisy step threw it; None: constant
    lr_end: float | None = None
    momentum: float = 0.0
    max_staleness: int = 0            # async: the oldest gradient taken is this many versions behind
    eval_every: int = 10              # evaluate every this many versions (and at the last)
    # sync: a version waits for its gradients at most this long after it was served, then
    # the average of those that came is applied; with none, it waits again, at most
    # step_retries more times, and then the run fails.
    step_timeout_s: float = 600.0
    step_retries: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"'mode' must be one of {', '.join(MODES)}, got {self.mode!r}")
        for key, (lo, hi, integer, lo_open, hi_open) in _CHECKS.items():
            v = bounded_input.number(getattr(self, key), repr(key), lo, hi, integer=integer,
                           lo_open=lo_open, hi_open=hi_open)
            object.__setattr__(self, key, v)     # 2.0 steps is 2; the dataclass is frozen
        if self.lr_end is not None:
            object.__setattr__(self, "lr_end", bounded_input.number(self.lr_end, "'lr_end'", 0, 10))

    def lr_at(self, version: int) -> float:
        """The lr of the step from `version` to version + 1."""
        if self.lr_end is None:
            return self.lr
        return self.lr + (self.lr_end - self.lr) * min(1.0, version / self.steps)


@dataclass
class ParameterServer:
    """The server's model, version and update rule; `push` is the only way to change it."""

    params: dict[str, torch.Tensor]
    workers: Collection[str]     # the conf's names; serverless: the live Registry
    config: PsConfig = field(default_factory=PsConfig)
    grad_keys: Sequence[str] | None = None    # the model's parameters; default: every floating entry
    dynamic: bool = False        # serverless: workers register while it runs (none at first)
    version: int = 0
    accepted: int = 0
    rejected: int = 0
    pending: dict[str, tuple[dict, int]] = field(default_factory=dict)   # sync: this step's gradients
    served_at: float | None = None    # sync: when the current version was served (its deadline's start)
    buf: dict[str, torch.Tensor] | None = None
    # (worker, push id) -> whether that push changed the model: a push sent again (its
    # answer was lost) is answered from here, not applied twice. The last MAX_PUSH_IDS.
    push_ids: "OrderedDict[tuple[str, str], bool]" = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if not self.workers and not self.dynamic:
            raise ValueError("a parameter server needs at least one worker")
        if self.dynamic and self.config.mode != "async":
            raise ValueError("a parameter server with dynamic (serverless) workers takes the async rule")
        keys = self.grad_keys or [k for k, v in self.params.items() if v.dtype.is_floating_point]
        self.grad_shapes = {k: tuple(self.params[k].shape) for k in keys}

    @property
    def done(self) -> bool:
        return self.version >= self.config.steps

    def serve(self, now: float) -> None:
        """Sync: the current version is served from `now` (time.monotonic()); its deadline
        is step_timeout_s later, whenever its gradients come."""
        self.served_at = now

    def time_left(self, now: float) -> float:
        """Sync: seconds until the current version's deadline (negative past it); the full
        step_timeout_s before it was served."""
        if self.served_at is None:
            return self.config.step_timeout_s
        return self.served_at + self.config.step_timeout_s - now

    def check_gradient(self, grad: Mapping[str, torch.Tensor]) -> None:
        """ValueError unless `grad` has exactly the model's floating keys and shapes."""
        try:
            check_fits(self.grad_shapes, grad)
        except ValueError as e:
            raise ValueError(f"the gradient does not match the model: {e}") from None

    def seen(self, worker: str, push_id: str | None) -> bool | None:
        """The outcome (True: it changed the model) of an accepted push with this id, or
        None when there was none."""
        return None if push_id is None else self.push_ids.get((worker, push_id))

    def push(self, worker: str, version: int, grad: dict, samples: int, *,
             push_id: str | None = None) -> bool:
        """Take one worker's gradient computed on `version`; True if the model changed
        (async; sync only collects it: `apply_pending`). A `push_id` already accepted
        from this worker is not applied again: its first outcome is returned (`seen`)."""
        prev = self.seen(worker, push_id)
        if prev is not None:
            return prev
        applied = self._push(worker, version, grad, samples)
        if push_id is not None:
            self.push_ids[(worker, push_id)] = applied
            while len(self.push_ids) > MAX_PUSH_IDS:
                self.push_ids.popitem(last=False)
        return applied

    def check_push(self, worker: str, version: int, grad: Mapping[str, torch.Tensor]) -> None:
        """What every push must pass (Finished, Rejected, ValueError), without taking it."""
        if self.done:
            raise Finished(f"training finished at version {self.version} ({self.config.steps} steps)")
        if worker not in self.workers:
            known = "registered" if self.dynamic else ", ".join(self.workers)
            raise Rejected(f"{worker!r} is not a worker of this server ({known})")
        if not 0 <= version <= self.version:
            raise Rejected(f"version {version} was never served (current version {self.version})")
        self.check_gradient(grad)
        if self.config.mode == "sync" and version != self.version:
            self.rejected += 1
            raise Rejected(f"gradient from {worker} for version {version}: sync mode takes only "
                           f"gradients of the current version {self.version}")

    def _push(self, worker: str, version: int, grad: dict, samples: int) -> bool:
        self.check_push(worker, version, grad)
        if self.config.mode == "async":
            staleness = self.version - version
            if staleness > self.config.max_staleness:
                self.rejected += 1
                raise Rejected(f"stale gradient from {worker}: computed on version {version}, the "
                               f"server is at version {self.version} (staleness {staleness} > "
                               f"max_staleness {self.config.max_staleness}); pull and compute again")
            self.accepted += 1
            self._apply(grad)
            return True
        if worker in self.pending:
            self.rejected += 1
            raise Rejected(f"{worker} already pushed a gradient for version {version}")
        self.accepted += 1
        self.pending[worker] = (grad, samples)
        return False

    def apply_pending(self) -> list[str]:
        """Sync: apply the average of the gradients pushed for this version (every live
        worker's, or those that came by the deadline) as one step; returns the workers
        that contributed, in the conf's order ([] and no step when none came)."""
        if not self.pending:
            return []
        names = [w for w in self.workers if w in self.pending]    # the conf's order: reproducible
        self._apply(average_gradients([self.pending[w] for w in names]))
        return names

    def _apply(self, grad: StateDict) -> None:
        self.params, self.buf = sgd_step(self.params, grad, lr=self.config.lr_at(self.version),
                                         momentum=self.config.momentum, buf=self.buf)
        self.version += 1
        self.pending = {}
        self.served_at = None


def batch_gradient(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, torch.Tensor]]:
    """(mean cross-entropy loss, gradient of every parameter) on one batch."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(torch.from_numpy(np.ascontiguousarray(x))),
                                       torch.from_numpy(np.ascontiguousarray(y)))
    loss.backward()
    return float(loss.item()), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless batches of indices into n samples: a new seeded permutation every epoch,
    full batches only (one batch of all n when n < batch_size)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"batches: need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    rng = np.random.default_rng(seed)
    size = min(batch_size, n)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - size + 1, size):
            yield order[i:i + size]
