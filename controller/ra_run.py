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
every node to its successor; every node evaluates. After `sync` rounds it collects the
logs, plots and summary.json by itself. Edit build() to change the testbed.

A member that dies (its port refuses, or it does not answer within the step deadline)
is left out: the survivors re-form the ring in the same order without it and redo the
round's all-reduce from their trained models, so each survivor ends the round with the
mean of the survivors' models; later rounds run on the smaller ring. Per round the
members and the missing ones (why: dead, timeout, error) go to summary.json
"participants". Fewer than 2 members left ends the run with an error.
"""
import json
import sys
import threading
import time

from controller import auto, results
from controller.algorithm import Algorithm
from controller.manager import Manager
from controller.testbed import single_machine
from dml_app import net

PHASES = ("reduce", "gather")   # as dml_app/ring.py
# Why a member gave nothing: net.reply_for's classification (the nodes' runtime uses it too).
DEAD, REFUSED, TIMEOUT, ERROR = net.DEAD, net.REFUSED, net.TIMEOUT, net.ERROR
LOST = (DEAD, TIMEOUT, ERROR)      # a member given up on (REFUSED: an answer, i.e. a bug)


class RingLost(Exception):
    """Members were lost during a round's all-reduce: {name: why}."""

    def __init__(self, lost: dict[str, str]):
        super().__init__(", ".join(f"{n} {w}" for n, w in lost.items()))
        self.lost = lost


