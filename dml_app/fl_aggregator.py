"""FL aggregator (FedAvg): the root of a federated-learning run.

On GET /start it builds the model, then for `sync` rounds: picks
max(1, round(trainer_fraction * len(child_node))) trainers with a seeded RNG, POSTs the
global weights to each one's /train, waits for their /combine uploads (until every
chosen trainer uploaded or failed, or the round timeout), averages them weighted by
sample counts, evaluates on its test parts and logs `Aggregate: accuracy=..., round=k,`.
At the end it calls the controller's /finish.

Failures: a trainer that is dead (refused), refuses the weights or does not upload in
time is left out of the round; the round is aggregated when at least `min_fraction` of
the chosen trainers uploaded, otherwise it is tried again (trainers chosen anew; at
most `round_retries` times) and then the run fails (state error with the reason; the
controller's --auto ends on it). Every trainer is asked again each round, so a
restarted one rejoins. Each attempt's participants go to the metrics as an event
{"event": "participants", "round", "attempt", "chosen", "participants", "missing",
"accepted"}. The rounds, attempts, waiting, deadlines and failure accounting are the
round loop's (rounds.py, on `rt.broadcast_weights` and the runtime's Gather); this role
keeps FedAvg and its choices.

Structure conf (fl_structure_conf.py): {"trainer_fraction", "sync", "child_node",
"connect"}, optional "seed" (default 0), "round_timeout_s" (default 600),
"min_fraction" (in (0, 1], default 0.5) and "round_retries" (0..100, default 2).
"""
from __future__ import annotations

import random
import time

import torch
from werkzeug.exceptions import BadRequest, Conflict

from dml_app import bounded_input, nns
from dml_app.algorithms import (DEFAULT_MIN_FRACTION, DEFAULT_ROUND_RETRIES, MAX_ROUND_RETRIES, FedAvg, needed,  # noqa: F401
                        select_clients, weighted_mean)
from dml_app.learn import evaluate
from dml_app.rounds import Rounds
from dml_app.runtime import Runtime, main

DEFAULT_ROUND_TIMEOUT_S = 600.0
MAX_ROUNDS = 1_000_000
MAX_SEED = 2**32 - 1
MAX_SAMPLES = 10**12          # a trainer's sample count: far beyond any dataset, far below overflow


def check_structure(conf: dict) -> dict:
    """Validate and normalise the aggregator's structure conf (ValueError names the key)."""
    for key in ("trainer_fraction", "sync", "child_node", "connect"):
        if key not in conf:
            raise ValueError(f"missing key {key!r} (an aggregator needs trainer_fraction, sync, "
                             "child_node, connect)")
    conf["trainer_fraction"] = bounded_input.number(conf["trainer_fraction"], "'trainer_fraction'", 0, 1, lo_open=True)
    conf["sync"] = bounded_input.number(conf["sync"], "'sync'", 1, MAX_ROUNDS, integer=True)
    conf["seed"] = bounded_input.number(conf.get("seed", 0), "'seed'", 0, MAX_SEED, integer=True)
    conf["round_timeout_s"] = bounded_input.number(conf.get("round_timeout_s", DEFAULT_ROUND_TIMEOUT_S),
                                         "'round_timeout_s'", 0.1, 1e6)
    conf["min_fraction"] = bounded_input.number(conf.get("min_fraction", DEFAULT_MIN_FRACTION), "'min_fraction'",
                                      0, 1, lo_open=True)
    conf["round_retries"] = bounded_input.number(conf.get("round_retries", DEFAULT_ROUND_RETRIES), "'round_retries'",
                                       0, MAX_ROUND_RETRIES, integer=True)
    children, connect = conf["child_node"], conf["connect"]
    if not isinstance(children, list) or not children or not all(isinstance(c, str) for c in children):
        raise ValueError(f"'child_node' must be a non-empty list of node names, got {children!r}")
    if len(set(children)) != len(children):
        raise ValueError(f"'child_node' lists a node twice: {children}")
    if not isinstance(connect, dict):
        raise ValueError("'connect' must map node names to 'ip:port'")
    missing = [c for c in children if c not in connect]
    if missing:
        raise ValueError(f"'connect' has no address for trainer(s) {missing}")
    return conf


