"""The serverless worker (dml_app/sl_action.py), exactly: real processes over real HTTP on
loopback, real PyTorch on the MNIST subset.

One action node (a1: the node runtime plus the OpenWhisk action server on its own port)
and one real ps_server.py in serverless mode (n1, actions a1 and ow1). The test plays the
invoker: it calls /init and /run with the action node's own token, passes the api_key an
invoker computes (net.client_token(admin, n1, a1)) and serves the data bundles from a
small HTTP server of its own that checks the node's token (the controller's /data route
is tested with the invoker). The tests share the action and the server in file order;
the last one runs the server to its last step.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
from flask import Flask, Response, jsonify

from tests.support import procs
from tests.support.procs import TOKEN, NodeProc, StubController, free_port, wait_until
from dml_app import net
from dml_tool import splitter
from dml_app.node_data import pack_train_parts, unpack_parts

ADMIN = "sl-action-admin-token-0123456789"
PEER = "sl-action-peer-token-0123456789"
ACTION_TOKEN = "node.a1.sl-action-own-token-0123"   # the action node's own credential
SERVER, ACTION = "n1", "a1"
STEPS = 40
END_MARKER = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"


def api_key(node: str = ACTION) -> str:
    return net.client_token(ADMIN, SERVER, node)


class DataServer:
    """The bundles by sha256 (GET /data/<digest>, the node's token only), counting
    downloads; also the action node's controller (heartbeats)."""

    def __init__(self, token: str):
        self.bundles: dict[str, bytes] = {}
        self.downloads: dict[str, int] = {}
        app = Flask("test-data")
        net.require_token(app, token)

        @app.get("/data/<digest>")
        def data(digest: str):
            if digest not in self.bundles:
                return "no such bundle\n", 404
            self.downloads[digest] = self.downloads.get(digest, 0) + 1
            return Response(self.bundles[digest], mimetype="application/octet-stream")

        @app.post("/heartbeat")
        def heartbeat():
            return jsonify(ok=True)

        self.server = net.Server(app, "127.0.0.1", 0, threads=4).start()
        self.address = f"127.0.0.1:{self.server.port}"

    def add(self, body: bytes, digest: str | None = None) -> str:
        digest = digest or hashlib.sha256(body).hexdigest()
        self.bundles[digest] = body
        return f"http://{self.address}/data/{digest}"

    def close(self) -> None:
        self.server.close()


class ActionNode(NodeProc):
    """sl_action.py as the agent starts it (NodeProc), plus DML_ACTION_PORT (NodeProc
    passes no DML_* of the test's own), optionally with arguments (--openwhisk)."""

    def __init__(self, name: str, *, args: tuple[str, ...] = (), **kw):
        self.action_port = free_port()
        real_env = procs.app_env

        def env_with_port(spec, extra, log_dir, base=None):
            spec.cmd = spec.cmd + list(args)
            return {**real_env(spec, extra, log_dir, base=base), "DML_ACTION_PORT": str(self.action_port)}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(procs, "app_env", env_with_port)
            super().__init__("sl_action", name, **kw)

    def action(self, path: str, body, *, token: str | None = ACTION_TOKEN, timeout_s: float = 60.0):
        """POST to the action server: (status, JSON answer)."""
        try:
            r = net.call("POST", f"http://127.0.0.1:{self.action_port}{path}", token=token, json=body,
                         timeout_s=timeout_s)
            return r.status_code, r.json()
        except net.HttpError as e:
            assert e.status is not None, e
            return e.status, json.loads(e.message)

    def wait_action(self, timeout_s: float = 30.0) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.output()}")
            try:
                net.call("GET", f"http://127.0.0.1:{self.action_port}/init", timeout_s=1.0)
            except net.HttpError as e:
                return e.status is not None
            return True
        wait_until(up, timeout_s, f"{self.name}'s action server")


