"""Parameter-server maths (dml_app/ps.py) and its structure tool: exact, no network."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.support.procs import DML_TOOL
from dml_tool import conf_utils as cu
from dml_app import nns
from dml_tool import ps_structure_conf
from dml_app.ps import (Finished, ParameterServer, PsConfig, Rejected, average_gradients, batch_gradient,
                batches, sgd_step)

META = {"name": "mnist", "input_shape": [1, 28, 28], "num_classes": 10}


def tensors(seed: int, shapes=((3, 4), (4,))) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_sgd_step_equals_torch_optim_sgd_over_several_steps(momentum):
    params = tensors(0)
    model = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in params.items()})
    opt = torch.optim.SGD(model.parameters(), lr=0.07, momentum=momentum)
    buf = None
    for step in range(4):
        grad = tensors(10 + step)
        params, buf = sgd_step(params, grad, lr=0.07, momentum=momentum, buf=buf)
        for k, p in model.items():
            p.grad = grad[k].clone()
        opt.step()
        for k, p in model.items():
            assert torch.equal(params[k], p.detach()), (step, k)
    assert (buf is None) == (momentum == 0.0)


def test_sgd_step_leaves_its_inputs_and_gradient_less_keys_alone():
    params = {**tensors(1), "count": torch.tensor(3)}
    before = {k: v.clone() for k, v in params.items()}
    new, _ = sgd_step(params, {"p0": torch.ones(3, 4)}, lr=0.5)
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert torch.equal(new["p0"], before["p0"] - 0.5) and torch.equal(new["p1"], before["p1"])
    assert new["count"].item() == 3


def test_average_gradients_is_the_plain_mean_for_equal_batches_and_weighted_otherwise():
    gs = [tensors(s) for s in (1, 2, 3)]
    avg = average_gradients([(g, 32) for g in gs])
    for k in avg:
        assert torch.equal(avg[k], (sum(g[k].double() for g in gs) / 3).float())
    w = average_gradients([({"w": torch.tensor([1.0])}, 1), ({"w": torch.tensor([5.0])}, 3)])
    assert w["w"].item() == 4.0
    with pytest.raises(ValueError):
        average_gradients([])


def make_server(mode="sync", workers=("w1", "w2", "w3"), **kw) -> ParameterServer:
    return ParameterServer(tensors(0), list(workers), PsConfig(mode=mode, lr=0.1, **kw))


def test_sync_collects_and_applies_the_average_of_what_came():
    """Sync pushes are collected; the role decides when the step is due (every live
    worker pushed, or the deadline) and apply_pending makes it."""
    s = make_server(steps=5)
    p0 = s.params
    gs = [tensors(20 + i) for i in range(3)]
    assert s.push("w2", 0, gs[1], 32) is False and s.push("w1", 0, gs[0], 32) is False
    assert s.version == 0 and sorted(s.pending) == ["w1", "w2"] and s.params is p0
    with pytest.raises(Rejected, match="w1 already pushed a gradient for version 0"):
        s.push("w1", 0, gs[0], 32)
    assert s.push("w3", 0, gs[2], 32) is False and s.version == 0
    assert s.apply_pending() == ["w1", "w2", "w3"]
    assert s.version == 1 and s.pending == {}
    # float64 reference written out here: p - lr * (mean of the three equal-weight gradients)
    for k in p0:
        ref = p0[k].double() - 0.1 * (gs[0][k].double() + gs[1][k].double() + gs[2][k].double()) / 3
        assert s.params[k].dtype == torch.float32
        assert (s.params[k].double() - ref).abs().max().item() <= 1e-6, k
        assert not torch.equal(s.params[k], p0[k]), k
    with pytest.raises(Rejected, match="only gradients of the current version 1"):
        s.push("w1", 0, gs[0], 32)
    assert (s.accepted, s.rejected) == (3, 2)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_lr_end_makes_the_lr_fall_linearly_to_it_at_the_last_step(mode):
    """Step v (version v -> v + 1) moves the model by lr_at(v) * gradient: 0.1, 0.075,
    0.05, 0.025 from lr 0.1 to lr_end 0 over 4 steps; without lr_end every step is 0.1."""
    for lr_end, lrs in ((0.0, [0.1, 0.075, 0.05, 0.025]), (None, [0.1] * 4)):
        s = make_server(mode, workers=("w1",), steps=4, lr_end=lr_end, max_staleness=0)
        g = {k: torch.ones_like(v) for k, v in s.params.items()}
        for v, lr in enumerate(lrs):
            assert s.config.lr_at(v) == pytest.approx(lr)
            before = s.params
            s.push("w1", v, g, 32)
            if mode == "sync":
                s.apply_pending()
            for k in before:
                assert (before[k] - s.params[k]).sub(lr).abs().max().item() <= 1e-6, (v, k)
        assert s.done and s.config.lr_at(10) == pytest.approx(0.1 if lr_end is None else lr_end)   # past `steps`


def test_sync_step_timeout_applies_what_came_in_conf_order():
    s = make_server()
    g3, g1 = tensors(3), tensors(1)
    s.push("w3", 0, g3, 10)
    s.push("w1", 0, g1, 30)
    p0 = s.params
    assert s.apply_pending() == ["w1", "w3"] and s.version == 1
    for k in p0:      # weighted by samples: (30 g1 + 10 g3) / 40
        ref = p0[k].double() - 0.1 * (30 * g1[k].double() + 10 * g3[k].double()) / 40
        assert (s.params[k].double() - ref).abs().max().item() <= 1e-6, k
    assert s.apply_pending() == [] and s.version == 1     # nothing came: no step


def test_the_sync_deadline_counts_from_when_the_version_was_served():
    """The deadline of a version is step_timeout_s after it was served (ps.serve), not
    after its first gradient came: a gradient pushed late in the version's window leaves
    only the rest of the window; the next version's window starts when it is served."""
    s = make_server(step_timeout_s=10)
    assert s.time_left(now=5.0) == 10           # not served yet: the whole window
    s.serve(now=100.0)
    assert s.time_left(now=100.0) == 10
    s.push("w1", 0, tensors(1), 32)             # the first gradient at 108 s ...
    assert s.time_left(now=108.0) == 2          # ... leaves 2 s, not 10
    assert s.time_left(now=111.0) == -1         # past the deadline
    s.apply_pending()
    assert s.served_at is None and s.time_left(now=111.0) == 10
    s.serve(now=111.5)                          # version 1 served: its own window
    assert s.time_left(now=120.0) == 1.5


