#!/usr/bin/env python3
"""Federated learning under faults: 10 trainers, killed or cut off by a scenario.

    sudo python3 bench/faults.py [--rounds 10] [--kill-round 3] [--timeout 900] [--json]

One FL run per case on the same 11 netns nodes (aggregator n1, trainers n2..n11, 2 cores
shared), the same data (dataset/ as the splitter made it: 4 train parts per trainer, the
10 test parts at n1) and links (a star around n1, 50mbit out, 20mbit back):

* ``none``: no fault;
* ``kill1`` / ``kill3``: 1 or 3 trainers killed (SIGKILL to the node's cgroup, the
  scenario's ``kill``) at round --kill-round; the time is taken from the no-fault run
  (when its root logged round kill-round - 1, after the start of training);
* ``link``: the link n2 -> n1 (a trainer's uplink) down for the middle third of the
  no-fault run's wall time (the scenario's ``down`` with ``for``).

Each case is the --auto workflow (controller/auto.py drive) with the scenario set through
Manager.set_scenario (what --scenario and POST /scenario do). A run that fails or times
out is still collected (/finish) so that the rounds it completed show. Prints a table of
exit (ok / the error), rounds completed, final accuracy, wall time and the events'
outcomes beside the no-fault run, and with --json one JSON object as the last line. How
the roles tolerate failures is their own business: this reports what happens.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from controller import auto
from controller.fl_run import FlManager
from controller.testbed import DefinitionError, DeployError, single_machine
from dml_app import calls

TRAINERS = [f"n{i}" for i in range(2, 12)]
NODES = ["n1"] + TRAINERS
PORT = 3440
CASES = ("none", "kill1", "kill3", "link")


def links() -> dict:
    return {"n1": [{"dest": n, "bw": "50mbit"} for n in TRAINERS],
            **{n: [{"dest": "n1", "bw": "20mbit"}] for n in TRAINERS}}


def dataset() -> dict:
    return {"n1": {"test_len": 10, "test_start_index": 1, "batch_size": 64},
            **{n: {"train_len": 4, "train_start_index": 1 + 4 * i, "batch_size": 32} for i, n in enumerate(TRAINERS)}}


def structure(rounds: int) -> dict:
    return {"node_list": [{"name": "n1", "trainer_fraction": 1.0, "sync": rounds}]
            + [{"name": n, "epoch": 1} for n in TRAINERS]}


def scenario_for(case: str, base: dict, kill_round: int) -> dict | None:
    """The scenario of a case, from the no-fault run `base` (its round times, its wall)."""
    if case == "none":
        return None
    if case in ("kill1", "kill3"):
        at = base["round_t"].get(kill_round - 1)
        if at is None:
            raise RuntimeError(f"the no-fault run has no time for round {kill_round - 1}")
        victims = TRAINERS[-(1 if case == "kill1" else 3):]
        return {"events": [{"at": round(at + 0.5, 2), "node": n, "action": "kill"} for n in victims]}
    third = base["wall_seconds"] / 3
    return {"events": [{"at": round(third, 2), "link": ["n2", "n1"], "action": "down", "for": round(third, 2)}]}


def run_one(case: str, doc: dict | None, rounds: int, tmp: Path, timeout_s: float) -> dict:
    d = tmp / case
    d.mkdir()
    (d / "links.json").write_text(json.dumps(links()))
    (d / "structure.json").write_text(json.dumps(structure(rounds)))
    (d / "dataset.json").write_text(json.dumps(dataset()))
    tb = single_machine(FlManager, [("n1", "fl_aggregator.py")] + [(n, "fl_trainer.py") for n in TRAINERS],
                        port=PORT, links=str(d / "links.json"))
    tb.node_info_path = d / "node_info.json"
    say = lambda m: print(f"  [{case}] {m}", flush=True)  # noqa: E731
    error = None
    t0 = time.time()
    try:
        manager = tb.start(serve_forever=False, say=say)
    except (DefinitionError, DeployError) as e:
        return {"case": case, "exit": f"deploy: {e}"[:300], "rounds": None, "final_accuracy": None,
                "wall_seconds": None, "events": [], "round_t": {}}
    try:
        manager.conf_dir = d / "conf"
        if doc is not None:
            manager.set_scenario(doc)
        conf_tool = auto.tool("fl_structure_conf")
        try:
            auto.drive(tb, manager, root="n1", dataset_json=d / "dataset.json", timeout_s=timeout_s, say=say,
                       write_structure=lambda: conf_tool.write_confs(str(d / "structure.json"), str(d / "links.json"),
                                                                     str(d / "node_info.json"), str(d / "conf")))
        except (RuntimeError, TimeoutError, calls.HttpError, OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
            say(f"failed: {error[:300]}; collecting what there is")
        s = manager.summary or manager.finish()       # a failed run is collected too
        started = manager.started_at
        round_t = {}
        met = Path(s["run_dir"]) / "n1.metrics.jsonl"
        if met.exists() and started is not None:
            for line in met.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if r.get("event") == "aggregate" and isinstance(r.get("t"), (int, float)) \
                        and isinstance(r.get("round"), int) and math.isfinite(r["t"]):
                    round_t.setdefault(r["round"], round(r["t"] - started, 2))
        error = error or s.get("error")
        return {"case": case, "exit": "ok" if error is None else error[:300], "rounds": s.get("rounds"),
                "final_accuracy": s.get("final_accuracy"), "wall_seconds": s.get("wall_seconds"),
                "total_seconds": round(time.time() - t0, 1), "events": s.get("events") or [],
                "round_t": round_t, "scenario": doc, "run_dir": s.get("run_dir")}
    finally:
        tb.close()
        manager.close()


def check(row: dict, rounds: int) -> list[str]:
    """Every number of a row finite and in range (a bench that prints nonsense fails)."""
    bad = []
    if row["rounds"] is not None and not (isinstance(row["rounds"], int) and 0 <= row["rounds"] <= rounds):
        bad.append(f"rounds {row['rounds']!r} not in [0, {rounds}]")
    fa = row["final_accuracy"]
    if fa is not None and not (isinstance(fa, (int, float)) and math.isfinite(fa) and 0 <= fa <= 1):
        bad.append(f"final accuracy {fa!r} not in [0, 1]")
    w = row["wall_seconds"]
    if w is not None and not (isinstance(w, (int, float)) and math.isfinite(w) and 0 <= w < 86400):
        bad.append(f"wall {w!r} not in [0, 86400) s")
    for e in row["events"]:
        if not (isinstance(e.get("t"), (int, float)) and math.isfinite(e["t"]) and e["t"] >= 0):
            bad.append(f"event time {e.get('t')!r}")
    return [f"{row['case']}: {b}" for b in bad]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="FL rounds (sync), default 10")
    ap.add_argument("--kill-round", type=int, default=3, help="the round the kills happen in (default 3)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)} "
                    "(the no-fault run always goes first: the others' times come from it)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run (default 900)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args()
    if not 2 <= a.kill_round <= a.rounds:
        ap.error(f"--kill-round must be in [2, --rounds={a.rounds}]")
    cases = ["none"] + [c.strip() for c in a.cases.split(",") if c.strip() and c.strip() != "none"]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    auto.ensure_dataset(print)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetb-faults-") as tmp:
        for case in cases:
            print(f"=== {case}", flush=True)
            doc = scenario_for(case, rows[0], a.kill_round) if case != "none" else None
            if doc is not None:
                print(f"  scenario: {json.dumps(doc)}", flush=True)
            rows.append(run_one(case, doc, a.rounds, Path(tmp), a.timeout))
    problems = [p for r in rows for p in check(r, a.rounds)]
    base = rows[0]
    print(f"\nFL, 1 aggregator + {len(TRAINERS)} trainers on netns nodes (2 cores shared), {a.rounds} rounds")
    print(f"{'case':<6} {'rounds':>6} {'accuracy':>8} {'d acc':>7} {'wall s':>7} {'d wall':>7}  events / exit")
    for r in rows:
        acc = f"{r['final_accuracy']:.4f}" if r["final_accuracy"] is not None else "-"
        dacc = (f"{r['final_accuracy'] - base['final_accuracy']:+.4f}"
                if r["final_accuracy"] is not None and base["final_accuracy"] is not None else "-")
        dw = (f"{r['wall_seconds'] - base['wall_seconds']:+.1f}"
              if r["wall_seconds"] is not None and base["wall_seconds"] is not None else "-")
        evs = ", ".join(f"{e['action']} {e.get('node') or '->'.join(e.get('link', []))}@{e['t']:.1f}s"
                        f"{'' if e['ok'] else ' FAILED'}" for e in r["events"]) or "-"
        print(f"{r['case']:<6} {str(r['rounds']):>6} {acc:>8} {dacc:>7} {str(r['wall_seconds']):>7} {dw:>7}  "
              f"{evs}; exit: {r['exit'][:160]}")
    for p in problems:
        print(f"out of range: {p}", file=sys.stderr)
    if a.json:
        print(json.dumps({"bench": "faults", "trainers": len(TRAINERS), "rounds": a.rounds,
                          "kill_round": a.kill_round, "rows": rows}))
    return 1 if problems or base["exit"] != "ok" else 0


if __name__ == "__main__":
    sys.exit(main())
