"""FL trainer: trains the global model locally and uploads it to its aggregator.

POST /train (safetensors weights, meta {round, name}) is answered at once; the node
then trains `epoch` local epochs on its train parts with its `batch_size`, logs
`Train: loss=..., round=k,` and POSTs its weights with meta {round, name, samples,
loss} to the father node's /combine.

Structure conf (fl_structure_conf.py): {"epoch", "father_node", "connect"}, optional
"lr" (SGD learning rate, default 0.05).
"""
from __future__ import annotations

import threading
import zlib

import torch
from werkzeug.exceptions import BadRequest, Conflict

from dml_app import bounded_input, calls, nns
from dml_app.learn import train_epochs
from dml_app.runtime import Runtime, main

DEFAULT_LR = 0.05
MAX_EPOCHS = 10_000
MAX_ROUNDS = 1_000_000


def check_structure(conf: dict) -> dict:
    """Validate and normalise the trainer's structure conf (ValueError names the key)."""
    for key in ("epoch", "father_node", "connect"):
        if key not in conf:
            raise ValueError(f"missing key {key!r} (a trainer needs epoch, father_node, connect)")
    conf["epoch"] = bounded_input.number(conf["epoch"], "'epoch'", 1, MAX_EPOCHS, integer=True)
    conf["lr"] = bounded_input.number(conf.get("lr", DEFAULT_LR), "'lr'", 0, 10, lo_open=True, hi_open=True)
    father = conf["father_node"]
    if not isinstance(conf["connect"], dict) or father not in conf["connect"]:
        raise ValueError(f"'connect' has no address for father_node {father!r}")
    return conf


class FlTrainer:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self._busy = threading.Lock()  # one local training at a time; later jobs queue here
        rt.on_structure(check_structure)
        rt.on_dataset(self._check_data)
        rt.declare_model(nns.build_model)
        rt.route("/train", methods=["POST"], weights=True)(self.train)

    @staticmethod
    def _check_data(data) -> None:
        if data.train_samples == 0:
            raise ValueError("a trainer needs train parts (train_len > 0)")

    def train(self):
        """POST /train: take the global weights, answer, train in the background."""
        rt = self.rt
        if rt.structure is None or rt.data is None:
            raise Conflict(f"{rt.name}: /conf/structure and /conf/dataset must come before /train")
        model = nns.build_model(rt.data.meta)
        tensors, meta = rt.receive_weights(model.state_dict(), model=f"the {type(model).__name__} model")
        try:
            rnd = bounded_input.number(meta.get("round"), "weights metadata 'round'", 1, MAX_ROUNDS, integer=True)
        except ValueError as e:
            raise BadRequest(f"{rt.name}: {e}") from None
        model.load_state_dict(tensors, strict=True)
        rt.spawn(self._work, model, rnd, name=f"train-{rnd}")
        return "ok\n"

    def _work(self, model: torch.nn.Module, rnd: int) -> None:
        rt, conf, data = self.rt, self.rt.structure, self.rt.data
        with self._busy:
            rt.set_state("training", rnd)
            seed = zlib.crc32(rt.name.encode()) * 1009 + rnd  # reproducible, distinct per node
            loss = train_epochs(model, data.train_x, data.train_y, epochs=conf["epoch"],
                                batch_size=data.batch_size, lr=conf["lr"], seed=seed)
            rt.log_train(loss, rnd)
            rt.set_state("uploading", rnd)
            father = conf["father_node"]
            try:
                rt.send_weights(rt.peer(father), "/combine", model.state_dict(),
                                {"round": rnd, "name": rt.name, "samples": data.train_samples,
                                 "loss": loss})
            except calls.HttpError as e:
                rt.log.warning("round %d: upload to %s failed: %s", rnd, father, e)
            rt.set_state("idle", rnd)


if __name__ == "__main__":
    main("fl_trainer", FlTrainer)
