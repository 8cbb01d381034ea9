"""Bounded input, against real servers over real HTTP on loopback:
body limits answered 413 before anything is written, JSON depth and numbers answered 400
naming the field, files read on request only from the project's folders; every server
still answers afterwards.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.support.procs import ROOT, TOKEN, NodeProc, StubController
from tests.support import agents as ah
from tests.unit.test_controller import manager, make_testbed  # noqa: F401  (manager: a fixture)
from tests.loopback.test_runtime import configure_trainer, env_dirs, make_dataset, trainer  # noqa: F401  (fixtures)

from dml_app import net as node_net  # dml_app/net.py as the node apps import it
from controller import files
from controller.manager import Manager
from controller.run import heartbeat_fields
from dml_app import net

DEEP = "[" * 100_000 + "]" * 100_000            # 100,000 levels: a RecursionError in json.loads
JSON_HDR = {"Content-Type": "application/json"}
# Each bad number as raw JSON text; `1e309` is beyond float and parses as infinity.
BAD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e309", "true", "-1", '"3"']


def http(method: str, url: str, *, token: str | None = None, timeout_s: float = 60, **kw) -> requests.Response:
    """One request whatever its status (the servers' answers are what these tests check)."""
    s = requests.Session()
    s.trust_env = False
    headers = dict(kw.pop("headers", {}))
    if token:
        headers[net.TOKEN_HEADER] = token
    with s:
        return s.request(method, url if url.startswith("http") else "http://" + url,
                         headers=headers, timeout=timeout_s, **kw)


def with_raw(doc: dict, path: tuple, raw: str) -> str:
    """JSON text of `doc` with the value at `path` replaced by the raw JSON text `raw`."""
    marker = "__etb_raw_" + secrets.token_hex(4) + "__"
    cur = doc = json.loads(json.dumps(doc))
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = marker
    return json.dumps(doc).replace(json.dumps(marker), raw)


# ----------------------------------------------------------------------------- the helpers

@pytest.mark.parametrize("raw, words", [
    (DEEP, "nested more than 32 levels"), ('{"a": ' * 40 + "1" + "}" * 40, "nested more than 32 levels"),
    ('{"x": {"cpu": NaN}}', "x.cpu: NaN is not a finite number"),
    ('{"n": [1, Infinity]}', "n[1]: Infinity is not a finite number"),
    ('{"samples": 1e309}', "samples: Infinity is not a finite number"),
    ('{"samples": 1' + "0" * 400 + "}", "samples: integer out of range"),
    ("[1, 2]", "expected a JSON object"), ('{"a": ', "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
])
def test_parse_json_body_refuses_with_a_reason(raw, words):
    with pytest.raises(net.BodyError) as e:
        net.parse_json_body(raw, what="body")
    assert words in str(e.value)


@pytest.mark.parametrize("value", [True, False, None, "3", float("nan"), float("inf"), float("-inf"),
                                   -1, 2.5, 10**30, [1]])
def test_number_refuses_what_is_not_a_number_in_range_and_names_the_field(value):
    with pytest.raises(ValueError) as e:
        net.number(value, "node n1: ram_mb", 0, 1 << 22, integer=True)
    assert str(e.value).startswith("node n1: ram_mb must be an integer in [0, 4194304], got ")
    assert net.number(3.0, "x", 0, 4, integer=True) == 3 and net.number(0.5, "x", 0, 1, lo_open=True) == 0.5


# ----------------------------------------------------------------------------- the controller

def ctl(manager: Manager, path: str) -> str:
    return f"http://127.0.0.1:{manager.server.port}{path}"


def test_a_200_mb_log_is_413_and_no_file_is_written(manager, tmp_path):
    huge = b"x" * (200 * 1000 * 1000)
    r = http("POST", ctl(manager, "/log?name=c1"), data=huge)              # Content-Length
    assert r.status_code == 413, r.text
    assert "16 MiB" in r.text, r.text
    r = http("POST", ctl(manager, "/log?name=c1"), data=iter([huge[i:i + (1 << 20)]    # chunked
                                                              for i in range(0, len(huge), 1 << 20)]))
    assert r.status_code == 413, r.text
    del huge
    assert manager.run_dir is None and not (tmp_path / "runs").exists(), "a refused log wrote something"
    r = http("POST", ctl(manager, "/log?name=c1"), data=b"ok")
    assert r.status_code == 200 and (manager.run_dir / "c1.log").read_bytes() == b"ok"


def test_the_log_limit_is_configurable_and_named_in_the_refusal(manager):
    manager.log_limit_bytes = 1000
    r = http("POST", ctl(manager, "/log?name=c2"), data=b"y" * 1001)
    assert r.status_code == 413 and "limit of 1000 bytes" in r.json()["error"], r.text
    assert manager.run_dir is None
    assert http("POST", ctl(manager, "/log?name=c2"), data=b"y" * 1000).status_code == 200
    assert (manager.run_dir / "c2.log").stat().st_size == 1000


def test_the_run_scripts_take_a_log_limit(tmp_path):
    from controller import auto

    args = auto.common_args("x").parse_args(["--log-limit-mb", "2"])
    tb = auto.with_log_limit(make_testbed(tmp_path, {}), args.log_limit_mb)
    m = tb.manager_class(tb)
    try:
        assert m.log_limit_bytes == 2 << 20 and Manager.log_limit_bytes == 16 << 20
    finally:
        m.close()
    for bad in ("nan", "0", "-3", "inf"):
        with pytest.raises(SystemExit):
            auto.common_args("x").parse_args(["--log-limit-mb", bad])


def test_oversized_and_deep_json_on_the_controller(manager):
    r = http("POST", ctl(manager, "/heartbeat"), data=b'{"node": "c1", "pad": "' + b"p" * (1 << 20) + b'"}',
             headers=JSON_HDR)
    assert r.status_code == 413 and "limit of 1 MiB" in r.json()["error"], r.text
    r = http("POST", ctl(manager, "/heartbeat"), data=DEEP, headers=JSON_HDR)
    assert r.status_code == 400 and "nested more than 32 levels" in r.json()["error"], r.text
    for raw in ("NaN", "Infinity", "1e309"):
        r = http("POST", ctl(manager, "/heartbeat"), data=f'{{"node": "c1", "round": {raw}}}', headers=JSON_HDR)
        assert r.status_code == 400 and "round" in r.json()["error"], (raw, r.text)
    assert manager.heartbeats == {}
    assert http("GET", ctl(manager, "/status")).status_code == 200


@pytest.mark.parametrize("body, words", [
    ([], "JSON object"), ({"round": 1}, "'node'"), ({"node": "c1", "state": ["x"]}, "'state'"),
    *(({"node": "c1", "round": v}, "heartbeat 'round' must be an integer")
      for v in (True, -1, "3", float("nan"), float("inf"), 1.5, 10**12)),
])
def test_heartbeat_fields_are_checked(body, words):
    with pytest.raises(ValueError) as e:
        heartbeat_fields(body)
    assert words in str(e.value)
    assert heartbeat_fields({"node": "c1", "state": "training", "round": 3.0}) == ("c1", "training", 3)


@pytest.fixture
def outside(scratch):
    """A root-only (0600) links file outside the project's folders."""
    p = scratch / "secret_links.json"
    p.write_text(json.dumps({"c1": [{"dest": "c2", "bw": "10mbit", "secret": "s3cr3t"}]}))
    os.chmod(p, 0o600)
    return p


@pytest.fixture
def in_project():
    """Make FIFOs and symlinks in the project folder itself; all removed afterwards."""
    made: list[Path] = []

    def path(suffix: str) -> Path:
        p = ROOT / f".etb-test-{secrets.token_hex(4)}{suffix}"
        made.append(p)
        return p
    try:
        yield path
    finally:
        for p in made:
            if p.is_symlink() or p.exists():
                p.unlink()


def update_tc(manager, f: str, timeout_s: float = 10) -> requests.Response:
    return http("GET", ctl(manager, "/update/tc"), params={"file": f}, timeout_s=timeout_s)


def test_update_tc_reads_only_regular_files_inside_the_project(manager, outside, in_project, tmp_path):
    rule = (f"links file must be a regular file inside {os.path.realpath(ROOT)} "
            f"(or {os.path.realpath(tmp_path)}), at most 16 MiB")
    link = in_project(".json")
    link.symlink_to("/etc/passwd")
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    answers = {f: update_tc(manager, f) for f in
               ("/etc/shadow", "/etc/no-such-file-etb", "/dev/zero", str(outside), str(link), str(zero),
                "../../../../etc/shadow", "/proc/self/environ")}
    for f, r in answers.items():
        assert r.status_code == 400, (f, r.status_code, r.text)
        # Only the rule: the same words whether the outside path exists, is a device, is
        # root-only or is reached through a symlink; nothing of its content.
        assert r.json() == {"error": rule}, (f, r.text)
    fifo = in_project(".json")
    os.mkfifo(fifo)
    r = update_tc(manager, str(fifo))      # opened for reading, a FIFO with no writer would block it
    assert r.status_code == 400 and "not a regular file" in r.json()["error"] and rule in r.json()["error"]
    big = tmp_path / "big_links.json"
    big.write_bytes(b" " * (16 * 1024 * 1024 + 1))
    r = update_tc(manager, str(big))
    assert r.status_code == 400 and "16777217 bytes" in r.json()["error"], r.text
    r = update_tc(manager, "nope.json")
    assert r.status_code == 400 and "no such file" in r.json()["error"], r.text
    (tmp_path / "deep.json").write_text(DEEP)
    r = update_tc(manager, "deep.json")
    assert r.status_code == 400 and "nested more than 32 levels" in r.json()["error"], r.text
    assert http("GET", ctl(manager, "/status")).json()["nodes"]["c1"]["state"] == "not deployed"


def test_fifos_do_not_freeze_the_controller(manager, in_project):
    fifo = in_project(".json")
    os.mkfifo(fifo)
    with ThreadPoolExecutor(24) as ex:
        answers = list(ex.map(lambda _: update_tc(manager, str(fifo), timeout_s=20), range(24)))
    assert {r.status_code for r in answers} == {400}
    assert http("GET", ctl(manager, "/status"), timeout_s=10).status_code == 200


def test_confs_are_read_only_from_the_project(manager, tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    manager.conf_dir = conf
    (conf / "c2_dataset.conf").write_text(json.dumps({"train_len": 1}))
    (conf / "c1_dataset.conf").symlink_to("/etc/shadow")
    r = http("GET", ctl(manager, "/conf/dataset"))
    assert r.status_code == 400 and r.json()["error"].startswith("dataset conf must be a regular file inside"), r.text
    (conf / "c1_dataset.conf").unlink()
    (conf / "c1_dataset.conf").write_text('{"batch_size": NaN}')
    r = http("GET", ctl(manager, "/conf/dataset"))
    assert r.status_code == 400 and "c1_dataset.conf: batch_size: NaN is not a finite number" in r.text, r.text


def test_read_project_file_directly(tmp_path, scratch):
    inside = tmp_path / "a.json"
    inside.write_text("{}")
    assert files.read_project_file("a.json", [tmp_path], 10) == b"{}"
    for p in ("/dev/zero", str(scratch), "/etc/hostname"):
        with pytest.raises(files.FileRefused) as e:
            files.read_project_file(p, [tmp_path], 10, what="x")
        assert str(e.value) == f"x must be a regular file inside {os.path.realpath(tmp_path)}, at most 10 bytes"


# ----------------------------------------------------------------------------- the agent


api = ah.clean_agent_fixture()


def test_agent_bodies_over_their_limit_are_413(api):
    r = api.raw("POST", "/emulated/stop", data=b"{" + b" " * (1 << 20) + b"}", headers=JSON_HDR)
    assert r.status_code == 413 and "limit of 1 MiB" in r.json()["error"], r.text
    r = api.raw("POST", "/update/tc", data=b" " * (40 << 20), headers=JSON_HDR)
    assert r.status_code == 413 and "32 MiB" in r.text, r.text
    assert api.get("/status")["nodes"] == {}


def test_deep_json_is_400_on_the_agent(api):
    for path in ("/emulated/deploy", "/update/tc", "/emulated/build"):
        r = api.raw("POST", path, data=DEEP, headers=JSON_HDR)
        assert r.status_code == 400 and "nested" in r.json()["error"], (path, r.text)


AGENT_FIELDS = [(("nodes", 0, f), f) for f in ("cpu", "ram_mb", "id", "port", "gpu")] + \
    [(("links", None, 0, f), f) for f in ("rate_bps", "port", "delay_us", "jitter_us", "loss_pct")]


@pytest.mark.parametrize("where, field", AGENT_FIELDS, ids=[f"{w[0]}.{f}" for w, f in AGENT_FIELDS])
def test_bad_numbers_in_node_specs_and_links_are_400_naming_the_field(api, where, field):
    dep = ah.linked_pair()
    path = tuple(dep.names[0] if k is None else k for k in where)
    for raw in BAD_NUMBERS:
        r = api.raw("POST", "/emulated/deploy", data=with_raw(dep.body(), path, raw), headers=JSON_HDR)
        assert r.status_code == 400, (field, raw, r.status_code, r.text)
        assert field in r.json()["error"], (field, raw, r.text)
    ah.assert_clean(dep)
    assert api.get("/status")["nodes"] == {}


# ----------------------------------------------------------------------------- the nodes

def test_node_bodies_over_their_limit_are_413_and_deep_json_400(trainer):
    base = f"http://{trainer.address}"
    r = http("POST", base + "/conf/structure", token=TOKEN, headers=JSON_HDR,
             data=b'{"pad": "' + b"p" * (1 << 20) + b'"}')
    assert r.status_code == 413 and "limit of 1 MiB" in r.text, r.text
    r = http("POST", base + "/conf/structure", token=TOKEN, headers=JSON_HDR, data=DEEP)
    assert r.status_code == 400 and "nested more than 32 levels" in r.text, r.text
    # /train takes weights: 2 x LeNet-5's safetensors size + 1 MiB (1.5 MiB); more is 413.
    limit = 2 * len(node_net.pack_weights(_lenet().state_dict())) + node_net.WEIGHTS_SLACK
    r = http("POST", base + "/train", token=TOKEN, data=b"w" * (limit + 1),
             headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 413 and f"({limit} bytes)" in r.text, r.text
    r = http("POST", base + "/train", token=TOKEN, data=b"w" * (8 << 20),
             headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 413, r.text
    assert trainer.call("GET", "/stats").json()["bytes_received"] == 0
    configure_trainer(trainer)
    r = http("POST", base + "/train", token=TOKEN, data=_weights_with_meta(_lenet().state_dict(), DEEP))
    assert r.status_code == 400 and "weights metadata: JSON nested" in r.text, r.text


def _lenet():
    from dml_app import nns

    return nns.build_model({"name": "mnist", "input_shape": [1, 28, 28], "num_classes": 10})


def _weights_with_meta(state_dict, meta_text: str) -> bytes:
    """Safetensors bytes whose metadata is exactly `meta_text` (e.g. with 1e309 in it)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state_dict.items()}, metadata={"edgetb": meta_text})


@pytest.mark.parametrize("path, conf, key", [
    ("/conf/structure", {"epoch": 1, "father_node": "n1", "connect": {"n1": "127.0.0.1:9"}}, "epoch"),
    ("/conf/structure", {"epoch": 1, "lr": 0.1, "father_node": "n1", "connect": {"n1": "127.0.0.1:9"}}, "lr"),
    ("/conf/dataset", {"train_len": 2, "batch_size": 8}, "batch_size"),
    ("/conf/dataset", {"train_len": 2, "batch_size": 8}, "train_len"),
])
def test_bad_numbers_in_confs_are_400_naming_the_key(trainer, path, conf, key):
    for raw in BAD_NUMBERS:
        r = http("POST", f"http://{trainer.address}{path}", token=TOKEN, headers=JSON_HDR,
                 data=with_raw(conf, (key,), raw))
        assert r.status_code == 400 and key in r.text, (key, raw, r.status_code, r.text)
    assert trainer.call("GET", "/hi").json()["state"] == "idle"


def test_bad_numbers_in_weights_metadata_are_400_naming_the_field(trainer):
    configure_trainer(trainer)
    sd = _lenet().state_dict()
    for raw in BAD_NUMBERS + ["0", "1.5"]:
        r = http("POST", f"http://{trainer.address}/train", token=TOKEN,
                 data=_weights_with_meta(sd, f'{{"round": {raw}, "name": "n1"}}'))
        assert r.status_code == 400 and "round" in r.text, (raw, r.status_code, r.text)
    assert trainer.proc.poll() is None and trainer.call("GET", "/hi").json()["state"] == "idle"


def test_a_trainer_reporting_1e309_samples_is_refused_and_the_aggregator_keeps_working(env_dirs):
    """A fake trainer answers each round with bad uploads (samples 1e309, 10**400, NaN,
    true, -1, "12"; loss NaN; round 1e309), then a good one; a real trainer works as
    usual. Every bad upload gets 400 naming the field, and the aggregator finishes its
    rounds and calls /finish."""
    log_dir, ds = env_dirs
    bad_uploads = [('"samples": 1e309', "samples"), ('"samples": 1' + "0" * 400, "samples"),
                   ('"samples": NaN', "samples"), ('"samples": true', "samples"),
                   ('"samples": -1', "samples"), ('"samples": "12"', "samples"),
                   ('"samples": 5, "loss": NaN', "loss"), ('"samples": 5, "loss": 1e309', "loss")]
    seen: list[tuple[int, str, str]] = []
    errors: list[str] = []
    from flask import Flask, request

    fake = Flask("fake-trainer")
    node_net.require_token(fake, TOKEN)
    ctl = StubController()
    procs: list[NodeProc] = []
    uploaders: list[threading.Thread] = []

    def upload(agg: str, rnd: int, tensors: dict) -> None:
        try:
            for extra, field in bad_uploads:
                body = _weights_with_meta(tensors, f'{{"round": {rnd}, "name": "bad", {extra}}}')
                r = http("POST", f"http://{agg}/combine", token=TOKEN, data=body)
                seen.append((r.status_code, field, r.text))
            body = _weights_with_meta(tensors, '{"round": 1e309, "name": "bad", "samples": 5}')
            r = http("POST", f"http://{agg}/combine", token=TOKEN, data=body)
            seen.append((r.status_code, "round", r.text))
            good = _weights_with_meta(tensors, f'{{"round": {rnd}, "name": "bad", "samples": 5, "loss": 0.5}}')
            r = http("POST", f"http://{agg}/combine", token=TOKEN, data=good)
            seen.append((r.status_code, "good", r.text))
        except Exception as e:   # noqa: BLE001 - reported by the test below
            errors.append(repr(e))

    srv = None
    try:
        agg = NodeProc("fl_aggregator", "n1", log_dir=log_dir, dataset_dir=ds, ctl_address=ctl.address)
        tr = NodeProc("fl_trainer", "n2", log_dir=log_dir, dataset_dir=ds, ctl_address=ctl.address)
        procs += [agg, tr]

        @fake.post("/train")
        def train():
            tensors, meta = node_net.unpack_weights(request.get_data())
            t = threading.Thread(target=upload, args=(agg.address, meta["round"], tensors), daemon=True)
            uploaders.append(t)
            t.start()
            return "ok"

        srv = node_net.Server(fake, "127.0.0.1", 0).start()
        for p in procs:
            p.wait_ready(timeout_s=60)
        agg.call("POST", "/conf/structure", json={
            "trainer_fraction": 1.0, "sync": 2, "round_timeout_s": 60, "child_node": ["n2", "bad"],
            "connect": {"n2": tr.address, "bad": f"127.0.0.1:{srv.port}"}})
        agg.call("POST", "/conf/dataset", json={"test_len": 1, "test_start_index": 1, "batch_size": 8})
        tr.call("POST", "/conf/structure", json={"epoch": 1, "father_node": "n1", "connect": {"n1": agg.address}})
        tr.call("POST", "/conf/dataset", json={"train_len": 1, "train_start_index": 1, "batch_size": 8})
        agg.call("GET", "/start")
        assert ctl.finished.wait(120), f"the aggregator did not finish:\n{agg.output()}"
        for t in uploaders:     # the last good upload's answer may come after the finish
            t.join(30)
        assert not errors, errors
        per_round = len(bad_uploads) + 2
        assert len(seen) == 2 * per_round, seen
        for status, field, text in seen:
            if field == "good":
                assert status == 200, text
            else:
                assert status == 400 and field in text, (field, text)
        log = agg.call("GET", "/log").text
        assert log.count("Aggregate: accuracy=") == 2 and "2/2 trainers" in log, log
        assert agg.call("GET", "/hi").json()["state"] == "finished"
        assert agg.proc.poll() is None
    finally:
        for p in procs:
            p.stop()
        if srv is not None:
            srv.close()
        ctl.close()


def test_finish_bounds_what_node_apps_answer(manager, tmp_path):
    """/finish reads every node's log, metrics and stats: a node app (user code) that
    answers 17 MiB of log, junk metrics or a bytes_sent of NaN costs its own results,
    not the controller's /finish."""
    from flask import Flask, Response

    def fake(log: bytes, metrics: str, stats: str) -> "node_net.Server":
        app = Flask("fake-node")
        app.add_url_rule("/log", "log", lambda: Response(log, mimetype="text/plain"))
        app.add_url_rule("/metrics", "metrics", lambda: Response(metrics, mimetype="application/x-ndjson"))
        app.add_url_rule("/stats", "stats", lambda: Response(stats, mimetype="application/json"))
        return node_net.Server(app, "127.0.0.1", 0).start()

    junk = "\n".join([DEEP, '{"event": "aggregate", "round": NaN, "accuracy": 0.5}',
                      '{"event": "aggregate", "round": "7", "accuracy": 0.5}',
                      '{"event": "aggregate", "round": 2, "accuracy": "high"}',
                      '{"event": "aggregate", "round": 1, "accuracy": 0.25}', "[1, 2]"])
    servers = [fake(b"l" * (17 << 20), "", '{"bytes_sent": 1}'),
               fake(b"log", junk, '{"bytes_sent": NaN}'),
               fake(b"log", junk, '{"bytes_sent": 1234}')]
    try:
        for name, srv in zip(("c1", "c2", "c3"), servers):
            manager.tb.emulated[name].ip, manager.tb.emulated[name].port = "127.0.0.1", srv.port
        manager.root = "c3"
        r = http("GET", ctl(manager, "/finish"), timeout_s=120)
        assert r.status_code == 200, r.text
        summary = r.json()
        assert set(summary["logs_missing"]) == {"c1", "c2"}, summary
        assert "16 MiB" in summary["logs_missing"]["c1"] and "bytes_sent" in summary["logs_missing"]["c2"]
        assert summary["bytes_sent"] == {"c3": 1234}
        assert summary["accuracy_per_round"] == [{"round": 1, "accuracy": 0.25}], summary
        assert not (Path(summary["run_dir"]) / "c1.log").exists()
        assert http("GET", ctl(manager, "/status")).status_code == 200
    finally:
        for srv in servers:
            srv.close()


@pytest.mark.parametrize("role, path, meta, field", [
    ("ps_server", "/ps/push", '{{"name": "w1", "version": {x}, "samples": 4}}', "version"),
    ("ps_server", "/ps/push", '{{"name": "w1", "version": 0, "samples": {x}}}', "samples"),
    ("ps_worker", "/ps/params", '{{"version": {x}}}', "version"),
    ("fl_aggregator", "/combine", '{{"name": "n2", "round": 1, "samples": {x}}}', "samples"),
])
def test_other_roles_refuse_bad_numbers_in_weights_metadata(env_dirs, role, path, meta, field):
    log_dir, ds = env_dirs
    node = NodeProc(role, "r1", log_dir=log_dir, dataset_dir=ds)
    try:
        node.wait_ready()
        sd = _lenet().state_dict()
        for raw in BAD_NUMBERS:
            r = http("POST", f"http://{node.address}{path}", token=TOKEN,
                     data=_weights_with_meta(sd, meta.format(x=raw)))
            assert r.status_code == 400 and field in r.text, (raw, r.status_code, r.text)
        if role == "ps_server":
            for raw in [b for b in BAD_NUMBERS if b != "-1"] + ["-2"]:    # -1: "no version yet"
                r = http("POST", f"http://{node.address}/ps/pull", token=TOKEN, headers=JSON_HDR,
                         data=f'{{"name": "w1", "have": {raw}, "wait_s": 0}}')
                assert r.status_code == 400 and "have" in r.text, (raw, r.text)
        assert node.proc.poll() is None and node.call("GET", "/hi").json()["state"] == "idle"
    finally:
        node.stop()


@pytest.mark.parametrize("bad", [True, 1, 167772162, None, ["10.0.0.2"]])
def test_addresses_must_be_strings(bad):
    # ipaddress alone takes 1 or true as 0.0.0.1: an address from a request is a string.
    from worker import nodes as nb
    from worker import tc

    with pytest.raises(tc.TcError, match="ip"):
        tc.Link.from_dict({"dest": "n2", "ip": bad, "port": 4444, "rate_bps": 1000000})
    with pytest.raises(nb.NodeError, match="IPv4 address string|ip"):
        nb.NodeSpec.from_dict({"name": "n1", "id": 1, "ip": bad, "port": 4444})
