"""dml_tool/ra_structure_conf.py: ring order, successors and their links."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dml_testutil import DML_TOOL, scratch  # noqa: F401  (fixture)
from peer_testutil import link_dests, node_addrs, shipped_confs
import conf_utils as cu
import ra_structure_conf

NODES = ["n1", "n2", "n3", "n4", "n5"]
ADDRS, INFO = node_addrs(NODES)


def ring_links(order) -> dict:
    return {n: [{"dest": order[(i + 1) % len(order)], "bw": "10mbit"}] for i, n in enumerate(order)}


def build(structure, links) -> dict:
    return ra_structure_conf.build_confs(structure, link_dests(links), ADDRS, file="ra.json")


def test_the_shipped_example_runs_on_the_shipped_links(scratch):
    confs = shipped_confs(ra_structure_conf, "ra", scratch, NODES)
    assert sorted(confs) == NODES
    for rank, n in enumerate(NODES):
        assert confs[n]["ring"] == NODES and confs[n]["rank"] == rank
        assert confs[n]["successor"] == NODES[(rank + 1) % 5] in confs[n]["connect"]
    assert set(json.loads((DML_TOOL / "ra_structure.json").read_text())) == {"sync", "node_list"}


def test_ring_order_is_the_node_list_order_and_options_pass():
    order = ["n3", "n1", "n5"]
    links = ring_links(order)
    links["n1"].append({"dest": "n2", "bw": "1mbit"})
    confs = build({"sync": 2, "seed": 9, "init": "per_rank",
                   "node_list": [{"name": "n3", "epoch": 0}, {"name": "n1", "epoch": 2, "lr": 0.2},
                                 {"name": "n5", "epoch": 1}]}, links)
    assert confs["n1"] == {"sync": 2, "seed": 9, "init": "per_rank", "epoch": 2, "lr": 0.2, "ring": order,
                           "rank": 1, "successor": "n5",
                           "connect": {"n5": "10.0.0.6:4444", "n2": "10.0.0.3:4444"}}
    assert confs["n5"]["successor"] == "n3" and confs["n3"]["epoch"] == 0  # epoch 0: no local training


def test_a_missing_successor_link_is_named():
    links = ring_links(NODES)
    links["n4"] = [{"dest": "n1", "bw": "10mbit"}]   # n4 -> n5 missing
    with pytest.raises(cu.ConfError) as e:
        build({"sync": 1, "node_list": [{"name": n, "epoch": 1} for n in NODES]}, links)
    assert str(e.value) == ("links.json: no link from 'n4' to its ring successor 'n5' (ra.json: node_list[3] "
                            "'n4'; the ring is n1 -> n2 -> n3 -> n4 -> n5 -> n1); add {\"dest\": \"n5\", "
                            "\"bw\": ...} under 'n4' or reorder node_list")


@pytest.mark.parametrize("structure, message", [
    ({"sync": 1, "node_list": [{"name": "n1", "epoch": 1}]}, "at least 2 peers"),
    ({"sync": 1, "init": "zeros", "node_list": [{"name": "n1", "epoch": 1}, {"name": "n2", "epoch": 1}]},
     "ra.json.init: expected one of common, per_rank"),
    ({"sync": 1, "wait_s": 1, "node_list": []}, "unknown key(s) ['wait_s']"),
    ({"sync": 1, "node_list": [{"name": "n1", "epoch": -1}, {"name": "n2", "epoch": 1}]}, "epoch"),
])
def test_bad_rings_are_refused(structure, message):
    with pytest.raises(cu.ConfError) as e:
        build(structure, ring_links(NODES[:2]))
    assert message in str(e.value)


def test_cli_names_the_missing_link(scratch):
    (scratch / "node_info.json").write_text(json.dumps(INFO))
    (scratch / "links.json").write_text(json.dumps({"n1": [{"dest": "n2", "bw": "1mbit"}]}))
    (scratch / "ra.json").write_text(json.dumps({"sync": 1, "node_list": [{"name": "n1", "epoch": 1},
                                                                          {"name": "n2", "epoch": 1}]}))
    p = subprocess.run([sys.executable, str(DML_TOOL / "ra_structure_conf.py"), "-s", str(scratch / "ra.json"),
                        "-l", str(scratch / "links.json"), "-n", str(scratch / "node_info.json"),
                        "-o", str(scratch / "out")], capture_output=True, text=True)
    assert p.returncode == 2 and not (scratch / "out").exists()
    assert "ra_structure_conf.py: error: links.json: no link from 'n2' to its ring successor 'n1'" in p.stderr
