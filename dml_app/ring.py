"""Ring all-reduce as pure functions and one bookkeeping object: no HTTP, no threads.

A node's state dict is flattened into ONE vector (every tensor, in key order) and the
vector is cut into `size` chunks with numpy.array_split's boundaries: the first
`length % size` chunks hold one element more. So every element of every tensor is
reduced, whatever the tensor sizes (EdgeTB cut each tensor into `size` equal pieces
and dropped the remainder).

With ranks 0..size-1 in the order the chunks travel (rank i sends to rank i+1 mod size,
its successor; ra_peer's rank is its place in the driver's ring, made by following the
confs' next_name, so rank i + 1 is rank i's next_name):
* reduce-scatter, steps 0..size-2: rank i sends chunk (i - s) mod size; its successor
  adds it to its own copy. After the last step rank i holds the complete sum of chunk
  (i + 1) mod size and divides it by `size` (the mean).
* all-gather, steps 0..size-2: rank i sends chunk (i + 1 - s) mod size; its successor
  overwrites its copy. After the last step every rank holds every mean chunk, the
  same bytes everywhere.

`AllReduce` does this bookkeeping for one node and refuses anything out of order (a
chunk of the wrong step, index or length), so a driver bug cannot silently corrupt a
model. The caller moves the chunks (ra_peer.py: safetensors over the shaped links).
When a member dies, the survivors start a new AllReduce of their own vectors on the
ring without it (`is_subring` says a ring is such a re-formed one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

PHASES = ("reduce", "gather")


def chunk_bounds(length: int, parts: int) -> list[tuple[int, int]]:
    """[(start, stop)] of `parts` contiguous chunks covering range(length), as
    numpy.array_split cuts: sizes differ by at most one, the larger ones first."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"chunk_bounds: length must be an int >= 0, got {length!r}")
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"chunk_bounds: parts must be an int >= 1, got {parts!r}")
    base, extra = divmod(length, parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + base + (1 if k < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _check_phase_step(phase: str, step: int, size: int) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < size - 1:
        raise ValueError(f"{phase} step must be an int in [0, {size - 2}] for a ring of {size}, "
                         f"got {step!r}")


def send_index(rank: int, size: int, phase: str, step: int) -> int:
    """The chunk rank `rank` sends to its successor at `step` of `phase`."""
    _check_phase_step(phase, step, size)
    return (rank - step) % size if phase == "reduce" else (rank + 1 - step) % size


def recv_index(rank: int, size: int, phase: str, step: int) -> int:
    """The chunk rank `rank` receives from its predecessor at `step` of `phase`."""
    return send_index((rank - 1) % size, size, phase, step)


def owned_index(rank: int, size: int) -> int:
    """The chunk whose complete sum rank `rank` holds after the reduce-scatter."""
    return (rank + 1) % size


def is_subring(ring: list[str], home: list[str]) -> bool:
    """Whether `ring` is `home` with some members left out and the rest in the same cyclic
    order (the ring the survivors of `home` re-form), each member once."""
    if len(set(ring)) != len(ring) or not set(ring) <= set(home):
        return False
    at = [home.index(n) for n in ring]
    k = at.index(min(at))
    at = at[k:] + at[:k]
    return all(a < b for a, b in zip(at, at[1:]))


# ----------------------------------------------------------------------------- flattening

@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    stop: int


def vector_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (integer buffers ride as floats)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in state_dict.values()) else torch.float32


def flatten(state_dict: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, list[Entry]]:
    """All tensors, keys in sorted order, as one new 1-D vector, and the layout to undo it."""
    if not state_dict:
        raise ValueError("flatten: empty state dict")
    dtype = vector_dtype(state_dict)
    layout, parts, at = [], [], 0
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu")
        if t.is_complex():
            raise ValueError(f"flatten: {key!r} is complex; ring all-reduce takes real tensors")
        n = t.numel()
        layout.append(Entry(key, tuple(t.shape), t.dtype, at, at + n))
        parts.append(t.reshape(-1).to(dtype))
        at += n
    return torch.cat(parts), layout


def unflatten(vector: torch.Tensor, layout: list[Entry]) -> dict[str, torch.Tensor]:
    """The state dict a vector stands for; integer entries are rounded back."""
    total = layout[-1].stop if layout else 0
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"unflatten: vector of shape {tuple(vector.shape)}, layout wants ({total},)")
    out = {}
    for e in layout:
        v = vector[e.start:e.stop]
        if not e.dtype.is_floating_point:
            v = v.round()
        out[e.key] = v.to(e.dtype).reshape(e.shape).clone()
    return out


