"""The serverless parameter server's API, exactly: one real ps_server process (node n1,
serverless mode) over real HTTP on loopback.

The test plays the actions: it shows the client credentials an invoker would pass
(net.client_token(admin, "n1", node)), registers worker ids, pulls parameters with GET
/getParameter, computes gradients of real batches and pushes them to /putGradient. The
tests share the one server in file order (each uses its own worker ids; the last one
runs the server to its last step).
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tests.support.procs import TOKEN, NodeProc, StubController, wait_until
from dml_app import net
from dml_app import nns
from dml_tool import splitter
from dml_app.node_data import load_node_data
from dml_app.ps import MAX_WORKERS, Registry, Rejected
from dml_app.ps import batch_gradient
from dml_app.ps_server import check_structure

ADMIN = "admin-token-0123456789"          # the testbed's admin token the credentials derive from
PEER = "peer-token-0123456789"
SERVER = "n1"
STEPS, LR, MAX_STALENESS = 8, 0.05, 1
OCTET = {"Content-Type": "application/octet-stream"}


def cred(node: str, server: str = SERVER) -> str:
    return net.client_token(ADMIN, server, node)


@pytest.fixture(scope="module")
def data(module_scratch):
    ds = module_scratch / "dataset"
    splitter.split(source="mnist-subset", out=str(ds), train_parts=4, test_parts=2, partition="iid", seed=5)
    return ds, load_node_data(str(ds), {"train_len": 4, "train_start_index": 1})


@pytest.fixture(scope="module")
def server(data, module_scratch):
    """(server NodeProc, stub controller): n1 started in serverless mode, actions n2 and n3."""
    ds, _ = data
    ctl = StubController()
    srv = None
    try:
        with pytest.MonkeyPatch.context() as mp:    # the agent gives every node its service key
            mp.setenv(net.SERVICE_KEY_ENV, net.service_key(ADMIN, SERVER))
            srv = NodeProc("ps_server", SERVER, log_dir=module_scratch / "log", dataset_dir=ds,
                           ctl_address=ctl.address, peer_token=PEER)
        srv.wait_ready()
        srv.call("POST", "/conf/structure", json={
            "role": "server", "serverless": True, "mode": "async", "actions": ["n2", "n3"],
            "steps": STEPS, "lr": LR, "max_staleness": MAX_STALENESS, "eval_every": 2, "seed": 3})
        srv.call("POST", "/conf/dataset", json={"test_len": 1, "test_start_index": 1})
        srv.call("GET", "/start")
        wait_until(lambda: srv.call("GET", "/ps/status").json()["started"], 60, "the model at version 0")
        yield srv, ctl
    finally:
        if srv is not None:
            srv.stop()
        ctl.close()


def call(srv: NodeProc, method: str, path: str, token: str | None, **kw):
    return net.call(method, srv.url(path), token=token, timeout_s=10.0, **kw)


def status_of(srv, method, path, token, **kw) -> net.HttpError:
    with pytest.raises(net.HttpError) as e:
        call(srv, method, path, token, **kw)
    return e.value


def register(srv, node: str, worker_id) -> dict:
    return call(srv, "POST", "/registerWorker", cred(node), json={"worker_id": worker_id}).json()


def unregister(srv, token, worker_id) -> dict:
    return call(srv, "POST", "/unregisterWorker", token, json={"worker_id": worker_id}).json()


def put(srv, node: str, grad: dict, **meta):
    meta.setdefault("samples", 32)
    meta.setdefault("loss", 1.0)
    return call(srv, "POST", "/putGradient", cred(node), data=net.pack_weights(grad, meta), headers=OCTET)


def parameters(srv, node: str = "n2") -> tuple[int, dict]:
    r = call(srv, "GET", "/getParameter", cred(node))
    assert r.headers["content-type"].startswith("application/octet-stream")
    tensors, meta = net.unpack_weights(r.content)
    return meta["version"], tensors


def gradients(params: dict, d, k: int, at: int = 0, batch: int = 32) -> list[dict]:
    """The gradients of k disjoint batches (from sample `at`) at `params`, as a worker's."""
    model = nns.build_model(d.meta)
    model.load_state_dict(params)
    return [batch_gradient(model, d.train_x[at + i * batch:at + (i + 1) * batch],
                           d.train_y[at + i * batch:at + (i + 1) * batch])[1] for i in range(k)]


