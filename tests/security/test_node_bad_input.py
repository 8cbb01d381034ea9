"""Bad input to node routes: /combine and /ps/params with garbage bodies,
/ps/pull from a worker the server does not have: each a clear 4xx, the node still
serving and its state unchanged."""
from __future__ import annotations

import pytest

from tests.support.procs import TOKEN, NodeProc
from tests.security.test_bounded_input import http, JSON_HDR
from tests.loopback.test_ps_server import data, make_server  # noqa: F401  (fixtures)
from tests.loopback.test_runtime import env_dirs  # noqa: F401  (a fixture)

GARBAGE = [b"garbage", b"", b"{}", b'{"name": "n2"}', b"\x00" * 8, b"\xff" * 64,
           (2**40).to_bytes(8, "little") + b"{}"]


@pytest.mark.parametrize("role, path", [("fl_aggregator", "/combine"), ("ps_worker", "/ps/params")])
def test_garbage_weights_are_refused_and_the_node_is_unchanged(env_dirs, role, path):
    log_dir, ds = env_dirs
    node = NodeProc(role, "r1", log_dir=log_dir, dataset_dir=ds)
    try:
        node.wait_ready()
        before = node.call("GET", "/hi").json()
        for body in GARBAGE:
            r = http("POST", f"http://{node.address}{path}", token=TOKEN, data=body,
                     headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 400, (body[:20], r.status_code, r.text)
            assert f"{path} expects model weights as safetensors" in r.text, (body[:20], r.text)
        assert node.proc.poll() is None
        assert node.call("GET", "/hi").json() == before
    finally:
        node.stop()


def test_pull_from_an_unknown_worker_is_refused(make_server):
    srv, fakes, _ = make_server(["pw1"])
    r = http("POST", srv.url("/ps/pull"), token=TOKEN, headers=JSON_HDR,
             data=b'{"name": "stranger", "have": -1, "wait_s": 0}')
    assert r.status_code == 409 and "'stranger' is not a worker of this server" in r.text, r.text
    assert fakes["pw1"].params == {} or all(isinstance(k, int) for k in fakes["pw1"].params)
    sent_before = dict(fakes["pw1"].params)
    # The real worker is still served, at version 0: the refusal moved nothing.
    r = http("POST", srv.url("/ps/pull"), token=TOKEN, headers=JSON_HDR,
             data=b'{"name": "pw1", "have": -1, "wait_s": 0}')
    assert r.status_code == 200 and r.json()["sent"] is True and r.json()["version"] == 0, r.text
    assert 0 in fakes["pw1"].params and set(fakes["pw1"].params) - set(sent_before) <= {0}
