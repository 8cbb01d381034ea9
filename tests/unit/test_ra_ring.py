"""Ring all-reduce bookkeeping (dml_app/ring.py) as pure functions: exact, no network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dml_app.ring import (AllReduce, chunk_bounds, flatten, owned_index, recv_index, send_index,
                  unflatten)

# Tensors of 21, 7, 44 and 1 elements: 73 in all, a prime, so for every ring size the
# chunks are uneven and most chunk boundaries fall inside a tensor.
SHAPES = {"conv.weight": (7, 1, 3, 1), "conv.bias": (7,), "fc.weight": (11, 4), "fc.bias": (1,)}


def state_dict(seed: int, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("length, parts", [(0, 1), (0, 3), (1, 1), (1, 4), (10, 3), (61621, 5),
                                           (7, 7), (12, 5), (100, 1), (3, 5)])
def test_chunk_bounds_are_numpy_array_split(length, parts):
    bounds = chunk_bounds(length, parts)
    ref = np.array_split(np.arange(length), parts)
    assert len(bounds) == parts
    assert [stop - start for start, stop in bounds] == [len(r) for r in ref]
    assert [list(range(a, b)) for a, b in bounds] == [r.tolist() for r in ref]
    # contiguous, covering everything: the remainder is never dropped
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(parts - 1))


def test_chunk_bounds_refuses_bad_input():
    for length, parts in ((-1, 2), (5, 0), (5, 1.5), (True, 2)):
        with pytest.raises(ValueError):
            chunk_bounds(length, parts)


@pytest.mark.parametrize("size", [2, 3, 4, 5, 7])
def test_indices_follow_the_ring(size):
    for phase in ("reduce", "gather"):
        for step in range(size - 1):
            sent = [send_index(r, size, phase, step) for r in range(size)]
            assert sorted(sent) == list(range(size))  # one distinct chunk per node per step
            for r in range(size):
                assert recv_index(r, size, phase, step) != sent[r]  # never the chunk it sends
    for r in range(size):
        # the last reduce step hands each node the chunk it owns; it sends it first in the gather
        assert recv_index(r, size, "reduce", size - 2) == owned_index(r, size)
        assert send_index(r, size, "gather", 0) == owned_index(r, size)
    with pytest.raises(ValueError):
        send_index(0, size, "reduce", size - 1)
    with pytest.raises(ValueError):
        send_index(0, size, "scatter", 0)


# Worked out by hand for 3 nodes (ring 0 -> 1 -> 2 -> 0): in the reduce-scatter node r
# first sends its own chunk r, then passes on the partial sum it just received.
RING3 = {("reduce", 0): ([0, 1, 2], [2, 0, 1]), ("reduce", 1): ([2, 0, 1], [1, 2, 0]),
         ("gather", 0): ([1, 2, 0], [0, 1, 2]), ("gather", 1): ([0, 1, 2], [2, 0, 1])}


def test_indices_for_three_nodes_by_hand():
    for (phase, step), (send, recv) in RING3.items():
        assert [send_index(r, 3, phase, step) for r in range(3)] == send, (phase, step)
        assert [recv_index(r, 3, phase, step) for r in range(3)] == recv, (phase, step)
    assert [owned_index(r, 3) for r in range(3)] == [1, 2, 0]


@pytest.mark.parametrize("size", [2, 3, 4, 5, 7])
def test_indices_simulated_ring_ends_with_every_sum_everywhere(size):
    # Each node holds, per chunk, the set of ranks whose contribution it has summed.
    held = [[{r} for _ in range(size)] for r in range(size)]
    for step in range(size - 1):
        msgs = [(r, send_index(r, size, "reduce", step), set(held[r][send_index(r, size, "reduce", step)]))
                for r in range(size)]
        for src, chunk, part in msgs:
            dst = (src + 1) % size
            assert recv_index(dst, size, "reduce", step) == chunk, "the successor expects another chunk"
            held[dst][chunk] |= part
    everyone = set(range(size))
    for r in range(size):
        assert held[r][owned_index(r, size)] == everyone, f"node {r} does not own a complete sum"
    for step in range(size - 1):
        msgs = [(r, send_index(r, size, "gather", step), set(held[r][send_index(r, size, "gather", step)]))
                for r in range(size)]
        for src, chunk, part in msgs:
            dst = (src + 1) % size
            assert part == everyone, f"node {src} passes on an incomplete chunk {chunk} at gather step {step}"
            assert recv_index(dst, size, "gather", step) == chunk
            held[dst][chunk] = part
    assert all(h == everyone for node in held for h in node)


def test_flatten_unflatten_round_trip_keeps_dtypes():
    sd = state_dict(0)
    sd["bn.num_batches_tracked"] = torch.tensor(12)
    vec, layout = flatten(sd)
    assert vec.dtype == torch.float32 and vec.numel() == sum(t.numel() for t in sd.values())
    back = unflatten(vec, layout)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k])
    with pytest.raises(ValueError):
        unflatten(vec[:-1], layout)
    sd64 = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.ones(2)}
    assert flatten(sd64)[0].dtype == torch.float64


def simulate(vectors: list[torch.Tensor], order: str = "forward") -> list[AllReduce]:
    """Run one all-reduce between in-memory nodes, step by step as the driver does."""
    size = len(vectors)
    nodes = [AllReduce(v, rank, size) for rank, v in enumerate(vectors)]
    ranks = list(range(size)) if order == "forward" else list(reversed(range(size)))
    for phase in ("reduce", "gather"):
        for step in range(size - 1):
            for r in ranks:  # within a step, the order of the nodes must not matter
                index, chunk = nodes[r].outgoing(phase, step)
                nodes[(r + 1) % size].incoming(phase, step, index, chunk)
    return nodes


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("order", ["forward", "backward"])
def test_all_reduce_gives_every_node_the_exact_mean(size, order):
    sds = [state_dict(100 + k) for k in range(size)]
    vecs = [flatten(sd)[0] for sd in sds]
    layout = flatten(sds[0])[1]
    nodes = simulate(vecs, order)
    expected = {k: sum(sd[k].double() for sd in sds) / size for k in sds[0]}
    results = [n.result() for n in nodes]
    for res in results:
        assert torch.equal(res, results[0])  # the same bytes on every node
        out = unflatten(res, layout)
        err = max(float((out[k].double() - expected[k]).abs().max()) for k in expected)
        assert err <= 1e-6, err
    assert vecs[0].numel() == 73


def test_every_element_is_reduced_including_the_remainder():
    size = 3
    vecs = [torch.full((10,), float(k + 1)) for k in range(size)]  # 10 = 4 + 3 + 3
    for res in (n.result() for n in simulate(vecs)):
        assert torch.equal(res, torch.full((10,), 2.0))


def test_inputs_are_not_modified():
    v = torch.arange(5, dtype=torch.float32)
    simulate([v, v * 2])
    assert torch.equal(v, torch.arange(5, dtype=torch.float32))


def test_out_of_order_and_wrong_chunks_are_refused():
    a, b, c = (AllReduce(torch.arange(7, dtype=torch.float32), r, 3) for r in range(3))
    with pytest.raises(ValueError, match="out of order"):
        a.outgoing("reduce", 1)
    with pytest.raises(ValueError, match="reduce-scatter is complete"):
        a.outgoing("gather", 0)
    idx, chunk = a.outgoing("reduce", 0)
    with pytest.raises(ValueError, match="expects chunk"):
        b.incoming("reduce", 0, (idx + 1) % 3, chunk)
    with pytest.raises(ValueError, match="shape"):
        b.incoming("reduce", 0, idx, chunk[:-1])
    with pytest.raises(ValueError, match="before receiving"):
        c.outgoing("reduce", 0)
        c.outgoing("reduce", 1)
    b.incoming("reduce", 0, idx, chunk)
    with pytest.raises(ValueError, match="out of order"):
        b.incoming("reduce", 0, idx, chunk)  # a chunk applied twice would double-count
    with pytest.raises(ValueError, match="not complete"):
        b.result()
    with pytest.raises(ValueError):
        AllReduce(torch.zeros(3), 3, 3)
    with pytest.raises(ValueError):
        AllReduce(torch.zeros(3, dtype=torch.int64), 0, 2)