def version(srv) -> int:
    return call(srv, "GET", "/getVersion", TOKEN).json()["version"]


def test_credentials_on_the_serverless_routes(server):
    srv, _ = server
    routes = [("POST", "/registerWorker", {"json": {"worker_id": "c-1"}}),
              ("POST", "/unregisterWorker", {"json": {"worker_id": "c-1"}}),
              ("GET", "/getVersion", {}), ("GET", "/getParameter", {}),
              ("POST", "/putGradient", {"data": b"x" * 16, "headers": OCTET})]
    for method, path, kw in routes:
        assert status_of(srv, method, path, None, **kw).status == 401, path
        assert status_of(srv, method, path, cred("n2", server="n7"), **kw).status == 401, path  # another server's
        e = status_of(srv, method, path, PEER, **kw)
        assert e.status == 403 and "not the testbed's peer credential" in e.message, path
    # a client credential opens these routes only
    assert status_of(srv, "GET", "/ps/status", cred("n2")).status == 401
    e = status_of(srv, "POST", "/registerWorker", cred("n9"), json={"worker_id": "c-1"})
    assert e.status == 403 and "node 'n9' may not register workers" in e.message
    e = status_of(srv, "POST", "/registerWorker", TOKEN, json={"worker_id": "c-1"})   # the controller
    assert e.status == 403
    ans = call(srv, "GET", "/getVersion", cred("n9")).json()     # any client may read
    assert ans["steps"] == STEPS and ans["done"] is False and ans["registered"] == 0
    assert ans["accuracy_version"] == 0 and 0 <= ans["accuracy"] <= 1      # the initial model's
    # the long-lived routes are not this mode's
    e = status_of(srv, "POST", "/ps/pull", TOKEN, json={"name": "n2", "have": -1})
    assert e.status == 409 and "serverless mode" in e.message


def test_registration_is_per_node(server, data):
    srv, _ = server
    _, d = data
    for bad in ("", "a/b", "x" * 65, 7, None):
        e = status_of(srv, "POST", "/registerWorker", cred("n2"), json={"worker_id": bad})
        assert e.status == 400 and "'worker_id' must be 1 to 64 characters" in e.message, bad
    e = status_of(srv, "POST", "/registerWorker", cred("n2"), data="{" * 5000,
                  headers={"Content-Type": "application/json"})
    assert e.status == 413                               # bodies are bounded
    assert register(srv, "n2", "r-1") == {"worker_id": "r-1", "version": version(srv), "registered": 1}
    assert register(srv, "n2", "r-1")["registered"] == 1                  # again: the same
    e = status_of(srv, "POST", "/registerWorker", cred("n3"), json={"worker_id": "r-1"})
    assert e.status == 409 and "registered by another node (n2)" in e.message

    v, params = parameters(srv)
    (g,) = gradients(params, d, 1)
    e = status_of(srv, "POST", "/putGradient", cred("n3"), data=net.pack_weights(
        g, {"worker_id": "r-1", "version": v, "samples": 32}), headers=OCTET)
    assert e.status == 403 and "registered by another node (n2), not by n3" in e.message
    e = status_of(srv, "POST", "/putGradient", cred("n2"), data=net.pack_weights(
        g, {"worker_id": "r-none", "version": v, "samples": 32}), headers=OCTET)
    assert e.status == 403 and "'r-none' is not registered" in e.message
    e = status_of(srv, "POST", "/putGradient", TOKEN, data=net.pack_weights(
        g, {"worker_id": "r-1", "version": v, "samples": 32}), headers=OCTET)
    assert e.status == 403 and "may not push" in e.message              # the controller reads only
    e = status_of(srv, "POST", "/unregisterWorker", cred("n3"), json={"worker_id": "r-1"})
    assert e.status == 403
    assert version(srv) == v                                             # nothing was applied

    assert register(srv, "n3", "r-2")["registered"] == 2
    assert unregister(srv, TOKEN, "r-2") == {"unregistered": True}      # the controller may
    assert unregister(srv, cred("n2"), "r-1") == {"unregistered": True}
    assert unregister(srv, cred("n2"), "r-1") == {"unregistered": False}
    e = status_of(srv, "POST", "/putGradient", cred("n2"), data=net.pack_weights(
        g, {"worker_id": "r-1", "version": v, "samples": 32}), headers=OCTET)
    assert e.status == 403
    assert call(srv, "GET", "/getVersion", TOKEN).json()["registered"] == 0


