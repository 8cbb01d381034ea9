"""Gossip mixing and peer choice (dml_app/gossip.py) as pure functions: exact, no network."""
from __future__ import annotations

import collections

import pytest
import torch

from dml_app.gossip import check_compatible, choose_peer, mix, peer_rng


def sd(w, b) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.tensor(w, dtype=torch.float32), "fc.bias": torch.tensor(b, dtype=torch.float32)}


def test_mix_is_the_exact_average_and_symmetric():
    a = sd([[1.0, 2.0], [3.0, 4.0]], [0.0, 8.0])
    b = sd([[5.0, 6.0], [7.0, 9.0]], [4.0, -1.0])
    out = mix(a, b)
    assert torch.equal(out["fc.weight"], torch.tensor([[3.0, 4.0], [5.0, 6.5]]))
    assert torch.equal(out["fc.bias"], torch.tensor([2.0, 3.5]))
    assert out["fc.weight"].dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(50, generator=g)}
    y = {"w": torch.randn(50, generator=g)}
    assert torch.equal(mix(x, y)["w"], mix(y, x)["w"])
    ref = ((x["w"].double() + y["w"].double()) / 2).float()
    assert torch.equal(mix(x, y)["w"], ref)


def test_mix_weight_and_inputs_untouched():
    a, b = sd([[0.0]], [2.0]), sd([[4.0]], [6.0])
    before = {k: v.clone() for k, v in a.items()}
    assert mix(a, b, weight=0.25)["fc.weight"].item() == 1.0
    assert all(torch.equal(mix(a, b, weight=0.0)[k], a[k]) for k in a)
    assert all(torch.equal(mix(a, b, weight=1.0)[k], b[k]) for k in b)
    assert all(torch.equal(a[k], before[k]) for k in a)
    ints = mix({"n": torch.tensor(3)}, {"n": torch.tensor(6)})
    assert ints["n"].dtype == torch.int64 and ints["n"].item() == 4  # 4.5 rounds half to even


@pytest.mark.parametrize("other, message", [
    ({"fc.weight": torch.zeros(1, 1)}, "keys"),
    ({"fc.weight": torch.zeros(1, 2), "fc.bias": torch.zeros(1)}, "shaped"),
])
def test_mismatched_models_are_refused(other, message):
    with pytest.raises(ValueError, match=message):
        check_compatible(sd([[0.0]], [0.0]), other)
    with pytest.raises(ValueError, match=message):
        mix(sd([[0.0]], [0.0]), other)
    with pytest.raises(ValueError, match="weight"):
        mix(sd([[0.0]], [0.0]), sd([[0.0]], [0.0]), weight=1.5)


def test_choose_peer_is_uniform_reproducible_and_only_from_the_list():
    peers = ["n3", "n1", "n7"]
    picks = [choose_peer(peers, peer_rng(0, "n2")) for _ in range(1)]
    seq1 = [choose_peer(peers, r) for r in [peer_rng(5, "n2")] for _ in range(3000)]
    rng = peer_rng(5, "n2")
    seq2 = [choose_peer(peers, rng) for _ in range(3000)]
    assert picks[0] in peers
    assert seq1 == seq2  # the same seed and name give the same choices
    counts = collections.Counter(seq2)
    assert set(counts) == set(peers) and all(900 < c < 1100 for c in counts.values())
    other = peer_rng(5, "n4")
    assert [choose_peer(peers, other) for _ in range(50)] != seq2[:50]  # distinct per peer
    # the order the peers are listed in does not change the choices
    assert choose_peer(list(reversed(peers)), peer_rng(1, "x")) == choose_peer(peers, peer_rng(1, "x"))
    with pytest.raises(ValueError, match="no peers"):
        choose_peer([], rng)
