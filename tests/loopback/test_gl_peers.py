"""Gossip learning with 4 real gl_peer processes and the real GlManager on loopback.

Each peer must initiate exactly `sync` gossips, only ever to peers it has links to (a
link to a node outside the structure does not count), every model sent must be
received and merged, and the run must end by itself: the manager notices that every
peer is done and collects the logs without anybody calling /finish.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tests.support.procs import TOKEN
from tests.support.workflow import run_workflow
from tests.support.peers import loopback_run, tiny_dataset
from dml_app import net
from dml_app import nns
from controller.gl_run import GlManager
from dml_app.gl_peer import GlPeer
from dml_app.runtime import Runtime

SYNC = 4
PEERS = ["gx1", "gx2", "gx3", "gx4"]
LINKS = {"gx1": ["gx2", "gx3"], "gx2": ["gx3", "gx5"], "gx3": ["gx4", "gx1"], "gx4": ["gx1", "gx2", "gx3"]}
OUTSIDE = "gx5"  # a node with an address and a link from gx2, but not a peer of the structure

GOSSIP = re.compile(r" INFO Gossip: to=(\w+), round=(\d+),$", re.M)
RECEIVE = re.compile(r" INFO Receive: from=(\w+), round=(\d+),$", re.M)
MERGED = re.compile(r"round \d+: merged (\d+) model\(s\)")
AGGREGATE = re.compile(r" INFO Aggregate: accuracy=(\d\.\d{4}), round=(\d+),$", re.M)


def test_gossip_initiates_exactly_sync_times_over_links_and_ends_by_itself(scratch):
    data = tiny_dataset(scratch / "dataset", num_classes=10)
    with loopback_run(GlManager, "gl_peer", PEERS, scratch, data) as (manager, procs):
        info = json.loads((scratch / "node_info.json").read_text())
        info["emulated_node"][OUTSIDE] = {"ip": "127.0.0.1", "port": 9, "emulator": "lo"}
        (scratch / "node_info.json").write_text(json.dumps(info))
        (scratch / "links.json").write_text(json.dumps(
            {src: [{"dest": d, "bw": "1gbit"} for d in dests] for src, dests in LINKS.items()}))
        said = []
        summary = run_workflow(manager.tb, manager, scratch, alg="gl", root=None, timeout_s=60, said=said,
                               structure={"sync": SYNC, "seed": 3, "wait_s": 0.5,
                                          "node_list": [{"name": n, "epoch": 1} for n in PEERS]},
                               dataset={n: {"train_len": 1, "test_len": 1, "batch_size": 4} for n in PEERS})
        assert said[2] == f"started {', '.join(PEERS)}", said
        conf2 = json.loads((manager.conf_dir / "gx2_structure.conf").read_text())
        # EdgeTB's connect keeps the link to gx5; "peers" (the gossip links) does not
        assert sorted(conf2["connect"]) == ["gx3", "gx5"] and conf2["peers"] == ["gx3"]
        assert "error" not in summary, summary
        run_dir = Path(summary["run_dir"])
        # nobody called /finish: the manager did, after every peer was done
        assert all(manager.heartbeats[n]["state"] == "finished" for n in PEERS)

    logs = {n: (run_dir / f"{n}.log").read_text() for n in PEERS}
    sent, received, merged = {}, 0, 0
    for n in PEERS:
        gossips = GOSSIP.findall(logs[n])
        assert [int(r) for _, r in gossips] == list(range(1, SYNC + 1)), (n, gossips)
        assert {to for to, _ in gossips} <= set(LINKS[n]) - {OUTSIDE}, (n, gossips)
        sent[n] = len(gossips)
        received += len(RECEIVE.findall(logs[n]))
        merged += sum(int(k) for k in MERGED.findall(logs[n]))
        rounds = [int(r) for _, r in AGGREGATE.findall(logs[n])]
        assert rounds[:SYNC] == list(range(1, SYNC + 1)) and set(rounds[SYNC:]) <= {SYNC}
        metrics = [json.loads(l) for l in (run_dir / f"{n}.metrics.jsonl").read_text().splitlines()]
        assert [(m["to"], m["round"], m["ok"]) for m in metrics if m["event"] == "gossip"] == \
            [(to, int(r), True) for to, r in gossips]
    assert sent == {n: SYNC for n in PEERS} == summary["gossips_sent"]
    # every model sent arrived and was merged before the controller collected the logs
    assert received == merged == SYNC * len(PEERS)
    # gx1 only ever gossips to gx2 or gx3, gx2 only to gx3: seen from the receivers too
    assert "Receive: from=gx2" not in logs["gx1"] + logs["gx4"]
    assert summary["algorithm"] == "gl" and summary["rounds"] == SYNC
    assert set(summary["bytes_sent"]) == set(PEERS) and all(b > 0 for b in summary["bytes_sent"].values())


def test_gossip_route_refuses_what_does_not_fit(scratch):
    threads = torch.get_num_threads()
    data = tiny_dataset(scratch / "ds", num_classes=10)
    rt = Runtime("gl_peer", env={"NET_NODE_NAME": "gy1", "EDGE_TB_TOKEN": TOKEN, "DML_PORT": "0",
                                 "DML_LOG_DIR": str(scratch / "log"), "DML_DATASET_DIR": str(data)})
    GlPeer(rt)
    client = rt.app.test_client()
    hdr = {net.TOKEN_HEADER: TOKEN}
    raw = {**hdr, "Content-Type": "application/octet-stream"}
    model = nns.build_model(json.loads((data / "meta.json").read_text())).state_dict()
    good = net.pack_weights(model, {"name": "gy2", "round": 1})
    try:
        assert client.post("/gossip", data=good, headers=raw).status_code == 409   # no confs yet
        assert client.post("/conf/structure", json={"epoch": 1, "sync": 2, "connect": {}},
                           headers=hdr).status_code == 400                        # nobody to gossip to
        assert client.post("/conf/structure", json={"epoch": 1, "sync": 2, "wait_s": -1,
                                                    "connect": {"gy2": "127.0.0.1:9"}}, headers=hdr).status_code == 400
        r = client.post("/conf/structure", json={"epoch": 1, "sync": 2, "connect": {"gy2": "127.0.0.1:9"},
                                                 "peers": ["gy3"]}, headers=hdr)
        assert r.status_code == 400 and "no address for peer(s) ['gy3']" in r.get_data(as_text=True)
        # EdgeTB's conf (no "peers"): every node of connect is a gossip peer
        assert client.post("/conf/structure", json={"epoch": 1, "sync": 2, "connect": {"gy2": "127.0.0.1:9"}},
                           headers=hdr).status_code == 200
        assert rt.structure["peers"] == ["gy2"]
        assert client.post("/conf/dataset", json={"train_len": 1, "test_len": 1}, headers=hdr).status_code == 200
        wrong = dict(model)
        wrong["classifier.5.bias"] = torch.zeros(3)
        for body, status in ((net.pack_weights(wrong, {"name": "gy2", "round": 1}), 400),
                             (net.pack_weights(model, {"round": 1}), 400),
                             (b"\x80\x04K\x01.", 400),   # a pickle is refused, never loaded
                             (good, 200)):
            assert client.post("/gossip", data=body, headers=raw).status_code == status
        assert "Receive: from=gy2, round=1," in (scratch / "log" / "gy1.log").read_text()
    finally:
        rt.close()
        torch.set_num_threads(threads)
