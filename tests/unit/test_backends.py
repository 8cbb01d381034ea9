"""The node backend table (worker/backends.py) and the docker deploy pipeline's rollback.

Each kind of node is one Backend picked by kind; the agent asks it, never the kind. A
docker deploy installs a node's links and opens its gate as soon as its container is
made, while later containers are still being made: a failure there (links the kernel
cannot shape) must still leave nothing behind, containers already running included.
"""


import pytest

from tests.support import agents as ah
from dml_app import net
from worker import backends as be
from worker import tc


def test_one_backend_per_kind_with_the_whole_interface(tmp_path):
    from worker.agent import Agent

    a = Agent(name="t", port=1, token="x", state_dir=tmp_path / "state")
    assert set(a.kinds) == {"netns", "docker", "physical"} == set(be.BACKENDS)
    for kind, backend in a.kinds.items():
        assert type(backend) is be.BACKENDS[kind] and backend.kind == kind
        for method in ("check", "create", "start", "stop", "stop_many", "inspect", "remove", "namespace",
                       "address", "running", "deployed", "sweep"):
            assert callable(getattr(backend, method)), (kind, method)
    assert {k for k, b in a.kinds.items() if b.emulated} == {"netns", "docker"} == set(a.nets)
    assert [k for k, b in a.kinds.items() if b.gpus] == ["docker"]
    assert not (tmp_path / "state").exists()


@pytest.mark.docker
def test_docker_deploy_failing_at_links_leaves_nothing(clean_agent):
    from tests.support import containers as dt

    why = dt.why_not()
    if why:
        pytest.skip(f"docker: {why}")   # why is tagged (dt.why_not)
    if tc.netem_available():
        ah.skip("has-it", "this kernel has netem: a delay link would not fail")
    dep = dt.plan(10)
    last = dep.names[-1]
    # every node but the last has a plain link and is started as soon as it is made; the
    # last one's delay cannot be shaped here
    dep.links = {a: [ah.link(dep, a, b, 10_000_000)] for a, b in zip(dep.names, dep.names[1:])}
    dep.links[last] = [ah.link(dep, last, dep.names[0], 10_000_000, delay_us=10_000)]
    with pytest.raises(net.HttpError) as e:
        dt.deploy(clean_agent, dep)
    assert e.value.status == 422 and "netem not available" in e.value.message, e.value.message
    dt.assert_clean(dep)
    assert clean_agent.get("/status")["nodes"] == {}
