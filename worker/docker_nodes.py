"""Docker backend: an emulated node is a container made through the Docker SDK.

Per emulator a labelled bridge network `etb-<emulator>` with the emulator's subnet and
gateway (its Linux bridge is named like the netns backend's, `etbbr<hash>`); per node a
container `etb-<node>` on it with the node's fixed address, image, working dir, command,
environment (EdgeTB's variables, the token, DML_*), a cpuset picked from the emulator's
cores (plus a cpu quota, nano_cpus, when the node's cpu is fractional), a memory limit
(no swap: memswap = memory), a pids limit (the node's `pids`, 512 by default), a private
IPC namespace, Docker's default seccomp profile (which refuses what worker/seccomp.py
refuses netns node apps: new user namespaces, mounts, bpf, keyctl, ptrace, modules, ...),
its stdout (`docker logs`) capped at the node's log size, its bind volumes, its DML port
published on a host port, a health check, and tini as pid 1 so `docker stop` reaches
the app. Its run dir is a tmpfs of the node's log size, as a netns node's
(worker/nodes.py mount_rundir).

Links before the app: the container starts behind a gate. Its entrypoint is

    /bin/sh -c 'read -r go < /run/edgetb-node/gate && [ "$go" = open ] && exec "$@" ...' edgetb-gate CMD...

where /run/edgetb-node is the node's run dir on the host (bind-mounted) and `gate` a
FIFO the agent made there: the shell blocks in open(2) at no cost until the agent writes
"open". Before that, the agent attaches the container's network namespace by pid under
the node's name (`ip netns attach etb-<node> PID`, so `tc -n`, `ip netns exec etb-<node>`
and worker/tc.py work as for netns nodes), installs and reads back its links on eth0 from
the host (no tc in the image, no docker exec), and only then opens the gate. The app's
logs go to the same run dir (DML_LOG_DIR), its stdout to `docker logs etb-<node>`.

Unless its spec asks for root, a container runs as the host's unprivileged node user
(uid:gid of `edgetb-node`, given as numbers), with every capability dropped and
no-new-privileges; its run dir is mounted read-only except its log dir, which that user
owns, as it owns the gate it reads. A root node keeps Docker's default capabilities.

Everything made carries the labels `edgetb=1` and `edgetb.agent=<agent id>` (the agent's
state dir, unique on a machine and the same after a restart), so removal is by label and
never touches a container, network or volume of anyone else.
"""
from __future__ import annotations

import errno
import math
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from worker import nodes as nb
from worker.image import NODE_APP_DIR

LABEL = "edgetb"
LABEL_AGENT = "edgetb.agent"
LABEL_AGENT_PORT = "edgetb.agent.port"
LABEL_NODE = "edgetb.node"
LABEL_EMULATOR = "edgetb.emulator"
GATE_DIR = "/run/edgetb-node"          # the node's run dir, inside the container
GATE = "gate"
GATE_OPEN = b"open\n"
GATE_SCRIPT = ('read -r go < ' + GATE_DIR + '/' + GATE + ' && [ "$go" = open ] && exec "$@"; '
               'echo "edgetb: gate not opened (${go:-closed}), $1 not started" >&2; exit 97')
GATE_WAIT_S = 30.0                     # for the container to reach the gate once started
NETWORK_GONE_S = 5.0                   # for the daemon to let go of a removed container's endpoint
STOP_TIMEOUT_S = 5
# Containers made (created, started, attached) at once. The daemon starts about 8 a second
# on 2 cores however many ask (bench/deploy.py --docker, 50 containers: 6.4 s with 8 or 16
# at once, 7.6 s with 32, 8.0 s with 4); more only queue in it. The SDK keeps 10
# connections to the daemon, so this stays below 10.
PARALLEL = 8
NS = 1_000_000_000
# Docker takes health-check times in nanoseconds. Each check is a `docker exec` of python3
# (a runc exec and an interpreter: ~0.1 s of cpu): every 30 s, not 10, so 50 containers
# cost the machine ~2 checks a second, none of them while a deploy starts them; the
# agent's own readiness prober (worker/ready.py) is what says an app answers.
HEALTH = {"test": ["CMD", "python3", "-c",
                   "import os, socket; socket.create_connection(('127.0.0.1', "
                   "int(os.environ.get('DML_PORT', '4444'))), 2).close()"],
          "interval": 30 * NS, "timeout": 3 * NS, "retries": 3, "start_period": 120 * NS}


