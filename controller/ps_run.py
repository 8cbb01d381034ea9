#!/usr/bin/env python3
"""Parameter-server training on the embedded single-machine testbed.

    sudo python3 controller/ps_run.py           # deploy, print "tc finish", serve :3333
    sudo python3 controller/ps_run.py --auto    # the whole experiment, then exit

n1 runs dml_app/ps_server.py (the model and its version), n2..n5 dml_app/ps_worker.py
(pull parameters, push the gradient of a batch), over links.json; the mode (sync or
async), steps and learning rate come from dml_tool/ps_structure.json. Start with
`curl 'localhost:3333/start?root=n1'`; the server calls /finish after its last step.
A worker restarted by a fault action (/fault/node?action=restart) is started again and
rejoins (ParameterServer.on_rejoin).
"""
import sys

from controller import auto
from controller.algorithm import Algorithm
from controller.manager import Manager
from controller.testbed import single_machine


class ParameterServer(Algorithm):
    """The root is the server: its `Aggregate: accuracy=..., round=V,` lines count versions."""
    name = "ps"
    needs_root = True

    def on_rejoin(self, node: str) -> str:
        """A restarted worker (its confs pushed again) is started while the run is under
        way: the server starts its workers only once, at the beginning, and takes one
        back at its first pull. A restarted server cannot rejoin (the model was its)."""
        run = self.run
        if node == run.root or run.started_at is None or run.finished.is_set():
            return ""
        run.start_node(node)
        return "started (it pulls the current version from the server)"


class PsManager(Manager):
    """The controller of a parameter-server run (the manager_class of build())."""
    algorithm = "ps"
    algorithm_class = ParameterServer


def build(port: int = 3333, links: str = "links.json"):
    """n1 serves, n2..n5 work (see controller/testbed.py:single_machine)."""
    roles = [("n1", "ps_server.py")] + [(f"n{i}", "ps_worker.py") for i in range(2, 6)]
    return single_machine(PsManager, roles, port=port, links=links)


def main() -> int:
    return auto.script_main(build, description=__doc__.strip().splitlines()[0], root="n1",
                            structure_tool="ps_structure_conf")


if __name__ == "__main__":
    sys.exit(main())
