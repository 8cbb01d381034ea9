"""Federated learning through EdgeTB's workflow on real netns nodes.

The controller and its embedded agent run in this process; the workflow (confs, pushes,
start, follow until /finish) is controller/auto.py's, the code `fl_run.py --auto` runs
(workflow.run_workflow). One aggregator and three trainers train LeNet-5 on the
MNIST subset over shaped links, and the aggregator calls /finish by itself at the end.
Then, over HTTP as with curl: /status, links changed in place with /update/tc, and
/emulated/reset.
"""
import json
import subprocess
from pathlib import Path

import pytest


from controller.manager import Manager
from dml_app import net
from tests.support.workflow import netns_testbed, run_workflow
from tests.support import agents as ah
from worker import tc

NAMES = ["fa1", "ft2", "ft3", "ft4"]


class FlManager(Manager):
    algorithm = "fl"


def _etb_namespaces() -> set[str]:
    from tests.support import agents as ah
    return {n for n in ah.netns_list() if n.startswith("etb-")}


@pytest.fixture
def fl_testbed(tmp_path):
    links = {"fa1": [{"dest": n, "bw": "40mbit"} for n in NAMES[1:]],
             "ft2": [{"dest": "fa1", "bw": "10mbit"}], "ft3": [{"dest": "fa1", "bw": "2mbps"}],
             "ft4": [{"dest": "fa1", "bw": "20mbit"}]}
    roles = {n: "fl_aggregator.py" if n == "fa1" else "fl_trainer.py" for n in NAMES}
    with netns_testbed(tmp_path, FlManager, roles, links, port=3340, subnet="10.238.0.0/24") as (tb, manager):
        yield tb, manager, tmp_path
    assert not (_etb_namespaces() & {f"etb-{n}" for n in NAMES})


def test_fl_through_the_auto_workflow(fl_testbed):
    tb, manager, tmp = fl_testbed
    ctl = f"127.0.0.1:{tb.host_port}"
    said = []
    summary = run_workflow(tb, manager, tmp, alg="fl", root="fa1", timeout_s=240, said=said, dataset={
        "fa1": {"test_len": 10, "test_start_index": 1, "batch_size": 64},
        **{n: {"train_len": 10, "train_start_index": 1 + 10 * i, "batch_size": 32}
           for i, n in enumerate(NAMES[1:])}}, structure={"node_list": [
            {"name": "fa1", "trainer_fraction": 1.0, "sync": 5}] + [{"name": n, "epoch": 2} for n in NAMES[1:]]})
    assert said[:3] == ["dataset confs pushed to 4 nodes", "structure confs pushed to 4 nodes", "started fa1"], said
    # the root's aggregates, said as they came (what --auto prints)
    rounds_said = [l for l in said if l.startswith("round ")]
    assert rounds_said and rounds_said == [f"round {p['round']}/5: accuracy {p['accuracy']:.4f}"
                                           for p in summary["accuracy_per_round"]][:len(rounds_said)], said

    accs = [p["accuracy"] for p in summary["accuracy_per_round"]]
    assert summary["rounds"] == 5 and len(accs) == 5
    assert accs[-1] >= 0.85, accs
    assert accs[-1] > accs[0], f"accuracy should rise over the rounds: {accs}"
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text())["algorithm"] == "fl"
    for name in NAMES:
        assert (run_dir / f"{name}.log").stat().st_size > 0
    assert "Aggregate: accuracy=" in (run_dir / "fa1.log").read_text()
    assert "Train: loss=" in (run_dir / "ft2.log").read_text()
    for png in ("accuracy.png", "loss.png", "summary.png"):
        assert (run_dir / png).stat().st_size > 1000
    # every trainer sent its model to the aggregator each round, over its link
    assert all(summary["bytes_sent"][n] > 5 * 200_000 for n in NAMES[1:])

    status = net.get_json(f"{ctl}/status")["nodes"]
    assert status["fa1"]["links"] == 3 and status["ft3"]["links"] == 1
    assert all(s["last_heartbeat_s"] is not None for s in status.values())

    # links changed at run time, in place: same app processes, new rate in the kernel,
    # every other link as it was
    before = status["ft2"]
    pids = {n: ah.cgroup_limits(n)["pids"] for n in NAMES}
    assert all(pids.values()), f"an app is not in its cgroup: {pids}"
    kernel = {n: tc.read_back(f"etb-{n}", "eth0") for n in NAMES}
    assert sorted(kernel["fa1"]["rates_bps"][m] for m in (0x10, 0x11, 0x12)) == [40_000_000] * 3
    assert (kernel["ft2"]["rates_bps"][0x10], kernel["ft3"]["rates_bps"][0x10],
            kernel["ft4"]["rates_bps"][0x10]) == (10_000_000, 16_000_000, 20_000_000)
    links2 = json.loads((tmp / "links.json").read_text())
    links2["ft2"] = [{"dest": "fa1", "bw": "3mbit"}]
    links2.pop("ft4")    # the file is the whole network: ft4's link goes away
    (tmp / "links2.json").write_text(json.dumps(links2))
    net.get_json(f"{ctl}/update/tc", params={"file": "links2.json"})
    classes = subprocess.run(["tc", "-n", "etb-ft2", "class", "show", "dev", "eth0"],
                             capture_output=True, text=True).stdout
    assert "rate 3Mbit" in classes and "rate 10Mbit" not in classes
    after = net.get_json(f"{ctl}/status")["nodes"]
    assert after["ft2"]["app"] == "running"
    assert after["ft2"]["links"] == 1 and after["ft4"]["links"] == 0
    assert after["ft2"]["last_heartbeat_s"] is not None and before["ip"] == after["ft2"]["ip"]
    assert {n: ah.cgroup_limits(n)["pids"] for n in NAMES} == pids, "an app was restarted"
    now = {n: tc.read_back(f"etb-{n}", "eth0") for n in NAMES}
    assert now["fa1"] == kernel["fa1"] and now["ft3"] == kernel["ft3"], "an untouched link changed"
    assert now["ft2"]["rates_bps"][0x10] == 3_000_000 and now["ft2"]["filters"] == 1
    assert now["ft4"]["rates_bps"][0x10] == 100 * 10**9, "ft4's removed link is still shaped"

    net.get_json(f"{ctl}/emulated/reset")
    assert not (_etb_namespaces() & {f"etb-{n}" for n in NAMES})
