"""Serverless parameter-server training end to end, through EdgeTB's workflow (auto.py's).

s1 runs ps_server.py in serverless mode, s2..s5 sl_action.py (OpenWhisk-style action
containers on port 8080); the controller's invoker invokes them in rounds of one
activation per data part (4 parts of 10 train parts each), cold the first time on each
container, warm after. Every activation fetches its data part from the controller,
pulls the parameters, trains and pushes gradients over the shaped links. The same run
on netns nodes and on Docker nodes must reach >= 0.90 on the MNIST subset, and
summary.json must hold the activations (cold and warm), their start overheads and the
bytes moved.
"""
import json
import re
from pathlib import Path


import pytest

from tests.support import containers as dt
from tests.support import workflow as nw
from controller import results
from controller.sl_run import SlManager

WORKERS = 4
DATA_PART_BYTES = 1000 * 784 * 4       # 10 parts of 100 MNIST images, float32, plus labels


def structure(server: str, actions: list[str]) -> dict:
    """The shipped sl_structure.json with these node names (what --auto runs)."""
    s = json.loads((nw.ROOT / "dml_tool" / "sl_structure.json").read_text())
    s["node_list"] = [{"name": server, "role": "server"}] + [{"name": a, "role": "action"} for a in actions]
    return s


def links(server: str, actions: list[str]) -> dict:
    rates = ["40mbit", "20mbit", "10mbit", "8mbit"]
    return {server: [{"dest": a, "bw": "50mbit"} for a in actions],
            **{a: [{"dest": server, "bw": bw}] for a, bw in zip(actions, rates)}}


def check_run(summary: dict, server: str, actions: list[str]) -> None:
    """What a user of the run reads in summary.json and the run's folder."""
    assert summary.get("error") is None, summary.get("error")
    accs = [p["accuracy"] for p in summary["accuracy_per_round"]]
    assert summary["algorithm"] == "sl" and summary["final_accuracy"] >= 0.90, accs
    st = structure(server, actions)
    assert summary["rounds"] == st["steps"]                       # versions applied by the server
    sl = summary["serverless"]
    recs = sl["records"]
    # every container was cold once (its /init), then reused warm in the later rounds
    assert sl["cold"] == len(actions) and sl["warm"] >= 1, sl
    assert sl["activations"] == len(recs) == sl["cold"] + sl["warm"] and sl["errors"] == 0, sl
    assert sorted(r["node"] for r in recs if r["cold"]) == sorted(actions)
    assert all(r["status"] == "success" and r["init_s"] is not None for r in recs if r["cold"])
    assert all(r["init_s"] is None for r in recs if not r["cold"])
    assert sl["rounds_invoked"] >= 2 and sl["activations"] <= sl["rounds_invoked"] * len(st["data"])
    # a cold start fetches the data part and initialises; a warm one reuses both
    assert sl["cold_start_s"]["mean"] > sl["warm_start_s"]["mean"], sl
    moved = sl["bytes_moved"]
    part = sl["data_parts"][0]["bytes"]
    assert part >= DATA_PART_BYTES and {p["bytes"] for p in sl["data_parts"]} == {part}
    # a container fetches a part it does not hold (every cold one), a warm one may hold it
    fetched = [r for r in recs if not r["result"]["cached_data"]]
    assert all(r in fetched for r in recs if r["cold"])
    assert moved["data_down"] == len(fetched) * part
    # LeNet-5 is ~250 kB: every push sent one gradient up, every pull one version down
    pushes = sum(r["result"]["pushes"] for r in recs)
    assert moved["gradients_up"] >= pushes * 240_000 and moved["params_down"] >= pushes * 240_000
    assert moved["server"]["bytes_received"] >= moved["gradients_up"]
    assert sorted(moved["by_node"]) == sorted(actions)
    assert sum(b["gradients_up"] for b in moved["by_node"].values()) == moved["gradients_up"]
    # the action counts its calls in its node's /stats too: the bytes-sent table is right
    assert all(summary["bytes_sent"][a] == moved["by_node"][a]["gradients_up"] for a in actions), \
        (summary["bytes_sent"], moved["by_node"])
    table = results.table(summary)
    assert f"activations {sl['activations']} ({len(actions)} cold, {sl['warm']} warm)" in table
    assert "cold start overhead: mean" in table and "warm start overhead: mean" in table
    assert sum(r["result"]["applied"] for r in recs) >= st["steps"] - len(actions)
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "activations.png").stat().st_size > 10_000 and "activations.png" in summary["plots"]
    log = (run_dir / f"{server}.log").read_text()
    versions = [int(v) for v in re.findall(r"Step: version=(\d+), from=[0-9a-f]{32}, staleness=\d+,", log)]
    assert versions == list(range(1, st["steps"] + 1))