class FlAggregator:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.model: torch.nn.Module | None = None
        self.conf: dict | None = None          # the structure conf of the run, read once at start
        self.rounds = Rounds(rt)               # the open round's uploads are folded into its FedAvg
        rt.on_structure(check_structure)
        rt.on_dataset(self._check_data)
        rt.on_start(self.run_rounds)
        rt.declare_model(nns.build_model)
        rt.route("/combine", methods=["POST"], weights=True)(self.combine)

    @staticmethod
    def _check_data(data) -> None:
        if data.test_samples == 0:
            raise ValueError("the aggregator evaluates the global model: give it test parts (test_len > 0)")

    # ------------------------------------------------------------------ HTTP: uploads

    def combine(self):
        """POST /combine: a trainer's weights with meta {round, name, samples, loss}."""
        model = self.model
        tensors, meta = self.rt.receive_weights(None if model is None else model.state_dict())
        name = meta.get("name")
        if not isinstance(name, str):
            raise BadRequest("weights metadata must carry 'name' (str) and 'round' (int)")
        try:
            rnd = bounded_input.number(meta.get("round"), "weights metadata 'round'", 1, MAX_ROUNDS, integer=True)
            samples = bounded_input.number(meta.get("samples"), "weights metadata 'samples'", 1, MAX_SAMPLES,
                                 integer=True)
            loss = bounded_input.number(meta["loss"], "weights metadata 'loss'") if "loss" in meta else float("nan")
        except ValueError as e:
            raise BadRequest(f"{self.rt.name}: upload from {name[:64]}: {e}") from None
        if model is None:
            raise Conflict("no training run in progress")

        def late() -> str:
            now = self.rt.round if self.rounds.is_open(self.rt.round) else "none"
            self.rt.log.warning("late upload from %s for round %s (now %s): dropped", name, rnd, now)
            return f"round {rnd} is not open (current round: {now})"
        # Folded in as it arrives (under the gather's lock): one model in memory, not one per trainer.
        self.rounds.deliver(rnd, name, lambda model_sum: (model_sum.add(tensors, samples), (samples, loss))[1],
                            late=late)
        return "ok\n"

    # ------------------------------------------------------------------ the rounds

    def run_rounds(self) -> None:
        rt, data = self.rt, self.rt.data
        assert rt.structure is not None and data is not None
        conf = self.conf = dict(rt.structure)   # this run's conf (a push mid-run gets 409 anyway)
        torch.manual_seed(conf["seed"])
        self.model = nns.build_model(data.meta)
        rng = random.Random(conf["seed"])
        acc, _ = evaluate(self.model, data.test_x, data.test_y)
        rt.log.info("initial accuracy %.4f; %d rounds over %s (min_fraction %g, round_timeout_s %g, "
                    "round_retries %d)", acc, conf["sync"], conf["child_node"], conf["min_fraction"],
                    conf["round_timeout_s"], conf["round_retries"])
        t_start = time.monotonic()
        if not self.rounds.run(range(1, conf["sync"] + 1), lambda r: self._round_with_retries(r, rng)):
            return
        rt.log.info("training done: %d rounds in %.1f s", conf["sync"], time.monotonic() - t_start)
        rt.finish()

    def _round_with_retries(self, r: int, rng: random.Random) -> bool:
        """Round r, tried up to 1 + round_retries times (the round loop's quorum); False
        when the run failed or stops."""
        conf = self.conf

        def attempt(_k):
            t0 = time.monotonic()
            chosen = select_clients(conf["child_node"], conf["trainer_fraction"], rng)
            return (chosen, *self._attempt(r, chosen), t0)
        got = self.rounds.quorum(r, attempt, min_fraction=conf["min_fraction"], retries=conf["round_retries"],
                                 what=f"round {r}", peers="chosen trainers", asked_as="chosen")
        if got is None:
            return False
        chosen, results, _missing, model_sum, t0 = got
        self._aggregate(r, chosen, results, model_sum, t0)
        return True

    def _attempt(self, r: int, chosen: list[str]) -> tuple[dict, dict, FedAvg]:
        """Send the global weights to `chosen`, gather their uploads until all came or
        failed, or round_timeout_s: (results {name: (samples, loss)}, missing {name: why}, sum)."""
        rt, conf = self.rt, self.conf
        rt.set_state("training", r)
        addresses = {n: conf["connect"][n] for n in chosen}
        model_sum = FedAvg()
        weights = {k: v.clone() for k, v in self.model.state_dict().items()}
        results, missing = self.rounds.collect(
            r, chosen, lambda _r: rt.broadcast_weights(addresses, "/train", weights, {"round": r, "name": rt.name},
                                                       deadline_s=conf["round_timeout_s"]),
            deadline_s=conf["round_timeout_s"], tag=f"round {r}", context=model_sum, addresses=addresses,
            on_refused=lambda n, why, message: rt.log.warning(
                "round %d: trainer %s failed to take the weights (%s): %s", r, n, why, message),
            on_late=lambda late: rt.log.warning("round %d: no upload from %s within %g s; aggregating the others",
                                                r, late, conf["round_timeout_s"]))
        return results, missing, model_sum

    def _aggregate(self, r: int, chosen: list[str], results: dict, model_sum: FedAvg, t0: float) -> None:
        rt = self.rt
        rt.set_state("aggregating", r)
        failed = sorted(set(chosen) - set(results))
        self.model.load_state_dict(model_sum.result())
        train_loss = weighted_mean([(l, n) for n, l in results.values()])
        acc, test_loss = evaluate(self.model, rt.data.test_x, rt.data.test_y)
        rt.log_aggregate(acc, r)
        rt.log.info("round %d: %d/%d trainers%s, train loss %.4f, test loss %.4f, %.1f s", r,
                    len(results), len(chosen), f" (failed: {failed})" if failed else "",
                    train_loss, test_loss, time.monotonic() - t0)


if __name__ == "__main__":
    main("fl_aggregator", FlAggregator)
