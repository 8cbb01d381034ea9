"""Node backends: netns (emulated nodes as network namespaces) and physical (the host);
docker (containers) is in worker/docker_nodes.py.

All hand the same thing to traffic control, a (netns name or None, device) pair (a
container's namespace is attached under its node's name), so there is one way to shape
links; netns and physical nodes run their app through the same process code.

Every kernel object the testbed makes carries the `etb` prefix: namespaces `etb-<node>`
(so `ip netns exec etb-n1 ...` works for users), host veth ends `etbv<hash of the node name>`, bridges
`etbbr<hash>`, cgroups under `edgetb/`, iptables rules with the comment `edgetb`.
"""
from __future__ import annotations

import functools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dml_app import bounded_input, formats
from worker import tc, units
from worker.cgroups import Cgroup, CgroupError
from worker import launch as launcher
from worker import secure
from worker import zygote

NAME_RE = formats.NAME_RE             # the one node-name rule (dml_app/formats.py)
NS_PREFIX = "etb-"
VETH_PREFIX = "etbv"
BRIDGE_PREFIX = "etbbr"
NODE_DEV = "eth0"
LAUNCH = str(Path(__file__).resolve().with_name("launch.py"))
PARALLEL = 8
NODE_USER = "edgetb-node"            # what node apps run as unless they ask for root (install.sh)
NODE_DIR = "/run/edgetb-node"        # the node's own things in its view: log, home, root (volumes)
# Variables of the agent's environment an unprivileged node gets (it gets no secret of
# the agent's and no host path it could not use anyway); root nodes get all of them.
NODE_BASE_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM", "PYTHONPATH", "PYTHONHASHSEED")
MAX_CPU = 1024          # cores a node may ask for
MAX_RAM_MB = 1 << 22    # 4 TiB
MAX_GPU = 64
DEFAULT_PIDS = 512      # processes and threads of one node (its pids cgroup)
MIN_PIDS, MAX_PIDS = 16, 1 << 16
DEFAULT_LOG_MB = 64     # its run dir (log dir, stdout.log): a tmpfs of this size
MAX_LOG_MB = 1 << 16
RUNDIR_INODES = 16384   # files its run dir tmpfs holds at most
CLONE_NEWPID = 0x20000000
LAUNCHERS = ("auto", "exec")    # auto: runtime roles of netns nodes fork from the zygote


class NodeError(RuntimeError):
    pass


def check_name(name: str, what: str = "node name") -> str:
    try:
        return formats.check_name(name, f"bad {what}", what)
    except formats.FormatError as e:
        raise NodeError(str(e)) from None


def link_exists(ifname: str) -> bool:
    """In this process's network namespace (sysfs may show another one's)."""
    try:
        socket.if_nametoindex(ifname)
        return True
    except OSError:
        return False


def veth_name(node: str) -> str:
    """Host end of a node's veth: from its name, which is unique on the machine as its
    namespace is (ids are only unique within one testbed)."""
    return f"{VETH_PREFIX}{zlib.crc32(node.encode()):08x}"


def bridge_name(emulator: str) -> str:
    return f"{BRIDGE_PREFIX}{zlib.crc32(emulator.encode()):08x}"


