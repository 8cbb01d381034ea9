#!/usr/bin/env python3
"""E-tree (hierarchical) learning on the embedded single-machine testbed.

    sudo python3 controller/el_run.py           # deploy, print "tc finish", serve :3333
    sudo python3 controller/el_run.py --auto    # the whole experiment, then exit

Every node n1..n5 runs dml_app/el_peer.py; dml_tool/el_structure.json makes the tree
(n1 on top of n1 and n2, which aggregate n1, n3 and n2, n4, n5) and links.json the
network: where two nodes of the tree have no direct link (n2 -> n4, n4 -> n2, n2 -> n5)
the weights travel through n1, the next hop of the confs' `forward` (a shortest path over
links that exist both ways, as EdgeTB; dml_tool/routes.py). Start with
`curl 'localhost:3333/start?root=n1'`; n1 calls /finish after its last round.
A node that fails mid-run (a fault action: /fault/node, or a --scenario file) is
left out by its aggregator, which goes on with the children that answered while at
least min_fraction of them do (dml_app/el_peer.py); summary.json's "participants" and
"missing_nodes" say who was missing, when and why.
"""
import sys

from controller import auto
from controller.manager import Manager
from controller.testbed import single_machine


class ElManager(Manager):
    """The root (the top of the tree) reports `Aggregate: ..., layer=L,` lines and calls
    /finish: the default algorithm (controller/algorithm.py) under the name el."""
    algorithm = "el"
    needs_root = True


def build(port: int = 3333, links: str = "links.json"):
    """n1..n5 are all E-tree peers (see controller/testbed.py:single_machine)."""
    return single_machine(ElManager, [(f"n{i}", "el_peer.py") for i in range(1, 6)], port=port, links=links)


def main() -> int:
    return auto.script_main(build, description=__doc__.strip().splitlines()[0], root="n1",
                            structure_tool="el_structure_conf")


if __name__ == "__main__":
    sys.exit(main())
