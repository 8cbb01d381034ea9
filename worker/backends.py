"""Node backends: one interface, one implementation per kind of node, picked by kind.

    BACKENDS = {"netns": Netns, "docker": Docker, "physical": Physical}

The agent (worker/agent.py) checks requests, keeps state (its state file, recovery after
a crash), holds the locks, installs links and watches readiness; everything that differs
between kinds of node is here, behind the methods of `Backend`:

    check(specs, body) -> options       what this kind refuses (Refused, a 400), before anything is made
    ensure_network(emulator, iface)     an emulator's network (netns: a bridge; docker: a docker network)
    remove_network(name)
    create(specs, emulator, network, iface, options, deployed, then) -> [Node]   all or nothing;
                                        then(node) as soon as one is made (docker), or never
    start(node, env) / stop(node, timeout_s)                     the node's app
    kill(node) / pause(node) / resume(node) / restart(node, env, then)   faults:
                                        SIGKILL by cgroup (docker: kill), freeze/thaw (cgroup
                                        freezer; docker: pause/unpause), stop + start again
                                        with the same spec and credentials
    inspect(nodes) -> {name: {"state", ...}}                      what /status shows beside the agent's fields
    remove(nodes)                       everything of the nodes: app, namespace or container, cgroup, run dir
    namespace(node) -> (netns | None, dev)   where its links are shaped (worker/tc.py)
    address(node) -> (ip, port)         where its app answers, seen from the agent (readiness)
    running(node) -> bool | None        cheap: is its app still running (None: not known)
    usage(node) -> {"cpu_ns", "mem_bytes"}   cheap: what its app uses now (its cgroup; docker: the container's)
    sweep() -> [what went]              what a crashed predecessor made without recording it

Like Mininet's `Mininet(host=..., link=...)` the agent is handed classes; like
Containernet's `Docker(Host)`, docker nodes differ from netns nodes in how they are made
and how their namespace is found (the container's, attached as `etb-<node>`), not in how
links are shaped: every kind hands traffic control the same (netns name or None, device).
netns and physical nodes run their app through worker.nodes.Runner; docker nodes through
their container (worker/docker_nodes.py).
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dml_app import bounded_input
from worker import docker_nodes as dn
from worker import image
from worker import nodes as nb
from worker import tc
from worker import cgroups
from worker.cgroups import Cgroup, CgroupError


STOP_PARALLEL = 16          # apps stopped at once


class Refused(ValueError):
    """A request this kind of node cannot serve (the agent answers 400 with the message)."""


@dataclass
class Host:
    """What the agent lends its backends."""
    state_dir: Path                                  # node run dirs under state_dir/nodes
    agent_id: str                                    # labels docker objects (the state dir)
    port: int
    node_env: Callable[[nb.NodeSpec], dict]          # a node's credentials
    runner: nb.Runner                                # apps of netns and physical nodes

    @property
    def rundir_base(self) -> Path:
        return self.state_dir / "nodes"


class Backend:
    """The interface (see the module's docstring); a kind overrides what differs."""
    kind = ""
    emulated = True          # deployed through /emulated/deploy, on a network per emulator
    state_key = ""           # emulated: under which key the agent's state file keeps its networks
    gpus = False             # may be given GPUs

    def __init__(self, host: Host):
        self.host = host

    def check(self, specs: list[nb.NodeSpec], body: dict) -> dict:
        return {}

    def ensure_network(self, emulator: str, iface: ipaddress.IPv4Interface) -> str:
        raise NotImplementedError

    def remove_network(self, name: str) -> None:
        raise NotImplementedError

    def create(self, specs: list[nb.NodeSpec], *, emulator: str | None, network: str | None,
               iface: ipaddress.IPv4Interface | None, options: dict, deployed: list[nb.Node],
               then: Callable[[nb.Node], None] | None = None) -> list[nb.Node]:
        """The nodes, all or none. A backend that makes nodes one at a time may call
        then(node) (from any thread) as soon as one is made: the agent installs its links
        and starts its app there; nodes it was not called for the agent does after."""
        raise NotImplementedError

    def start(self, node: nb.Node, env: dict) -> None:
        self.host.runner.start(node, env)

    def stop(self, node: nb.Node, timeout_s: float = 5.0) -> None:
        Cgroup(node.spec.name).thaw_quietly()    # a paused app would ignore even SIGKILL (v1)
        self.host.runner.stop(node, timeout_s)

    # -------------------------------------------------------------- faults
    def _app_group(self, node: nb.Node) -> Cgroup:
        cg = Cgroup(node.spec.name)
        if node.state not in ("running", "paused") or not cg.exists():
            raise nb.NodeError(f"node {node.spec.name} has no app running (state {node.state})")
        return cg

    def kill(self, node: nb.Node) -> None:
        """SIGKILL every process of the node's app at once (its cgroup), as a crash would:
        no SIGTERM, no handler. The group stays (stop/reset remove it); /status says exited."""
        if not self._app_group(node).kill_now():
            raise nb.NodeError(f"node {node.spec.name}: processes left after SIGKILL")
        node.state = "running"      # what ran; inspect() says exited now that nothing is alive

    def pause(self, node: nb.Node) -> None:
        """Freeze the node's app (cgroup freezer): its processes stop where they are."""
        cg = self._app_group(node)
        if self.running(node) is False:
            raise nb.NodeError(f"node {node.spec.name}: its app has exited")
        try:
            cg.freeze(True)
        except CgroupError as e:
            raise nb.NodeError(f"node {node.spec.name}: pause: {e}") from None
        node.state = "paused"

    def resume(self, node: nb.Node) -> None:
        if node.state != "paused":
            raise nb.NodeError(f"node {node.spec.name} is not paused (state {node.state})")
        try:
            Cgroup(node.spec.name).freeze(False)
        except CgroupError as e:
            raise nb.NodeError(f"node {node.spec.name}: resume: {e}") from None
        node.state = "running"

    def restart(self, node: nb.Node, env: dict, then: Callable[[nb.Node], None] | None = None) -> None:
        """The app again, same node, same spec and credentials (stop, then start: a runtime
        role forks from the zygote again). then(node) before the app starts, where the
        node's namespace changed (docker) and its links must go in again; netns and
        physical nodes keep theirs."""
        if not node.spec.cmd:
            raise nb.NodeError(f"node {node.spec.name} has no app to restart")
        self.stop(node)
        self.start(node, env)

    def stop_many(self, nodes: list[nb.Node]) -> None:
        """stop() for many, in parallel: each may take its SIGTERM grace period."""
        if nodes:
            with ThreadPoolExecutor(min(STOP_PARALLEL, len(nodes))) as ex:
                list(ex.map(self.stop, nodes))

    def inspect(self, nodes: list[nb.Node]) -> dict[str, dict]:
        return {n.spec.name: {"state": "exited" if self.host.runner.alive(n.spec.name) is False else n.state,
                              **box(n)} for n in nodes}

    def remove(self, nodes: list[nb.Node]) -> None:
        raise NotImplementedError

    def namespace(self, node: nb.Node) -> tuple[str | None, str]:
        return node.netns, node.dev

    def address(self, node: nb.Node) -> tuple[str, int]:
        return node.spec.ip, node.spec.port

    def running(self, node: nb.Node) -> bool | None:
        return self.host.runner.alive(node.spec.name)

    def deployed(self, node: nb.Node) -> dict:
        """What the deploy answer says of a node beside its link count."""
        return {}

    def usage(self, node: nb.Node) -> dict:
        """cpu time and memory its app uses now: {'cpu_ns', 'mem_bytes'} (None: unknown);
        from the node's cgroup (worker/cgroups.py), cheap enough to read every second."""
        return Cgroup(node.spec.name).usage()

    def sweep(self) -> list[str]:
        return []


def box(node: nb.Node) -> dict:
    """What /status shows of a netns or physical node's limits: "box" as the kernel
    enforces them (its cgroup: cpu, memory, swap beyond memory, pids; None where this
    kernel has no such limit) with its run dir's size and use, IPC namespace and
    seccomp filter; "box_hits", a line per limit the node ran into (pids.max refused a
    fork, its run dir is full)."""
    s = node.spec
    cg = Cgroup(s.name).box()
    out = {"cpu": s.cpu, "memory_bytes": cg.get("memory_bytes", s.ram_mb << 20),
           "swap_bytes": cg.get("swap_bytes"), "pids_max": cg.get("pids_max", s.pids),
           "pids_current": cg.get("pids_current"), "log_bytes": s.log_mb << 20, "log_used_bytes": None,
           "own_ipc_namespace": not s.root, "seccomp": not s.root}
    hits = []
    if cg.get("pids_max_hits"):
        hits.append(f"pids.max {out['pids_max']} reached: {cg['pids_max_hits']} fork(s) refused")
    try:
        if os.path.ismount(node.rundir):
            st = os.statvfs(node.rundir)
            out["log_bytes"] = st.f_blocks * st.f_frsize
            out["log_used_bytes"] = (st.f_blocks - st.f_bfree) * st.f_frsize
            if st.f_bavail * st.f_frsize < 64 * 1024:
                hits.append(f"run dir full: its log size {out['log_bytes'] >> 20} MiB is used up")
    except OSError:
        pass
    return {"box": out, "box_hits": hits}


class Netns(Backend):
    """A network namespace on the emulator's bridge (worker/nodes.py), app by the Runner."""
    kind = "netns"
    state_key = "bridges"

    def ensure_network(self, emulator, iface):
        name = nb.bridge_name(emulator)
        nb.ensure_bridge(name, str(iface))
        return name

    def remove_network(self, name):
        nb.remove_bridge(name)

    def create(self, specs, *, emulator, network, iface, options, deployed, then=None):
        return nb.create_netns_nodes(specs, network, iface.network.prefixlen, str(iface.ip),
                                     self.host.rundir_base)

    def remove(self, nodes):
        self.stop_many(nodes)
        for n in nodes:
            nb.remove_netns_node(n)
            Cgroup(n.spec.name).remove()


class Physical(Backend):
    """The agent's own host: links on the named NIC, the app by the Runner."""
    kind = "physical"
    emulated = False

    def check(self, specs, body):
        nb.check_users(specs)
        for s in specs:
            if not s.nic or not nb.link_exists(s.nic):
                raise Refused(f"physical node {s.name}: no NIC {s.nic!r} on this worker")
        return {}

    def create(self, specs, *, emulator, network, iface, options, deployed, then=None):
        made = []
        for s in specs:
            n = nb.Node(spec=s, kind="physical", netns=None, dev=s.nic,
                        rundir=str(self.host.rundir_base / s.name))
            made.append(n)
            try:
                nb.secure_dir(n.rundir, 0o700)
                nb.mount_rundir(n.rundir, s.log_mb)
            except Exception:
                self.remove(made)
                raise
        return made

    def remove(self, nodes):
        self.stop_many(nodes)
        for n in nodes:
            try:
                tc.clear(None, n.dev)
            except Exception as e:  # the NIC may be gone; say so, keep cleaning
                print(f"agent: clearing tc on {n.dev}: {e}", file=sys.stderr)
            nb.remove_rundir(n.rundir)
            Cgroup(n.spec.name).remove()

    def address(self, node):
        # The app serves on all the host's addresses: loopback reaches it whatever its NIC.
        return "127.0.0.1", node.spec.port


class Docker(Backend):
    """A container on the emulator's docker network (worker/docker_nodes.py); its namespace
    attached as etb-<node>; its app is the container's command, behind a gate."""
    kind = "docker"
    state_key = "networks"
    gpus = True

    def __init__(self, host: Host):
        super().__init__(host)
        self._client = None
        self.runner = dn.DockerRunner(self.client)

    def client(self):
        """The Docker SDK client (made on first use); NodeError when no daemon answers."""
        if self._client is None:
            try:
                self._client = image.client(timeout_s=120)
            except image.NoDocker as e:
                raise nb.NodeError(str(e)) from None
        return self._client

    def labels(self, **more) -> dict:
        return dn.labels(self.host.agent_id, self.host.port, **more)

    def check(self, specs, body):
        missing = [s.name for s in specs if not s.image]
        if missing:
            raise Refused(f"docker nodes need an image: none given for {', '.join(missing)}")
        try:
            cpu = bounded_input.number(body["cpu"], "emulator cpu", 0, 1024, lo_open=True) if body.get("cpu") else None
            return {"cores": dn.emulator_cores(cpu)}
        except (TypeError, ValueError) as e:
            raise Refused(f"bad emulator cpu: {e}") from None

    def ensure_network(self, emulator, iface):
        return dn.ensure_network(self.client(), emulator, str(iface.network), str(iface.ip), self.labels())

    def remove_network(self, name):
        try:
            dn.remove_network(self.client(), name, self.host.agent_id)
        except nb.NodeError as e:   # no daemon: say so, keep cleaning
            print(f"agent: removing docker network {name}: {e}", file=sys.stderr)

    def create(self, specs, *, emulator, network, iface, options, deployed, then=None):
        return dn.create_nodes(self.client(), specs, network=network, rundir_base=self.host.rundir_base,
                               lab=self.labels(emulator=emulator), cores=options["cores"],
                               load=dn.cpuset_load(deployed), extra_env=self.host.node_env, then=then)

    def start(self, node, env):
        self.runner.start(node, env)        # its environment was set at create

    def stop(self, node, timeout_s=dn.STOP_TIMEOUT_S):
        if node.state == "paused":
            self.resume(node)               # docker refuses to stop a paused container
        self.runner.stop(node, timeout_s)

    def _container(self, node):
        errors = dn._docker_errors()
        try:
            return self.client().containers.get(node.container or dn.container_name(node.spec.name))
        except errors.NotFound:
            raise nb.NodeError(f"node {node.spec.name}: its container is gone") from None

    def _docker(self, node, what: str, fn):
        errors = dn._docker_errors()
        try:
            return fn(self._container(node))
        except errors.DockerException as e:
            raise nb.NodeError(f"node {node.spec.name}: docker {what}: {dn._explain(e)}") from None

    def kill(self, node):
        if node.state not in ("running", "paused"):
            raise nb.NodeError(f"node {node.spec.name} has no app running (state {node.state})")
        self._docker(node, "kill", lambda c: c.kill())       # SIGKILL to its init: everything goes
        node.state = "running"                               # inspect() says exited

    def pause(self, node):
        if node.state != "running" or self.running(node) is False:
            raise nb.NodeError(f"node {node.spec.name} has no app running (state {node.state})")
        self._docker(node, "pause", lambda c: c.pause())     # the daemon's freezer
        node.state = "paused"

    def resume(self, node):
        if node.state != "paused":
            raise nb.NodeError(f"node {node.spec.name} is not paused (state {node.state})")
        self._docker(node, "unpause", lambda c: c.unpause())
        node.state = "running"

    def restart(self, node, env, then=None):
        """Stop the container and start it again: its command waits at the gate again, in a
        new network namespace, which is attached as etb-<node> again; then(node) puts its
        links back before the gate opens."""
        self.stop(node)

        def again(c):
            c.start()
            c.reload()
            return c.attrs["State"]["Pid"]
        pid = self._docker(node, "start", again)
        if not pid:
            raise nb.NodeError(f"node {node.spec.name}: container exited at once after restart")
        subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)
        p = subprocess.run(["ip", "netns", "attach", node.netns, str(pid)], capture_output=True, text=True)
        if p.returncode != 0:
            raise nb.NodeError(f"node {node.spec.name}: ip netns attach {node.netns} {pid}: {p.stderr.strip()}")
        node.pid = pid
        if then is not None:
            then(node)
        self.start(node, env)

    def inspect(self, nodes):
        try:
            seen = dn.inspect_many(self.client(), nodes, self.host.agent_id)
        except nb.NodeError:
            seen = {}
        out = {}
        for n in nodes:
            info = seen.get(n.spec.name)
            st = {"state": "gone"} if info is None else {
                "state": n.state if info["status"] == "running"
                else "exited" if info["status"] in ("exited", "dead") else info["status"]}
            st.update(container=n.container, cpuset=n.cpuset, host_port=n.host_port, image=n.spec.image,
                      health=info and info["health"], box=dn.box(n))
            out[n.spec.name] = st
        return out

    def remove(self, nodes):
        if not nodes:
            return
        try:
            client = self.client()
        except nb.NodeError as e:   # netns names and run dirs still go
            print(f"agent: removing {len(nodes)} container(s): {e}", file=sys.stderr)
            client = None
        dn.remove_nodes(client, nodes, self.host.agent_id)

    def running(self, node):
        return dn.init_alive(node)

    def deployed(self, node):
        return {"container": node.container, "cpuset": node.cpuset, "host_port": node.host_port}

    def usage(self, node):
        # The container's cgroup (the runtime's, found from its init's /proc/<pid>/cgroup),
        # not the daemon's stats API (a second per call).
        if not node.pid or self.running(node) is False:
            return {"cpu_ns": None, "mem_bytes": None}
        return cgroups.pid_usage(node.pid)

    def sweep(self):
        """Containers, networks and volumes with this agent's label that no record names
        (a predecessor died between making and saving them). Quiet without a daemon."""
        if self._client is None and not image.daemon_answers():
            return []
        try:
            return dn.sweep(self.client(), self.host.agent_id)
        except Exception as e:  # noqa: BLE001 - a reset keeps going, and says why
            print(f"agent: docker sweep: {e}", file=sys.stderr)
            return []


BACKENDS: dict[str, type[Backend]] = {"netns": Netns, "docker": Docker, "physical": Physical}
