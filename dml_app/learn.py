"""Local training and evaluation loops shared by the roles (plain torch, CPU)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def train_epochs(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int,
                 batch_size: int, lr: float, momentum: float = 0.9, seed: int = 0) -> float:
    """SGD over (x, y) for `epochs` passes; returns the mean loss of the last pass.

    The shuffle order comes from `seed` so a run is reproducible; the optimizer is new
    on every call, as in FedAvg where a client starts each round from the global model.
    """
    if len(y) == 0:
        raise ValueError("no training samples: the node's dataset conf has train_len 0")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1 (got {epochs}, {batch_size})")
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.ascontiguousarray(y))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last = total / count
    return last


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray,
             batch_size: int = 500) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) over (x, y)."""
    if len(y) == 0:
        raise ValueError("no test samples: the node's dataset conf has test_len 0")
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.ascontiguousarray(y))
    model.eval()
    correct, loss_sum = 0, 0.0
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for i in range(0, len(yt), batch_size):
        out = model(xt[i:i + batch_size])
        loss_sum += float(loss_fn(out, yt[i:i + batch_size]))
        correct += int((out.argmax(1) == yt[i:i + batch_size]).sum())
    return correct / len(yt), loss_sum / len(yt)