def _docker_errors():
    import docker
    return docker.errors


def container_name(node: str) -> str:
    return nb.NS_PREFIX + node


def network_name(emulator: str) -> str:
    return nb.NS_PREFIX + emulator


def labels(agent_id: str, agent_port: int, **more: str) -> dict:
    out = {LABEL: "1", LABEL_AGENT: agent_id, LABEL_AGENT_PORT: str(agent_port)}
    out.update({f"{LABEL}.{k}": v for k, v in more.items()})
    return out


def _explain(e: Exception) -> str:
    return (getattr(e, "explanation", None) or str(e)).strip()


# ----------------------------------------------------------------------------- cpus

def emulator_cores(cpu: float | None) -> list[int]:
    """The cores an emulator's nodes may use: this machine's (those the agent may run on),
    the first ceil(cpu) of them when the emulator declares a cpu count."""
    cores = sorted(os.sched_getaffinity(0))
    if cpu:
        cores = cores[:max(1, math.ceil(cpu - 1e-9))]
    return cores


def place(cpus: list[float], cores: list[int], load: dict[int, float] | None = None) -> list[tuple[str, int | None]]:
    """Pick cores for nodes asking `cpus`: each gets ceil(cpu) adjacent cores of `cores`,
    the least loaded window (load: cpu already placed per core, updated here), and a
    quota in nano-cpus when its cpu is below its cores (fractional). -> [(cpuset, nano_cpus | None)]."""
    load = load if load is not None else {}
    out = []
    for cpu in cpus:
        k = min(len(cores), max(1, math.ceil(cpu - 1e-9)))
        start = min(range(len(cores) - k + 1),
                    key=lambda i: (round(sum(load.get(c, 0.0) for c in cores[i:i + k]), 6), i))
        window = cores[start:start + k]
        for c in window:
            load[c] = load.get(c, 0.0) + min(cpu, k) / k
        contiguous = window[-1] - window[0] == k - 1
        cpuset = (f"{window[0]}-{window[-1]}" if k > 1 else str(window[0])) if contiguous \
            else ",".join(map(str, window))
        out.append((cpuset, int(round(cpu * NS)) if cpu < k - 1e-9 else None))
    return out


def cpuset_load(nodes: list[nb.Node]) -> dict[int, float]:
    """cpu already placed per core by these docker nodes."""
    load: dict[int, float] = {}
    for n in nodes:
        if n.kind != "docker" or not n.cpuset:
            continue
        cores = _parse_cpuset(n.cpuset)
        for c in cores:
            load[c] = load.get(c, 0.0) + min(n.spec.cpu, len(cores)) / len(cores)
    return load


def _parse_cpuset(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


# ----------------------------------------------------------------------------- network

def ensure_network(client, emulator: str, cidr: str, gateway: str, lab: dict) -> str:
    """The emulator's labelled bridge network (made unless this agent has it); -> name."""
    name = network_name(emulator)
    errors = _docker_errors()
    try:
        have = client.networks.get(name)
    except errors.NotFound:
        have = None
    except errors.DockerException as e:
        raise nb.NodeError(f"docker network {name}: {_explain(e)}") from None
    if have is not None:
        cfg = (have.attrs.get("IPAM") or {}).get("Config") or [{}]
        mine = (have.attrs.get("Labels") or {}).get(LABEL_AGENT) == lab[LABEL_AGENT]
        if not mine:
            raise nb.NodeError(f"docker network {name} exists and is not this agent's (remove it, or rename the emulator)")
        if cfg[0].get("Subnet") != cidr or cfg[0].get("Gateway") != gateway:
            raise nb.NodeError(f"docker network {name} has subnet {cfg[0].get('Subnet')}, "
                               f"not {cidr} (reset the emulator first)")
        ingress_firewall(nb.bridge_name(emulator), add=True)
        return name
    from docker.types import IPAMConfig, IPAMPool

    try:
        client.networks.create(
            name, driver="bridge", labels={**lab, f"{LABEL}.emulator": emulator},
            ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=cidr, gateway=gateway)]),
            options={"com.docker.network.bridge.name": nb.bridge_name(emulator)})
    except errors.DockerException as e:
        raise nb.NodeError(f"cannot create docker network {name} ({cidr}): {_explain(e)}") from None
    ingress_firewall(nb.bridge_name(emulator), add=True)
    return name


