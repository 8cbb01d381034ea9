"""Building a validated topology on the workers, waiting for its apps, removing it.

`Deployer.deploy()` asks every worker's agent (controller/agents.py) to build its part,
at most FANOUT at once, printing one line per worker as it comes up; the caller prints
`tc finish` when it returns (every agent has read its links back from the kernel). If
any worker fails, what was already deployed elsewhere is removed and the error names
that worker. `Readiness.wait()` then waits until every node's app answers on its DML port
(each agent's `GET /status` says `ready`), printing `apps answering: k/N` while it waits,
with a deadline that grows with the node count (`ready_timeout_s`); a node that did not
answer or whose app exited is named (NotReady). `reset()` asks every worker to remove
what it made.

Workers whose emulator names no agent port are run by the controller itself: the
deployer starts that embedded agent (worker/agent.py) on the controller's port + 1 and
calls it in process (agents.LocalAgent). Folders shared with workers that are not this
machine go over NFS (share.Exports) or HTTP (share.Store), as controller/share.py decides.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from controller import share
from controller.agents import FANOUT, Agents, AgentClient, HttpAgent, LocalAgent, fan_out
from controller.topology import Emulator, PhysicalNode, Topology, Volume, _Node
from dml_app import net

READY_BASE_S = 30.0         # the readiness deadline: READY_BASE_S + READY_PER_NODE_S per app
READY_PER_NODE_S = 0.5
READY_POLL_S = 0.5          # how often every agent's /status is read while waiting
READY_SHOW_S = 2.0          # at most one `apps answering: k/N` line this often
APP_ENDED = ("exited", "dead", "gone", "stopped")   # agent states of an app that will not answer
EMBEDDED_THREADS = 16       # the embedded agent's server threads (nodes call it)


class DeployError(RuntimeError):
    pass


class NotReady(DeployError):
    """Apps that did not answer on their DML port by the readiness deadline, or exited
    first; `not_answering` and `exited` name them."""

    def __init__(self, message: str, not_answering: list[str], exited: list[str]):
        self.not_answering, self.exited = not_answering, exited
        super().__init__(message)


def _tcp_open(ip: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ip:port (for an agent whose /status
    does not say `ready`)."""
    try:
        with socket.create_connection((ip, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def ctl_address(topo: Topology, emu: Emulator | None, host_port: int) -> str:
    """The controller as the nodes of `emu` see it (their NET_CTL_ADDRESS): the gateway
    of their bridge when the controller's embedded agent runs them, else the controller's
    ip; physical nodes (emu None) use its ip."""
    if emu is not None and emu.agent_port is None:
        return f"{emu.gateway}:{host_port}"
    return f"{topo.ip}:{host_port}"


def node_body(n: _Node, ctl: str, agent: str, shares: dict | None = None) -> dict:
    """Node `n` as an agent's deploy takes it; `ctl` and `agent` the addresses its app
    calls the controller and its agent at. `shares`: for a worker that is not this
    machine, {nfs tag: volume source} (controller/share.py); its nodes get those instead
    of the controller's paths."""
    def volume(v: Volume) -> dict:
        if shares is not None and v.nfs in shares:
            return {**shares[v.nfs], "node": v.node, "ro": v.ro}
        return {"host": v.host, "node": v.node, "ro": v.ro}
    body = {"name": n.name, "id": n.id, "ip": n.ip, "port": n.port,
            "cpu": getattr(n, "cpu", 1.0), "ram_mb": getattr(n, "ram_mb", 1024),
            "cmd": n.cmd, "working_dir": n.working_dir,
            "volumes": [volume(v) for v in n.volumes],
            "nic": getattr(n, "nic", None), "image": getattr(n, "image", ""),
            "env": {**n.env, "EDGE_TB_ID": str(n.id), "NET_NODE_NAME": n.name,
                    "DML_PORT": str(n.port), "NET_CTL_ADDRESS": ctl, "NET_AGENT_ADDRESS": agent}}
    if getattr(n, "gpu", 0):
        body["gpu"] = n.gpu
    for key in ("pids", "log_mb"):
        if getattr(n, key, None) is not None:
            body[key] = getattr(n, key)
    if n.root:
        body["root"] = True
    return body


class Readiness:
    """Waiting until the deployed apps answer on their DML port, as their agents'
    `GET /status` says (`ready`), with a deadline; the apps seen answering are kept until
    they are forgotten (a stop, a restart, a reset). `local_port`: the port of the
    controller's own agent, None when it runs none (its nodes' output can be quoted)."""

    def __init__(self, topo: Topology, agents: Agents, local_port: Callable[[], int | None]):
        self.topo, self.agents, self._local_port = topo, agents, local_port
        # ready_timeout_s (Testbed): the deadline after `tc finish`, None for READY_BASE_S
        # + READY_PER_NODE_S per app; wait_for_apps=False: do not wait (EdgeTB's behaviour).
        self.timeout_s: float | None = None
        self.wait_for_apps = True
        self._answering: set[str] = set()          # apps seen answering since the last deploy
        self._deadline: float | None = None   # time.monotonic() of this deployment's deadline
        self._lock = threading.Lock()

    def begin(self) -> None:
        """A deployment is done: its deadline starts now."""
        self._deadline = time.monotonic() + self.deadline_s()

    def clear(self) -> None:
        """Everything was removed: no app answers, no deadline runs."""
        self.forget()
        self._deadline = None

    def deadline_s(self) -> float:
        """Seconds after `tc finish` that apps have to answer: ready_timeout_s, or
        READY_BASE_S + READY_PER_NODE_S for every node that runs an app."""
        if self.timeout_s is not None:
            return float(self.timeout_s)
        return READY_BASE_S + READY_PER_NODE_S * sum(1 for n in self.topo.all_nodes().values() if n.cmd)

    def answering(self) -> set[str]:
        """The apps seen answering since the last deploy (a copy)."""
        with self._lock:
            return set(self._answering)

    def forget(self, names=None) -> None:
        """Apps `names` (default all) answer no more (stopped, restarted, removed): the
        next wait waits for them again."""
        with self._lock:
            if names is None:
                self._answering.clear()
            else:
                self._answering.difference_update(names)

    def _app_places(self, names=None) -> dict[str, AgentClient]:
        """{node: its worker} of the deployed nodes that run an app."""
        nodes = self.topo.all_nodes()
        out = {}
        for worker in self.agents.deployed():
            for name in self.agents.nodes_of(worker):
                if name in nodes and nodes[name].cmd and (names is None or name in names):
                    out[name] = worker
        return out

    def _stdout_log(self, name: str, worker: AgentClient) -> str:
        """Where node `name`'s app output is on its worker, and its last lines when that
        worker is this controller's embedded agent."""
        port = worker.address.rpartition(":")[2]
        path = Path(f"/run/edgetb/agent-{port}/nodes/{name}/stdout.log")
        where = f"see {path} on {worker.label}"
        if int(port) == self._local_port():
            try:
                tail = path.read_text(errors="replace").strip().splitlines()[-3:]
            except OSError:
                tail = []
            if tail:
                where += "; it ends: " + " | ".join(line.strip()[:200] for line in tail)
        return where

    def _look(self, places: dict[str, AgentClient]):
        """One look at every worker's /status (in parallel): (ready, ended {name: state},
        missing, what each worker answered {label: nodes or the error})."""
        workers = {w.label: w for w in places.values()}

        def status(worker):
            try:
                return worker.status()["nodes"]
            except (net.HttpError, ValueError, KeyError, TypeError) as e:
                return e
        seen = dict(zip(workers, fan_out(status, workers.values())))
        ready, ended, missing, unsure = set(), {}, [], []
        for name, worker in places.items():
            got = seen[worker.label]
            a = got.get(name) if isinstance(got, dict) else None
            if isinstance(got, dict) and not isinstance(a, dict):
                missing.append(name)            # its worker no longer has it (reset)
            elif a is None:
                continue                        # the agent did not answer this time
            elif a.get("ready") is True:
                ready.add(name)
            elif a.get("state") in APP_ENDED:
                ended[name] = a["state"]
            elif "ready" not in a:              # an agent that does not report readiness
                unsure.append(name)
        nodes = self.topo.all_nodes()
        for name, ok in zip(unsure, fan_out(lambda n: _tcp_open(nodes[n].ip, nodes[n].port), unsure)):
            if ok:
                ready.add(name)
        return ready, ended, missing, seen

    def wait(self, names=None, *, say=None, deadline: float | None = None) -> None:
        """Wait until every deployed node among `names` (default all) that runs an app
        answers on its DML port: every agent's `GET /status` is read in parallel every
        READY_POLL_S. `say` gets `apps answering: k/N` when k changed (at most every
        READY_SHOW_S) and once all answer. Raises NotReady naming the nodes at the
        deadline (default this deployment's: deadline_s() after deploy), at once
        when an app exited. Nothing is removed here: the caller resets on failure."""
        if not self.wait_for_apps:
            return
        places = self._app_places(names)
        with self._lock:
            if not set(places) - self._answering:
                return
        if deadline is None:
            deadline = self._deadline or time.monotonic() + self.deadline_s()
        total, shown, shown_at = len(places), None, float("-inf")
        while True:
            ready, ended, missing, seen = self._look(places)
            with self._lock:
                self._answering |= ready
            now = time.monotonic()
            done = len(ready) == total
            if say is not None and len(ready) != shown and (done or now - shown_at >= READY_SHOW_S):
                say(f"apps answering: {len(ready)}/{total}")
                shown, shown_at = len(ready), now
            if done:
                return
            if ended or missing or now >= deadline:
                raise self._not_ready(places, ready, ended, missing, seen)
            time.sleep(min(READY_POLL_S, max(0.0, deadline - now)))

    def _not_ready(self, places, ready, ended, missing, seen) -> NotReady:
        nodes = self.topo.all_nodes()
        lines = []
        for name in sorted(ended):
            lines.append(f"{name}: its app {ended[name]} before answering on port {nodes[name].port} "
                         f"({self._stdout_log(name, places[name])})")
        for name in sorted(missing):
            lines.append(f"{name}: no longer deployed on {places[name].label}")
        silent = sorted(set(places) - ready - set(ended) - set(missing))
        if not ended and not missing:
            for name in silent:
                worker, n = places[name], nodes[name]
                got = seen[worker.label]
                why = (f"its agent did not answer /status: {got}" if isinstance(got, Exception)
                       else f"nothing accepts connections on {n.ip}:{n.port}")
                lines.append(f"{name}: app not answering ({why}; {self._stdout_log(name, worker)})")
        head = (f"{len(ready)}/{len(places)} apps answer on their DML port"
                + ("" if ended or missing else f" after the readiness deadline ({self.deadline_s():g} s "
                                              f"after tc finish; Testbed.ready_timeout_s sets it)"))
        if silent and (ended or missing):
            head += f"; not answering yet: {', '.join(silent)}"
        return NotReady(head + ":\n  " + "\n  ".join(lines), silent, sorted(ended))


class Deployer:
    """Deploys `topo` with the admin `token`; `share_store` and `exports` carry the
    folders to workers that are not this machine."""

    def __init__(self, topo: Topology, token: str, *, share_store: share.Store, exports: share.Exports):
        self.topo, self.token = topo, token
        self.share_store, self.exports = share_store, exports
        self.agents = Agents(self.workers)
        self.embedded = None          # (Agent, Server) when the controller runs the agent
        self._local_app = None        # (Agent, its Flask app for in-process calls)
        # Shares for workers that are not this machine: None picks NFS where it works,
        # HTTP otherwise (controller/share.py); "http" or "nfs" forces one.
        self.share_mode: str | None = None
        # How the embedded agent starts netns node apps: "auto" forks runtime roles from one
        # preloaded interpreter (worker/zygote.py), "exec" starts a Python per node.
        self.launcher = "auto"
        self.ready = Readiness(topo, self.agents, self._embedded_port)

    # ------------------------------------------------------------------ workers
    def _embedded_port(self) -> int | None:
        return None if self.embedded is None else self.embedded[1].port

    def _embedded_address(self) -> str:
        return f"127.0.0.1:{self.embedded[1].port}"

    def _embedded_app(self):
        """The embedded agent's Flask app for in-process calls (its exceptions reach the
        caller, named, instead of a bare 500 page)."""
        agent = self.embedded[0]
        if self._local_app is None or self._local_app[0] is not agent:
            from worker.agent import make_app

            app = make_app(agent)
            app.config["PROPAGATE_EXCEPTIONS"] = True
            self._local_app = (agent, app)
        return self._local_app[1]

    def client(self, label: str, kind: str, address: str | None) -> AgentClient:
        """The client of a worker; address None: the embedded agent."""
        if address is None:
            return LocalAgent(label, kind, self._embedded_address(), self.token, self._embedded_app)
        return HttpAgent(label, kind, address, self.token)

    def workers(self) -> list[AgentClient]:
        """Every worker's client, emulators first (the embedded one once it runs)."""
        out = [self.client(f"emulator {e.name}", "emulated",
                           None if e.agent_port is None else f"{e.ip}:{e.agent_port}")
               for e in self.topo.emulators.values() if e.agent_port is not None or self.embedded is not None]
        seen = set()
        for n in self.topo.physical.values():
            addr = f"{n.ip}:{n.agent_port}"
            if addr not in seen:
                seen.add(addr)
                out.append(self.client(f"physical {addr}", "physical", addr))
        return out

    def ensure_embedded_agent(self, port: int) -> None:
        """Start the embedded agent on `port` when an emulator names no agent port."""
        if self.embedded is not None or all(e.agent_port is not None for e in self.topo.emulators.values()):
            return
        if os.geteuid() != 0:
            raise DeployError("the embedded agent must run as root (sudo python3 ...): it creates "
                              "network namespaces, qdiscs and cgroups")
        from worker.agent import Agent, make_app

        agent = Agent(name="embedded", port=port, token=self.token, launcher=self.launcher)
        srv = net.serve(make_app(agent), "0.0.0.0", port, threads=EMBEDDED_THREADS)
        self.embedded = (agent, srv)

    def close_embedded(self) -> None:
        """Stop the embedded agent: everything it made removed, its zygote stopped."""
        if self.embedded is not None:
            agent, srv = self.embedded
            agent.close()
            srv.close()
            self.embedded = self._local_app = None

    # ------------------------------------------------------------------ shares
    def remote_shares(self, say, *, host_port: int, serving: bool) -> dict | None:
        """{tag: volume source} for workers that are not this machine, or None when every
        worker is local. Says once how the folders are shared. `serving`: whether the
        controller serves on host_port (sharing over HTTP needs it)."""
        remote = self.topo.remote_workers()
        tags = {v.nfs for x in remote for n in (x.nodes if isinstance(x, Emulator) else [x])
                for v in n.volumes if v.nfs}
        if not tags:
            return None
        try:
            how, line = share.mode(self.share_mode)
        except share.ShareError as e:
            raise DeployError(str(e)) from None
        say(line)
        out = {}
        for tag in sorted(tags):
            path = self.topo.nfs[tag].path
            if how == "nfs":
                for ip in sorted({x.ip for x in remote}):      # only to the workers that use it
                    try:
                        self.exports.export(path, ip)
                    except share.ShareError as e:
                        raise DeployError(str(e)) from None
                out[tag] = {"nfs": {"server": self.topo.ip, "path": path, "tag": tag}}
                continue
            if not serving:
                raise DeployError("sharing folders over HTTP needs the controller serving: use start()")
            digest = self.share_store.add(path)
            out[tag] = {"share": {"tag": tag, "sha256": digest,
                                  "url": f"{self.topo.ip}:{host_port}/share/{digest}"}}
        return out

    # ------------------------------------------------------------------ deploy
    def _jobs(self, remote: dict | None, host_port: int) -> list[tuple[AgentClient, dict]]:
        """(worker, its deploy body) for every emulator and every physical agent."""
        topo = self.topo
        jobs = []
        for emu in topo.emulators.values():
            gw = emu.gateway
            ctl = ctl_address(topo, emu, host_port)
            local = topo.is_local(emu.ip, emu.agent_port is None)
            if emu.agent_port is None:
                worker = self.client(f"emulator {emu.name}", "emulated", None)
                agent_addr = f"{gw}:{self.embedded[1].port}"
            else:
                worker = self.client(f"emulator {emu.name}", "emulated", f"{emu.ip}:{emu.agent_port}")
                agent_addr = worker.address
            body = {"emulator": emu.name, "backend": emu.backend, "cpu": emu.cpu,
                    "bridge": {"cidr": emu.subnet, "gateway": gw},
                    "nodes": [node_body(n, ctl, agent_addr, None if local else remote) for n in emu.nodes],
                    "links": topo.agent_links(topo.links, [n.name for n in emu.nodes])}
            jobs.append((worker, body))
        by_agent: dict[str, list[PhysicalNode]] = {}
        for n in topo.physical.values():
            by_agent.setdefault(f"{n.ip}:{n.agent_port}", []).append(n)
        for addr, ns in by_agent.items():
            body = {"nodes": [node_body(n, ctl_address(topo, None, host_port), addr,
                                        None if topo.is_local(n.ip, False) else remote) for n in ns],
                    "links": topo.agent_links(topo.links, [n.name for n in ns])}
            jobs.append((self.client(f"physical {addr}", "physical", addr), body))
        return jobs

    def deploy(self, say=print, *, host_port: int, serving: bool) -> None:
        """Build every worker's part of the (validated, addressed) topology, at most
        FANOUT workers at once; all or nothing. The embedded agent, when one is needed,
        must run already (ensure_embedded_agent)."""
        jobs = self._jobs(self.remote_shares(say, host_port=host_port, serving=serving), host_port)
        errors = []
        lock = threading.Lock()

        def run(job):
            worker, body = job
            try:
                ans = worker.deploy(body)
            except net.HttpError as e:
                with lock:
                    why = f"HTTP {e.status}: {e.message}" if e.status else e.message
                    errors.append(f"{worker.label} ({worker.address}): {why}")
                return
            self.agents.record(worker, ans)
            nl = sum(v["links"] for v in ans["nodes"].values())
            say(f"{worker.label}: {len(ans['nodes'])} node(s) up, {nl} link(s) in place")

        fan_out(run, jobs, FANOUT)
        if errors:
            self.reset(say=say)
            raise DeployError("deployment failed, everything deployed was removed:\n  " + "\n  ".join(errors))
        self.ready.begin()

    # ------------------------------------------------------------------ reset
    def reset(self, say=print, kinds=("emulated", "physical")) -> list[str]:
        """Ask every worker to remove what it made; returns problems (workers unreachable).
        The embedded agent is called in process, so a reset never depends on the state
        of its server (a flooded or dead one must not keep nodes alive at Ctrl-C)."""
        problems = []
        for worker in self.agents.workers():
            if worker.kind not in kinds:
                continue
            try:
                worker.reset()
            except net.HttpError as e:
                problems.append(f"{worker.label}: {e}")
        self.agents.forget()
        self.ready.clear()
        for p in problems:
            say(f"reset: {p}")
        return problems
