"""Link fidelity: configured rate vs measured TCP goodput, ours beside EdgeTB's way.

    sudo python3 bench/link_fidelity.py [--json] [--rates 1mbit,10mbit,100mbit,1gbit]

Two netns nodes on a bridge (worker.nodes), an iperf3 server in the second; for every
rate the first node's egress is shaped twice in turn:
  ours   - worker.tc: one `tc -batch`, HTB burst ~1 ms of the rate, quantum set, netlink read-back
  edgetb - one `tc` process per rule, HTB class with a fixed `burst 15k`
and measured with `iperf3 -O` (slow start omitted; -l about 5 ms of data, so the
receiver's count is not made of a few 128 KB reads at low rates). The ratio is goodput over the
MTU-limited ideal rate * 1448/1514 (TCP payload with timestamps per 1514-byte frame).
Target: ours within +-2% at every rate. With --json the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


from bench import common
from bench.common import tc, ideal, fmt_rate
from worker import units

TARGET = 0.02
# (seconds measured, seconds omitted): 1mbit moves ~85 frames/s, so it needs longer
# for one frame more or less not to matter.
DURATION = {1_000_000: (10, 2), 10_000_000: (5, 1)}
DEFAULT_DURATION = (4, 1)


def measure_rates(rates: list[int], scale: float) -> list[dict]:
    rows = []
    with common.Testbed(2) as bed:
        bed.build()
        a, b = bed.nodes
        bed.iperf_server(b)
        for rate in rates:
            secs, omit = DURATION.get(rate, DEFAULT_DURATION)
            secs = max(2, round(secs * scale))
            link = tc.Link(dest=b.spec.name, ip=b.spec.ip, port=b.spec.port, rate_bps=rate)
            row = {"rate": units.format_rate(rate), "rate_bps": rate, "ideal_bps": ideal(rate),
                   "seconds": secs}
            for way in ("ours", "edgetb"):
                tc.clear(a.netns, a.dev)
                if way == "ours":
                    table = tc.LinkTable(dev=a.dev, netns=a.netns)
                    tc.install(table, [link])
                    tc.verify(table)
                else:
                    common.edgetb_install(a.netns, a.dev, [link])
                got = common.iperf(a.netns, b.spec.ip, b.spec.port, secs, omit, rate_hint_bps=rate)
                row[f"{way}_bps"] = got["goodput_bps"]
                row[f"{way}_ratio"] = got["goodput_bps"] / ideal(rate)
                if got["steady_bps"]:
                    row[f"{way}_steady_ratio"] = got["steady_bps"] / ideal(rate)
            tc.clear(a.netns, a.dev)
            # unshaped reference: what the path itself can carry
            rows.append(row)
            print(f"  {row['rate']:>8}: ours {row['ours_ratio']:.4f}  edgetb {row['edgetb_ratio']:.4f}",
                  file=sys.stderr, flush=True)
        unshaped = common.iperf(a.netns, b.spec.ip, b.spec.port, 2, 1)["goodput_bps"]
    for r in rows:
        r["unshaped_bps"] = unshaped
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="1mbit,10mbit,100mbit,1gbit",
                    help="comma-separated tc rates (default %(default)s)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the measuring time (default 1: 10 s at 1mbit, 4-5 s above)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args(argv)
    common.need_root()
    rates = [units.parse_rate(r) for r in a.rates.split(",") if r.strip()]
    t0 = time.monotonic()
    rows = measure_rates(rates, a.scale)
    ok = all(abs(r["ours_ratio"] - 1) <= TARGET for r in rows)

    print(f"Link fidelity: TCP goodput / (rate * 1448/1514); target ours within +-{TARGET:.0%}")
    print(f"{'rate':>8} {'ideal':>15} {'ours':>15} {'ratio':>7} {'edgetb 15k':>15} {'ratio':>7}")
    for r in rows:
        print(f"{r['rate']:>8} {fmt_rate(r['ideal_bps']):>15} {fmt_rate(r['ours_bps']):>15} "
              f"{r['ours_ratio']:>7.4f} {fmt_rate(r['edgetb_bps']):>15} {r['edgetb_ratio']:>7.4f}")
    print(f"unshaped path: {fmt_rate(rows[0]['unshaped_bps'])}; "
          f"{'all within target' if ok else 'NOT all within target'} ({time.monotonic() - t0:.0f} s)")
    if a.json:
        print(json.dumps({"bench": "link_fidelity", "target": TARGET, "within_target": ok,
                          "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