def _run(argv: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, input=input, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise NodeError(f"{' '.join(argv[:4])}...: {p.stderr.strip() or p.stdout.strip()}")
    return p


def _num(d: dict, key: str, lo: float, hi: float, *, default=None, **kw):
    """d[key] through bounded_input.number (no bools, strings, NaN, infinities; in [lo, hi]);
    `default` when the key is absent or null, KeyError when there is no default."""
    if d.get(key) is None:
        if default is None:
            raise KeyError(key)
        return default
    return bounded_input.number(d[key], key, lo, hi, **kw)


@dataclass
class NodeSpec:
    """What the controller asks for one node (see docs/internals.md)."""
    name: str
    id: int
    ip: str
    port: int
    cpu: float
    ram_mb: int
    cmd: list[str]
    working_dir: str
    volumes: list[dict] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    nic: str | None = None          # physical nodes: the NIC links are shaped on
    image: str = ""                 # docker nodes: the image to run
    gpu: int = 0                    # docker nodes: GPUs asked (a Docker device request)
    root: bool = False              # the app runs as root with the host's view (else as NODE_USER)
    pids: int = DEFAULT_PIDS        # processes and threads at most (cgroup pids.max; docker pids_limit)
    log_mb: int = DEFAULT_LOG_MB    # size of its run dir: its logs (DML_LOG_DIR) and stdout.log

    @classmethod
    def from_dict(cls, d: dict) -> "NodeSpec":
        try:
            spec = cls(name=check_name(d["name"]), id=_num(d, "id", 0, 59999, integer=True),
                       ip=units.ipv4(d["ip"]), port=_num(d, "port", 1, 65535, integer=True),
                       cpu=_num(d, "cpu", 0, MAX_CPU, lo_open=True, default=1.0),
                       ram_mb=_num(d, "ram_mb", 16, MAX_RAM_MB, integer=True, default=1024),
                       cmd=[str(a) for a in d.get("cmd", [])], working_dir=str(d.get("working_dir", "")),
                       volumes=list(d.get("volumes", [])), env={str(k): str(v) for k, v in d.get("env", {}).items()},
                       nic=d.get("nic"), image=str(d.get("image") or ""),
                       gpu=_num(d, "gpu", 0, MAX_GPU, integer=True, default=0),
                       pids=_num(d, "pids", MIN_PIDS, MAX_PIDS, integer=True, default=DEFAULT_PIDS),
                       log_mb=_num(d, "log_mb", 1, MAX_LOG_MB, integer=True, default=DEFAULT_LOG_MB))
        except NodeError:
            raise
        except KeyError as e:
            raise NodeError(f"bad node {str(d.get('name'))[:40]!r}: missing key {e}") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise NodeError(f"bad node {str(d.get('name'))[:40]!r}: {e}") from None
        spec.root = d.get("root", False)
        if not isinstance(spec.root, bool):   # a real JSON bool: "false" would be truthy
            raise NodeError(f"bad node {spec.name}: root must be true or false, not {str(spec.root)[:40]!r}")
        for v in spec.volumes:
            if not (isinstance(v, dict) and os.path.isabs(str(v.get("host", "")))
                    and os.path.isabs(str(v.get("node", ""))) and ".." not in Path(v["node"]).parts):
                raise NodeError(f"bad volume for {spec.name}: {v!r} (host and node paths must be absolute, the node path without '..')")
            if not os.path.isdir(v["host"]):
                raise NodeError(f"volume for {spec.name}: {v['host']} is not a directory on this worker")
        if spec.working_dir and (not os.path.isabs(spec.working_dir) or ".." in Path(spec.working_dir).parts):
            raise NodeError(f"bad node {spec.name}: working_dir {spec.working_dir!r} must be absolute, without '..'")
        if spec.nic is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", str(spec.nic)):
            raise NodeError(f"bad node {spec.name}: nic {spec.nic!r}")
        return spec


@dataclass
class Node:
    """A node this agent made, with everything needed to remove it (persisted as JSON)."""
    spec: NodeSpec
    kind: str                       # "netns" | "physical" | "docker"
    netns: str | None
    dev: str
    rundir: str
    veth: str | None = None
    bridge: str | None = None
    pgid: int | None = None
    state: str = "created"
    container: str | None = None    # docker nodes: container id
    cpuset: str | None = None       # docker nodes: the cores it got
    host_port: int | None = None    # docker nodes: the host port its DML port is published on
    pid: int | None = None          # docker nodes: the host pid of the container's init

    def to_json(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Node":
        d = dict(d)
        d["spec"] = NodeSpec(**d["spec"])
        return cls(**d)


def app_env(spec: NodeSpec, extra_env: dict, log_dir: str, base=None) -> dict:
    """The environment a node app gets, whatever runs it: `base` (the agent's own for a
    process it starts, nothing for a container; only NODE_BASE_ENV of it for a node that
    is not root), the node's (EdgeTB's variables), the agent's (its credentials),
    unbuffered output, and where logs go (appended to by a restarted app) and how much
    cpu it has unless already set."""
    base = dict(base or {})
    if not spec.root:
        base = {k: v for k, v in base.items() if k in NODE_BASE_ENV or k.startswith("LC_")}
    env = base
    env.update(spec.env)
    env.update(extra_env)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DML_LOG_DIR", log_dir)
    env.setdefault("DML_LOG_APPEND", "1")    # log_dir is the node's own, new each deployment
    env.setdefault("DML_CPU", f"{spec.cpu:g}")
    return env


def app_parent_first(env: dict, app_dir: str, node_env: dict) -> None:
    """Put the folder holding the node's app folder (its working dir, as the node sees
    it) first on the app's PYTHONPATH, unless the node sets PYTHONPATH itself. A role runs
    as `python3 fl_trainer.py` in its dml_app/ folder and imports `dml_app.<module>`:
    this way it imports the dml_app/ it was given (its volume), not another copy."""
    if "PYTHONPATH" in node_env or not app_dir:
        return
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(app_dir.rstrip("/")) or "/"] + rest)


