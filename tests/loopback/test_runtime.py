"""dml_app/runtime.py: token check, bad bodies, conf routes, heartbeats, logs, SIGTERM."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.procs import TOKEN, NodeProc, StubController, wait_until
from dml_app import net
from dml_app import runtime
from dml_tool import splitter
from dml_app.runtime import ConfigError, Runtime


def make_dataset(root: Path, name: str = "mnist-synthetic", parts: int = 4, n: int = 20) -> Path:
    """A tiny dataset in the splitter's layout (random images; enough for the routes)."""
    rng = np.random.default_rng(0)
    data = {}
    for split_name in ("train", "test"):
        xs, ys = [], []
        for _ in range(parts):
            xs.append(rng.random((n, 1, 28, 28), dtype=np.float32))
            ys.append(rng.integers(0, 10, n))
        data[split_name] = (np.concatenate(xs), np.concatenate(ys), [np.arange(i * n, (i + 1) * n) for i in range(parts)])
    splitter.write_dataset(str(root), name=name, num_classes=10, **data)   # the splitter's own writer
    return root


@pytest.fixture
def env_dirs(scratch):
    return scratch / "log", make_dataset(scratch / "dataset")


@pytest.fixture
def trainer(env_dirs):
    """A real fl_trainer process on loopback, stopped by process group afterwards."""
    log_dir, ds = env_dirs
    node = NodeProc("fl_trainer", "n2", log_dir=log_dir, dataset_dir=ds)
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def configure_trainer(node: NodeProc, father_port: int = 9) -> None:
    node.call("POST", "/conf/structure",
              json={"epoch": 1, "father_node": "n1", "connect": {"n1": f"127.0.0.1:{father_port}"}})
    node.call("POST", "/conf/dataset", json={"train_len": 2, "train_start_index": 1, "batch_size": 8})


# ----------------------------------------------------------------------------- real process

def test_request_without_token_gets_401_and_changes_nothing(trainer):
    for token in (None, "wrong-token"):
        with pytest.raises(net.HttpError) as e:
            net.call("GET", trainer.url("/hi"), token=token)
        assert e.value.status == 401 and "token" in e.value.message
        with pytest.raises(net.HttpError) as e:
            net.call("POST", trainer.url("/conf/structure"), token=token,
                     json={"epoch": 1, "father_node": "n1", "connect": {"n1": "127.0.0.1:9"}})
        assert e.value.status == 401
    # the structure was not taken: /train still says the confs are missing
    with pytest.raises(net.HttpError) as e:
        trainer.call("POST", "/train", data=b"x")
    assert e.value.status == 409 and "/conf/structure" in e.value.message
    assert trainer.call("GET", "/hi").json()["node"] == "n2"


def test_weights_that_are_not_safetensors_get_400_and_the_node_keeps_serving(trainer):
    configure_trainer(trainer)
    bad_bodies = {
        "text": b"this is not a model",
        "empty": b"",
        "huge header length": (10 ** 12).to_bytes(8, "little") + b"{}",
        "bad header json": (5).to_bytes(8, "little") + b"{nope",
        "pickle": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94.",
    }
    for what, body in bad_bodies.items():
        with pytest.raises(net.HttpError) as e:
            trainer.call("POST", "/train", data=body, headers={"Content-Type": "application/octet-stream"})
        assert e.value.status == 400, what
        assert "safetensors" in e.value.message, what
    # valid safetensors, but not this dataset's model
    body = net.pack_weights({"fc.weight": torch.zeros(2, 2)}, {"round": 1})
    with pytest.raises(net.HttpError) as e:
        trainer.call("POST", "/train", data=body)
    assert e.value.status == 400 and "do not fit the LeNet5 model" in e.value.message
    assert trainer.proc.poll() is None
    hi = trainer.call("GET", "/hi").json()
    assert hi == {"node": "n2", "role": "fl_trainer", "state": "idle", "round": 0}
    stats = trainer.call("GET", "/stats").json()
    assert stats["bytes_received"] == sum(map(len, bad_bodies.values())) + len(body)
    assert "refused weights" in (trainer.log_dir / "n2.log").read_text()


