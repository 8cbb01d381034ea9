"""What the docker tests share: why they cannot run here, docker deployments through a
real agent (tests.support.agents' plans, with the docker backend and the node image), and what
Docker still holds of them.

Docker tests need root, a Docker daemon that answers and the node image
(`python3 worker/image.py build`; CI builds it before the tests). Their emulator
subnets are 10.245.X.0/24 (X >= 1; the FL test has 10.245.0.0/24), apart from the netns
tests' 10.251/10.252 ranges.
"""
from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import random
from pathlib import Path

import pytest

from tests.support import agents as ah
from worker import image

TAG = os.environ.get("EDGETB_TEST_IMAGE", image.DEFAULT_TAG)
_subnets = itertools.count(random.randrange(1, 200))


def why_not() -> str | None:
    """Why docker tests cannot run on this machine, or None."""
    why = ah.missing_requirements()
    if why:
        return why
    why = image.present(TAG)
    return ah.skip_reason("docker", why) if why else None


def need_docker():
    """Module-level mark: skip, saying why, without root, a Docker daemon or the image."""
    why = why_not()
    return pytest.mark.skipif(why is not None, reason=f"docker tests: {why}", needs="docker")  # why is tagged


def client():
    return image.client(timeout_s=120)


def plan(n: int, *, cmd: list[str] | None = None, cpu: float = 0.5, ram_mb: int = 256,
         port: int = ah.IPERF_PORT) -> ah.Deployment:
    """agents.plan with the node image and a 10.245.X.0/24 subnet; sleeping nodes
    unless told (the image has python3 and coreutils, not iperf3)."""
    dep = ah.plan(n, cmd=cmd or ["sleep", "infinity"], cpu=cpu, ram_mb=ram_mb, port=port)
    dep.network = ipaddress.IPv4Network(f"10.245.{next(_subnets) % 250 + 1}.0/24")
    dep.gateway = str(dep.network[1])
    for i, node in enumerate(dep.nodes, 1):
        node["ip"] = str(dep.network[10 + i])
        node["image"] = TAG
    return dep


def body(dep: ah.Deployment, *, cpu: float = 2) -> dict:
    return {**dep.body(), "backend": "docker", "cpu": cpu}


def deploy(agent: ah.AgentProc, dep: ah.Deployment, *, cpu: float = 2, timeout_s: float = 300) -> dict:
    dep.token = agent.token
    answer = agent.post("/emulated/deploy", body(dep, cpu=cpu), timeout_s=timeout_s)
    dep.record_inodes()
    return answer


@contextlib.contextmanager
def deployed(agent: ah.AgentProc, dep: ah.Deployment, **kw):
    """Deploy docker nodes, yield, and always reset the agent's emulated nodes."""
    try:
        yield deploy(agent, dep, **kw)
    finally:
        agent.post("/emulated/reset", timeout_s=120)     # an error fails the test
    assert_clean(dep)


def docker_leftovers(dep: ah.Deployment) -> dict[str, list[str]]:
    """Containers etb-<node> and the network etb-<emulator> still in Docker (agents.leftovers)."""
    left = ah.leftovers(dep)
    return {"containers": left["containers"], "networks": left["networks"]}


def assert_clean(dep: ah.Deployment | None = None) -> None:
    """Nothing left of dep (containers and networks included), or with none, of anything."""
    ah.assert_clean(*([dep] if dep else []))


def container_cgroup(pid: int, controller: str) -> Path:
    """The cgroup v1 directory of `controller` that process pid is in (v2: the unified one)."""
    base = Path("/sys/fs/cgroup")
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(",") or (ctrls == "" and (base / "cgroup.controllers").exists()):
            return base / (controller if ctrls else "") / path.lstrip("/")
    raise AssertionError(f"pid {pid} is in no {controller} cgroup")
