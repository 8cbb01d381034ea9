#!/usr/bin/env python3
"""The default FL run, quiet and beside another user's connection flood, side by side.

    sudo python3 bench/floods.py [--runs 1] [--connections 1500] [--json]

Each run is `controller/fl_run.py --auto` (the README's first command) on its own port.
In the `flood` runs another local user (uid 65534, tests/support/flood.py under setpriv) holds
`--connections` idle TCP connections to the controller from the moment it serves until
the run ends, and root's plain `curl localhost:PORT/status` is timed every 0.5 s in
both kinds of run. Modes alternate (quiet, flood, quiet, flood, ...) so that a slow
spell of the machine falls on both.

Per run: the command's seconds, the run's own wall seconds (summary.json), the final
accuracy, and root's curl: answers, median and slowest seconds, and when (seconds after
the controller began serving) any went unanswered within 5 s.
Prints a table with the flood/quiet ratios, and with --json one JSON object as the last
line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOD = ROOT / "tests" / "support" / "flood.py"
SYSTEM_PYTHON = "/usr/bin/python3"     # another user cannot run an interpreter under /root
PORT = 3402


def curl_s(port: int) -> float | None:
    """Seconds root's `curl localhost:PORT/status` took for a 200, None for anything else."""
    p = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "--max-time", "5",
                        f"http://localhost:{port}/status"], capture_output=True, text=True, timeout=15)
    code, _, t = p.stdout.partition(" ")
    return float(t) if code == "200" else None


def one_run(mode: str, port: int, connections: int) -> dict:
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "controller/fl_run.py", "--auto", "--port", str(port)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    serving = threading.Event()

    def pump():
        for line in p.stdout:
            lines.append(line)
            if "serving on port" in line:
                serving.set()
    threading.Thread(target=pump, daemon=True).start()
    flood = None
    times: list[float | None] = []
    asked_at: list[float] = []
    try:
        if not serving.wait(120):
            raise RuntimeError("the controller did not serve:\n" + "".join(lines[-20:]))
        if mode == "flood":
            flood = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON,
                                      "-c", FLOOD.read_text(), "127.0.0.1", str(port), str(connections),
                                      "--hold-s", "600"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            opened = flood.stdout.readline().strip()
            print(f"  flood: {opened}", flush=True)
        t_serving = time.monotonic()
        while p.poll() is None:
            asked_at.append(time.monotonic() - t_serving)
            times.append(curl_s(port))
            time.sleep(0.5)
        code = p.wait(600)
    finally:
        if flood is not None:
            flood.stdin.close()
            flood.wait(60)
        if p.poll() is None:
            p.terminate()
            p.wait(120)
    seconds = time.monotonic() - t0
    out = "".join(lines)
    if code != 0:
        raise RuntimeError(f"{mode} run exited {code}:\n{out[-2000:]}")
    summary = json.loads((Path(re.search(r"summary.json in (\S+)", out).group(1)) / "summary.json").read_text())
    answered = [t for t in times[:-1] if t is not None]    # the last may meet the controller leaving
    missed = [round(at, 1) for at, t in zip(asked_at[:-1], times[:-1]) if t is None]
    return {"mode": mode, "command_s": round(seconds, 1), "wall_s": summary["wall_seconds"],
            "final_accuracy": summary["final_accuracy"], "curl_answered": len(answered),
            "curl_asked": max(len(times) - 1, 0),
            "curl_median_s": round(statistics.median(answered), 4) if answered else None,
            "curl_max_s": round(max(answered), 4) if answered else None,
            "curl_missed_at_s": missed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="runs of each mode (default 1)")
    ap.add_argument("--connections", type=int, default=1500, help="the flood's connections (default 1500)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/floods.py: run as root (it deploys nodes and runs the flood as another user)")
    if not (1 <= a.runs <= 10 and 1 <= a.connections <= 10_000):
        sys.exit("bench/floods.py: --runs in 1..10, --connections in 1..10000")
    rows = []
    for i in range(a.runs):
        for mode in ("quiet", "flood"):
            print(f"run {i + 1}/{a.runs}: {mode}", flush=True)
            rows.append(one_run(mode, PORT, a.connections))
    print(f"\n{'mode':<6} {'command s':>9} {'wall s':>7} {'accuracy':>8} {'curl answered':>13} "
          f"{'median s':>8} {'max s':>6}")
    for r in rows:
        if r["curl_missed_at_s"]:
            print(f"  ({r['mode']}: unanswered at {r['curl_missed_at_s']} s after the controller served)")
        med = f"{r['curl_median_s']:.3f}" if r["curl_median_s"] is not None else "-"
        mx = f"{r['curl_max_s']:.3f}" if r["curl_max_s"] is not None else "-"
        print(f"{r['mode']:<6} {r['command_s']:>9.1f} {r['wall_s']:>7.1f} {r['final_accuracy']:>8.4f} "
              f"{r['curl_answered']:>6}/{r['curl_asked']:<6} {med:>8} {mx:>6}")

    def mean(mode, key):
        vals = [r[key] for r in rows if r["mode"] == mode and r[key] is not None]
        return statistics.mean(vals) if vals else None
    ratios = {k: round(mean("flood", k) / mean("quiet", k), 3)
              for k in ("command_s", "wall_s") if mean("quiet", k)}
    print(f"\nflood / quiet: command {ratios.get('command_s')}x, run wall {ratios.get('wall_s')}x "
          f"({a.connections} idle connections of uid 65534 held through each flood run)")
    if a.json:
        print(json.dumps({"connections": a.connections, "runs": rows, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
