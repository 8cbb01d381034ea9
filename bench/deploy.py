"""Deploy time: netns nodes with FULL-MESH links (n*(n-1)), ours beside EdgeTB's way.

    sudo python3 bench/deploy.py [--json] [--sizes 10,50,100] [--edgetb-full-max 50] [--docker [--docker-sizes 10,50]]

ours   - worker.nodes: bridge, one `ip -batch` for every namespace and veth, one `ip -n NS
         -batch` per namespace, then worker.tc: one `tc -batch` per namespace and a netlink
         read-back of every table; seconds from start until every link is confirmed.
edgetb - the same namespaces (tables cleared), one `tc` process per rule: `tc -n NS class
         add ...` and `tc -n NS filter add ...` for every link, plus the root qdisc and
         default class per node. Run in full up to --edgetb-full-max nodes; above that a
         sample of nodes is run in full and the per-process cost is extrapolated (marked
         "extrap." in the table).
docker - with --docker (needs dockerd and the node image, `python3 worker/image.py build`):
         per --docker-sizes, the agent itself (worker.agent.Agent in this process) deploys
         that many nodes with a full mesh and an app each (a python3 TCP listener), first
         as netns nodes, then as docker nodes (containers made and started 8 at a time,
         worker/docker_nodes.py); seconds until the deploy is done (links in place, apps
         started) and until GET /status says every app answers. Target: 50 docker nodes
         answering within 10 s.
Target: 100 nodes, 9,900 links ready in under 5 s. With --json the last line is one JSON
object (docker rows under "docker_rows"). Everything is removed at the end, also on failure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from bench import common
from bench.common import nb, tc

TARGET_S = 5.0
DOCKER_TARGET_S = 10.0       # 50 docker nodes, full mesh, every app answering
RATE_BPS = 10_000_000


class Profile:
    """Wall time of each phase, and summed time of the subprocesses/netlink calls in it."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.calls.setdefault(key, []).append(seconds)

    @contextmanager
    def patched(self):
        """Time worker.nodes._run (ip), tc.run_batch and tc.verify without changing them."""
        orig_run, orig_batch, orig_verify = nb._run, tc.run_batch, tc.verify

        def run(argv, **kw):
            t = time.perf_counter()
            try:
                return orig_run(argv, **kw)
            finally:
                key = "ip -n NS -batch" if argv[:2] == ["ip", "-n"] else "ip " + " ".join(argv[1:3])
                self.add(key, time.perf_counter() - t)

        def batch(netns, lines):
            t = time.perf_counter()
            try:
                return orig_batch(netns, lines)
            finally:
                self.add("tc -batch", time.perf_counter() - t)

        def verify(table):
            t = time.perf_counter()
            try:
                return orig_verify(table)
            finally:
                self.add("netlink read-back", time.perf_counter() - t)

        nb._run, tc.run_batch, tc.verify = run, batch, verify
        try:
            yield self
        finally:
            nb._run, tc.run_batch, tc.verify = orig_run, orig_batch, orig_verify

    def summary(self) -> dict:
        return {k: {"calls": len(v), "sum_s": round(sum(v), 4), "max_s": round(max(v), 4)}
                for k, v in self.calls.items()}


def ours(bed: common.Testbed, links: dict) -> dict:
    prof = Profile()
    with prof.patched():
        t0 = time.perf_counter()
        nb.ensure_bridge(bed.bridge, f"{bed.network[1]}/{bed.network.prefixlen}")
        bed._bridge_made = True
        t1 = time.perf_counter()
        bed.nodes = nb.create_netns_nodes(bed.specs, bed.bridge, bed.network.prefixlen,
                                          str(bed.network[1]), bed.rundir)
        t2 = time.perf_counter()
        counts = nb.install_links(bed.nodes, links, bed.tables)
        t3 = time.perf_counter()
    confirmed = sum(counts.values())
    return {"total_s": t3 - t0, "bridge_s": t1 - t0, "nodes_s": t2 - t1, "links_s": t3 - t2,
            "links_confirmed": confirmed, "profile": prof.summary()}


