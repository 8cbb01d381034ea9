#!/usr/bin/env python3
"""The six algorithms on the same 8 netns nodes, the same data split and the same links.

    sudo python3 bench/algorithms.py [--algs fl,gl,el,ra,ps,sl] [--rounds 10] [--json]

Each algorithm runs the whole --auto workflow (controller/auto.py) on a testbed of
eight nodes n1..n8 sharing this machine's cores, with links: a star around n1 (50mbit
out, 20mbit back) and a ring n2 -> n3 -> ... -> n8 -> n2 (25mbit). Data: dataset/ as the
splitter made it (40 IID train parts of the MNIST subset, 10 test parts); nodes that
train get 5 parts each, nodes that evaluate get the 10 test parts (the serverless
server n1 evaluates; its seven action nodes are invoked with a data part of 5 train
parts each, the split the others train on). Prints a table of rounds, final accuracy,
wall time and bytes sent per node, then the serverless row's activations and their cold
vs warm start overhead (invoker: /init + /run minus the action's training time), and
with --json one JSON object as the last line. Confs, node_info.json and links live in a temporary folder; the
runs' folders go to runs/ as usual.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from controller import auto
from controller.el_run import ElManager
from controller.fl_run import FlManager
from controller.gl_run import GlManager
from controller.ps_run import PsManager
from controller.ra_run import RaManager
from controller.sl_run import SlManager
from controller.testbed import single_machine

NODES = [f"n{i}" for i in range(1, 9)]
PORT = 3396
TEST = {"test_len": 10, "test_start_index": 1}


def links() -> dict:
    out = {"n1": [{"dest": n, "bw": "50mbit"} for n in NODES[1:]]}
    ring = NODES[1:]
    for i, n in enumerate(ring):
        out[n] = [{"dest": "n1", "bw": "20mbit"}, {"dest": ring[(i + 1) % len(ring)], "bw": "25mbit"}]
    return out


def train(i: int) -> dict:
    return {"train_len": 5, "train_start_index": 1 + 5 * i, "batch_size": 32}


def setups(rounds: int) -> dict:
    """alg -> (manager, roles, root, structure tool, structure json, dataset json)."""
    everyone = {n: {**train(i), **TEST} for i, n in enumerate(NODES)}
    server_and_workers = {"n1": {**TEST, "batch_size": 64},
                          **{n: train(i) for i, n in enumerate(NODES[1:])}}
    peers = {"sync": rounds, "node_list": [{"name": n, "epoch": 1} for n in NODES]}
    return {
        "fl": (FlManager, [("n1", "fl_aggregator.py")] + [(n, "fl_trainer.py") for n in NODES[1:]], "n1",
               "fl_structure_conf",
               {"node_list": [{"name": "n1", "trainer_fraction": 1.0, "sync": rounds}]
                + [{"name": n, "epoch": 1} for n in NODES[1:]]},
               server_and_workers),
        "gl": (GlManager, [(n, "gl_peer.py") for n in NODES], None, "gl_structure_conf", peers, everyone),
        "el": (ElManager, [(n, "el_peer.py") for n in NODES], "n1", "el_structure_conf",
               {"node_list": [{"name": "n1", "layer": 3, "sync": max(1, rounds // 2), "child_num": 2},
                              {"name": "n1", "layer": 2, "sync": 2, "child_num": 4},
                              {"name": "n5", "layer": 2, "sync": 2, "child_num": 4}]
                + [{"name": n, "layer": 1, "epoch": 1} for n in NODES]},
               everyone),
        # EdgeTB's ring: each entry sends to the one before it, so n1, n8, ..., n2 runs n1 -> n2 -> ... -> n8 -> n1
        "ra": (RaManager, [(n, "ra_peer.py") for n in NODES], None, "ra_structure_conf",
               {**peers, "node_list": [{"name": n, "epoch": 1} for n in NODES[:1] + NODES[:0:-1]]}, everyone),
        "ps": (PsManager, [("n1", "ps_server.py")] + [(n, "ps_worker.py") for n in NODES[1:]], "n1",
               "ps_structure_conf",
               {"mode": "sync", "steps": 15 * rounds, "lr": 0.05, "momentum": 0.9, "max_staleness": 4,
                "eval_every": 15, "node_list": [{"name": "n1", "role": "server"}] + [{"name": n} for n in NODES[1:]]},
               server_and_workers),
        # serverless: n1 the server, n2..n8 action containers, one activation per data part
        # (the trainers' parts above) per invocation round, 7 at once; sl_structure.json's
        # lr (falling to lr_end) and params, 28 steps per round asked, max_staleness 2 (with
        # 7 pushing at once, 1 would refuse most pushes)
        "sl": (SlManager, [("n1", "ps_server.py")] + [(n, "sl_action.py") for n in NODES[1:]], "n1",
               "sl_structure_conf",
               {"steps": 28 * rounds, "lr": 0.05, "lr_end": 0.02, "max_staleness": 2, "eval_every": 28, "seed": 0,
                "params": {"batch_sz_train": 32, "epoch_n": 1, "update_intv": 6, "lr": 0.05},
                "data": [{"train_start_index": train(i)["train_start_index"], "train_len": train(i)["train_len"]}
                         for i in range(len(NODES) - 1)],
                "rounds": 8 * rounds, "concurrency": len(NODES) - 1, "deadline_s": 120,
                "node_list": [{"name": "n1", "role": "server"}] + [{"name": n, "role": "action"} for n in NODES[1:]]},
               {"n1": {**TEST, "batch_size": 64}}),
    }


def run_one(alg: str, setup, tmp: Path, timeout_s: float) -> dict:
    manager_class, roles, root, tool_name, structure, dataset = setup
    d = tmp / alg
    d.mkdir()
    (d / "links.json").write_text(json.dumps(links()))
    (d / "structure.json").write_text(json.dumps(structure))
    (d / "dataset.json").write_text(json.dumps(dataset))
    testbed = single_machine(manager_class, roles, port=PORT, links=str(d / "links.json"))
    testbed.node_info_path = d / "node_info.json"
    conf_tool = auto.tool(tool_name)
    t0 = time.time()
    code = auto.run(testbed, root=root, dataset_json=d / "dataset.json", timeout_s=timeout_s, conf_dir=d / "conf",
                    write_structure=lambda: conf_tool.write_confs(str(d / "structure.json"), str(d / "links.json"),
                                                                  str(d / "node_info.json"), str(d / "conf")))
    total = time.time() - t0
    s = (testbed.manager.summary if testbed.manager is not None else None) or {}
    sent = dict(s.get("bytes_sent", {}))
    return {"algorithm": alg, "exit": code, "rounds": s.get("rounds"), "final_accuracy": s.get("final_accuracy"),
            "wall_seconds": s.get("wall_seconds"), "total_seconds": round(total, 1),
            "bytes_sent_mean": round(sum(sent.values()) / len(sent)) if sent else None,
            "bytes_sent_max": max(sent.values()) if sent else None, "bytes_sent": sent,
            "run_dir": s.get("run_dir"),
            **({"serverless": {k: v for k, v in s["serverless"].items() if k not in ("records", "data_parts")}}
               if isinstance(s.get("serverless"), dict) else {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--algs", default="fl,gl,el,ra,ps,sl", help="comma-separated (default all six)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds (sync) per algorithm (default 10)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per algorithm (default 900)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args()
    table = setups(a.rounds)
    algs = [x.strip() for x in a.algs.split(",") if x.strip()]
    unknown = [x for x in algs if x not in table]
    if unknown:
        ap.error(f"unknown algorithm(s) {unknown}; choose from {', '.join(table)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetb-bench-") as tmp:
        for alg in algs:
            print(f"=== {alg}", flush=True)
            rows.append(run_one(alg, table[alg], Path(tmp), a.timeout))
    print(f"\nThe algorithms on the same {len(NODES)} netns nodes, data split and links (2 cores shared)")
    print(f"{'alg':<4} {'exit':>4} {'rounds':>6} {'accuracy':>8} {'train s':>8} {'total s':>8} "
          f"{'MB sent/node':>12} {'MB max':>7}")
    for r in rows:
        acc = f"{r['final_accuracy']:.4f}" if r["final_accuracy"] is not None else "-"
        mb = lambda b: f"{b / 1e6:.2f}" if b is not None else "-"  # noqa: E731
        print(f"{r['algorithm']:<4} {r['exit']:>4} {str(r['rounds']):>6} {acc:>8} {str(r['wall_seconds']):>8} "
              f"{r['total_seconds']:>8} {mb(r['bytes_sent_mean']):>12} {mb(r['bytes_sent_max']):>7}")
    print("rounds: aggregation rounds (FL, gossip, ring), top-layer rounds (E-tree), "
          "SGD steps applied by the server (PS, serverless)")
    for r in rows:
        sl = r.get("serverless")
        if sl:
            def stat(k):
                x = sl.get(k) or {}
                return "/".join(f"{x[q]:.3f}" if isinstance(x.get(q), (int, float)) else "-"
                                for q in ("mean", "p50", "max"))
            moved = sl.get("bytes_moved") or {}
            print(f"serverless: {sl.get('activations')} activations in {sl.get('rounds_invoked')} rounds "
                  f"({sl.get('cold')} cold, {sl.get('warm')} warm, {sl.get('errors')} errors); start overhead "
                  f"s mean/p50/max: cold {stat('cold_start_s')}, warm {stat('warm_start_s')}; "
                  f"/init s {stat('init_s')}; MB data {moved.get('data_down', 0) / 1e6:.1f}, "
                  f"parameters {moved.get('params_down', 0) / 1e6:.1f}, gradients {moved.get('gradients_up', 0) / 1e6:.1f}")
    if a.json:
        print(json.dumps({"bench": "algorithms", "nodes": len(NODES), "rows": rows}))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
