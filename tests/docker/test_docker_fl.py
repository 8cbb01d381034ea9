"""Federated learning on docker nodes, through EdgeTB's HTTP workflow.

An aggregator and three trainers are containers of the node image on a docker emulator
(the controller and its embedded agent in this process, the conf tools as CLI processes,
every step an HTTP call to the controller). The containers' cgroups must show the cpuset
and memory limit asked for, and the run must reach the accuracy of the netns case.
"""
from pathlib import Path


import pytest

from tests.support import containers as dt
from tests.support import workflow as nw
from controller.manager import Manager
from worker import cgroups
from worker import docker_nodes as dn

pytestmark = dt.need_docker()

ROLES = {"da1": "fl_aggregator.py", "dt2": "fl_trainer.py", "dt3": "fl_trainer.py", "dt4": "fl_trainer.py"}
TRAINERS = [n for n, r in ROLES.items() if r == "fl_trainer.py"]
PORT = 3368
SUBNET = "10.245.0.0/24"
RAM_BYTES = 768 * 2**20            # tests.support.workflow gives every node 768 MB
CPU = 0.5                          # and 2 cpus split over four nodes


class FlManager(Manager):
    algorithm = "fl"


def _links() -> dict:
    return {"da1": [{"dest": n, "bw": "40mbit"} for n in TRAINERS],
            "dt2": [{"dest": "da1", "bw": "10mbit"}], "dt3": [{"dest": "da1", "bw": "2mbps"}],
            "dt4": [{"dest": "da1", "bw": "20mbit"}]}


def _docker_logs(client) -> str:
    out = []
    for name in ROLES:
        try:
            text = client.containers.get(dn.container_name(name)).logs(tail=30).decode(errors="replace")
        except Exception as e:  # noqa: BLE001 - diagnostics only
            text = f"({e})"
        out.append(f"--- {name}\n{text}")
    return "\n".join(out)


def _read(path: Path) -> str:
    return path.read_text().strip()


def test_fl_on_docker_nodes(tmp_path):
    client = dt.client()
    try:
        with nw.netns_testbed(tmp_path, FlManager, ROLES, _links(), port=PORT, subnet=SUBNET,
                              backend="docker", image=dt.TAG, emulator="emu-dfl") as (tb, manager):
            agent = tb.embedded[0]
            status = agent.status()["nodes"]
            assert {n: status[n]["kind"] for n in ROLES} == {n: "docker" for n in ROLES}
            assert {n: status[n]["links"] for n in ROLES} == {"da1": 3, "dt2": 1, "dt3": 1, "dt4": 1}
            cpusets = {}
            for name in ROLES:
                ctr = client.containers.get(dn.container_name(name))
                host = ctr.attrs["HostConfig"]
                cpusets[name] = status[name]["cpuset"]
                assert ctr.name == f"etb-{name}" and ctr.labels["edgetb"] == "1"
                assert host["CpusetCpus"] == cpusets[name] and host["Memory"] == RAM_BYTES
                assert host["NanoCpus"] == int(CPU * 1e9)
                assert ctr.attrs["NetworkSettings"]["Networks"]["etb-emu-dfl"]["IPAMConfig"]["IPv4Address"] \
                    == tb.emulated[name].ip
                pid = ctr.attrs["State"]["Pid"]
                # what the kernel enforces, read from the container's own cgroups
                assert _read(dt.container_cgroup(pid, "cpuset") / "cpuset.cpus") == cpusets[name]
                lim = cgroups.read_limits(dt.container_cgroup(pid, "cpu"), dt.container_cgroup(pid, "memory"))
                assert lim["memory_bytes"] == RAM_BYTES     # v1 memory.limit_in_bytes, v2 memory.max
                assert lim["cpu_quota_us"] / lim["cpu_period_us"] == pytest.approx(CPU)   # cfs_*_us, cpu.max
            # 0.5 cpu each on one core, spread over the emulator's cores
            cores = dn.emulator_cores(2)
            assert all(c in {str(x) for x in cores} for c in cpusets.values()), cpusets
            assert len(set(cpusets.values())) == min(2, len(cores)), cpusets

            dataset = {"da1": {"test_len": 10, "test_start_index": 1, "batch_size": 64},
                       **{n: {"train_len": 10, "train_start_index": 1 + 10 * i, "batch_size": 32}
                          for i, n in enumerate(TRAINERS)}}
            structure = {"node_list": [{"name": "da1", "trainer_fraction": 1.0, "sync": 5}]
                         + [{"name": n, "epoch": 2} for n in TRAINERS]}
            try:
                summary = nw.run_workflow(tb, manager, tmp_path, alg="fl", dataset=dataset,
                                          structure=structure, root="da1", timeout_s=300)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{_docker_logs(client)}") from None
            accs = [p["accuracy"] for p in summary["accuracy_per_round"]]
            print(f"docker FL accuracy per round: {accs}, {summary['wall_seconds']:.1f} s")
            assert summary["rounds"] == 5 and len(accs) == 5
            assert accs[-1] >= 0.85, accs
            run_dir = Path(summary["run_dir"])
            assert "Aggregate: accuracy=" in (run_dir / "da1.log").read_text()
            assert all("Train: loss=" in (run_dir / f"{n}.log").read_text() for n in TRAINERS)
            assert all(summary["bytes_sent"][n] > 5 * 200_000 for n in TRAINERS)
            # the apps ran in their containers, logging into the node's run dir on the host
            assert all(agent.status()["nodes"][n]["state"] == "running" for n in ROLES)
        left = [c.name for c in client.containers.list(all=True) if c.name in {f"etb-{n}" for n in ROLES}]
        assert left == [] and client.networks.list(names=["etb-emu-dfl"]) == []
    finally:
        client.close()