def test_conf_routes_refuse_bad_confs_clearly(trainer):
    cases = [
        ("/conf/dataset", {"train_len": 3, "train_start_index": 3}, "train parts 3..5 asked, the dataset has 4"),
        ("/conf/dataset", {"train_len": "2"}, "dataset conf.train_len: expected an integer in [0, 100000], got '2'"),
        ("/conf/dataset", {"test_len": 1, "batch_size": 0}, "batch_size: expected an integer in [1, "),
        ("/conf/dataset", {"test_len": 1}, "a trainer needs train parts"),
        ("/conf/structure", {"father_node": "n1", "connect": {"n1": "x:1"}}, "missing key 'epoch'"),
        ("/conf/structure", {"epoch": 1, "father_node": "n1", "connect": {}}, "no address for father_node"),
    ]
    for path, body, message in cases:
        with pytest.raises(net.HttpError) as e:
            trainer.call("POST", path, json=body)
        assert e.value.status == 400 and message in e.value.message, (path, body, e.value.message)
    with pytest.raises(net.HttpError) as e:
        trainer.call("POST", "/conf/dataset", data="[1, 2]", headers={"Content-Type": "application/json"})
    assert e.value.status == 400 and "JSON object" in e.value.message
    with pytest.raises(net.HttpError) as e:
        trainer.call("GET", "/start")
    assert e.value.status == 404 and "not a root role" in e.value.message
    configure_trainer(trainer)
    assert "dataset: 40 train samples (parts 1..2)" in trainer.call("GET", "/log").text


def test_aggregator_start_needs_confs(env_dirs):
    log_dir, ds = env_dirs
    node = NodeProc("fl_aggregator", "n1", log_dir=log_dir, dataset_dir=ds)
    try:
        node.wait_ready()
        with pytest.raises(net.HttpError) as e:
            node.call("GET", "/start")
        assert e.value.status == 409 and "cannot start before /conf/structure and /conf/dataset" in e.value.message
        with pytest.raises(net.HttpError) as e:
            node.call("POST", "/conf/dataset", json={"train_len": 1})
        assert e.value.status == 400 and "test parts" in e.value.message
        with pytest.raises(net.HttpError) as e:
            node.call("POST", "/conf/structure", json={"trainer_fraction": 2, "sync": 1,
                                                       "child_node": ["n2"], "connect": {"n2": "a:1"}})
        assert e.value.status == 400 and "trainer_fraction" in e.value.message
    finally:
        node.stop()


def test_heartbeats_reach_the_controller_and_sigterm_exits_cleanly(env_dirs):
    log_dir, ds = env_dirs
    ctl = StubController()
    node = NodeProc("fl_trainer", "n3", log_dir=log_dir, dataset_dir=ds, ctl_address=ctl.address)
    try:
        node.wait_ready()
        wait_until(lambda: ctl.heartbeats, 10, "a heartbeat")
        assert ctl.heartbeats[0] == {"node": "n3", "state": "idle", "round": 0}
        os.killpg(node.proc.pid, signal.SIGTERM)
        assert node.proc.wait(15) == 0
        assert re.search(r"INFO stopped$", (log_dir / "n3.log").read_text(), re.M)
    finally:
        node.stop()
        ctl.close()


# ----------------------------------------------------------------------------- in process

def _env(scratch: Path, name: str, **extra: str) -> dict[str, str]:
    env = {"NET_NODE_NAME": name, "EDGE_TB_TOKEN": TOKEN, "DML_PORT": "0", "EDGE_TB_ID": "7",
           "DML_LOG_DIR": str(scratch / "log"), "DML_DATASET_DIR": str(scratch / "ds")}
    env.update(extra)
    return env


