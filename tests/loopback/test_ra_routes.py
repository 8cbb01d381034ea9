"""ra_peer.py's routes in-process: confs checked, calls out of order refused with 409,
chunks only as safetensors from the predecessor, nothing changed by a refused call."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch

from tests.support.procs import TOKEN
from tests.support.peers import ra_node
from dml_app import net

HDR = {net.TOKEN_HEADER: TOKEN}
# EdgeTB's keys only: ry2 sends to ry3; the driver's ring (the order chunks travel) is ry1 -> ry2 -> ry3
CONF = {"epoch": 0, "sync": 1, "next_name": "ry3", "connect": {"ry3": "127.0.0.1:9", "ry1": "127.0.0.1:9"}}
RING = ["ry1", "ry2", "ry3"]


@pytest.fixture
def node(scratch):
    with ra_node(scratch, "ry2") as it:
        yield it


def post(client, path, body):
    return client.post(path, json=body, headers=HDR)


def chunk_body(index, n, *, name="ry1", step=0, phase="reduce", rnd=1) -> bytes:
    return net.pack_weights({"chunk": torch.ones(n)}, {"round": rnd, "phase": phase, "step": step,
                                                        "index": index, "name": name})


def wait_state(rt, state, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while rt.state != state:
        assert rt.state != "error" and time.monotonic() < deadline, rt.state
        time.sleep(0.02)


@pytest.mark.parametrize("change, message", [
    ({"next_name": None}, "'next_name' must name"), ({"next_name": "ry2"}, "'next_name' must name"),
    ({"connect": {"ry1": "127.0.0.1:9"}}, "no address for next_name 'ry3'"),
    ({"init": "per_rank"}, "init 'per_rank' needs 'rank'"), ({"rank": -1}, "'rank'"),
    ({"init": "zeros"}, "'init'"), ({"epoch": -1}, "'epoch'"), ({"sync": 0}, "'sync'"),
])
def test_bad_structure_confs_are_refused(node, change, message):
    rt, _, client = node
    r = post(client, "/conf/structure", {**CONF, **change})
    assert r.status_code == 400 and message in r.get_data(as_text=True)
    assert rt.structure is None


def test_calls_out_of_order_are_refused(node):
    rt, peer, client = node
    assert post(client, "/ra/train", {"round": 1, "ring": RING}).status_code == 409   # before /start
    assert post(client, "/conf/structure", CONF).status_code == 200
    assert post(client, "/conf/dataset", {"train_len": 1, "test_len": 1}).status_code == 200
    assert client.get("/ra/weights", headers=HDR).status_code == 409
    assert client.get("/start", headers=HDR).status_code == 200
    wait_state(rt, "ready")
    assert post(client, "/ra/step", {"round": 1, "phase": "reduce", "step": 0}).status_code == 409
    assert post(client, "/ra/train", {"round": 2, "ring": RING}).status_code == 409   # round 1 comes first
    assert post(client, "/ra/train", {"round": True, "ring": RING}).status_code == 400
    for ring, message in ((["ry1", "ry3", "ry2"], "sends from ry2 to ry1, but its next_name is 'ry3'"),
                          (["ry1", "ry3"], "does not hold this node"), (["ry2"], "2 or more"),
                          (None, "2 or more"), (["ry1", "ry2", "ry2", "ry3"], "distinct")):
        r = post(client, "/ra/train", {"round": 1, "ring": ring})
        assert r.status_code == 400 and message in r.get_data(as_text=True), (ring, r.get_data(as_text=True))
    assert rt.state == "ready"                                             # nothing changed
    assert post(client, "/ra/train", {"round": 1, "ring": RING}).status_code == 200
    wait_state(rt, "trained")
    assert peer.pos == 1 and peer.ar.rank == 1 and peer.ar.size == 3
    assert post(client, "/ra/train", {"round": 1, "ring": RING}).status_code == 409   # not twice
    assert post(client, "/ra/evaluate", {"round": 1}).status_code == 409   # all-reduce not done
    assert post(client, "/ra/step", {"round": 1, "phase": "gather", "step": 0}).status_code == 409
    assert post(client, "/ra/step", {"round": 1, "phase": "spread", "step": 0}).status_code == 400

    n = peer.ar.bounds[0][1] - peer.ar.bounds[0][0]   # rank 1 receives chunk 0 at reduce step 0
    before = peer.ar.vector.clone()

    def send(body):
        return client.post("/ra/chunk", data=body, headers={**HDR, "Content-Type": "application/octet-stream"})
    assert send(chunk_body(0, n, name="ry3")).status_code == 409           # not the node before it
    assert send(chunk_body(1, n)).status_code == 409                       # wrong chunk for this step
    assert send(chunk_body(0, n - 1)).status_code == 409                   # wrong length
    assert send(chunk_body(0, n, step=1)).status_code == 409               # wrong step
    assert send(chunk_body(0, n, rnd=2)).status_code == 409                # wrong round
    buf = io.BytesIO()
    np.save(buf, np.ones(3, dtype=object), allow_pickle=True)
    assert send(buf.getvalue()).status_code == 400                         # a pickle: never loaded
    assert torch.equal(peer.ar.vector, before)                             # nothing applied
    assert send(chunk_body(0, n)).status_code == 200
    assert torch.equal(peer.ar.vector[:n], before[:n] + 1) and torch.equal(peer.ar.vector[n:], before[n:])
    assert send(chunk_body(0, n)).status_code == 409                       # applied once only
    assert json.loads(client.get("/stats", headers=HDR).data)["bytes_received"] > 0


def test_a_ring_other_than_ring_size_is_refused(node):
    """EdgeTB's ring_size in the conf: the driver's ring (`home`) must have that many members."""
    rt, _, client = node
    assert post(client, "/conf/structure", {**CONF, "ring_size": 4, "pos": 2}).status_code == 200
    assert rt.structure["rank"] == 2
    assert post(client, "/conf/dataset", {"train_len": 1, "test_len": 1}).status_code == 200
    assert client.get("/start", headers=HDR).status_code == 200
    wait_state(rt, "ready")
    r = post(client, "/ra/train", {"round": 1, "ring": RING})
    assert r.status_code == 400 and "has 3 members, but this node's structure conf says ring_size 4" in r.get_data(
        as_text=True)
    assert rt.state == "ready"
