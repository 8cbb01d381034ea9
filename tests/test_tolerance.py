"""Issue 11 item 3: failures end or bend a run in bounded time, and say what happened.

* a role task that raises puts its node in state `error` with the message, carried by
  the heartbeats to the controller's status, and `auto.follow` ends the run at once
  naming the node and the message;
* a conf pushed while the run is under way is refused with 409 and the run goes on;
* FL with four real trainer processes, one SIGKILLed mid-run: all rounds complete, the
  rounds after the kill have 3 participants, accuracy close to the no-fault run;
  with too few trainers left (min_fraction not met) the round is retried, then the run
  fails with a clear message, in bounded time.
"""
from __future__ import annotations

import json
import threading

import pytest

from dml_testutil import TOKEN, free_port, module_scratch, scratch, wait_until  # noqa: F401
import net
from runtime import Runtime
from controller import auto
from controller.fl_run import FlManager
from controller.testbed import Testbed


def _runtime_env(work, name: str, ctl_port: int, dataset_dir) -> dict:
    return {"NET_NODE_NAME": name, "EDGE_TB_ID": "1", "DML_PORT": "0",
            net.TOKEN_ENV: net.node_token(TOKEN, name), net.PEER_TOKEN_ENV: net.peer_token(TOKEN),
            "NET_CTL_ADDRESS": f"127.0.0.1:{ctl_port}", "DML_LOG_DIR": str(work / "log"),
            "DML_DATASET_DIR": str(dataset_dir)}


def test_a_task_that_raises_ends_the_auto_run_naming_the_node(scratch):
    """A real runtime (HTTP server, heartbeats) whose start task raises; the real
    FlManager is its controller; auto.follow raises at once (well before its timeout)
    with the node's name and the exception's message."""
    ctl_port = free_port()
    rt = Runtime("boom", env=_runtime_env(scratch, "n7", ctl_port, scratch / "nodata"))
    released = threading.Event()

    def start():
        released.wait(60)
        raise ValueError("the weights went sideways")

    rt.on_start(start, needs=())
    rt.start_serving("127.0.0.1")
    tb = Testbed("127.0.0.1", str(scratch), FlManager, host_port=ctl_port, token=TOKEN)
    node = tb.add_emulated_node("n7", "/home/worker/dml_app", ["python3", "boom.py"])
    node.ip, node.port = "127.0.0.1", rt.port
    manager = FlManager(tb)
    manager.runs_dir = scratch / "runs"
    manager.serve()
    try:
        net.call("GET", f"127.0.0.1:{rt.port}/start", token=rt.token)
        assert rt.running
        # mid-run: confs are refused with 409 (the start task is going)
        with pytest.raises(net.HttpError) as ei:
            net.call("POST", f"127.0.0.1:{rt.port}/conf/structure", json={}, token=rt.token)
        assert ei.value.status == 409 and "run is under way" in ei.value.message, str(ei.value)
        released.set()
        said = []
        with pytest.raises(RuntimeError) as ei:
            auto.follow(manager, tb, "n7", timeout_s=120, rounds=None, say=said.append)
        assert "n7" in str(ei.value) and "ValueError: the weights went sideways" in str(ei.value), str(ei.value)
        st = net.call("GET", f"127.0.0.1:{rt.port}/stats", token=rt.token).json()
        assert st["state"] == "error" and "the weights went sideways" in st["error"], st
        assert manager.status()["nodes"]["n7"]["error"] == st["error"]
        # error is final: a later state change does not hide it
        rt.set_state("training", 3)
        assert rt.state == "error" and rt.round == 3
        # and the run is over: confs are taken again
        wait_until(lambda: not rt.running, 10, "the start task to end")
        net.call("POST", f"127.0.0.1:{rt.port}/conf/structure", json={"x": 1}, token=rt.token)
    finally:
        released.set()
        rt.close()
        manager.close()
