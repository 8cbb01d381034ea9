"""GPUs for docker nodes: `add_emulated_node(..., gpu=N)` becomes a Docker device request,
checked against `add_emulator(..., gpu=K)` before anything deploys; netns nodes refuse.
There is no GPU on the CI machines: the checks and the container's creation arguments are
tested as data, and the test that would run a GPU container skips saying so.
"""
import os
import shutil
import time

import pytest


from controller.deploy import node_body
from controller.testbed import DefinitionError, Testbed
from worker import docker_nodes as dn
from worker import nodes as nb
from worker.agent import Agent, BadRequest

from tests.support import agents as ah
from tests.support import containers as dt


def _testbed(tmp_path, backend, emu_gpu, node_gpus):
    tb = Testbed("127.0.0.1", str(tmp_path), None)
    emu = tb.add_emulator("emu", "10.246.0.11", cpu=4, ram=4, backend=backend, agent_port=3381, gpu=emu_gpu)
    for i, g in enumerate(node_gpus, start=1):
        tb.add_emulated_node(f"n{i}", "/tmp", ["true"], "edgetb-node:latest", cpu=1, ram=256, unit="M",
                             emulator=emu, gpu=g)
    return tb


def test_gpus_are_checked_against_the_emulator(tmp_path):
    _testbed(tmp_path, "docker", 2, [1, 1, 0]).validate()
    with pytest.raises(DefinitionError) as ei:
        _testbed(tmp_path, "docker", 1, [1, 1]).validate()
    assert "emulator emu: its nodes ask 2 GPU(s), it has 1" in str(ei.value)
    with pytest.raises(DefinitionError) as ei:
        _testbed(tmp_path, "docker", 0, [1]).validate()
    assert "it has 0" in str(ei.value)
    with pytest.raises(DefinitionError) as ei:
        _testbed(tmp_path, "netns", 4, [1]).validate()
    assert "node n1: gpu=1 needs a docker emulator; emulator emu runs netns nodes" in str(ei.value)
    with pytest.raises(DefinitionError, match=r"gpu=-1 must be a whole number"):
        _testbed(tmp_path, "docker", 2, [-1]).validate()
    with pytest.raises(DefinitionError, match=r"gpu=0.5 must be a whole number"):
        _testbed(tmp_path, "docker", 2, [0.5]).validate()


def test_gpu_rides_in_the_node_body_only_when_asked(tmp_path):
    tb = _testbed(tmp_path, "docker", 2, [2, 0])
    tb.assign_addresses()
    b1 = node_body(tb.emulated["n1"], "c:1", "a:2")
    b2 = node_body(tb.emulated["n2"], "c:1", "a:2")
    assert b1["gpu"] == 2 and "gpu" not in b2
    assert nb.NodeSpec.from_dict(b1).gpu == 2 and nb.NodeSpec.from_dict(b2).gpu == 0


def test_agent_refuses_gpus_for_netns_nodes(tmp_path):
    agent = Agent(name="t", port=1, token="x", state_dir=tmp_path / "state")
    node = {"name": "n1", "id": 1, "ip": "10.246.250.2", "port": 4444, "cmd": ["sleep", "1"], "gpu": 1}
    body = {"emulator": "emu", "backend": "netns", "bridge": {"cidr": "10.246.250.0/24", "gateway": "10.246.250.1"},
            "nodes": [node], "links": {}}
    with pytest.raises(BadRequest, match=r"GPUs are given to docker nodes only; netns nodes cannot have one: n1 \(1\)"):
        agent.deploy_emulated(body)
    assert not (tmp_path / "state").exists()


def test_device_requests_are_dockers_gpu_request():
    assert dn.device_requests(0) == []
    (req,) = dn.device_requests(2)
    from docker.types import DeviceRequest

    assert isinstance(req, DeviceRequest)
    assert req["Count"] == 2 and req["Capabilities"] == [["gpu"]] and req["Driver"] == ""


class _Stop(Exception):
    pass


class _FakeClient:
    """Records what a container would be created with, and stops there."""

    def __init__(self):
        self.calls = []
        outer = self

        class Api:
            @staticmethod
            def create_endpoint_config(**kw):
                return kw

        class Containers:
            @staticmethod
            def create(image, **kw):
                outer.calls.append((image, kw))
                raise _Stop()

        self.api, self.containers = Api(), Containers()


@pytest.mark.root
@pytest.mark.parametrize("gpu", [0, 1, 3])
def test_container_is_created_with_the_device_request(tmp_path, gpu):
    spec = nb.NodeSpec(name="g1", id=1, ip="10.246.32.2", port=4444, cpu=1, ram_mb=256, cmd=["python3", "x.py"],
                       working_dir="/w", image="edgetb-node:latest", gpu=gpu)
    node = nb.Node(spec=spec, kind="docker", netns="etb-g1", dev="eth0", rundir=str(tmp_path / "g1"), cpuset="0")
    client = _FakeClient()
    with pytest.raises(_Stop):
        dn._create_one(client, node, None, "etb-emu", {"edgetb": "1"}, {})
    (image, kw), = client.calls
    assert image == "edgetb-node:latest" and kw["cpuset_cpus"] == "0"
    if gpu:
        (req,) = kw["device_requests"]
        assert req["Count"] == gpu and req["Capabilities"] == [["gpu"]]
    else:
        assert "device_requests" not in kw


def _no_gpu() -> str | None:
    if shutil.which("nvidia-smi") is None or not os.path.exists("/dev/nvidia0"):
        return "no GPU on this machine (no nvidia-smi, no /dev/nvidia0): GPU requests are checked as data only"
    return None


@ah.need("gpu", _no_gpu())
@dt.need_docker()
def test_a_docker_node_sees_its_gpu():  # pragma: no cover - needs a GPU and the NVIDIA runtime
    """Through a real agent, as the controller deploys: a docker node asking one GPU lists
    it with nvidia-smi (into its log folder, which the agent keeps on the host)."""
    dep = dt.plan(1, cmd=["sh", "-c", 'nvidia-smi -L > "$DML_LOG_DIR/gpu.txt" 2>&1; exec sleep infinity'])
    dep.nodes[0]["gpu"] = 1
    with ah.running_agent() as agent, dt.deployed(agent, dep):
        name = dep.nodes[0]["name"]
        assert agent.get("/status")["nodes"][name]["kind"] == "docker"
        out = agent.state_dir / "nodes" / name / "log" / "gpu.txt"
        deadline = time.monotonic() + 60
        while "GPU 0" not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline, out.read_text() if out.exists() else f"no {out}"
            time.sleep(0.2)