# ----------------------------------------------------------------------------- one node

class AllReduce:
    """One node's side of one ring all-reduce of `vector` (a copy is kept).

    outgoing(phase, step) -> (index, chunk) to send to the successor;
    incoming(phase, step, index, chunk) applies what the predecessor sent.
    Order per phase: a node may send step s once it has received s chunks of that phase
    (and, for the gather, once the reduce-scatter is complete). `result()` is the mean.
    """

    def __init__(self, vector: torch.Tensor, rank: int, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"ring size must be an int >= 1, got {size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
            raise ValueError(f"rank must be an int in [0, {size - 1}], got {rank!r}")
        if vector.dim() != 1 or not vector.dtype.is_floating_point:
            raise ValueError("AllReduce takes a 1-D floating-point vector (see flatten())")
        self.rank, self.size = rank, size
        self.vector = vector.detach().clone()
        self.bounds = chunk_bounds(vector.numel(), size)
        self.sent = {p: 0 for p in PHASES}
        self.received = {p: 0 for p in PHASES}
        if size == 1:
            self._mean_owned()  # a ring of one: its vector is the mean

    @property
    def steps(self) -> int:
        return self.size - 1

    def _phase_done(self, phase: str) -> bool:
        return self.sent[phase] == self.steps and self.received[phase] == self.steps

    @property
    def done(self) -> bool:
        return all(self._phase_done(p) for p in PHASES)

    def _slice(self, index: int) -> slice:
        start, stop = self.bounds[index]
        return slice(start, stop)

    def _mean_owned(self) -> None:
        self.vector[self._slice(owned_index(self.rank, self.size))] /= self.size

    def _check_order(self, phase: str, step: int, counter: dict, what: str) -> None:
        _check_phase_step(phase, step, self.size)
        if phase == "gather" and self.received["reduce"] < self.steps:
            raise ValueError(f"gather {what} step {step} before the reduce-scatter is complete "
                             f"({self.received['reduce']}/{self.steps} chunks received)")
        if counter[phase] != step:
            raise ValueError(f"{phase} {what} step {step} out of order: expected step {counter[phase]}")

    def outgoing(self, phase: str, step: int) -> tuple[int, torch.Tensor]:
        """(chunk index, a copy of the chunk) to send at `step` of `phase`."""
        self._check_order(phase, step, self.sent, "send")
        if self.received[phase] < step:
            raise ValueError(f"{phase} send step {step} before receiving step {step - 1}")
        index = send_index(self.rank, self.size, phase, step)
        self.sent[phase] += 1
        return index, self.vector[self._slice(index)].clone()

    def incoming(self, phase: str, step: int, index: int, chunk: torch.Tensor) -> None:
        """Apply the predecessor's chunk: add it (reduce) or take it (gather)."""
        self._check_order(phase, step, self.received, "receive")
        want = recv_index(self.rank, self.size, phase, step)
        if index != want:
            raise ValueError(f"{phase} step {step}: got chunk {index}, rank {self.rank} expects chunk {want}")
        sl = self._slice(index)
        n = sl.stop - sl.start
        if chunk.dim() != 1 or chunk.numel() != n:
            raise ValueError(f"{phase} step {step}: chunk {index} has shape {tuple(chunk.shape)}, "
                             f"expected ({n},)")
        if phase == "reduce":
            self.vector[sl] += chunk.to(self.vector.dtype)
        else:
            self.vector[sl] = chunk.to(self.vector.dtype)
        self.received[phase] += 1
        if phase == "reduce" and self.received[phase] == self.steps:
            self._mean_owned()

    def result(self) -> torch.Tensor:
        """The element-wise mean over the ring (only once both phases are complete)."""
        if not self.done:
            raise ValueError(f"all-reduce not complete: sent {self.sent}, received {self.received} "
                             f"of {self.steps} steps per phase")
        return self.vector.clone()