def test_versions_rise_with_gradients_and_stale_ones_are_refused(server, data):
    srv, _ = server
    _, d = data
    register(srv, "n2", "s-1")
    register(srv, "n3", "s-2")
    v, p0 = parameters(srv)
    assert v == version(srv)
    g1, g2, g3 = gradients(p0, d, 3)

    assert put(srv, "n2", g1, worker_id="s-1", version=v).json() == {"applied": True, "version": v + 1}
    v1, p1 = parameters(srv, "n3")
    assert v1 == v + 1
    for k in g1:     # applied at once: p - lr * g
        assert torch.equal(p1[k], p0[k].add(g1[k], alpha=-LR)), k
    # staleness 1 (= max_staleness): taken
    assert put(srv, "n3", g2, worker_id="s-2", version=v).json() == {"applied": True, "version": v + 2}
    _, p2 = parameters(srv)
    e = status_of(srv, "POST", "/putGradient", cred("n2"), data=net.pack_weights(
        g3, {"worker_id": "s-1", "version": v, "samples": 32, "loss": 1.0}), headers=OCTET)
    assert e.status == 409
    assert f"computed on version {v}, the server is at version {v + 2} (staleness 2 > max_staleness 1)" \
        in e.message
    e = status_of(srv, "POST", "/putGradient", cred("n2"), data=net.pack_weights(
        g3, {"worker_id": "s-1", "version": v + 7, "samples": 32}), headers=OCTET)
    assert e.status == 409 and "never served" in e.message
    v2b, p2b = parameters(srv)
    assert v2b == v + 2 and all(torch.equal(p2b[k], p2[k]) for k in p2)     # refusals change nothing

    bad_meta = [{"version": v + 2, "samples": 32, "loss": math.nan},
                {"version": v + 2, "samples": 32, "loss": math.inf},
                {"version": v + 2, "samples": 0},
                {"version": -1, "samples": 32},
                {"version": 1.5, "samples": 32},
                {"samples": 32}]
    for meta in bad_meta:
        e = status_of(srv, "POST", "/putGradient", cred("n2"), data=net.pack_weights(
            g3, {"worker_id": "s-1", **meta}), headers=OCTET)
        assert e.status == 400, meta
    wrong = {k: (v_[..., :1] if k == "features.0.weight" else v_) for k, v_ in g3.items()}
    for grad in (wrong, {k: g for k, g in g3.items() if k != "features.0.bias"}):
        e = status_of(srv, "POST", "/putGradient", cred("n2"), data=net.pack_weights(
            grad, {"worker_id": "s-1", "version": v + 2, "samples": 32}), headers=OCTET)
        assert e.status == 400 and "does not match the model" in e.message
    e = status_of(srv, "POST", "/putGradient", cred("n2"), data=b"not safetensors", headers=OCTET)
    assert e.status == 400
    assert version(srv) == v + 2

    # a push sent again with its push_id is applied once
    (g4,) = gradients(p2, d, 1, at=96)
    assert put(srv, "n2", g4, worker_id="s-1", version=v + 2, push_id="s-1-0").json() == \
        {"applied": True, "version": v + 3}
    assert put(srv, "n2", g4, worker_id="s-1", version=v + 2, push_id="s-1-0").json() == \
        {"applied": True, "version": v + 3, "duplicate": True}
    _, p3 = parameters(srv)
    for k in g4:
        assert torch.equal(p3[k], p2[k].add(g4[k], alpha=-LR)), k
    status = srv.call("GET", "/ps/status").json()
    assert status["version"] == v + 3 and status["serverless"] is True and status["registered"] == 2
    log = srv.call("GET", "/log").text
    assert re.findall(r"Step: version=(\d+), from=([\w-]+), staleness=(\d),", log)[-3:] == \
        [(str(v + 1), "s-1", "0"), (str(v + 2), "s-2", "1"), (str(v + 3), "s-1", "0")]
    unregister(srv, cred("n2"), "s-1")
    unregister(srv, cred("n3"), "s-2")