@pytest.fixture(scope="module")
def dataset(module_scratch):
    ds = module_scratch / "dataset"
    # 100 train samples a part (the default split's sizes)
    splitter.split(source="mnist-subset", out=str(ds), train_parts=40, test_parts=10, partition="iid", seed=7)
    return ds


@pytest.fixture(scope="module")
def world(dataset, module_scratch):
    """(action node, data server, serverless server, {name: bundle URL})."""
    started: list = []
    try:
        data = DataServer(ACTION_TOKEN)
        started.append(data)
        ctl = StubController()
        started.append(ctl)
        with pytest.MonkeyPatch.context() as mp:     # the agent gives every node its service key
            mp.setenv(net.SERVICE_KEY_ENV, net.service_key(ADMIN, SERVER))
            srv = NodeProc("ps_server", SERVER, log_dir=module_scratch / "log", dataset_dir=dataset,
                           ctl_address=ctl.address, peer_token=PEER)
        started.append(srv)
        act = ActionNode(ACTION, log_dir=module_scratch / "log", dataset_dir=dataset, ctl_address=data.address,
                         token=ACTION_TOKEN, peer_token=PEER)
        started.append(act)
        srv.wait_ready(60)
        srv.call("POST", "/conf/structure", json={
            "role": "server", "serverless": True, "mode": "async", "actions": [ACTION, "ow1"],
            "steps": STEPS, "lr": 0.05, "max_staleness": 2, "eval_every": STEPS, "seed": 1})
        srv.call("POST", "/conf/dataset", json={"test_len": 1, "test_start_index": 1})
        srv.call("GET", "/start")
        wait_until(lambda: srv.call("GET", "/ps/status").json()["started"], 60, "the model at version 0")
        act.wait_ready(60)
        act.wait_action()
        urls = {"small": data.add(pack_train_parts(str(dataset), 1, 2)),
                "all": data.add(pack_train_parts(str(dataset), 1, 10))}
        yield act, data, srv, urls
    finally:
        for s in reversed(started):
            (s.stop if isinstance(s, NodeProc) else s.close)()


def params(world, **over) -> dict:
    act, _, srv, urls = world
    p = {"batch_sz_train": 32, "epoch_n": 1, "update_intv": 4, "apihost": srv.address,
         "dataset_url": urls["small"], "device": "cpu", "lr": 0.05}
    p.update(over)
    return p


def run_body(world, aid: str, deadline_s: float = 60.0, **over) -> dict:
    return {"value": params(world, **over), "activation_id": aid, "api_key": api_key(),
            "deadline": int((time.time() + deadline_s) * 1000), "action_name": "/guest/sl_train",
            "namespace": "guest", "transaction_id": "t-" + aid}


def server_state(srv) -> dict:
    return srv.call("GET", "/getVersion").json()


@pytest.mark.timeout(120)
def test_init_once_and_the_credential(world):
    act = world[0]
    # /run before /init: 502 {"error"}
    status, ans = act.action("/run", run_body(world, "early-1"))
    assert status == 502 and list(ans) == ["error"] and "/init" in ans["error"]
    # only the node's own token opens the action server; every failure is JSON {"error"}
    for token in (None, PEER, TOKEN, api_key()):
        status, ans = act.action("/init", {"value": {"name": "sl_train", "main": "main", "code": ""}}, token=token)
        assert status == 401 and list(ans) == ["error"], (token, status, ans)
    status, ans = act.action("/init", {"value": {"name": "sl_train", "main": "other"}})
    assert status == 502 and "main" in ans["error"]
    status, ans = act.action("/init", {"value": "no"})
    assert status == 502 and list(ans) == ["error"]
    status, ans = act.action("/init", {"value": {"name": "sl_train", "main": "main", "code": "", "binary": False,
                                                 "env": {"A": "1"}}})
    assert (status, ans) == (200, {"ok": True})
    status, ans = act.action("/init", {"value": {"name": "sl_train", "main": "main"}})
    assert (status, ans) == (403, {"error": "Cannot initialize the action more than once."})
    e = pytest.raises(net.HttpError, net.call, "GET", f"http://127.0.0.1:{act.action_port}/run",
                      token=ACTION_TOKEN, timeout_s=5).value
    assert e.status == 405 and "error" in json.loads(e.message)


