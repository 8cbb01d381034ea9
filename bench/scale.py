#!/usr/bin/env python3
"""FL with 1 aggregator and N trainers on the embedded single-machine testbed, N up to 299.

    sudo python3 bench/scale.py [--sizes 50,100,200,299] [--exec-sizes 10,50] [--rounds 3] [--json]

Each size runs the whole workflow (controller/auto.py `drive`) on one netns emulator on
this machine: a star of links around the aggregator n1 (100mbit each way), 2 cores and
--ram-gb shared between the nodes (n1, which takes every upload, gets 0.5 core and 1 GB;
each trainer 1.5/N of a core and an even share of the rest of the memory, at most 1 GB), every trainer one train part of the shipped MNIST
subset (100 samples; parts reused past 40; 2 epochs, batch 10, lr 0.05), n1 the 10 test
parts. `--sizes` run with the zygote
(worker/zygote.py: runtime roles fork from one preloaded interpreter), `--exec-sizes`
with one exec'd Python per node (the launcher before the zygote), in the same run.

Per run: deploy seconds (until `tc finish`), seconds from `tc finish` until every app
answers, first-round and mean round seconds (from the aggregator's metrics), peak memory
used (the largest drop of MemAvailable from before the deploy), mean and max unique
memory (USS, /proc/PID/smaps_rollup, summed over the processes of a node's cgroup) per
trainer and of the aggregator, and the final accuracy. Prints a table, and with --json
one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from controller import auto
from controller.fl_run import FlManager
from controller.testbed import default_testbed
from worker.cgroups import Cgroup

ROOT = Path(__file__).resolve().parents[1]

PORT = 3398
CPU = 2.0
AGG_RAM_MB = 1024
AGG_CPU = 0.5            # the aggregator handles every upload: a node of 2/300 of a core cannot


def mem_available_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def uss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(line.split()[1]) for line in text.splitlines()
               if line.startswith(("Private_Clean:", "Private_Dirty:")))


def node_uss_kb(name: str) -> int:
    return sum(uss_kb(p) for p in Cgroup(name).pids())


class Sampler(threading.Thread):
    """MemAvailable every 0.5 s; every node's USS every `uss_every_s` and at the end (the
    largest seen). Reading smaps_rollup walks a process's page tables, about 3 ms each:
    sampled often, 300 nodes would lose a good part of a core to the bench itself."""

    def __init__(self, names: list[str], uss_every_s: float = 30.0):
        super().__init__(daemon=True)
        self.names, self.uss_every_s = names, uss_every_s
        self.base = mem_available_kb()
        self.low = self.base
        self.uss: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        last = 0.0
        while not self.done.wait(0.5):
            self.low = min(self.low, mem_available_kb())
            if time.monotonic() - last >= self.uss_every_s:
                self.sample_uss()
                last = time.monotonic()

    def sample_uss(self) -> None:
        for n in self.names:
            self.uss[n] = max(self.uss.get(n, 0), node_uss_kb(n))

    def stop(self) -> None:
        self.sample_uss()
        self.done.set()
        self.join(10)


def build(n: int, d: Path, ram_gb: float, launcher: str):
    trainers = [f"t{i}" for i in range(1, n + 1)]
    links = {"n1": [{"dest": t, "bw": "100mbit"} for t in trainers],
             **{t: [{"dest": "n1", "bw": "100mbit"}] for t in trainers}}
    (d / "links.json").write_text(json.dumps(links))
    (d / "structure.json").write_text(json.dumps(
        {"node_list": [{"name": "n1", "trainer_fraction": 1.0, "sync": 0}] + [{"name": t, "epoch": 2} for t in trainers]}))
    (d / "dataset.json").write_text(json.dumps(
        {"n1": {"test_len": 10, "test_start_index": 1, "batch_size": 64},
         **{t: {"train_len": 1, "train_start_index": 1 + i % 40, "batch_size": 10} for i, t in enumerate(trainers)}}))
    tb = default_testbed(ip="127.0.0.1", dir_name=str(ROOT), manager_class=FlManager, host_port=PORT)
    tb.launcher = launcher
    tb.node_info_path = d / "node_info.json"
    app = tb.add_nfs(tag="dml_app", path=str(ROOT / "dml_app"))
    data = tb.add_nfs(tag="dataset", path=str(ROOT / "dataset"))
    emu = tb.add_emulator("emulator-1", "127.0.0.1", cpu=CPU, ram=ram_gb, unit="G")
    share = int((CPU - AGG_CPU) * 1000 / n) / 1000
    ram_mb = min(1024, int((ram_gb * 1024 - AGG_RAM_MB) / n))
    for name, role, cpu, ram in ([("n1", "fl_aggregator.py", AGG_CPU, AGG_RAM_MB)]
                                 + [(t, "fl_trainer.py", share, ram_mb) for t in trainers]):
        node = tb.add_emulated_node(name, "/home/worker/dml_app", ["python3", role], "dml:v1.0",
                                    cpu=cpu, ram=ram, unit="M", emulator=emu)
        node.mount_nfs(app, "/home/worker/dml_app")
        node.mount_nfs(data, "/home/worker/dataset")
    tb.load_link(str(d / "links.json"))
    return tb, trainers


def run_one(n: int, launcher: str, rounds: int, ram_gb: float, timeout_s: float, tmp: Path) -> dict:
    d = tmp / f"{launcher}-{n}"
    d.mkdir()
    row = {"launcher": launcher, "trainers": n, "ok": False}
    try:
        tb, trainers = build(n, d, ram_gb, launcher)
    except Exception as e:  # noqa: BLE001 - a row that says why
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    structure = json.loads((d / "structure.json").read_text())
    structure["node_list"][0]["sync"] = rounds
    (d / "structure.json").write_text(json.dumps(structure))
    marks: dict[str, float] = {}

    def say(msg: str) -> None:
        if msg.startswith("tc finish"):
            marks["tc_finish"] = time.monotonic()
        if not msg.startswith("round "):
            print(f"  [{launcher} {n}] {msg}", flush=True)

    sampler = Sampler(["n1"] + trainers)
    sampler.start()
    manager = None
    t0 = time.monotonic()
    try:
        auto.ensure_dataset(say)
        manager = tb.start(serve_forever=False, say=say)
        ready = time.monotonic()
        row["deploy_s"] = round(marks.get("tc_finish", ready) - t0, 2)
        row["ready_s"] = round(ready - marks.get("tc_finish", ready), 2)
        manager.conf_dir = d / "conf"
        started = time.time()
        summary = auto.drive(tb, manager, root="n1", dataset_json=d / "dataset.json", timeout_s=timeout_s,
                             write_structure=auto.structure_writer("fl_structure_conf", d / "structure.json",
                                                                   tb, d / "conf"),
                             say=say)
        sampler.sample_uss()
        run_dir = Path(summary["run_dir"])
        aggs = [json.loads(line) for line in (run_dir / "n1.metrics.jsonl").read_text().splitlines()
                if '"aggregate"' in line]
        times = [started] + [a["t"] for a in aggs]
        steps = [b - a for a, b in zip(times, times[1:])]
        row.update(ok=summary.get("rounds") == rounds, rounds=summary.get("rounds"),
                   final_accuracy=summary.get("final_accuracy"),
                   first_round_s=round(steps[0], 2) if steps else None,
                   mean_round_s=round(sum(steps) / len(steps), 2) if steps else None,
                   run_dir=str(run_dir))
    except Exception as e:  # noqa: BLE001 - a row that says why, then the next size
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        sampler.stop()
        tb.close()
        if manager is not None:
            manager.close()
    row["total_s"] = round(time.monotonic() - t0, 1)
    row["peak_mem_used_mb"] = round((sampler.base - sampler.low) / 1024)
    tr = [sampler.uss[t] / 1024 for t in trainers if sampler.uss.get(t)]
    if tr:
        row.update(uss_mean_mb=round(sum(tr) / len(tr), 1), uss_max_mb=round(max(tr), 1))
    if sampler.uss.get("n1"):
        row["aggregator_uss_mb"] = round(sampler.uss["n1"] / 1024, 1)
    return row


def sizes(text: str) -> list[int]:
    out = [int(x) for x in text.split(",") if x.strip()]
    if any(not 1 <= x <= 1000 for x in out):
        raise argparse.ArgumentTypeError("sizes are trainer counts from 1 to 1000")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--sizes", type=sizes, default=[50, 100, 200, 299], help="trainer counts with the zygote")
    ap.add_argument("--exec-sizes", type=sizes, default=[10, 50], help="trainer counts with one exec'd Python a node")
    ap.add_argument("--rounds", type=int, default=3, help="FL rounds (default 3)")
    ap.add_argument("--ram-gb", type=float, default=20, help="memory shared by the nodes (default 20)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds of training per run (default 1800)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetb-scale-") as tmp:
        for launcher, ns in (("exec", a.exec_sizes), ("zygote", a.sizes)):
            for n in ns:
                print(f"=== {launcher}, 1 + {n} nodes", flush=True)
                rows.append(run_one(n, "exec" if launcher == "exec" else "auto", a.rounds, a.ram_gb, a.timeout,
                                    Path(tmp)))
                rows[-1]["launcher"] = launcher
                print(f"  {json.dumps(rows[-1])}", flush=True)
    print(f"\nFL, 1 aggregator + N trainers, one netns emulator, {CPU:g} cores and {a.ram_gb:g} GB shared, "
          f"{a.rounds} rounds")
    head = ("launcher", "N", "deploy s", "ready s", "round 1 s", "round s", "peak MB", "USS mean", "USS max",
            "agg USS", "accuracy", "total s")
    print(" ".join(f"{h:>9}" for h in head))
    for r in rows:
        cells = [r["launcher"], r["trainers"], r.get("deploy_s"), r.get("ready_s"), r.get("first_round_s"),
                 r.get("mean_round_s"), r.get("peak_mem_used_mb"), r.get("uss_mean_mb"), r.get("uss_max_mb"),
                 r.get("aggregator_uss_mb"),
                 f"{r['final_accuracy']:.4f}" if r.get("final_accuracy") is not None else "-", r.get("total_s")]
        print(" ".join(f"{'-' if c is None else c!s:>9}" for c in cells)
              + ("" if r["ok"] else f"  FAILED: {r.get('error', 'rounds missing')}"))
    print("USS: unique memory per node (MB), trainers' mean and max and the aggregator's; "
          "peak MB: the largest drop of MemAvailable")
    if a.json:
        print(json.dumps({"bench": "scale", "cpu": CPU, "ram_gb": a.ram_gb, "rounds": a.rounds, "rows": rows}))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
