#!/usr/bin/env python3
"""Gossip learning on the embedded single-machine testbed.

    sudo python3 controller/gl_run.py           # deploy, print "tc finish", serve :3333
    sudo python3 controller/gl_run.py --auto    # the whole experiment, then exit

Five peers n1..n5 (dml_app/gl_peer.py) on network-namespace nodes, links from
links.json; a peer gossips only to the peers it has links to. There is no root:
`curl localhost:3333/start` starts every peer, and the controller itself notices when
every live peer is done (heartbeats, then each node's /stats) and collects the logs,
plots and summary.json; nobody needs to call /finish. A peer killed by a fault action,
or whose app exited, is dead: the run ends when the others are done, and summary.json
says "dead_peers". Edit build() to change the testbed.
"""
import sys
import threading
import time

from controller import auto
from controller.algorithm import Algorithm
from controller.manager import Manager
from controller.testbed import single_machine
from dml_app import net

DONE_STATES = ("finished", "error")   # a gl_peer that will not gossip any more
STALE_S = 6.0    # a peer silent this long (3 heartbeats) may be dead: ask /stats and the agent


class Gossip(Algorithm):
    """No root; the run ends by itself once every live peer has gossiped `sync` times and
    merged every model it received. Dead peers (killed by node_fault, app exited, or no
    agent knows the app and its port refuses) are left out and listed as dead_peers."""

    name = "gl"
    needs_root = False

    def __init__(self):
        super().__init__()
        self._confirming = threading.Lock()
        self._senders: dict | None = None
        self.failed_peers: list[str] = []
        self.killed: set[str] = set()               # by node_fault("kill"), until a restart
        self.dead_peers: dict[str, str] = {}        # at the end: peer -> why it counts as dead

    def prepare_start(self, root):
        if root is not None:
            raise ValueError("gossip learning has no root: start every peer with /start")
        self.failed_peers, self.dead_peers = [], {}

    def before_fault(self, node: str, action: str) -> None:
        """A restarted peer (rejoined and started by the run) counts as live again: its
        heartbeats count from the start."""
        if action == "restart":
            self.killed.discard(node)

    def after_fault(self, node: str, action: str, out: dict) -> None:
        """A killed peer counts as dead at once."""
        if action == "kill" and out["ok"]:
            self.killed.add(node)

    def on_push(self, kind: str) -> None:
        if kind == "structure":
            self._senders = None        # read again from the confs being pushed

    def conf_for(self, kind: str, node: str, conf):
        """A peer's structure conf gets "senders": the address of every node whose own
        structure conf has a link to it, so that it can check that a model that says it
        comes from a node comes from that node's address (its `connect` has only the
        nodes it sends to)."""
        if kind != "structure" or not isinstance(conf, dict):
            return conf
        return {**conf, "senders": self._sender_map().get(node, {})}

    def _sender_map(self) -> dict[str, dict[str, str]]:
        """{node: {a node that links to it: its 'ip:port'}}, from the structure confs."""
        if self._senders is None:
            run = self.run
            nodes, senders = run._nodes(), {}
            for src in nodes:
                try:
                    conf = run.read_conf_file(src, "structure")
                except (OSError, ValueError):
                    continue            # no conf (not a peer) or a bad one (its push says so)
                connect = conf.get("connect")
                for dest in connect if isinstance(connect, dict) else ():
                    if dest in nodes and dest != src:
                        senders.setdefault(dest, {})[src] = f"{nodes[src].ip}:{nodes[src].port}"
            self._senders = senders
        return self._senders

    # No gossip round is owned here: each peer runs its own sync rounds (dml_app/gl_peer.py on
    # dml_app/rounds.py) and says finished; this only ends the run when all have.
    def on_heartbeat(self, node, state, round_) -> None:
        """When every peer's last heartbeat says it is done, or is silent (stale) or killed,
        confirm and finish (once; a later heartbeat retries)."""
        run = self.run
        if state not in DONE_STATES or run.started_at is None or run.finished.is_set():
            return
        now = time.time()

        def may_be_over(n: str) -> bool:
            hb = run.heartbeats.get(n)
            if n in self.killed or (hb or {}).get("state") in DONE_STATES:
                return True
            return now - (hb["t"] if hb else run.started_at) > STALE_S
        if all(may_be_over(n) for n in run._nodes()):
            if self._confirming.acquire(blocking=False):  # one confirmation at a time
                threading.Thread(target=self._confirm_and_finish, daemon=True, name="gl-finish").start()

    def _stats_state(self, n) -> str:
        """A node's state from its /stats now; 'unreachable' when its port refuses (nothing
        listens), 'no answer' otherwise (a paused app: not dead, it may resume)."""
        try:
            return net.get_json(f"{n.ip}:{n.port}/stats", token=self.run.tb.node_token(n.name), timeout_s=10,
                                max_bytes=net.JSON_LIMIT)["state"]
        except net.HttpError as e:
            return "unreachable" if e.not_sent else "no answer"

    def _confirm_and_finish(self) -> None:
        """Heartbeats may be 2 s old: a model may have reached a peer since. Ask each node's
        /stats now (a peer merging a late model says so) and, for the silent ones, their
        agent; finish when every live peer is done."""
        run = self.run
        try:
            states = run._each(self._stats_state)
            apps = {}
            if any(s not in DONE_STATES for s in states.values()):
                apps = {n: st.get("app") for n, st in run.status()["nodes"].items()}
            dead = {}
            for n, s in states.items():
                if n in self.killed:
                    dead[n] = "killed"
                elif apps.get(n) == "exited":
                    dead[n] = "app exited"
                elif s == "unreachable" and apps.get(n) is None:   # no agent knows it (a bare process)
                    dead[n] = "not answering (port refused)"
            live = {n: s for n, s in states.items() if n not in dead}
            if run.finished.is_set() or not live or not all(s in DONE_STATES for s in live.values()):
                return
            self.dead_peers = dict(sorted(dead.items()))
            self.failed_peers = sorted(n for n, s in live.items() if s == "error")
            notes = [f"{', '.join(self.failed_peers)} in error"] if self.failed_peers else []
            notes += [f"dead: {', '.join(f'{n} ({why})' for n, why in self.dead_peers.items())}"] if dead else []
            print(f"controller: every live peer is done{' (' + '; '.join(notes) + ')' if notes else ''}; "
                  f"collecting logs", flush=True)
            run.finish()
        finally:
            self._confirming.release()

    def summarize(self, metrics: dict, wall: float, sent: dict) -> dict:
        summary = super().summarize(metrics, wall, sent)
        # gossips that got there (a failed send to a dead peer is in the metrics with ok false)
        summary["gossips_sent"] = {n: sum(1 for r in recs if r.get("event") == "gossip" and r.get("ok", True))
                                   for n, recs in sorted(metrics.items())}
        summary["dead_peers"] = sorted(self.dead_peers)
        if self.failed_peers:
            summary["error"] = f"peer(s) {', '.join(self.failed_peers)} stopped with an error (see their logs)"
        return summary


class GlManager(Manager):
    """The controller of a gossip run (the manager_class of build())."""
    algorithm = "gl"
    algorithm_class = Gossip


def build(port: int = 3333, links: str = "links.json"):
    """Peers n1..n5 (see controller/testbed.py:single_machine)."""
    return single_machine(GlManager, [(f"n{i}", "gl_peer.py") for i in range(1, 6)], port=port, links=links)


def main() -> int:
    return auto.script_main(build, description=__doc__.strip().splitlines()[0], root=None,
                            structure_tool="gl_structure_conf")


if __name__ == "__main__":
    sys.exit(main())
