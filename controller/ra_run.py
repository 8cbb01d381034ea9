#!/usr/bin/env python3
"""Ring all-reduce on the embedded single-machine testbed.

    sudo python3 controller/ra_run.py           # deploy, print "tc finish", serve :3333
    sudo python3 controller/ra_run.py --auto    # the whole experiment, then exit

Five nodes n1..n5 (dml_app/ra_peer.py) on network-namespace nodes, on the ring that
ra_structure.json makes as EdgeTB does (each node sends to the entry before it in
node_list: [n1, n5, n4, n3, n2] gives n1 -> n2 -> n3 -> n4 -> n5 -> n1 over the links of
links.json). There is no root: `curl localhost:3333/start` starts every node, then the
controller drives each round (following the confs' next_name): every node trains;
reduce-scatter and all-gather in ring_size - 1 steps each, every step a chunk from
every node to its next_name; every node evaluates. After
`sync` rounds it collects the logs, plots and summary.json by itself. Edit build() to
change the testbed.
"""
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller import auto  # noqa: E402
from controller.manager import Manager  # noqa: E402
from controller.testbed import single_machine  # noqa: E402
from dml_app import net  # noqa: E402

PHASES = ("reduce", "gather")   # as dml_app/ring.py


class RaManager(Manager):
    """No root; after /start a driver thread runs the rounds step by step, then finish()."""

    algorithm = "ra"
    needs_root = False
    poll_s = 0.2                 # how often the driver reads /stats while nodes train
    train_timeout_s = 3600.0     # one round's training, every node
    call_timeout_s = 300.0       # one step (a chunk delivered) or one evaluation

    def __init__(self, testbed):
        super().__init__(testbed)
        self.driver: threading.Thread | None = None
        self.failure: str | None = None

    def ring_plan(self) -> tuple[list[str], int]:
        """(ring, sync) from the structure confs (ra_structure_conf.py's or EdgeTB's): the ring
        follows each node's next_name, in the order the chunks travel, from the node of rank 0
        (node_list[0]) or, in confs without "rank", the smallest name. Every node with a conf
        must be on that one ring, and all must agree on sync."""
        confs = {}
        for name in self._nodes():
            p = self.conf_dir / f"{name}_structure.conf"
            if p.exists():
                confs[name] = json.loads(p.read_text())
        if not confs or any("next_name" not in c for c in confs.values()):
            raise FileNotFoundError(f"no ring all-reduce structure confs (with next_name) in {self.conf_dir}: "
                                    "run dml_tool/ra_structure_conf.py -s ra_structure.json first")
        syncs = {json.dumps(c.get("sync")) for c in confs.values()}
        if len(syncs) != 1:
            raise ValueError(f"the structure confs in {self.conf_dir} disagree on sync ({', '.join(sorted(syncs))}): "
                             "run dml_tool/ra_structure_conf.py again")
        first = [n for n, c in confs.items() if c.get("rank") == 0]
        ring = [first[0] if len(first) == 1 else min(confs)]
        while True:
            nxt = confs[ring[-1]]["next_name"]
            if nxt == ring[0]:
                break
            if nxt not in confs or nxt in ring:
                why = "has no structure conf (or is no node of this testbed)" if nxt not in confs else \
                    f"is already on the ring {' -> '.join(ring)} there"
                raise ValueError(f"{ring[-1]}'s next_name {nxt!r} {why}: the next_name of the confs "
                                 f"in {self.conf_dir} must make one ring")
            ring.append(nxt)
        if len(ring) != len(confs):
            off = sorted(set(confs) - set(ring))
            raise ValueError(f"the next_name of the confs in {self.conf_dir} make the ring "
                             f"{' -> '.join(ring + ring[:1])}, which leaves out {', '.join(off)}")
        return ring, json.loads(syncs.pop())

    def start_training(self, root):
        if root is not None:
            raise ValueError("ring all-reduce has no root: start every node with /start")
        if self.driver is not None and self.driver.is_alive():
            raise ValueError("a ring all-reduce run is already being driven")
        ring, sync = self.ring_plan()
        text = super().start_training(None)
        self.failure = None
        self.driver = threading.Thread(target=self.drive, args=(ring, sync), daemon=True, name="ra-driver")
        self.driver.start()
        return f"{text}; driving {sync} round(s) over the ring {' -> '.join(ring + ring[:1])}"

    # ------------------------------------------------------------------ the driver
    def drive(self, ring: list[str], sync: int) -> None:
        """Every round: train all, wait; each all-reduce step on all nodes, wait; evaluate all."""
        try:
            self._wait_for(ring, "ready", 0, "the nodes to build their models")
            for r in range(1, sync + 1):
                t0 = time.monotonic()
                self._call_all(ring, "/ra/train", {"round": r, "ring": ring})
                self._wait_for(ring, "trained", r, f"round {r}'s training")
                t1 = time.monotonic()
                for phase in PHASES:
                    for step in range(len(ring) - 1):
                        self._call_all(ring, "/ra/step", {"round": r, "phase": phase, "step": step})
                t2 = time.monotonic()
                accs = self._call_all(ring, "/ra/evaluate", {"round": r})
                mean = sum(a["accuracy"] for a in accs.values()) / len(accs)
                print(f"controller: round {r}/{sync}: trained in {t1 - t0:.1f} s, all-reduced in "
                      f"{t2 - t1:.2f} s ({2 * (len(ring) - 1)} steps), mean accuracy {mean:.4f}", flush=True)
        except Exception as e:  # noqa: BLE001  (whatever stopped it, the logs are still collected)
            self.failure = str(e) if isinstance(e, (RuntimeError, TimeoutError)) else f"{type(e).__name__}: {e}"
            print(f"controller: ring all-reduce stopped: {e}", file=sys.stderr, flush=True)
        self.finish()

    def _call_all(self, names: list[str], path: str, body: dict) -> dict:
        """POST body to path on every node at once; RuntimeError naming any node that failed."""
        res = self._each(lambda n: net.call("POST", f"{n.ip}:{n.port}{path}", json=body, token=self.tb.node_token(n.name),
                                            timeout_s=self.call_timeout_s).json(), names)
        bad = {n: v for n, v in res.items() if isinstance(v, str)}
        if bad:
            raise RuntimeError(f"{path} {json.dumps(body)} failed on {', '.join(sorted(bad))}: {bad}")
        return res

    def _wait_for(self, names: list[str], state: str, round_: int, what: str) -> None:
        """Poll every node's /stats until all are in `state` of `round_`."""
        deadline = time.monotonic() + self.train_timeout_s
        while True:
            stats = self._each(lambda n: net.get_json(f"{n.ip}:{n.port}/stats", token=self.tb.node_token(n.name),
                                                      timeout_s=10), names)
            failed = sorted(n for n, s in stats.items() if isinstance(s, dict) and s.get("state") == "error")
            if failed:
                raise RuntimeError(f"{', '.join(failed)} failed during {what} (state error; see the log)")
            if all(isinstance(s, dict) and s.get("state") == state and s.get("round") == round_
                   for s in stats.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {self.train_timeout_s:.0f} s for {what}: {stats}")
            time.sleep(self.poll_s)

    def summarize(self, metrics: dict, wall: float, sent: dict) -> dict:
        summary = super().summarize(metrics, wall, sent)
        if self.failure:
            summary["error"] = self.failure
        return summary


def build(port: int = 3333, links: str = "links.json"):
    """Nodes n1..n5 (see controller/testbed.py:single_machine)."""
    return single_machine(RaManager, [(f"n{i}", "ra_peer.py") for i in range(1, 6)], port=port, links=links)


def main() -> int:
    return auto.script_main(build, description=__doc__.strip().splitlines()[0], root=None,
                            structure_tool="ra_structure_conf")


if __name__ == "__main__":
    sys.exit(main())
