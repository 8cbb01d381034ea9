"""E-tree maths (dml_app/etree.py), routes (dml_tool/routes.py) and the structure tool
(dml_tool/el_structure_conf.py): exact results, no network."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dml_testutil import DML_TOOL, scratch  # noqa: F401  (fixture)
import conf_utils as cu
import el_structure_conf as el
import routes
from etree import aggregate, known_weights, next_hop, tree_average

ROOT = DML_TOOL.parent
NODES = ["n1", "n2", "n3", "n4", "n5"]


def sd(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


# ----------------------------------------------------------------------------- maths

def test_tree_average_is_the_nested_weighted_mean_exactly():
    a, b, c = sd(0.0, 8.0), sd(4.0, 0.0), sd(16.0, 16.0)
    # inner: (10 a + 30 b) / 40 = (3, 2); top: (40 inner + 40 c) / 80 = (9.5, 9)
    inner, n_inner = tree_average([(a, 10), (b, 30)])
    assert torch.equal(inner["w"], torch.tensor([3.0, 2.0])) and n_inner == 40
    top, n_top = tree_average([[(a, 10), (b, 30)], (c, 40)])
    assert torch.equal(top["w"], torch.tensor([9.5, 9.0])) and n_top == 80
    flat, n_flat = aggregate([(a, 10), (b, 30), (c, 40)])    # nesting == flat mean, mathematically
    assert torch.equal(top["w"], flat["w"]) and n_flat == 80


def test_tree_average_of_deeper_trees_and_single_children():
    leaves = [(sd(float(i), -float(i)), i) for i in range(1, 7)]
    nested = tree_average([[[leaves[0], leaves[1]], [leaves[2]]], [leaves[3], [leaves[4], leaves[5]]]])
    total = sum(n for _, n in leaves)
    ref = sum(float(i) * i for i in range(1, 7)) / total
    assert nested[1] == total
    assert torch.allclose(nested[0]["w"], torch.tensor([ref, -ref]), rtol=0, atol=1e-6)
    assert torch.equal(tree_average([[leaves[2]]])[0]["w"], leaves[2][0]["w"])   # self-only chains


@pytest.mark.parametrize("tree, message", [([], "non-empty list"), ((sd(1.0), -1), "n_samples=-1"),
                                           (("x", 3), "a leaf is"), ([[(sd(1.0), 0)]], "n_samples=0")])
def test_tree_average_refuses_bad_trees(tree, message):
    with pytest.raises(ValueError, match=message):
        tree_average(tree)


def test_known_weights_are_reproducible_and_distinct():
    template = {"w": torch.zeros(3, 4), "steps": torch.tensor(7)}
    a = known_weights(template, "n2", 5, 1)
    assert torch.equal(a["w"], known_weights(template, "n2", 5, 1)["w"])
    assert not torch.equal(a["w"], known_weights(template, "n3", 5, 1)["w"])
    assert not torch.equal(a["w"], known_weights(template, "n2", 5, 2)["w"])
    assert a["w"].dtype == torch.float32 and a["steps"].item() == 7


def test_next_hop():
    assert next_hop(["n2", "n3", "n4"], "n2") == "n3"
    assert next_hop(["n2", "n3", "n4"], "n3") == "n4"
    with pytest.raises(ValueError, match="ends at n4"):
        next_hop(["n2", "n3", "n4"], "n4")
    with pytest.raises(ValueError, match="does not pass through n5"):
        next_hop(["n2", "n3", "n4"], "n5")


# ----------------------------------------------------------------------------- routes

DEFAULT = json.loads((ROOT / "links.json").read_text())


def test_routes_on_the_default_links_prefer_fewest_hops_then_the_widest():
    g = routes.link_rates(DEFAULT)
    assert g["n4"]["n1"] == 16e6 and g["n2"]["n1"] == 10e6       # 2mbps is BYTES per second
    r2 = routes.routes_from(g, "n2")
    assert r2["n1"] == ["n2", "n1"] and r2["n3"] == ["n2", "n3"]  # direct links first
    assert r2["n4"] == ["n2", "n3", "n4"]                          # the ring (25mbit) over n1 (10mbit)
    assert r2["n5"] == ["n2", "n1", "n5"]                          # 3 ring hops lose to 2
    assert routes.routes_from(g, "n4")["n2"] == ["n4", "n5", "n2"]


def test_routes_ties_go_to_the_smallest_names_and_unreachable_nodes_are_absent():
    g = {"a": {"c": 1.0, "b": 1.0}, "b": {"d": 1.0}, "c": {"d": 1.0}, "d": {}, "e": {"a": 1.0}}
    assert routes.routes_from(g, "a") == {"b": ["a", "b"], "c": ["a", "c"], "d": ["a", "b", "d"]}
    assert routes.routes_from(g, "d") == {}


# ----------------------------------------------------------------------------- the conf tool

def info(names=NODES) -> dict[str, cu.NodeAddr]:
    return {n: cu.NodeAddr(n, f"10.0.0.{i + 2}", 4444, "emulated") for i, n in enumerate(names)}


def names_of(links: dict) -> dict[str, list[str]]:
    return {src: [l["dest"] for l in lst] for src, lst in links.items()}


def build(structure, links=DEFAULT, nodes=None):
    return el.build_confs(structure, names_of(links), nodes or info(), graph=routes.link_rates(links))


SHIPPED = json.loads((DML_TOOL / "el_structure.json").read_text())


def test_shipped_example_on_the_default_links():
    confs = build(SHIPPED)
    assert sorted(confs) == NODES
    assert confs["n1"]["layers"] == {
        "3": {"sync": 5, "father": None, "children": ["self", "n2"]},
        "2": {"sync": 2, "father": "self", "children": ["self", "n3"]},
        "1": {"epoch": 1, "father": "self"}}
    assert confs["n2"]["layers"]["2"] == {"sync": 2, "father": "n1", "children": ["self", "n4", "n5"]}
    assert confs["n4"]["layers"] == {"1": {"epoch": 1, "father": "n2"}}
    # multi-hop where the tree has no direct link: n2 <-> n4 over the ring, n2 -> n5 via n1
    assert confs["n2"]["routes"] == {"n1": ["n2", "n1"], "n4": ["n2", "n3", "n4"], "n5": ["n2", "n1", "n5"]}
    assert confs["n4"]["routes"] == {"n2": ["n4", "n5", "n2"]}
    assert confs["n3"]["connect"] == {"n1": "10.0.0.2:4444", "n4": "10.0.0.5:4444"}
    assert "test_known_weights_seed" not in confs["n4"]


def test_a_forwarder_outside_the_tree_gets_a_conf_and_the_knob_reaches_trainers():
    links = {"n1": [{"dest": "n2", "bw": "1mbit"}], "n2": [{"dest": "n1", "bw": "1mbit"},
                                                        {"dest": "n3", "bw": "1mbit"}],
             "n3": [{"dest": "n2", "bw": "1mbit"}]}
    structure = {"node_list": [{"name": "n1", "layer": 2, "sync": 1, "child_num": 2, "seed": 4},
                               {"name": "n1", "layer": 1, "epoch": 1},
                               {"name": "n3", "layer": 1, "epoch": 2, "lr": 0.1}],
                 "test_known_weights_seed": 9}
    confs = build(structure, links, info(["n1", "n2", "n3"]))
    assert confs["n2"] == {"layers": {}, "routes": {}, "connect": {"n1": "10.0.0.2:4444", "n3": "10.0.0.4:4444"}}
    assert confs["n1"]["routes"] == {"n3": ["n1", "n2", "n3"]} and confs["n1"]["seed"] == 4
    assert confs["n3"]["layers"]["1"] == {"epoch": 2, "lr": 0.1, "father": "n1"}
    assert confs["n3"]["test_known_weights_seed"] == confs["n1"]["test_known_weights_seed"] == 9


def entry(name, layer, **kw):
    return {"name": name, "layer": layer, **({"epoch": 1} if layer == 1 else {"sync": 1, "child_num": 1}), **kw}


@pytest.mark.parametrize("node_list, message", [
    ([entry("n1", 2, child_num=2), entry("n2", 1)], "child_num 2, but only 1 entries are left"),
    ([entry("n1", 2), entry("n2", 1), entry("n3", 1)], "have no father: the child_num values add up to 1"),
    ([entry("n1", 3, child_num=2), entry("n1", 2), entry("n2", 1), entry("n3", 1)],
     "'n1' (layer 3) would take node_list[2] 'n2' (layer 1) as a child, but a child must be in layer 2"),
    ([entry("n1", 2, child_num=2), entry("n2", 1), entry("n2", 1)], "n2 is in layer 1 twice"),
    ([entry("n1", 1)], "needs a top node"),
    ([entry("n1", 1), entry("n2", 1)], "the first entry is the top and needs layer >= 2"),
    ([entry("n1", 2), entry("n2", 2)], "only the first entry may be in the top layer 2"),
    ([entry("n1", 3, child_num=2), entry("n1", 1), entry("n2", 2)], "layers never go up"),
    ([entry("n1", 2), entry("n9", 1)], "'n9': unknown node"),
    ([entry("n1", 2), entry("n2", 1, sync=3)], "unknown key(s) ['sync']"),
    ([entry("n1", 2, epoch=1), entry("n2", 1)], "unknown key(s) ['epoch']"),
    ([entry("n1", 2, sync=0), entry("n2", 1)], ".sync: expected an integer >= 1, got 0"),
])
def test_structure_errors_name_the_entry(node_list, message):
    with pytest.raises(cu.ConfError) as e:
        build({"node_list": node_list})
    assert message in str(e.value) and "el_structure.json" in str(e.value)


def test_no_route_is_an_error_naming_links_json_and_what_the_node_reaches():
    links = {"n1": [{"dest": "n2", "bw": "1mbit"}, {"dest": "n3", "bw": "1mbit"}],
             "n2": [{"dest": "n1", "bw": "1mbit"}], "n3": []}
    structure = {"node_list": [entry("n1", 2, child_num=2), entry("n2", 1), entry("n3", 1)]}
    with pytest.raises(cu.ConfError) as e:
        build(structure, links, info(["n1", "n2", "n3"]))
    assert str(e.value) == ("links.json: no route from 'n3' to 'n1', needed because 'n3' (layer 1) "
                            "sends its results to its father 'n1'; n3 reaches no node: add a link "
                            "(or a path of links) from 'n3' to 'n1'")


def test_cli_writes_confs_and_reports_errors(scratch):
    (scratch / "node_info.json").write_text(json.dumps(
        {"emulated_node": {n: {"ip": f"10.0.0.{i + 2}", "port": 4444} for i, n in enumerate(NODES)}}))
    argv = [sys.executable, str(DML_TOOL / "el_structure_conf.py"), "-s", "el_structure.json",
            "-n", str(scratch / "node_info.json"), "-o", str(scratch / "conf")]
    p = subprocess.run(argv, cwd=scratch, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert sorted(Path(l).name for l in p.stdout.split()) == [f"{n}_structure.conf" for n in NODES]
    conf = json.loads((scratch / "conf" / "n5_structure.conf").read_text())
    assert conf["layers"] == {"1": {"epoch": 1, "father": "n2"}} and conf["routes"] == {"n2": ["n5", "n2"]}
    bad = dict(DEFAULT, n4=[{"dest": "n1", "bw": "5M"}])
    (scratch / "links.json").write_text(json.dumps(bad))
    p = subprocess.run(argv + ["-l", str(scratch / "links.json")], cwd=scratch, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "el_structure_conf.py: error: links.json: n4[0].bw: bad bandwidth '5M'" in p.stderr
