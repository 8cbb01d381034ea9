"""A controller manager over real role processes on loopback (no namespaces, no links).

The gossip and ring all-reduce tests run their real manager class (GlManager,
RaManager) against real node processes: heartbeats, conf pushes, /start, the driver and
the log collection all go over HTTP, as on a deployed testbed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from dml_app import net  # dml_app/net.py
from dml_tool import splitter  # dml_tool/splitter.py
from controller.testbed import Testbed
from tests.support.procs import ROOT, TOKEN, NodeProc, free_port
from tests.support.workflow import etb_namespaces, netns_testbed  # noqa: F401


@contextmanager
def loopback_run(manager_class, role: str | dict[str, str], names: list[str], work: Path,
                 dataset_dir: Path) -> Iterator[tuple[object, dict[str, NodeProc]]]:
    """Start one `role` process per name (or role[name]) and a `manager_class` serving as their controller;
    writes work/node_info.json (the testbed, manager.tb, reads it and work/links.json, which
    the test writes). Drive the run with workflow.run_workflow(manager.tb, manager, ...).
    Everything is stopped on exit, failed or not."""
    ctl_port = free_port()
    procs: dict[str, NodeProc] = {}
    manager = None
    try:
        for name in names:
            # The credentials an agent would give them (derived from the admin token).
            procs[name] = NodeProc(role if isinstance(role, str) else role[name], name, log_dir=work / "log", dataset_dir=dataset_dir,
                                   ctl_address=f"127.0.0.1:{ctl_port}",
                                   token=net.node_token(TOKEN, name), peer_token=net.peer_token(TOKEN))
        tb = Testbed("127.0.0.1", str(work), manager_class, host_port=ctl_port, token=TOKEN)
        tb.node_info_path, tb.links_file = work / "node_info.json", str(work / "links.json")
        for p in procs.values():
            node = tb.add_emulated_node(p.name, "/home/worker/dml_app", ["python3", f"{p.role}.py"])
            node.ip, node.port = "127.0.0.1", p.port
        (work / "node_info.json").write_text(json.dumps({
            "emulator": {}, "physical_node": {},
            "emulated_node": {p.name: {"ip": "127.0.0.1", "port": p.port, "emulator": "lo"}
                              for p in procs.values()}}))
        manager = manager_class(tb)
        manager.conf_dir = work / "conf"
        manager.runs_dir = work / "runs"
        manager.serve()
        for p in procs.values():
            p.wait_ready(timeout_s=60)
        yield manager, procs
    finally:
        for p in procs.values():
            p.stop()
        if manager is not None:
            manager.close()


@contextmanager
def ra_node(work: Path, name: str):
    """One ra_peer in-process (no server): (runtime, RaPeer, Flask test client) on a tiny
    dataset in work/ds; closed, and torch's thread count put back, on exit."""
    import torch
    from dml_app.ra_peer import RaPeer
    from dml_app.runtime import Runtime

    threads = torch.get_num_threads()
    tiny_dataset(work / "ds", num_classes=10)
    rt = Runtime("ra_peer", env={"NET_NODE_NAME": name, "EDGE_TB_TOKEN": TOKEN, "DML_PORT": "0",
                                 "DML_LOG_DIR": str(work / "log"), "DML_DATASET_DIR": str(work / "ds")})
    peer = RaPeer(rt)
    try:
        yield rt, peer, rt.app.test_client()
    finally:
        rt.close()
        torch.set_num_threads(threads)


def tiny_dataset(root: Path, *, num_classes: int, samples: int = 12) -> Path:
    """One train and one test part of random images, written by splitter.write_dataset."""
    rng = np.random.default_rng(num_classes)
    data = {}
    for split in ("train", "test"):
        x = rng.random((samples, 1, 28, 28), dtype=np.float32)
        data[split] = (x, rng.integers(0, num_classes, samples), [np.arange(samples)])
    splitter.write_dataset(str(root), name=f"mnist-random-{num_classes}", num_classes=num_classes, **data)
    return root


def netns_run(manager_class, role: str, names: list[str], work: Path, *, links: dict,
              port: int, subnet: str, emulator: str):
    """A deployed testbed on this machine: one netns node per name running `role`, the
    in-process controller on `port` (its embedded agent on port + 1); see
    workflow.netns_testbed, which does the work."""
    return netns_testbed(work, manager_class, {n: f"{role}.py" for n in names}, links,
                         port=port, subnet=subnet, emulator=emulator)


def run_tools(work: Path, alg: str, structure: dict, datasets: dict) -> None:
    """The conf tools as a user runs them (CLI processes) on <alg>_structure.json and
    <alg>_dataset.json written to `work`; the confs go to work/conf."""
    for name, obj in ((f"{alg}_structure.json", structure), (f"{alg}_dataset.json", datasets)):
        (work / name).write_text(json.dumps(obj))
    for argv in (["dml_tool/dataset_conf.py", "-d", str(work / f"{alg}_dataset.json"), "-o", str(work / "conf")],
                 [f"dml_tool/{alg}_structure_conf.py", "-s", str(work / f"{alg}_structure.json"),
                  "-l", str(work / "links.json"), "-n", str(work / "node_info.json"), "-o", str(work / "conf")]):
        p = subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr


def node_addrs(names: list[str]) -> dict:
    """{name: conf_utils.NodeAddr} at 10.0.0.2, .3, ... port 4444, and node_info.json's form."""
    from dml_tool import conf_utils as cu

    info = {"emulated_node": {n: {"ip": f"10.0.0.{i + 2}", "port": 4444, "emulator": "e"}
                              for i, n in enumerate(names)}}
    return {n: cu.NodeAddr(n, e["ip"], e["port"], "emulated") for n, e in info["emulated_node"].items()}, info


def link_dests(links: dict) -> dict[str, list[str]]:
    """links.json's {src: [{"dest": ...}]} as the conf tools hold it: {src: [dest, ...]}."""
    return {src: [link["dest"] for link in lst] for src, lst in links.items()}


def shipped_confs(conf_tool, alg: str, work: Path, names: list[str]) -> dict[str, dict]:
    """What `conf_tool` writes for the shipped dml_tool/<alg>_structure.json on the shipped
    links.json, the nodes `names` at node_addrs() addresses: {node: structure conf}."""
    (work / "node_info.json").write_text(json.dumps(node_addrs(names)[1]))
    paths = conf_tool.write_confs(str(ROOT / "dml_tool" / f"{alg}_structure.json"), str(ROOT / "links.json"),
                                  str(work / "node_info.json"), str(work / "out"))
    return {Path(p).name.split("_")[0]: json.loads(Path(p).read_text()) for p in paths}
