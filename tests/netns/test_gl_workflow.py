"""Gossip learning through EdgeTB's workflow on real netns nodes.

Four peers g1..g4 (gl_peer.py) on network namespaces with shaped links, the
controller (GlManager) and its embedded agent in this process, the workflow
controller/auto.py's (what `gl_run.py --auto` runs). `/start?root=` is refused over
HTTP; starting without a root starts every peer; nobody calls /finish: the controller notices the end by itself.
LeNet-5 on the MNIST subset, 1,000 training images per peer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support.workflow import run_workflow
from tests.support.peers import netns_run
from controller.gl_run import GlManager
from dml_app import net

PEERS = ["g1", "g2", "g3", "g4"]
SYNC = 8
MIN_ACCURACY = 0.85   # measured: see the report
LINKS = {"g1": [{"dest": "g2", "bw": "40mbit"}, {"dest": "g3", "bw": "5mbps"}],
         "g2": [{"dest": "g3", "bw": "20mbit"}],
         "g3": [{"dest": "g4", "bw": "30mbit"}, {"dest": "g1", "bw": "10mbit"}],
         "g4": [{"dest": "g1", "bw": "25mbit"}, {"dest": "g2", "bw": "2mbps"}]}


@pytest.fixture
def gl_testbed(tmp_path):
    with netns_run(GlManager, "gl_peer", PEERS, tmp_path, links=LINKS, port=3360,
                   subnet="10.241.0.0/24", emulator="emu-gl") as (tb, manager):
        yield tb, manager, tmp_path


def test_gossip_through_the_auto_workflow(gl_testbed):
    tb, manager, tmp = gl_testbed
    ctl = f"127.0.0.1:{tb.host_port}"
    with pytest.raises(net.HttpError, match="no root"):
        net.call("GET", f"{ctl}/start", params={"root": "g1"})
    said = []
    summary = run_workflow(tb, manager, tmp, alg="gl", root=None, timeout_s=120, said=said,
                           structure={"sync": SYNC, "wait_s": 2, "node_list": [{"name": n, "epoch": 1} for n in PEERS]},
                           dataset={n: {"train_len": 10, "train_start_index": 1 + 10 * i, "test_len": 5,
                                        "test_start_index": 1 + 5 * (i % 2), "batch_size": 32}
                                    for i, n in enumerate(PEERS)})
    assert said[2] == "started g1, g2, g3, g4", said
    assert "error" not in summary and summary["algorithm"] == "gl" and summary["rounds"] == SYNC
    run_dir = Path(summary["run_dir"])
    # summary.json against what the peers themselves logged (4 decimals): each round's
    # accuracy is the mean over the peers, the final one the mean of their last ones
    on_disk = json.loads((run_dir / "summary.json").read_text())
    logged = {n: [(int(r), float(a)) for a, r in re.findall(r"Aggregate: accuracy=([0-9.]+), round=(\d+),",
                                                          (run_dir / f"{n}.log").read_text())] for n in PEERS}
    assert all(logged.values()), logged
    assert abs(on_disk["final_accuracy"] - sum(v[-1][1] for v in logged.values()) / len(PEERS)) <= 1e-4
    by_round: dict[int, list[float]] = {}
    for v in logged.values():
        for r, a in v:
            by_round.setdefault(r, []).append(a)
    assert [p["round"] for p in on_disk["accuracy_per_round"]] == sorted(by_round)
    for p in on_disk["accuracy_per_round"]:
        assert abs(p["accuracy"] - sum(by_round[p["round"]]) / len(by_round[p["round"]])) <= 1e-4, p
    assert summary["final_accuracy"] >= MIN_ACCURACY, summary["accuracy_per_round"]
    accs = [p["accuracy"] for p in summary["accuracy_per_round"]]
    assert accs[-1] > accs[0], accs
    assert summary["gossips_sent"] == {n: SYNC for n in PEERS}
    for n in PEERS:
        log = (run_dir / f"{n}.log").read_text()
        targets = re.findall(r"Gossip: to=(\w+), round=\d+,", log)
        assert len(targets) == SYNC and set(targets) <= {l["dest"] for l in LINKS[n]}, (n, targets)
        assert "Train: loss=" in log and "Aggregate: accuracy=" in log
        # each gossip is a whole model over a shaped link
        assert summary["bytes_sent"][n] >= SYNC * 240_000
    for png in ("accuracy.png", "loss.png", "summary.png"):
        assert (run_dir / png).stat().st_size > 1000
    status = net.get_json(f"{ctl}/status")["nodes"]
    assert {s["state"] for s in status.values()} == {"finished"}
    assert status["g4"]["links"] == 2 and status["g2"]["links"] == 1
    print(f"gossip: {SYNC} rounds in {summary['wall_seconds']:.1f} s, final accuracy {summary['final_accuracy']:.4f}, "
          f"per round {[round(a, 4) for a in accs]}")
