"""An algorithm as the run service sees it: the hooks it may fill, with the default
(federated learning's) behaviour.

The run service (controller/run.py) is given one Algorithm object and calls its hooks:
before and after /start, for each conf sent, at each heartbeat, around a fault action
and a restarted node's rejoin, before /finish collects, and to write summary.json. An
algorithm that needs more than the default (a driver thread, its own end of the run, a
conf field only the controller knows) is a subclass in its run script
(controller/<alg>_run.py), e.g. RingAllReduce, Gossip, Serverless. `attach` gives it
the run (`self.run`): the nodes, the testbed, finish(), node_fault(), ...
"""
from __future__ import annotations

from typing import Any

from controller import results


class Algorithm:
    """FL's behaviour: a root starts the run and calls /finish; the summary is built
    from the root's aggregate lines; a restarted node is started again only when the
    algorithm has no root (the root calls the others in)."""

    name = "dml"
    needs_root = True

    def __init__(self, name: str | None = None, needs_root: bool | None = None):
        if name is not None:
            self.name = name
        if needs_root is not None:
            self.needs_root = needs_root
        self.run: Any = None

    def attach(self, run) -> None:
        """The run service this algorithm serves (controller/run.py Run); called once."""
        self.run = run

    # ------------------------------------------------------------------ confs
    def on_push(self, kind: str) -> None:
        """A push of `kind` confs begins (before any is read)."""

    def conf_for(self, kind: str, node: str, conf):
        """The conf of `kind` sent to `node`, from its conf file's: the default sends it
        as it is; an algorithm may add what only the controller knows."""
        return conf

    def conf_optional(self, kind: str) -> set[str]:
        """Nodes that need no conf of `kind`: a push that skips them (no conf file) is not
        a failure for --auto (controller/auto.py drive). Every node needs both here."""
        return set()

    # ------------------------------------------------------------------ start and end
    def prepare_start(self, root: str | None) -> Any:
        """Checks before any node is started (ValueError: HTTP 400, scenario.Busy: 409);
        what it returns is given to `started`."""
        return None

    def started(self, root: str | None, text: str, prepared: Any) -> str:
        """The nodes were started (`text` says which): start what the algorithm drives;
        the answer of /start."""
        return text

    def on_heartbeat(self, node: str, state: str | None, round_: int | None) -> None:
        """A node's heartbeat was stored (gossip ends its run when every peer is done)."""

    def before_finish(self) -> None:
        """/finish is about to collect a run not yet finished: stop what drives it."""

    def summarize(self, metrics: dict, wall: float, sent: dict) -> dict:
        """summary.json from every node's metrics: the default uses the root's aggregate lines."""
        run = self.run
        return results.summarize(self.name, metrics, run.root, wall, sent)

    def close(self) -> None:
        """The controller is closing: end every thread the algorithm started."""

    # ------------------------------------------------------------------ faults
    def before_fault(self, node: str, action: str) -> None:
        """A fault action on `node` was checked and is about to be sent to its agent."""

    def after_fault(self, node: str, action: str, out: dict) -> None:
        """A fault action was done (out["ok"]) or failed."""

    def on_rejoin(self, node: str) -> str:
        """After a restarted node got its confs again: what the algorithm does to take it
        back (e.g. start it). Rootless algorithms start it when the run is under way;
        others wait for their root to call it in. Returns what was done, in words."""
        run = self.run
        if self.needs_root or run.started_at is None or run.finished.is_set():
            return ""
        run.start_node(node)
        return "started"
