"""Per-node confs written by hand in EdgeTB's format (as EdgeTB's dml_tool scripts write
them, with none of our extra keys) are taken by the roles here: FL aggregator and
trainer, gossip peer, ring all-reduce node and E-tree peer, each in-process on its real
Flask app; and a ring all-reduce runs end to end on EdgeTB confs (real ra_peer
processes, the real RaManager following next_name over HTTP)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.support.procs import TOKEN
from tests.support.peers import loopback_run, tiny_dataset
from dml_app import net
from dml_app.el_peer import ElPeer
from dml_app.fl_aggregator import FlAggregator
from dml_app.fl_trainer import FlTrainer
from dml_app.gl_peer import GlPeer
from dml_app.ra_peer import RaPeer
from dml_app.runtime import Runtime
from controller import auto
from controller.ra_run import RaManager

HDR = {net.TOKEN_HEADER: TOKEN}
A = "127.0.0.1:9"


@pytest.fixture
def role(scratch):
    """role(cls, name) -> the Flask test client of that role running as node `name`."""
    threads = torch.get_num_threads()
    tiny_dataset(scratch / "ds", num_classes=10)
    made: list[Runtime] = []

    def make(cls, name: str):
        rt = Runtime(cls.__name__.lower(), env={"NET_NODE_NAME": name, "EDGE_TB_TOKEN": TOKEN, "DML_PORT": "0",
                                                "DML_LOG_DIR": str(scratch / "log"),
                                                "DML_DATASET_DIR": str(scratch / "ds")})
        made.append(rt)
        cls(rt)
        return rt, rt.app.test_client()
    try:
        yield make
    finally:
        for rt in made:
            rt.close()
        torch.set_num_threads(threads)


def push(client, conf) -> tuple[int, str]:
    r = client.post("/conf/structure", json=conf, headers=HDR)
    return r.status_code, r.get_data(as_text=True)


def test_fl_roles_take_edgetbs_confs(role):
    _, agg = role(FlAggregator, "a1")
    assert push(agg, {"trainer_fraction": 0.5, "sync": 3, "child_node": ["t1", "t2"],
                      "connect": {"t1": A, "t2": "127.0.0.1:10", "x9": "127.0.0.1:11"}})[0] == 200
    _, trainer = role(FlTrainer, "t1")
    assert push(trainer, {"epoch": 2, "father_node": "a1", "connect": {"a1": A}})[0] == 200


def test_the_gossip_peer_takes_edgetbs_connect_with_every_link(role):
    rt, client = role(GlPeer, "g1")
    # EdgeTB's connect: every link of the node, here also to x9, which is no gossip peer;
    # without our "peers" key every node of connect is a peer
    assert push(client, {"epoch": 1, "sync": 2, "connect": {"g2": A, "x9": "127.0.0.1:10"}})[0] == 200
    assert rt.structure["peers"] == ["g2", "x9"]
    assert push(client, {"epoch": 1, "sync": 2, "connect": {"g2": A, "x9": "127.0.0.1:10"},
                         "peers": ["g2"]})[0] == 200
    assert rt.structure["peers"] == ["g2"]


def test_the_ring_node_takes_edgetbs_next_name(role):
    rt, client = role(RaPeer, "r2")
    assert push(client, {"epoch": 1, "sync": 2, "next_name": "r1", "connect": {"r1": A, "r3": A}})[0] == 200
    status, text = push(client, {"epoch": 1, "sync": 2, "next_name": "r3", "connect": {"r1": A}})
    assert status == 400 and "no address for next_name 'r3' (no link from r2 to r3)" in text


# et1 of the E-tree example (et1 in all 3 layers; et3 reached through et2), by hand
ET1 = {"layer": [1, 2, 3], "father_node": ["self", "self", "top"], "child_node": [[], ["self", "et2"], ["self", "et3"]],
       "sync": [0, 2, 2], "epoch": 1, "connect": {"et2": A}, "forward": {"et3": A, "et4": A}}


def test_the_etree_peer_takes_edgetbs_lists(role):
    rt, client = role(ElPeer, "et1")
    assert push(client, ET1)[0] == 200
    assert rt.structure["_layers"] == {
        1: {"father": "self", "children": [], "epoch": 1, "lr": 0.05},
        2: {"father": "self", "children": ["self", "et2"], "sync": 2, "round_timeout_s": 600.0},
        3: {"father": None, "children": ["self", "et3"], "sync": 2, "round_timeout_s": 600.0}}
    # "top" makes et1 the root: /start is its (409 here only for want of a dataset conf);
    # a node whose highest father is not "top" has no /start
    r = client.get("/start", headers=HDR)
    assert r.status_code == 409 and "cannot start before /conf/dataset" in r.get_data(as_text=True)
    rt2, mid = role(ElPeer, "et3")
    assert push(mid, {"layer": [1, 2], "father_node": ["self", "et1"], "child_node": [[], ["self", "et4"]],
                      "sync": [0, 3], "epoch": 1, "connect": {"et2": A, "et4": A}, "forward": {"et1": A}})[0] == 200
    assert rt2.structure["_layers"][2]["father"] == "et1"
    assert mid.get("/start", headers=HDR).status_code == 404


@pytest.mark.parametrize("change, message", [
    ({"father_node": ["self", "top", "top"]}, "father_node[1] (layer 2) must be a node name, 'self' or, for the "
                                              "node's highest layer only, 'top'"),
    ({"sync": [1, 2, 2]}, "layer 1 trains: its child_node entry is [] and its sync 0"),
    ({"child_node": [["et2"], ["self", "et2"], ["self", "et3"]]}, "layer 1 trains"),
    ({"sync": [0, 2]}, "one entry per layer each, got lengths [3, 3, 3, 2]"),
    ({"layer": [2, 1, 3]}, "from the node's lowest layer to its highest"),
    ({"forward": {"et4": A}}, "no way to 'et3': it is in neither 'connect' nor 'forward'"),
    ({"forward": {"et3": "et2"}}, "forward['et3']: expected 'ip:port'"),
    ({"epoch": None}, "'epoch' (the node is in layer 1)"),
    ({"child_node": [[], [], ["self", "et3"]]}, "child_node[1] (layer 2) is empty"),
    ({"layers": {}, "layer": None}, "missing or bad key 'layer'"),
])
def test_the_etree_peer_refuses_confs_off_edgetbs_format(role, change, message):
    rt, client = role(ElPeer, "et1")
    status, text = push(client, {**ET1, **change})
    assert status == 400 and message in text, text
    assert rt.structure is None


def test_a_ring_runs_on_edgetbs_confs(scratch):
    """EdgeTB's ra confs for node_list [ea1, ea2, ea3]: each sends to the entry before it.
    No "rank": the controller follows next_name from the smallest name, or from EdgeTB's
    pos 0 where the confs carry it."""
    data = tiny_dataset(scratch / "dataset", num_classes=10)
    names = ["ea1", "ea2", "ea3"]
    next_name = {"ea1": "ea3", "ea2": "ea1", "ea3": "ea2"}   # EdgeTB's rule, by hand
    with loopback_run(RaManager, "ra_peer", names, scratch, data) as (manager, procs):
        addr = {n: f"127.0.0.1:{p.port}" for n, p in procs.items()}
        (scratch / "links.json").write_text(json.dumps({n: [{"dest": d, "bw": "1gbit"}] for n, d in next_name.items()}))
        (scratch / "ra_dataset.json").write_text(json.dumps({n: {"train_len": 1, "test_len": 1, "batch_size": 4}
                                                             for n in names}))

        def write(confs):
            manager.conf_dir.mkdir(parents=True, exist_ok=True)
            for n, c in confs.items():
                (manager.conf_dir / f"{n}_structure.conf").write_text(json.dumps(c))

        broken = {n: {"epoch": 1, "sync": 2, "next_name": d, "connect": {d: addr[d]}}
                  for n, d in {**next_name, "ea2": "ea3"}.items()}
        write(broken)
        with pytest.raises(ValueError, match="must make one ring"):
            manager.algo.ring_plan()

        # EdgeTB's pos (here ea2 first) says where the ring starts; ring_size must be its length
        with_pos = {n: {"epoch": 1, "sync": 2, "next_name": d, "connect": {d: addr[d]}, "ring_size": 3,
                        "pos": ["ea2", "ea1", "ea3"].index(n)} for n, d in next_name.items()}
        write(with_pos)
        assert manager.algo.ring_plan()[0] == ["ea2", "ea1", "ea3"]
        write({n: {**c, "ring_size": 4} for n, c in with_pos.items()})
        with pytest.raises(ValueError, match="say ring_size 4, but their next_name make a ring of 3"):
            manager.algo.ring_plan()

        edgetb = {n: {"epoch": 1, "sync": 2, "next_name": d, "connect": {d: addr[d]}} for n, d in next_name.items()}
        said: list[str] = []
        summary = auto.drive(manager.tb, manager, root=None, dataset_json=scratch / "ra_dataset.json",
                             timeout_s=60, write_structure=lambda: write(edgetb), say=said.append)
        assert "driving 2 round(s) over the ring ea1 -> ea3 -> ea2 -> ea1" in said[2], said
        assert "error" not in summary, summary
        weights = [net.unpack_weights(procs[n].call("GET", "/ra/weights").content)[0] for n in names]
        assert all(torch.equal(w[k], weights[0][k]) for w in weights[1:] for k in weights[0])
    assert summary["rounds"] == 2