def secure_dir(path, mode: int = 0o755) -> Path:
    """worker/secure.py's secure_dir (a root-owned real directory with `mode`, made if
    missing), failing with NodeError. The agent's state dir and node run dirs use it."""
    try:
        return secure.secure_dir(path, mode)
    except (secure.UnsafePath, OSError) as e:
        raise NodeError(str(e)) from None


def node_user() -> tuple[int, int]:
    """(uid, gid) node apps run as; NodeError when install.sh has not made the user."""
    try:
        pw = pwd.getpwnam(NODE_USER)
    except KeyError:
        raise NodeError(f"no user {NODE_USER} on this worker: node apps run as that unprivileged user; "
                        f"run ./install.sh (as root) to create it, or give the node root=True") from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise NodeError(f"user {NODE_USER} must not be root (uid {pw.pw_uid}, gid {pw.pw_gid})")
    return pw.pw_uid, pw.pw_gid


@functools.lru_cache(maxsize=1)
def _tools() -> dict:
    return {t: shutil.which(t) for t in ("setpriv", "tini")}


def node_tools() -> dict:
    """Absolute paths of what worker/launch.py runs an unprivileged app through
    (util-linux's setpriv, tini); NodeError naming what is missing."""
    tools = _tools()
    missing = [t for t, path in tools.items() if not path]
    if missing:
        _tools.cache_clear()
        raise NodeError(f"{', '.join(missing)} missing on this worker: unprivileged node apps run through "
                        f"setpriv (util-linux) and tini; run ./install.sh (as root)")
    return dict(tools)


def check_users(specs: list[NodeSpec]) -> None:
    """Before anything is made: nodes with an app that are not root need NODE_USER and
    the tools their launch goes through."""
    if any(s.cmd and not s.root for s in specs):
        node_user()
        node_tools()


