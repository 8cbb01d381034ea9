"""dml_app/formats.py: one rule per file format, the same at every entry point.

Units as tc(8) reads them; links.json's duplicate links and unknown nodes through the
controller and the conf tools alike; one node-name rule for the controller, the conf
tools, the agent's /emulated/deploy and the node runtime; node_info.json ports as
integers or as EdgeTB's strings for every structure tool; the dataset ranges the tool
and the node share; and a round trip: the controller's own node_info.json -> the dml_tool
tools -> per-node confs pushed to the real roles (their /conf/dataset and /conf/structure).
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.procs import DML_TOOL, ROOT, TOKEN
from tests.support import agents as ah
from dml_tool import conf_utils as cu
from dml_tool import dataset_conf
from dml_tool import el_structure_conf
from dml_tool import fl_structure_conf
from dml_tool import gl_structure_conf
from dml_app import net
from dml_app import node_data
from dml_tool import ps_structure_conf
from dml_tool import ra_structure_conf
from dml_tool import splitter
from controller import results
from controller.manager import Manager
from controller.testbed import DefinitionError, Testbed
from dml_app import formats
from dml_app.el_peer import ElPeer
from dml_app.fl_aggregator import FlAggregator
from dml_app.fl_trainer import FlTrainer
from dml_app.gl_peer import GlPeer
from dml_app.ps_server import PsServer
from dml_app.ps_worker import PsWorker
from dml_app.ra_peer import RaPeer
from dml_app.runtime import ConfigError, Runtime

NAMES = ["n1", "n2", "n3", "n4", "n5"]
TOOLS = {"fl": fl_structure_conf, "gl": gl_structure_conf, "ra": ra_structure_conf,
         "el": el_structure_conf, "ps": ps_structure_conf}
ROLES = {"fl": {"n1": FlAggregator, **{n: FlTrainer for n in NAMES[1:]}},
         "gl": {n: GlPeer for n in NAMES}, "ra": {n: RaPeer for n in NAMES}, "el": {n: ElPeer for n in NAMES},
         "ps": {"n1": PsServer, **{n: PsWorker for n in NAMES[1:]}}}


# ----------------------------------------------------------------------------- units (tc(8))

@pytest.mark.parametrize("text, bits_per_s", [
    ("10mbit", 10_000_000), ("10mbps", 80_000_000),          # mbit: bits/s; mbps: BYTES/s
    ("10kbit", 10_000), ("10kbps", 80_000), ("1gbit", 10**9), ("1gbps", 8 * 10**9),
    ("10Mbit", 10_000_000), (" 2.5 mbit ", 2_500_000), ("8000bit", 8_000), ("1000bps", 8_000),
])
def test_rates_as_tc_reads_them(text, bits_per_s):
    assert formats.parse_rate(text) == bits_per_s


@pytest.mark.parametrize("text, message", [
    ("10000000", "bad bandwidth '10000000': use a number and one of bit, kbit"),   # bare number
    (10_000_000, "bandwidth must be a string like '10mbit', got 10000000"),
    ("5M", "bad bandwidth '5M'"), ("5mbs", "bad bandwidth '5mbs'"), ("mbit", "bad bandwidth"),
    ("-5mbit", "bad bandwidth"), ("1e3mbit", "bad bandwidth"), ("nanmbit", "bad bandwidth"),
    ("inf mbit", "bad bandwidth"), ("9" * 40 + "mbit", "bad bandwidth"), ("", "bad bandwidth"),
    (None, "must be a string"), (True, "must be a string"),
    ("7kbit", "outside 8kbit..100gbit"), ("101gbit", "outside 8kbit..100gbit"), ("0mbit", "outside"),
])
def test_bad_rates_are_refused_naming_the_units(text, message):
    with pytest.raises(formats.FormatError, match=message.replace("(", r"\(").replace(".", r"\.")):
        formats.parse_rate(text)


def test_times_and_loss():
    assert formats.parse_time_us("10ms") == 10_000 and formats.parse_time_us("0.5s") == 500_000
    assert formats.parse_time_us("60s") == 60 * 10**6
    for bad in ("61s", "10", "10m", "-1ms", 5):
        with pytest.raises(formats.FormatError):
            formats.parse_time_us(bad)
    assert formats.parse_loss_pct("1%") == 1.0 and formats.parse_loss_pct(0.5) == 0.5
    for bad in ("101%", "-1%", "nan", True, "1e2"):
        with pytest.raises(formats.FormatError, match="bad loss"):
            formats.parse_loss_pct(bad)


def test_worker_units_is_formats():
    from worker import units
    assert units.parse_rate is formats.parse_rate and units.UnitError is formats.FormatError


# ----------------------------------------------------------------------------- links.json, every parser

def node_info_doc(names=NAMES, port=4444) -> dict:
    return {"emulator": {"emu1": {"ip": "127.0.0.1", "port": 3334}},
            "emulated_node": {n: {"ip": f"10.0.0.{i + 2}", "port": port, "emulator": "emu1"}
                              for i, n in enumerate(names)},
            "physical_node": {}}


def controller_testbed(work: Path, links, names=NAMES) -> Testbed:
    """A testbed definition as a run script makes it (nothing deployed)."""
    lf = work / "links.json"
    lf.write_text(links if isinstance(links, str) else json.dumps(links))
    tb = Testbed("127.0.0.1", str(work), Manager, host_port=0)
    tb.node_info_path = work / "node_info.json"
    emu = tb.add_emulator("emu1", "127.0.0.1", cpu=4, ram=4, unit="G", subnet="10.239.0.0/24")
    for n in names:
        tb.add_emulated_node(n, "/home/worker/dml_app", ["sleep", "60"], cpu=0.5, ram=256, unit="M", emulator=emu)
    tb.load_link(str(lf))
    return tb


def controller_problems(work: Path, links, names=NAMES) -> list[str]:
    with pytest.raises(DefinitionError) as ei:
        controller_testbed(work, links, names).validate()
    return ei.value.problems


def tool_error(work: Path, links, names=NAMES) -> str:
    (work / "links.json").write_text(json.dumps(links))
    (work / "node_info.json").write_text(json.dumps(node_info_doc(names)))
    with pytest.raises(formats.FormatError) as ei:
        cu.load_links(str(work / "links.json"), cu.load_node_info(str(work / "node_info.json")))
    return str(ei.value)


@pytest.mark.parametrize("links, message", [
    ({"n1": [{"dest": "n2", "bw": "1mbit"}, {"dest": "n3", "bw": "1mbit"}, {"dest": "n2", "bw": "2mbit"}]},
     "links.json: n1[2].dest: duplicate link from 'n1' to 'n2' (also n1[0])"),
    ({"n1": [{"dest": "n7", "bw": "1mbit"}]}, "links.json: n1[0].dest: unknown node 'n7' ("),
    ({"n8": [{"dest": "n1", "bw": "1mbit"}]}, "links.json: 'n8': unknown node ("),
    ({"n1": [{"dest": "n1", "bw": "1mbit"}]}, "links.json: n1[0].dest: a link from 'n1' to itself"),
    ({"n1": [{"dest": "n2"}]}, "links.json: n1[0]: missing key 'bw'"),
    ({"n1": [{"dest": "n2", "bw": "5mbs"}]}, "links.json: n1[0].bw: bad bandwidth '5mbs'"),
    ({"n1": [{"dest": "n2", "bw": "1mbit", "rate": 1}]}, "links.json: n1[0]: unknown key(s) ['rate']"),
    ({"n1": [{"dest": "n2", "bw": "1mbit", "delay": "2h"}]}, "links.json: n1[0].delay: bad time '2h'"),
    ({"n1": {"dest": "n2"}}, "links.json: 'n1': expected a list of links"),
])
def test_links_refused_alike_by_the_controller_and_the_conf_tools(scratch, links, message):
    problems = controller_problems(scratch, links)
    rest = message[len("links.json: "):]
    assert len(problems) == 1 and problems[0].startswith(f"{scratch / 'links.json'}: {rest}"), problems
    err = tool_error(scratch, links)
    assert err.startswith(message), err


def test_unknown_nodes_say_where_the_node_set_came_from(scratch):
    links = {"n1": [{"dest": "x9", "bw": "1mbit"}]}
    assert "(node_info.json has n1, n2, n3, n4, n5)" in tool_error(scratch, links)
    assert "(the testbed has n1, n2, n3, n4, n5)" in controller_problems(scratch, links)[0]
    # where the node set is not known, only the name rule applies
    assert formats.parse_links(links)["n1"][0].dest == "x9"
    with pytest.raises(formats.FormatError, match=r"'x\.9' is not a valid node name"):
        formats.parse_links({"n1": [{"dest": "x.9", "bw": "1mbit"}]})


def test_the_controller_lists_every_problem_and_parses_units_once(scratch):
    links = {"n1": [{"dest": "n2", "bw": "1mbit"}, {"dest": "n2", "bw": "5M"}], "zz": []}
    problems = controller_problems(scratch, links)
    assert len(problems) == 3, problems
    tb = controller_testbed(scratch, {"n1": [{"dest": "n2", "bw": "10mbit"}, {"dest": "n3", "bw": "5mbps"}]})
    tb.validate()
    tb.assign_addresses()
    got = tb.agent_links(tb.links, ["n1", "n2"])
    assert got == {"n1": [{"dest": "n2", "ip": tb.emulated["n2"].ip, "port": 4444, "rate_bps": 10_000_000},
                          {"dest": "n3", "ip": tb.emulated["n3"].ip, "port": 4444, "rate_bps": 40_000_000}],
                   "n2": []}


def test_links_json_syntax_errors_name_the_file(scratch):
    assert "invalid JSON at line 1" in controller_problems(scratch, '{"n1": [}')[0]
    assert "key 'n1' appears twice" in controller_problems(scratch, '{"n1": [], "n1": []}')[0]
    assert "is not a JSON number" in controller_problems(scratch, '{"n1": [{"dest": "n2", "bw": NaN}]}')[0]
    assert "expected an object of node" in controller_problems(scratch, "[]")[0]


# ----------------------------------------------------------------------------- node names

GOOD_NAMES = ["n1", "a", "Node_2-b", "x" * 32]
BAD_NAMES = ["n.1", "1n", "-n", "_n", "", "x" * 33, "n 1", "n/1", "../x", "é1"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_a_good_name_passes_every_entry_point(scratch, name):
    assert formats.check_name(name, "here") == name
    controller_testbed(scratch, {}, names=[name]).validate()
    assert dataset_conf.build_confs({name: {"train_len": 1}}, "ds.json") == {name: {"train_len": 1}}
    (scratch / "node_info.json").write_text(json.dumps(node_info_doc([name])))
    assert list(cu.load_node_info(str(scratch / "node_info.json"))) == [name]
    assert results.safe_log_path(scratch, name).name == f"{name}.log"
    rt = Runtime("x", env={"NET_NODE_NAME": name, "EDGE_TB_TOKEN": TOKEN, "DML_LOG_DIR": str(scratch / "log")})
    rt.close()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_name_is_refused_by_every_entry_point(scratch, name):
    rule = "is not a valid node name (a letter, then letters, digits, '-' or '_'; at most 32 characters)"
    with pytest.raises(formats.FormatError) as ei:
        formats.check_name(name, "here")
    assert str(ei.value) == f"here: {formats.shown(name)} {rule}"
    # the controller: add_emulated_node's name is a problem validate() lists
    problems = controller_problems(scratch, {}, names=[name])
    assert any(rule in p for p in problems), problems
    # the conf tools: a dataset json entry, a node_info.json node, a links.json node
    with pytest.raises(formats.FormatError, match="is not a valid node name"):
        dataset_conf.build_confs({name: {"train_len": 1}}, "ds.json")
    (scratch / "node_info.json").write_text(json.dumps(node_info_doc([name])))
    with pytest.raises(formats.FormatError, match="node_info.json: emulated_node: .* is not a valid node name"):
        cu.load_node_info(str(scratch / "node_info.json"))
    with pytest.raises(formats.FormatError, match="is not a valid node name"):
        formats.parse_links({name: []})
    with pytest.raises(ValueError):
        results.safe_log_path(scratch, name)
    # the node runtime's NET_NODE_NAME
    with pytest.raises(ConfigError, match="NET_NODE_NAME=.*expected a node name"):
        Runtime("x", env={"NET_NODE_NAME": name, "EDGE_TB_TOKEN": TOKEN})


api = ah.clean_agent_fixture()


@ah.need_root()
@pytest.mark.parametrize("name", ["n.1", "1n", "x" * 33])
def test_the_agent_refuses_the_names_the_controller_refuses(api, name):
    dep = ah.linked_pair()
    body = copy.deepcopy(dep.body())
    body["nodes"][0]["name"] = name
    r = api.raw("POST", "/emulated/deploy", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == f"bad node name: {formats.shown(name)} is not a valid node name ({formats.NAME_RULE})"
    ah.assert_clean(dep)


# ----------------------------------------------------------------------------- node_info.json

def test_node_info_ports_as_strings_or_integers(scratch):
    p = scratch / "node_info.json"
    for port in (8101, "8101"):
        p.write_text(json.dumps(node_info_doc(port=port)))
        nodes = cu.load_node_info(str(p))
        assert nodes["n2"].port == 8101 and nodes["n2"].address == "10.0.0.3:8101"
    for bad in ("8101x", "0", "70000", "", " 8101", "+8101", "٨١٠١", True, 8101.0, None, 0):
        p.write_text(json.dumps(node_info_doc(port=bad)))
        with pytest.raises(formats.FormatError, match=r"node_info.json: emulated_node.n1.port: .* is not a port number"):
            cu.load_node_info(str(p))


def shipped_links() -> dict:
    return json.loads((ROOT / "links.json").read_text())


def write_all_confs(work: Path, node_info: Path) -> dict[str, dict[str, dict]]:
    """Every tool on the shipped <alg>_structure.json and <alg>_dataset.json with the
    shipped links.json and this node_info.json: {alg: {file name: conf}}."""
    out = {}
    for alg, tool in TOOLS.items():
        d = work / alg
        dataset_conf.write_confs(str(DML_TOOL / f"{alg}_dataset.json"), str(d))
        tool.write_confs(str(DML_TOOL / f"{alg}_structure.json"), str(ROOT / "links.json"), str(node_info), str(d))
        out[alg] = {p.name: json.loads(p.read_text()) for p in sorted(d.glob("*.conf"))}
    return out


def test_every_structure_tool_takes_edgetbs_string_ports(scratch):
    info = node_info_doc(port=8101)
    (scratch / "int.json").write_text(json.dumps(info))
    for n in info["emulated_node"].values():
        n["port"] = str(n["port"])
    (scratch / "str.json").write_text(json.dumps(info))
    with_ints = write_all_confs(scratch / "a", scratch / "int.json")
    with_strings = write_all_confs(scratch / "b", scratch / "str.json")
    assert with_ints == with_strings
    for alg, confs in with_strings.items():
        assert len(confs) == 10, (alg, sorted(confs))
        to_n2 = [c["connect"]["n2"] for name, c in confs.items()
                 if name.endswith("_structure.conf") and "n2" in c.get("connect", {})]
        assert to_n2 and set(to_n2) == {"10.0.0.3:8101"}, (alg, to_n2)
    # the command line too (as a user runs it)
    r = subprocess.run([sys.executable, str(DML_TOOL / "ra_structure_conf.py"), "-s", "ra_structure.json",
                        "-l", str(ROOT / "links.json"), "-n", str(scratch / "str.json"), "-o", str(scratch / "c")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- dataset json and conf

@pytest.mark.parametrize("key, low, high", [("train_len", 0, 100_000), ("train_start_index", 1, 1_000_000),
                                            ("test_len", 0, 100_000), ("test_start_index", 1, 1_000_000),
                                            ("batch_size", 1, 1 << 20)])
def test_the_tool_and_the_node_share_the_dataset_ranges(key, low, high):
    base = {"train_len": 1, "test_len": 1}
    for v in (low, high):
        assert dataset_conf.build_confs({"n1": {**base, key: v}}, "ds.json")["n1"][key] == v
        assert node_data.normalize_conf({**base, key: v})[key] == v
    for v in (low - 1, high + 1, 2.0, "3", True, None):
        expected = f"expected an integer in [{low}, {high}], got {v!r}"
        with pytest.raises(formats.FormatError) as ei:
            dataset_conf.build_confs({"n1": {**base, key: v}}, "ds.json")
        assert str(ei.value) == f"ds.json: n1.{key}: {expected}"
        with pytest.raises(node_data.DatasetError) as ei:
            node_data.normalize_conf({**base, key: v})
        assert str(ei.value) == f"dataset conf.{key}: {expected}"


def test_node_defaults_and_tool_defaults():
    assert node_data.normalize_conf({}) == {"train_len": 0, "train_start_index": 1, "test_len": 0,
                                            "test_start_index": 1, "batch_size": 32}
    assert dataset_conf.build_confs({"defaults": {"batch_size": 8}, "n1": {"test_len": 2}}, "d.json") == \
        {"n1": {"batch_size": 8, "test_len": 2}}


def test_structure_node_list_common_rules():
    nodes = {n: None for n in NAMES}
    got = formats.node_list({"node_list": [{"name": "n2", "epoch": 1}, {"name": "n1"}]}, nodes, file="s.json")
    assert [(e.index, e.name, e.where) for e in got] == [(0, "n2", "s.json: node_list[0] 'n2'"),
                                                         (1, "n1", "s.json: node_list[1] 'n1'")]
    for structure, message in (
            ({"nodes": []}, 's.json: expected {"node_list"'),
            ({"node_list": [["n1"]]}, r"s.json: node_list\[0\]: expected an object"),
            ({"node_list": [{"epoch": 1}]}, r"node_list\[0\]: missing key 'name'"),
            ({"node_list": [{"name": "n.1"}]}, r"node_list\[0\]: 'n.1' is not a valid node name"),
            ({"node_list": [{"name": "n1"}, {"name": "n1"}]}, r"node_list\[1\] 'n1': duplicate node, listed twice "
                                                              r"\(also node_list\[0\]\)"),
            ({"node_list": [{"name": "n9"}]}, r"node_list\[0\] 'n9': unknown node \(node_info.json has n1")):
        with pytest.raises(formats.FormatError, match=message):
            formats.node_list(structure, nodes, file="s.json")


# ----------------------------------------------------------------------------- round trip

@pytest.fixture
def parts_dataset(scratch) -> Path:
    """40 train and 10 test parts (the shipped dataset jsons reach part 40), 2 images each."""
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", 40), ("test", 10)):
        x = rng.random((2 * n, 1, 28, 28), dtype=np.float32)
        data[split] = (x, rng.integers(0, 10, 2 * n), [np.arange(2 * i, 2 * i + 2) for i in range(n)])
    splitter.write_dataset(str(scratch / "ds"), name="mnist-random", num_classes=10, **data)
    return scratch / "ds"


def test_round_trip_controller_node_info_to_tools_to_roles(scratch, parts_dataset):
    """The controller writes node_info.json for the shipped links.json; the tools make
    every node's confs from it for all five algorithms; each node's role takes both."""
    tb = controller_testbed(scratch, shipped_links())
    tb.validate()
    tb.assign_addresses()
    info = json.loads(tb.write_node_info().read_text())
    assert info["emulated_node"]["n1"] == {"ip": tb.emulated["n1"].ip, "port": 4444, "emulator": "emu1"}
    confs = write_all_confs(scratch / "conf", tb.node_info_path)
    threads = torch.get_num_threads()
    try:
        for alg, roles in ROLES.items():
            for name, role in roles.items():
                rt = Runtime(role.__name__.lower(), env={
                    "NET_NODE_NAME": name, "EDGE_TB_TOKEN": TOKEN, "DML_PORT": "0",
                    "DML_LOG_DIR": str(scratch / "log" / alg), "DML_DATASET_DIR": str(parts_dataset)})
                try:
                    role(rt)
                    client = rt.app.test_client()
                    for kind in ("dataset", "structure"):
                        r = client.post(f"/conf/{kind}", json=confs[alg][f"{name}_{kind}.conf"],
                                        headers={net.TOKEN_HEADER: TOKEN})
                        assert r.status_code == 200, (alg, name, kind, r.get_data(as_text=True))
                    assert rt.structure is not None and rt.data is not None
                finally:
                    rt.close()
    finally:
        torch.set_num_threads(threads)
