"""The round loop of the node roles: rounds, attempts, deadlines, quorum, participants,
stop and failure, written once. A role keeps its maths (FedAvg, E-tree averages,
gossip mixing, ...) and its choices; this module runs them round after round.

    rounds = Rounds(rt)
    ok = rounds.run(range(1, sync + 1), one_round)     # one_round(r) -> False ends the run

    def one_round(r):
        got = rounds.quorum(r, attempt, min_fraction=.5, retries=2, what=f"round {r}", peers="trainers")
        ...                                            # None: the node failed (rt.fail) or stops

    def attempt(k):                                    # one try of the round
        arrived, missing = rounds.collect(r, chosen, send, deadline_s=600, tag=f"round {r}")
        return chosen, arrived, missing

`collect(key, expected, send)` opens a Gather of the peers asked (the runtime's) under
`key`; the role's route hands each answer in with `deliver(key, peer, fold)` (409 once
the attempt closed, for a peer not asked, or one that answered already); `send(key)`
asks the peers (in parallel, bounded: rt.fan_out / rt.broadcast_weights) and says per
peer whether the ask arrived (a runtime Reply). A peer whose ask failed is not waited
for; the others until they answered, were found dead (the Gather's probe), the
deadline, or the node stops. `quorum` tries an attempt until at least `min_fraction`
of the peers asked answered, writes each attempt's `participants` metrics event, and
fails the node naming who was missing and why when no attempt had enough.

Who uses it: fl_aggregator.py (rounds of FedAvg), el_peer.py (every aggregating layer's
rounds), gl_peer.py (the run loop of its gossip rounds). The parameter server's sync
steps (ps_server.py), the ring all-reduce's steps (controller/ra_run.py) and the
serverless invocations (controller/invoker.py) are driven elsewhere: their places
say why.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Hashable, Iterable, Mapping

from werkzeug.exceptions import Conflict

from dml_app.algorithms import needed
from dml_app.runtime import TIMEOUT, Gather, Reply, Runtime


class Rounds:
    """The rounds of one role on `rt` (see the module docstring)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self._lock = threading.Lock()
        self._open: dict[Hashable, tuple[Gather, Any]] = {}    # key -> (its Gather, the role's context)

    # ------------------------------------------------------------------ the loop
    def run(self, rounds: Iterable[int], body: Callable[[int], bool | None]) -> bool:
        """body(r) for every round r while the node is not stopping; True when every
        round ran, False when the node stops or a body returned False (it failed:
        rt.fail said why)."""
        for r in rounds:
            if self.rt.stopping.is_set():
                return False
            if body(r) is False:
                return False
        return True

    def quorum(self, round: int, attempt: Callable[[int], tuple], *, min_fraction: float, retries: int,
               what: str, peers: str, asked_as: str = "asked", **fields: Any) -> tuple | None:
        """One round, tried until enough peers answered: attempt(k) for k = 1 .. 1 +
        retries returns (asked [names], arrived {name: value}, missing {name: why},
        *more); it is accepted when arrived has at least min_fraction of asked (and one:
        algorithms.needed). Each attempt is a `participants` metrics event (round,
        attempt, `asked_as`: asked, participants, missing, accepted, **fields). Returns the
        accepted attempt's tuple; None when the node stops, or after rt.fail naming, per
        attempt, who was missing and why (`what` names the round, `peers` the kind of peer)."""
        rt = self.rt
        shortfalls = []
        attempts = 1 + retries
        for k in range(1, attempts + 1):
            got = attempt(k)
            asked, arrived, missing = got[0], got[1], got[2]
            need = needed(min_fraction, len(asked))
            ok = len(arrived) >= need
            rt.log_metric("participants", round, attempt=k, **{asked_as: sorted(asked)},
                          participants=sorted(arrived), missing=missing, accepted=ok, **fields)
            gone = ", ".join(f"{n} ({why})" for n, why in sorted(missing.items()))
            if ok:
                if missing:
                    rt.log.warning("%s: going on with %d/%d %s, without %s", what, len(arrived), len(asked),
                                   peers, gone)
                return got
            if rt.stopping.is_set():
                return None
            shortfalls.append(f"attempt {k}: {len(arrived)}/{len(asked)} answered, missing {gone}")
            rt.log.warning("%s: %d/%d %s answered, min_fraction %g needs %d; %s", what, len(arrived),
                           len(asked), peers, min_fraction, need,
                           "trying the round again" if k < attempts else "giving up")
        rt.fail(f"{what}: fewer than min_fraction {min_fraction:g} of the {peers} answered in {attempts} "
                f"attempt(s): " + "; ".join(shortfalls))
        return None

    # ------------------------------------------------------------------ one attempt
    def collect(self, key: Hashable, expected: Iterable[str], send: Callable[[Hashable], Mapping[str, Reply]], *,
                deadline_s: float, tag: str, context: Any = None,
                probe: Callable[[set[str]], Mapping[str, str]] | None = None,
                addresses: Mapping[str, str] | None = None,
                why: Callable[[Reply], str] = lambda rep: rep.why or TIMEOUT,
                on_refused: Callable[[str, str, str], None] | None = None,
                on_late: Callable[[list[str]], None] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        """Ask `expected` peers and gather what they send back, within `deadline_s`:
        (arrived {peer: what deliver's fold returned}, missing {peer: why}).

        Opens a Gather under `key` (with `context` for the role's route: `context(key)`;
        pending peers probed by `probe`, or asked GET /hi at `addresses`: rt.gather), then
        send(key) -> {peer: Reply} asks them; a peer whose ask failed is dropped at once
        (why(reply) says why; on_refused(peer, why, message) tells the role), the rest are
        waited for until the deadline. Then the key is closed (later deliveries get 409)
        and on_late([peers asked fine that sent nothing in time]) tells the role."""
        rt = self.rt
        t0 = time.monotonic()
        if probe is not None:
            gather = Gather(expected, rt.stopping, tag=tag, probe=probe)
        else:
            gather = rt.gather(expected, tag=tag, addresses=addresses)
        with self._lock:
            self._open[key] = (gather, context)
        try:
            sent = send(key)
            failed = {}
            for peer, rep in sent.items():
                if not rep.ok:
                    failed[peer] = why(rep)
                    if on_refused is not None:
                        on_refused(peer, failed[peer], rep.message)
            gather.drop_all(failed)
            gather.wait(max(0.0, deadline_s - (time.monotonic() - t0)))
        finally:
            with self._lock:
                self._open.pop(key, None)     # late answers for this attempt get 409 from now on
            arrived, missing = gather.close()
        late = sorted(p for p, w in missing.items() if w == TIMEOUT and (p not in sent or sent[p].ok))
        if late and on_late is not None:
            on_late(late)
        return arrived, missing

    def context(self, key: Hashable) -> Any:
        """The context an open attempt was given (collect's `context`); None when `key` is not open."""
        with self._lock:
            cur = self._open.get(key)
        return None if cur is None else cur[1]

    def is_open(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._open

    def deliver(self, key: Hashable, peer: str, fold: Callable[[Any], Any] | None = None, *,
                late: Callable[[], str]) -> Any:
        """A route's answer of `peer` for the attempt open under `key`: fold(context) runs
        under the Gather's lock (aggregate as answers arrive) and its value is what
        collect returns for the peer. 409 (Conflict) with late() when `key` is not open;
        the Gather's 409 for a peer not asked or that answered already."""
        with self._lock:
            cur = self._open.get(key)
        if cur is None:
            raise Conflict(late())
        gather, context = cur
        return gather.add(peer, (lambda: fold(context)) if fold is not None else None)
