"""The maths of the DML roles as pure functions: no HTTP, no threads, no files.

Roles call these; tests check them exactly with small tensors. Later roles (gossip
mixing, E-tree partial sums, ring chunking) add their functions here.
"""
from __future__ import annotations

import math
import random
from typing import Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]

# An aggregator's quorum (FL's aggregator, every E-tree aggregator): a round counts when at
# least min_fraction of the peers asked answered, else it is tried again round_retries times.
DEFAULT_MIN_FRACTION = 0.5
DEFAULT_ROUND_RETRIES = 2
MAX_ROUND_RETRIES = 100


def shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a state dict: what received weights are checked against."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def check_fits(expected: Mapping[str, torch.Tensor | tuple], received: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless `received` has exactly the keys of `expected` (a state dict, or
    {key: shape}) and each key's shape: the one check of weights against a model. The
    message names the keys missing and extra (first five of each), or the first key
    shaped otherwise."""
    want = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in expected.items()}
    if set(received) != set(want):
        missing = sorted(set(want) - set(received))
        extra = sorted(set(received) - set(want))
        raise ValueError(f"different keys (missing {missing[:5]}, extra {extra[:5]})")
    for k, shape in want.items():
        got = tuple(received[k].shape)
        if got != shape:
            raise ValueError(f"{k!r} is shaped {got}, expected {shape}")


def needed(min_fraction: float, asked: int) -> int:
    """Answers a round needs: at least min_fraction of the `asked` peers, and one."""
    return max(1, math.ceil(min_fraction * asked - 1e-9))


class FedAvg:
    """FedAvg as the uploads arrive: `add(state_dict, n_samples)` folds one result into
    float64 sums (one copy of the model in memory however many trainers there are),
    `result()` is the sample-weighted mean, cast back to each key's dtype (integer
    entries, e.g. BatchNorm's `num_batches_tracked`, rounded). The first result fixes the
    keys and shapes; a result that differs raises ValueError and changes nothing."""

    def __init__(self):
        self.total = 0
        self.count = 0
        self._sums: dict[str, torch.Tensor] | None = None
        self._dtypes: dict[str, torch.dtype] = {}

    def add(self, state_dict: StateDict, n: int) -> None:
        i = self.count
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"fedavg: result {i} has n_samples={n!r}; expected an int >= 0, "
                             "e.g. [(model.state_dict(), 600), ...]")
        if self._sums is None:
            self._sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state_dict.items()}
            self._dtypes = {k: v.dtype for k, v in state_dict.items()}
        keys = self._sums
        try:
            check_fits(keys, state_dict)
        except ValueError as e:
            raise ValueError(f"fedavg: result {i}: {e}") from None
        if n:
            for k, acc in keys.items():
                acc += state_dict[k].detach().to("cpu", torch.float64) * n
        self.total += n
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self._sums is None:
            raise ValueError("fedavg needs at least one (state_dict, n_samples) pair")
        if self.total == 0:
            raise ValueError("fedavg: all results have n_samples=0")
        out: dict[str, torch.Tensor] = {}
        for k, acc in self._sums.items():
            mean = acc / self.total
            dtype = self._dtypes[k]
            if not (dtype.is_floating_point or dtype.is_complex):
                mean = mean.round()
            out[k] = mean.to(dtype)
        return out


def fedavg(results: Sequence[tuple[StateDict, int]]) -> dict[str, torch.Tensor]:
    """FedAvg: the sample-weighted mean of state dicts, key by key (FedAvg above, over a
    list of `(state_dict, n_samples)`). Every state dict must hold the same keys and
    shapes. Sums run in float64 so the mean does not depend on the order the uploads
    arrived in (beyond float64 rounding)."""
    acc = FedAvg()
    for sd, n in results:
        acc.add(sd, n)
    return acc.result()


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
