"""E-tree, exactly: real el_peer processes talking HTTP on loopback.

A 3-layer tree where et1 is in every layer (its own father and child) and et1 and et3
have no direct link (et2 forwards between them both ways). The structure conf's test
knob `test_known_weights_seed` makes trainers answer known weights instead of training,
so the top's final model must equal, to the bit, the nested weighted average of what
the trainers sent in the last round, and et2's log must show every forward. The confs
are EdgeTB's (per-layer lists, "self", "top", `forward`), compared with ones written
by hand.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from tests.support.procs import NodeProc, StubController, wait_until
from dml_tool import el_structure_conf
from dml_app import net
from dml_app import nns
from dml_tool import splitter
from dml_app.etree import known_weights, tree_average
from dml_app.node_data import load_node_data

SEED = 11
NAMES = ["et1", "et2", "et3", "et4"]
STRUCTURE = {"node_list": [
    {"name": "et1", "layer": 3, "sync": 2, "child_num": 2},
    {"name": "et1", "layer": 2, "sync": 2, "child_num": 2},
    {"name": "et3", "layer": 2, "sync": 3, "child_num": 2},
    {"name": "et1", "layer": 1, "epoch": 1},
    {"name": "et2", "layer": 1, "epoch": 1},
    {"name": "et3", "layer": 1, "epoch": 1},
    {"name": "et4", "layer": 1, "epoch": 1},
], "test_known_weights_seed": SEED}
# a chain et1 <-> et2 <-> et3 <-> et4: et1 and et3 talk through et2
LINKS = {"et1": [{"dest": "et2", "bw": "100mbit"}],
         "et2": [{"dest": "et1", "bw": "100mbit"}, {"dest": "et3", "bw": "100mbit"}],
         "et3": [{"dest": "et2", "bw": "100mbit"}, {"dest": "et4", "bw": "100mbit"}],
         "et4": [{"dest": "et3", "bw": "100mbit"}]}
DATASET = {"et1": {"train_len": 1, "train_start_index": 1, "test_len": 2, "test_start_index": 1},
           "et2": {"train_len": 3, "train_start_index": 2},
           "et3": {"train_len": 2, "train_start_index": 5},
           "et4": {"train_len": 5, "train_start_index": 7}}
# trainings per trainer = product of its ancestors' sync: 2 x 2 under et1@2, 2 x 3 under et3@2
TRAININGS = {"et1": 4, "et2": 4, "et3": 6, "et4": 6}


@pytest.fixture(scope="module")
def tree(module_scratch):
    """Run the tree once; yield (nodes, dataset dir); every process stopped afterwards."""
    ds = module_scratch / "dataset"
    splitter.split(source="mnist-subset", out=str(ds), train_parts=20, test_parts=5,
                   partition="iid", seed=3)
    ctl = StubController()
    nodes: dict[str, NodeProc] = {}
    try:
        for name in NAMES:
            nodes[name] = NodeProc("el_peer", name, log_dir=module_scratch / "log", dataset_dir=ds,
                                   ctl_address=ctl.address)
        info = {"emulated_node": {n: {"ip": "127.0.0.1", "port": p.port} for n, p in nodes.items()}}
        for fname, obj in (("node_info.json", info), ("links.json", LINKS), ("el.json", STRUCTURE)):
            (module_scratch / fname).write_text(json.dumps(obj))
        el_structure_conf.write_confs(str(module_scratch / "el.json"), str(module_scratch / "links.json"),
                                      str(module_scratch / "node_info.json"), str(module_scratch / "conf"))
        confs = {}
        for name, node in nodes.items():
            node.wait_ready()
            confs[name] = conf = json.loads((module_scratch / "conf" / f"{name}_structure.conf").read_text())
            node.call("POST", "/conf/structure", json=conf)
            node.call("POST", "/conf/dataset", json={**DATASET[name], "batch_size": 32})
        nodes["et1"].call("GET", "/start")
        wait_until(lambda: ctl.finished.is_set() or _failed(nodes), 90, "et1 to call /finish")
        assert ctl.finished.is_set(), {n: p.output() for n, p in nodes.items()}
        yield nodes, ds, confs
    finally:
        for node in nodes.values():
            node.stop()
        ctl.close()


def _failed(nodes: dict[str, NodeProc]) -> bool:
    return any(p.proc.poll() is not None for p in nodes.values())


def _log(node: NodeProc) -> str:
    return node.call("GET", "/log").text


def test_top_model_is_the_nested_weighted_average_to_the_bit(tree):
    nodes, ds, _ = tree
    r = nodes["et1"].call("GET", "/el/model")
    got, meta = net.unpack_weights(r.content)
    assert meta == {"layer": 3, "round": 2, "name": "et1"}

    data = {n: load_node_data(str(ds), DATASET[n]) for n in NAMES}
    template = nns.build_model(data["et1"].meta).state_dict()
    leaf = {n: (known_weights(template, n, SEED, TRAININGS[n]), data[n].train_samples) for n in NAMES}
    assert [leaf[n][1] for n in NAMES] == [200, 600, 400, 1000]
    assert set(got) == set(template)
    floating = [k for k in template if template[k].is_floating_point()]
    assert floating
    for k in floating:
        assert got[k].dtype == template[k].dtype, k
        w = {n: leaf[n][0][k].double() for n in NAMES}
        # float64 references written out here: the two edge means, then their mean
        # weighted by 800 and 1400 samples; and the flat mean over 2200 samples
        e12 = (w["et1"] * 200 + w["et2"] * 600) / 800
        e34 = (w["et3"] * 400 + w["et4"] * 1000) / 1400
        nested = (e12 * 800 + e34 * 1400) / 2200
        flat = (w["et1"] * 200 + w["et2"] * 600 + w["et3"] * 400 + w["et4"] * 1000) / 2200
        assert (got[k].double() - nested).abs().max().item() <= 1e-6, k
        assert (got[k].double() - flat).abs().max().item() <= 1e-6, k
        assert not torch.equal(got[k], leaf["et1"][0][k]), k
    # and, bit for bit, the nodes computed what etree.tree_average computes in float32
    expected, samples = tree_average([[leaf["et1"], leaf["et2"]], [leaf["et3"], leaf["et4"]]])
    assert samples == 2200 and all(torch.equal(got[k], expected[k]) for k in expected)


def test_the_confs_are_edgetbs(tree):
    """What the nodes ran on: EdgeTB's per-layer lists, "self", "top", sync 0 on layer 1, and
    `forward` to the next hop over the chain (written by hand)."""
    nodes, _, confs = tree
    a = {n: f"127.0.0.1:{p.port}" for n, p in nodes.items()}
    assert confs == {
        "et1": {"layer": [1, 2, 3], "father_node": ["self", "self", "top"],
                "child_node": [[], ["self", "et2"], ["self", "et3"]], "sync": [0, 2, 2], "epoch": 1,
                "test_known_weights_seed": SEED, "connect": {"et2": a["et2"]},
                "forward": {"et3": a["et2"], "et4": a["et2"]}},
        "et2": {"layer": [1], "father_node": ["et1"], "child_node": [[]], "sync": [0], "epoch": 1,
                "test_known_weights_seed": SEED, "connect": {"et1": a["et1"], "et3": a["et3"]},
                "forward": {"et4": a["et3"]}},
        "et3": {"layer": [1, 2], "father_node": ["self", "et1"], "child_node": [[], ["self", "et4"]],
                "sync": [0, 3], "epoch": 1, "test_known_weights_seed": SEED,
                "connect": {"et2": a["et2"], "et4": a["et4"]}, "forward": {"et1": a["et2"]}},
        "et4": {"layer": [1], "father_node": ["et3"], "child_node": [[]], "sync": [0], "epoch": 1,
                "test_known_weights_seed": SEED, "connect": {"et3": a["et3"]},
                "forward": {"et1": a["et3"], "et2": a["et3"]}},
    }


def test_the_forwarding_node_logs_every_forward(tree):
    nodes, _, _ = tree
    log = _log(nodes["et2"])
    fwd = re.findall(r"Forward: from=(\w+), to=(\w+), round=(\d+), layer=(2), kind=(\w+), next=(\w+),", log)
    # each top round: et1@3 sends down to et3@2 and et3@2 answers up, both through et2
    assert sorted(fwd) == sorted([("et1", "et3", str(r), "2", "down", "et3") for r in (1, 2)]
                                 + [("et3", "et1", str(r), "2", "up", "et1") for r in (1, 2)])
    # et2 is also a trainer under et1@2, which reaches it directly: that is no forward
    for n in ("et1", "et3", "et4"):
        assert "Forward:" not in _log(nodes[n])


def test_layers_run_their_sync_rounds(tree):
    nodes, _, _ = tree
    top = _log(nodes["et1"])
    assert re.findall(r"Aggregate: accuracy=[\d.]+, round=(\d+), layer=3,", top) == ["1", "2"]
    assert re.findall(r"Layer aggregate: layer=2, round=(\d+), children=2, samples=800,", top) == \
        ["1", "2", "3", "4"]
    mid = _log(nodes["et3"])
    assert re.findall(r"Layer aggregate: layer=2, round=(\d+), children=2, samples=1400,", mid) == \
        [str(r) for r in range(1, 7)]
    for n, k in TRAININGS.items():
        assert re.findall(r"known weights k=(\d+),", _log(nodes[n]))[-1] == str(k)


def test_bad_messages_are_refused_clearly(tree):
    nodes, _, _ = tree
    sd = nns.build_model({"name": "mnist", "input_shape": [1, 28, 28]}).state_dict()

    def post(node: str, meta: dict, body: bytes | None = None) -> net.HttpError:
        with pytest.raises(net.HttpError) as e:
            nodes[node].call("POST", "/el/message", data=body or net.pack_weights(sd, meta),
                             headers={"Content-Type": "application/octet-stream"})
        return e.value

    e = post("et3", {}, b"not safetensors")
    assert e.status == 400 and "safetensors" in e.message
    e = post("et3", {"kind": "up", "src": "et4", "dst": "et3", "layer": 1, "round": 1, "samples": 5})
    assert e.status == 409 and "not waiting" in e.message          # that round is over
    e = post("et4", {"kind": "down", "src": "et2", "dst": "et4", "layer": 1, "round": 9})
    assert e.status == 409 and "not this node's father" in e.message
    e = post("et2", {"kind": "down", "src": "et1", "dst": "et9", "layer": 1, "round": 1})
    assert e.status == 400 and "cannot forward to et9: no way to et9" in e.message
    e = post("et2", {"kind": "down", "src": "et1", "dst": "et4", "layer": 1, "round": 1, "hops": 64})
    assert e.status == 400 and "has passed 64 nodes" in e.message  # a loop would end here
    # a forward whose destination refuses: the refusal comes back through the forwarder
    e = post("et2", {"kind": "up", "src": "et1", "dst": "et3", "layer": 1, "round": 1, "samples": 3})
    assert e.status == 409 and "forwarding to et3 failed" in e.message
    # two hops through forward tables (et1 -> et2 -> et3 -> et4): et4 refuses, the answer comes back
    e = post("et1", {"kind": "down", "src": "et1", "dst": "et4", "layer": 1, "round": 99})
    assert e.status == 409 and "forwarding to et2 failed" in e.message and "not this node's father" in e.message
    with pytest.raises(net.HttpError) as e:
        nodes["et2"].call("GET", "/start")
    assert e.value.status == 404                                     # only the top starts
