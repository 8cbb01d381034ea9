"""The data side of the live dashboard: controller/dashboard.py's routes,
stream, live metrics, usage sampling and link fidelity, over real HTTP.

* a real FL run on netns nodes while a client reads /api/stream: node states and rounds
  appear, the root's accuracy records arrive before /finish, no record twice, the nodes'
  cpu and memory; summary.json has link_fidelity; then, on the same nodes, a shaped link
  loaded by iperf3 shows achieved_bps within 5% of iperf3's own measurement and
  /api/fidelity judges it ok;
* heartbeats carry metrics once (a resent heartbeat stores nothing twice, a restarted
  app numbers from 1 again), bad ones get 400 and change nothing;
* access: every new route 401 for another local user without a credential (GET / a
  sign-in page), 403 for a cross-site Origin; /login gives a session cookie that opens
  the dashboard's routes only; a static path out of the folder 404; the stream limit 503;
* bounds: a 300-node full-mesh state is under 1 MB, a metrics page under its bounds.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest


from tests.support import agents as ah
from controller import dashboard
from controller.manager import Manager
from dml_app import net
from tests.support.procs import wait_until
from tests.security.test_access import NOBODY, curl_as, need_root, served  # noqa: F401  (served: a fixture)
from tests.unit.test_controller import make_testbed

NEW_GET_ROUTES = ["/", "/static/app.js", "/api/state", "/api/metrics", "/api/events", "/api/fidelity",
                  "/api/runs", "/api/stream", "/runs/x/summary.json"]


class FlManager(Manager):
    algorithm = "fl"


# ----------------------------------------------------------------------------- SSE client

class StreamReader:
    """Reads /api/stream over real HTTP on a thread: every (arrival time, event, data)."""

    def __init__(self, url: str, headers: dict | None = None):
        import requests

        self.got: list[tuple[float, str, object]] = []
        self.error: Exception | None = None
        self._stop = threading.Event()
        self.resp = requests.get(url, stream=True, timeout=(5, 30),
                                 headers={"Accept": "text/event-stream", **(headers or {})})
        assert self.resp.status_code == 200, (self.resp.status_code, self.resp.text[:300])
        assert self.resp.headers["Content-Type"].startswith("text/event-stream")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        event, data = None, []
        try:
            for line in self.resp.iter_lines(decode_unicode=True):
                if self._stop.is_set():
                    return
                if line == "":
                    if event is not None:
                        self.got.append((time.time(), event, json.loads("\n".join(data))))
                    event, data = None, []
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
        except Exception as e:  # noqa: BLE001 - shown by the test
            if not self._stop.is_set():
                self.error = e

    def of(self, event: str) -> list[tuple[float, object]]:
        return [(t, d) for t, e, d in list(self.got) if e == event]

    def wait_for(self, what, timeout_s: float, why: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = what()
            if got:
                return got
            assert self.error is None, self.error
            time.sleep(0.2)
        raise AssertionError(f"stream: no {why} within {timeout_s} s")

    def close(self):
        self._stop.set()
        self.resp.close()
        self.thread.join(10)


# ----------------------------------------------------------------------------- the real run

FL_NAMES = ["da1", "dt2", "dt3", "dt4"]
SHAPED_BW = "20mbit"
SHAPED_BPS = 20_000_000


@pytest.fixture
def fl_bed(tmp_path):
    from tests.support.workflow import netns_testbed

    links = {"da1": [{"dest": n, "bw": "40mbit"} for n in FL_NAMES[1:]],
             "dt2": [{"dest": "da1", "bw": SHAPED_BW}], "dt3": [{"dest": "da1", "bw": "10mbit"}],
             "dt4": [{"dest": "da1", "bw": "10mbit"}]}
    roles = {n: "fl_aggregator.py" if n == "da1" else "fl_trainer.py" for n in FL_NAMES}
    with netns_testbed(tmp_path, FlManager, roles, links, port=3356, subnet="10.236.0.0/24") as (tb, manager):
        yield tb, manager, tmp_path


def _records(stream: StreamReader) -> list[dict]:
    return [r for _, d in stream.of("metrics") for r in d["records"]]


@pytest.mark.root
@pytest.mark.iperf3
@pytest.mark.timeout(300)
def test_live_dashboard_during_a_real_fl_run_and_an_iperf3_flow(fl_bed):
    from tests.support.workflow import run_workflow

    tb, manager, tmp = fl_bed
    base = f"http://127.0.0.1:{tb.host_port}"
    stream = StreamReader(base + "/api/stream")
    finished_at: list[float] = []
    try:
        first = stream.wait_for(lambda: stream.of("state"), 10, "first state")
        assert {n["name"] for n in first[0][1]["nodes"]} == set(FL_NAMES)
        assert stream.wait_for(lambda: stream.of("events"), 10, "events")[0][1] == {"events": []}
        summary = run_workflow(tb, manager, tmp, alg="fl", root="da1", timeout_s=240, dataset={
            "da1": {"test_len": 10, "test_start_index": 1, "batch_size": 64},
            **{n: {"train_len": 10, "train_start_index": 1 + 10 * i, "batch_size": 32}
               for i, n in enumerate(FL_NAMES[1:])}}, structure={"node_list": [
                {"name": "da1", "trainer_fraction": 1.0, "sync": 4}] + [{"name": n, "epoch": 5} for n in FL_NAMES[1:]]})
        # the run as the stream showed it, up to a state that says it finished
        done = [t for t, _ in stream.wait_for(lambda: [(t, d) for t, d in stream.of("state") if d["run"]["finished"]],
                                              10, "a finished state")]
        finished_at.append(done[0])
        states = [d for _, d in stream.of("state")]
        seen = {(n["name"], n["state"]) for d in states for n in d["nodes"]}
        # the trainers' work shows (heartbeats every 2 s catch some of its states: 5 epochs make
        # a round's training ~2 s, one epoch's 0.4 s slipped between them), and the end: the
        # root that called /finish is finished
        assert {st for n, st in seen if n != "da1"} - {"idle", "running", "not deployed"}, sorted(seen)
        assert ("da1", "finished") in seen, sorted(seen)
        assert any(n["round"] and n["round"] >= 2 for d in states for n in d["nodes"]), "no rounds shown"
        assert any(d["run"]["root"] == "da1" and d["run"]["rounds"] == 4 and d["run"]["started"] for d in states)
        assert any(n["cpu_pct"] and n["cpu_pct"] > 1 for d in states for n in d["nodes"]), "no cpu use shown"
        assert any(n["mem_mb"] and n["mem_mb"] > 10 for d in states for n in d["nodes"]), "no memory shown"
        assert all(n["kind"] == "netns" and n["worker"] for n in states[-1]["nodes"]), states[-1]["nodes"]
        assert {n["role"] for n in states[-1]["nodes"]} == {"fl_aggregator", "fl_trainer"}
        # accuracy arrived live: before the run was finished
        recs = _records(stream)
        aggs = [(t, r) for t, d in stream.of("metrics") for r in d["records"] if r["event"] == "aggregate"]
        assert aggs and aggs[0][0] < finished_at[0], "no aggregate record before /finish"
        # every record once, in order; the same as the nodes' own files once all arrived
        run_dir = Path(summary["run_dir"])

        def complete():
            got = _records(stream)
            want = sum(len([l for l in (run_dir / f"{n}.metrics.jsonl").read_text().splitlines() if l.strip()])
                       for n in FL_NAMES)
            return len(got) >= want and got
        recs = stream.wait_for(complete, 15, "every record of the metrics files")
        seqs = [r["seq"] for r in recs]
        assert seqs == sorted(set(seqs)), "a record came twice or out of order"
        keys = [(r["node"], r["event"], r["round"], r["t"]) for r in recs]
        assert len(keys) == len(set(keys)), "the same record stored twice"
        for n in FL_NAMES:
            file_recs = [json.loads(l) for l in (run_dir / f"{n}.metrics.jsonl").read_text().splitlines() if l.strip()]
            live = [r for r in recs if r["node"] == n]
            assert [(r["event"], r["round"]) for r in live] == [(r["event"], r["round"]) for r in file_recs], n
        assert [r["accuracy"] for r in recs if r["event"] == "aggregate"] == \
            [p["accuracy"] for p in summary["accuracy_per_round"]]
        page = net.get_json(base + "/api/metrics?after=0")
        assert [r["seq"] for r in page["records"]][:len(seqs)] == seqs[:len(page["records"])]
        # summary.json has the fidelity object
        saved = json.loads((run_dir / "summary.json").read_text())
        assert set(saved["link_fidelity"]) >= {"tolerance_pct", "links"} and saved["link_fidelity"]["tolerance_pct"] == 2
        # the page's picture at /finish (controller/browser.py), or why not without a browser
        if shutil.which("chromium") and os.environ.get("EDGETB_SCREENSHOT", "1") != "0":
            assert saved["dashboard"] == "dashboard.png", saved["dashboard"]
            assert (run_dir / "dashboard.png").read_bytes()[:4] == b"\x89PNG"
        else:
            assert saved["dashboard"].startswith("no screenshot"), saved["dashboard"]
        runs = net.get_json(base + "/api/runs")["runs"]
        assert runs[0]["name"] == run_dir.name and runs[0]["summary"]["rounds"] == 4
        assert "accuracy.png" in runs[0]["plots"]
        png = net.call("GET", f"{base}/runs/{run_dir.name}/accuracy.png")
        assert png.headers["Content-Type"] == "image/png" and png.content[:4] == b"\x89PNG"

        # ---- a shaped link loaded by iperf3: dt2 -> da1 (its app killed, iperf3 on its port)
        assert manager.node_fault("da1", "kill")["ok"]
        ip, port = tb.emulated["da1"].ip, tb.emulated["da1"].port
        server = subprocess.Popen(["ip", "netns", "exec", "etb-da1", "iperf3", "-s", "-1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            t0 = time.time()
            got = ah.iperf("etb-dt2", "etb-da1", ip, port, seconds=6, omit_s=1, rate_hint_bps=SHAPED_BPS,
                           attempts=1)
            t1 = time.time()
        finally:
            try:
                os.killpg(server.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            server.wait(10)
        # the samples wholly inside the flow (after its first second: TCP's start)
        stream.wait_for(lambda: [t for t, _ in stream.of("state") if t > t1 + 1.5], 10, "a state after the flow")
        achieved = [l["achieved_bps"] for t, d in stream.of("state") if t0 + 2.5 < t < t1
                    for l in d["links"] if (l["src"], l["dst"]) == ("dt2", "da1") and l["achieved_bps"]]
        assert len(achieved) >= 3, achieved
        mid = statistics.median(achieved)
        print(f"\niperf3 dt2 -> da1 ({SHAPED_BW}): {got / 1e6:.3f} Mbit/s; dashboard achieved "
              f"{mid / 1e6:.3f} Mbit/s (median) over {len(achieved)} samples "
              f"({[round(a / 1e6, 3) for a in achieved]})")
        # the median: a sample whose window still held the flow's start or end reads low
        assert abs(mid / got - 1) <= 0.05, (achieved, got)
        link = next(l for l in stream.of("state")[-1][1]["links"] if (l["src"], l["dst"]) == ("dt2", "da1"))
        assert link["rate_bps"] == SHAPED_BPS and link["down"] is False
        fid = net.get_json(base + "/api/fidelity")
        judged = [l for l in fid["links"] if (l["src"], l["dst"]) == ("dt2", "da1")]
        assert judged and judged[0]["saturated_s"] >= 3, fid
        print(f"fidelity: {judged[0]}")
        assert judged[0]["ok"], judged[0]
        assert judged[0]["ideal_bps"] == round(SHAPED_BPS * 1448 / 1514)
        # the killed app shows as exited
        stream.wait_for(lambda: any(n["name"] == "da1" and n["state"] == "exited"
                                    for n in stream.of("state")[-1][1]["nodes"]), 10, "da1 exited")
        assert stream.error is None, stream.error
    finally:
        stream.close()


# ----------------------------------------------------------------------------- heartbeats

def _hb(base, token, node, records, boot="b1", dropped=0):
    return net.call("POST", base + "/heartbeat", token=token, json={
        "node": node, "state": "training", "round": 1,
        "metrics": {"boot": boot, "dropped": dropped, "records": records}})


def test_heartbeat_metrics_are_stored_once_and_acked(served):
    m = served()
    base = f"http://127.0.0.1:{m.server.port}"
    c1 = m.tb.node_token("c1")
    rec = lambda i: [i, {"t": 1000.0 + i, "node": "c1", "event": "train", "round": i, "loss": 1.0 / i}]  # noqa: E731
    assert _hb(base, c1, "c1", [rec(1), rec(2), rec(3)]).json() == {"ack": 3}
    # the answer was lost: the node sends them again, with one more
    assert _hb(base, c1, "c1", [rec(1), rec(2), rec(3), rec(4)]).json() == {"ack": 4}
    page = net.get_json(base + "/api/metrics?after=0")
    assert [r["round"] for r in page["records"]] == [1, 2, 3, 4] and page["seq"] == page["records"][-1]["seq"]
    assert net.get_json(base + f"/api/metrics?after={page['seq']}")["records"] == []
    # a restarted app numbers from 1 again (another boot)
    assert _hb(base, c1, "c1", [rec(1)], boot="b2").json() == {"ack": 1}
    assert len(net.get_json(base + "/api/metrics")["records"]) == 5
    # a node speaks for itself: the record's node is the sender
    assert _hb(base, c1, "c1", [[2, {"event": "x", "node": "c2", "round": 0}]], boot="b2").json() == {"ack": 2}
    assert net.get_json(base + "/api/metrics?after=5")["records"][0]["node"] == "c1"
    # a malformed metrics object: 400, nothing stored, the heartbeat itself not taken
    m.heartbeats.pop("c1")
    for bad in ([["1", {"event": "x"}]], [[3, {"event": "x"}], [3, {"event": "y"}]], [[3]], "nope"):
        with pytest.raises(net.HttpError) as ei:
            _hb(base, c1, "c1", bad, boot="b2")
        assert ei.value.status == 400, bad
    assert "c1" not in m.heartbeats and len(net.get_json(base + "/api/metrics")["records"]) == 6
    # records with wrong fields are left out (and counted), acknowledged, the heartbeat taken
    bad = [[3, {"event": "x", "accuracy": "high"}], [4, {"event": 5}], [5, {"event": "x", "round": -1}],
           [6, {"event": "x", "round": 2}]]
    assert _hb(base, c1, "c1", bad, boot="b2").json() == {"ack": 6}
    assert m.heartbeats["c1"]["state"] == "training"
    assert [r["event"] for r in net.get_json(base + "/api/metrics?after=6")["records"]] == ["x"]
    assert net.get_json(base + "/api/state")["metrics_refused"] == 3
    # a heartbeat without metrics answers as before
    r = net.call("POST", base + "/heartbeat", token=c1, json={"node": "c1", "state": "idle"})
    assert r.text == "ok\n"
    # a new run starts with no records; seq numbers go on
    m.dashboard.new_run()
    assert net.get_json(base + "/api/metrics")["records"] == []
    assert _hb(base, c1, "c1", [rec(7)], boot="b2").json() == {"ack": 7}
    assert net.get_json(base + "/api/metrics")["records"][0]["seq"] == 8


def test_runtime_sends_records_live_and_forgets_them_once_acked(tmp_path):
    """The node runtime's side: records queue, a heartbeat carries them, the ack frees
    them, an answer without an ack (an older controller) frees nothing."""
    from dml_app.runtime import HB_RECORDS_MAX, Runtime

    rt = Runtime("fl_trainer", env={"NET_NODE_NAME": "n1", "EDGE_TB_TOKEN": "x", "DML_LOG_DIR": str(tmp_path)})
    for i in range(HB_RECORDS_MAX + 10):
        rt.log_metric("train", i, loss=float("nan") if i == 0 else 0.5)
    live = rt._live_metrics()
    assert len(live["records"]) == HB_RECORDS_MAX and live["records"][0] == [1, {
        "t": live["records"][0][1]["t"], "node": "n1", "event": "train", "round": 0, "loss": None}]

    class Answer:
        def __init__(self, body, ctype="application/json"):
            self.body, self.headers = body, {"content-type": ctype}

        def json(self):
            return self.body
    rt._metrics_acked(Answer("ok\n", "text/plain"), live)
    assert len(rt._hb_pending) == HB_RECORDS_MAX + 10
    rt._metrics_acked(Answer({"ack": 200}), live)
    assert rt._hb_pending[0][0] == 201
    rt._metrics_acked(Answer({"ack": float("inf")}), live)      # refused: nothing freed
    assert rt._hb_pending[0][0] == 201
    rt.close()


# ----------------------------------------------------------------------------- access

@need_root
def test_new_routes_refuse_other_users_and_other_sites(served):
    m = served()
    base = f"http://127.0.0.1:{m.server.port}"
    for path in NEW_GET_ROUTES:
        code, body = curl_as(NOBODY, base + path, "Accept: text/event-stream")
        assert code == 401, (path, code, body)
        code, _ = curl_as(NOBODY, base + path, f"Origin: http://evil.example:{m.server.port}")
        assert code == 403, path
        code, _ = curl_as(NOBODY, base + path, f"{net.TOKEN_HEADER}: {m.tb.token}", "Sec-Fetch-Site: cross-site")
        assert code == 403, path
    # GET / without a credential is a sign-in page naming where the token is
    code, body = curl_as(NOBODY, base + "/")
    assert code == 401 and 'action="/login"' in body and str(m.access.token_file) in body
    # /login: a wrong token 401; the right one a session cookie, HttpOnly and SameSite=Strict
    out = _curl_nobody("-D", "-", "-o", "/dev/null", "--data-urlencode", f"token={m.tb.token}", base + "/login")
    assert " 200" in out.splitlines()[0], out
    cookie = next(l for l in out.splitlines() if l.lower().startswith("set-cookie:"))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and f"edgetb_{m.server.port}=" in cookie
    value = cookie.split(":", 1)[1].strip().split(";")[0]
    out = _curl_nobody("-o", "/dev/null", "-w", "%{http_code}", "--data-urlencode", "token=wrong", base + "/login")
    assert out == "401"
    assert curl_as(NOBODY, base + "/api/state", f"Cookie: {value}")[0] == 200
    assert curl_as(NOBODY, base + "/api/runs", f"Cookie: {value}")[0] == 200
    # ... and nothing else: not /status, not a reset
    for path in ("/status", "/emulated/reset", "/start?root=c1", "/conf/dataset"):
        code, body = curl_as(NOBODY, base + path, f"Cookie: {value}")
        assert code == 403 and "dashboard" in body, (path, code, body)
    # a cookie that is forged, expired or of another token opens nothing
    exp, nonce, mac = value.split("=", 1)[1].split(".")
    name = value.split("=", 1)[0]
    for bad in (f"{exp}.{nonce}.{'0' * len(mac)}", f"{int(exp) + 1}.{nonce}.{mac}", "x"):
        assert curl_as(NOBODY, base + "/api/state", f"Cookie: {name}={bad}")[0] == 401
    old = m.access.new_session(now=time.time() - 13 * 3600)
    assert not m.access.session_ok(old) and m.access.session_ok(m.access.new_session())
    # a cross-site sign-in is refused before the token is looked at
    out = _curl_nobody("-o", "/dev/null", "-w", "%{http_code}", "-H", "Origin: http://evil.example",
                       "--data-urlencode", f"token={m.tb.token}", base + "/login")
    assert out == "403"


def _curl_nobody(*args: str) -> str:
    p = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "curl", "-sS",
                        "--max-time", "20", *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_static_files_stay_in_their_folder(served, tmp_path, monkeypatch):
    static = tmp_path / "static"
    (static / "js").mkdir(parents=True)
    (static / "index.html").write_text("<html>page</html>")
    (static / "js" / "app.js").write_text("let x = 1;")
    (tmp_path / "secret.txt").write_text("TOPSECRET-CONTENT")
    (static / "link.txt").symlink_to(tmp_path / "secret.txt")
    (static / "fifo").mkdir()
    os.mkfifo(static / "fifo" / "pipe.js")
    monkeypatch.setattr(dashboard, "STATIC_DIR", static)
    m = served()
    base = f"http://127.0.0.1:{m.server.port}"
    r = net.call("GET", base + "/")
    assert r.text == "<html>page</html>" and r.headers["Content-Type"].startswith("text/html")
    assert r.headers["Cache-Control"] == "no-cache"
    r = net.call("GET", base + "/static/js/app.js")
    assert r.text == "let x = 1;" and r.headers["Content-Type"].startswith("text/javascript")
    for path in ("/static/../secret.txt", "/static/%2e%2e/secret.txt", "/static/js/../../secret.txt",
                 "/static/link.txt", "/static/fifo/pipe.js", "/static/.hidden", "/static/js/",
                 "/static/%2fetc%2fpasswd", "/static//etc/passwd", "/runs/../x/summary.json",
                 "/runs/x/../../etc.png", "/runs/x/log.txt"):
        for _ in range(2):      # werkzeug merges '//' with a redirect: follow it once
            with http_conn(m.server.port) as c:
                c.request("GET", path)
                resp = c.getresponse()
                body = resp.read()
            if resp.status != 308:
                break
            path = resp.getheader("Location").split(str(m.server.port), 1)[1]
        assert resp.status == 404 and b"TOPSECRET" not in body, (path, resp.status, body[:200])
    # without the page, / says where the data is
    monkeypatch.setattr(dashboard, "STATIC_DIR", tmp_path / "none")
    with pytest.raises(net.HttpError) as ei:
        net.call("GET", base + "/")
    assert ei.value.status == 404 and "/api/state" in ei.value.message


class http_conn:
    def __init__(self, port):
        import http.client

        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def __enter__(self):
        return self.c

    def __exit__(self, *exc):
        self.c.close()


def _open_stream(port: int) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, head


@pytest.mark.timeout(120)
def test_stream_limit_and_accept(served):
    m = served()
    port = m.server.port
    socks = []
    try:
        for _ in range(dashboard.STREAMS_MAX):
            s, head = _open_stream(port)
            socks.append(s)
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head[:200]
        s, head = _open_stream(port)
        socks.append(s)
        assert head.startswith(b"HTTP/1.1 503"), head[:300]
        # a plain GET (no Accept: text/event-stream) gets 406, not a stream that never ends
        with pytest.raises(net.HttpError) as ei:
            net.call("GET", f"127.0.0.1:{port}/api/stream")
        assert ei.value.status == 406
        # a page that goes frees its place (once waitress notices: at the next message)
        socks.pop(0).close()
        deadline = time.monotonic() + 20
        while True:
            s, head = _open_stream(port)
            socks.append(s)
            if head.startswith(b"HTTP/1.1 200"):
                break
            assert time.monotonic() < deadline, "a closed stream kept its place"
            time.sleep(0.5)
    finally:
        for s in socks:
            s.close()
    # the controller stops with a stream open: close() returns and the stream ends (EOF)
    s, head = _open_stream(port)
    try:
        m.close()
        s.settimeout(30)
        while s.recv(4096):
            pass                    # what was still on its way, then the end
    finally:
        s.close()


# ----------------------------------------------------------------------------- bounds

def test_payloads_stay_bounded_at_300_nodes(tmp_path):
    names = [f"node{i:03d}-{'x' * 54}" for i in range(300)]       # 64-character names
    tb = make_testbed(tmp_path, {}, names=names)
    m = Manager(tb)
    d = m.dashboard
    now = time.time()
    for n in names:
        m.heartbeats[n] = {"t": now, "state": "training", "round": 7, "error": "e" * 1000}
    d.usage = {n: {"state": "running", "cpu_pct": 99.9, "mem_mb": 1234.5, "worker": "emulator emu-t"} for n in names}
    d.link_now = {(a, b): {"src": a, "dst": b, "rate_bps": 10**9, "achieved_bps": 123456789, "wire_bps": i,
                           "load": 0.123, "down": False}
                  for i, (a, b) in enumerate((a, b) for a in names for b in names if a != b)}
    text = d.state_json()
    state = json.loads(text)
    print(f"\nstate at 300 nodes, full mesh, 64-character names, 1000-character errors: {len(text)} bytes")
    assert len(text) < 1_000_000
    assert len(state["nodes"]) == 300 and state["links_total"] == 300 * 299 and state["links_cut"] is True
    assert len(state["links"]) == dashboard.LINKS_MAX
    assert min(l["wire_bps"] for l in state["links"]) == 300 * 299 - dashboard.LINKS_MAX   # the most loaded
    # metrics pages: at most PAGE_BYTES of JSON (records of ~20 KB: 300 names each) ...
    big = {"event": "participants", "round": 1, "participants": names}
    d.heartbeat_metrics(names[0], {"boot": "b", "dropped": 0, "records": [(i, dict(big)) for i in range(1, 101)]})
    page = d.metrics_page(0)
    size = len(json.dumps(page, separators=(",", ":")))
    assert 0 < len(page["records"]) < 100 and size <= dashboard.PAGE_BYTES + 1000, size
    assert d.metrics_page(page["seq"])["records"][0]["seq"] == page["seq"] + 1
    # ... and at most PAGE_RECORDS records
    small = [{"event": "train", "round": 1}]
    d.new_run()
    d.heartbeat_metrics(names[1], {"boot": "c", "dropped": 0,
                                                "records": [(i, dict(small[0])) for i in range(1, 6001)]})
    assert len(d.metrics_page(0)["records"]) == dashboard.PAGE_RECORDS
    # the store keeps at most RECORDS_MAX
    d.heartbeat_metrics(names[2], {"boot": "c", "dropped": 0, "records": [
        (i, dict(small[0])) for i in range(1, dashboard.RECORDS_MAX + 2)]})
    assert len(d.records) == dashboard.RECORDS_MAX and d.records_dropped == 6001
    assert d.metrics_page(0)["records"][0]["seq"] == d.first_seq


def test_fidelity_judges_saturated_streaks_only():
    f = dashboard.Fidelity()
    ideal = dashboard.ideal_bps(10_000_000)
    for good in (0.5, 1.0, 1.0, 1.0, 1.0):   # 4 s saturated, 2 s once its ends are left out: not judged
        f.add("a", "b", 10_000_000, 1.0, good * ideal, False)
    f.add("a", "b", 10_000_000, 1.0, 0.2 * ideal, False)
    assert f.report()["links"] == []
    # 6 s in a row, its first and last second partly idle (a flow starting and ending
    # inside them): judged on the 4 s between, within 2%, not pulled down by the ends
    for good in (0.91, 0.99, 1.0, 1.01, 1.0, 0.91):
        f.add("a", "b", 10_000_000, 1.0, good * ideal, False)
    f.add("a", "b", 10_000_000, 1.0, 0.0, False)
    (link,) = f.report()["links"]
    assert link["ok"] and link["saturated_s"] == 4.0 and abs(link["error_pct"]) < 0.5, link
    for _ in range(6):                    # a link 5% over its ideal is flagged (a streak still going)
        f.add("c", "d", 10_000_000, 1.0, 1.05 * ideal, False)
    bad = next(l for l in f.report()["links"] if l["src"] == "c")
    assert not bad["ok"] and bad["error_pct"] == pytest.approx(5, abs=0.01)
    for _ in range(5):                    # a down link is never saturated
        f.add("e", "f", 10_000_000, 1.0, ideal, True)
    assert {l["src"] for l in f.report()["links"]} == {"a", "c"}


def test_usage_reads_cgroup_v1_and_v2_layouts(tmp_path):
    """worker/cgroups.py read_usage on both layouts (files as the kernel writes them), and
    pid_usage of a live process (how a docker container's init is read) on this host."""
    from worker import cgroups

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    (v2 / "memory.current").write_text("104857600\n")
    (v2 / "memory.stat").write_text("anon 50000000\nfile 60000000\ninactive_file 4857600\n")
    assert cgroups.read_usage(v2, v2, v2=True) == {"cpu_ns": 2_500_000_000, "mem_bytes": 100_000_000}
    cpu, mem = tmp_path / "cpuacct", tmp_path / "memory"
    cpu.mkdir()
    mem.mkdir()
    (cpu / "cpuacct.usage").write_text("123456789\n")
    (mem / "memory.usage_in_bytes").write_text("2097152\n")
    (mem / "memory.stat").write_text("cache 0\ntotal_inactive_file 1048576\n")
    assert cgroups.read_usage(cpu, mem, v2=False) == {"cpu_ns": 123456789, "mem_bytes": 2**20}
    assert cgroups.read_usage(tmp_path / "gone", tmp_path / "gone", v2=False) == {"cpu_ns": None, "mem_bytes": None}
    # a v1 host with cpuacct mounted on its own: node groups get a cpuacct directory too
    for c in ("cpu", "cpuacct", "memory", "freezer"):
        (tmp_path / "v1" / c).mkdir(parents=True)
    assert cgroups.Cgroup("n1", root=tmp_path / "v1").dirs["cpuacct"] == tmp_path / "v1" / "cpuacct" / "edgetb" / "n1"
    co = tmp_path / "co"
    (co / "cpu,cpuacct").mkdir(parents=True)
    (co / "memory").mkdir()
    assert "cpuacct" not in cgroups.Cgroup("n1", root=co).dirs        # co-mounted: the cpu directory has it
    if Path("/proc/self/cgroup").exists() and (cgroups.is_v2() or Path("/sys/fs/cgroup/cpuacct").is_dir()):
        got = cgroups.pid_usage(os.getpid())
        assert got["cpu_ns"] and got["cpu_ns"] > 0 and got["mem_bytes"] and got["mem_bytes"] > 0, got


# ----------------------------------------------------------------------------- docker nodes


def _usage(agent) -> dict:
    return agent.get("/usage")


@pytest.mark.docker
@pytest.mark.timeout(300)
def test_agent_usage_of_docker_nodes(agent):
    """GET /usage reads a container's cgroup: a node spinning at its 0.5 cpu limit shows
    the cpu its cgroup counted (between two reads of the counter around the call) while
    the kernel throttles it at that limit, an idle one next to none; both their memory;
    their links' counters."""
    from tests.support import containers as dt
    from worker import cgroups
    from worker import docker_nodes as dn

    why = dt.why_not()
    if why:
        pytest.skip(f"docker: {why}")
    dep = dt.plan(2, cpu=0.5, ram_mb=256)
    dep.nodes[0]["cmd"] = ["python3", "-c", "while True: pass"]
    a, b = dep.names
    dep.links = {a: [ah.link(dep, a, b, 10_000_000)]}
    with dt.deployed(agent, dep):
        pid = dt.client().containers.get(dn.container_name(a)).attrs["State"]["Pid"]
        v2 = cgroups.is_v2()
        cpu_dir = dt.container_cgroup(pid, "cpu")
        counted = lambda: cgroups.read_usage(cpu_dir if v2 else dt.container_cgroup(pid, "cpuacct"),  # noqa: E731
                                             dt.container_cgroup(pid, "memory"), v2=v2)["cpu_ns"]
        throttled = lambda: int(dict(line.split() for line in (cpu_dir / "cpu.stat").read_text().splitlines())  # noqa: E731
                                ["nr_throttled"])
        # from once the spinner spins (its Python started: 0.2 s of cpu used), until it
        # used another second of cpu (two at its limit)
        first = wait_until(lambda: (u := _usage(agent))["nodes"][a]["cpu_ns"] and u["nodes"][a]["cpu_ns"] > 2e8
                           and u, 30, "the spinning node to spin")
        throttled_before, counted_before = throttled(), counted()
        second = wait_until(lambda: (u := _usage(agent))["nodes"][a]["cpu_ns"] >= first["nodes"][a]["cpu_ns"] + 1e9
                            and u, 60, "the spinning node to use another second of cpu")
        assert counted_before <= second["nodes"][a]["cpu_ns"] <= counted(), "not the container's cgroup counter"
        assert throttled() > throttled_before, "the spinner was never held at its cpu limit"
        for n in (a, b):
            assert first["nodes"][n]["state"] == "running" and second["nodes"][n]["mem_bytes"] > 0, second
        used = {n: second["nodes"][n]["cpu_ns"] - first["nodes"][n]["cpu_ns"] for n in (a, b)}
        assert used[b] < used[a] / 10, used                 # the sleeping node: next to nothing
        pct = {n: used[n] / 1e9 / (second["nodes"][n]["t"] - first["nodes"][n]["t"]) * 100 for n in (a, b)}
        print(f"\ndocker nodes: spinning {pct[a]:.1f} % of a core (limit 50 %), sleeping {pct[b]:.1f} %")
        (link,) = second["links"][a]["links"]
        assert link[0] == b and link[3] == 10_000_000 and link[4] is False and link[1] >= 0
