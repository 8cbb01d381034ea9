"""FedAvg and client selection as pure functions: exact results, no network."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dml_app.algorithms import fedavg, select_clients, weighted_mean


def sd(w: list[list[float]], b: list[float]) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.tensor(w, dtype=torch.float32),
            "fc.bias": torch.tensor(b, dtype=torch.float32)}


def test_weighted_by_samples_exact():
    a = sd([[1.0, 2.0], [3.0, 4.0]], [0.0, 8.0])
    b = sd([[5.0, 6.0], [7.0, 8.0]], [4.0, 0.0])
    out = fedavg([(a, 1), (b, 3)])  # weights 1/4 and 3/4
    assert torch.equal(out["fc.weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(out["fc.bias"], torch.tensor([3.0, 2.0]))
    assert out["fc.weight"].dtype == torch.float32


def test_equal_samples_is_plain_mean_and_inputs_untouched():
    a = sd([[0.0]], [2.0])
    b = sd([[1.0]], [4.0])
    before = {k: v.clone() for k, v in a.items()}
    out = fedavg([(a, 50), (b, 50)])
    assert out["fc.weight"].item() == 0.5 and out["fc.bias"].item() == 3.0
    assert all(torch.equal(a[k], before[k]) for k in a)


def test_matches_numpy_float64_reference():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 5)).astype(np.float32) for _ in range(4)]
    counts = [100, 37, 250, 1]
    total = sum(counts)
    ref = np.zeros((3, 5))
    for a, n in zip(arrays, counts):
        ref += a.astype(np.float64) * (n / total)
    out = fedavg([({"w": torch.from_numpy(a)}, n) for a, n in zip(arrays, counts)])
    assert np.array_equal(out["w"].numpy(), ref.astype(np.float32))


def test_order_of_uploads_does_not_matter():
    rng = np.random.default_rng(1)
    results = [({"w": torch.from_numpy(rng.normal(size=(64,)).astype(np.float32))}, int(n))
               for n in rng.integers(1, 1000, size=6)]
    a = fedavg(results)["w"]
    b = fedavg(list(reversed(results)))["w"]
    assert torch.allclose(a, b, rtol=0, atol=1e-7)


def test_single_result_and_zero_weight_result():
    a = sd([[1.5, -2.0]], [0.25])
    b = sd([[100.0, 100.0]], [100.0])
    assert all(torch.equal(fedavg([(a, 7)])[k], a[k]) for k in a)
    out = fedavg([(a, 10), (b, 0)])  # a trainer with no samples has no say
    assert all(torch.equal(out[k], a[k]) for k in a)


def test_integer_buffers_are_rounded_and_keep_dtype():
    a = {"bn.num_batches_tracked": torch.tensor(10), "w": torch.tensor([1.0])}
    b = {"bn.num_batches_tracked": torch.tensor(13), "w": torch.tensor([2.0])}
    out = fedavg([(a, 1), (b, 1)])
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.num_batches_tracked"].item() == 12  # 11.5 rounds half to even


@pytest.mark.parametrize("results, message", [
    ([], "at least one"),
    ([({"w": torch.zeros(2)}, -1)], "n_samples=-1"),
    ([({"w": torch.zeros(2)}, 1.5)], "n_samples=1.5"),
    ([({"w": torch.zeros(2)}, 0)], "n_samples=0"),
    ([({"w": torch.zeros(2)}, 1), ({"v": torch.zeros(2)}, 1)], "different keys"),
    ([({"w": torch.zeros(2)}, 1), ({"w": torch.zeros(3)}, 1)], "shape"),
])
def test_bad_input_is_refused_with_a_clear_message(results, message):
    with pytest.raises(ValueError, match=message):
        fedavg(results)


def test_weighted_mean():
    assert weighted_mean([(1.0, 1), (4.0, 3)]) == 3.25
    with pytest.raises(ValueError):
        weighted_mean([(1.0, 0)])


@pytest.mark.parametrize("n, fraction, k", [(4, 1.0, 4), (4, 0.5, 2), (10, 0.2, 2), (3, 0.1, 1),
                                            (7, 0.3, 2), (5, 0.01, 1)])
def test_select_clients_count(n, fraction, k):
    clients = [f"n{i}" for i in range(n)]
    chosen = select_clients(clients, fraction, random.Random(0))
    assert len(chosen) == k == max(1, round(fraction * n))
    assert len(set(chosen)) == k and set(chosen) <= set(clients)
    assert chosen == [c for c in clients if c in chosen]  # the conf's order


def test_select_clients_is_reproducible_from_the_seed():
    clients = [f"n{i}" for i in range(20)]
    r1, r2 = random.Random(42), random.Random(42)
    seq1 = [select_clients(clients, 0.25, r1) for _ in range(10)]
    seq2 = [select_clients(clients, 0.25, r2) for _ in range(10)]
    assert seq1 == seq2
    assert len({tuple(s) for s in seq1}) > 1  # rounds differ from each other


def test_select_clients_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        select_clients(["a"], 0.0, random.Random(0))
    with pytest.raises(ValueError, match="no clients"):
        select_clients([], 0.5, random.Random(0))
