"""Three workers end to end, each behind its own real agent and address (tests/support/multihost.py):

* host 1 (a network namespace): an emulator of netns nodes, the aggregator and a trainer;
* the real host (root namespace): an emulator of docker nodes, one trainer in a container
  (its agent runs in the root namespace because it drives this machine's dockerd);
* host 3 (a network namespace): a physical node, a trainer, links shaped on its NIC eth1.

The controller runs in this process on the test bridge (10.246.0.1); dml_app/ and the
dataset reach every worker over HTTP (no NFS here, and none of them is this machine's
loopback). FL runs through EdgeTB's HTTP workflow and reaches the netns test's accuracy;
the shaped link from the physical node to the aggregator (host 3 -> host 1) is measured
with iperf3; reset on every worker leaves nothing.
"""
import contextlib
import json
import os
import signal
import subprocess

from tests.support import ROOT
from tests.support import agents as ah
from tests.support import containers as dt
from tests.support import multihost
from tests.support import workflow as nw
from controller.manager import Manager
from controller.testbed import Testbed
from dml_app import net
from worker import nodes as nb

pytestmark = [multihost.need(),
              dt.need_docker()]

LINK_RATE = "20mbit"


class FlManager(Manager):
    algorithm = "fl"


def test_fl_across_netns_docker_and_physical_workers(tmp_path):
    from dml_tool import splitter

    splitter.split(source="mnist-subset", out=str(tmp_path / "dataset"), train_parts=30, test_parts=10,
                   partition="iid", seed=1)
    with multihost.Harness() as h:
        t = h.tag
        agg, tr_ns, tr_dk, tr_ph = f"{t}a", f"{t}t2", f"{t}t3", f"{t}t4"
        names = [agg, tr_ns, tr_dk, tr_ph]
        host1, host3 = h.add_host(), h.add_host()
        agent1, agent3 = host1.start_agent(), host3.start_agent()
        agent_d = h.root_agent()
        h.route(host1.subnet, host1)                   # host 1's emulator subnet
        docker_subnet = multihost.emulator_subnet(2)   # a docker bridge on the real host

        links = {agg: [{"dest": n, "bw": "40mbit"} for n in names[1:]],
                 tr_ns: [{"dest": agg, "bw": "10mbit"}], tr_dk: [{"dest": agg, "bw": "20mbit"}],
                 tr_ph: [{"dest": agg, "bw": LINK_RATE}]}
        (tmp_path / "links.json").write_text(json.dumps(links))
        tb = Testbed(multihost.CONTROLLER_IP, str(tmp_path), FlManager, host_port=h.controller_port,
                     token=h.token)
        tb.node_info_path = tmp_path / "node_info.json"
        app = tb.add_nfs("dml_app", str(ROOT / "dml_app"))
        ds = tb.add_nfs("dataset", str(tmp_path / "dataset"))
        emu_ns = tb.add_emulator(f"{t}ens", host1.ip, cpu=1, ram=2, agent_port=agent1.port, subnet=host1.subnet)
        emu_dk = tb.add_emulator(f"{t}edk", multihost.CONTROLLER_IP, cpu=1, ram=2, backend="docker",
                                 agent_port=agent_d.port, subnet=docker_subnet)
        wd = "/home/worker/dml_app"
        nodes = [tb.add_emulated_node(agg, wd, ["python3", "fl_aggregator.py"], cpu=0.5, ram=768, unit="M",
                                      emulator=emu_ns),
                 tb.add_emulated_node(tr_ns, wd, ["python3", "fl_trainer.py"], cpu=0.5, ram=768, unit="M",
                                      emulator=emu_ns),
                 tb.add_emulated_node(tr_dk, wd, ["python3", "fl_trainer.py"], dt.TAG, cpu=1, ram=768, unit="M",
                                      emulator=emu_dk)]
        phys = tb.add_physical_node(tr_ph, host3.nic, host3.ip, agent_port=agent3.port)
        phys.set_cmd(wd, ["python3", "fl_trainer.py"])
        for node in nodes + [phys]:
            node.mount_nfs(app, wd)
            node.mount_nfs(ds, "/home/worker/dataset")
        tb.load_link("links.json")
        said = []
        manager = tb.start(serve_forever=False, say=said.append)
        iperf_srv = None
        try:
            assert any(m.startswith("share: ") and "HTTP" in m for m in said), said
            manager.conf_dir, manager.runs_dir = tmp_path / "conf", tmp_path / "runs"
            summary = nw.run_workflow(
                tb, manager, tmp_path, alg="fl", root=agg, timeout_s=300,
                dataset={agg: {"test_len": 10, "test_start_index": 1, "batch_size": 64},
                         **{n: {"train_len": 10, "train_start_index": 1 + 10 * i, "batch_size": 32}
                            for i, n in enumerate(names[1:])}},
                structure={"node_list": [{"name": agg, "trainer_fraction": 1.0, "sync": 5}]
                           + [{"name": n, "epoch": 2} for n in names[1:]]})
            accs = [p["accuracy"] for p in summary["accuracy_per_round"]]
            assert summary["rounds"] == 5 and accs[-1] >= 0.85, accs
            assert all(summary["bytes_sent"][n] > 5 * 200_000 for n in names[1:]), summary["bytes_sent"]
            where = net.get_json(f"{agent_d.addr}/status", token=h.token)["nodes"]
            assert where[tr_dk]["kind"] == "docker" and where[tr_dk]["container"]

            # The shaped link between two workers: host 3's NIC -> the aggregator on host 1.
            for kind in ("emulated", "physical"):
                net.get_json(f"127.0.0.1:{h.controller_port}/{kind}/stop")   # apps go, links stay
            iperf_srv = subprocess.Popen(["ip", "netns", "exec", nb.NS_PREFIX + agg, "iperf3", "-s", "-p", "4444"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            ideal = ah.goodput_ideal(20e6)
            got = ah.iperf(host3.ns, nb.NS_PREFIX + agg, tb.emulated[agg].ip, 4444, seconds=3)
            assert abs(got / ideal - 1) < 0.03, (got, ideal)
        finally:
            if iperf_srv is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(iperf_srv.pid, signal.SIGTERM)
                iperf_srv.wait(10)
            tb.close()
            manager.close()
        left = h.leftovers(names)
        assert not any(left.values()), left
        for a in (agent1, agent3, agent_d):
            assert a.get("/status")["nodes"] == {}
        rules = multihost.sh("iptables", "-w", "-S").stdout
        assert nb.bridge_name(emu_dk.name) not in rules and nb.bridge_name(emu_ns.name) not in rules
        nets = multihost.sh("docker", "network", "ls", "--format", "{{.Name}}").stdout.split()
        assert f"etb-{emu_dk.name}" not in nets
