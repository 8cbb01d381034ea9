"""EdgeTB's testbed object: the definition (controller/topology.py) with its deployment
(controller/deploy.py) and the controller's HTTP API (a manager class) put together.

A Testbed is plain data until `start()`: emulators, emulated and physical nodes, shared
folders and links, added with EdgeTB's method names. `validate()` checks all of it at
once and raises DefinitionError naming the file and key of every problem; nothing is
deployed unless it passes. `start()` then serves the manager, asks every worker's agent
to build its part (controller/agents.py is the one way to an agent), prints `tc finish`
and waits until every app answers on its DML port; if anything fails, everything
deployed is removed and the error names the worker or the node.

The names run scripts and tests import from here stay here: Testbed, default_testbed,
single_machine, ROOT, DefinitionError, DeployError, NotReady, fan_out, call_once, ...
"""
from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

from controller import share, stopping
from controller.agents import (CONNECT_RETRIES, FANOUT, Agents, call_once, fan_out,  # noqa: F401
                               not_sent)
from controller.deploy import (APP_ENDED, READY_BASE_S, READY_PER_NODE_S, READY_POLL_S,  # noqa: F401
                               READY_SHOW_S, Deployer, DeployError, NotReady, ctl_address)
from controller.topology import (BACKENDS, DEFAULT_NODE_PORT, DEFAULT_SUBNET, LOG_MB_RANGE,  # noqa: F401
                                 MAX_CPU, MAX_RAM_MB, PIDS_RANGE, DefinitionError, EmulatedNode,
                                 Emulator, Nfs, PhysicalNode, Topology, Volume)
from testbed_core import credentials

ROOT = Path(__file__).resolve().parents[1]


class _Kept:
    """A setting of the testbed that one of its parts keeps (`part`: a function from the
    testbed to it, `name`: the part's attribute, by default the same), read and set
    through the testbed."""

    def __init__(self, part, name: str | None = None):
        self.part, self.name = part, name

    def __set_name__(self, owner, name):
        self.name = self.name or name

    def __get__(self, tb, owner=None):
        return self if tb is None else getattr(self.part(tb), self.name)

    def __set__(self, tb, value):
        setattr(self.part(tb), self.name, value)