def ingress_rule(bridge: str) -> list[str]:
    """The iptables rule (without -I/-D) that lets new connections into an emulator's
    docker bridge from other interfaces: Docker's own FORWARD rules accept only replies
    and published ports, which would cut docker nodes off from netns nodes on this
    machine and from nodes of other workers routed here."""
    return ["FORWARD", "-o", bridge, "-m", "comment", "--comment", "edgetb", "-j", "ACCEPT"]


def ingress_firewall(bridge: str, *, add: bool) -> None:
    """Own ingress_rule(bridge) while the network exists (idempotent both ways)."""
    if shutil.which("iptables") is None:
        return
    rule = ingress_rule(bridge)

    def present() -> bool:
        return subprocess.run(["iptables", "-w", "-C"] + rule, capture_output=True).returncode == 0
    if add:
        if not present():
            subprocess.run(["iptables", "-w", "-I"] + rule, capture_output=True)
        return
    while present():
        if subprocess.run(["iptables", "-w", "-D"] + rule, capture_output=True).returncode != 0:
            break


def remove_network(client, name: str, agent_id: str) -> None:
    errors = _docker_errors()
    try:
        net = client.networks.get(name)
    except errors.NotFound:
        return
    if (net.attrs.get("Labels") or {}).get(LABEL_AGENT) != agent_id:
        return                       # not ours: never touched
    _remove_ingress(net)
    deadline = time.monotonic() + NETWORK_GONE_S
    while True:
        try:
            net.remove()
            return
        except errors.NotFound:
            return
        except errors.APIError as e:
            # Seen once after 50 containers were force-removed 8 at a time: the daemon still
            # counted an endpoint that no container had. Give it a moment; then say so.
            if "active endpoints" not in _explain(e) or time.monotonic() > deadline:
                raise nb.NodeError(f"docker network {name}: {_explain(e)} (if no container is on it, "
                                   f"restarting dockerd clears the daemon's stale endpoint)") from None
        time.sleep(0.1)


def _remove_ingress(net) -> None:
    bridge = (net.attrs.get("Options") or {}).get("com.docker.network.bridge.name")
    if bridge and bridge.startswith(nb.BRIDGE_PREFIX):
        ingress_firewall(bridge, add=False)


# ----------------------------------------------------------------------------- containers