@pytest.mark.timeout(120)
def test_bad_params_are_refused_clearly(world):
    act, data, _, urls = world
    bad = [({"batch_sz_train": 0}, "batch_sz_train must be an integer in [1, 4096]"),
           ({"batch_sz_train": "32"}, "batch_sz_train"),
           ({"epoch_n": 101}, "epoch_n"),
           ({"update_intv": 1.5}, "update_intv"),
           ({"lr": 0}, "lr"),
           ({"device": "cuda"}, "device \"cuda\": no such device here"),
           ({"apihost": "not an address"}, "apihost"),
           ({"dataset_url": "ftp://x/" + "0" * 64}, "dataset_url"),
           ({"dataset_url": f"http://{data.address}/data/bundle"}, "sha256"),
           ({"seed": -1}, "seed")]
    for over, want in bad:
        status, ans = act.action("/run", run_body(world, "bad-1", **over))
        assert status == 502 and list(ans) == ["error"] and want in ans["error"], (over, ans)
    # an envelope that is not OpenWhisk's: 400
    for key, value in [("activation_id", "a/b"), ("activation_id", "x" * 49), ("deadline", "soon"),
                       ("deadline", 1e20), ("api_key", ""), ("api_key", None)]:
        body = run_body(world, "bad-2")
        body[key] = value
        status, ans = act.action("/run", body)
        assert status == 400 and list(ans) == ["error"] and key.split("_")[0] in ans["error"], (key, value, ans)
    e = pytest.raises(net.HttpError, net.call, "POST", f"http://127.0.0.1:{act.action_port}/run",
                      token=ACTION_TOKEN, data='{"value": {"epoch_n": NaN}}', timeout_s=10,
                      headers={"Content-Type": "application/json"}).value
    assert e.status == 400 and "not a finite number" in json.loads(e.message)["error"]   # refused at the door
    assert data.downloads == {}          # nothing was fetched for any of these
    assert server_state(world[2])["registered"] == 0


@pytest.mark.timeout(120)
def test_run_trains_pushes_and_a_warm_run_reuses_the_data(world):
    act, data, srv, urls = world
    v0 = server_state(srv)["version"]
    digest = urls["small"].rsplit("/", 1)[1]
    markers = act.output().count(END_MARKER)
    # 200 samples, batches of 32: 6 batches, pushes every 4: 2 cycles (4 + 2 batches)
    status, res = act.action("/run", run_body(world, "run-1"))
    assert status == 200, res
    assert res["worker_id"] == "run-1" and res["node"] == ACTION
    assert res["pushes"] == 2 and res["applied"] + res["refused"] == 2 and res["applied"] >= 1
    assert res["samples"] == 6 * 32 and 0 < res["loss"] < 5
    assert res["version_start"] == v0 and res["version_end"] >= v0 + res["applied"]
    assert res["server_done"] is False and res["cached_data"] is False
    assert res["bytes"]["data_down"] == len(data.bundles[digest]) and data.downloads[digest] == 1
    assert res["bytes"]["params_down"] > 2 * 200_000 and res["bytes"]["gradients_up"] > 2 * 200_000
    t = res["timings"]
    assert all(t[k] >= 0 for k in ("fetch_s", "build_s", "train_s")) and t["total_s"] >= t["train_s"]
    state = server_state(srv)
    assert state["version"] == v0 + res["applied"] and state["registered"] == 0     # unregistered after
    # warm: the same bundle is not fetched again
    status, res2 = act.action("/run", run_body(world, "run-2", update_intv=3))
    assert status == 200, res2
    assert res2["cached_data"] is True and res2["bytes"]["data_down"] == 0 and data.downloads[digest] == 1
    assert res2["pushes"] == 2 and res2["version_start"] >= res["version_end"]
    assert res2["timings"]["fetch_s"] < res["timings"]["fetch_s"] + 0.5
    # what the node logged: EdgeTB's train lines per push, an activation record each,
    # and OpenWhisk's end-of-activation marker on stdout and stderr per activation
    log = act.call("GET", "/log").text
    assert log.count("Train: loss=") >= 4
    acts = [json.loads(line) for line in act.call("GET", "/metrics").text.splitlines()
            if '"activation"' in line]
    assert [(a["activation_id"], a["status"]) for a in acts][-2:] == [("run-1", "success"), ("run-2", "success")]
    wait_until(lambda: act.output().count(END_MARKER) >= markers + 4, 5, "the end markers")


