"""Readiness, not retries (the controller's half), on real netns nodes.

start() waits after `tc finish` until every app answers on its DML port, printing
`apps answering: k/N`; a node whose app never answers is named after the readiness
deadline (Testbed.ready_timeout_s, small here) and one whose app exited at once, and
nothing stays deployed. A conf push right after deploy waits for the apps and then
sends each node its conf exactly once; one before the deadline fails naming the nodes.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import ROOT

from tests.support import agents as ah
from controller import testbed as tbm
from controller.manager import Manager
from controller.testbed import DeployError, NotReady, Testbed
from dml_app import net

pytestmark = ah.need_root()

PORT = 3396                   # the controller; its embedded agent on PORT + 1
SUBNET = "10.236.0.0/24"
LISTEN = ["python3", "-m", "http.server", "4444"]     # an app that answers on its DML port
SILENT = ["sleep", "600"]                             # one that never listens


class FlManager(Manager):
    algorithm = "fl"


@contextmanager
def ready_testbed(tmp: Path, cmds: dict[str, list[str]], *, ready_timeout_s=None, links=None,
            manager_class=Manager, dataset: bool = False):
    """A netns testbed (not started) of one node per {name: argv}; always closed after,
    and then nothing of it may remain."""
    if dataset:
        from tests.support.peers import tiny_dataset
        tiny_dataset(tmp / "dataset", num_classes=10)
    (tmp / "links.json").write_text(json.dumps(links or {}))
    tb = Testbed("127.0.0.1", str(tmp), manager_class, host_port=PORT)
    tb.node_info_path = tmp / "node_info.json"
    tb.ready_timeout_s = ready_timeout_s
    emu = tb.add_emulator("emu-ready", "127.0.0.1", cpu=2, ram=4, unit="G", subnet=SUBNET)
    shares = [(tb.add_nfs("dml_app", str(ROOT / "dml_app")), "/home/worker/dml_app")]
    if dataset:
        shares.append((tb.add_nfs("dataset", str(tmp / "dataset")), "/home/worker/dataset"))
    for name, argv in cmds.items():
        node = tb.add_emulated_node(name, "/home/worker/dml_app", argv, cpu=int(2000 / len(cmds)) / 1000,
                                    ram=512, unit="M", emulator=emu)
        for share, path in shares:
            node.mount_nfs(share, path)
    tb.load_link("links.json")
    try:
        yield tb
    finally:
        tb.close()
        if tb.manager is not None:
            tb.manager.close()
    ah.assert_clean()


def served(tb: Testbed):
    """Serve the manager without start(): deploy() is then the caller's (its apps may
    still be starting when it returns)."""
    tb.manager = tb.manager_class(tb)
    tb.manager.serve()
    tb.manager.conf_dir = Path(tb.dir_name) / "conf"
    tb.manager.runs_dir = Path(tb.dir_name) / "runs"
    return tb.manager


def conf_tools(work: Path, structure: dict, datasets: dict) -> None:
    """The FL conf tools as a user runs them (CLI processes); the confs go to work/conf."""
    (work / "fl_structure.json").write_text(json.dumps(structure))
    (work / "fl_dataset.json").write_text(json.dumps(datasets))
    for argv in (["dml_tool/dataset_conf.py", "-d", str(work / "fl_dataset.json")],
                 ["dml_tool/fl_structure_conf.py", "-s", str(work / "fl_structure.json"),
                  "-l", str(work / "links.json"), "-n", str(work / "node_info.json")]):
        p = subprocess.run([sys.executable] + argv + ["-o", str(work / "conf")], cwd=ROOT,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr


@pytest.fixture
def conf_calls(monkeypatch):
    """Every net.call to a node's /conf/* route: [(url, outcome)] (counts sends, retries too)."""
    calls = []
    real = net.call

    def counting(method, url, **kw):
        if "/conf/" not in url or str(url).startswith(f"127.0.0.1:{PORT}/"):
            return real(method, url, **kw)
        try:
            r = real(method, url, **kw)
        except net.HttpError as e:
            calls.append((url, f"error: {e}"))
            raise
        calls.append((url, r.status_code))
        return r
    monkeypatch.setattr(net, "call", counting)
    return calls


