"""dml_tool/dataset_conf.py, fl_structure_conf.py and conf_utils.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import DML_TOOL
from dml_tool import conf_utils as cu
from dml_tool import dataset_conf
from dml_tool import fl_structure_conf
from dml_tool import ps_structure_conf
from dml_tool import sl_structure_conf

NODES = ["n1", "n2", "n3", "n4", "n5"]


def node_info(names=NODES, physical=("n5",)) -> dict:
    return {"emulator": {"emu1": {"ip": "127.0.0.1", "port": 3334, "backend": "netns"}},
            "emulated_node": {n: {"ip": f"10.0.0.{i + 2}", "port": 4444, "emulator": "emu1"}
                              for i, n in enumerate(names) if n not in physical},
            "physical_node": {n: {"ip": f"192.168.1.{i + 2}", "port": 5555}
                              for i, n in enumerate(names) if n in physical}}


def star_links(root="n1", others=NODES[1:]) -> dict:
    links = {root: [{"dest": n, "bw": "10mbit"} for n in others]}
    links.update({n: [{"dest": root, "bw": "5mbps"}] for n in others})
    return links


def structure(sync=10) -> dict:
    return {"node_list": [{"name": "n1", "trainer_fraction": 0.5, "sync": sync}]
            + [{"name": n, "epoch": i + 1} for i, n in enumerate(NODES[1:])]}


@pytest.fixture
def files(scratch):
    def write(name: str, obj) -> str:
        p = scratch / name
        p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return str(p)
    write("node_info.json", node_info())
    write("links.json", star_links())
    write("fl_structure.json", structure())
    write.dir = scratch
    return write


def run_structure(files, out="out"):
    d = files.dir
    return fl_structure_conf.write_confs(str(d / "fl_structure.json"), str(d / "links.json"),
                                        str(d / "node_info.json"), str(d / out))


# ----------------------------------------------------------------------------- structure

def test_structure_confs_have_edgetb_keys(files):
    paths = run_structure(files)
    d = files.dir / "out"
    assert sorted(Path(p).name for p in paths) == [f"{n}_structure.conf" for n in NODES]
    agg = json.loads((d / "n1_structure.conf").read_text())
    assert agg == {"trainer_fraction": 0.5, "sync": 10, "child_node": NODES[1:],
                   "connect": {"n2": "10.0.0.3:4444", "n3": "10.0.0.4:4444",
                               "n4": "10.0.0.5:4444", "n5": "192.168.1.6:5555"}}
    t = json.loads((d / "n3_structure.conf").read_text())
    assert t == {"epoch": 2, "father_node": "n1", "connect": {"n1": "10.0.0.2:4444"}}


def test_optional_keys_pass_through(files):
    s = structure()
    s["node_list"][0].update(seed=3, round_timeout_s=30)
    s["node_list"][1]["lr"] = 0.01
    files("fl_structure.json", s)
    run_structure(files)
    agg = json.loads((files.dir / "out" / "n1_structure.conf").read_text())
    assert agg["seed"] == 3 and agg["round_timeout_s"] == 30.0
    assert json.loads((files.dir / "out" / "n2_structure.conf").read_text())["lr"] == 0.01


def _with(entry_index: int, **changes) -> dict:
    s = structure()
    for k, v in changes.items():
        if v is None:
            s["node_list"][entry_index].pop(k, None)
        else:
            s["node_list"][entry_index][k] = v
    return s


@pytest.mark.parametrize("make, message", [
    (lambda: {"node_list": structure()["node_list"] + [{"name": "n9", "epoch": 1}]},
     r"fl_structure.json: node_list\[5\] 'n9': unknown node \(node_info.json has n1, n2"),
    (lambda: {"node_list": structure()["node_list"] + [{"name": "n3", "epoch": 1}]},
     r"fl_structure.json: node_list\[5\] 'n3': duplicate node, listed twice \(also node_list\[2\]\)"),
    (lambda: _with(0, sync=None), r"node_list\[0\] 'n1' \(aggregator\): missing key 'sync'"),
    (lambda: _with(0, trainer_fraction=None), r"'n1' \(aggregator\): missing key 'trainer_fraction'"),
    (lambda: _with(2, epoch=None), r"node_list\[2\] 'n3' \(trainer\): missing key 'epoch'"),
    (lambda: {"node_list": [{"name": "n1", "trainer_fraction": 1, "sync": 1}, {"epoch": 1}]},
     r"node_list\[1\]: missing key 'name'"),
    (lambda: _with(0, trainer_fraction=0), r"trainer_fraction: expected a number in \(0.0, 1.0\], got 0"),
    (lambda: _with(0, trainer_fraction=1.5), r"trainer_fraction: expected a number in \(0.0, 1.0\]"),
    (lambda: _with(0, sync=0), r"sync: expected an integer >= 1, got 0"),
    (lambda: _with(1, epoch="2"), r"'n2' \(trainer\).epoch: expected an integer >= 1, got '2'"),
    (lambda: _with(1, epohc=2), r"'n2' \(trainer\): unknown key\(s\) \['epohc'\]"),
    (lambda: {"node_list": [{"name": "n1", "trainer_fraction": 1, "sync": 1}]}, "at least one trainer"),
    (lambda: {"nodes": []}, r"expected \{\"node_list\""),
])
def test_structure_errors_name_file_and_key(files, make, message):
    files("fl_structure.json", make())
    with pytest.raises(cu.ConfError, match=message):
        run_structure(files)
    assert not (files.dir / "out").exists()  # nothing half-written


def test_missing_link_trainer_to_aggregator(files):
    links = star_links()
    links["n4"] = []
    files("links.json", links)
    with pytest.raises(cu.ConfError, match=r"links.json: no link from trainer 'n4' to its aggregator 'n1'"):
        run_structure(files)


def test_missing_link_aggregator_to_trainer(files):
    links = star_links()
    links["n1"] = [l for l in links["n1"] if l["dest"] != "n2"]
    files("links.json", links)
    with pytest.raises(cu.ConfError, match=r"links.json: no link from aggregator 'n1' to its trainer 'n2'"):
        run_structure(files)


@pytest.mark.parametrize("links, message", [
    ({"n1": [{"dest": "n7", "bw": "1mbit"}]}, r"links.json: n1\[0\].dest: unknown node 'n7'"),
    ({"n8": [{"dest": "n1", "bw": "1mbit"}]}, r"links.json: 'n8': unknown node"),
    ({"n1": [{"dest": "n2", "bw": "1mbit"}, {"dest": "n2", "bw": "2mbit"}]},
     r"links.json: n1\[1\].dest: duplicate link from 'n1' to 'n2' \(also n1\[0\]\)"),
    ({"n1": [{"bw": "1mbit"}]}, r"links.json: n1\[0\]: missing key 'dest'"),
    ('{"n1": [], "n1": []}', r"links.json: key 'n1' appears twice"),
    ('{"n1": [}', r"links.json: invalid JSON at line 1 column 9"),
])
def test_link_errors(files, links, message):
    files("links.json", links)
    with pytest.raises(cu.ConfError, match=message):
        run_structure(files)


def test_node_info_errors(files):
    info = node_info()
    info["physical_node"]["n2"] = {"ip": "1.2.3.4", "port": 4444}
    files("node_info.json", info)
    with pytest.raises(cu.ConfError, match=r"node_info.json: physical_node.n2: duplicate node"):
        run_structure(files)
    info = node_info()
    info["emulated_node"]["n2"]["port"] = 70000
    files("node_info.json", info)
    with pytest.raises(cu.ConfError, match=r"node_info.json: emulated_node.n2.port: 70000"):
        run_structure(files)
    with pytest.raises(cu.ConfError, match="no such file"):
        cu.load_node_info(str(files.dir / "missing.json"))


def test_structure_cli(files):
    d = files.dir
    r = subprocess.run([sys.executable, str(DML_TOOL / "fl_structure_conf.py"), "-s", "fl_structure.json",
                        "-l", str(d / "links.json"), "-n", str(d / "node_info.json"), "-o", str(d / "o")],
                       cwd=d, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 5 and (d / "o" / "n1_structure.conf").exists()
    files("fl_structure.json", {"node_list": [{"name": "n1", "sync": 1}, {"name": "n2", "epoch": 1}]})
    r = subprocess.run([sys.executable, str(DML_TOOL / "fl_structure_conf.py"), "-s", "fl_structure.json",
                        "-l", str(d / "links.json"), "-n", str(d / "node_info.json"), "-o", str(d / "o")],
                       cwd=d, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "fl_structure.json: node_list[0] 'n1' (aggregator): missing key 'trainer_fraction'" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- dataset

def test_dataset_confs_written_per_node_with_defaults(scratch):
    src = scratch / "ds.json"
    src.write_text(json.dumps({"defaults": {"batch_size": 16},
                               "n1": {"test_len": 10, "test_start_index": 1},
                               "n2": {"train_len": 5, "train_start_index": 6, "batch_size": 64}}))
    paths = dataset_conf.write_confs(str(src), str(scratch / "conf"))
    assert [Path(p).name for p in paths] == ["n1_dataset.conf", "n2_dataset.conf"]
    assert json.loads(Path(paths[0]).read_text()) == {"batch_size": 16, "test_len": 10, "test_start_index": 1}
    assert json.loads(Path(paths[1]).read_text())["batch_size"] == 64


def test_edgetb_dataset_format_unchanged(scratch):
    # The entries of EdgeTB's documentation, as they are.
    src = scratch / "dataset.json"
    src.write_text('{"n1": {"test_len": 100, "test_start_index": 1, "batch_size": 32},\n'
                   ' "n2": {"train_len": 10, "train_start_index": 21, "batch_size": 16},\n'
                   ' "n3": {"test_len": 5, "test_start_index": 1, "train_len": 20, '
                   '"train_start_index": 3, "batch_size": 64}}')
    paths = dataset_conf.write_confs(str(src), str(scratch / "conf"))
    assert json.loads(Path(paths[2]).read_text())["train_start_index"] == 3


@pytest.mark.parametrize("body, message", [
    ({"n1": {"trian_len": 1}}, r"ds.json: n1: unknown key\(s\) \['trian_len'\]"),
    ({"n1": {"train_len": -1}}, r"ds.json: n1.train_len: expected an integer in \[0, 100000\], got -1"),
    ({"n1": {"train_len": 1, "train_start_index": 0}}, r"n1.train_start_index: expected an integer in \[1, 1000000\]"),
    ({"n1": {"train_len": 1, "batch_size": 0}}, r"n1.batch_size: expected an integer in \[1, 1048576\]"),
    ({"n1": {"batch_size": 8}}, r"n1: neither train_len nor test_len"),
    ({"../x": {"train_len": 1}}, r"'../x' is not a valid node name"),
    ({"defaults": {"bs": 1}, "n1": {"train_len": 1}}, r"ds.json: defaults: unknown key"),
    ({"n1": [1]}, r"ds.json: n1: expected an object"),
    ({}, r"expected an object of node name"),
])
def test_dataset_errors(scratch, body, message):
    src = scratch / "ds.json"
    src.write_text(json.dumps(body))
    with pytest.raises(cu.ConfError, match=message):
        dataset_conf.write_confs(str(src), str(scratch / "conf"))
    assert not (scratch / "conf").exists()


def test_dataset_cli_finds_file_next_to_the_tool(scratch):
    r = subprocess.run([sys.executable, str(DML_TOOL / "dataset_conf.py"), "-d", "fl_dataset.json",
                        "-o", str(scratch)], cwd=scratch, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in scratch.iterdir()) == [f"{n}_dataset.conf" for n in NODES]
    r = subprocess.run([sys.executable, str(DML_TOOL / "dataset_conf.py"), "-d", "nope.json"],
                       cwd=scratch, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope.json: no such file" in r.stderr


# ----------------------------------------------------------------------------- the shipped examples

def test_default_experiment_examples(scratch):
    """n1 tests on parts 1..10; n2..n5 train on 10 disjoint parts each of 40; fraction 1.0."""
    ds = dataset_conf.build_confs(cu.read_json(str(DML_TOOL / "fl_dataset.json")))
    assert ds["n1"]["test_len"] == 10 and ds["n1"]["test_start_index"] == 1
    spans = sorted((ds[n]["train_start_index"], ds[n]["train_len"]) for n in NODES[1:])
    assert spans == [(1, 10), (11, 10), (21, 10), (31, 10)]
    (scratch / "node_info.json").write_text(json.dumps(node_info()))
    (scratch / "links.json").write_text(json.dumps(star_links()))
    paths = fl_structure_conf.write_confs(str(DML_TOOL / "fl_structure.json"), str(scratch / "links.json"),
                                          str(scratch / "node_info.json"), str(scratch / "conf"))
    agg = json.loads(Path(paths[0]).read_text())
    assert agg["trainer_fraction"] == 1.0 and agg["child_node"] == NODES[1:]


# ----------------------------------------------------------------------------- serverless (sl)

def sl_structure(**changes) -> dict:
    s = {"steps": 100, "lr": 0.05, "eval_every": 20,
         "params": {"batch_sz_train": 32, "epoch_n": 1, "update_intv": 2},
         "data": [{"train_start_index": 1 + 10 * i, "train_len": 10} for i in range(4)],
         "rounds": 8, "concurrency": 3, "deadline_s": 30,
         "node_list": [{"name": "n1", "role": "server"}] + [{"name": n} for n in NODES[1:]]}
    for k, v in changes.items():
        if v is None:
            s.pop(k, None)
        else:
            s[k] = v
    return s


def run_sl(files, out="out"):
    d = files.dir
    return sl_structure_conf.write_confs(str(d / "sl_structure.json"), str(d / "links.json"),
                                         str(d / "node_info.json"), str(d / out))


def test_sl_structure_confs(files):
    files("sl_structure.json", sl_structure(params={"batch_sz_train": 16, "epoch_n": 2, "update_intv": 5,
                                                    "lr": 0.1, "seed": 3}, seed=7, lr_end=0.02))
    paths = run_sl(files)
    d = files.dir / "out"
    assert sorted(Path(p).name for p in paths) == [f"{n}_structure.conf" for n in NODES]
    server = json.loads((d / "n1_structure.conf").read_text())
    assert server == {
        "role": "server", "serverless": True, "mode": "async", "actions": NODES[1:], "steps": 100, "lr": 0.05,
        "lr_end": 0.02, "momentum": 0.0, "max_staleness": 3, "eval_every": 20, "seed": 7,   # max_staleness: the concurrency
        "invoker": {"pool": NODES[1:], "rounds": 8, "concurrency": 3, "deadline_s": 30.0, "retries": 1,
                    "params": {"batch_sz_train": 16, "epoch_n": 2, "update_intv": 5, "lr": 0.1, "seed": 3},
                    "data": [{"train_start_index": 1 + 10 * i, "train_len": 10} for i in range(4)]}}
    assert json.loads((d / "n3_structure.conf").read_text()) == {
        "role": "action", "server": "n1", "connect": {"n1": "10.0.0.2:4444"}}
    # the checks SlManager runs again at /start accept what the tool wrote
    assert sl_structure_conf.invoker_settings(server["invoker"], "x") == server["invoker"]


@pytest.mark.parametrize("changes, message", [
    ({"mode": "sync"}, r"sl_structure.json.mode: serverless workers come and go.*\"async\"; got 'sync'"),
    ({"steps": 0}, r"sl_structure.json.steps: expected an integer in \[1, 1000000000\], got 0"),
    ({"lr": 0}, r"sl_structure.json.lr: expected a number in \(0.0, 10.0\], got 0"),
    ({"lr_end": -1}, r"sl_structure.json.lr_end: expected a number in \[0.0, 10.0\], got -1"),
    ({"params": None}, r"sl_structure.json: missing 'params'"),
    ({"rounds": None}, r"sl_structure.json: missing 'rounds'"),
    ({"params": {"batch_sz_train": 0, "epoch_n": 1, "update_intv": 1}},
     r"sl_structure.json.params.batch_sz_train: expected an integer in \[1, 4096\], got 0"),
    ({"params": {"batch_sz_train": 8, "epoch_n": 1}}, r"sl_structure.json.params: missing key 'update_intv'"),
    ({"params": {"batch_sz_train": 8, "epoch_n": 1, "update_intv": 1, "device": "cuda"}},
     r"sl_structure.json.params: unknown key\(s\) \['device'\]"),
    ({"params": {"batch_sz_train": 8, "epoch_n": 1, "update_intv": 1.5}},
     r"params.update_intv: expected an integer in \[1, 10000\], got 1.5"),
    ({"data": []}, r"sl_structure.json.data: expected a list of 1..1024 objects"),
    ({"data": [{"train_start_index": 0, "train_len": 10}]},
     r"sl_structure.json.data\[0\].train_start_index: expected an integer in \[1, 1000000\], got 0"),
    ({"data": [{"train_len": 10}]}, r"sl_structure.json.data\[0\]: missing key 'train_start_index'"),
    ({"concurrency": 5}, r"sl_structure.json.concurrency: expected an integer in \[1, 4\], got 5"),
    ({"deadline_s": float("nan")}, r"sl_structure.json.deadline_s: expected a number in \[1.0, 3600.0\]"),
    ({"rounds": True}, r"sl_structure.json.rounds: expected an integer"),
    ({"workers": ["n2"]}, r"sl_structure.json: unknown key\(s\) \['workers'\]"),
    ({"node_list": [{"name": "n1", "role": "server"}, {"name": "n2", "role": "worker"}]},
     r"node_list\[1\] 'n2'.role: expected 'server' or 'action', got 'worker'"),
    ({"node_list": [{"name": "n1", "role": "server"}, {"name": "n2", "role": "server"}]},
     r"node_list\[1\] 'n2': a second server \(node_list\[0\] 'n1' is one\)"),
    ({"node_list": [{"name": "n2"}, {"name": "n3"}]}, r"needs one node with \"role\": \"server\" and at least one"),
    ({"node_list": [{"name": "n1", "role": "server"}, {"name": "n9"}]}, r"node_list\[1\] 'n9': unknown node"),
])
def test_sl_structure_errors(files, changes, message):
    files("sl_structure.json", json.dumps(sl_structure(**changes)).replace("NaN", "1e999"))
    with pytest.raises(cu.ConfError, match=message):
        run_sl(files)
    assert not (files.dir / "out").exists()  # nothing half-written


def test_sl_missing_links(files):
    links = star_links()
    links["n4"] = []
    files("links.json", links)
    files("sl_structure.json", sl_structure())
    with pytest.raises(cu.ConfError, match=r"links.json: no link from 'n4' to 'n1' .*'n4' \(action\)\): it "
                                           r"carries the gradients"):
        run_sl(files)
    links = star_links()
    links["n1"] = [l for l in links["n1"] if l["dest"] != "n2"]
    files("links.json", links)
    with pytest.raises(cu.ConfError, match=r"no link from 'n1' to 'n2' .*it carries the parameters"):
        run_sl(files)


def test_sl_invoker_settings_read_back_are_checked():
    good = {"pool": ["n2", "n3"], "params": {"batch_sz_train": 8, "epoch_n": 1, "update_intv": 1},
            "data": [{"train_start_index": 1, "train_len": 1}], "rounds": 2}
    assert sl_structure_conf.invoker_settings(good, "n1_structure.conf.invoker")["concurrency"] == 2
    for bad, message in (
            (None, r"n1_structure.conf.invoker: expected an object"),
            ({**good, "pool": ["n2", "n2"]}, r"invoker.pool: expected a list of distinct action node names"),
            ({**good, "pool": ["../x"]}, r"not a valid node name"),
            ({**good, "concurrency": 3}, r"invoker.concurrency: expected an integer in \[1, 2\], got 3"),
            ({**good, "retries": -1}, r"invoker.retries: expected an integer in \[0, 10\], got -1"),
            ({**good, "extra": 1}, r"invoker: unknown key\(s\) \['extra'\]")):
        with pytest.raises(cu.ConfError, match=message):
            sl_structure_conf.invoker_settings(bad, "n1_structure.conf.invoker")


def test_sl_shipped_examples(scratch):
    """n1 serves with the 10 test parts (no action node gets a dataset conf); 4 data parts
    of 10 disjoint train parts each; the structure tool accepts sl_structure.json as shipped."""
    ds = dataset_conf.build_confs(cu.read_json(str(DML_TOOL / "sl_dataset.json")))
    assert ds == {"n1": {"test_len": 10, "test_start_index": 1, "batch_size": 64}}
    (scratch / "node_info.json").write_text(json.dumps(node_info()))
    (scratch / "links.json").write_text(json.dumps(star_links()))
    paths = sl_structure_conf.write_confs(str(DML_TOOL / "sl_structure.json"), str(scratch / "links.json"),
                                          str(scratch / "node_info.json"), str(scratch / "conf"))
    server = json.loads(Path(paths[0]).read_text())
    assert server["serverless"] is True and server["actions"] == NODES[1:]
    spans = sorted((p["train_start_index"], p["train_len"]) for p in server["invoker"]["data"])
    assert spans == [(1, 10), (11, 10), (21, 10), (31, 10)]
    r = subprocess.run([sys.executable, str(DML_TOOL / "sl_structure_conf.py"), "-s", "sl_structure.json",
                        "-l", str(scratch / "links.json"), "-n", str(scratch / "node_info.json"),
                        "-o", str(scratch / "cli")], cwd=scratch, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and len(r.stdout.split()) == 5, r.stderr


def test_ps_structure_lr_end_is_written_when_given_and_checked(files):
    """The server's lr may fall linearly to `lr_end` (ps and sl tools alike); the conf
    carries it only when the structure gives it, and a bad one names the key."""
    d = files.dir
    base = {"mode": "async", "steps": 50, "lr": 0.05, "node_list": [{"name": "n1", "role": "server"}, {"name": "n2"}]}

    def server(**changes):
        files("ps_structure.json", {**base, **changes})
        ps_structure_conf.write_confs(str(d / "ps_structure.json"), str(d / "links.json"),
                                      str(d / "node_info.json"), str(d / "ps_out"))
        return json.loads((d / "ps_out" / "n1_structure.conf").read_text())

    assert server(lr_end=0.01)["lr_end"] == 0.01
    assert "lr_end" not in server()
    with pytest.raises(cu.ConfError, match=r"ps_structure.json.lr_end: expected a number in \[0.0, 10.0\]"):
        server(lr_end="fast")