def edgetb(bed: common.Testbed, links: dict, full_max: int, sample: int) -> dict:
    for n in bed.nodes:  # same namespaces, empty tables
        tc.clear(n.netns, n.dev)
    todo = bed.nodes if len(bed.nodes) <= full_max else bed.nodes[:sample]
    t0 = time.perf_counter()
    procs = 0
    for n in todo:
        procs += common.edgetb_install(n.netns, n.dev, links[n.spec.name])
    elapsed = time.perf_counter() - t0
    per_proc = elapsed / procs
    all_procs = sum(2 + 2 * len(links[n.spec.name]) for n in bed.nodes)
    extrapolated = len(todo) < len(bed.nodes)
    return {"total_s": per_proc * all_procs if extrapolated else elapsed, "tc_processes": all_procs,
            "measured_processes": procs, "per_process_ms": per_proc * 1000,
            "extrapolated": extrapolated, "measured_nodes": len(todo)}


def run_size(n: int, full_max: int, sample: int) -> dict:
    with common.Testbed(n) as bed:
        links = bed.full_mesh(RATE_BPS)
        want = n * (n - 1)
        row = {"nodes": n, "links": want}
        row["ours"] = ours(bed, links)
        if row["ours"]["links_confirmed"] != want:
            raise RuntimeError(f"{n} nodes: {row['ours']['links_confirmed']} links confirmed, want {want}")
        # read the kernel once more, independently of install_links, for the record
        got = sum(tc.read_back(x.netns, x.dev)["filters"] for x in bed.nodes)
        row["ours"]["kernel_filters"] = got
        row["edgetb"] = edgetb(bed, links, full_max, sample)
    print(f"  {n:>4} nodes: ours {row['ours']['total_s']:.2f} s, edgetb {row['edgetb']['total_s']:.1f} s"
          f"{' (extrapolated)' if row['edgetb']['extrapolated'] else ''}", file=sys.stderr, flush=True)
    return row


# The app of every node in the agent runs: a TCP listener on its port (python3, which the
# node image has), so "answering" measures the testbed, not an import of torch.
LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
while True:
    s.accept()[0].close()