def test_start_waits_and_shows_the_count(tmp_path):
    with ready_testbed(tmp_path, {"ra1": LISTEN, "ra2": LISTEN, "ra3": LISTEN}) as tb:
        said = []
        tb.start(serve_forever=False, say=said.append)
        assert "tc finish" in said
        shown = said[said.index("tc finish") + 1:]
        assert shown and shown[-1] == "apps answering: 3/3", said
        assert all(re.fullmatch(r"apps answering: [0-3]/3", m) for m in shown), said
        assert tb.ready_names == {"ra1", "ra2", "ra3"}
        st = net.get_json(f"127.0.0.1:{tb.host_port}/status")["nodes"]
        assert {n: s["app"] for n, s in st.items()} == {n: "running" for n in ("ra1", "ra2", "ra3")}


def test_a_silent_app_is_named_after_the_deadline_and_nothing_stays(tmp_path):
    with ready_testbed(tmp_path, {"rb1": LISTEN, "rb2": LISTEN, "rbsilent": SILENT}, ready_timeout_s=8) as tb:
        said = []
        with pytest.raises(NotReady) as ei:
            tb.start(serve_forever=False, say=said.append)
        e = ei.value
        assert isinstance(e, DeployError)
        msg = str(e)
        assert "rbsilent" in e.not_answering and e.exited == [], msg
        assert "rbsilent: app not answering (nothing accepts connections on 10.236.0.4:4444" in msg, msg
        assert "readiness deadline (8 s after tc finish; Testbed.ready_timeout_s sets it)" in msg, msg
        assert "/run/edgetb/agent-3397/nodes/rbsilent/stdout.log" in msg, msg
        assert msg.rstrip().endswith("everything deployed was removed"), msg
        # progress while waiting: the first count at once, never the full one
        shown = said[said.index("tc finish") + 1:]
        assert shown and all(re.fullmatch(r"apps answering: [0-2]/3", m) for m in shown), said
        # everything removed: no worker deployed, the embedded agent stopped, no server
        assert tb.deployed == {} and tb.embedded is None and tb.manager.server is None
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", PORT)) != 0, "the controller still serves"
    # ready_testbed() asserted that nothing remains on the host (namespaces, cgroups, processes...)


def test_an_app_that_exits_fails_at_once_naming_its_stdout(tmp_path):
    # A deadline far beyond the test's run: only the exit can end the wait.
    crash = ["sh", "-c", "echo rc-boom-marker; exit 3"]
    with ready_testbed(tmp_path, {"rc1": LISTEN, "rccrash": crash}, ready_timeout_s=600) as tb:
        with pytest.raises(NotReady) as ei:
            tb.start(serve_forever=False, say=lambda m: None)
        msg = str(ei.value)
        assert ei.value.exited == ["rccrash"], msg
        assert "rccrash: its app exited before answering on port 4444" in msg, msg
        assert "/run/edgetb/agent-3397/nodes/rccrash/stdout.log" in msg and "rc-boom-marker" in msg, msg
        assert "rc1" not in ei.value.exited
        assert tb.deployed == {} and tb.embedded is None


