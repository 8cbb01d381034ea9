"""A link shapes only its destination's DML port: traffic from the same
source to ANOTHER port of the shaped destination is not held to the link's rate."""
from __future__ import annotations

import os
import signal
import subprocess

from tests.support import agents as ah
from worker import units


OTHER_PORT = 5301
RATE = units.parse_rate("5mbit")


def test_another_port_of_a_shaped_destination_stays_unshaped(clean_agent):
    dep = ah.plan(2)
    a, b = dep.names
    dep.links = {a: [ah.link(dep, a, b, RATE)]}
    with ah.deployed(clean_agent, dep):
        other = subprocess.Popen(["ip", "netns", "exec", dep.ns(b), "iperf3", "-s", "-p", str(OTHER_PORT)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            shaped = ah.iperf(dep.ns(a), dep.ns(b), dep.ip(b), dep.node(b)["port"], rate_hint_bps=RATE)
            free = ah.iperf(dep.ns(a), dep.ns(b), dep.ip(b), OTHER_PORT)
        finally:
            os.killpg(other.pid, signal.SIGKILL)
            other.wait(30)
        assert shaped <= RATE * 1.1, f"the DML port was not shaped: {shaped / 1e6:.1f} Mbit/s"
        assert free > RATE * 4, f"another port was held near the link's rate: {free / 1e6:.1f} Mbit/s"
