"""The parameter server, exactly: a real ps_server process talking HTTP on loopback.

The test plays the workers: it pulls parameters (the server POSTs them to small
in-process receivers standing in for the workers' /ps/params), computes gradients of
real batches and pushes them. Sync: one step with K workers equals one
torch.optim.SGD step on the average of their gradients. Async: every accepted push is
one new version; a gradient more than `max_staleness` versions old gets 409.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from flask import Flask, request

from tests.support.procs import TOKEN, NodeProc, StubController, wait_until
from dml_app import net
from dml_app import nns
from dml_tool import splitter
from dml_app.node_data import load_node_data
from dml_app.ps import batch_gradient


class FakeWorker:
    """Stands in for a worker's /start and /ps/params (what the server sends it)."""

    def __init__(self, name: str):
        self.name, self.params, self.begun = name, {}, False
        app = Flask(f"fake-{name}")
        net.require_token(app, TOKEN)

        @app.post("/ps/params")
        def params():
            tensors, meta = net.unpack_weights(request.get_data())
            self.params[meta["version"]] = tensors
            return "ok\n"

        @app.get("/start")
        def begin():
            self.begun = True
            return "ok\n"

        self.server = net.Server(app, "127.0.0.1", 0, threads=2).start()
        self.address = f"127.0.0.1:{self.server.port}"


@pytest.fixture(scope="module")
def data(module_scratch):
    ds = module_scratch / "dataset"
    splitter.split(source="mnist-subset", out=str(ds), train_parts=10, test_parts=4, partition="iid", seed=5)
    return ds, load_node_data(str(ds), {"train_len": 10, "train_start_index": 1})


@pytest.fixture
def make_server(data, module_scratch):
    """make_server(workers, **conf) -> (server NodeProc, {name: FakeWorker}, stub controller)."""
    ds, _ = data
    started: list = []

    def make(names: list[str], **conf):
        ctl = StubController()
        started.append(ctl)
        fakes = {n: FakeWorker(n) for n in names}
        started.extend(f.server for f in fakes.values())
        srv = NodeProc("ps_server", "ps0", log_dir=module_scratch / "log", dataset_dir=ds,
                       ctl_address=ctl.address)
        started.append(srv)
        srv.wait_ready()
        srv.call("POST", "/conf/structure", json={"role": "server", "workers": names, "eval_every": 1,
                                                  "connect": {n: f.address for n, f in fakes.items()}, **conf})
        srv.call("POST", "/conf/dataset", json={"test_len": 1, "test_start_index": 1})
        srv.call("GET", "/start")
        wait_until(lambda: all(f.begun for f in fakes.values()), 30, "the server to begin its workers")
        return srv, fakes, ctl

    try:
        yield make
    finally:
        for thing in reversed(started):
            thing.stop() if isinstance(thing, NodeProc) else thing.close()


def pull(srv: NodeProc, worker: FakeWorker, have: int) -> dict:
    ans = net.post_json(srv.url("/ps/pull"), {"name": worker.name, "have": have}, token=TOKEN)
    assert ans["sent"] is True
    return worker.params[ans["version"]]


def push(srv: NodeProc, name: str, version: int, grad: dict, samples: int = 32):
    return srv.call("POST", "/ps/push", data=net.pack_weights(grad, {"name": name, "version": version,
                                                                     "samples": samples, "loss": 1.0}),
                    headers={"Content-Type": "application/octet-stream"})


def refused(srv: NodeProc, name: str, version: int, grad: dict) -> net.HttpError:
    with pytest.raises(net.HttpError) as e:
        push(srv, name, version, grad)
    return e.value


def gradients(params: dict, meta: dict, x, y, k: int, batch: int = 32) -> list[dict]:
    """The gradients of k disjoint batches at `params`, as a worker computes them."""
    model = nns.build_model(meta)
    model.load_state_dict(params)
    return [batch_gradient(model, x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch])[1]
            for i in range(k)]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sync_step_is_one_sgd_step_on_the_average_gradient(make_server, data, momentum):
    _, d = data
    names = ["pw1", "pw2", "pw3"]
    srv, fakes, ctl = make_server(names, mode="sync", steps=2, lr=0.1, momentum=momentum)
    ref = nns.build_model(d.meta)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum)
    for step in range(2):
        params = {n: pull(srv, fakes[n], step - 1) for n in names}
        assert all(torch.equal(params["pw1"][k], params[n][k]) for n in names for k in params["pw1"])
        x, y = d.train_x[step * 96:], d.train_y[step * 96:]
        grads = gradients(params["pw1"], d.meta, x, y, 3)
        for i, n in enumerate(names[:2]):
            assert push(srv, n, step, grads[i]).json() == {"applied": False, "version": step}
        status = srv.call("GET", "/ps/status").json()
        assert status["pending"] == ["pw1", "pw2"] and status["version"] == step
        assert refused(srv, "pw1", step, grads[0]).status == 409              # twice in one step
        assert push(srv, "pw3", step, grads[2]).json() == {"applied": True, "version": step + 1}

        # the local computation: one torch.optim.SGD step on the mean of the 3 gradients
        if step == 0:
            ref.load_state_dict(params["pw1"])
        for k, p in ref.named_parameters():
            p.grad = (sum(g[k].double() for g in grads) / 3).float()
        opt.step()
        new, meta = net.unpack_weights(srv.call("GET", "/ps/model").content)
        assert meta == {"version": step + 1}
        for k, p in ref.named_parameters():
            assert torch.equal(new[k], p.detach()), (step, k)
        if step == 0 and momentum == 0.0:
            # ... which is the step on the mean loss of the 3 batches together
            union = nns.build_model(d.meta)
            union.load_state_dict(params["pw1"])
            _, g = batch_gradient(union, x[:96], y[:96])
            for k, v in params["pw1"].items():
                assert (new[k] - (v - 0.1 * g[k])).abs().max().item() <= 1e-6
        if step == 0:
            e = refused(srv, "pw1", 0, grads[0])         # a gradient of the step just closed
            assert e.status == 409 and "only gradients of the current version 1" in e.message

    wait_until(ctl.finished.is_set, 30, "the server to call /finish after its 2 steps")
    log = srv.call("GET", "/log").text
    assert re.findall(r"Aggregate: accuracy=[\d.]+, round=(\d+),", log) == ["1", "2"]
    assert re.findall(r"Step: version=(\d+), gradients=3,", log) == ["1", "2"]
    assert refused(srv, "pw1", 2, grads[0]).status == 410
    with pytest.raises(net.HttpError) as e:
        net.post_json(srv.url("/ps/pull"), {"name": "pw1", "have": 2}, token=TOKEN)
    assert e.value.status == 410