def create_nodes(client, specs: list[nb.NodeSpec], *, network: str, rundir_base: Path, lab: dict,
                 cores: list[int], load: dict[int, float], extra_env: dict, then=None) -> list[nb.Node]:
    """Containers for many nodes, each started behind its gate with its namespace attached
    as etb-<node>, PARALLEL at a time; `then(node)`, if given, is called in the same worker
    thread as soon as a node's container is there (the agent installs its links and opens
    its gate: apps start while later containers are still being made). Returns the nodes;
    on failure (of `then` too) removes all of them and raises."""
    errors = _docker_errors()
    try:    # every container's names, in one call (not one call per node)
        taken = {name.lstrip("/") for c in client.api.containers(all=True) for name in c.get("Names") or []}
    except errors.DockerException as e:
        raise nb.NodeError(f"docker: {_explain(e)}") from None
    for s in specs:
        if not s.image:
            raise nb.NodeError(f"docker node {s.name}: no image given")
        if Path(f"/run/netns/{nb.NS_PREFIX}{s.name}").exists():
            raise nb.NodeError(f"node {s.name}: namespace {nb.NS_PREFIX}{s.name} already exists (reset first)")
        if container_name(s.name) in taken:
            raise nb.NodeError(f"node {s.name}: a container {container_name(s.name)} already exists "
                               f"(another testbed's node of that name?)")
    for image in sorted({s.image for s in specs}):
        try:
            client.images.get(image)
        except errors.ImageNotFound:
            raise nb.NodeError(f"no image {image} on this worker: build it (POST /emulated/build, or "
                               f"python3 worker/image.py build --tag {image})") from None
    if any(not s.root for s in specs):
        nb.node_user()                  # NodeError before anything is made
    nb.secure_dir(rundir_base, 0o700)
    placed = place([s.cpu for s in specs], cores, load)
    nodes = [nb.Node(spec=s, kind="docker", netns=nb.NS_PREFIX + s.name, dev=nb.NODE_DEV,
                     rundir=str(rundir_base / s.name), bridge=network, cpuset=cpuset)
             for s, (cpuset, _) in zip(specs, placed)]

    def one(args) -> None:
        n, (_, nano) = args
        _create_one(client, n, nano, network, lab, extra_env)
        n.state = "up"
        if then is not None:
            then(n)                     # its app may be "running" from here on

    try:
        with ThreadPoolExecutor(min(PARALLEL, len(nodes))) as ex:
            list(ex.map(one, zip(nodes, placed)))
    except Exception as e:
        remove_nodes(client, nodes, lab[LABEL_AGENT])
        if isinstance(e, errors.DockerException):
            raise nb.NodeError(f"docker: {_explain(e)}") from None
        raise
    return nodes


def device_requests(gpu: int) -> list:
    """A node's GPUs as Docker device requests (`docker run --gpus N`); none for 0."""
    if not gpu:
        return []
    from docker.types import DeviceRequest

    return [DeviceRequest(count=int(gpu), capabilities=[["gpu"]])]


def _create_one(client, n: nb.Node, nano_cpus: int | None, network: str, lab: dict, extra_env: dict) -> None:
    from docker.types import LogConfig, Mount

    s = n.spec
    # The run dir is the container's /run/edgetb-node (read-only): it must be enterable
    # by the node user; its parents on the host stay root's alone.
    rundir = nb.secure_dir(n.rundir, 0o755)
    nb.mount_rundir(rundir, s.log_mb, 0o755)
    try:
        (rundir / "log").mkdir(exist_ok=True)
        (rundir / GATE).unlink(missing_ok=True)      # one left by an agent that crashed
        os.mkfifo(rundir / GATE, 0o600)
        env = nb.app_env(s, extra_env(s) if callable(extra_env) else extra_env, f"{GATE_DIR}/log")
        nb.app_parent_first(env, s.working_dir or NODE_APP_DIR, s.env)
        priv = {}
        if not s.root:
            # The app (and the gate before it) runs as the node user, numerically (the image
            # need not know the name), with no capability and no way to gain one.
            uid, gid = nb.node_user()
            for path in (rundir / "log", rundir / GATE):
                os.chown(path, uid, gid)
            os.chmod(rundir / "log", 0o700)
            env.setdefault("HOME", "/tmp")
            priv = dict(user=f"{uid}:{gid}", cap_drop=["ALL"])
        mounts = [Mount(target=v["node"], source=v["host"], type="bind", read_only=bool(v.get("ro")))
                  for v in s.volumes]
        mounts += [Mount(target=GATE_DIR, source=str(rundir), type="bind", read_only=True),
                   Mount(target=f"{GATE_DIR}/log", source=str(rundir / "log"), type="bind")]
        ram = s.ram_mb * 2**20
        kw = dict(name=container_name(s.name), hostname=s.name, entrypoint=["/bin/sh", "-c", GATE_SCRIPT, "edgetb-gate"],
                  command=list(s.cmd) or ["sleep", "infinity"], working_dir=s.working_dir or None,
                  environment=env, security_opt=["no-new-privileges"], **priv,
                  labels={**lab, f"{LABEL}.node": s.name}, cpuset_cpus=n.cpuset, mem_limit=ram, memswap_limit=ram,
                  pids_limit=s.pids, ipc_mode="private",
                  log_config=LogConfig(type="json-file", config={"max-size": f"{s.log_mb}m", "max-file": "1"}),
                  mounts=mounts, ports={f"{s.port}/tcp": None}, healthcheck=HEALTH, init=True, detach=True,
                  network=network, networking_config={network: client.api.create_endpoint_config(ipv4_address=s.ip)})
        if nano_cpus:
            kw["nano_cpus"] = nano_cpus
        if s.gpu:
            kw["device_requests"] = device_requests(s.gpu)
        ctr = client.containers.create(s.image, **kw)
        n.container = ctr.id
        ctr.start()
        ctr.reload()
        pid = ctr.attrs["State"]["Pid"]
        if not pid:
            raise nb.NodeError(f"node {s.name}: container exited at once: {ctr.logs(tail=20).decode(errors='replace')}")
        n.pid = pid
        p = subprocess.run(["ip", "netns", "attach", n.netns, str(pid)], capture_output=True, text=True)
        if p.returncode != 0:
            raise nb.NodeError(f"node {s.name}: ip netns attach {n.netns} {pid}: {p.stderr.strip()}")
        ports = (ctr.attrs["NetworkSettings"].get("Ports") or {}).get(f"{s.port}/tcp") or []
        n.host_port = int(ports[0]["HostPort"]) if ports else None
    except BaseException:
        nb.unmount_rundir(rundir)    # nothing mounted stays behind a node that was not made
        raise


