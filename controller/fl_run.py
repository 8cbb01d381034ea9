#!/usr/bin/env python3
"""Federated learning on the embedded single-machine testbed.

    sudo python3 controller/fl_run.py           # deploy, print "tc finish", serve :3333
    sudo python3 controller/fl_run.py --auto    # the whole experiment, then exit

One emulator on this machine (network-namespace nodes, no Docker needed): the
aggregator n1 and the trainers n2..n5, links from links.json. Edit build() to change
the testbed, as in EdgeTB.
"""
import sys

from controller import auto
from controller.manager import Manager
from controller.testbed import single_machine


class FlManager(Manager):
    """Federated learning: the default algorithm (controller/algorithm.py); n1 aggregates
    and calls /finish."""
    algorithm = "fl"
    needs_root = True


def build(port: int = 3333, links: str = "links.json"):
    """n1 aggregates, n2..n5 train (see controller/testbed.py:single_machine)."""
    roles = [("n1", "fl_aggregator.py")] + [(f"n{i}", "fl_trainer.py") for i in range(2, 6)]
    return single_machine(FlManager, roles, port=port, links=links)


def main() -> int:
    return auto.script_main(build, description=__doc__.strip().splitlines()[0], root="n1",
                            structure_tool="fl_structure_conf")


if __name__ == "__main__":
    sys.exit(main())
