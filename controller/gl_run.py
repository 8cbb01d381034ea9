#!/usr/bin/env python3
"""Gossip learning on the embedded single-machine testbed.

    sudo python3 controller/gl_run.py           # deploy, print "tc finish", serve :3333
    sudo python3 controller/gl_run.py --auto    # the whole experiment, then exit

Five peers n1..n5 (dml_app/gl_peer.py) on network-namespace nodes, links from
links.json; a peer gossips only to the peers it has links to. There is no root:
`curl localhost:3333/start` starts every peer, and the controller itself notices when
every peer is done (heartbeats, then each node's /stats) and collects the logs, plots
and summary.json; nobody needs to call /finish. Edit build() to change the testbed.
"""
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller import auto  # noqa: E402
from controller.manager import Manager  # noqa: E402
from controller.testbed import single_machine  # noqa: E402
from dml_app import net  # noqa: E402

DONE_STATES = ("finished", "error")   # a gl_peer that will not gossip any more


class GlManager(Manager):
    """No root; the run ends by itself once every peer has gossiped `sync` times and merged
    every model it received."""

    algorithm = "gl"
    needs_root = False

    def __init__(self, testbed):
        super().__init__(testbed)
        self._confirming = threading.Lock()
        self.failed_peers: list[str] = []

    def start_training(self, root):
        if root is not None:
            raise ValueError("gossip learning has no root: start every peer with /start")
        self.failed_peers = []
        return super().start_training(None)

    def on_heartbeat(self, node, state, round_) -> None:
        """When every peer's last heartbeat says it is done, confirm and finish (once)."""
        if state not in DONE_STATES or self.started_at is None or self.finished.is_set():
            return
        if all((self.heartbeats.get(n) or {}).get("state") in DONE_STATES for n in self._nodes()):
            if self._confirming.acquire(blocking=False):  # one confirmation at a time
                threading.Thread(target=self._confirm_and_finish, daemon=True, name="gl-finish").start()

    def _confirm_and_finish(self) -> None:
        """Heartbeats may be 2 s old: a model may have reached a peer since. Ask each node's
        /stats now; a peer merging a late model says so, and a later heartbeat retries."""
        try:
            states = self._each(lambda n: net.get_json(f"{n.ip}:{n.port}/stats", token=self.tb.node_token(n.name),
                                                       timeout_s=10)["state"])
            if self.finished.is_set() or not all(s in DONE_STATES for s in states.values()):
                return
            self.failed_peers = sorted(n for n, s in states.items() if s == "error")
            note = f" ({', '.join(self.failed_peers)} in error)" if self.failed_peers else ""
            print(f"controller: every peer is done{note}; collecting logs", flush=True)
            self.finish()
        finally:
            self._confirming.release()

    def summarize(self, metrics: dict, wall: float, sent: dict) -> dict:
        summary = super().summarize(metrics, wall, sent)
        summary["gossips_sent"] = {n: sum(1 for r in recs if r.get("event") == "gossip")
                                   for n, recs in sorted(metrics.items())}
        if self.failed_peers:
            summary["error"] = f"peer(s) {', '.join(self.failed_peers)} stopped with an error (see their logs)"
        return summary


def build(port: int = 3333, links: str = "links.json"):
    """Peers n1..n5 (see controller/testbed.py:single_machine)."""
    return single_machine(GlManager, [(f"n{i}", "gl_peer.py") for i in range(1, 6)], port=port, links=links)


def main() -> int:
    return auto.script_main(build, description=__doc__.strip().splitlines()[0], root=None,
                            structure_tool="gl_structure_conf")


if __name__ == "__main__":
    sys.exit(main())