def test_async_versions_count_accepted_pushes_and_stale_gradients_are_refused(make_server, data):
    _, d = data
    srv, fakes, _ = make_server(["pa1", "pa2"], mode="async", steps=10, lr=0.05, max_staleness=1)
    v0 = pull(srv, fakes["pa1"], -1)
    assert torch.equal(pull(srv, fakes["pa2"], -1)["features.0.weight"], v0["features.0.weight"])
    g1, g2, g3 = gradients(v0, d.meta, d.train_x, d.train_y, 3)

    assert push(srv, "pa1", 0, g1).json() == {"applied": True, "version": 1}
    v1 = pull(srv, fakes["pa1"], 0)
    for k in g1:   # applied at once: p - lr * g, nothing averaged
        assert torch.equal(v1[k], v0[k].add(g1[k], alpha=-0.05))
    assert push(srv, "pa2", 0, g2).json() == {"applied": True, "version": 2}   # staleness 1: taken
    e = refused(srv, "pa2", 0, g3)                                               # staleness 2: refused
    assert e.status == 409
    assert "stale gradient from pa2: computed on version 0, the server is at version 2 " \
           "(staleness 2 > max_staleness 1)" in e.message
    assert srv.call("GET", "/ps/status").json()["version"] == 2
    assert push(srv, "pa2", 1, g3).json() == {"applied": True, "version": 3}
    status = srv.call("GET", "/ps/status").json()
    assert (status["version"], status["accepted"], status["rejected"]) == (3, 3, 1)

    bad = {k: v for k, v in g1.items() if k != "features.0.bias"}
    assert refused(srv, "pa1", 3, bad).status == 400
    assert refused(srv, "pa9", 3, g1).status == 409                     # not a worker
    assert refused(srv, "pa1", 7, g1).status == 409                     # a version never served
    with pytest.raises(net.HttpError) as e:
        srv.call("POST", "/ps/push", data=b"not safetensors", headers={"Content-Type": "application/octet-stream"})
    assert e.value.status == 400
    log = srv.call("GET", "/log").text
    assert re.findall(r"Step: version=(\d+), from=(\w+), staleness=(\d),", log) == \
        [("1", "pa1", "0"), ("2", "pa2", "1"), ("3", "pa2", "1")]
    assert json.loads(srv.call("GET", "/stats").text)["bytes_sent"] > 3 * 200_000   # 3 pulls of LeNet


def test_a_push_sent_again_with_its_id_is_applied_once(make_server, data):
    """A worker that lost the answer to a push sends it again with the same push_id: the
    server answers with the first outcome and does not apply it twice."""
    _, d = data
    srv, fakes, _ = make_server(["pi1", "pi2"], mode="async", steps=10, lr=0.05, max_staleness=5)
    v0 = pull(srv, fakes["pi1"], -1)
    g1, g2 = gradients(v0, d.meta, d.train_x, d.train_y, 2)

    def push_id(grad, pid, name="pi1"):
        return srv.call("POST", "/ps/push", data=net.pack_weights(grad, {
            "name": name, "version": 0, "samples": 32, "loss": 1.0, "push_id": pid}),
            headers={"Content-Type": "application/octet-stream"}).json()

    assert push_id(g1, "a-1") == {"applied": True, "version": 1}
    assert push_id(g1, "a-1") == {"applied": True, "version": 1, "duplicate": True}
    assert push_id(g2, "a-1", name="pi2") == {"applied": True, "version": 2}   # ids are per worker
    v2 = pull(srv, fakes["pi1"], 0)
    for k in g1:   # each gradient applied once: p - lr * g1 - lr * g2
        assert torch.allclose(v2[k], v0[k].add(g1[k], alpha=-0.05).add(g2[k], alpha=-0.05))
    status = srv.call("GET", "/ps/status").json()
    assert (status["version"], status["accepted"]) == (2, 2)
    for bad in ("", "x" * 65, 7):
        with pytest.raises(net.HttpError) as e:
            push_id(g1, bad)
        assert e.value.status == 400 and "'push_id' must be a string" in e.value.message
