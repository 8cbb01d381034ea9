"""An app that ignores SIGTERM: the agent's /emulated/reset still ends
it (SIGKILL after the grace period) and leaves nothing of the testbed behind."""
from __future__ import annotations

import os
import sys
import time

from tests.support import agents as ah


# Ignores SIGTERM, names itself, and sleeps forever in one process.
STUBBORN = [sys.executable, "-c",
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "open('/proc/self/comm', 'w').write('etb-stubborn')\n"
            "while True: time.sleep(3600)\n"]


def _stubborn_pids(dep) -> list[int]:
    out = []
    for pid in dep.record_pids():
        st = ah.proc_status(pid)
        if st and st["Name"] == "etb-stubborn" and int(st["SigIgn"], 16) & (1 << 14):   # SIGTERM ignored
            out.append(pid)
    return out


def test_reset_ends_an_app_that_ignores_sigterm(clean_agent):
    dep = ah.plan(2, cmd=STUBBORN)
    try:
        ah.deploy(clean_agent, dep)
        deadline = time.monotonic() + 60
        while len(_stubborn_pids(dep)) < 2:
            assert time.monotonic() < deadline, "the apps never came up ignoring SIGTERM"
            time.sleep(0.1)
        pids = _stubborn_pids(dep)
        for pid in pids:              # SIGTERM really does nothing to them
            os.kill(pid, 15)
        for pid in pids:
            st = ah.proc_status(pid)
            assert st and st["Name"] == "etb-stubborn" and not st["State"].startswith("Z"), (pid, st)
    finally:
        clean_agent.post("/emulated/reset")
    # Right after the reset: no app is alive, no namespace, veth, cgroup or rule remains;
    # the only processes allowed are dead ones orphaned to PID 1 (the pid namespace's
    # tini, whose parent the agent SIGKILLed) until init reaps them.
    for pid in pids:
        st = ah.proc_status(pid)
        assert st is None or st["State"].startswith("Z"), ("the app survived the reset", pid, st)
    ah.assert_clean_after_kill(dep)