def _can(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return (st.st_mode >> shift) & bits == bits


def _enterable(path: str, uid: int, gid: int) -> bool:
    """Whether uid:gid may reach and list `path` (mode bits; ACLs aside)."""
    parts = Path(path).parts
    try:
        return (all(_can(os.stat(str(Path(*parts[:i]))), uid, gid, 0o1) for i in range(1, len(parts)))
                and _can(os.stat(path), uid, gid, 0o5))
    except OSError:
        return False


@functools.lru_cache(maxsize=4)
def python_exposure(uid: int, gid: int) -> tuple:
    """Where the agent's Python (prefix and site-packages) sits behind a folder the node
    user may not enter (pyenv under /root, say): ((closed folder, (paths, ...)), ...),
    for the launcher to show those paths alone. NodeError when a path itself is closed."""
    want = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                                          os.path.dirname(os.path.realpath(sys.executable)))}
    want |= {os.path.realpath(p) for p in sys.path
             if os.path.isabs(p) and ("site-packages" in p or "dist-packages" in p) and os.path.isdir(p)}
    outer = sorted(p for p in want if not any(p.startswith(q.rstrip("/") + "/") for q in want if q != p))
    closed: dict[str, list[str]] = {}
    for p in outer:
        parts = Path(p).parts
        for i in range(1, len(parts)):
            a = str(Path(*parts[:i]))
            if not _can(os.stat(a), uid, gid, 0o1):
                closed.setdefault(a, []).append(p)
                break
        if not _can(os.stat(p), uid, gid, 0o5):
            raise NodeError(f"the agent's Python folder {p} is not readable by {NODE_USER}: "
                            f"make it readable (chmod -R o+rX) or give the node root=True")
    return tuple((a, tuple(ps)) for a, ps in closed.items())


def stop_group(p: subprocess.Popen, timeout_s: float = 5.0) -> int | None:
    """End a process started with start_new_session=True: SIGTERM its process group,
    SIGKILL the group if the leader lingers past timeout_s; returns its exit code. A
    zygote child (pid 1 of its PID namespace) is signalled itself; its namespace dies with it."""
    def kill(sig):
        if isinstance(p, subprocess.Popen):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        else:                       # a zygote child: by its pidfd (worker/zygote.py)
            p.send_signal(sig)

    if p.poll() is None:
        kill(signal.SIGTERM)
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            kill(signal.SIGKILL)
            p.wait(5)
    return p.returncode


