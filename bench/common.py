"""What the benches share: netns nodes built with worker.nodes, EdgeTB's way of installing
links (one `tc` process per rule, fixed `burst 15k`), iperf3, and cleanup. The tests
measure links with the same iperf3 functions (tests/support/agents.py).

Every object gets a random tag in its name, so a bench can run next to the test suite.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from worker import nodes as nb
from worker import tc

EDGETB_BURST = "15k"
PORT = 4444


def need_root() -> None:
    if os.geteuid() != 0:
        sys.exit("this bench needs root (it makes namespaces and qdiscs)")


class Testbed:
    """n netns nodes on one bridge, made with worker.nodes; close() removes them all."""

    def __init__(self, n: int, *, tag: str | None = None):
        self.tag = tag or "b" + secrets.token_hex(2)
        self.bridge = nb.bridge_name(self.tag + "emu")
        x = random.randrange(1, 250)
        self.network = ipaddress.IPv4Network(f"10.252.{x}.0/24")
        base = random.randrange(1000, 59000 - n, 100)
        self.specs = [nb.NodeSpec(name=f"{self.tag}n{i}", id=base + i, ip=str(self.network[10 + i]),
                                  port=PORT, cpu=1, ram_mb=128, cmd=[], working_dir="")
                      for i in range(1, n + 1)]
        self.rundir = Path(tempfile.mkdtemp(prefix="etb-bench-"))
        self.nodes: list[nb.Node] = []
        self.tables: dict[str, tc.LinkTable] = {}
        self._bridge_made = False
        self._servers: list[subprocess.Popen] = []

    def build(self) -> "Testbed":
        nb.ensure_bridge(self.bridge, f"{self.network[1]}/{self.network.prefixlen}")
        self._bridge_made = True
        self.nodes = nb.create_netns_nodes(self.specs, self.bridge, self.network.prefixlen,
                                           str(self.network[1]), self.rundir)
        return self

    def full_mesh(self, rate_bps: int) -> dict[str, list[tc.Link]]:
        return {a.name: [tc.Link(dest=b.name, ip=b.ip, port=b.port, rate_bps=rate_bps)
                         for b in self.specs if b is not a] for a in self.specs}

    def iperf_server(self, node: nb.Node) -> None:
        p = subprocess.Popen(["ip", "netns", "exec", node.netns, "iperf3", "-s", "-J", "-p", str(node.spec.port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self._servers.append(p)
        wait_listening(node.netns, node.spec.port)

    def close(self) -> None:
        for p in self._servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        # (create_netns_nodes removes what it made when it fails half-way)
        for n in self.nodes:
            nb.remove_netns_node(n)
        if self._bridge_made:
            nb.remove_bridge(self.bridge)
        import shutil
        shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def edgetb_install(netns: str, dev: str, links: list[tc.Link], *, check: bool = True) -> int:
    """EdgeTB's way: one `tc` process per rule, HTB classes with a fixed `burst 15k`.
    Returns the number of tc processes run."""
    def run(args: list[str]) -> None:
        p = subprocess.run(["tc", "-n", netns] + args, capture_output=True, text=True)
        if check and p.returncode != 0:
            raise RuntimeError(f"tc -n {netns} {' '.join(args)}: {p.stderr.strip()}")

    run(["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"])
    run(["class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", "100gbit"])
    count = 2
    for i, link in enumerate(links):
        minor = f"{tc.FIRST_LINK_MINOR + i:x}"
        run(["class", "add", "dev", dev, "parent", "1:", "classid", f"1:{minor}", "htb",
             "rate", f"{link.rate_bps}bit", "ceil", f"{link.rate_bps}bit", "burst", EDGETB_BURST])
        run(["filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
             "match", "ip", "dst", f"{link.ip}/32", "match", "ip", "dport", str(link.port), "0xffff",
             "flowid", f"1:{minor}"])
        count += 2
    return count


def listening(netns: str, port: int) -> bool:
    p = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/tcp", "/proc/net/tcp6"],
                       capture_output=True, text=True)
    want = f":{port:04X}"
    return any(len(f) > 3 and f[1].endswith(want) and f[3] == "0A"
               for f in (l.split() for l in p.stdout.splitlines()))


def wait_listening(netns: str, port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not listening(netns, port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no server on port {port} in {netns} after {timeout_s}s")
        time.sleep(0.05)


def block_len(rate_bps: float | None) -> int:
    """iperf3 -l: about 5 ms of data at the expected rate (1448..128K bytes), so that
    the receiver's per-interval counts are not made of a few big reads at low rates."""
    if not rate_bps:
        return 131072
    return int(min(max(rate_bps / 8 * 0.005, 1448), 131072))


def steady_goodput(out: dict) -> float | None:
    """Receiver goodput from the server's own per-second counts: the least-squares slope
    of bytes received over time across the complete, non-omitted intervals, leaving out
    the last, partial one (where the end-of-test message, queued behind data on the same
    shaped class, stretches the server's clock). None without the server's JSON."""
    srv = out.get("server_output_json") or {}
    pts, total = [], 0
    for iv in srv.get("intervals", []):
        s = iv["sum"]
        if s.get("omitted") or s["end"] - s["start"] < 0.5:
            continue
        total += s["bytes"]
        pts.append((s["end"], total, s["start"], s["bytes"]))
    pts = pts[:-1]                       # the partial last interval
    if len(pts) < 2:
        return None
    xs = [pts[0][2]] + [p[0] for p in pts]
    ys = [0] + [p[1] - pts[0][1] + pts[0][3] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 8 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else None


def iperf(src_ns: str, ip: str, port: int, seconds: float, omit_s: int, *,
          rate_hint_bps: float | None = None, attempts: int = 3) -> dict:
    """One TCP iperf3 run from src_ns: {'goodput_bps' (iperf3's receiver sum),
    'steady_bps' (cross-check from the server's intervals, None without its JSON)}."""
    argv = ["ip", "netns", "exec", src_ns, "iperf3", "-c", ip, "-p", str(port),
            "-t", str(seconds), "-O", str(omit_s), "-l", str(block_len(rate_hint_bps)),
            "-J", "--get-server-output"]
    err = ""
    for _ in range(attempts):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + omit_s + 60)
        try:
            out = json.loads(p.stdout)
        except ValueError:
            out = {"error": p.stderr.strip() or p.stdout[:300]}
        if "error" not in out:
            recv = float(out["end"]["sum_received"]["bits_per_second"])
            steady = steady_goodput(out)
            return {"goodput_bps": recv, "steady_bps": steady}
        err = out["error"]
        time.sleep(0.5)
    raise RuntimeError(f"iperf3 from {src_ns} to {ip}:{port}: {err}")


def ideal(rate_bps: float) -> float:
    """TCP payload per 1514-byte full frame on a 1500-MTU link with timestamps."""
    return rate_bps * 1448 / 1514


def fmt_rate(bps: float) -> str:
    for unit, div in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= div:
            return f"{bps / div:.3f} {unit}"
    return f"{bps:.0f} bit/s"
