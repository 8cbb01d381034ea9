"""A netns agent killed with SIGKILL and restarted on the same port: the
new agent knows its predecessor's nodes and its reset removes all of them (namespaces,
veths, bridge, cgroups, processes)."""
from __future__ import annotations

import os
import secrets
import signal

import pytest

from tests.support import agents as ah


def test_an_agent_restarted_after_sigkill_removes_what_its_predecessor_left():
    why = ah.missing_requirements()
    if why:
        pytest.skip(why)
    port, token = ah.free_port(), secrets.token_hex(16)
    log_path = ah.Path(os.environ.get("TMPDIR", "/tmp")) / f"edgetb-test-agent-{port}.log"
    proc = ah.launch_agent([], "127.0.0.1", port, f"test-{port}", token, log_path)
    first = ah.AgentProc(port=port, token=token, proc=proc, log_path=log_path)
    dep = ah.plan(2)
    a, b = dep.names
    dep.links = {a: [ah.link(dep, a, b, 10_000_000)]}
    try:
        ah._wait_ready(first, 30)
        ah.deploy(first, dep)
        for n in dep.names:
            ah.wait_listening(dep.ns(n), dep.node(n)["port"])
        dep.record_pids()
        # What a user would see of the deployment while it runs: its namespaces and apps.
        assert {dep.ns(n) for n in dep.names} <= set(ah.netns_list())
        assert dep.pids, "no app process seen in the deployed namespaces"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # The SIGKILLed agent cleaned nothing: everything is still there.
        assert ah.leftovers(dep)["namespaces"], "the namespaces vanished with the agent"
        with ah.running_agent(port=port) as second:
            second.post("/emulated/reset")
            # Right after the reset the only thing allowed to remain is what nobody can
            # clean: the SIGKILLed agent's own children, dead (zombies) and orphaned to
            # PID 1, waiting for it to reap them. No live process, no namespace, veth,
            # bridge, cgroup or rule.
            ah.assert_clean_after_kill(dep)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        if any(ah.leftovers(dep).values()):       # a failure above: clean up through an agent
            with ah.running_agent(port=port) as again:
                again.post("/emulated/reset")
    ah.assert_clean(dep)
