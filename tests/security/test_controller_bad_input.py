"""Bad input to the controller's routes: each a clear 4xx naming the
problem, and the controller's state the same before and after; a second /finish answers
the same summary and makes no second run folder."""
from __future__ import annotations

import copy
import json

import pytest

from tests.unit.test_controller import manager  # noqa: F401  (a fixture: a real Manager on loopback)
from tests.security.test_bounded_input import ctl, http, JSON_HDR


def state(m) -> dict:
    """Everything a refused request must leave as it was."""
    runs = sorted(p.name for p in m.runs_dir.iterdir()) if m.runs_dir.exists() else []
    return copy.deepcopy({
        "root": m.root, "summary": m.summary, "started_at": m.started_at, "finished": m.finished.is_set(),
        "heartbeats": m.heartbeats, "run_dir": str(m.run_dir), "links": m.tb.links, "runs": runs,
        "status": http("GET", ctl(m, "/status")).json(),
    })


def refused(m, method: str, path: str, status: int, words: str, **kw) -> None:
    before = state(m)
    r = http(method, ctl(m, path), **kw)
    assert r.status_code == status, (path, r.status_code, r.text)
    assert words in r.json()["error"], (path, r.text)
    assert state(m) == before, f"{path} refused but changed the controller's state"


def test_start_with_an_unknown_root(manager):
    refused(manager, "GET", "/start?root=nope", 400, "unknown root node 'nope'")
    refused(manager, "GET", "/start?root=", 400, "")
    assert manager.started_at is None and manager.root is None


def test_update_tc_without_a_file(manager):
    refused(manager, "GET", "/update/tc", 400, "say which links file: /update/tc?file=links.json")
    refused(manager, "GET", "/update/tc?file=", 400, "say which links file")


def test_update_tc_with_a_bad_links_file(manager, tmp_path):
    before_links = copy.deepcopy(manager.tb.links)
    (tmp_path / "bad_unit.json").write_text(json.dumps({"c1": [{"dest": "c2", "bw": "5mbs"}]}))
    (tmp_path / "unknown.json").write_text(json.dumps({"c1": [{"dest": "zz", "bw": "10mbit"}]}))
    (tmp_path / "notjson.json").write_text("{c1: ")
    (tmp_path / "list.json").write_text("[1, 2]")
    refused(manager, "GET", "/update/tc?file=bad_unit.json", 400, "'5mbs'")
    refused(manager, "GET", "/update/tc?file=unknown.json", 400, "'zz'")
    refused(manager, "GET", "/update/tc?file=notjson.json", 400, "not valid JSON")
    refused(manager, "GET", "/update/tc?file=list.json", 400, "expected an object")
    refused(manager, "GET", "/update/tc?file=missing.json", 400, "no such file")
    assert manager.tb.links == before_links


@pytest.mark.parametrize("kind, tool", [("dataset", "dataset_conf.py -d"), ("structure", "_structure_conf.py -s")])
def test_conf_before_any_conf_exists(manager, tmp_path, kind, tool):
    manager.conf_dir = tmp_path / "conf"
    manager.conf_dir.mkdir()
    refused(manager, "GET", f"/conf/{kind}", 404, f"no {kind} confs in {manager.conf_dir}")
    r = http("GET", ctl(manager, f"/conf/{kind}"))
    assert tool in r.json()["error"], r.text
    assert list(manager.conf_dir.iterdir()) == []


@pytest.mark.parametrize("body", [b"garbage", b"", b"{", b"[1, 2]", b'"c1"', b"null", b'{"state": "idle"}',
                                  b'{"node": 5}', b'{"node": "c1", "round": "x"}', b"\xff\xfe\x00"])
def test_garbage_heartbeat(manager, body):
    refused(manager, "POST", "/heartbeat", 400, "", data=body, headers=JSON_HDR)
    assert manager.heartbeats == {}


def test_heartbeat_for_an_unknown_node_changes_nothing(manager):
    before = state(manager)
    r = http("POST", ctl(manager, "/heartbeat"), data=b'{"node": "zz", "state": "training", "round": 1}',
             headers=JSON_HDR)
    assert r.status_code in (200, 400, 403), r.text
    assert state(manager) == before and "zz" not in manager.heartbeats


@pytest.fixture
def node_stub(manager):
    """One real HTTP server on loopback answering every node's /log, /metrics and /stats."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/log": b"a log line\n", "/metrics": b'{"round": 1, "acc": 0.5}\n',
                    "/stats": b'{"bytes_sent": 123}'}.get(self.path.split("?")[0])
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *a):
            pass
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    for n in manager._nodes().values():
        n.ip, n.port = "127.0.0.1", srv.server_address[1]
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


def test_a_second_finish_gives_the_same_summary_and_no_second_run(manager, node_stub):
    r1 = http("GET", ctl(manager, "/finish"), timeout_s=180)
    assert r1.status_code == 200, r1.text
    runs = sorted(manager.runs_dir.iterdir())
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file()
    summary_file = (runs[0] / "summary.json").read_bytes()
    r2 = http("GET", ctl(manager, "/finish"), timeout_s=180)
    assert r2.status_code == 200, r2.text
    assert r2.json() == r1.json()
    assert sorted(manager.runs_dir.iterdir()) == runs, "a second /finish made another run folder"
    assert (runs[0] / "summary.json").read_bytes() == summary_file
    assert r1.json()["run_dir"] == str(runs[0])
