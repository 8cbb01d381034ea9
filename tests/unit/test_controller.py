"""The controller refuses bad definitions before deploying anything, and guards its API."""
import json
from pathlib import Path

import pytest

from tests.support import ROOT

from controller.manager import Manager
from controller.testbed import DefinitionError, Testbed
from dml_app import net


def _namespaces() -> set[str]:
    from tests.support import agents as ah
    return set(ah.netns_list())


def make_testbed(tmp_path, links: dict, *, names=("c1", "c2", "c3"), cpu=0.5, ram_mb=256,
                 node_path="/home/worker/dml_app") -> Testbed:
    lf = tmp_path / "links.json"
    lf.write_text(json.dumps(links))
    tb = Testbed("127.0.0.1", str(tmp_path), Manager, host_port=0)
    tb.node_info_path = tmp_path / "node_info.json"
    emu = tb.add_emulator("emu-t", "127.0.0.1", cpu=2, ram=1, unit="G", subnet="10.239.0.0/24")
    for n in names:
        node = tb.add_emulated_node(n, "/home/worker/dml_app", ["sleep", "60"], cpu=cpu,
                                    ram=ram_mb, unit="M", emulator=emu)
        node.mount_local_path(str(ROOT / "dml_app"), node_path)
    tb.load_link(str(lf))
    return tb


def refused(tb: Testbed) -> str:
    before = _namespaces()
    with pytest.raises(DefinitionError) as ei:
        tb.deploy(say=lambda m: None)
    assert _namespaces() == before, "a refused definition must deploy nothing"
    assert tb.embedded is None, "not even the embedded agent starts"
    return str(ei.value)


def test_unknown_node_in_links_names_file_and_key(tmp_path):
    msg = refused(make_testbed(tmp_path, {"c1": [{"dest": "nope", "bw": "10mbit"}]}))
    assert "links.json" in msg and 'c1[0].dest' in msg and "'nope'" in msg


def test_unknown_source_node(tmp_path):
    msg = refused(make_testbed(tmp_path, {"zz": [{"dest": "c1", "bw": "10mbit"}]}))
    assert "'zz': unknown node" in msg


def test_bad_unit_is_refused_with_tc_units(tmp_path):
    msg = refused(make_testbed(tmp_path, {"c1": [{"dest": "c2", "bw": "5mbs"}]}))
    assert 'c1[0].bw' in msg and "'5mbs'" in msg and "mbit" in msg


def test_duplicate_node_names(tmp_path):
    msg = refused(make_testbed(tmp_path, {}, names=("c1", "c2", "c1")))
    assert "duplicate name 'c1'" in msg


def test_more_cpu_than_the_emulator(tmp_path):
    msg = refused(make_testbed(tmp_path, {}, cpu=1.0))   # 3 x 1.0 > 2
    assert "emulator emu-t" in msg and "cpu" in msg


def test_more_ram_than_the_emulator(tmp_path):
    msg = refused(make_testbed(tmp_path, {}, ram_mb=512))  # 3 x 512 MB > 1 GB
    assert "emulator emu-t" in msg and "ram" in msg


def test_relative_node_path(tmp_path):
    msg = refused(make_testbed(tmp_path, {}, node_path="worker/dml_app"))
    assert "node path 'worker/dml_app' must be absolute" in msg


def test_every_problem_is_listed_at_once(tmp_path):
    msg = refused(make_testbed(tmp_path, {"c1": [{"dest": "c9", "bw": "1xb"}]}, cpu=1.0))
    assert "c9" in msg and "1xb" in msg and "cpu" in msg


@pytest.fixture
def manager(tmp_path):
    tb = make_testbed(tmp_path, {})
    m = Manager(tb)
    m.runs_dir = tmp_path / "runs"
    m.server = net.serve(m.app, "127.0.0.1", 0)
    tb.host_port = m.server.port
    try:
        yield m
    finally:
        m.close()


def test_log_name_cannot_leave_the_run_folder(manager, tmp_path):
    with pytest.raises(net.HttpError) as ei:
        net.call("POST", f"127.0.0.1:{manager.server.port}/log", params={"name": "../../etc/x"}, data=b"x")
    assert ei.value.status == 400 and "bad node name" in ei.value.message
    assert not list(tmp_path.rglob("x")) and not Path("/etc/x").exists()
    net.call("POST", f"127.0.0.1:{manager.server.port}/log", params={"name": "c1"}, data=b"ok")
    assert (manager.run_dir / "c1.log").read_text() == "ok"


def test_token_required_from_other_hosts(manager):
    # Loopback is the user's own shell (EdgeTB's curl workflow); any other address
    # (a node, another machine) must carry the admin token.
    client = manager.app.test_client()
    r = client.get("/status", environ_base={"REMOTE_ADDR": "10.239.0.7"})
    assert r.status_code == 401
    r = client.post("/emulated/reset", environ_base={"REMOTE_ADDR": "10.239.0.7"})
    assert r.status_code == 401
    r = client.get("/status", environ_base={"REMOTE_ADDR": "10.239.0.7"},
                   headers={net.TOKEN_HEADER: manager.tb.token})
    assert r.status_code == 200
    assert net.get_json(f"127.0.0.1:{manager.server.port}/status")["nodes"]["c1"]["state"] == "not deployed"


def test_update_tc_refuses_a_bad_file_and_changes_nothing(manager, tmp_path):
    bad = tmp_path / "bad_links.json"
    bad.write_text(json.dumps({"c1": [{"dest": "c2", "bw": "fast"}]}))
    good = tmp_path / "good_links.json"
    good.write_text(json.dumps({"c1": [{"dest": "c2", "bw": "10mbit"}]}))
    manager.tb.links = {"c2": [{"dest": "c3", "bw": "5mbit"}]}
    ctl = f"127.0.0.1:{manager.server.port}"

    def state():
        return (json.dumps(manager.tb.links, sort_keys=True), manager.tb.links_file,
                net.get_json(f"{ctl}/status"), _namespaces())

    before = state()
    with pytest.raises(net.HttpError) as ei:
        net.call("GET", f"{ctl}/update/tc", params={"file": str(bad)})
    assert ei.value.status == 400 and "fast" in ei.value.message
    assert state() == before, "a refused links file changed the controller's state"
    # the state compared is the one /update/tc does change when the file is good
    net.call("GET", f"{ctl}/update/tc", params={"file": str(good)})
    assert manager.tb.links == {"c1": [{"dest": "c2", "bw": "10mbit"}]}
