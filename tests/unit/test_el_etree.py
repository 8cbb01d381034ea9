"""E-tree maths (dml_app/etree.py), routes (dml_tool/routes.py) and the structure tool
(dml_tool/el_structure_conf.py): exact results, no network."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.procs import DML_TOOL
from dml_tool import conf_utils as cu
from dml_tool import el_structure_conf as el
from dml_tool import routes
from dml_app.etree import aggregate, known_weights, tree_average

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


# ----------------------------------------------------------------------------- routes (EdgeTB's forward)

DEFAULT = json.loads((ROOT / "links.json").read_text())


def names_of(links: dict) -> dict[str, list[str]]:
    return {src: [l["dest"] for l in lst] for src, lst in links.items()}


def test_forward_uses_only_links_that_exist_both_ways():
    links = names_of(DEFAULT)
    # the default network: n1 <-> every node both ways; the ring n2 -> n3 -> n4 -> n5 -> n2 one way only
    assert routes.both_ways(links) == {"n1": ["n2", "n3", "n4", "n5"], "n2": ["n1"], "n3": ["n1"],
                                       "n4": ["n1"], "n5": ["n1"]}
    table = routes.next_hops(links, NODES)
    assert table == {"n1": {},                                   # n1 has a link to every node
                     "n2": {"n4": "n1", "n5": "n1"},            # not over n3, though n2 -> n3 -> n4 exists
                     "n3": {"n2": "n1", "n5": "n1"},
                     "n4": {"n2": "n1", "n3": "n1"},
                     "n5": {"n3": "n1", "n4": "n1"}}
    assert routes.path(links, table, "n2", "n4") == ["n2", "n1", "n4"]
    assert routes.path(links, table, "n5", "n2") == ["n5", "n2"]  # its own link, one way or not


def test_forward_takes_a_shortest_path_ties_to_the_smallest_name_and_skips_the_unreachable():
    both = {("a", "c"), ("a", "b"), ("b", "d"), ("c", "d"), ("d", "f"), ("f", "g")}
    links: dict[str, list[str]] = {}
    for x, y in both:
        links.setdefault(x, []).append(y)
        links.setdefault(y, []).append(x)
    links["e"] = ["a"]                                           # e -> a, one way: no forwarding through e
    table = routes.next_hops(links, "abcdefg")
    assert table["a"] == {"d": "b", "f": "b", "g": "b"}          # b and c are both 2 hops from d: b
    assert table["c"] == {"b": "a", "f": "d", "g": "d"}
    assert table["g"] == {"a": "f", "b": "f", "c": "f", "d": "f"}
    assert table["e"] == {} and "e" not in table["a"]            # nobody reaches e, e reaches no one via forward
    assert routes.path(links, table, "a", "g") == ["a", "b", "d", "f", "g"]
    assert routes.path(links, table, "e", "b") is None and routes.path(links, table, "e", "a") == ["e", "a"]


# ----------------------------------------------------------------------------- the conf tool

def info(names=NODES) -> dict[str, cu.NodeAddr]:
    return {n: cu.NodeAddr(n, f"10.0.0.{i + 2}", 4444, "emulated") for i, n in enumerate(names)}


def build(structure, links=DEFAULT, nodes=None):
    return el.build_confs(structure, names_of(links), nodes or info())


SHIPPED = json.loads((DML_TOOL / "el_structure.json").read_text())
A = {n: f"10.0.0.{i + 2}:4444" for i, n in enumerate(NODES)}

# What EdgeTB's el_structure_conf.py writes for the shipped tree on the default links,
# by hand: n1 on top of n1@2 and n2@2; n1@2 over n1, n3; n2@2 over n2, n4, n5. Both-way
# links are only those with n1, so everything else goes through n1.
SHIPPED_CONFS = {
    "n1": {"layer": [1, 2, 3], "father_node": ["self", "self", "top"],
           "child_node": [[], ["self", "n3"], ["self", "n2"]], "sync": [0, 2, 5], "epoch": 1,
           "connect": {"n2": A["n2"], "n3": A["n3"], "n4": A["n4"], "n5": A["n5"]}, "forward": {}},
    "n2": {"layer": [1, 2], "father_node": ["self", "n1"], "child_node": [[], ["self", "n4", "n5"]],
           "sync": [0, 2], "epoch": 1, "connect": {"n1": A["n1"], "n3": A["n3"]},
           "forward": {"n4": A["n1"], "n5": A["n1"]}},
    "n3": {"layer": [1], "father_node": ["n1"], "child_node": [[]], "sync": [0], "epoch": 1,
           "connect": {"n1": A["n1"], "n4": A["n4"]}, "forward": {"n2": A["n1"], "n5": A["n1"]}},
    "n4": {"layer": [1], "father_node": ["n2"], "child_node": [[]], "sync": [0], "epoch": 1,
           "connect": {"n1": A["n1"], "n5": A["n5"]}, "forward": {"n2": A["n1"], "n3": A["n1"]}},
    "n5": {"layer": [1], "father_node": ["n2"], "child_node": [[]], "sync": [0], "epoch": 1,
           "connect": {"n1": A["n1"], "n2": A["n2"]}, "forward": {"n3": A["n1"], "n4": A["n1"]}},
}


def test_shipped_example_on_the_default_links_is_edgetbs_conf():
    assert build(SHIPPED) == SHIPPED_CONFS


def test_the_et_example_self_top_sync_zero_and_forward():
    """et1 sits in all 3 layers; et1 and et3 are linked only through et2 (a chain)."""
    names = ["et1", "et2", "et3", "et4"]
    addr = {n: f"10.0.0.{i + 2}:4444" for i, n in enumerate(names)}
    chain = {"et1": ["et2"], "et2": ["et1", "et3"], "et3": ["et2", "et4"], "et4": ["et3"]}
    tree = {"node_list": [{"name": "et1", "layer": 3, "sync": 2, "child_num": 2},
                          {"name": "et1", "layer": 2, "sync": 2, "child_num": 2},
                          {"name": "et3", "layer": 2, "sync": 3, "child_num": 2},
                          {"name": "et1", "layer": 1, "epoch": 1}, {"name": "et2", "layer": 1, "epoch": 1},
                          {"name": "et3", "layer": 1, "epoch": 1}, {"name": "et4", "layer": 1, "epoch": 1}]}
    confs = el.build_confs(tree, chain, info(names))
    assert confs == {
        "et1": {"layer": [1, 2, 3], "father_node": ["self", "self", "top"],
                "child_node": [[], ["self", "et2"], ["self", "et3"]], "sync": [0, 2, 2], "epoch": 1,
                "connect": {"et2": addr["et2"]}, "forward": {"et3": addr["et2"], "et4": addr["et2"]}},
        "et2": {"layer": [1], "father_node": ["et1"], "child_node": [[]], "sync": [0], "epoch": 1,
                "connect": {"et1": addr["et1"], "et3": addr["et3"]}, "forward": {"et4": addr["et3"]}},
        "et3": {"layer": [1, 2], "father_node": ["self", "et1"], "child_node": [[], ["self", "et4"]],
                "sync": [0, 3], "epoch": 1, "connect": {"et2": addr["et2"], "et4": addr["et4"]},
                "forward": {"et1": addr["et2"]}},
        "et4": {"layer": [1], "father_node": ["et3"], "child_node": [[]], "sync": [0], "epoch": 1,
                "connect": {"et3": addr["et3"]}, "forward": {"et1": addr["et3"], "et2": addr["et3"]}},
    }


def test_a_forwarder_outside_the_tree_gets_a_conf_and_our_keys_pass():
    links = {"n1": [{"dest": "n2", "bw": "1mbit"}], "n2": [{"dest": "n1", "bw": "1mbit"},
                                                        {"dest": "n3", "bw": "1mbit"}],
             "n3": [{"dest": "n2", "bw": "1mbit"}]}
    structure = {"node_list": [{"name": "n1", "layer": 2, "sync": 1, "child_num": 2, "seed": 4,
                                "round_timeout_s": 30},
                               {"name": "n1", "layer": 1, "epoch": 1},
                               {"name": "n3", "layer": 1, "epoch": 2, "lr": 0.1}],
                 "test_known_weights_seed": 9}
    confs = build(structure, links, info(["n1", "n2", "n3"]))
    assert confs["n2"] == {"layer": [], "father_node": [], "child_node": [], "sync": [],
                           "connect": {"n1": "10.0.0.2:4444", "n3": "10.0.0.4:4444"}, "forward": {}}
    assert confs["n1"] == {"layer": [1, 2], "father_node": ["self", "top"], "child_node": [[], ["self", "n3"]],
                           "sync": [0, 1], "epoch": 1, "test_known_weights_seed": 9,
                           "round_timeout_s": {"2": 30.0}, "seed": 4,
                           "connect": {"n2": "10.0.0.3:4444"}, "forward": {"n3": "10.0.0.3:4444"}}
    assert confs["n3"] == {"layer": [1], "father_node": ["n1"], "child_node": [[]], "sync": [0], "epoch": 2,
                           "lr": 0.1, "test_known_weights_seed": 9,
                           "connect": {"n2": "10.0.0.3:4444"}, "forward": {"n1": "10.0.0.3:4444"}}


def test_a_top_that_does_not_train_has_no_epoch():
    links = {"n1": [{"dest": "n2"}, {"dest": "n3"}], "n2": [{"dest": "n1"}], "n3": [{"dest": "n1"}]}
    confs = build({"node_list": [{"name": "n1", "layer": 2, "sync": 3, "child_num": 2},
                                 {"name": "n2", "layer": 1, "epoch": 1}, {"name": "n3", "layer": 1, "epoch": 1}]},
                  links, info(["n1", "n2", "n3"]))
    assert confs["n1"] == {"layer": [2], "father_node": ["top"], "child_node": [["n2", "n3"]], "sync": [3],
                           "connect": {"n2": "10.0.0.3:4444", "n3": "10.0.0.4:4444"}, "forward": {}}


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


def test_no_route_is_an_error_naming_links_json_and_the_both_way_links():
    # a one-way ring n1 -> n2 -> n3 -> n1: n1 reaches n3 only one way round, which EdgeTB does not forward over
    links = {"n1": [{"dest": "n2", "bw": "1mbit"}], "n2": [{"dest": "n3", "bw": "1mbit"}],
             "n3": [{"dest": "n1", "bw": "1mbit"}]}
    structure = {"node_list": [entry("n1", 2, child_num=2), entry("n2", 1), entry("n3", 1)]}
    with pytest.raises(cu.ConfError) as e:
        build(structure, links, info(["n1", "n2", "n3"]))
    assert str(e.value) == ("links.json: no route from 'n2' to 'n1', needed because 'n2' (layer 1) sends its "
                            "results to its father 'n1': n2 has no link to n1 and no path to it over links "
                            "that exist in both directions (it has them with no node); add "
                            "{\"dest\": \"n1\", \"bw\": ...} under 'n2', or links both ways")


def test_cli_writes_confs_and_reports_errors(scratch):
    (scratch / "node_info.json").write_text(json.dumps(
        {"emulated_node": {n: {"ip": f"10.0.0.{i + 2}", "port": 4444} for i, n in enumerate(NODES)}}))
    argv = [sys.executable, str(DML_TOOL / "el_structure_conf.py"), "-s", "el_structure.json",
            "-n", str(scratch / "node_info.json"), "-o", str(scratch / "conf")]
    p = subprocess.run(argv, cwd=scratch, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert sorted(Path(l).name for l in p.stdout.split()) == [f"{n}_structure.conf" for n in NODES]
    for n in NODES:
        assert json.loads((scratch / "conf" / f"{n}_structure.conf").read_text()) == SHIPPED_CONFS[n]
    bad = dict(DEFAULT, n4=[{"dest": "n9", "bw": "5mbit"}])
    (scratch / "links.json").write_text(json.dumps(bad))
    p = subprocess.run(argv + ["-l", str(scratch / "links.json"), "-o", str(scratch / "conf2")], cwd=scratch,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "el_structure_conf.py: error: links.json: n4[0].dest: unknown node 'n9'" in p.stderr
    assert not (scratch / "conf2").exists()