def test_async_each_push_is_a_version_and_stale_ones_are_refused():
    s = make_server("async", max_staleness=2, steps=10)
    g = tensors(4)
    for i, (w, v) in enumerate([("w1", 0), ("w2", 0), ("w3", 1), ("w1", 1)]):
        before = s.params
        assert s.push(w, v, g, 32) is True and s.version == i + 1
        assert all(torch.equal(s.params[k], before[k].add(g[k], alpha=-0.1)) for k in g)
    with pytest.raises(Rejected, match=r"computed on version 1, the server is at version 4 "
                                       r"\(staleness 3 > max_staleness 2\)"):
        s.push("w2", 1, g, 32)
    assert s.version == 4 and (s.accepted, s.rejected) == (4, 1)
    assert s.push("w2", 2, g, 32) is True and s.version == 5       # staleness 3 - 1 = 2: taken


def test_pushes_are_checked_and_the_end_is_final():
    s = make_server("async", max_staleness=0, steps=2)
    g = tensors(5)
    with pytest.raises(Rejected, match="'w9' is not a worker"):
        s.push("w9", 0, g, 32)
    with pytest.raises(Rejected, match="version 3 was never served"):
        s.push("w1", 3, g, 32)
    with pytest.raises(ValueError, match="does not match the model"):
        s.push("w1", 0, {"p0": g["p0"]}, 32)
    with pytest.raises(ValueError, match="does not match the model"):
        s.push("w1", 0, {"p0": g["p0"], "p1": torch.zeros(5)}, 32)
    s.push("w1", 0, g, 32)
    with pytest.raises(Rejected, match="staleness 1 > max_staleness 0"):
        s.push("w2", 0, g, 32)
    s.push("w2", 1, g, 32)
    assert s.done
    with pytest.raises(Finished, match="training finished at version 2"):
        s.push("w1", 2, g, 32)


@pytest.mark.parametrize("kw, message", [
    ({"mode": "eventual"}, "'mode' must be one of sync, async"), ({"steps": 0}, "'steps' must be an integer in [1, "),
    ({"steps": 2.5}, "'steps'"), ({"lr": 0}, "'lr' must be a number in (0, 10]"),
    ({"momentum": 1.0}, "'momentum'"), ({"max_staleness": -1}, "'max_staleness'"),
    ({"eval_every": True}, "'eval_every'"), ({"step_timeout_s": 0}, "'step_timeout_s'"),
    ({"step_retries": -1}, "'step_retries' must be an integer in [0, 100]"), ({"step_retries": 101}, "'step_retries'"),
    ({"lr_end": -0.1}, "'lr_end' must be a number in [0, 10]"), ({"lr_end": float("nan")}, "'lr_end'"),
    ({"lr_end": "0.01"}, "'lr_end'"),
])
def test_config_errors_name_the_key(kw, message):
    with pytest.raises(ValueError) as e:
        PsConfig(**kw)
    assert message in str(e.value)


