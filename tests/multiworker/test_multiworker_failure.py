"""A worker that cannot be reached, or fails mid-deployment: the controller names it,
removes what the other workers had already deployed, and fails (DeployError from the
API, a non-zero exit from a run script). Real agents in host namespaces (tests/support/multihost.py).
"""
import os
import sys
import textwrap
import threading
import time

import pytest

from tests.support import ROOT

from tests.support import multihost
from controller.testbed import DeployError, Testbed
from dml_app import net

pytestmark = multihost.need()


def _testbed(h, tmp_path, workers, tag):
    """One emulator of two sleeping netns nodes per (host or agent address) in workers."""
    tb = Testbed(multihost.CONTROLLER_IP, str(tmp_path), None, host_port=h.controller_port, token=h.token)
    tb.node_info_path = tmp_path / "node_info.json"
    names = []
    for i, (ip, port) in enumerate(workers, start=1):
        emu = tb.add_emulator(f"{tag}e{i}", ip, cpu=1, ram=1, unit="G", agent_port=port,
                              subnet=multihost.emulator_subnet(i))
        for j in (1, 2):
            name = f"{tag}n{i}{j}"
            tb.add_emulated_node(name, "/tmp", ["sleep", "300"], cpu=0.2, ram=128, unit="M", emulator=emu)
            names.append(name)
    return tb, names


def test_unreachable_worker_is_named_and_the_others_are_rolled_back(tmp_path):
    with multihost.Harness() as h:
        a, b = h.add_host(), h.add_host()
        agent_a = a.start_agent()
        agent_b = b.start_agent()
        agent_b.stop()                      # host b is up, its agent is not
        tb, names = _testbed(h, tmp_path, [(a.ip, agent_a.port), (b.ip, agent_b.port)], h.tag)
        with pytest.raises(DeployError) as ei:
            tb.deploy(say=lambda m: None)
        msg = str(ei.value)
        assert f"emulator {h.tag}e2 ({b.ip}:{agent_b.port})" in msg and "no answer" in msg, msg
        assert f"{h.tag}e1" not in msg.split("removed:")[1], msg
        assert agent_a.get("/status")["nodes"] == {}
        left = h.leftovers(names)
        assert not any(left.values()), left


def test_worker_failing_mid_deployment_is_named_and_the_others_are_rolled_back(tmp_path):
    """A fake agent answers 500 to its deploy, but only once the real one has finished
    deploying: what the real one made must then be removed."""
    from flask import Flask

    with multihost.Harness() as h:
        a = h.add_host()
        agent_a = a.start_agent()
        seen = {}
        fake = Flask("failing-agent")
        net.require_token(fake, h.token)

        @fake.post("/emulated/deploy")
        def deploy():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                seen["a"] = sorted(agent_a.get("/status")["nodes"])
                if len(seen["a"]) == 2:
                    break
                time.sleep(0.2)
            return "disk full while creating node", 500

        @fake.post("/emulated/reset")
        def reset():
            seen["reset"] = True
            return {"removed": []}

        port = h.next_port()
        srv = net.serve(fake, multihost.CONTROLLER_IP, port)
        try:
            tb, names = _testbed(h, tmp_path, [(a.ip, agent_a.port), (multihost.CONTROLLER_IP, port)], h.tag)
            with pytest.raises(DeployError) as ei:
                tb.deploy(say=lambda m: None)
        finally:
            srv.close()
        msg = str(ei.value)
        assert f"emulator {h.tag}e2 ({multihost.CONTROLLER_IP}:{port})" in msg, msg
        assert "HTTP 500" in msg and "disk full" in msg, msg
        assert seen["a"] == sorted(names[:2]), seen          # a had deployed ...
        assert agent_a.get("/status")["nodes"] == {}           # ... and it was removed
        assert seen.get("reset"), "the failing worker was not asked to reset"
        left = h.leftovers(names)
        assert not any(left.values()), left


def test_run_script_exits_non_zero_naming_the_worker(tmp_path):
    with multihost.Harness() as h:
        a, b = h.add_host(), h.add_host()
        agent_a = a.start_agent()
        dead_port = h.next_port()           # nothing listens there
        script = tmp_path / "my_run.py"
        script.write_text(textwrap.dedent(f"""
            import sys
            from controller import auto
            from controller.manager import Manager
            from controller.testbed import default_testbed

            class M(Manager):
                algorithm = "fl"

            def build(port, links):
                tb = default_testbed({multihost.CONTROLLER_IP!r}, {str(tmp_path)!r}, M, host_port={h.controller_port},
                                     token={h.token!r})
                tb.node_info_path = {str(tmp_path / "node_info.json")!r}
                for i, (ip, p) in enumerate([({a.ip!r}, {agent_a.port}), ({b.ip!r}, {dead_port})], start=1):
                    emu = tb.add_emulator(f"{h.tag}e{{i}}", ip, cpu=1, ram=1, unit="G", agent_port=p,
                                          subnet=f"10.246.{{16 * i}}.0/24")
                    tb.add_emulated_node(f"{h.tag}n{{i}}", "/tmp", ["sleep", "300"], cpu=0.2, ram=128, unit="M",
                                         emulator=emu)
                return tb

            sys.exit(auto.script_main(build, description="test", root=None, structure_tool="fl_structure_conf"))
        """))
        import subprocess

        p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                           cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert p.returncode != 0, p.stdout + p.stderr
        assert f"emulator {h.tag}e2 ({b.ip}:{dead_port})" in p.stderr, p.stderr
        assert "tc finish" not in p.stdout
        assert agent_a.get("/status")["nodes"] == {}
        left = h.leftovers([f"{h.tag}n1", f"{h.tag}n2"])
        assert not any(left.values()), left


def test_harness_leaves_nothing():
    with multihost.Harness() as h:
        a = h.add_host()
        a.start_agent()
        ns, br = a.ns, h.bridge
    from tests.support import agents as ah
    assert ns not in ah.netns_list()
    assert not multihost.sh("ip", "link", "show", br, check=False).returncode == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("http:338")]
