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
         the same full mesh on docker nodes, worker.docker_nodes as the agent runs it: a
         labelled network, one container per node started behind its gate with its
         namespace attached, worker.tc's batch and read-back in every container's
         namespace, then every gate opened; seconds until the apps run on links in place,
         beside the netns time of the same size.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import nb, tc  # noqa: E402

TARGET_S = 5.0
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


def docker_size(n: int, tag: str) -> dict:
    """n docker nodes (sleeping behind their gates), full mesh, timed per phase."""
    import ipaddress
    import random
    import secrets
    import shutil
    import tempfile

    from worker import docker_nodes as dn
    from worker import image

    client = image.client()
    bed = "d" + secrets.token_hex(2)
    agent_id = f"/run/edgetb/bench-{bed}"
    lab = dn.labels(agent_id, 0)
    network = ipaddress.IPv4Network(f"10.246.{random.randrange(1, 250)}.0/24")
    cores = dn.emulator_cores(None)
    specs = [nb.NodeSpec(name=f"{bed}n{i}", id=i, ip=str(network[10 + i]), port=common.PORT,
                         cpu=round(len(cores) / n, 3), ram_mb=128, cmd=["sleep", "infinity"],
                         working_dir="", image=tag) for i in range(1, n + 1)]
    links = {a.name: [tc.Link(dest=b.name, ip=b.ip, port=b.port, rate_bps=RATE_BPS) for b in specs if b is not a]
             for a in specs}
    rundir = Path(tempfile.mkdtemp(prefix="etb-bench-"))
    made: list[nb.Node] = []
    try:
        t0 = time.perf_counter()
        name = dn.ensure_network(client, bed + "emu", str(network), str(network[1]), lab)
        t1 = time.perf_counter()
        made = dn.create_nodes(client, specs, network=name, rundir_base=rundir, lab=lab, cores=cores,
                               load={}, extra_env={})
        t2 = time.perf_counter()
        counts = nb.install_links(made, links, {})
        t3 = time.perf_counter()
        runner = dn.DockerRunner(lambda: client)
        for node in made:
            runner.start(node, {})
        t4 = time.perf_counter()
        confirmed = sum(counts.values())
        if confirmed != n * (n - 1):
            raise RuntimeError(f"{n} docker nodes: {confirmed} links confirmed, want {n * (n - 1)}")
        return {"nodes": n, "links": n * (n - 1), "total_s": t4 - t0, "network_s": t1 - t0,
                "containers_s": t2 - t1, "links_s": t3 - t2, "gates_s": t4 - t3, "links_confirmed": confirmed}
    finally:
        dn.remove_nodes(client, made, agent_id)
        dn.sweep(client, agent_id)
        shutil.rmtree(rundir, ignore_errors=True)
        client.close()


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
    for n in docker_sizes:
        docker_rows.append(docker_size(n, a.image))
        print(f"  {n:>4} docker nodes: {docker_rows[-1]['total_s']:.2f} s", file=sys.stderr, flush=True)

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
        netns_s = {r["nodes"]: r["ours"]["total_s"] for r in rows}
        print("Docker nodes beside netns nodes, same full mesh: seconds until the apps run on links in place")
        print(f"{'nodes':>5} {'links':>6} | {'netns':>6} | {'docker':>7} {'network':>7} {'contnrs':>7} "
              f"{'links':>6} {'gates':>6} | {'ratio':>6}")
        for d in docker_rows:
            ns = netns_s.get(d["nodes"])
            ns_txt, ratio = (f"{ns:.2f}", f"{d['total_s'] / ns:.0f}x") if ns else ("-", "-")
            print(f"{d['nodes']:>5} {d['links']:>6} | {ns_txt:>6} | {d['total_s']:>7.2f} {d['network_s']:>7.2f} "
                  f"{d['containers_s']:>7.2f} {d['links_s']:>6.2f} {d['gates_s']:>6.2f} | {ratio:>6}")
    if a.json:
        out = {"bench": "deploy", "target_s": TARGET_S, "rate_bps": RATE_BPS, "rows": rows}
        if a.docker:
            out["docker_rows"] = docker_rows
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
