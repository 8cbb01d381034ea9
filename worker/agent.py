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

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flask import Flask, jsonify, request  # noqa: E402

from dml_app import net  # noqa: E402
from worker import docker_nodes as dn  # noqa: E402
from worker import image  # noqa: E402
from worker import secure  # noqa: E402
from worker import nodes as nb  # noqa: E402
from worker import shares  # noqa: E402
from worker import tc  # noqa: E402
from worker import units  # noqa: E402
from worker.cgroups import Cgroup  # noqa: E402

STATE_BASE = Path("/run/edgetb")
# The largest /emulated/deploy, /physical/deploy or /update/tc body. Measured: 300 nodes in
# a full mesh (89,700 links, each with delay, jitter and loss; two volumes per node) is
# 11.4 MiB of JSON as the controller sends it; 32 MiB leaves room for 32-character node
# names. Every other route takes net.JSON_LIMIT (1 MiB).
DEPLOY_LIMIT = 32 << 20


class BadRequest(Exception):
    pass


class Agent:
    """All node state of one worker; every public method is safe to call twice."""

    def __init__(self, *, name: str, port: int, token: str, state_dir: Path | None = None):
        self.name, self.port, self.token = name, port, token
        self.state_dir = state_dir or STATE_BASE / f"agent-{port}"
        self.state_file = self.state_dir / "state.json"
        self.nodes: dict[str, nb.Node] = {}
        self.bridges: dict[str, str] = {}          # emulator -> bridge name (netns)
        self.networks: dict[str, str] = {}         # emulator -> docker network name
        self.tables: dict[str, tc.LinkTable] = {}
        self.runner = nb.Runner()
        self.docker_runner = dn.DockerRunner(self._docker)
        self._docker_client = None
        self.lock = threading.RLock()
        self.build_lock = threading.Lock()
        self.share_cache = shares.cache_dir(port)   # archives of shared folders (kept across resets)
        self.nfs_mounts: list[str] = []             # NFS shares mounted on this worker
        self._recover()

    # -------------------------------------------------------------- docker
    @property
    def agent_id(self) -> str:
        """What labels this agent's containers, networks and volumes: its state dir is
        unique on the machine and the same for an agent restarted after a crash."""
        return str(self.state_dir)

    def _docker(self):
        """The Docker SDK client (made on first use); NodeError when no daemon answers."""
        if self._docker_client is None:
            try:
                self._docker_client = image.client(timeout_s=120)
            except image.NoDocker as e:
                raise nb.NodeError(str(e)) from None
        return self._docker_client

    def _docker_labels(self, **more) -> dict:
        return dn.labels(self.agent_id, self.port, **more)

    def _runner(self, n: nb.Node):
        return self.docker_runner if n.kind == "docker" else self.runner

    # -------------------------------------------------------------- persistence
    def _save(self) -> None:
        if not self.nodes and not self.bridges and not self.networks and not self.nfs_mounts:
            # Nothing left: leave no state behind either.
            shutil.rmtree(self.state_dir, ignore_errors=True)
            with contextlib.suppress(OSError):   # /run/edgetb too, unless another agent uses it
                self.state_dir.parent.rmdir()
            return
        data = {"nodes": [n.to_json() for n in self.nodes.values()], "bridges": self.bridges,
                "networks": self.networks, "nfs_mounts": self.nfs_mounts}
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
            self.bridges = dict(data.get("bridges", {}))
            self.networks = dict(data.get("networks", {}))
            self.nfs_mounts = [str(m) for m in data.get("nfs_mounts", [])]
        except (ValueError, KeyError, TypeError) as e:
            print(f"agent: ignoring unreadable state file {self.state_file}: {e}", file=sys.stderr)
            return
        if self.nodes or self.bridges or self.networks or self.nfs_mounts:
            print(f"agent: removing {len(self.nodes)} node(s) left by a previous agent", file=sys.stderr)
            self.reset("all")

    # -------------------------------------------------------------- deploy
    def deploy_emulated(self, body: dict) -> dict:
        try:
            emulator = nb.check_name(str(body.get("emulator", "")), "emulator name")
        except nb.NodeError as e:
            raise BadRequest(str(e)) from None
        backend = body.get("backend", "netns")
        if backend not in ("netns", "docker"):
            raise BadRequest(f"backend {backend!r} is not available on this agent (netns, docker)")
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
        if gpus and backend != "docker":
            raise BadRequest(f"GPUs are given to docker nodes only; {backend} nodes cannot have one: "
                             f"{', '.join(gpus)}")
        links = self._links(body.get("links", {}), specs)
        if backend == "docker":
            missing = [s.name for s in specs if not s.image]
            if missing:
                raise BadRequest(f"docker nodes need an image: none given for {', '.join(missing)}")
            try:
                cores = dn.emulator_cores(net.number(body["cpu"], "emulator cpu", 0, 1024, lo_open=True)
                                          if body.get("cpu") else None)
            except (TypeError, ValueError) as e:
                raise BadRequest(f"bad emulator cpu: {e}") from None
        # An emulator's network is of one backend: its bridge or its docker network.
        mine, other = (self.bridges, self.networks) if backend == "netns" else (self.networks, self.bridges)
        with self.lock:
            for s in specs:
                if s.name in self.nodes:
                    raise BadRequest(f"node {s.name} is already deployed on this worker (reset first)")
            if emulator in other:
                raise BadRequest(f"emulator {emulator} is deployed here with the other backend (reset first)")
            new_net = emulator not in mine
            try:
                if backend == "netns":
                    mine[emulator] = nb.bridge_name(emulator)
                    nb.ensure_bridge(mine[emulator], str(iface))
                else:
                    mine[emulator] = dn.ensure_network(self._docker(), emulator, str(iface.network),
                                                       str(iface.ip), self._docker_labels())
            except Exception:
                if new_net:
                    self._remove_network(emulator)
                raise
            self._save()
            made: list[nb.Node] = []
            try:
                if backend == "netns":
                    made = nb.create_netns_nodes(specs, mine[emulator], iface.network.prefixlen, str(iface.ip),
                                                 self.state_dir / "nodes")
                else:
                    made = dn.create_nodes(self._docker(), specs, network=mine[emulator],
                                           rundir_base=self.state_dir / "nodes",
                                           lab=self._docker_labels(emulator=emulator), cores=cores,
                                           load=dn.cpuset_load(list(self.nodes.values())),
                                           extra_env=self.node_env)
                for n in made:
                    self.nodes[n.spec.name] = n
                self._save()
                counts = nb.install_links(made, links, self.tables)
                self._start_apps(made, body)
            except Exception:
                self._remove(made)
                if new_net:
                    self._remove_network(emulator)
                self._save()
                raise
            self._save()
        return {"nodes": {n.spec.name: self._deployed(n, counts[n.spec.name]) for n in made}}

    @staticmethod
    def _deployed(n: nb.Node, links: int) -> dict:
        out = {"links": links}
        if n.kind == "docker":
            out.update(container=n.container, cpuset=n.cpuset, host_port=n.host_port)
        return out

    def _remove_network(self, emulator: str) -> None:
        if emulator in self.bridges:
            nb.remove_bridge(self.bridges.pop(emulator))
        if emulator in self.networks:
            name = self.networks.pop(emulator)
            try:
                dn.remove_network(self._docker(), name, self.agent_id)
            except nb.NodeError as e:   # no daemon: say so, keep cleaning
                print(f"agent: removing docker network {name}: {e}", file=sys.stderr)

    def deploy_physical(self, body: dict) -> dict:
        self._fetch_shares(body.get("nodes"))
        specs = self._specs(body.get("nodes"), None)
        links = self._links(body.get("links", {}), specs)
        with self.lock:
            made = []
            try:
                nb.check_users(specs)
                for s in specs:
                    if s.name in self.nodes:
                        raise BadRequest(f"node {s.name} is already deployed on this worker")
                    if not s.nic or not nb.link_exists(s.nic):
                        raise BadRequest(f"physical node {s.name}: no NIC {s.nic!r} on this worker")
                    n = nb.Node(spec=s, kind="physical", netns=None, dev=s.nic,
                                rundir=str(self.state_dir / "nodes" / s.name))
                    nb.secure_dir(n.rundir, 0o700)
                    made.append(n)
                    self.nodes[s.name] = n
                self._save()
                counts = nb.install_links(made, links, self.tables)
                self._start_apps(made, body)
            except Exception:
                self._remove(made)
                self._save()
                raise
            self._save()
        return {"nodes": {name: {"links": c} for name, c in counts.items()}}

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
            taken = {n.spec.id: n.spec.name for n in self.nodes.values() if n.kind == "netns"}
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
        them: its own (for the controller) and the testbed's peer credential. The admin
        token itself never reaches a node."""
        return {net.TOKEN_ENV: net.node_token(self.token, spec.name),
                net.PEER_TOKEN_ENV: net.peer_token(self.token)}

    def _start_apps(self, made: list[nb.Node], body: dict) -> None:
        for n in made:
            self._runner(n).start(n, self.node_env(n.spec))

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
                if n.netns is None or Path(f"/run/netns/{n.netns}").exists():
                    tc.clear(n.netns, n.dev)
                self.tables.pop(n.spec.name, None)
                done.append(n.spec.name)
            return {"cleared": done}

    def reset(self, kind: str) -> dict:
        with self.lock:
            victims = list(self._of(kind))
            self._remove(victims)
            gone = []
            if kind in ("emulated", "all"):
                for emu in list(self.bridges) + list(self.networks):
                    self._remove_network(emu)
                gone = self._sweep_docker()
            if not self.nodes:
                self._unmount_nfs()
            self._save()
            out = {"removed": [n.spec.name for n in victims]}
            if gone:
                out["swept"] = gone
            return out

    def _sweep_docker(self) -> list[str]:
        """Containers, networks and volumes with this agent's label that no record names
        (a predecessor died between making and saving them). Quiet without a daemon."""
        if self._docker_client is None and not image.daemon_answers():
            return []
        try:
            return dn.sweep(self._docker(), self.agent_id)
        except Exception as e:  # noqa: BLE001 - a reset keeps going, and says why
            print(f"agent: docker sweep: {e}", file=sys.stderr)
            return []

    def _remove(self, victims: list[nb.Node]) -> None:
        boxes = [n for n in victims if n.kind == "docker"]
        if boxes:
            try:
                client = self._docker()
            except nb.NodeError as e:   # netns names and run dirs still go
                print(f"agent: removing {len(boxes)} container(s): {e}", file=sys.stderr)
                client = None
            dn.remove_nodes(client, boxes, self.agent_id)
        self._stop_all([n for n in victims if n.kind != "docker"])
        for n in victims:
            if n.kind == "docker":
                self.tables.pop(n.spec.name, None)
                self.nodes.pop(n.spec.name, None)
                continue
            if n.kind == "netns":
                nb.remove_netns_node(n)
            else:
                try:
                    tc.clear(None, n.dev)
                except Exception as e:  # the NIC may be gone; say so, keep cleaning
                    print(f"agent: clearing tc on {n.dev}: {e}", file=sys.stderr)
                shutil.rmtree(n.rundir, ignore_errors=True)
            Cgroup(n.spec.name).remove()
            self.tables.pop(n.spec.name, None)
            self.nodes.pop(n.spec.name, None)

    def _stop_all(self, victims: list[nb.Node]) -> None:
        """Stop apps in parallel: each may take its SIGTERM grace period."""
        if victims:
            with ThreadPoolExecutor(min(16, len(victims))) as ex:
                list(ex.map(lambda n: self._runner(n).stop(n), victims))

    def _of(self, kind: str):
        want = {"emulated": ("netns", "docker"), "physical": ("physical",),
                "all": ("netns", "docker", "physical")}[kind]
        return [n for n in list(self.nodes.values()) if n.kind in want]

    def status(self) -> dict:
        with self.lock:
            return {"agent": self.name, "nodes": {n.spec.name: self._node_status(n) for n in self.nodes.values()}}

    def _node_status(self, n: nb.Node) -> dict:
        out = {"kind": n.kind, "ip": n.spec.ip, "state": n.state,
               "links": len(self.tables[n.spec.name].links) if n.spec.name in self.tables else 0}
        if n.kind == "docker":
            info = self.docker_runner.inspect(n)
            if info is None:
                out["state"] = "gone"
            elif info["status"] != "running":
                out["state"] = "exited" if info["status"] in ("exited", "dead") else info["status"]
            out.update(container=n.container, cpuset=n.cpuset, host_port=n.host_port, image=n.spec.image,
                       health=info and info["health"])
        elif self.runner.alive(n.spec.name) is False:
            out["state"] = "exited"
        return out

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
    net.require_token(app, agent.token)
    # Bodies: JSON commands up to 1 MiB; a deployment (or a new link table) up to
    # DEPLOY_LIMIT. waitress refuses anything larger from its headers.
    net.limit_bodies(app, routes={r: DEPLOY_LIMIT for r in ("/emulated/deploy", "/physical/deploy",
                                                            "/update/tc")})

    def body() -> dict:
        """The request's JSON object, bounded (net.parse_json_body); 400 otherwise."""
        try:
            return net.request_json()
        except net.BodyError as e:
            raise BadRequest(str(e)) from None

    @app.errorhandler(BadRequest)
    def _bad(e):
        return jsonify(error=str(e)), 400

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
    token = os.environ.get(net.TOKEN_ENV, "").strip()
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
                         f"default: ${net.TOKEN_ENV}, else a new token written to "
                         f"{STATE_BASE}/agent-PORT.token")
    ap.add_argument("--name", default=socket.gethostname(), help="agent name shown in /hi")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("agent: must run as root (it creates namespaces, qdiscs and cgroups)", file=sys.stderr)
        return 2
    try:
        token, made = admin_token(a.token_file, a.port)
    except ValueError as e:
        print(f"agent: {e}", file=sys.stderr)
        return 2
    agent = Agent(name=a.name, port=a.port, token=token)
    srv = net.Server(make_app(agent), a.host, a.port, threads=16)
    # SIGTERM (kill, systemctl stop) ends the agent like Ctrl-C: through the reset below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"agent {a.name} serving on {a.host}:{a.port}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        agent.reset("all")
        if made is not None:
            with contextlib.suppress(OSError):
                made.unlink()
                made.parent.rmdir()   # /run/edgetb too, unless another agent uses it
    return 0


if __name__ == "__main__":
    sys.exit(main())