class Testbed(Topology):
    """EdgeTB's testbed object: add_* the parts, load_link, then start()."""

    __test__ = False  # not a pytest class

    # Kept by the deployer and its readiness waiter (controller/deploy.py says what each means).
    launcher = _Kept(lambda tb: tb.deployer)
    share_mode = _Kept(lambda tb: tb.deployer)
    embedded = _Kept(lambda tb: tb.deployer)
    ready_timeout_s = _Kept(lambda tb: tb.deployer.ready, "timeout_s")
    wait_for_apps = _Kept(lambda tb: tb.deployer.ready)

    def __init__(self, ip: str, dir_name: str, manager_class=None, host_port: int = 3333,
                 node_port: int = DEFAULT_NODE_PORT, token: str | None = None,
                 allowed_hosts=()):
        super().__init__(ip, dir_name, node_port)
        # The controller's port; 0 picks a free one, which start() keeps once it serves.
        self.host_port = host_port
        # The admin token: opens the controller and every agent (docs/security.md).
        self.token = token or secrets.token_hex(16)
        # Names besides this machine's own that requests may give as Host (e.g. a DNS
        # name users reach the controller by).
        self.allowed_hosts = tuple(str(h).lower() for h in allowed_hosts)
        self.manager_class = manager_class
        self.manager = None
        self.node_info_path = ROOT / "node_info.json"
        self.share_store = share.Store()      # folders served on GET /share/<sha256>
        self.exports = share.Exports()        # folders exported over NFS
        self.deployer = Deployer(self, self.token, share_store=self.share_store, exports=self.exports)

    def node_token(self, name: str) -> str:
        """The credential node `name` and the controller use with each other."""
        return credentials.node_token(self.token, name)

    # ------------------------------------------------------------------ read-only views
    @property
    def agents(self) -> Agents:
        """Every worker's agent client, and which nodes each deployed."""
        return self.deployer.agents

    @property
    def deployed(self) -> dict[str, dict]:
        """{worker label: {"addr", "kind", "answer"}} of the deployed workers (a copy)."""
        return self.deployer.agents.answers()

    @property
    def ready_names(self) -> set[str]:
        """Apps seen answering on their DML port since the last deploy (a copy)."""
        return self.deployer.ready.answering()

    def ctl_address(self, emu: Emulator | None) -> str:
        """The controller as the nodes of `emu` see it (deploy.ctl_address)."""
        return ctl_address(self, emu, self.host_port)

    # ------------------------------------------------------------------ deploy
    def write_node_info(self) -> Path:
        path = Path(self.node_info_path)
        path.write_text(json.dumps(self.node_info(), indent=2) + "\n")
        return path

    def deploy(self, say=print) -> None:
        """Validate, then build every worker's part in parallel; all or nothing."""
        self.validate()
        self.assign_addresses()
        self.write_node_info()
        self.deployer.ensure_embedded_agent(self.host_port + 1)
        self.deployer.deploy(say, host_port=self.host_port,
                             serving=self.manager is not None and self.manager.server is not None)

    def wait_ready(self, names=None, *, say=None, deadline: float | None = None) -> None:
        """Wait until the apps of `names` (default all) answer (deploy.Readiness.wait)."""
        self.deployer.ready.wait(names, say=say, deadline=deadline)

    def ready_deadline_s(self) -> float:
        return self.deployer.ready.deadline_s()

    def forget_ready(self, names=None) -> None:
        """Apps `names` (default all) answer no more: waits wait for them again."""
        self.deployer.ready.forget(names)

    def reset(self, say=print, kinds=("emulated", "physical")) -> list[str]:
        """Ask every worker to remove what it made; returns problems (workers unreachable)."""
        return self.deployer.reset(say, kinds)

    def close(self) -> None:
        """Reset everything, unexport the NFS shares and stop the embedded agent."""
        self.reset(say=lambda m: print(m, file=sys.stderr))
        self.exports.unexport_all()
        self.deployer.close_embedded()

    # ------------------------------------------------------------------ start
    def start(self, *, serve_forever: bool = True, say=print):
        """Deploy, serve the manager on host_port, print `tc finish`; EdgeTB's start()."""
        if self.manager_class is None:
            raise DeployError("no manager_class given to the testbed")
        self.validate()
        self.manager = self.manager_class(self)
        self.manager.serve()
        self.host_port = self.manager.server.port      # the port it got when host_port was 0
        show = (lambda m: print(m, flush=True)) if say is print else say  # noqa: E731
        deployed = False
        try:
            # Ctrl-C or SIGTERM while deploying or waiting: everything made is removed.
            with stopping.stop_on_signals(stopping.interrupt):
                self.deploy(say=say)
                deployed = True
                show("tc finish")
                self.wait_ready(say=show)
        except BaseException as e:
            with stopping.shielded():
                self.manager.close()
                self.close()
            if not deployed:
                raise
            if isinstance(e, NotReady):
                raise NotReady(f"{e}\neverything deployed was removed", e.not_answering, e.exited) from None
            raise
        if serve_forever:
            self.manager.wait_forever()
        return self.manager


def default_testbed(ip: str, dir_name: str, manager_class, host_port: int = 3333, **kw) -> Testbed:
    """A testbed whose controller is `ip` (EdgeTB's default_testbed)."""
    return Testbed(ip, dir_name, manager_class, host_port=host_port, **kw)


def single_machine(manager_class, roles: list[tuple[str, str]], *, port: int = 3333,
                   links: str = "links.json", cpu: float = 2, ram_gb: float = 6) -> Testbed:
    """The embedded default: one netns emulator on this machine, one node per
    (name, role script), dml_app/ and dataset/ shared at EdgeTB's node paths, the cpu
    split evenly between the nodes. Every run script builds its testbed this way."""
    testbed = default_testbed(ip="127.0.0.1", dir_name=str(ROOT), manager_class=manager_class, host_port=port)
    nfs_app = testbed.add_nfs(tag="dml_app", path=str(ROOT / "dml_app"))
    nfs_dataset = testbed.add_nfs(tag="dataset", path=str(ROOT / "dataset"))
    emu = testbed.add_emulator("emulator-1", "127.0.0.1", cpu=cpu, ram=ram_gb, unit="G")
    share = int(cpu * 1000 / max(1, len(roles))) / 1000   # rounded down: the sum must fit
    ram_mb = min(1024, int(ram_gb * 1024 / max(1, len(roles))))
    for name, role in roles:
        node = testbed.add_emulated_node(name, "/home/worker/dml_app", ["python3", role], "dml:v1.0",
                                         cpu=share, ram=ram_mb, unit="M", emulator=emu)
        node.mount_nfs(nfs_app, "/home/worker/dml_app")
        node.mount_nfs(nfs_dataset, "/home/worker/dataset")
    testbed.load_link(links)
    return testbed