@pytest.fixture
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_env_is_read_and_checked(scratch, keep_torch_threads):
    rt = Runtime("r", env=_env(scratch, "a1", DML_CPU="2.7", NET_CTL_ADDRESS="127.0.0.1:3333"))
    try:
        assert (rt.name, rt.port, rt.testbed_id, rt.ctl_address) == ("a1", 0, "7", "127.0.0.1:3333")
        assert rt.torch_threads == 2 and torch.get_num_threads() == 2
    finally:
        rt.close()
    rt = Runtime("r", env=_env(scratch, "a2", DML_CPU="0.5"))
    assert rt.torch_threads == 1
    rt.close()
    for bad, message in (({"EDGE_TB_TOKEN": ""}, "EDGE_TB_TOKEN is not set"),
                         ({"DML_PORT": "http"}, "DML_PORT='http'"),
                         ({"DML_CPU": "-1"}, "DML_CPU='-1'"),
                         ({"NET_NODE_NAME": "../etc"}, "NET_NODE_NAME='../etc'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            Runtime("r", env={**_env(scratch, "a3"), **bad})


def test_edgetb_log_lines_and_metrics(scratch, keep_torch_threads):
    rt = Runtime("r", env=_env(scratch, "m1"))
    try:
        rt.log_train(0.123456, 3)
        rt.log_aggregate(0.9, 3)
        rt.log_aggregate(0.75, 4, layer=2)
        log = (scratch / "log" / "m1.log").read_text()
        assert re.search(r" INFO Train: loss=0\.1235, round=3,$", log, re.M)
        assert re.search(r" INFO Aggregate: accuracy=0\.9000, round=3,$", log, re.M)
        assert re.search(r" INFO Aggregate: accuracy=0\.7500, round=4, layer=2,$", log, re.M)
        recs = [json.loads(l) for l in (scratch / "log" / "m1.metrics.jsonl").read_text().splitlines()]
        assert [(r["event"], r["round"]) for r in recs] == [("train", 3), ("aggregate", 3), ("aggregate", 4)]
        assert recs[0]["loss"] == 0.123456 and recs[1]["accuracy"] == 0.9 and recs[2]["layer"] == 2
        assert all(r["node"] == "m1" and isinstance(r["t"], float) for r in recs)
        client = rt.app.test_client()
        assert client.get("/metrics").status_code == 401
        got = client.get("/metrics", headers={net.TOKEN_HEADER: TOKEN})
        assert got.status_code == 200 and got.get_data(as_text=True).count("\n") == 3
    finally:
        rt.close()


def test_send_and_receive_weights_count_bytes(scratch, keep_torch_threads):
    a = Runtime("sender", env=_env(scratch, "s1"))
    b = Runtime("receiver", env=_env(scratch, "s2"))
    got: dict = {}

    @b.route("/take", methods=["POST"])
    def take():
        got["tensors"], got["meta"] = b.receive_weights()
        return "ok"

    try:
        b.start_serving("127.0.0.1")
        sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(4)}
        a.send_weights(f"127.0.0.1:{b.port}", "/take", sd, {"round": 2, "name": "s1", "loss": 0.5})
        assert torch.equal(got["tensors"]["w"], sd["w"]) and got["tensors"]["n"].item() == 4
        assert got["meta"] == {"round": 2, "name": "s1", "loss": 0.5}
        assert a.bytes_sent == b.bytes_received > 0
        with pytest.raises(ValueError, match="expected 'ip:port'"):
            a.send_weights("127.0.0.1", "/take", sd)
        with pytest.raises(net.HttpError) as e:
            a.send_weights(f"127.0.0.1:{b.port}", "/nope", sd)
        assert e.value.status == 404
    finally:
        a.close()
        b.close()


def test_heartbeat_failures_are_logged_once(scratch, monkeypatch, keep_torch_threads):
    """The controller answers 503 five times, then 200: one warning, one recovery line."""
    from flask import Flask

    monkeypatch.setattr(runtime, "HEARTBEAT_PERIOD_S", 0.05)
    calls: list[int] = []
    app = Flask("flaky-controller")

    @app.post("/heartbeat")
    def heartbeat():
        calls.append(1)
        return ("busy", 503) if len(calls) <= 5 else "ok"

    ctl = net.Server(app, "127.0.0.1", 0).start()
    rt = Runtime("r", env=_env(scratch, "h1", NET_CTL_ADDRESS=f"127.0.0.1:{ctl.port}"))
    try:
        rt.start_serving("127.0.0.1")
        wait_until(lambda: len(calls) >= 8, 10, "8 heartbeats")
        log = (scratch / "log" / "h1.log").read_text()
        assert log.count("heartbeat failed") == 1
        assert log.count("heartbeats reach the controller again") == 1
    finally:
        rt.close()
        ctl.close()


def test_start_hook_runs_in_the_background_once(scratch, keep_torch_threads):
    rt = Runtime("root", env=_env(scratch, "r1"))
    release, ran = threading.Event(), threading.Event()

    def start() -> None:
        ran.set()
        release.wait(10)

    rt.on_start(start, needs=())
    client = rt.app.test_client()
    hdr = {net.TOKEN_HEADER: TOKEN}
    try:
        assert client.get("/start", headers=hdr).status_code == 200  # answered while start() blocks
        assert ran.wait(5)
        r = client.get("/start", headers=hdr)
        assert r.status_code == 409 and b"already started" in r.data
    finally:
        release.set()
        rt.close()


def test_part_files_are_never_unpickled(scratch):
    from dml_app.node_data import DatasetError, load_node_data

    ds = make_dataset(scratch / "ds", parts=2, n=4)
    np.save(ds / "train" / "2_y.npy", np.array([{"x": 1}] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="train part 2 unreadable"):
        load_node_data(str(ds), {"train_len": 2})
    data = load_node_data(str(ds), {"train_len": 1, "test_len": 2, "test_start_index": 1, "batch_size": 4})
    assert (data.train_samples, data.test_samples, data.batch_size) == (4, 8, 4)
    with pytest.raises(DatasetError, match="meta.json not found"):
        load_node_data(str(scratch / "missing"), {"train_len": 1})
