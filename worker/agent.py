"""The worker agent: runs as root, obeys the controller over HTTP (admin token required).

    sudo python3 worker/agent.py [--port 3333] [--token-file FILE | env EDGE_TB_TOKEN]

It builds the nodes the controller asks for (emulated nodes as network namespaces or as
Docker containers, or the host itself as a physical node), shapes their links before
their apps start, and removes all of it on reset, leaving the host as it was. What it
made is kept in a state file (and every container, network and volume carries its label),
so an agent that restarts after a crash still cleans up.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from flask import Flask, jsonify, request

from dml_app import bounded_input, formats, node_auth, serving
from worker import backends as be
from worker import image
from worker import ready
from worker import secure
from worker import nodes as nb
from worker import shares
from worker import tc
from worker import units
from testbed_core import credentials

STATE_BASE = Path("/run/edgetb")
# The largest /emulated/deploy, /physical/deploy or /update/tc body. Measured: 300 nodes in
# a full mesh (89,700 links, each with delay, jitter and loss; two volumes per node) is
# 11.4 MiB of JSON as the controller sends it; 32 MiB leaves room for 32-character node
# names. Every other route takes bounded_input.JSON_LIMIT (1 MiB).
DEPLOY_LIMIT = 32 << 20
USAGE_PARALLEL = 4        # nodes read at once by /usage (each a netlink dump in its namespace)


class BadRequest(Exception):
    pass


class NotFound(BadRequest):
    """A request that names a node (or link) this agent does not have: 404."""


NODE_ACTIONS, LINK_ACTIONS = formats.NODE_FAULTS, formats.LINK_FAULTS


class Agent:
    """All node state of one worker; every public method is safe to call twice."""

    def __init__(self, *, name: str, port: int, token: str, state_dir: Path | None = None,
                 launcher: str = "auto"):
        self.name, self.port, self.token = name, port, token
        self.state_dir = state_dir or STATE_BASE / f"agent-{port}"
        self.state_file = self.state_dir / "state.json"
        self.nodes: dict[str, nb.Node] = {}
        self.tables: dict[str, tc.LinkTable] = {}
        self.runner = nb.Runner(launcher)          # "exec": never fork apps from the zygote
        # One backend per kind of node (worker/backends.py); the agent keeps request checks,
        # state, locks, links and readiness, and never asks what kind a node is.
        self.kinds: dict[str, be.Backend] = {
            kind: cls(be.Host(state_dir=self.state_dir, agent_id=str(self.state_dir), port=port,
                              node_env=self.node_env, runner=self.runner))
            for kind, cls in be.BACKENDS.items()}
        # emulator -> its network's name, per emulated kind (netns: bridge; docker: network)
        self.nets: dict[str, dict[str, str]] = {k: {} for k, b in self.kinds.items() if b.emulated}
        self.prober = ready.Prober()
        self.lock = threading.RLock()
        self.build_lock = threading.Lock()
        self.share_cache = shares.cache_dir(port)   # archives of shared folders (kept across resets)
        self.nfs_mounts: list[str] = []             # NFS shares mounted on this worker
        self._recover()

    @property
    def agent_id(self) -> str:
        """What labels this agent's containers, networks and volumes: its state dir is
        unique on the machine and the same for an agent restarted after a crash."""
        return str(self.state_dir)

    @property
    def bridges(self) -> dict[str, str]:
        return self.nets["netns"]

    @property
    def networks(self) -> dict[str, str]:
        return self.nets["docker"]

    def backend(self, n: nb.Node) -> be.Backend:
        return self.kinds[n.kind]

    # -------------------------------------------------------------- persistence
    def _save(self) -> None:
        if not self.nodes and not any(self.nets.values()) and not self.nfs_mounts:
            # Nothing left: leave no state behind either.
            shutil.rmtree(self.state_dir, ignore_errors=True)
            with contextlib.suppress(OSError):   # /run/edgetb too, unless another agent uses it
                self.state_dir.parent.rmdir()
            return
        data = {"nodes": [n.to_json() for n in self.nodes.values()], "nfs_mounts": self.nfs_mounts}
        data.update({self.kinds[k].state_key: nets for k, nets in self.nets.items()})
        try:
            secure.write_private(self.state_file, json.dumps(data), 0o700)
        except secure.UnsafePath as e:
            raise nb.NodeError(str(e)) from None

    def _recover(self) -> None:
        """A state file left by an agent that died: remove what it had made."""
        if not self.state_file.exists():
            return
        try:
            data = json.loads(self.state_file.read_text())
            self.nodes = {n["spec"]["name"]: nb.Node.from_json(n) for n in data.get("nodes", [])}
            for k in self.nets:
                self.nets[k] = dict(data.get(self.kinds[k].state_key, {}))
            self.nfs_mounts = [str(m) for m in data.get("nfs_mounts", [])]
        except (ValueError, KeyError, TypeError) as e:
            print(f"agent: ignoring unreadable state file {self.state_file}: {e}", file=sys.stderr)
            return
        if self.nodes or any(self.nets.values()) or self.nfs_mounts:
            print(f"agent: removing {len(self.nodes)} node(s) left by a previous agent", file=sys.stderr)
            self.reset("all")

    # -------------------------------------------------------------- deploy
    def deploy_emulated(self, body: dict) -> dict:
        try:
            emulator = nb.check_name(str(body.get("emulator", "")), "emulator name")
        except nb.NodeError as e:
            raise BadRequest(str(e)) from None
        kind = body.get("backend", "netns")
        if not isinstance(kind, str) or kind not in self.nets:
            raise BadRequest(f"backend {kind!r} is not available on this agent ({', '.join(self.nets)})")
        backend = self.kinds[kind]
        br = body.get("bridge") or {}
        try:
            if not isinstance(br, dict) or not isinstance(br.get("cidr"), str):
                raise ValueError("expected {\"cidr\": \"10.233.0.0/16\", \"gateway\": \"10.233.0.1\"}")
            gateway = units.ipv4(br["gateway"])
            iface = ipaddress.IPv4Interface(f"{gateway}/{ipaddress.IPv4Network(br['cidr']).prefixlen}")
        except (KeyError, ValueError, TypeError) as e:
            raise BadRequest(f"bad bridge {br!r}: {e}") from None
        self._fetch_shares(body.get("nodes"))
        specs = self._specs(body.get("nodes"), iface.network)
        gpus = [f"{s.name} ({s.gpu})" for s in specs if s.gpu]
        if gpus and not backend.gpus:
            raise BadRequest(f"GPUs are given to {', '.join(k for k, b in self.kinds.items() if b.gpus)} "
                             f"nodes only; {kind} nodes cannot have one: {', '.join(gpus)}")
        links = self._links(body.get("links", {}), specs)
        options = self._check(backend, specs, body)
        # An emulator's network is of one backend: its bridge or its docker network.
        mine = self.nets[kind]
        with self.lock:
            self._not_deployed(specs)
            if any(emulator in nets for k, nets in self.nets.items() if k != kind):
                raise BadRequest(f"emulator {emulator} is deployed here with the other backend (reset first)")
            new_net = emulator not in mine
            try:
                mine[emulator] = backend.ensure_network(emulator, iface)
            except Exception:
                if new_net:
                    self._remove_network(emulator)
                raise
            self._save()
            made: list[nb.Node] = []
            early: dict[str, int] = {}          # nodes whose links and app went in as they were made
            started: list[nb.Node] = []

            def each(n: nb.Node) -> None:       # from the backend's threads
                early[n.spec.name] = nb.install_links([n], links, self.tables)[n.spec.name]
                started.append(n)
                self._start(n)
            try:
                made = backend.create(specs, emulator=emulator, network=mine[emulator], iface=iface,
                                      options=options, deployed=list(self.nodes.values()), then=each)
                counts = self._links_then_apps(made, links, early)
            except Exception:
                self._remove(made or started)
                if new_net:
                    self._remove_network(emulator)
                self._save()
                raise
            self._save()
        return {"nodes": {n.spec.name: {"links": counts[n.spec.name], **backend.deployed(n)} for n in made}}

    def _remove_network(self, emulator: str) -> None:
        for kind, nets in self.nets.items():
            if emulator in nets:
                self.kinds[kind].remove_network(nets.pop(emulator))

    def deploy_physical(self, body: dict) -> dict:
        self._fetch_shares(body.get("nodes"))
        specs = self._specs(body.get("nodes"), None)
        links = self._links(body.get("links", {}), specs)
        backend = self.kinds["physical"]
        with self.lock:
            self._not_deployed(specs)
            options = self._check(backend, specs, body)
            made = []
            try:
                made = backend.create(specs, emulator=None, network=None, iface=None, options=options,
                                      deployed=list(self.nodes.values()))
                counts = self._links_then_apps(made, links)
            except Exception:
                self._remove(made)
                self._save()
                raise
            self._save()
        return {"nodes": {name: {"links": c} for name, c in counts.items()}}

    def _not_deployed(self, specs: list[nb.NodeSpec]) -> None:
        for s in specs:
            if s.name in self.nodes:
                raise BadRequest(f"node {s.name} is already deployed on this worker (reset first)")

    @staticmethod
    def _check(backend: be.Backend, specs: list[nb.NodeSpec], body: dict) -> dict:
        try:
            return backend.check(specs, body)
        except be.Refused as e:
            raise BadRequest(str(e)) from None

    def _links_then_apps(self, made: list[nb.Node], links: dict[str, list[tc.Link]],
                         early: dict[str, int] | None = None) -> dict[str, int]:
        """Record the nodes, install and read back their links, then start their apps (an
        app never sends unshaped traffic) and watch for them to answer; `early`: nodes
        that had this done as they were made (links per node). -> links per node."""
        early = dict(early or {})
        for n in made:
            self.nodes[n.spec.name] = n
        self._save()
        rest = [n for n in made if n.spec.name not in early]
        counts = {**early, **nb.install_links(rest, links, self.tables)}
        for n in rest:
            self._start(n)
        return {n.spec.name: counts[n.spec.name] for n in made}

    def _start(self, n: nb.Node) -> None:
        backend = self.backend(n)
        backend.start(n, self.node_env(n.spec))
        if n.state == "running":      # a node without a command stays idle, never ready
            self.prober.watch(n.spec.name, backend.address(n), lambda: backend.running(n))

    def _fetch_shares(self, raw) -> None:
        """Volumes given as a controller share (`{"share": {"sha256", "url"}, "node", "ro"}`,
        controller/share.py) become binds of this agent's unpacked, hash-checked copy;
        fetched once per content. ShareError (nothing deployed) on a hash mismatch."""
        if not isinstance(raw, list):
            return
        for d in raw:
            vols = d.get("volumes") if isinstance(d, dict) else None
            # Only a list is walked here; NodeSpec.from_dict refuses anything else (400).
            for v in vols if isinstance(vols, list) else []:
                if isinstance(v, dict) and "nfs" in v:
                    v["host"] = self._nfs_mount(v.pop("nfs"), d.get("name"))
                    continue
                sh = v.get("share") if isinstance(v, dict) else None
                if sh is None:
                    continue
                if not isinstance(sh, dict) or not isinstance(sh.get("url"), str):
                    raise BadRequest(f"node {d.get('name')!r}: bad share {sh!r}")
                folder, got = shares.fetch(sh["url"], str(sh.get("sha256", "")), self.share_cache, token=self.token)
                if got:
                    print(f"agent: share {sh.get('tag', '')} {sh['sha256'][:12]} fetched into {folder}",
                          file=sys.stderr, flush=True)
                v["host"] = str(folder)
                v.pop("share")

    def _nfs_mount(self, nfs, node) -> str:
        """An NFS share of the controller (`{"server", "path"}`), mounted once on this
        worker under the agent's state dir and bind-mounted into nodes from there;
        unmounted at reset once no node is left."""
        try:
            server = str(ipaddress.IPv4Address(str(nfs["server"])))
            path = str(nfs["path"])
            if not os.path.isabs(path) or ".." in Path(path).parts:
                raise ValueError(f"path {path!r} must be absolute, without '..'")
        except (KeyError, TypeError, ValueError) as e:
            raise BadRequest(f"node {node!r}: bad nfs share {nfs!r}: {e}") from None
        import hashlib

        target = self.state_dir / "nfs" / hashlib.sha256(f"{server}:{path}".encode()).hexdigest()[:16]
        with self.lock:
            if not os.path.ismount(target):
                target.mkdir(parents=True, exist_ok=True)
                p = subprocess.run(shares.mount_argv(server, path, str(target)), capture_output=True, text=True)
                if p.returncode != 0:
                    raise shares.ShareError(f"mounting NFS share {server}:{path}: "
                                            f"{' '.join((p.stderr or p.stdout).split())}; nothing deployed")
            if str(target) not in self.nfs_mounts:
                self.nfs_mounts.append(str(target))
                self._save()
        return str(target)

    def _unmount_nfs(self) -> None:
        for target in list(self.nfs_mounts):
            if os.path.ismount(target):
                subprocess.run(shares.umount_argv(target), capture_output=True)
            with contextlib.suppress(OSError):
                os.rmdir(target)
            self.nfs_mounts.remove(target)

    def _specs(self, raw, network) -> list[nb.NodeSpec]:
        if not isinstance(raw, list) or not raw:
            raise BadRequest("'nodes' must be a non-empty list")
        try:
            specs = [nb.NodeSpec.from_dict(d if isinstance(d, dict) else {}) for d in raw]
        except nb.NodeError as e:
            raise BadRequest(str(e)) from None
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise BadRequest(f"duplicate node names in {names}")
        ids = [s.id for s in specs]
        if len(set(ids)) != len(ids):
            raise BadRequest(f"duplicate node ids in {ids} (an id names the node's host veth)")
        ips = [s.ip for s in specs]
        if network is not None and len(set(ips)) != len(ips):
            raise BadRequest(f"duplicate node ips in {ips}")
        with self.lock:
            taken = {n.spec.id: n.spec.name for n in self.nodes.values() if self.backend(n).emulated}
        for s in specs:
            if network is not None and s.id in taken and taken[s.id] != s.name:
                raise BadRequest(f"node {s.name}: id {s.id} is already used by node {taken[s.id]}")
        for s in specs:
            if network is not None and ipaddress.IPv4Address(s.ip) not in network:
                raise BadRequest(f"node {s.name}: ip {s.ip} is not in {network}")
        return specs

    def _links(self, raw, specs) -> dict[str, list[tc.Link]]:
        if not isinstance(raw, dict):
            raise BadRequest("'links' must be an object {node: [link, ...]}")
        names = {s.name for s in specs} | set(self.nodes)
        out = {}
        for src, lst in raw.items():
            if src not in names:
                raise BadRequest(f"links given for unknown node {src!r}")
            if not isinstance(lst, list):
                raise BadRequest(f"links of {src} must be a list")
            try:
                out[src] = [tc.Link.from_dict(l if isinstance(l, dict) else {}) for l in lst]
            except tc.TcError as e:
                raise BadRequest(f"links of {src}: {e}") from None
        return out

    def node_env(self, spec: nb.NodeSpec) -> dict:
        """A node's credentials, derived from the admin token as the controller derives
        them: its own (for the controller), the testbed's peer credential and its service
        key (to check its clients' credentials). The admin token itself never reaches a
        node."""
        return {node_auth.TOKEN_ENV: credentials.node_token(self.token, spec.name),
                node_auth.PEER_TOKEN_ENV: credentials.peer_token(self.token),
                node_auth.SERVICE_KEY_ENV: credentials.service_key(self.token, spec.name)}

    # -------------------------------------------------------------- links at run time
    def update_tc(self, body: dict) -> dict:
        with self.lock:
            links = self._links(body.get("links", {}), [])
            out = {}
            for name, lst in links.items():
                table = self.tables.get(name)
                if table is None:
                    raise BadRequest(f"node {name} has no link table on this worker")
                tc.change(table, lst)
                out[name] = {"links": tc.verify(table)}
            return {"nodes": out}

    # -------------------------------------------------------------- faults
    @staticmethod
    def _fault_body(body: dict, keys: tuple[str, ...], actions: tuple[str, ...]) -> dict:
        extra = sorted(set(body) - set(keys))
        if extra:
            raise BadRequest(f"unknown key(s) {', '.join(repr(k[:32]) for k in extra)}: expected {', '.join(keys)}")
        out = {}
        for k in keys:
            v = body.get(k)
            if not isinstance(v, str):
                raise BadRequest(f"{k}: expected a string, got {type(v).__name__}")
            if k == "action":
                if v not in actions:
                    raise BadRequest(f"action: {v[:32]!r} is not one of {', '.join(actions)}")
            else:
                try:
                    nb.check_name(v, k)
                except nb.NodeError as e:
                    raise BadRequest(str(e)) from None
            out[k] = v
        return out

    def node_fault(self, body: dict) -> dict:
        """kill, pause, resume or restart one node's app, through its backend."""
        b = self._fault_body(body, ("node", "action"), NODE_ACTIONS)
        name, action = b["node"], b["action"]
        with self.lock:
            n = self.nodes.get(name)
            if n is None:
                raise NotFound(f"node {name} is not deployed on this worker")
            backend = self.backend(n)
            if action == "kill":
                backend.kill(n)
            elif action == "pause":
                backend.pause(n)
            elif action == "resume":
                backend.resume(n)
            else:
                self.prober.forget(name)        # ready again only once the new app answers

                def relink(node: nb.Node) -> None:
                    old = self.tables.get(name)
                    table = tc.LinkTable(dev=node.dev, netns=node.netns, own_port=node.spec.port)
                    tc.install(table, list(old.links.values()) if old else [])
                    for key in old.down if old else ():
                        tc.set_down(table, old.links[key].dest, True)
                    self.tables[name] = table
                    tc.verify(table)
                backend.restart(n, self.node_env(n.spec), relink)
                if n.state == "running":
                    self.prober.watch(name, backend.address(n), lambda: backend.running(n))
            self._save()
            st = backend.inspect([n]).get(name, {})
        return {"node": name, "action": action, "state": st.get("state", n.state)}

    def link_fault(self, body: dict) -> dict:
        """Take the link from node to dest down (0 bytes pass) or up (its rate again)."""
        b = self._fault_body(body, ("node", "dest", "action"), LINK_ACTIONS)
        name, dest, action = b["node"], b["dest"], b["action"]
        with self.lock:
            if name not in self.nodes:
                raise NotFound(f"node {name} is not deployed on this worker")
            table = self.tables.get(name)
            if table is None or table.key_of(dest) is None:
                raise NotFound(f"node {name} has no link to {dest} on this worker")
            changed = tc.set_down(table, dest, action == "down")
            link = table.links[table.key_of(dest)]
        return {"node": name, "dest": dest, "action": action, "changed": changed,
                "down": action == "down", "rate_bps": link.rate_bps}

    # -------------------------------------------------------------- stop / clear / reset
    def stop(self, kind: str) -> dict:
        with self.lock:
            victims = self._of(kind)
            self._stop_all(victims)
            self._save()
            return {"stopped": [n.spec.name for n in victims]}

    def clear_tc(self, kind: str) -> dict:
        with self.lock:
            done = []
            for n in self._of(kind):
                netns, dev = self.backend(n).namespace(n)
                if netns is None or Path(f"/run/netns/{netns}").exists():
                    tc.clear(netns, dev)
                self.tables.pop(n.spec.name, None)
                done.append(n.spec.name)
            return {"cleared": done}

    def close(self) -> None:
        """Remove everything, then stop the zygote (the agent is going away)."""
        try:
            self.reset("all")
        finally:
            self.runner.close()

    def reset(self, kind: str) -> dict:
        with self.lock:
            victims = list(self._of(kind))
            self._remove(victims)
            gone = []
            if kind in ("emulated", "all"):
                for emu in {e for nets in self.nets.values() for e in nets}:
                    self._remove_network(emu)
                for backend in self.kinds.values():
                    if backend.emulated:
                        gone += backend.sweep()
            if not self.nodes:
                self._unmount_nfs()
            self._save()
            out = {"removed": [n.spec.name for n in victims]}
            if gone:
                out["swept"] = gone
            return out

    def _remove(self, victims: list[nb.Node]) -> None:
        """Everything of these nodes (their backends' remove), and the agent's records."""
        for n in victims:
            self.prober.forget(n.spec.name)
        for kind, group in self._by_kind(victims).items():
            self.kinds[kind].remove(group)
        for n in victims:
            self.tables.pop(n.spec.name, None)
            self.nodes.pop(n.spec.name, None)

    def _stop_all(self, victims: list[nb.Node]) -> None:
        for n in victims:
            self.prober.forget(n.spec.name)
        for kind, group in self._by_kind(victims).items():
            self.kinds[kind].stop_many(group)

    @staticmethod
    def _by_kind(nodes: list[nb.Node]) -> dict[str, list[nb.Node]]:
        out: dict[str, list[nb.Node]] = {}
        for n in nodes:
            out.setdefault(n.kind, []).append(n)
        return out

    def _of(self, kind: str):
        """The nodes a route names: "emulated", "physical" or "all"."""
        return [n for n in list(self.nodes.values())
                if kind == "all" or self.backend(n).emulated == (kind == "emulated")]

    def status(self) -> dict:
        """Every node: kind, ip, state, link count, whether its app answers, and what its
        backend adds. The backends are asked outside the lock (a daemon may be slow)."""
        with self.lock:
            nodes = list(self.nodes.values())
            links = {name: len(t.links) for name, t in self.tables.items()}
        seen: dict[str, dict] = {}
        for kind, group in self._by_kind(nodes).items():
            seen.update(self.kinds[kind].inspect(group))
        out = {}
        for n in nodes:
            name = n.spec.name
            st = {"kind": n.kind, "ip": n.spec.ip, "state": n.state, "links": links.get(name, 0),
                  **seen.get(name, {})}
            st["ready"] = st["state"] == "running" and self.prober.ready(name)
            out[name] = st
        return {"agent": self.name, "nodes": out}

    # -------------------------------------------------------------- usage (the dashboard)
    def usage(self) -> dict:
        """What every node uses now and what each of its links carried so far, for the
        controller's dashboard sampler (one call per sample, whatever the link count):
        {"nodes": {name: {"state", "cpu_ns", "mem_bytes", "t"}},
         "links": {name: {"t", "links": [[dest, bytes, packets, rate_bps, down], ...]}}}
        with counters as the kernel keeps them (HTB class bytes and packets since the class
        was made) and t this agent's monotonic clock at each read, so rates are deltas over
        the agent's own time. No lock is held while reading (a deploy holds it for long):
        nodes and tables are snapshots, and a node gone meanwhile is left out."""
        nodes = list(self.nodes.values())
        tables = dict(self.tables)

        def one(n: nb.Node):
            name = n.spec.name
            backend = self.backend(n)
            alive = backend.running(n) if n.state in ("running", "paused") else None
            state = "exited" if alive is False else n.state
            try:
                use = backend.usage(n) if state in ("running", "paused") else {"cpu_ns": None, "mem_bytes": None}
            except (OSError, ValueError, nb.NodeError):
                use = {"cpu_ns": None, "mem_bytes": None}
            node = {"state": state, **use, "t": round(time.monotonic(), 6)}
            table = tables.get(name)
            if table is None:
                return name, node, None
            try:
                netns, dev = table.netns, table.dev
                stats = tc.class_stats(netns, dev)
                t = round(time.monotonic(), 6)
                links = [[l.dest, *stats.get(minor, (0, 0)), l.rate_bps, key in table.down]
                         for key, minor in list(table.minors.items())
                         if (l := table.links.get(key)) is not None]
            except (tc.TcError, OSError, RuntimeError):     # the namespace went meanwhile
                return name, node, None
            return name, node, {"t": t, "links": links}

        out_nodes, out_links = {}, {}
        with ThreadPoolExecutor(min(USAGE_PARALLEL, max(1, len(nodes)))) as ex:
            for name, node, links in ex.map(one, nodes):
                out_nodes[name] = node
                if links is not None:
                    out_links[name] = links
        return {"agent": self.name, "nodes": out_nodes, "links": out_links}

    # -------------------------------------------------------------- image
    def build_image(self, body: dict) -> dict:
        """The node image for docker nodes (dml_app/Dockerfile, or offline): worker/image.py."""
        tag = body.get("tag") or image.DEFAULT_TAG
        method = body.get("method", "auto")
        try:
            image.check_tag(tag)
            if method not in ("auto", "dockerfile", "offline"):
                raise image.ImageError(f"bad method {method!r}: auto, dockerfile or offline")
        except image.ImageError as e:
            raise BadRequest(str(e)) from None
        lines: list[str] = []
        if not self.build_lock.acquire(blocking=False):
            raise BadRequest("an image build is already running on this worker")
        try:
            res = image.build(tag, method=method, force=bool(body.get("force")), say=lines.append)
        finally:
            self.build_lock.release()
        res["log"] = lines[-50:]
        return res

    def backends(self) -> list[str]:
        return ["netns", "physical"] + (["docker"] if image.daemon_answers() else [])


def make_app(agent: Agent) -> Flask:
    app = Flask("edgetb-agent")
    node_auth.require_token(app, agent.token)
    # Bodies: JSON commands up to 1 MiB; a deployment (or a new link table) up to
    # DEPLOY_LIMIT. waitress refuses anything larger from its headers.
    bounded_input.limit_bodies(app, routes={r: DEPLOY_LIMIT for r in ("/emulated/deploy", "/physical/deploy",
                                                            "/update/tc")})

    def body() -> dict:
        """The request's JSON object, bounded (bounded_input.parse_json_body); 400 otherwise."""
        try:
            return bounded_input.request_json()
        except bounded_input.BodyError as e:
            raise BadRequest(str(e)) from None

    @app.errorhandler(BadRequest)
    def _bad(e):
        return jsonify(error=str(e)), 404 if isinstance(e, NotFound) else 400

    @app.errorhandler(nb.NodeError)
    @app.errorhandler(shares.ShareError)
    @app.errorhandler(tc.TcError)
    @app.errorhandler(image.ImageError)
    def _failed(e):
        return jsonify(error=str(e)), 422

    @app.errorhandler(image.NoDocker)
    def _no_docker(e):
        return jsonify(error=str(e)), 503

    @app.get("/hi")
    def hi():
        return jsonify(agent=agent.name, backends=agent.backends())

    @app.post("/emulated/build")
    def emulated_build():
        b = request.get_json(silent=True)    # no body: the default tag and method
        return jsonify(agent.build_image(b if isinstance(b, dict) else {}))

    @app.post("/emulated/deploy")
    def emulated_deploy():
        return jsonify(agent.deploy_emulated(body()))

    @app.post("/physical/deploy")
    def physical_deploy():
        return jsonify(agent.deploy_physical(body()))

    @app.post("/update/tc")
    def update_tc():
        return jsonify(agent.update_tc(body()))

    @app.post("/node/fault")
    def node_fault():
        return jsonify(agent.node_fault(body()))

    @app.post("/link/fault")
    def link_fault():
        return jsonify(agent.link_fault(body()))

    @app.post("/emulated/stop")
    def emulated_stop():
        return jsonify(agent.stop("emulated"))

    @app.post("/emulated/clear")
    def emulated_clear():
        agent.stop("emulated")
        return jsonify(agent.clear_tc("emulated"))

    @app.post("/emulated/reset")
    def emulated_reset():
        return jsonify(agent.reset("emulated"))

    @app.post("/physical/stop")
    def physical_stop():
        return jsonify(agent.stop("physical"))

    @app.post("/physical/clear/tc")
    def physical_clear_tc():
        return jsonify(agent.clear_tc("physical"))

    @app.post("/physical/reset")
    def physical_reset():
        return jsonify(agent.reset("physical"))

    @app.get("/status")
    def status():
        return jsonify(agent.status())

    @app.get("/usage")
    def usage():
        """cpu/memory of every node and the byte counters of every link (Agent.usage)."""
        return jsonify(agent.usage())

    return app


def admin_token(path: str | None, port: int) -> tuple[str, Path | None]:
    """The admin token from a root-only file, else the environment, else a new one
    written to a root-only file whose path is printed (and returned, so that it goes
    when the agent does). Never on a command line."""
    if path:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise ValueError(f"--token-file {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"--token-file {path}: not a regular file")
            if st.st_uid != 0 or st.st_mode & 0o077:
                raise ValueError(f"--token-file {path}: must be owned by root and readable by root only "
                                 f"(chmod 600), it is mode {stat.S_IMODE(st.st_mode):o}")
            token = os.read(fd, 4096).decode(errors="replace").strip()
        finally:
            os.close(fd)
        if not token:
            raise ValueError(f"--token-file {path}: empty")
        return token, None
    token = os.environ.get(node_auth.TOKEN_ENV, "").strip()
    if token:
        return token, None
    token = secrets.token_hex(16)
    out = STATE_BASE / f"agent-{port}.token"
    secure.write_private(out, token + "\n", 0o755)
    print(f"agent: new admin token in {out} (root only); give it to the controller: "
          f"default_testbed(..., token=...)", flush=True)
    return token, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="EdgeTB-style worker agent (run as root).")
    ap.add_argument("--port", type=int, default=3333, help="HTTP port (default 3333)")
    ap.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    ap.add_argument("--token-file", metavar="FILE",
                    help=f"read the admin token from FILE (owned by root, mode 0600 or 0400); "
                         f"default: ${node_auth.TOKEN_ENV}, else a new token written to "
                         f"{STATE_BASE}/agent-PORT.token")
    ap.add_argument("--name", default=socket.gethostname(), help="agent name shown in /hi")
    ap.add_argument("--launcher", choices=nb.LAUNCHERS, default="auto",
                    help="how netns node apps start: auto (runtime roles fork from one preloaded "
                         "interpreter, worker/zygote.py; anything else is exec'd) or exec (always exec)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("agent: must run as root (it creates namespaces, qdiscs and cgroups)", file=sys.stderr)
        return 2
    try:
        token, made = admin_token(a.token_file, a.port)
    except ValueError as e:
        print(f"agent: {e}", file=sys.stderr)
        return 2
    agent = Agent(name=a.name, port=a.port, token=token, launcher=a.launcher)
    srv = serving.Server(make_app(agent), a.host, a.port, threads=16)
    # SIGTERM (kill, systemctl stop) ends the agent like Ctrl-C: through the reset below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"agent {a.name} serving on {a.host}:{a.port}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        agent.close()
        if made is not None:
            with contextlib.suppress(OSError):
                made.unlink()
                made.parent.rmdir()   # /run/edgetb too, unless another agent uses it
    return 0


if __name__ == "__main__":
    sys.exit(main())
