"""End-to-end helpers: a netns (or docker) testbed in this process, driven the way
`<alg>_run.py --auto` drives it.

The controller and its embedded agent run in the test process; the workflow (confs,
pushes, start, follow until /finish) is controller/auto.py's `drive`, the code --auto
runs. Used by the algorithms' workflow tests (test_fl_workflow.py, test_el_workflow.py,
test_ps_workflow.py, test_gl_workflow.py, test_ra_workflow.py, the docker and
multi-worker FL tests).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from controller import auto
from controller.testbed import Testbed
from dml_app import net
from tests.support import ROOT
from tests.support import agents as ah


def etb_namespaces() -> set[str]:
    return {n for n in ah.netns_list() if n.startswith("etb-")}


@contextmanager
def netns_testbed(tmp: Path, manager_class, roles: dict[str, str], links: dict, *, port: int,
                  subnet: str, cpu: float = 2.0, backend: str = "netns",
                  image: str = "", emulator: str | None = None,
                  ram_mb: int = 768, emu_ram_gb: float = 4,
                  launcher: str = "auto") -> Iterator[tuple[Testbed, object]]:
    """Deploy one node per {name: role script} on a netns emulator (or one of `backend`,
    nodes running `image`; named `emulator`, default emu-<algorithm>; `ram_mb` per node,
    the emulator has `emu_ram_gb`; apps started by the embedded agent's `launcher`) with
    `links`; yield (testbed, manager); remove every node and link afterwards, failed or not.
    Skips (tagged) where namespaces cannot be made."""
    from dml_tool import splitter

    why = ah.missing_requirements()
    if why:
        pytest.skip(why)                # why is tagged
    splitter.split(source="mnist-subset", out=str(tmp / "dataset"), train_parts=40, test_parts=10,
                   partition="iid", seed=1)
    (tmp / "links.json").write_text(json.dumps(links))
    tb = Testbed("127.0.0.1", str(tmp), manager_class, host_port=port)
    tb.node_info_path = tmp / "node_info.json"
    tb.launcher = launcher
    emu = tb.add_emulator(emulator or f"emu-{manager_class.algorithm}", "127.0.0.1", cpu=cpu, ram=emu_ram_gb, unit="G",
                          subnet=subnet, backend=backend)
    shares = {tag: tb.add_nfs(tag, str(path)) for tag, path in
              (("dml_app", ROOT / "dml_app"), ("dataset", tmp / "dataset"))}
    for name, role in roles.items():
        node = tb.add_emulated_node(name, "/home/worker/dml_app", ["python3", role],
                                    image, cpu=int(cpu * 1000 / len(roles)) / 1000, ram=ram_mb, unit="M", emulator=emu)
        for tag, share in shares.items():
            node.mount_nfs(share, f"/home/worker/{tag}")
    tb.load_link("links.json")
    manager = tb.start(serve_forever=False, say=lambda m: None)   # a failed start removes its part
    try:
        manager.conf_dir = tmp / "conf"
        manager.runs_dir = tmp / "runs"
        yield tb, manager
    finally:
        tb.close()          # nodes first, so no heartbeat arrives at a closing server
        manager.close()
    ah.assert_clean()       # nothing of the testbed remains, whoever's (one test at a time)


def run_workflow(tb: Testbed, manager, tmp: Path, *, alg: str, dataset: dict, structure: dict,
                 root: str | None, timeout_s: float, said: list | None = None) -> dict:
    """EdgeTB's workflow through controller/auto.py's `drive`, the --auto path itself:
    tmp/<alg>_dataset.json and tmp/<alg>_structure.json written from `dataset` and
    `structure`, their confs written by the conf tools into manager.conf_dir, both pushed,
    /start?root= (every node when `root` is None), followed until /finish; returns the
    run's summary. What drive says is appended to `said` when given. A failure shows the
    end of every node app's output."""
    (tmp / f"{alg}_dataset.json").write_text(json.dumps(dataset))
    (tmp / f"{alg}_structure.json").write_text(json.dumps(structure))
    lines = said if said is not None else []
    try:
        return auto.drive(tb, manager, root=root, dataset_json=tmp / f"{alg}_dataset.json", timeout_s=timeout_s,
                          write_structure=auto.structure_writer(f"{alg}_structure_conf", tmp / f"{alg}_structure.json",
                                                                tb, manager.conf_dir), say=lines.append)
    except (RuntimeError, TimeoutError, net.HttpError) as e:
        raise AssertionError(f"{e}\nsaid: {lines}\n{node_outputs(tb)}") from e


def node_outputs(tb: Testbed, tail_chars: int = 1500) -> str:
    """The end of every node app's stdout.log (where the embedded agent keeps it)."""
    out = []
    for name in tb.all_nodes():
        path = Path(f"/run/edgetb/agent-{tb.host_port + 1}/nodes/{name}/stdout.log")
        text = path.read_text(errors="replace")[-tail_chars:] if path.exists() else "(no stdout.log)"
        out.append(f"--- {name}\n{text}")
    return "\n".join(out)
