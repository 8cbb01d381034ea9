"""Helpers for the node-app tests: real role processes on loopback and a stub controller.

Every process is started in its own session (process group) and stopped by that group;
callers use these in fixtures or try/finally so nothing outlives a failing test.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from dml_app import net  # dml_app/net.py, as the node apps import it
from tests.support import ROOT
from worker.nodes import NodeSpec, app_env, stop_group  # (stop_group: the one way processes are stopped)

DML_APP = ROOT / "dml_app"
DML_TOOL = ROOT / "dml_tool"

TOKEN = "test-token-0123456789"


def _scratch_dir(prefix: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temporary folder removed after the test, failed or not (pytest's tmp_path is kept)."""
    yield from _scratch_dir("edgetb-test-")


@pytest.fixture(scope="module")
def module_scratch() -> Iterator[Path]:
    yield from _scratch_dir("edgetb-test-")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], Any], timeout_s: float, what: str, period_s: float = 0.1) -> Any:
    """Poll `cond` until it returns a truthy value; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(period_s)


class NodeProc:
    """One role script (`python3 <role>.py`, cwd dml_app) on 127.0.0.1:<port>."""

    def __init__(self, role: str, name: str, *, log_dir: Path, dataset_dir: Path,
                 ctl_address: str = "", port: int | None = None, token: str = TOKEN,
                 cpu: str = "1", peer_token: str = ""):
        self.role, self.name, self.token = role, name, token
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_dir = Path(log_dir)
        # The environment the agent gives a node (worker/nodes.app_env): the node's EdgeTB
        # variables as the controller sends them (controller/testbed.py _node_body), the
        # agent's credentials, unbuffered output, DML_LOG_DIR and DML_CPU. The node runs as
        # the test's own user with its whole environment (like a root node; no launcher),
        # minus any DML_* of the test's own.
        spec = NodeSpec(name=name, id=1, ip="127.0.0.1", port=self.port, cpu=float(cpu), ram_mb=1024,
                        cmd=[sys.executable, f"{role}.py"], working_dir=str(DML_APP), root=True,
                        env={"EDGE_TB_ID": "1", "NET_NODE_NAME": name, "DML_PORT": str(self.port),
                             "NET_CTL_ADDRESS": ctl_address, "NET_AGENT_ADDRESS": "",
                             "DML_DATASET_DIR": str(dataset_dir),
                             # a test may reuse log_dir for another run: fresh files, as by hand
                             "DML_LOG_APPEND": "0"})
        base = {k: v for k, v in os.environ.items() if not k.startswith("DML_")}
        env = app_env(spec, {net.TOKEN_ENV: token, net.PEER_TOKEN_ENV: peer_token}, str(log_dir), base=base)
        self.stderr_path = self.log_dir / f"{name}.stderr"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(spec.cmd, cwd=spec.working_dir, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._stderr,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def url(self, path: str) -> str:
        return f"http://{self.address}{path}"

    def call(self, method: str, path: str, **kw) -> Any:
        kw.setdefault("token", self.token)
        kw.setdefault("timeout_s", 10.0)
        return net.call(method, self.url(path), **kw)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                self.call("GET", "/hi", timeout_s=1.0)
                return True
            except net.HttpError:
                return False
        wait_until(up, timeout_s, f"{self.name} to answer /hi", period_s=0.1)

    def output(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the node's process group, SIGKILL it if it lingers; the exit code."""
        stop_group(self.proc, timeout_s)
        self._stderr.close()
        return self.proc.returncode


class StubController:
    """A minimal controller: records /heartbeat bodies and the /finish call."""

    def __init__(self, token: str = TOKEN):
        from flask import Flask, jsonify, request

        self.heartbeats: list[dict] = []
        self.finished = threading.Event()
        app = Flask("stub-controller")
        net.require_token(app, token)

        @app.post("/heartbeat")
        def heartbeat():
            self.heartbeats.append(request.get_json(force=True))
            return jsonify(ok=True)

        @app.get("/finish")
        def finish():
            self.finished.set()
            return "finish\n"

        self.server = net.Server(app, "127.0.0.1", 0, threads=4).start()
        self.address = f"127.0.0.1:{self.server.port}"

    def close(self) -> None:
        self.server.close()