def box(n: nb.Node) -> dict:
    """A docker node's limits as asked of the daemon (its /status "box")."""
    s = n.spec
    return {"cpu": s.cpu, "memory_bytes": s.ram_mb << 20, "swap_bytes": 0, "pids_max": s.pids,
            "log_bytes": s.log_mb << 20, "own_ipc_namespace": True, "seccomp": "docker default profile"}


def _ours(ctr, agent_id: str) -> bool:
    return (ctr.labels or {}).get(LABEL_AGENT) == agent_id


def remove_node(client, n: nb.Node, agent_id: str) -> None:
    """Netns name, container (only if it is this agent's) and run dir; fine if gone."""
    if n.netns and Path(f"/run/netns/{n.netns}").exists():
        subprocess.run(["ip", "netns", "del", n.netns], capture_output=True)
    if client is not None:
        errors = _docker_errors()
        try:
            ctr = client.containers.get(n.container or container_name(n.spec.name))
            if _ours(ctr, agent_id):
                ctr.remove(force=True, v=True)
        except errors.NotFound:
            pass
    nb.remove_rundir(n.rundir)


def remove_nodes(client, nodes: list[nb.Node], agent_id: str) -> None:
    """remove_node for many, in parallel (the daemon takes ~0.3 s a container)."""
    if not nodes:
        return
    with ThreadPoolExecutor(min(PARALLEL, len(nodes))) as ex:
        list(ex.map(lambda n: remove_node(client, n, agent_id), nodes))


def sweep(client, agent_id: str) -> list[str]:
    """Remove every container, network and volume labelled as this agent's (what a crashed
    predecessor may have made without recording it), with their netns names. -> what went."""
    errors = _docker_errors()
    gone = []
    flt = {"label": f"{LABEL_AGENT}={agent_id}"}
    for ctr in client.containers.list(all=True, filters=flt):
        node = (ctr.labels or {}).get(LABEL_NODE)
        if node and nb.NAME_RE.match(node) and Path(f"/run/netns/{nb.NS_PREFIX}{node}").exists():
            subprocess.run(["ip", "netns", "del", nb.NS_PREFIX + node], capture_output=True)
        try:
            ctr.remove(force=True, v=True)
            gone.append(f"container {ctr.name}")
        except errors.NotFound:
            pass
    for net in client.networks.list(filters=flt):
        try:
            net.reload()
            _remove_ingress(net)
            net.remove()
            gone.append(f"network {net.name}")
        except errors.NotFound:
            pass
    for vol in client.volumes.list(filters=flt):
        try:
            vol.remove(force=True)
            gone.append(f"volume {vol.name}")
        except errors.NotFound:
            pass
    return gone