@pytest.mark.timeout(120)
def test_one_run_at_a_time_and_the_deadline(world):
    act, _, srv, urls = world
    # 1,000 samples, batches of 100, 100 epochs (1,000 batches: 5 s or more of LeNet on a
    # core, about 8 s here), no push before the end: past a 3.5 s deadline, which leaves a
    # loaded machine the time to fetch, build and register before the second run is tried
    body = run_body(world, "long-1", deadline_s=3.5, dataset_url=urls["all"], batch_sz_train=100, epoch_n=100,
                    update_intv=10_000)
    deadline = body["deadline"] / 1000
    out: dict = {}
    first = threading.Thread(target=lambda: out.update(ans=act.action("/run", body)))
    first.start()
    try:
        wait_until(lambda: server_state(srv)["registered"] == 1, 10, "the long run to register")
        status, ans = act.action("/run", run_body(world, "second-1"))
        assert status == 409 and list(ans) == ["error"] and "long-1" in ans["error"]
    finally:
        first.join(30)
    status, ans = out["ans"]
    assert status == 502 and ans["error"].startswith("deadline exceeded"), ans
    assert time.time() < deadline + 1.0          # answered by the deadline, not long after
    wait_until(lambda: server_state(srv)["registered"] == 0, 10, "the timed-out worker to be unregistered")
    # the action is usable again
    status, res = act.action("/run", run_body(world, "after-1"))
    assert status == 200 and res["pushes"] == 2 and res["cached_data"] is True, res
    # a deadline already past: refused at once, nothing registered
    status, ans = act.action("/run", run_body(world, "late-1", deadline_s=-1))
    assert status == 502 and ans["error"].startswith("deadline exceeded")


@pytest.mark.timeout(120)
def test_a_bundle_that_does_not_match_its_digest_is_refused(world, dataset):
    act, data, srv, urls = world
    body = pack_train_parts(str(dataset), 3, 1)
    wrong = hashlib.sha256(b"something else").hexdigest()
    url = data.add(body, digest=wrong)
    for k in (1, 2):        # refused, so not cached: fetched again
        status, ans = act.action("/run", run_body(world, f"sha-{k}", dataset_url=url))
        assert status == 502 and "sha256" in ans["error"] and wrong in ans["error"], ans
        assert data.downloads[wrong] == k
    # not a bundle, though its digest matches
    junk = b"\0" * 64
    status, ans = act.action("/run", run_body(world, "junk-1", dataset_url=data.add(junk)))
    assert status == 502 and "data bundle" in ans["error"], ans
    # the node's credential goes only to its controller: another host's URL gets none
    other = f"http://localhost:{data.server.port}/data/{hashlib.sha256(body).hexdigest()}"
    data.add(body)
    status, ans = act.action("/run", run_body(world, "cred-1", dataset_url=other))
    assert status == 502 and "HTTP 401" in ans["error"] and "only to the controller" in ans["error"], ans
    assert server_state(srv)["registered"] == 0
    x, y, meta = unpack_parts(body)
    assert len(x) == len(y) == meta["samples"] > 0


