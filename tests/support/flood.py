#!/usr/bin/env python3
"""A hostile local user's connection flood, for the serving tests (run it as another uid).

    python3 tests/support/flood.py HOST PORT COUNT [--hold-s S] [--slow]

Opens COUNT TCP connections to HOST:PORT (raising its own open-files limit as far as the
hard limit allows), prints `open N` once they are all open (N may be less than COUNT
when the server closed some already), then holds them, sending nothing (with --slow:
one byte of a never-ending request line on each every second), until its standard input
closes or S seconds have passed (default 60: it always ends by itself). Only ever aimed
at this machine's own addresses. At the end it prints `closed-by-server M`: how many of
its connections the server had closed meanwhile.
"""
from __future__ import annotations

import argparse
import resource
import select
import socket
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--hold-s", type=float, default=60.0)
    ap.add_argument("--slow", action="store_true")
    a = ap.parse_args()
    if not (0 < a.count <= 10_000 and 0 < a.hold_s <= 600):
        sys.exit("flood.py: count in 1..10000, hold in (0, 600] s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks: list[socket.socket] = []
    end = time.monotonic() + a.hold_s
    for _ in range(a.count):
        s = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET)
        s.settimeout(5)
        try:
            s.connect((a.host, a.port))
        except OSError as e:
            s.close()
            print(f"connect failed after {len(socks)}: {e}", flush=True)
            break
        s.setblocking(False)
        socks.append(s)
        if a.slow:
            s.send(b"G")
    print(f"open {len(socks)}", flush=True)
    poller = select.poll()
    poller.register(sys.stdin.fileno(), select.POLLIN | select.POLLHUP)
    while time.monotonic() < end:
        if poller.poll(1000):
            break          # stdin closed (or a line): the test is done with us
        if a.slow:
            for s in socks:
                try:
                    s.send(b"E")
                except OSError:
                    pass
    closed = 0
    for s in socks:
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    print(f"closed-by-server {closed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