def inspect_many(client, nodes: list[nb.Node], agent_id: str) -> dict[str, dict]:
    """{node: {"status", "health"}} of this agent's containers of `nodes`, in one call to
    the daemon (a node whose container is gone is missing). NodeError without a daemon."""
    errors = _docker_errors()
    try:
        seen = client.api.containers(all=True, filters={"label": f"{LABEL_AGENT}={agent_id}"})
    except errors.DockerException as e:
        raise nb.NodeError(f"docker: {_explain(e)}") from None
    by_id = {c.get("Id"): c for c in seen}
    by_name = {name.lstrip("/"): c for c in seen for name in c.get("Names") or []}
    out = {}
    for n in nodes:
        c = by_id.get(n.container) or by_name.get(container_name(n.spec.name))
        if c is not None:
            out[n.spec.name] = {"status": c.get("State", "?"), "health": _health(c.get("Status") or "")}
    return out


def _health(status: str) -> str | None:
    """The health in a container list's Status text ("Up 3 seconds (health: starting)")."""
    for text, health in (("(health: starting)", "starting"), ("(unhealthy)", "unhealthy"),
                         ("(healthy)", "healthy")):
        if text in status:
            return health
    return None


def init_alive(node: nb.Node) -> bool | None:
    """Whether the container's init (pid 1, recorded at create) still runs, without asking
    the daemon: its process is there and in the namespace attached as the node's (so a
    reused pid is not taken for it). None when nothing was recorded."""
    if not node.pid or not node.netns:
        return None
    try:
        return os.stat(f"/proc/{node.pid}/ns/net").st_ino == os.stat(f"/run/netns/{node.netns}").st_ino
    except OSError:
        return False


# ----------------------------------------------------------------------------- apps

class DockerRunner:
    """The Runner of docker nodes: the app is the container's command behind its gate,
    so start opens the gate, stop stops the container, alive asks the daemon."""

    def __init__(self, client_fn):
        self._client = client_fn          # called when needed: the daemon may come later

    def start(self, node: nb.Node, extra_env: dict) -> None:
        """Open the node's gate (its environment, token included, was set at create)."""
        gate = Path(node.rundir) / GATE
        deadline = time.monotonic() + GATE_WAIT_S
        while True:
            try:
                fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                # ENXIO: nobody reads yet, the container is still on its way to the gate
                if e.errno != errno.ENXIO:
                    raise nb.NodeError(f"node {node.spec.name}: gate {gate}: {e.strerror}") from None
            if time.monotonic() > deadline or self.alive(node.spec.name, node) is False:
                raise nb.NodeError(f"node {node.spec.name}: its container did not wait at the gate "
                                   f"(docker logs {container_name(node.spec.name)})")
            time.sleep(0.01)
        try:
            os.write(fd, GATE_OPEN)
        finally:
            os.close(fd)
        node.state = "running"

    def stop(self, node: nb.Node, timeout_s: float = STOP_TIMEOUT_S) -> None:
        errors = _docker_errors()
        try:
            ctr = self._client().containers.get(node.container or container_name(node.spec.name))
            ctr.stop(timeout=int(timeout_s))
        except errors.NotFound:
            pass
        except errors.DockerException as e:
            raise nb.NodeError(f"node {node.spec.name}: docker stop: {_explain(e)}") from None
        node.state = "stopped"

    def alive(self, name: str, node: nb.Node | None = None) -> bool | None:
        info = self.inspect(node) if node is not None else None
        if info is None:
            return None
        return info["status"] in ("running", "created", "restarting")

    def inspect(self, node: nb.Node) -> dict | None:
        """{"status", "health"} of the node's container, None if it is gone."""
        errors = _docker_errors()
        try:
            ctr = self._client().containers.get(node.container or container_name(node.spec.name))
        except (errors.NotFound, nb.NodeError):
            return None
        except errors.DockerException:
            return None
        st = ctr.attrs.get("State") or {}
        return {"status": st.get("Status", "?"), "health": (st.get("Health") or {}).get("Status")}