"""


def agent_size(n: int, backend: str, tag: str, timeout_s: float = 300) -> dict:
    """n nodes of `backend` through the agent itself (worker.agent.Agent, in this process):
    a full mesh, an app each; seconds until /emulated/deploy's work is done (links in
    place, apps started) and until GET /status says every app answers ("ready")."""
    import ipaddress
    import random
    import secrets
    import shutil
    import tempfile

    from worker.agent import Agent

    state = Path(tempfile.mkdtemp(prefix="etb-bench-agent-"))
    agent = Agent(name="bench", port=0, token=secrets.token_hex(16), state_dir=state / "state")
    bed = ("d" if backend == "docker" else "a") + secrets.token_hex(2)
    network = ipaddress.IPv4Network(f"10.{246 if backend == 'docker' else 247}.{random.randrange(1, 250)}.0/24")
    cpu = round(len(os.sched_getaffinity(0)) / n, 3)
    nodes = [{"name": f"{bed}n{i}", "id": i, "ip": str(network[10 + i]), "port": common.PORT, "cpu": cpu,
              "ram_mb": 128, "cmd": ["python3", "-c", LISTENER, str(common.PORT)], "working_dir": "",
              "image": tag} for i in range(1, n + 1)]
    links = {a["name"]: [{"dest": b["name"], "ip": b["ip"], "port": b["port"], "rate_bps": RATE_BPS}
                         for b in nodes if b is not a] for a in nodes}
    body = {"emulator": bed + "emu", "backend": backend, "nodes": nodes, "links": links,
            "bridge": {"cidr": str(network), "gateway": str(network[1])}}
    try:
        t0 = time.perf_counter()
        answer = agent.deploy_emulated(body)
        t1 = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while True:
            st = agent.status()["nodes"]
            ready = sum(1 for x in st.values() if x["ready"])
            if ready == n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} {backend} nodes: {ready} apps answering after {timeout_s} s")
            time.sleep(0.02)
        t2 = time.perf_counter()
        confirmed = sum(x["links"] for x in answer["nodes"].values())
        if confirmed != n * (n - 1):
            raise RuntimeError(f"{n} {backend} nodes: {confirmed} links confirmed, want {n * (n - 1)}")
        return {"deploy_s": t1 - t0, "answering_s": t2 - t0, "links_confirmed": confirmed}
    finally:
        agent.reset("all")
        agent.prober.close()
        shutil.rmtree(state, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,50,100", help="node counts (default %(default)s)")
    ap.add_argument("--edgetb-full-max", type=int, default=50,
                    help="run EdgeTB's way in full up to this many nodes (default %(default)s)")
    ap.add_argument("--edgetb-sample", type=int, default=10,
                    help="nodes run in full above that, to extrapolate from (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--docker", action="store_true", help="also docker nodes (dockerd and the node image needed)")
    ap.add_argument("--docker-sizes", default="10,50", help="docker node counts (default %(default)s)")
    ap.add_argument("--image", default="edgetb-node:latest", help="node image (default %(default)s)")
    a = ap.parse_args(argv)
    common.need_root()
    sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    docker_sizes = [int(x) for x in a.docker_sizes.split(",") if x.strip()] if a.docker else []
    if docker_sizes:
        from worker import image
        why = image.present(a.image)
        if why:
            sys.exit(f"bench/deploy.py --docker: {why}")
    rows = [run_size(n, a.edgetb_full_max, a.edgetb_sample) for n in sizes]
    docker_rows = []
    for n in docker_sizes:     # the same through the agent, netns beside docker
        row = {"nodes": n, "links": n * (n - 1), "netns": agent_size(n, "netns", a.image),
               "docker": agent_size(n, "docker", a.image)}
        docker_rows.append(row)
        print(f"  {n:>4} nodes through the agent: netns {row['netns']['answering_s']:.2f} s, "
              f"docker {row['docker']['answering_s']:.2f} s until every app answers", file=sys.stderr, flush=True)

    print(f"Deploy with full-mesh links ({RATE_BPS // 10**6}mbit each), seconds until every link "
          f"is confirmed; {os.cpu_count()} cores")
    print(f"{'nodes':>5} {'links':>6} | {'ours':>6} {'netns':>6} {'links':>6} | {'edgetb':>8} "
          f"{'tc procs':>8} {'ms/proc':>7} | {'speed-up':>8}")
    for r in rows:
        o, e = r["ours"], r["edgetb"]
        et = f"{e['total_s']:.1f}" + ("*" if e["extrapolated"] else "")
        print(f"{r['nodes']:>5} {r['links']:>6} | {o['total_s']:>6.2f} {o['nodes_s']:>6.2f} {o['links_s']:>6.2f} | "
              f"{et:>8} {e['tc_processes']:>8} {e['per_process_ms']:>7.2f} | {e['total_s'] / o['total_s']:>7.0f}x")
    if any(r["edgetb"]["extrapolated"] for r in rows):
        print(f"* extrapolated: {a.edgetb_sample} nodes' rules run in full, per-process cost x all processes")
    big = [r for r in rows if r["nodes"] == 100]
    if big:
        ok = big[0]["ours"]["total_s"] < TARGET_S
        print(f"100 nodes / 9,900 links: {big[0]['ours']['total_s']:.2f} s "
              f"({'under' if ok else 'OVER'} the {TARGET_S:.0f} s target)")
    print("ours, where the time goes (summed over parallel workers):")
    for r in rows:
        parts = ", ".join(f"{k} {v['calls']}x {v['sum_s']:.2f}s" for k, v in r["ours"]["profile"].items())
        print(f"  {r['nodes']:>4}: {parts}")
    if docker_rows:
        print(f"Through the agent, full mesh, an app per node (a TCP listener): seconds until deployed "
              f"(links in place, apps started) and until every app answers (GET /status ready); "
              f"docker target {DOCKER_TARGET_S:.0f} s at 50")
        print(f"{'nodes':>5} {'links':>6} | {'netns':>7} {'answer':>7} | {'docker':>7} {'answer':>7} | {'ratio':>6}")
        for d in docker_rows:
            ns, dk = d["netns"], d["docker"]
            print(f"{d['nodes']:>5} {d['links']:>6} | {ns['deploy_s']:>7.2f} {ns['answering_s']:>7.2f} | "
                  f"{dk['deploy_s']:>7.2f} {dk['answering_s']:>7.2f} | {dk['answering_s'] / ns['answering_s']:>5.0f}x")
        big = [d for d in docker_rows if d["nodes"] == 50]
        if big:
            ok = big[0]["docker"]["answering_s"] <= DOCKER_TARGET_S
            print(f"50 docker nodes answering: {big[0]['docker']['answering_s']:.2f} s "
                  f"({'within' if ok else 'OVER'} the {DOCKER_TARGET_S:.0f} s target)")
    if a.json:
        out = {"bench": "deploy", "target_s": TARGET_S, "rate_bps": RATE_BPS, "rows": rows}
        if a.docker:
            out["docker_target_s"] = DOCKER_TARGET_S
        if a.docker:
            out["docker_rows"] = docker_rows
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
