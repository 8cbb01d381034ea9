"""The docker backend's pure parts, without a Docker daemon: core placement, the gate
script, the controller's and the agent's checks, the image builder's errors."""
import os
import subprocess
import threading


import pytest

from controller.deploy import node_body
from controller.testbed import DefinitionError, Testbed
from worker import docker_nodes as dn
from worker import image
from worker import nodes as nb
from worker.agent import Agent, BadRequest

NS = 1_000_000_000


def test_fractional_nodes_spread_over_cores_with_a_quota():
    assert dn.place([0.5] * 4, [0, 1]) == [("0", NS // 2), ("1", NS // 2), ("0", NS // 2), ("1", NS // 2)]


def test_whole_cpus_get_whole_cores_and_no_quota():
    assert dn.place([2, 1, 1], [0, 1, 2, 3]) == [("0-1", None), ("2", None), ("3", None)]
    assert dn.place([1.5], [0, 1, 2]) == [("0-1", int(1.5 * NS))]
    assert dn.place([3], [0, 1]) == [("0-1", None)]         # more than there is: all of it
    assert dn.place([1], [0, 2]) == [("0", None)]
    assert dn.place([2], [0, 2, 3]) == [("0,2", None)]       # windows of the list: 0,2 then 2,3
    assert dn.place([2], [1, 3]) == [("1,3", None)]


def test_placement_counts_what_is_already_there():
    load = {0: 1.0}
    assert dn.place([1], [0, 1], load) == [("1", None)]
    assert load == {0: 1.0, 1: 1.0}
    node = nb.Node(spec=nb.NodeSpec(name="x", id=1, ip="10.0.0.2", port=1, cpu=0.5, ram_mb=64, cmd=[],
                                    working_dir=""), kind="docker", netns="etb-x", dev="eth0", rundir="/tmp/x",
                   cpuset="1")
    assert dn.cpuset_load([node]) == {1: 0.5}


def test_emulator_cores_are_this_machines_first_ones():
    mine = sorted(os.sched_getaffinity(0))
    assert dn.emulator_cores(None) == mine
    assert dn.emulator_cores(1) == mine[:1]
    assert dn.emulator_cores(0.4) == mine[:1]
    assert dn.emulator_cores(10 ** 6) == mine


def _gate(tmp_path, word: bytes) -> subprocess.CompletedProcess:
    """The container's entrypoint script, on this host, with the gate in tmp_path."""
    gate = tmp_path / dn.GATE
    os.mkfifo(gate)
    script = dn.GATE_SCRIPT.replace(dn.GATE_DIR, str(tmp_path))
    p = subprocess.Popen(["/bin/sh", "-c", script, "edgetb-gate", "echo", "app", "ran"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the shell blocks opening the FIFO until the agent's side writes
    t = threading.Timer(0.3, lambda: gate.write_bytes(word))
    t.start()
    try:
        out, err = p.communicate(timeout=10)
    finally:
        t.cancel()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_gate_runs_the_command_once_opened(tmp_path):
    p = _gate(tmp_path, dn.GATE_OPEN)
    assert (p.returncode, p.stdout) == (0, "app ran\n")


def test_gate_refuses_anything_but_open(tmp_path):
    p = _gate(tmp_path, b"abort\n")
    assert p.returncode == 97 and p.stdout == "" and "gate not opened (abort)" in p.stderr


def _testbed(tmp_path, backend: str, image_tag: str) -> Testbed:
    tb = Testbed("127.0.0.1", str(tmp_path), None, host_port=3999)
    emu = tb.add_emulator("emu", "127.0.0.1", cpu=2, ram=2, backend=backend, subnet="10.245.250.0/24")
    tb.add_emulated_node("n1", "/home/worker/dml_app", ["python3", "x.py"], image_tag, cpu=1, ram=512,
                         unit="M", emulator=emu)
    return tb


def test_controller_accepts_docker_and_requires_an_image(tmp_path):
    _testbed(tmp_path, "docker", "edgetb-node:latest").validate()
    with pytest.raises(DefinitionError) as err:
        _testbed(tmp_path, "docker", "").validate()
    assert "node n1: emulator emu runs docker nodes, give it an image" in str(err.value)
    _testbed(tmp_path, "netns", "").validate()            # netns nodes need none
    with pytest.raises(DefinitionError, match="backend 'vmware' is not one of netns, docker"):
        _testbed(tmp_path, "vmware", "x").validate()


def test_controller_sends_the_nodes_image(tmp_path):
    tb = _testbed(tmp_path, "docker", "edgetb-node:latest")
    tb.assign_addresses()
    body = node_body(tb.emulated["n1"], "10.245.250.1:3999", "10.245.250.1:4000")
    assert body["image"] == "edgetb-node:latest"
    assert nb.NodeSpec.from_dict(body).image == "edgetb-node:latest"


def test_controller_deploy_sends_the_emulator_cpu_and_the_agent_keeps_to_it(tmp_path, monkeypatch):
    # The whole deploy body the controller posts to the agent (the post itself recorded,
    # no agent running), then what the agent makes of its cpu.
    from types import SimpleNamespace
    from controller import agents
    tb = _testbed(tmp_path, "docker", "edgetb-node:latest")
    tb.node_info_path = tmp_path / "node_info.json"
    tb.embedded = (None, SimpleNamespace(port=4000))
    posted = []

    def deploy(self, body):       # the one way deploy posts to an agent
        posted.append((f"{self.address}/{self.kind}/deploy", body))
        return {"nodes": {n["name"]: {"links": 0} for n in body["nodes"]}}
    monkeypatch.setattr(agents.AgentClient, "deploy", deploy)
    tb.deploy(say=lambda m: None)
    assert len(posted) == 1 and posted[0][0].endswith("/emulated/deploy")
    body = posted[0][1]
    assert (body["emulator"], body["backend"], body["cpu"]) == ("emu", "docker", 2)
    assert [n["image"] for n in body["nodes"]] == ["edgetb-node:latest"]
    cores = sorted(os.sched_getaffinity(0))
    assert dn.emulator_cores(body["cpu"]) == cores[:2]
    assert dn.emulator_cores(1) == cores[:1] and dn.emulator_cores(None) == cores


def test_agent_refuses_docker_nodes_without_image(tmp_path):
    agent = Agent(name="t", port=1, token="x", state_dir=tmp_path / "state")
    node = {"name": "n1", "id": 1, "ip": "10.245.250.2", "port": 4444, "cmd": ["sleep", "1"]}
    body = {"emulator": "emu", "backend": "docker", "bridge": {"cidr": "10.245.250.0/24", "gateway": "10.245.250.1"},
            "nodes": [node], "links": {}}
    with pytest.raises(BadRequest, match="docker nodes need an image: none given for n1"):
        agent.deploy_emulated(body)
    with pytest.raises(BadRequest, match="backend 'lxc' is not available"):
        agent.deploy_emulated({**body, "backend": "lxc"})
    assert not (tmp_path / "state").exists()


def test_image_builder_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(image.shutil, "which", lambda tool: None)
    with pytest.raises(image.ImageError, match=r"needs debootstrap: apt-get install -y debootstrap"):
        image._build_offline(None, "edgetb-node:latest", {}, wheels_dir=None, mirror=None, say=print)


def test_no_daemon_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no.sock")
    with pytest.raises(image.NoDocker, match="no Docker daemon answers at unix://.*start dockerd"):
        image.client(timeout_s=5)
    assert not image.daemon_answers()
    assert "no Docker daemon answers" in image.present("edgetb-node:latest")


@pytest.mark.parametrize("tag", ["Edgetb", "a b", "x:", "-x", "x:y:z", ""])
def test_bad_tags_are_refused(tag):
    with pytest.raises(image.ImageError, match="bad image tag"):
        image.check_tag(tag)


def test_good_tags_and_the_dockerfile_base():
    for tag in ("edgetb-node:latest", "dml:v1.0", "localhost/edgetb/node", "edgetb-node"):
        assert image.check_tag(tag) == tag
    assert image.base_image() == "python:3.11-slim"       # the ordinary Dockerfile stays as it is
