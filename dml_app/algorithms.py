"""The maths of the DML roles as pure functions: no HTTP, no threads, no files.

Roles call these; tests check them exactly with small tensors. Later roles (gossip
mixing, E-tree partial sums, ring chunking) add their functions here.
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


def fedavg(results: Sequence[tuple[StateDict, int]]) -> dict[str, torch.Tensor]:
    """FedAvg: the sample-weighted mean of state dicts, key by key.

    `results` is a list of `(state_dict, n_samples)`; every state dict must hold the
    same keys and shapes. Sums run in float64 so the mean does not depend on the
    order the uploads arrived in (beyond float64 rounding); each result is cast back
    to its key's dtype. Integer entries (BatchNorm's `num_batches_tracked`) are
    rounded.
    """
    if not results:
        raise ValueError("fedavg needs at least one (state_dict, n_samples) pair")
    total = 0
    for i, (_, n) in enumerate(results):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"fedavg: result {i} has n_samples={n!r}; expected an int >= 0, "
                             "e.g. [(model.state_dict(), 600), ...]")
        total += n
    if total == 0:
        raise ValueError("fedavg: all results have n_samples=0")

    first = results[0][0]
    keys = list(first.keys())
    for i, (sd, _) in enumerate(results[1:], start=1):
        if set(sd.keys()) != set(keys):
            missing = sorted(set(keys) - set(sd.keys()))
            extra = sorted(set(sd.keys()) - set(keys))
            raise ValueError(f"fedavg: result {i} has different keys "
                             f"(missing {missing[:5]}, extra {extra[:5]})")
        for k in keys:
            if tuple(sd[k].shape) != tuple(first[k].shape):
                raise ValueError(f"fedavg: result {i} key {k!r} has shape {tuple(sd[k].shape)}, "
                                 f"expected {tuple(first[k].shape)}")

    out: dict[str, torch.Tensor] = {}
    for k in keys:
        acc = torch.zeros(first[k].shape, dtype=torch.float64)
        for sd, n in results:
            if n:
                acc += sd[k].detach().to("cpu", torch.float64) * (n / total)
        dtype = first[k].dtype
        if not (dtype.is_floating_point or dtype.is_complex):
            acc = acc.round()
        out[k] = acc.to(dtype)
    return out


def weighted_mean(values: Sequence[tuple[float, int]]) -> float:
    """Sample-weighted mean of scalars, e.g. the trainers' losses of one round."""
    total = sum(n for _, n in values)
    if total <= 0:
        raise ValueError("weighted_mean needs a positive total weight")
    return sum(v * n for v, n in values) / total


def select_clients(clients: Sequence[str], fraction: float, rng: random.Random) -> list[str]:
    """Pick max(1, round(fraction * len(clients))) distinct clients, in the list's order.

    The caller owns `rng` (seeded once per run) so a run's selections are reproducible.
    """
    if not clients:
        raise ValueError("select_clients: no clients to choose from")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"select_clients: fraction must be in (0, 1], got {fraction!r}")
    k = min(len(clients), max(1, round(fraction * len(clients))))
    chosen = set(rng.sample(list(clients), k))
    return [c for c in clients if c in chosen]
