"""dml_tool/gl_structure_conf.py (and peer_structure.py, shared with the ring tool)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.procs import DML_TOOL, ROOT
from tests.support.peers import link_dests, node_addrs, shipped_confs
from dml_tool import conf_utils as cu
from dml_tool import gl_structure_conf

NODES = ["n1", "n2", "n3", "n4", "n5"]
ADDRS, INFO = node_addrs(NODES)
PAIR = [{"name": "n1", "epoch": 1}, {"name": "n2", "epoch": 1}]


def build(structure, links) -> dict:
    return gl_structure_conf.build_confs(structure, link_dests(links), ADDRS, file="gl.json")


def test_the_shipped_example_runs_on_the_shipped_links(scratch):
    confs = shipped_confs(gl_structure_conf, "gl", scratch, NODES)
    links = json.loads((ROOT / "links.json").read_text())
    assert sorted(confs) == NODES
    for n, conf in confs.items():
        assert conf["sync"] == 10 and conf["epoch"] == 1
        assert sorted(conf["connect"]) == sorted(l["dest"] for l in links[n])
        assert conf["peers"] == [l["dest"] for l in links[n]]   # every node is a peer here
    assert set(json.loads((DML_TOOL / "gl_structure.json").read_text())) == {"sync", "node_list"}
    dataset = json.loads((DML_TOOL / "gl_dataset.json").read_text())
    assert all(dataset[n]["test_len"] > 0 and dataset[n]["train_len"] > 0 for n in NODES)


def test_connect_keeps_every_link_as_edgetb_and_peers_the_participants():
    confs = build({"sync": 3, "seed": 4, "wait_s": 0.5, "gossip_timeout_s": 7, "lr": 0.1,
                   "node_list": [{"name": "n1", "epoch": 2}, {"name": "n2", "epoch": 1, "lr": 0.01},
                                 {"name": "n3", "epoch": 1}]},
                  {"n1": [{"dest": "n4"}, {"dest": "n2"}], "n2": [{"dest": "n1"}, {"dest": "n5"}, {"dest": "n3"}],
                   "n3": [{"dest": "n1"}], "n4": [{"dest": "n1"}]})
    assert set(confs) == {"n1", "n2", "n3"}  # n4 and n5 are linked but no peers: no conf
    # n4 is outside node_list: EdgeTB keeps the link in connect; "peers" leaves it out
    assert confs["n1"] == {"sync": 3, "seed": 4, "lr": 0.1, "wait_s": 0.5, "gossip_timeout_s": 7.0, "epoch": 2,
                           "connect": {"n4": "10.0.0.5:4444", "n2": "10.0.0.3:4444"}, "peers": ["n2"]}
    assert confs["n2"]["lr"] == 0.01
    assert confs["n2"]["connect"] == {"n1": "10.0.0.2:4444", "n5": "10.0.0.6:4444", "n3": "10.0.0.4:4444"}
    assert confs["n2"]["peers"] == ["n1", "n3"]
    assert confs["n3"]["connect"] == {"n1": "10.0.0.2:4444"} and confs["n3"]["peers"] == ["n1"]


@pytest.mark.parametrize("structure, links, message", [
    ({"sync": 2, "node_list": PAIR}, {"n1": [{"dest": "n2"}], "n2": [{"dest": "n3"}]},
     "links.json: peer 'n2' (gl.json: node_list[1] 'n2') has no link to another peer"),
    ({"node_list": PAIR}, {}, "missing key 'sync'"),
    ({"sync": 0, "node_list": PAIR}, {}, "sync"),
    ({"sync": 2, "node_list": PAIR[:1]}, {}, "at least 2 peers"),
    ({"sync": 2, "node_list": [PAIR[0], {"name": "n9", "epoch": 1}]}, {}, "node_list[1] 'n9': unknown node"),
    ({"sync": 2, "node_list": [PAIR[0], PAIR[0]]}, {}, "listed twice"),
    ({"sync": 2, "node_list": [{"name": "n1", "epoch": 0}, PAIR[1]]}, {}, "epoch"),
    ({"sync": 2, "node_list": [{"name": "n1"}, PAIR[1]]}, {}, "missing key 'epoch'"),
    ({"sync": 2, "wait_s": -1, "node_list": PAIR}, {}, "wait_s"),
    ({"sync": 2, "gossip_timeout_s": 0, "node_list": PAIR}, {}, "gossip_timeout_s"),
    ({"sync": 2, "init": "per_rank", "node_list": PAIR}, {}, "unknown key(s) ['init']"),
    ({"sync": 2, "node_list": [{**PAIR[0], "father_node": "n2"}, PAIR[1]]}, {}, "unknown key(s) ['father_node']"),
    ([1, 2], {}, "expected {\"sync\": R"),
])
def test_bad_structures_are_refused_naming_file_and_key(structure, links, message):
    with pytest.raises(cu.ConfError) as e:
        build(structure, links)
    assert message in str(e.value)


def test_cli_error_exit_and_message(scratch):
    (scratch / "node_info.json").write_text(json.dumps(INFO))
    (scratch / "gl.json").write_text(json.dumps({"sync": 2, "node_list": PAIR}))
    argv = [sys.executable, str(DML_TOOL / "gl_structure_conf.py"), "-s", str(scratch / "gl.json"),
            "-l", str(scratch / "links.json"), "-n", str(scratch / "node_info.json"), "-o", str(scratch / "out")]
    for links, code in (({"n1": [{"dest": "n2", "bw": "1mbit"}]}, 2),
                        ({"n1": [{"dest": "n2", "bw": "1mbit"}], "n2": [{"dest": "n1", "bw": "1mbit"}]}, 0)):
        (scratch / "links.json").write_text(json.dumps(links))
        p = subprocess.run(argv, capture_output=True, text=True)
        assert p.returncode == code, p.stderr
    out = [str(scratch / "out" / f"{n}_structure.conf") for n in ("n1", "n2")]
    assert p.stdout.split() == out
    (scratch / "links.json").write_text(json.dumps({"n1": [{"dest": "n2", "bw": "1mbit"}]}))
    p = subprocess.run(argv[:-2] + ["-o", str(scratch / "out2")], capture_output=True, text=True)
    assert p.returncode == 2 and not (scratch / "out2").exists()  # nothing half-written
    assert p.stderr.startswith("gl_structure_conf.py: error: links.json: peer 'n2'")
