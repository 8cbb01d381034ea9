"""FL aggregator (FedAvg): the root of a federated-learning run.

On GET /start it builds the model, then for `sync` rounds: picks
max(1, round(trainer_fraction * len(child_node))) trainers with a seeded RNG, POSTs the
global weights to each one's /train, waits for their /combine uploads (or the round
timeout), averages them weighted by sample counts, evaluates on its test parts and logs
`Aggregate: accuracy=..., round=k,`. At the end it calls the controller's /finish.

Structure conf (fl_structure_conf.py): {"trainer_fraction", "sync", "child_node",
"connect"}, optional "seed" (default 0) and "round_timeout_s" (default 600).
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from werkzeug.exceptions import BadRequest, Conflict

import net
import nns
from algorithms import FedAvg, select_clients, weighted_mean
from learn import evaluate
from runtime import Runtime, main

DEFAULT_ROUND_TIMEOUT_S = 600.0
MAX_ROUNDS = 1_000_000
MAX_SEED = 2**32 - 1
MAX_SAMPLES = 10**12          # a trainer's sample count: far beyond any dataset, far below overflow
SEND_THREADS = 32             # parallel /train sends to trainers


def check_structure(conf: dict) -> dict:
    """Validate and normalise the aggregator's structure conf (ValueError names the key)."""
    for key in ("trainer_fraction", "sync", "child_node", "connect"):
        if key not in conf:
            raise ValueError(f"missing key {key!r} (an aggregator needs trainer_fraction, sync, "
                             "child_node, connect)")
    conf["trainer_fraction"] = net.number(conf["trainer_fraction"], "'trainer_fraction'", 0, 1, lo_open=True)
    conf["sync"] = net.number(conf["sync"], "'sync'", 1, MAX_ROUNDS, integer=True)
    conf["seed"] = net.number(conf.get("seed", 0), "'seed'", 0, MAX_SEED, integer=True)
    conf["round_timeout_s"] = net.number(conf.get("round_timeout_s", DEFAULT_ROUND_TIMEOUT_S),
                                         "'round_timeout_s'", 0.1, 1e6)
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


@dataclass
class RoundState:
    number: int
    expected: set[str]
    results: dict[str, tuple[int, float]] = field(default_factory=dict)   # name -> (samples, loss)
    # Uploads are folded in as they arrive: one model in memory, not one per trainer.
    model_sum: FedAvg = field(default_factory=FedAvg)


