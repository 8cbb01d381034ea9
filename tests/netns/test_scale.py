"""Many nodes on one machine, through the --auto workflow on real netns nodes.

* The same FL run (same seeds, same data, same links) gives the same per-round accuracy
  whether the apps fork from the zygote or are exec'd one Python per node.
* 1 aggregator + 60 trainers deploy, answer, train a round and are removed, leaving
  nothing (netns_testbed checks every kind of leftover). The 300-node figures are
  measured by bench/scale.py, not here.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


from tests.support import agents as ah
from controller.fl_run import FlManager
from tests.support.workflow import netns_testbed, run_workflow
from worker.cgroups import Cgroup

pytestmark = [ah.need_root()]
PY = os.path.realpath(sys.executable)


def _star(agg: str, trainers: list[str]) -> dict:
    return {agg: [{"dest": t, "bw": "100mbit"} for t in trainers], **{t: [{"dest": agg, "bw": "50mbit"}] for t in trainers}}


def _launched_by_zygote(name: str) -> bool:
    """Whether the node's app is a child of the zygote (else under tini, exec'd)."""
    for pid in Cgroup(name).pids():
        st = ah.proc_status(pid)
        if st and os.path.realpath(f"/proc/{pid}/exe") == PY:
            parent = Path(f"/proc/{st['PPid']}/cmdline").read_bytes()
            return b"worker/zygote.py" in parent
    raise AssertionError(f"{name}: no Python app in its cgroup")


def _fl(tmp: Path, names: list[str], *, launcher: str, rounds: int, parts: int, ram_mb: int = 512,
        emu_ram_gb: float = 4, port: int, subnet: str, timeout_s: float = 300) -> dict:
    agg, trainers = names[0], names[1:]
    roles = {n: "fl_aggregator.py" if n == agg else "fl_trainer.py" for n in names}
    with netns_testbed(tmp, FlManager, roles, _star(agg, trainers), port=port, subnet=subnet, ram_mb=ram_mb,
                       emu_ram_gb=emu_ram_gb, launcher=launcher) as (tb, manager):
        forked = {n: _launched_by_zygote(n) for n in names}
        summary = run_workflow(tb, manager, tmp, alg="fl", root=agg, timeout_s=timeout_s, dataset={
            agg: {"test_len": 10, "test_start_index": 1, "batch_size": 64},
            **{t: {"train_len": parts, "train_start_index": 1 + (parts * i) % (41 - parts), "batch_size": 16}
               for i, t in enumerate(trainers)}}, structure={"node_list": [
                {"name": agg, "trainer_fraction": 1.0, "sync": rounds}]
                + [{"name": t, "epoch": 2} for t in trainers]})
    return {"forked": forked, "summary": summary}


def test_same_accuracy_per_round_forked_and_execd(tmp_path):
    names = ["sa1", "st2", "st3", "st4"]
    runs = {launcher: _fl(tmp_path / launcher, names, launcher=launcher, rounds=3, parts=5, port=3344,
                          subnet="10.239.4.0/24") for launcher in ("auto", "exec")}
    assert set(runs["auto"]["forked"].values()) == {True}, runs["auto"]["forked"]
    assert set(runs["exec"]["forked"].values()) == {False}, runs["exec"]["forked"]
    per_round = {k: [r["accuracy"] for r in v["summary"]["accuracy_per_round"]] for k, v in runs.items()}
    assert len(per_round["auto"]) == 3 and per_round["auto"][-1] > 0.5, per_round
    assert per_round["auto"] == per_round["exec"]


def test_sixty_trainers_deploy_train_a_round_and_leave_nothing(tmp_path):
    names = ["ma0"] + [f"mt{i}" for i in range(1, 61)]
    run = _fl(tmp_path, names, launcher="auto", rounds=1, parts=1, ram_mb=128, emu_ram_gb=8, port=3346,
              subnet="10.239.8.0/24", timeout_s=600)
    assert all(run["forked"].values())
    s = run["summary"]
    assert s["rounds"] == 1 and 0 <= s["final_accuracy"] <= 1, s
    # Every trainer took part: each one sent its model to the aggregator.
    assert all(s["bytes_sent"][t] > 200_000 for t in names[1:]), s["bytes_sent"]


def test_the_arp_table_grows_with_the_nodes_and_shrinks_back(tmp_path):
    """The kernel's neighbour table is one for all namespaces (1,024 entries by default):
    deploying raises its thresholds for the node count, the reset of the last bridge
    puts the host's own values back; on a tree that mirrors /proc/sys, only raised."""
    from worker import nodes as nb

    sysctl, saved = tmp_path / "neigh", tmp_path / "saved.json"
    sysctl.mkdir()
    for k, v in (("gc_thresh1", 128), ("gc_thresh2", 512), ("gc_thresh3", 1024)):
        (sysctl / k).write_text(f"{v}\n")
    assert nb.size_neighbour_table(300, sysctl, saved) == {"gc_thresh1": 728, "gc_thresh2": 45812,
                                                           "gc_thresh3": 91624}
    assert nb._neigh(sysctl) == {"gc_thresh1": 728, "gc_thresh2": 45812, "gc_thresh3": 91624}
    assert json.loads(saved.read_text()) == {"gc_thresh1": 128, "gc_thresh2": 512, "gc_thresh3": 1024}
    (sysctl / "gc_thresh3").write_text("200000\n")           # the host's own larger value stays
    assert nb.size_neighbour_table(300, sysctl, saved)["gc_thresh3"] == 200000
    nb.restore_neighbour_table(sysctl, saved)                # (no testbed bridge exists now)
    assert nb._neigh(sysctl) == {"gc_thresh1": 128, "gc_thresh2": 512, "gc_thresh3": 1024}
    assert not saved.exists()
    before = nb._neigh()
    with ah.running_agent() as agent:
        dep = ah.deploy_nodes(agent, 3, cmd=[])
        raised = nb._neigh()
        assert raised["gc_thresh3"] >= 1024 + 3 * 5 and raised["gc_thresh1"] >= 2 * 3 + 128
        agent.post("/emulated/reset")
        ah.assert_clean(dep)
    assert nb._neigh() == before
    assert not nb.NEIGH_SAVED.exists()