def test_a_conf_push_right_after_deploy_is_sent_once(tmp_path, conf_calls):
    names = ["rd1", "rd2", "rd3"]
    links = {"rd1": [{"dest": n, "bw": "40mbit"} for n in names[1:]],
             **{n: [{"dest": "rd1", "bw": "20mbit"}] for n in names[1:]}}
    cmds = {"rd1": ["python3", "fl_aggregator.py"], "rd2": ["python3", "fl_trainer.py"],
            "rd3": ["python3", "fl_trainer.py"]}
    with ready_testbed(tmp_path, cmds, links=links, manager_class=FlManager, dataset=True) as tb:
        tb.assign_addresses()
        tb.write_node_info()
        conf_tools(tmp_path, {"node_list": [{"name": "rd1", "trainer_fraction": 1.0, "sync": 1},
                                            {"name": "rd2", "epoch": 1}, {"name": "rd3", "epoch": 1}]},
                   {"rd1": {"test_len": 1, "test_start_index": 1, "batch_size": 4},
                    "rd2": {"train_len": 1, "train_start_index": 1, "batch_size": 4},
                    "rd3": {"train_len": 1, "train_start_index": 1, "batch_size": 4}})
        served(tb)
        tb.deploy(say=lambda m: None)
        # at once, as a user's curl right after `tc finish`: the apps are importing torch
        ctl = f"127.0.0.1:{tb.host_port}"
        for kind in ("dataset", "structure"):
            got = net.get_json(f"{ctl}/conf/{kind}", timeout_s=300)
            assert got == {n: "ok" for n in names}, got
        sent = sorted(url.rsplit(":", 1)[1] for url, _ in conf_calls)
        assert sent == sorted(f"4444/conf/{k}" for k in ("dataset", "structure") for _ in names), conf_calls
        assert all(outcome == 200 for _, outcome in conf_calls), conf_calls
        assert {url.split(":")[0] for url, _ in conf_calls} == {tb.all_nodes()[n].ip for n in names}


def test_a_conf_push_before_the_apps_answer_fails_naming_them(tmp_path, conf_calls):
    with ready_testbed(tmp_path, {"re1": LISTEN, "resilent": SILENT}, ready_timeout_s=8) as tb:
        m = served(tb)
        m.conf_dir.mkdir()
        for n in ("re1", "resilent"):
            (m.conf_dir / f"{n}_dataset.conf").write_text("{}")
        tb.deploy(say=lambda m: None)
        r = net._session().get(f"http://127.0.0.1:{tb.host_port}/conf/dataset", timeout=120)
        assert r.status_code == 503, r.text
        body = r.json()
        assert "resilent" in body["not_answering"] and body["exited"] == [], body
        assert "resilent: app not answering" in body["error"], body
        assert conf_calls == [], "a conf was sent before every app answered"


def test_the_agents_ready_is_what_counts(tmp_path, monkeypatch):
    """The controller takes each agent's `ready` as it is (the agent probes the DML port):
    an app the agent calls not ready is named even though it listens."""
    from worker.agent import Agent

    real = Agent.status

    def status(self):
        out = real(self)
        for name, n in out["nodes"].items():
            n["ready"] = name != "rfheld"
        return out
    monkeypatch.setattr(Agent, "status", status)
    with ready_testbed(tmp_path, {"rf1": LISTEN, "rfheld": LISTEN}, ready_timeout_s=6) as tb:
        with pytest.raises(NotReady) as ei:
            tb.start(serve_forever=False, say=lambda m: None)
        assert ei.value.not_answering == ["rfheld"] and ei.value.exited == [], str(ei.value)
        assert str(ei.value).startswith("1/2 apps answer on their DML port"), str(ei.value)


def test_call_once_repeats_only_what_cannot_have_arrived(conf_calls):
    # refused: nothing listens, so the request never left; it is tried again
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(net.HttpError) as ei:
        tbm.call_once("POST", f"127.0.0.1:{port}/conf/dataset", json={}, timeout_s=5)
    assert tbm.not_sent(ei.value)
    assert len(conf_calls) == tbm.CONNECT_RETRIES + 1
    # accepted but never answered (a read timeout): it may have arrived, so it is sent once
    conf_calls.clear()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        with pytest.raises(net.HttpError) as ei:
            tbm.call_once("POST", f"127.0.0.1:{srv.getsockname()[1]}/conf/dataset", json={}, timeout_s=0.5)
    assert not tbm.not_sent(ei.value) and ei.value.status is None
    assert len(conf_calls) == 1, conf_calls