class RingAllReduce(Algorithm):
    """No root; after /start a driver thread runs the rounds step by step, then finish()."""

    name = "ra"
    needs_root = False
    poll_s = 0.2                 # how often the driver reads /stats while nodes train
    train_timeout_s = 3600.0     # one round's training, every node
    call_timeout_s = 30.0        # a call answered at once (/ra/train, /ra/reform, /stats)
    stats_misses = 3             # /stats unanswered this many times in a row: the member is lost
    eval_timeout_s = 300.0       # one evaluation
    # One all-reduce step (every member's chunk delivered): at most step_timeout_s (the
    # structure's "step_timeout_s" if given), and once steps were seen, step_factor x the
    # slowest step so far plus step_slack_s. A member that does not answer in time is lost.
    step_timeout_s = 60.0
    step_factor = 4.0
    step_slack_s = 5.0
    step_margin_s = 2.0          # the driver waits this much longer than a member's send

    def __init__(self):
        super().__init__()
        self.driver: threading.Thread | None = None
        self.failure: str | None = None
        self.confs: dict[str, dict] = {}
        self.step_cap_s = self.step_timeout_s
        self.slowest_step: float | None = None
        self.participants: list[dict] = []     # per round: who made the mean, who was missing and why

    def ring_plan(self) -> tuple[list[str], int]:
        """(ring, sync) from the structure confs (ra_structure_conf.py's or EdgeTB's): the ring
        follows each node's next_name, in the order the chunks travel, from the node of rank 0
        (node_list[0]; EdgeTB's "pos" is the same index) or, in confs without either, the
        smallest name. Every node with a conf must be on that one ring, and all must agree on
        sync, step_timeout_s and ring_size, which (where given) is the ring's length."""
        confs = {}
        for name in self.run._nodes():
            p = self.run.conf_dir / f"{name}_structure.conf"
            if p.exists():
                confs[name] = json.loads(p.read_text())
        if not confs or any("next_name" not in c for c in confs.values()):
            raise FileNotFoundError(f"no ring all-reduce structure confs (with next_name) in {self.run.conf_dir}: "
                                    "run dml_tool/ra_structure_conf.py -s ra_structure.json first")
        for key in ("sync", "step_timeout_s", "ring_size"):
            values = {json.dumps(c.get(key)) for c in confs.values()}
            if len(values) != 1:
                raise ValueError(f"the structure confs in {self.run.conf_dir} disagree on {key} "
                                 f"({', '.join(sorted(values))}): run dml_tool/ra_structure_conf.py again")
        first = [n for n, c in confs.items() if c.get("rank", c.get("pos")) == 0]
        ring = [first[0] if len(first) == 1 else min(confs)]
        while True:
            nxt = confs[ring[-1]]["next_name"]
            if nxt == ring[0]:
                break
            if nxt not in confs or nxt in ring:
                why = "has no structure conf (or is no node of this testbed)" if nxt not in confs else \
                    f"is already on the ring {' -> '.join(ring)} there"
                raise ValueError(f"{ring[-1]}'s next_name {nxt!r} {why}: the next_name of the confs "
                                 f"in {self.run.conf_dir} must make one ring")
            ring.append(nxt)
        if len(ring) != len(confs):
            off = sorted(set(confs) - set(ring))
            raise ValueError(f"the next_name of the confs in {self.run.conf_dir} make the ring "
                             f"{' -> '.join(ring + ring[:1])}, which leaves out {', '.join(off)}")
        size = confs[ring[0]].get("ring_size")
        if size is not None and size != len(ring):
            raise ValueError(f"the structure confs in {self.run.conf_dir} say ring_size {size!r}, but their "
                             f"next_name make a ring of {len(ring)}: run dml_tool/ra_structure_conf.py again")
        step = confs[ring[0]].get("step_timeout_s")
        self.step_cap_s = self.step_timeout_s if step is None else \
            net.number(step, "structure conf 'step_timeout_s'", 0.1, 3600.0)
        self.confs = confs
        return ring, confs[ring[0]].get("sync")

    def prepare_start(self, root):
        if root is not None:
            raise ValueError("ring all-reduce has no root: start every node with /start")
        if self.driver is not None and self.driver.is_alive():
            raise ValueError("a ring all-reduce run is already being driven")
        return self.ring_plan()

    def started(self, root, text: str, prepared) -> str:
        ring, sync = prepared
        self.failure, self.slowest_step, self.participants = None, None, []
        self.driver = threading.Thread(target=self.drive, args=(ring, sync), daemon=True, name="ra-driver")
        self.driver.start()
        return f"{text}; driving {sync} round(s) over the ring {' -> '.join(ring + ring[:1])}"

    # ------------------------------------------------------------------ the driver
    # The one owner of a ring all-reduce round's steps, step deadlines and re-forming: the
    # nodes (dml_app/ra_peer.py) answer each step's call. A step needs every member at once,
    # so it is not a node's round loop (dml_app/rounds.py).
    def drive(self, home: list[str], sync: int) -> None:
        """Every round: train all, wait; each all-reduce step on all members, wait; evaluate
        all. A member lost on the way is left out: the ring re-forms without it."""
        missing: dict[str, str] = {}        # members lost so far (for good): name -> why
        try:
            self._wait_for(home, "ready", 0, "the nodes to build their models", missing)
            for r in range(1, sync + 1):
                t0 = time.monotonic()
                ring = self._members(home, missing, r)
                self._post(ring, "/ra/train", lambda n: {"round": r, "ring": ring, "home": home,
                                                         **self._successor(n, ring)},
                           self.quick_s, missing, r)
                self._wait_for([n for n in ring if n not in missing], "trained", r,
                               f"round {r}'s training", missing)
                t1 = time.monotonic()
                ring, attempt = self._all_reduce(home, ring, r, missing)
                t2 = time.monotonic()
                record = {"node": "controller", "round": r, "participants": ring,
                          "missing": {n: missing[n] for n in home if n in missing}, "ring": ring,
                          "attempts": attempt + 1}
                self.participants.append(record)
                accs = self._post(ring, "/ra/evaluate", lambda n: {"round": r}, self.eval_timeout_s, missing, r)
                mean = sum(a["accuracy"] for a in accs.values()) / len(accs) if accs else float("nan")
                note = f", without {', '.join(record['missing'])}" if record["missing"] else ""
                print(f"controller: round {r}/{sync}: trained in {t1 - t0:.1f} s, all-reduced in "
                      f"{t2 - t1:.2f} s ({2 * (len(ring) - 1)} steps, ring of {len(ring)}{note}), "
                      f"mean accuracy {mean:.4f}", flush=True)
        except Exception as e:  # noqa: BLE001  (whatever stopped it, the logs are still collected)
            self.failure = str(e) if isinstance(e, (RuntimeError, TimeoutError)) else f"{type(e).__name__}: {e}"
            print(f"controller: ring all-reduce stopped: {results.printable(str(e))}", file=sys.stderr, flush=True)
        self.run.finish()

    def _members(self, home: list[str], missing: dict[str, str], r: int) -> list[str]:
        """The members not lost, in ring order; RuntimeError when fewer than 2 are left."""
        ring = [n for n in home if n not in missing]
        if len(ring) < 2:
            self.participants.append({"node": "controller", "round": r, "participants": [],
                                      "missing": {n: missing[n] for n in home if n in missing}, "ring": []})
            lost = ", ".join(f"{n} ({missing[n]})" for n in home if n in missing)
            raise RuntimeError(f"round {r}: ring all-reduce needs 2 or more members, but only "
                               f"{', '.join(ring) or 'none'} of {', '.join(home)} is left (lost: {lost})")
        return ring

    def _successor(self, name: str, ring: list[str]) -> dict:
        """{"successor": {name, address}} when name's successor on `ring` is not its next_name
        (a member between them is lost), else {} (ra_peer takes next_name's from its conf)."""
        succ = ring[(ring.index(name) + 1) % len(ring)]
        if succ == self.confs[name]["next_name"]:
            return {}
        node = self.run._nodes()[succ]
        return {"successor": {"name": succ, "address": f"{node.ip}:{node.port}"}}

    def _calls(self, names: list[str], fn) -> dict[str, net.Reply]:
        """fn(node) on every named node at once (Run._each) -> {name: net.Reply}."""
        def one(node) -> net.Reply:
            try:
                return net.Reply(node.name, True, fn(node))
            except Exception as e:   # noqa: BLE001  (every failure is an answer to weigh)
                return net.reply_for(node.name, e)
        return self.run._each(one, names)

    def _post(self, names: list[str], path: str, body, timeout_s: float, missing: dict[str, str],
              r: int) -> dict:
        """POST body(name) to path on every named node; those that are dead or silent go to
        `missing`; an HTTP error answer (a refusal: a bug, not a fault) is a RuntimeError.
        -> {name: answer} of the others."""
        got = self._calls(names, lambda n: net.call("POST", f"{n.ip}:{n.port}{path}", json=body(n.name),
                                                    token=self.run.tb.node_token(n.name), timeout_s=timeout_s,
                                                    max_bytes=net.JSON_LIMIT).json())
        refused = {n: g.message for n, g in got.items() if not g.ok and g.why == REFUSED}
        if refused:
            raise RuntimeError(f"round {r}: {path} refused by {', '.join(sorted(refused))}: {refused}")
        self._lose(missing, {n: g.why for n, g in got.items() if not g.ok}, f"{path} of round {r}")
        return {n: g.value for n, g in got.items() if g.ok}

    @staticmethod
    def _lose(missing: dict[str, str], lost: dict[str, str], during: str) -> None:
        for n, why in lost.items():
            if n not in missing:
                missing[n] = why
                print(f"controller: {n} lost during {during} ({why}); the ring goes on without it", flush=True)

    def _wait_for(self, names: list[str], state: str, round_: int, what: str, missing: dict[str, str]) -> None:
        """Poll every node's /stats until each is in `state` of `round_` or lost (its port
        refuses, it fails, or it leaves /stats unanswered stats_misses times in a row or
        is not there by train_timeout_s)."""
        deadline = time.monotonic() + self.train_timeout_s
        waiting, silent = list(names), {}
        while waiting:
            got = self._calls(waiting, lambda n: net.get_json(f"{n.ip}:{n.port}/stats", token=self.run.tb.node_token(n.name),
                                                              timeout_s=self.quick_s, max_bytes=net.JSON_LIMIT))
            lost = {}
            for n, g in got.items():
                silent[n] = 0 if g.ok else silent.get(n, 0) + 1
                if g.why == REFUSED:
                    raise RuntimeError(f"{n}'s /stats refused during {what}: {g.message}")
                if g.ok and isinstance(g.value, dict) and g.value.get("state") == "error":
                    lost[n] = ERROR
                elif g.why == DEAD or silent[n] >= self.stats_misses:
                    lost[n] = g.why
            self._lose(missing, lost, what)
            waiting = [n for n, g in got.items() if n not in missing and not (
                g.ok and isinstance(g.value, dict) and g.value.get("state") == state and g.value.get("round") == round_)]
            if waiting and time.monotonic() > deadline:
                self._lose(missing, {n: TIMEOUT for n in waiting}, f"{what} (not done in {self.train_timeout_s:g} s)")
                return
            if waiting:
                time.sleep(self.poll_s)

    @property
    def quick_s(self) -> float:
        """The bound of a call a live member answers at once (/ra/train, /ra/reform, /stats):
        call_timeout_s, or the run's step_timeout_s when that is shorter, so a frozen
        member is given up on in stats_misses x that, not minutes."""
        return min(self.call_timeout_s, self.step_cap_s)

    def step_deadline(self) -> float:
        """One step's deadline: the cap, or step_factor x the slowest step seen + step_slack_s."""
        if self.slowest_step is None:
            return self.step_cap_s
        return min(self.step_cap_s, self.step_slack_s + self.step_factor * self.slowest_step)

    def _all_reduce(self, home: list[str], ring: list[str], r: int, missing: dict[str, str]) -> tuple[list[str], int]:
        """Round r's all-reduce on the members of `ring` still there; a member lost on the
        way re-forms the ring without it and the all-reduce starts again (next attempt)
        from every survivor's trained model. -> (the ring that completed it, its attempt)."""
        attempt = 0
        while True:
            alive = [n for n in ring if n not in missing]
            if alive != ring:
                attempt += 1
                if len(alive) < 2:
                    self._members(home, missing, r)    # raises: too few left
                ring = alive
                print(f"controller: round {r}: ring re-formed without "
                      f"{', '.join(f'{n} ({missing[n]})' for n in home if n in missing)}: "
                      f"{' -> '.join(ring + ring[:1])} (attempt {attempt + 1})", flush=True)
                self._post(ring, "/ra/reform", lambda n: {"round": r, "attempt": attempt, "ring": ring,
                                                          **self._successor(n, ring)},
                           self.quick_s, missing, r)
                if any(n in missing for n in ring):
                    continue       # lost while re-forming: again, without it
            try:
                for phase in PHASES:
                    for step in range(len(ring) - 1):
                        self._step(ring, r, attempt, phase, step)
                return ring, attempt
            except RingLost as e:
                self._lose(missing, e.lost, f"round {r}'s all-reduce")

    def _step(self, ring: list[str], r: int, attempt: int, phase: str, step: int) -> None:
        """One step on every member: each sends its chunk to its successor. RingLost names
        the members lost: those that did not answer in time, and a successor its
        predecessor could not deliver to (the member's own answer says more)."""
        deadline = self.step_deadline()
        body = {"round": r, "phase": phase, "step": step, "attempt": attempt, "timeout_s": deadline}
        t0 = time.monotonic()
        got = self._calls(ring, lambda n: net.call("POST", f"{n.ip}:{n.port}/ra/step", json=body,
                                                   token=self.run.tb.node_token(n.name),
                                                   timeout_s=deadline + self.step_margin_s,
                                                   max_bytes=net.JSON_LIMIT).json())
        lost = {n: g.why for n, g in got.items() if not g.ok and g.why != REFUSED}
        for n, g in got.items():
            if g.ok or g.why != REFUSED:
                continue
            try:
                said = json.loads(g.message) if g.status == 502 else {}
            except ValueError:
                said = {}
            if not (isinstance(said, dict) and said.get("successor") in ring and said.get("why") in LOST):
                raise RuntimeError(f"round {r}: /ra/step {json.dumps(body)} refused by {n}: {g.message}")
            lost.setdefault(said["successor"], said["why"])
        if lost:
            raise RingLost(lost)
        took = time.monotonic() - t0
        self.slowest_step = max(self.slowest_step or 0.0, took)

    def summarize(self, metrics: dict, wall: float, sent: dict) -> dict:
        summary = super().summarize(metrics, wall, sent)
        if self.failure:
            summary["error"] = self.failure
        # entries cut to size as the nodes' own participants events are (a ring of hundreds)
        return results.add_participants(summary, [results._entry("controller", e) for e in self.participants])



class RaManager(Manager):
    """The controller of a ring all-reduce run (the manager_class of build())."""
    algorithm = "ra"
    algorithm_class = RingAllReduce


def build(port: int = 3333, links: str = "links.json"):
    """Nodes n1..n5 (see controller/testbed.py:single_machine)."""
    return single_machine(RaManager, [(f"n{i}", "ra_peer.py") for i in range(1, 6)], port=port, links=links)


def main() -> int:
    return auto.script_main(build, description=__doc__.strip().splitlines()[0], root=None,
                            structure_tool="ra_structure_conf")


if __name__ == "__main__":
    sys.exit(main())