def test_registrations_are_bounded(server):
    srv, _ = server
    for i in range(MAX_WORKERS):
        register(srv, "n3", f"b-{i}")
    e = status_of(srv, "POST", "/registerWorker", cred("n2"), json={"worker_id": "b-more"})
    assert e.status == 429
    assert call(srv, "GET", "/getVersion", TOKEN).json()["registered"] == MAX_WORKERS
    for i in range(MAX_WORKERS):
        unregister(srv, TOKEN, f"b-{i}")
    assert call(srv, "GET", "/getVersion", TOKEN).json()["registered"] == 0


def test_after_the_last_step_pushes_get_410_and_the_server_finishes(server, data):
    srv, ctl = server
    _, d = data
    register(srv, "n2", "f-1")
    v = version(srv)
    while v < STEPS:
        v, params = parameters(srv)
        (g,) = gradients(params, d, 1, at=32 * (v % 8))
        assert put(srv, "n2", g, worker_id="f-1", version=v, push_id=f"f-1-{v}").json()["applied"]
        v += 1
    wait_until(ctl.finished.is_set, 30, "the server to call /finish after its steps")
    ans = wait_until(lambda: (a := call(srv, "GET", "/getVersion", cred("n2")).json())["accuracy_version"]
                     == STEPS and a, 30, "the last version's evaluation")
    assert ans["version"] == STEPS and ans["done"] is True and 0 <= ans["accuracy"] <= 1
    e = status_of(srv, "POST", "/putGradient", cred("n2"), data=net.pack_weights(
        g, {"worker_id": "f-1", "version": STEPS, "samples": 32}), headers=OCTET)
    assert e.status == 410
    e = status_of(srv, "POST", "/registerWorker", cred("n2"), json={"worker_id": "f-2"})
    assert e.status == 410
    assert parameters(srv)[0] == STEPS                          # reading is still harmless
    assert unregister(srv, cred("n2"), "f-1") == {"unregistered": True}
    log = srv.call("GET", "/log").text
    assert re.findall(r"Aggregate: accuracy=[\d.]+, round=(\d+),", log) == [str(i) for i in range(2, STEPS + 1, 2)]
    assert json.loads(srv.call("GET", "/stats").text)["bytes_sent"] > 10 * 200_000   # the getParameter bodies


def test_registry_and_structure_rules():
    reg = Registry(["n2"], limit=2)
    assert reg.register("a", "n2") is True and reg.register("a", "n2") is False
    reg.register("b", "n2")
    with pytest.raises(Rejected, match="2 workers are registered"):
        reg.register("c", "n2")
    base = {"role": "server", "serverless": True, "mode": "async", "actions": ["n2"], "steps": 5}
    assert check_structure(dict(base)) == base
    for change, says in (({"mode": "sync"}, "'mode': 'async'"), ({"actions": []}, "'actions'"),
                         ({"actions": ["n2", "n2"]}, "'actions'"), ({"workers": ["n2"]}, "not 'workers'"),
                         ({"serverless": "yes"}, "'serverless'"), ({"max_staleness": -1}, "max_staleness")):
        with pytest.raises(ValueError, match=re.escape(says)):
            check_structure({**base, **change})
