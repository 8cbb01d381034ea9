"""dml_tool/ra_structure_conf.py: EdgeTB's ring (node_list[i] sends to node_list[i - 1]) and its links."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.procs import DML_TOOL, ROOT
from tests.support.peers import link_dests, node_addrs, shipped_confs
from dml_tool import conf_utils as cu
from dml_tool import ra_structure_conf
from dml_app.ra_peer import check_position

NODES = ["n1", "n2", "n3", "n4", "n5"]
ADDRS, INFO = node_addrs(NODES)


def links_to(next_names: dict) -> dict:
    """links.json with exactly one link per node: to the node named."""
    return {n: [{"dest": d, "bw": "10mbit"}] for n, d in next_names.items()}


def build(structure, links) -> dict:
    return ra_structure_conf.build_confs(structure, link_dests(links), ADDRS, file="ra.json")


def peers(names) -> dict:
    return {"sync": 1, "node_list": [{"name": n, "epoch": 1} for n in names]}


# EdgeTB's rule, written out by hand: node_list[i] sends to node_list[i - 1], entry 0 to the last.
RING3 = {"n3": "n5", "n1": "n3", "n5": "n1"}                       # node_list n3, n1, n5
RING5 = {"n1": "n5", "n2": "n1", "n3": "n2", "n4": "n3", "n5": "n4"}  # node_list n1..n5


def test_the_shipped_example_runs_on_the_shipped_links(scratch):
    confs = shipped_confs(ra_structure_conf, "ra", scratch, NODES)
    # ra_structure.json lists n1, n5, n4, n3, n2: each sends to the entry before it
    want = {"n1": "n2", "n5": "n1", "n4": "n5", "n3": "n4", "n2": "n3"}
    assert {n: c["next_name"] for n, c in confs.items()} == want
    links = json.loads((ROOT / "links.json").read_text())
    for n, conf in confs.items():
        assert conf["next_name"] in conf["connect"]
        assert sorted(conf["connect"]) == sorted(l["dest"] for l in links[n])   # every link, as EdgeTB
    assert set(json.loads((DML_TOOL / "ra_structure.json").read_text())) == {"sync", "node_list"}


@pytest.mark.parametrize("order, next_names", [(["n3", "n1", "n5"], RING3), (NODES, RING5)])
def test_next_name_is_the_entry_before_as_in_edgetb(order, next_names):
    confs = build(peers(order), links_to(next_names))
    assert {n: c["next_name"] for n, c in confs.items()} == next_names
    assert [confs[n]["rank"] for n in order] == list(range(len(order)))


@pytest.mark.parametrize("order, forward", [(["n3", "n1", "n5"], {"n3": "n1", "n1": "n5", "n5": "n3"}),
                                            (NODES, {"n1": "n2", "n2": "n3", "n3": "n4", "n4": "n5", "n5": "n1"})])
def test_links_only_forward_through_node_list_are_refused(order, forward):
    # links i -> i + 1 (the other way round) are not the links an EdgeTB ring uses
    with pytest.raises(cu.ConfError) as e:
        build(peers(order), links_to(forward))
    assert f"links.json: no link from {order[0]!r} to its next_name {order[-1]!r}" in str(e.value)


def test_keys_and_options():
    links = links_to(RING3)
    links["n1"].append({"dest": "n2", "bw": "1mbit"})            # a link outside the ring stays in connect
    confs = build({"sync": 2, "seed": 9, "init": "per_rank",
                   "node_list": [{"name": "n3", "epoch": 0}, {"name": "n1", "epoch": 2, "lr": 0.2},
                                 {"name": "n5", "epoch": 1}]}, links)
    assert confs["n1"] == {"sync": 2, "seed": 9, "init": "per_rank", "epoch": 2, "lr": 0.2, "next_name": "n3",
                           "connect": {"n3": "10.0.0.4:4444", "n2": "10.0.0.3:4444"}, "rank": 1,
                           "ring_size": 3, "pos": 1}
    assert confs["n3"]["epoch"] == 0 and confs["n3"]["next_name"] == "n5"  # epoch 0: no local training
    # the controller's step deadline (controller/ra_run.py) rides in every conf
    confs = build({**peers(["n3", "n1", "n5"]), "step_timeout_s": 7.5}, links_to(RING3))
    assert {c["step_timeout_s"] for c in confs.values()} == {7.5}


def test_a_missing_link_to_next_name_names_both():
    links = links_to(RING5)
    links["n4"] = [{"dest": "n5", "bw": "10mbit"}]   # n4 -> n3 missing
    with pytest.raises(cu.ConfError) as e:
        build(peers(NODES), links)
    assert str(e.value) == ("links.json: no link from 'n4' to its next_name 'n3' (ra.json: node_list[3] "
                            "'n4'; entry i sends to entry i - 1, so the ring is n1 -> n5 -> n4 -> n3 -> n2 "
                            "-> n1); add {\"dest\": \"n3\", \"bw\": ...} under 'n4' or reorder node_list")


@pytest.mark.parametrize("structure, message", [
    ({"sync": 1, "node_list": [{"name": "n1", "epoch": 1}]}, "at least 2 peers"),
    ({"sync": 1, "init": "zeros", "node_list": [{"name": "n1", "epoch": 1}, {"name": "n2", "epoch": 1}]},
     "ra.json.init: expected one of common, per_rank"),
    ({"sync": 1, "wait_s": 1, "node_list": []}, "unknown key(s) ['wait_s']"),
    ({"sync": 1, "step_timeout_s": 0, "node_list": [{"name": "n1", "epoch": 1}, {"name": "n2", "epoch": 1}]},
     "step_timeout_s"),
    ({"sync": 1, "step_timeout_s": "NaN", "node_list": [{"name": "n1", "epoch": 1}, {"name": "n2", "epoch": 1}]},
     "step_timeout_s"),
    ({"sync": 1, "node_list": [{"name": "n1", "epoch": -1}, {"name": "n2", "epoch": 1}]}, "epoch"),
])
def test_bad_rings_are_refused(structure, message):
    with pytest.raises(cu.ConfError) as e:
        build(structure, links_to({"n1": "n2", "n2": "n1"}))
    assert message in str(e.value)


def test_cli_names_the_missing_link(scratch):
    (scratch / "node_info.json").write_text(json.dumps(INFO))
    (scratch / "links.json").write_text(json.dumps({"n2": [{"dest": "n1", "bw": "1mbit"}]}))
    (scratch / "ra.json").write_text(json.dumps({"sync": 1, "node_list": [{"name": "n1", "epoch": 1},
                                                                          {"name": "n2", "epoch": 1}]}))
    p = subprocess.run([sys.executable, str(DML_TOOL / "ra_structure_conf.py"), "-s", str(scratch / "ra.json"),
                        "-l", str(scratch / "links.json"), "-n", str(scratch / "node_info.json"),
                        "-o", str(scratch / "out")], capture_output=True, text=True)
    assert p.returncode == 2 and not (scratch / "out").exists()
    assert "ra_structure_conf.py: error: links.json: no link from 'n1' to its next_name 'n2'" in p.stderr


@pytest.mark.parametrize("order, next_names", [(["n3", "n1", "n5"], RING3), (NODES, RING5)])
def test_every_conf_has_edgetbs_ring_size_and_pos(order, next_names):
    """EdgeTB's tool writes ring_size (node_list's length) and pos (the node's 0-based
    index in node_list) in every conf; rank is ours for the same index."""
    confs = build(peers(order), links_to(next_names))
    assert {n: (c["ring_size"], c["pos"], c["rank"]) for n, c in confs.items()} == \
        {n: (len(order), i, i) for i, n in enumerate(order)}
    for c in confs.values():     # what the tool writes, the node takes as it is
        assert check_position(dict(c)) == c


@pytest.mark.parametrize("given, taken", [
    ({"pos": 2}, {"pos": 2, "rank": 2}),                          # EdgeTB's conf: rank follows pos
    ({"rank": 1}, {"pos": 1, "rank": 1}),                         # ours: pos follows rank
    ({"pos": 0, "rank": 0, "ring_size": 3}, {"pos": 0, "rank": 0, "ring_size": 3}),
    ({"ring_size": 4.0}, {"ring_size": 4}),
    ({}, {}),
])
def test_the_node_takes_pos_and_rank_as_one_index(given, taken):
    assert check_position(dict(given)) == taken


@pytest.mark.parametrize("given, message", [
    ({"pos": 1, "rank": 2}, "'pos' 1 and 'rank' 2 differ: both are the node's index in node_list"),
    ({"pos": 3, "ring_size": 3}, "'pos' 3 is not an index of a ring of ring_size 3 (0 to 2)"),
    ({"rank": 5, "ring_size": 2}, "'pos' 5 is not an index of a ring of ring_size 2"),
    ({"ring_size": 1}, "'ring_size'"),
    ({"pos": -1}, "'pos'"),
    ({"pos": "1"}, "'pos'"),
])
def test_the_node_refuses_contradicting_positions(given, message):
    with pytest.raises(ValueError) as e:
        check_position(dict(given))
    assert message in str(e.value)