def test_batch_gradient_is_autograds_and_batches_cover_every_sample_each_epoch():
    torch.manual_seed(0)
    model = nns.build_model(META)
    rng = np.random.default_rng(0)
    x = rng.random((8, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 8).astype(np.int64)
    loss, grad = batch_gradient(model, x, y)
    model.zero_grad()
    ref = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    ref.backward()
    assert loss == pytest.approx(ref.item())
    assert all(torch.equal(grad[k], p.grad) for k, p in model.named_parameters())

    def epoch(seed):
        it = batches(10, 3, seed=seed)
        return [next(it).tolist() for _ in range(3)]
    first = epoch(1)                              # 3 full batches of 3; the 10th sample waits
    assert all(len(b) == 3 for b in first) and len({i for b in first for i in b}) == 9
    assert epoch(1) == first != epoch(2)          # reproducible from the seed
    assert len(next(batches(2, 32, seed=0))) == 2


# ----------------------------------------------------------------------------- the conf tool

NODES = ["n1", "n2", "n3"]
INFO = {n: cu.NodeAddr(n, f"10.0.0.{i + 2}", 4444, "emulated") for i, n in enumerate(NODES)}
STAR = {"n1": ["n2", "n3"], "n2": ["n1"], "n3": ["n1"]}


def structure(**kw) -> dict:
    return {"mode": "sync", "steps": 20, "lr": 0.1,
            "node_list": [{"name": "n1", "role": "server"}, {"name": "n2"}, {"name": "n3", "role": "worker"}],
            **kw}


def test_confs_for_the_server_and_its_workers_with_defaults():
    confs = ps_structure_conf.build_confs(structure(), STAR, INFO)
    assert confs["n1"] == {"role": "server", "workers": ["n2", "n3"], "mode": "sync", "steps": 20, "lr": 0.1,
                           "momentum": 0.0, "max_staleness": 2, "eval_every": 2,
                           "connect": {"n2": "10.0.0.3:4444", "n3": "10.0.0.4:4444"}}
    assert confs["n3"] == {"role": "worker", "server": "n1", "connect": {"n1": "10.0.0.2:4444"}}
    async_ = ps_structure_conf.build_confs(structure(mode="async", max_staleness=1, seed=3, step_timeout_s=5,
                                                     step_retries=4),
                                           STAR, INFO)["n1"]
    assert (async_["mode"], async_["max_staleness"], async_["seed"], async_["step_timeout_s"]) == ("async", 1, 3, 5.0)
    assert async_["step_retries"] == 4
    edgetb = {k: v for k, v in structure().items() if k != "steps"} | {"sync": 9}
    assert ps_structure_conf.build_confs(edgetb, STAR, INFO)["n1"]["steps"] == 9


@pytest.mark.parametrize("change, message", [
    ({"mode": "eventual"}, "mode: expected one of sync, async"),
    ({"sync": 3}, "give the number of updates as 'steps' (or EdgeTB's 'sync'), once"),
    ({"lr": 0}, ".lr: expected a number in (0.0, 10.0]"),
    ({"node_list": [{"name": "n2"}, {"name": "n3"}]}, "needs one node with \"role\": \"server\""),
    ({"node_list": [{"name": "n1", "role": "server"}, {"name": "n2", "role": "server"}]}, "a second server"),
    ({"node_list": [{"name": "n1", "role": "server"}, {"name": "n2", "role": "boss"}]}, "expected 'server' or 'worker'"),
    ({"node_list": [{"name": "n1", "role": "server"}, {"name": "n1"}]}, "listed twice"),
    ({"node_list": [{"name": "n1", "role": "server"}, {"name": "n7"}]}, "'n7': unknown node"),
    ({"batch": 3}, "unknown key(s) ['batch']"),
])
def test_structure_errors_name_file_and_key(change, message):
    with pytest.raises(cu.ConfError) as e:
        ps_structure_conf.build_confs(structure(**change), STAR, INFO)
    assert message in str(e.value) and "ps_structure.json" in str(e.value)


def test_a_missing_link_either_way_is_refused():
    for links, src, dst in ((dict(STAR, n3=[]), "n3", "n1"), (dict(STAR, n1=["n2"]), "n1", "n3")):
        with pytest.raises(cu.ConfError) as e:
            ps_structure_conf.build_confs(structure(), links, INFO)
        assert f"links.json: no link from '{src}' to '{dst}'" in str(e.value)


def test_shipped_examples_fit_the_default_links():
    nodes = {n: cu.NodeAddr(n, "10.0.0.1", 4444, "emulated") for n in ["n1", "n2", "n3", "n4", "n5"]}
    links = cu.load_links(str(DML_TOOL.parent / "links.json"), nodes)
    confs = ps_structure_conf.build_confs(cu.read_json(str(DML_TOOL / "ps_structure.json")), links, nodes)
    assert confs["n1"]["workers"] == ["n2", "n3", "n4", "n5"] and confs["n1"]["mode"] == "sync"
    dataset = json.loads((DML_TOOL / "ps_dataset.json").read_text())
    assert dataset["n1"]["test_len"] > 0 and all(dataset[n]["train_len"] > 0 for n in ["n2", "n3", "n4", "n5"])