def spec_fd(launch: dict) -> int:
    """A memfd holding the launch spec (its environment, credentials included): handed to
    worker/launch.py (pass_fds) or to a zygote child (SCM_RIGHTS), never on a command line.
    Close-on-exec here; the caller closes it."""
    fd = os.memfd_create(f"edgetb-launch-{launch['name']}", os.MFD_CLOEXEC)
    try:
        os.write(fd, json.dumps(launch).encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def mount_rundir(path, size_mb: int, mode: int = 0o700) -> None:
    """The node's run dir as a tmpfs of size_mb (its logs, stdout.log, the gate of a
    docker node): a node that writes without end fills its own, with ENOSPC, and no
    one else's; the pages count in its memory limit too (the writer's cgroup). Made
    on the host at node creation, so the agent reads the logs there as before, and
    gone with the node (unmount_rundir). Idempotent."""
    path = str(path)
    if os.path.ismount(path):
        return
    try:
        launcher.mount("edgetb-node", path, "tmpfs", launcher.MS_NOSUID | launcher.MS_NODEV | launcher.MS_NOEXEC,
                     f"size={int(size_mb)}m,nr_inodes={RUNDIR_INODES},mode={mode:o},uid=0,gid=0")
    except launcher.LaunchError as e:
        raise NodeError(f"run dir {path}: {e}") from None


def unmount_rundir(path) -> None:
    """Unmount the node's run dir tmpfs (lazily: a node app still exiting may hold a file
    in it), however many times it is mounted; fine if it is not."""
    path = str(path)
    for _ in range(8):
        if not os.path.ismount(path):
            return
        try:
            launcher.umount(path)
        except launcher.LaunchError as e:
            print(f"agent: unmounting {path}: {e}", file=sys.stderr)
            return


def remove_rundir(path) -> None:
    unmount_rundir(path)
    shutil.rmtree(path, ignore_errors=True)


_libc = None


def _new_pidns_for_children() -> int:
    """Children this thread forks from now on go to a new PID namespace, the first as
    its pid 1 (the kernel keeps this per thread). -> an fd of the thread's own PID
    namespace, for _own_pidns_again."""
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    if _libc.unshare(CLONE_NEWPID) != 0:
        import ctypes
        err = ctypes.get_errno()
        os.close(own)
        raise NodeError(f"unshare of a PID namespace for a node app: {os.strerror(err)}")
    return own


def _own_pidns_again(own: int) -> None:
    import ctypes
    try:
        if _libc.setns(own, CLONE_NEWPID) != 0:
            err = ctypes.get_errno()
            raise RuntimeError(f"setns back to the agent's PID namespace: {os.strerror(err)}")
    finally:
        os.close(own)


class Runner:
    """Starts and stops node apps: own process group, cgroup, stdout to a file."""

    def __init__(self, launcher: str = "auto"):
        if launcher not in LAUNCHERS:
            raise NodeError(f"bad launcher {launcher!r}: one of {', '.join(LAUNCHERS)}")
        self.launcher = launcher
        self._procs: dict[str, subprocess.Popen | zygote.ZygoteProc] = {}
        self._lock = threading.Lock()
        self.zygote = zygote.Zygote()

    def close(self) -> None:
        """Stop the zygote (apps it started keep running until stopped or reset)."""
        self.zygote.close()

    def _forks(self, node: Node, argv: list[str]) -> str | None:
        """Whether the zygote runs this app (worker/zygote.py): a netns node running one of
        the scripts of a folder identical to the dml_app/ the zygote loads -> its digest."""
        if self.launcher == "exec" or node.kind != "netns" or not zygote.script_of(argv):
            return None
        folder = zygote.host_folder(node.spec.working_dir, node.spec.volumes)
        try:
            if folder is None or not os.path.isfile(os.path.join(folder, argv[1])):
                return None
            digest = zygote.source_digest(folder)
            return digest if digest == zygote.source_digest(zygote.DML_APP) else None
        except OSError:
            return None

    def _fork(self, digest: str, launch: dict, out) -> zygote.ZygoteProc:
        if self.zygote.ensure() != digest:      # dml_app/ changed since it started: a fresh one
            self.zygote.close()
            if self.zygote.ensure() != digest:
                raise zygote.ZygoteError("its sources differ from the node's folder")
        fd = spec_fd(launch)
        try:
            return self.zygote.spawn(fd, out.fileno())
        finally:
            os.close(fd)

    def start(self, node: Node, extra_env: dict) -> None:
        """Start the node's app through worker/launch.py. The launch spec, environment
        and credentials included, goes in a memfd the launcher inherits (fd N of
        `launch.py --spec-fd N`): nothing of it is on a command line."""
        spec = node.spec
        if not spec.cmd:
            node.state = "idle"
            return
        user = None if spec.root else node_user()       # before anything is made
        tools = None if spec.root else node_tools()
        if user and not spec.volumes and spec.working_dir and not _enterable(spec.working_dir, *user):
            # Without volumes the app runs in the host's folder: say so now, not in stdout.log.
            raise NodeError(f"node {spec.name}: working_dir {spec.working_dir} is missing or not readable by {NODE_USER} "
                            f"(the app's user): mount it as a volume, open its permissions, or give the node root=True")
        rundir = secure_dir(node.rundir, 0o700)
        log = rundir / "log"
        log.mkdir(exist_ok=True)
        argv = list(spec.cmd)
        if argv[0] in ("python3", "python"):
            argv[0] = sys.executable  # the agent's interpreter has torch and friends
        launch = {"name": spec.name, "netns": node.netns, "argv": argv, "root": spec.root}
        if spec.root:
            # As root, with the host's view: volumes inside the node's own root under its
            # run dir, so a volume at /home/worker/dml_app never touches the host's /home.
            root = rundir / "root"
            launch["binds"] = [{"source": v["host"], "target": str(root / v["node"].lstrip("/")),
                                "ro": bool(v.get("ro"))} for v in spec.volumes]
            cwd = str(root / spec.working_dir.lstrip("/")) if spec.volumes else (spec.working_dir or node.rundir)
            os.makedirs(cwd, exist_ok=True)
            env = app_env(spec, extra_env, str(log), base=os.environ)
            app_parent_first(env, cwd, spec.env)
        else:
            uid, gid = user
            os.chown(log, uid, gid)
            os.chmod(log, 0o700)
            (rundir / "view").mkdir(exist_ok=True)        # where the launcher builds the node's /run
            launch["binds"] = [{"source": v["host"], "target": v["node"], "ro": bool(v.get("ro"))}
                               for v in spec.volumes]
            cwd = (f"{NODE_DIR}/root/{spec.working_dir.lstrip('/')}".rstrip("/") if spec.volumes
                   else spec.working_dir or f"{NODE_DIR}/home")
            env = app_env(spec, extra_env, f"{NODE_DIR}/log", base=os.environ)
            env.update(HOME=f"{NODE_DIR}/home", USER=NODE_USER, LOGNAME=NODE_USER)
            app_parent_first(env, cwd, spec.env)
            launch.update(user={"uid": uid, "gid": gid}, rundir=str(rundir), tools=tools,
                          expose=python_exposure(uid, gid) if argv[0] == sys.executable else (),
                          tmpfs_mb=max(16, spec.ram_mb // 4))
        cg = Cgroup(spec.name)
        try:
            cg.create(spec.cpu, spec.ram_mb, spec.pids)
        except CgroupError as e:    # e.g. cpu/memory not available to cgroup v2 here: say so (422)
            raise NodeError(f"node {spec.name}: {e}") from None
        launch.update(cgroup_procs=cg.procs_files, cwd=cwd, env=env)
        p = None
        digest = self._forks(node, argv)
        if digest:
            try:
                with open(rundir / "stdout.log", "ab") as out:
                    p = self._fork(digest, launch, out)
            except zygote.ZygoteError as e:   # the exec path below still works: say so, use it
                print(f"agent: node {spec.name}: {e}; starting it with exec", file=sys.stderr, flush=True)
        if p is None:
            p = self._exec(spec.name, launch, rundir, pidns=not spec.root)
        with self._lock:
            self._procs[spec.name] = p
        node.pgid = p.pid
        node.state = "running"

    @staticmethod
    def _exec(name: str, launch: dict, rundir: Path, pidns: bool = False) -> subprocess.Popen:
        """worker/launch.py with the spec in an inherited memfd; with pidns, as pid 1 of a
        new PID namespace (an unprivileged node's: the launcher mounts its /proc)."""
        fd = spec_fd(launch)
        try:
            with open(rundir / "stdout.log", "ab") as out:
                own = _new_pidns_for_children() if pidns else None
                try:
                    # -I -S: the launcher needs the standard library alone; starts faster.
                    return subprocess.Popen([sys.executable, "-I", "-S", LAUNCH, "--spec-fd", str(fd)],
                                            pass_fds=(fd,), stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                finally:
                    if own is not None:
                        _own_pidns_again(own)
        finally:
            os.close(fd)

    def stop(self, node: Node, timeout_s: float = 5.0) -> None:
        """SIGTERM the app's process group, SIGKILL after timeout_s; then empty its cgroup."""
        with self._lock:
            p = self._procs.pop(node.spec.name, None)
        if p is not None:
            stop_group(p, timeout_s)
        cg = Cgroup(node.spec.name)
        cg.kill_all(timeout_s)   # children that left the group, or an app from before a restart
        cg.remove()
        node.pgid = None
        node.state = "stopped"

    def alive(self, name: str) -> bool | None:
        with self._lock:
            p = self._procs.get(name)
        return None if p is None else p.poll() is None


# ----------------------------------------------------------------------------- netns backend

def ensure_bridge(name: str, gateway_cidr: str) -> None:
    """Bridge with the gateway address; idempotent."""
    if not link_exists(name):
        _run(["ip", "link", "add", name, "type", "bridge"])
    have = _run(["ip", "-o", "addr", "show", "dev", name]).stdout
    if f" {gateway_cidr} " not in have:
        _run(["ip", "addr", "add", gateway_cidr, "dev", name])
    _run(["ip", "link", "set", name, "up"])
    _bridge_firewall(name, add=True)


def remove_bridge(name: str) -> None:
    _bridge_firewall(name, add=False)
    if link_exists(name):
        _run(["ip", "link", "del", name], check=False)
    restore_neighbour_table()


NEIGH_SYSCTL = Path("/proc/sys/net/ipv4/neigh/default")
NEIGH_SAVED = Path("/run/edgetb/neigh-gc-thresh.json")   # the host's own values while raised


def _neigh(path: Path | None = None) -> dict[str, int]:
    base = path or NEIGH_SYSCTL
    return {k: int((base / k).read_text()) for k in ("gc_thresh1", "gc_thresh2", "gc_thresh3")}


def size_neighbour_table(nodes: int, sysctl: Path | None = None, saved: Path | None = None) -> dict[str, int]:
    """Make the kernel's ARP table fit `nodes` nodes. It is one table for every namespace
    (gc_thresh3: 1,024 entries by default): 300 nodes, each knowing a few neighbours and
    known by the host and the aggregator, overflow it ("neighbor table overflow", then
    "No route to host" between nodes). Thresholds are only raised, for up to `nodes`
    neighbours a node; the host's values are kept in NEIGH_SAVED for
    restore_neighbour_table. -> the values in force."""
    sysctl, saved = sysctl or NEIGH_SYSCTL, saved or NEIGH_SAVED
    have = _neigh(sysctl)
    want3 = 1024 + nodes * (nodes + 2)
    want = {"gc_thresh1": max(have["gc_thresh1"], 2 * nodes + 128),
            "gc_thresh2": max(have["gc_thresh2"], want3 // 2), "gc_thresh3": max(have["gc_thresh3"], want3)}
    if want != have:
        if not saved.exists():
            secure.write_private(saved, json.dumps(have), 0o755)
        for k in ("gc_thresh3", "gc_thresh2", "gc_thresh1"):    # largest first: each <= the next
            (sysctl / k).write_text(str(want[k]))
    return want


def restore_neighbour_table(sysctl: Path | None = None, saved: Path | None = None) -> None:
    """The host's own ARP table thresholds back, once no testbed bridge is left on it."""
    sysctl, saved = sysctl or NEIGH_SYSCTL, saved or NEIGH_SAVED
    if not saved.exists() or any(d.startswith(BRIDGE_PREFIX) for d in os.listdir("/sys/class/net")):
        return
    try:
        old = {k: int(v) for k, v in json.loads(saved.read_text()).items()}
        for k in ("gc_thresh1", "gc_thresh2", "gc_thresh3"):     # smallest first
            if k in old:
                (sysctl / k).write_text(str(old[k]))
    except (OSError, ValueError, AttributeError) as e:
        print(f"agent: restoring the ARP table thresholds from {saved}: {e}", file=sys.stderr)
    saved.unlink(missing_ok=True)


def _bridge_firewall(bridge: str, *, add: bool) -> None:
    """With br_netfilter loaded and Docker's FORWARD policy DROP, bridged frames between
    namespaces are silently dropped; own an accept rule for our bridge while it exists.
    Added whenever iptables is there: Docker may start (and load br_netfilter) later."""
    if shutil.which("iptables") is None:
        return
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-m", "comment", "--comment", "edgetb", "-j", "ACCEPT"]
    present = subprocess.run(["iptables", "-w", "-C"] + rule, capture_output=True).returncode == 0
    if add and not present:
        subprocess.run(["iptables", "-w", "-I"] + rule, capture_output=True)
    elif not add:
        while present:
            subprocess.run(["iptables", "-w", "-D"] + rule, capture_output=True)
            present = subprocess.run(["iptables", "-w", "-C"] + rule, capture_output=True).returncode == 0


def create_netns_nodes(specs: list[NodeSpec], bridge: str, prefixlen: int, gateway: str,
                       rundir_base: Path) -> list[Node]:
    """Namespaces, veths on the bridge and addresses for many nodes at once.

    The host side is one `ip -batch` process; each namespace is configured by one more,
    run in parallel. Returns the nodes; on failure removes what it made and raises.
    """
    check_users(specs)
    secure_dir(rundir_base, 0o700)
    nodes = []
    host_lines = []
    for s in specs:
        ns, veth = NS_PREFIX + s.name, veth_name(s.name)
        if Path(f"/run/netns/{ns}").exists():
            raise NodeError(f"node {s.name}: namespace {ns} already exists (reset first)")
        if link_exists(veth):
            # The rollback below removes every veth of this batch: never one we did not make.
            raise NodeError(f"node {s.name}: host link {veth} already exists (another testbed's node of that name?)")
        rundir = rundir_base / s.name
        nodes.append(Node(spec=s, kind="netns", netns=ns, dev=NODE_DEV, rundir=str(rundir),
                          veth=veth, bridge=bridge))
        host_lines += [f"netns add {ns}",
                       f"link add {veth} type veth peer name {NODE_DEV} netns {ns}",
                       f"link set {veth} master {bridge} up"]
    try:
        _run(["ip", "-batch", "-"], input="\n".join(host_lines) + "\n")
        try:
            size_neighbour_table(sum(1 for ns in os.listdir("/run/netns") if ns.startswith(NS_PREFIX)))
        except OSError as e:    # a read-only /proc/sys (in a container): work, with the host's table
            print(f"agent: cannot size the ARP table for these nodes: {e}", file=sys.stderr)

        def inside(n: Node) -> None:
            secure_dir(n.rundir, 0o700)
            mount_rundir(n.rundir, n.spec.log_mb)
            _run(["ip", "-n", n.netns, "-batch", "-"], input="\n".join([
                f"addr add {n.spec.ip}/{prefixlen} dev {NODE_DEV}",
                f"link set {NODE_DEV} up", "link set lo up",
                f"route add default via {gateway}"]) + "\n")

        with ThreadPoolExecutor(PARALLEL) as ex:
            list(ex.map(inside, nodes))
    except Exception:
        for n in nodes:
            remove_netns_node(n)
        raise
    for n in nodes:
        n.state = "up"
    return nodes


def remove_netns_node(n: Node) -> None:
    if n.veth and link_exists(n.veth):
        _run(["ip", "link", "del", n.veth], check=False)
    if n.netns and Path(f"/run/netns/{n.netns}").exists():
        _run(["ip", "netns", "del", n.netns], check=False)
    remove_rundir(n.rundir)


def install_links(nodes: list[Node], links: dict[str, list[tc.Link]],
                  tables: dict[str, tc.LinkTable]) -> dict[str, int]:
    """One tc batch per node, in parallel; then read every table back. -> links per node."""
    def one(n: Node) -> tuple[str, int]:
        # own_port: the port the node's app listens on (in its namespace, its container or
        # on the host), so its answers to a linked node are shaped by that link too
        table = tc.LinkTable(dev=n.dev, netns=n.netns, own_port=n.spec.port)
        mine = links.get(n.spec.name, [])
        if n.kind == "physical":
            tc.clear(None, n.dev)
        tc.install(table, mine)
        tables[n.spec.name] = table
        return n.spec.name, tc.verify(table)

    with ThreadPoolExecutor(PARALLEL) as ex:
        return dict(ex.map(one, nodes))