def run(tb, manager, tmp, server, actions, timeout_s=150):
    dataset = {server: {"test_len": 10, "test_start_index": 1, "batch_size": 64}}
    return nw.run_workflow(tb, manager, tmp, alg="sl", dataset=dataset, structure=structure(server, actions),
                           root=server, timeout_s=timeout_s)


@pytest.mark.timeout(300)
def test_sl_on_netns_nodes(tmp_path):
    server, actions = "s1", [f"s{i}" for i in range(2, 2 + WORKERS)]
    roles = {server: "ps_server.py", **{a: "sl_action.py" for a in actions}}
    with nw.netns_testbed(tmp_path, SlManager, roles, links(server, actions), port=3376,
                          subnet="10.236.0.0/24") as (tb, manager):
        summary = run(tb, manager, tmp_path, server, actions)
        print(f"serverless on netns: accuracy {summary['final_accuracy']:.4f}, {summary['wall_seconds']} s, "
              f"cold {summary['serverless']['cold_start_s']}, warm {summary['serverless']['warm_start_s']}")
        check_run(summary, server, actions)


@dt.need_docker()
@pytest.mark.timeout(420)
def test_sl_on_docker_nodes(tmp_path):
    server, actions = "ds1", [f"ds{i}" for i in range(2, 2 + WORKERS)]
    roles = {server: "ps_server.py", **{a: "sl_action.py" for a in actions}}
    client = dt.client()
    try:
        with nw.netns_testbed(tmp_path, SlManager, roles, links(server, actions), port=3378,
                              subnet="10.245.241.0/24", backend="docker", image=dt.TAG,
                              emulator="emu-dsl") as (tb, manager):
            status = tb.embedded[0].status()["nodes"]
            assert {n: status[n]["kind"] for n in roles} == {n: "docker" for n in roles}
            summary = run(tb, manager, tmp_path, server, actions, timeout_s=240)
            print(f"serverless on docker: accuracy {summary['final_accuracy']:.4f}, {summary['wall_seconds']} s, "
                  f"cold {summary['serverless']['cold_start_s']}, warm {summary['serverless']['warm_start_s']}")
            check_run(summary, server, actions)
        left = [c.name for c in client.containers.list(all=True) if c.name in {f"etb-{n}" for n in roles}]
        assert left == [] and client.networks.list(names=["etb-emu-dsl"]) == []
    finally:
        client.close()


@pytest.mark.timeout(240)
def test_sl_refuses_bad_invoker_settings_and_fails_at_its_rounds_bound(tmp_path):
    """A server conf whose invoker settings were edited badly refuses /start with nothing
    started; a run whose server is not done after `rounds` rounds ends by itself, saying
    why, with the activations it made."""
    from controller import auto

    server, actions = "f1", ["f2"]
    roles = {server: "ps_server.py", "f2": "sl_action.py"}
    st = {**structure(server, actions), "steps": 100_000, "rounds": 1, "concurrency": 1,
          "data": [{"train_start_index": 1, "train_len": 1}]}
    with nw.netns_testbed(tmp_path, SlManager, roles, links(server, actions), port=3386,
                          subnet="10.236.4.0/24") as (tb, manager):
        (tmp_path / "sl_structure.json").write_text(json.dumps(st))
        (tmp_path / "sl_dataset.json").write_text(json.dumps(
            {server: {"test_len": 1, "test_start_index": 1, "batch_size": 64}}))
        auto.tool("dataset_conf").write_confs(str(tmp_path / "sl_dataset.json"), str(manager.conf_dir))
        write = auto.structure_writer("sl_structure_conf", tmp_path / "sl_structure.json", tb, manager.conf_dir)
        write()
        conf_path = manager.conf_dir / f"{server}_structure.conf"
        good = json.loads(conf_path.read_text())
        for bad, message in ((lambda c: c["invoker"].update(pool=["f9"]), r"pool: f9 not action nodes"),
                             (lambda c: c["invoker"].update(concurrency=0), r"invoker.concurrency: expected"),
                             (lambda c: c.pop("invoker"), r"invoker: expected an object")):
            conf = json.loads(json.dumps(good))
            bad(conf)
            conf_path.write_text(json.dumps(conf))
            with pytest.raises(ValueError, match=message):
                manager.start_training(server)
            assert manager.started_at is None and manager.algo.invoker is None     # nothing started
        conf_path.write_text(json.dumps(good))
        said = []
        summary = nw.run_workflow(tb, manager, tmp_path, alg="sl", dataset={server: {
            "test_len": 1, "test_start_index": 1, "batch_size": 64}}, structure=st, root=server,
            timeout_s=120, said=said)
        assert "not done after 1 invocation rounds" in summary["error"], summary.get("error")
        sl = summary["serverless"]
        assert sl["activations"] == sl["cold"] == 1 and sl["rounds_invoked"] == 1 and sl["errors"] == 0
