"""Ring all-reduce is exact: after ONE all-reduce every node holds the mean of all nodes'
weights, for rings of 2, 3 and 5 real ra_peer processes driven by the real RaManager
over HTTP on loopback, chunks travelling as safetensors.

The nodes start from different known weights (`init: per_rank`: rank k is LeNet-5
seeded with seed + k) and skip training (`epoch: 0`). The model is LeNet-5 with 9
classes: 61,621 parameters (7 x 8803), so the vector splits unevenly for every ring
size here, and its last layer (756 weights, 9 biases) is a multiple of none of 2 and 5.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from tests.support.workflow import run_workflow
from tests.support.peers import loopback_run, tiny_dataset
from dml_app import net
from dml_app import nns
from controller.ra_run import RaManager

SEED = 7


def expected_mean(meta: dict, size: int) -> dict[str, torch.Tensor]:
    """The mean, in float64, of the initial models of ranks 0..size-1 (ra_peer's per_rank init)."""
    models = []
    for rank in range(size):
        torch.manual_seed(SEED + rank)
        models.append(nns.build_model(meta).state_dict())
    return {k: sum(m[k].double() for m in models) / size for k in models[0]}, models


@pytest.mark.parametrize("size", [2, 3, 5])
def test_one_all_reduce_gives_every_node_the_exact_mean(scratch, size):
    data = tiny_dataset(scratch / "dataset", num_classes=9)
    meta = json.loads((data / "meta.json").read_text())
    names = [f"rx{size}{k}" for k in range(1, size + 1)]
    mean, initial = expected_mean(meta, size)
    total = sum(t.numel() for t in mean.values())
    assert total == 61621 and total % size != 0 and mean["classifier.5.bias"].numel() % 2 == 1
    # the nodes really start apart, so the test is not trivially true
    assert float((initial[0]["classifier.5.weight"] - initial[1]["classifier.5.weight"]).abs().max()) > 0.05

    with loopback_run(RaManager, "ra_peer", names, scratch, data) as (manager, procs):
        node_list = names[1:] + names[:1]   # the ring is the structure's, not the names' order
        # EdgeTB's ring: node_list[i] sends to node_list[i - 1]; the only links are those
        links = {n: [{"dest": node_list[i - 1], "bw": "1gbit"}] for i, n in enumerate(node_list)}
        (scratch / "links.json").write_text(json.dumps(links))
        said = []
        summary = run_workflow(manager.tb, manager, scratch, alg="ra", root=None, timeout_s=60, said=said,
                               structure={"sync": 1, "seed": SEED, "init": "per_rank",
                                          "node_list": [{"name": n, "epoch": 0} for n in node_list]},
                               dataset={n: {"train_len": 1, "test_len": 1, "batch_size": 4} for n in names})
        travel = node_list[:1] + node_list[:0:-1] + node_list[:1]   # from node_list[0], backwards
        assert f"driving 1 round(s) over the ring {' -> '.join(travel)}" in said[2], said
        ring = node_list
        assert "error" not in summary, summary["error"]

        got = {}
        for rank, name in enumerate(ring):
            body = procs[name].call("GET", "/ra/weights").content
            got[name], info = net.unpack_weights(body)
            assert info == {"name": name, "round": 1}
        for name, sd in got.items():
            assert set(sd) == set(mean)
            err = max(float((sd[k].double() - mean[k]).abs().max()) for k in mean)
            assert err <= 1e-6, f"{name}: max abs error {err}"
            assert all(torch.equal(sd[k], got[ring[0]][k]) for k in sd)  # the same bytes everywhere

        # each node sent 2 * (size - 1) chunks of about 1/size of the model, nothing else
        chunk_bytes = 4 * (total // size)
        for name in names:
            assert 2 * (size - 1) * chunk_bytes <= summary["bytes_sent"][name] < 2 * size * (chunk_bytes + 4096)
            log = (scratch / "runs").glob(f"*-ra/{name}.log")
            text = next(log).read_text()
            assert re.search(r"Aggregate: accuracy=\d\.\d{4}, round=1,", text)
            assert "Train: loss=" not in text  # epoch 0: the all-reduce alone
        assert summary["algorithm"] == "ra" and summary["rounds"] == 1