@pytest.mark.timeout(120)
def test_openwhisk_mode_and_a_run_to_the_servers_last_step(world, dataset, module_scratch):
    """--openwhisk: only the action server, no testbed credential on it, the testbed's
    credentials as params; it trains until the server's 410 (server_done)."""
    act, data, srv, urls = world
    ow = ActionNode("ow1", args=("--openwhisk",), log_dir=module_scratch / "log", dataset_dir=dataset,
                    token=ACTION_TOKEN)
    try:
        ow.wait_action(60)
        with pytest.raises(net.HttpError):            # no node runtime in this mode
            ow.call("GET", "/hi", timeout_s=1.0)
        assert ow.action("/init", {"value": {"name": "sl_train", "main": "train"}}, token=None) == (200, {"ok": True})
        status, ans = ow.action("/init", {"value": {"main": "train"}}, token=None)
        assert status == 403
        v0 = server_state(srv)["version"]
        body = run_body(world, "ow-1", epoch_n=100, update_intv=1, dataset_url=urls["small"],
                        server_token=api_key("ow1"), data_token=ACTION_TOKEN)
        body["api_key"] = "23bc46b1-71f6-4ed5-8c54-816aa4f8c502:123zO3xZCLrMN6v2BKK1dXYFpXlPkccOFqm12CdAsMgRU4VrNZ9lyGVCGuMDGIwP"
        status, res = ow.action("/run", body, token=None)
        assert status == 200, res
        assert res["server_done"] is True and res["version_end"] == STEPS
        assert res["applied"] == STEPS - v0 and res["pushes"] == res["applied"] + res["refused"] + 1
        assert server_state(srv)["done"] is True and server_state(srv)["registered"] == 0
        assert END_MARKER in ow.output()
    finally:
        ow.stop()
    # the testbed action too: register gets 410, a successful activation with nothing to do
    status, res = act.action("/run", run_body(world, "done-1"))
    assert status == 200 and res["server_done"] is True and res["pushes"] == 0, res
    wait_until(lambda: world[2].call("GET", "/ps/status").json()["done"], 10, "the server done")


def test_data_bundles_are_deterministic_and_checked(dataset):
    import torch

    a, b = pack_train_parts(str(dataset), 2, 3), pack_train_parts(str(dataset), 2, 3)
    assert a == b != pack_train_parts(str(dataset), 3, 3)        # the same parts, the same bytes
    x, y, meta = unpack_parts(a)
    assert x.shape == (300, 1, 28, 28) and x.dtype.name == "float32" and y.dtype.name == "int64"
    assert (meta["train_start_index"], meta["train_len"], meta["samples"], meta["num_classes"]) == (2, 3, 300, 10)
    good = {"x": torch.from_numpy(x[:4]), "y": torch.from_numpy(y[:4])}
    bad = [(dict(good, y=torch.tensor([0, 1, 2, 10])), meta, "labels 0..10 outside 0..9"),
           (dict(good, z=good["y"].clone()), meta, "expected the tensors x and y"),
           (dict(good, y=good["y"].int()), meta, "y int64"),
           (dict(good, x=good["x"][:, :, :14]), meta, "inputs shaped [1, 14, 28]"),
           (dict(good, y=good["y"][:3]), meta, "not N inputs and N labels"),
           (dict(good, x=good["x"] * float("nan")), meta, "NaN"),
           (good, dict(meta, num_classes=0), "num_classes"),
           (good, {k: v for k, v in meta.items() if k != "name"}, "'name'")]
    for tensors, m, want in bad:
        with pytest.raises(ValueError, match=want.replace("[", r"\[").replace("]", r"\]")):
            unpack_parts(net.pack_weights(tensors, m))
    for junk in (b"", b"\x80\x04K\x01.", a[:-10]):          # empty, a pickle, cut short
        with pytest.raises(ValueError, match="data bundle"):
            unpack_parts(junk)
    with pytest.raises(ValueError, match="train parts 40..41 asked"):
        pack_train_parts(str(dataset), 40, 2)
