"""A user's own app (examples/own_app/: Flask, numpy, requests, none of our runtime) on
netns nodes and on Docker nodes, unchanged, the way docs/own-app.md tells users to run it.

The testbed is examples/own_app/own_run.py's `build` (the controller and its embedded
agent in this process); the confs are written by the dml_tool CLIs and pushed, and the
run started, with curl on the controller's loopback port, as EdgeTB users do. The app
must have checked its credentials, seen what a node sees (its user, cwd, read-only app
folder, an exec'd interpreter), reported an accuracy, called /finish and posted its log
into the run folder; afterwards nothing of the testbed remains.
"""
import json
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from dml_app import net
from tests.support import ROOT, load_script
from tests.support import agents as ah
from tests.support import containers as dt
from tests.support import workflow as nw

APP = ROOT / "examples" / "own_app"
own_run = load_script(APP / "own_run.py")

pytestmark = ah.need_root()

PORT = 3420                     # the embedded agent takes 3421
SUBNETS = {"netns": "10.248.0.0/24", "docker": "10.245.252.0/24"}
CWD = {"netns": "/run/edgetb-node/root/home/worker/own_app", "docker": "/home/worker/own_app"}
NODES = own_run.NODES           # n1 the root, n2 and n3 its children


def curl(path: str) -> str:
    """EdgeTB's `curl localhost:PORT/...` (root on loopback needs no token)."""
    p = subprocess.run(["curl", "-sS", "--fail-with-body", "--max-time", "180", f"http://localhost:{PORT}{path}"],
                       capture_output=True, text=True)
    assert p.returncode == 0, f"curl {path}: {p.stdout} {p.stderr}"
    return p.stdout


def tool(*argv: str) -> None:
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, f"{argv}: {p.stdout}{p.stderr}"


def outputs(tb, backend: str) -> str:
    """Every node app's output: stdout.log of a netns node, `docker logs` of a container."""
    if backend == "netns":
        return nw.node_outputs(tb)
    out = []
    client = dt.client()
    try:
        for name in NODES:
            try:
                text = client.containers.get(f"etb-{name}").logs(tail=30).decode(errors="replace")
            except Exception as e:  # noqa: BLE001 - diagnostics only
                text = f"({e})"
            out.append(f"--- {name}\n{text}")
    finally:
        client.close()
    return "\n".join(out)


def wait_state(node: str, want: str, timeout_s: float) -> dict:
    """/status until `node`'s state (its last heartbeat) is `want`; fails on 'error'."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = json.loads(curl("/status"))
        state = status["nodes"][node]["state"]
        if state == want:
            return status
        assert state != "error" and time.monotonic() < deadline, f"{node} is {state!r}: {status}"
        time.sleep(0.2)     # polling the controller's own status, with a deadline


@pytest.mark.parametrize("backend", ["netns", pytest.param("docker", marks=dt.need_docker())])
def test_own_app(tmp_path, backend):
    from dml_tool import splitter

    splitter.split(source="mnist-subset", out=str(tmp_path / "dataset"), train_parts=40, test_parts=10,
                   partition="iid", seed=1)
    shutil.copy(APP / "links.json", tmp_path / "links.json")
    tb = own_run.build(PORT, backend, dir_name=tmp_path, dataset=tmp_path / "dataset",
                       links=tmp_path / "links.json", subnet=SUBNETS[backend])
    tb.node_info_path = tmp_path / "node_info.json"
    conf, runs = tmp_path / "conf", tmp_path / "runs"
    t0 = time.monotonic()
    manager = tb.start(serve_forever=False, say=lambda m: None)    # returns once every app answers
    try:
        manager.conf_dir, manager.runs_dir = conf, runs
        agent = tb.embedded[0]
        nodes = agent.status()["nodes"]
        assert {n: (nodes[n]["kind"], nodes[n]["state"], nodes[n]["ready"]) for n in NODES} == \
            {n: (backend, "running", True) for n in NODES}

        # What the app sees, asked with the peer credential as another node would.
        peer = {"X-Testbed-Token": net.peer_token(tb.token)}     # EDGE_TB_PEER_TOKEN
        uid = pwd.getpwnam("edgetb-node").pw_uid
        for name in NODES:
            hi = requests.get(f"http://{tb.emulated[name].ip}:4444/hi", headers=peer, timeout=10).json()
            assert hi == {**hi, "name": name, "id": str(tb.emulated[name].id), "uid": uid, "cwd": CWD[backend],
                          "app_dir_writable": False, "log_dir": "/run/edgetb-node/log",
                          "torch_loaded": False}, hi    # exec'd, not forked from the zygote
        # The app checks its credentials: confs only with the node's own.
        n2 = f"http://{tb.emulated['n2'].ip}:4444"
        assert requests.post(f"{n2}/conf/dataset", json={}, timeout=10).status_code == 401
        assert requests.post(f"{n2}/conf/dataset", json={}, headers=peer, timeout=10).status_code == 403
        assert requests.get(f"{n2}/start", headers=peer, timeout=10).status_code == 403
        bad = {"X-Testbed-Token": tb.node_token("n3")}
        assert requests.post(f"{n2}/conf/dataset", json={}, headers=bad, timeout=10).status_code == 403

        # EdgeTB's workflow: conf tools, then curl.
        tool("dml_tool/dataset_conf.py", "-d", str(APP / "own_dataset.json"), "-o", str(conf))
        tool("dml_tool/fl_structure_conf.py", "-s", str(APP / "own_structure.json"), "-l", str(tmp_path / "links.json"),
             "-n", str(tmp_path / "node_info.json"), "-o", str(conf))
        assert json.loads(curl("/conf/dataset")) == {n: "ok" for n in NODES}
        assert json.loads(curl("/conf/structure")) == {n: "ok" for n in NODES}
        assert curl("/start?root=n1").strip() == "started n1"
        try:
            status = wait_state("n1", "done", 120)     # after /finish and its POST /log
        except AssertionError as e:
            raise AssertionError(f"{e}\n{outputs(tb, backend)}") from None
        assert status["finished"] and {status["nodes"][n]["state"] for n in ("n2", "n3")} == {"trained"}

        # One run folder: the summary, every node's log, the root's as it posted it.
        assert [p.name for p in runs.iterdir()] == [Path(status["run_dir"]).name]
        run_dir = Path(status["run_dir"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["algorithm"] == "own" and summary["rounds"] == 1 and summary["nodes"] == NODES
        assert summary["final_accuracy"] > 0.7, summary
        assert all(summary["bytes_sent"][n] > 50_000 for n in ("n2", "n3")), summary
        root_log = (run_dir / "n1.log").read_text()
        assert "Aggregate: accuracy=" in root_log and f"finish: run folder {run_dir}" in root_log, root_log
        assert all("Train: loss=" in (run_dir / f"{n}.log").read_text() for n in ("n2", "n3"))
        assert (run_dir / "accuracy.png").stat().st_size > 1000
        # The app's own files on the worker: its log dir is the node's run dir's log/.
        assert (Path(f"/run/edgetb/agent-{PORT + 1}/nodes/n1/log/n1.log")).read_text().strip() == root_log.strip()
        print(f"own app on {backend}: accuracy {summary['final_accuracy']}, {time.monotonic() - t0:.1f} s")
        assert json.loads(curl("/emulated/reset")) == {"emulator emu-own": {"removed": NODES}}
    finally:
        tb.close()
        manager.close()
    ah.assert_clean()