class FlAggregator:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.model: torch.nn.Module | None = None
        self._cond = threading.Condition()
        self._round: RoundState | None = None
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
        tensors, meta = self.rt.receive_weights()
        name = meta.get("name")
        if not isinstance(name, str):
            raise BadRequest("weights metadata must carry 'name' (str) and 'round' (int)")
        try:
            rnd = net.number(meta.get("round"), "weights metadata 'round'", 1, MAX_ROUNDS, integer=True)
            samples = net.number(meta.get("samples"), "weights metadata 'samples'", 1, MAX_SAMPLES,
                                 integer=True)
            loss = net.number(meta["loss"], "weights metadata 'loss'") if "loss" in meta else float("nan")
        except ValueError as e:
            raise BadRequest(f"{self.rt.name}: upload from {name[:64]}: {e}") from None
        self._check_shapes(tensors)
        with self._cond:
            cur = self._round
            if cur is None or rnd != cur.number:
                now = cur.number if cur else "none"
                self.rt.log.warning("late upload from %s for round %s (now %s): dropped", name, rnd, now)
                raise Conflict(f"round {rnd} is not open (current round: {now})")
            if name not in cur.expected:
                raise Conflict(f"{name} was not asked to train in round {rnd}")
            if name in cur.results:
                raise Conflict(f"{name} already uploaded for round {rnd}")
            cur.model_sum.add(tensors, samples)
            cur.results[name] = (samples, loss)
            self._cond.notify_all()
        return "ok\n"

    def _check_shapes(self, tensors: dict) -> None:
        ref = self.model.state_dict() if self.model is not None else None
        if ref is None:
            raise Conflict("no training run in progress")
        if set(tensors) != set(ref):
            raise BadRequest(f"weights do not match the model: keys differ "
                             f"({sorted(set(ref) ^ set(tensors))[:5]})")
        for k, v in ref.items():
            if tuple(tensors[k].shape) != tuple(v.shape):
                raise BadRequest(f"weights do not match the model: {k} is {tuple(tensors[k].shape)}, "
                                 f"expected {tuple(v.shape)}")

    # ------------------------------------------------------------------ the rounds

    def run_rounds(self) -> None:
        rt, conf, data = self.rt, self.rt.structure, self.rt.data
        assert conf is not None and data is not None
        torch.manual_seed(conf["seed"])
        self.model = nns.build_model(data.meta)
        rng = random.Random(conf["seed"])
        acc, _ = evaluate(self.model, data.test_x, data.test_y)
        rt.log.info("initial accuracy %.4f; %d rounds over %s", acc, conf["sync"], conf["child_node"])
        t_start = time.monotonic()
        # Bounded: 299 trainers must not mean 299 threads (each /train answers at once).
        with ThreadPoolExecutor(max_workers=max(1, min(SEND_THREADS, len(conf["child_node"]))),
                                thread_name_prefix="send") as pool:
            for r in range(1, conf["sync"] + 1):
                if rt.stopping.is_set():
                    return
                self._one_round(r, select_clients(conf["child_node"], conf["trainer_fraction"], rng), pool)
        rt.log.info("training done: %d rounds in %.1f s", conf["sync"], time.monotonic() - t_start)
        rt.finish()

    def _one_round(self, r: int, chosen: list[str], pool: ThreadPoolExecutor) -> None:
        rt, conf = self.rt, self.rt.structure
        t0 = time.monotonic()
        rt.set_state("training", r)
        with self._cond:
            self._round = RoundState(r, set(chosen))
        weights = {k: v.clone() for k, v in self.model.state_dict().items()}
        sends = {n: pool.submit(rt.send_weights, conf["connect"][n], "/train", weights,
                                {"round": r, "name": rt.name}) for n in chosen}
        for n, fut in sends.items():
            try:
                fut.result()
            except (net.HttpError, ValueError) as e:
                rt.log.warning("round %d: trainer %s failed to take the weights: %s", r, n, e)
                with self._cond:
                    self._round.expected.discard(n)
                    self._cond.notify_all()

        deadline = time.monotonic() + conf["round_timeout_s"]
        with self._cond:
            cur = self._round
            while len(cur.results) < len(cur.expected) and not rt.stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            results = dict(cur.results)
            model_sum = cur.model_sum
            missing = sorted(cur.expected - set(results))
            self._round = None  # late uploads for this round get 409 from now on
        failed = sorted(set(chosen) - set(results))
        if missing:
            rt.log.warning("round %d: no upload from %s within %g s; aggregating the others",
                           r, missing, conf["round_timeout_s"])

        rt.set_state("aggregating", r)
        if results:
            self.model.load_state_dict(model_sum.result())
            train_loss = weighted_mean([(l, n) for n, l in results.values()])
        else:
            rt.log.warning("round %d: no trainer answered; the global model is unchanged", r)
            train_loss = float("nan")
        acc, test_loss = evaluate(self.model, rt.data.test_x, rt.data.test_y)
        rt.log_aggregate(acc, r)
        rt.log.info("round %d: %d/%d trainers%s, train loss %.4f, test loss %.4f, %.1f s", r,
                    len(results), len(chosen), f" (failed: {failed})" if failed else "",
                    train_loss, test_loss, time.monotonic() - t0)


if __name__ == "__main__":
    main("fl_aggregator", FlAggregator)
