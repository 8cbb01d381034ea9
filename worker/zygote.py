"""The forking launcher (zygote) for node apps that are runtime roles.

Starting `python3 fl_trainer.py` in every node costs each one an interpreter and an
import of torch: about 230 MB and seconds of cpu per node, so a machine stops at a few
dozen nodes. The zygote is one process per agent that imports torch, numpy, Flask and
the runtime and roles of dml_app/ once, warms them up (one tiny training step, so the
lazily built kernels and tables are shared too), freezes its objects out of the garbage
collector's reach and then forks a child per node. A child shares every page it does
not write with the zygote and its siblings: a few MB of its own instead of 230.

A child does what worker/launch.py does for an exec'd app, with the same code
(launch.prepare): it joins the node's cgroups, its network namespace and a mount
namespace of its own with its binds (the locked view for an unprivileged node) and
chdirs; it is pid 1 of a PID namespace of its own with its own /proc (the zygote
unshares one for each child, as the agent does for an exec'd app's launcher);
it drops privileges as setpriv does (no groups, not root, no capabilities in any set,
bounding set empty, no_new_privs) and installs the seccomp filter (launch.confine;
the IPC namespace of its own came with launch.prepare), takes the node's environment (credentials included,
which come over the agent's socket, never on a command line), stdout and stderr
(stdout.log), reseeds Python's, numpy's and torch's generators, and runs the role's
script with runpy as `python3 fl_trainer.py` would (`__main__`, sys.argv, sys.path[0]).
It is the node app: the agent stops it with SIGTERM to that pid (its handler ends the
runtime) and SIGKILL after the grace period, then empties the node's cgroup, as for an
exec'd app. Apps of this kind have no tini: roles start no processes to reap.

Which apps: `python3 <script>.py [args]` whose folder on the host (the volume holding
the node's working dir) has exactly the Python sources the zygote loaded
(source_digest); anything else (a user's own EdgeTB app, `iperf3 -s`, a changed role)
is exec'd through worker/launch.py as before.

Protocol (a SOCK_SEQPACKET socket pair; the agent holds one end, the zygote inherits
the other as `--sock-fd N`): the zygote first sends `{"ready": true, "digest": hex,
"pid": pid}`. The agent sends `{"op": "spawn"}` with two fds attached (SCM_RIGHTS): a
memfd holding the launch spec, which only the child reads (so no node's credentials stay
in the zygote, whose memory later children copy), and stdout.log and gets `{"pid": host pid}` with a pidfd of the
child attached, or `{"error": "..."}`; `{"op": "exit_code", "pid": p}` answers
`{"code": c}` (null while it runs). The zygote exits when the agent's end closes (its
children keep running, to be ended by the agent's cgroup cleanup like any app).
"""
from __future__ import annotations

import array
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DML_APP = ROOT / "dml_app"
MAX_MSG = 1 << 20            # a spec is a few kB; the env and binds are bounded by the agent
READY_TIMEOUT_S = 120.0      # torch's import on a loaded machine
# glibc: a fixed mmap threshold keeps large tensors out of the heap (else freed ones stay
# as dirty heap pages, ~40 MB a node), and one BLAS thread per process: a thread alive
# at fork would be lost in the child and nodes share cores anyway.
# Room in the zygote's own environment block, which its children overwrite with theirs so
# that /proc/PID/environ shows the node's environment (as for an exec'd app).
ENV_ROOM = 32 << 10
ZYGOTE_ENV = {"EDGETB_ENV_ROOM": "." * ENV_ROOM, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
              "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


class ZygoteError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- which apps

_digests: dict[tuple, str] = {}


def source_digest(folder: str | Path) -> str:
    """sha256 over the relative paths and contents of every *.py file under folder;
    cached per (folder, their sizes and mtimes)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*.py") if p.is_file() and "__pycache__" not in p.parts)
    key = (str(folder), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _digests:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(folder)).encode() + b"\0")
            h.update(p.read_bytes() + b"\0")
        if len(_digests) > 64:               # folders come and go with shares: stay bounded
            _digests.clear()
        _digests[key] = h.hexdigest()
    return _digests[key]


def host_folder(working_dir: str, volumes: list[dict]) -> str | None:
    """The host folder a node's working dir is (through the volume that holds it)."""
    best = None
    for v in volumes:
        node = v["node"].rstrip("/") or "/"
        if working_dir == node or working_dir.startswith(node.rstrip("/") + "/"):
            if best is None or len(node) > len(best[0]):
                best = (node, v["host"])
    if best is not None:
        rest = working_dir[len(best[0]):].lstrip("/")
        return str(Path(best[1]) / rest) if rest else best[1]
    if volumes:
        return None                      # a working dir outside every volume: not on the host
    return working_dir or None


def script_of(argv: list[str]) -> str | None:
    """The script of `python3 <script>.py [args]` (argv[0] already the agent's Python)."""
    if len(argv) >= 2 and argv[0] == sys.executable and argv[1].endswith(".py") and "/" not in argv[1]:
        return argv[1]
    return None


# ----------------------------------------------------------------------------- agent side

def _ready(fd, timeout_s: float | None, events: int = select.POLLIN) -> bool:
    """Whether `fd` (or a socket) is ready within timeout_s (None: wait); poll(), which
    has no ceiling at descriptor 1024 as select() has (the agent may hold thousands)."""
    p = select.poll()
    p.register(fd, events)
    return bool(p.poll(None if timeout_s is None else max(0, int(timeout_s * 1000))))


def _send(sock: socket.socket, msg: dict, fds=()) -> None:
    data = json.dumps(msg).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def _recv(sock: socket.socket, timeout_s: float | None) -> tuple[dict, list[int]]:
    if timeout_s is not None:
        if not _ready(sock, timeout_s):
            raise TimeoutError(f"no answer from the zygote in {timeout_s:.0f} s")
    fds = array.array("i")
    data, anc, _flags, _addr = sock.recvmsg(MAX_MSG, socket.CMSG_LEN(4 * fds.itemsize))
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError("the zygote closed its socket")
    return json.loads(data), list(fds)


class ZygoteProc:
    """A zygote child as the agent sees it: Popen's poll/wait/returncode, signals by pidfd
    (no pid reuse can misdirect them)."""

    def __init__(self, zygote: "Zygote", pid: int, pidfd: int):
        self.zygote, self.pid, self.pidfd = zygote, pid, pidfd
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.pidfd >= 0:
            if _ready(self.pidfd, 0):       # readable once it has exited
                self.returncode = self.zygote.exit_code(self.pid)
                if self.returncode is None:
                    self.returncode = -1                          # not reaped yet or unknown
                os.close(self.pidfd)
                self.pidfd = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"zygote child {self.pid}", timeout)
            _ready(self.pidfd, left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """To the app itself: pid 1 of its PID namespace (SIGKILL ends the namespace)."""
        if self.poll() is None:
            try:
                import signal
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def __del__(self):
        if getattr(self, "pidfd", -1) >= 0:
            os.close(self.pidfd)


class Zygote:
    """The agent's handle on its zygote: started on first use, one request at a time."""

    def __init__(self, log_path: str | Path | None = None):
        self.log_path = log_path
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self.digest: str | None = None

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TZ", "PYTHONPATH")}
        env.update(ZYGOTE_ENV)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            # Its own session: a Ctrl-C meant for the controller does not reach it.
            self._proc = subprocess.Popen([sys.executable, __file__, "--sock-fd", str(theirs.fileno())],
                                          pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            theirs.close()
            if out is not subprocess.DEVNULL:
                out.close()
        self._sock = ours
        try:
            msg, _ = _recv(ours, READY_TIMEOUT_S)
        except (TimeoutError, EOFError, ValueError, OSError) as e:
            self.close()
            raise ZygoteError(f"the zygote did not start: {e}"
                              + (f" (see {self.log_path})" if self.log_path else "")) from None
        if not msg.get("ready"):
            self.close()
            raise ZygoteError(f"the zygote did not start: {msg.get('error', msg)}")
        self.digest = msg["digest"]

    def ensure(self) -> str:
        """Start it if it is not running; -> the digest of the sources it loaded."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self.close_locked()
                self._start()
            return self.digest

    def spawn(self, spec_fd: int, stdout_fd: int) -> ZygoteProc:
        """A child running the launch spec in memfd `spec_fd` (which only the child reads:
        no node's credentials stay in the zygote's memory, which later children copy)."""
        with self._lock:
            if self._sock is None:
                raise ZygoteError("the zygote is not running")
            try:
                _send(self._sock, {"op": "spawn"}, [spec_fd, stdout_fd])
                msg, fds = _recv(self._sock, 60)
            except (OSError, EOFError, TimeoutError, ValueError) as e:
                self.close_locked()
                raise ZygoteError(f"zygote: {e}") from None
        if "error" in msg or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ZygoteError(f"zygote: {msg.get('error', 'no pidfd in its answer')}")
        return ZygoteProc(self, int(msg["pid"]), fds[0])

    def exit_code(self, pid: int) -> int | None:
        with self._lock:
            if self._sock is None:
                return None
            try:
                _send(self._sock, {"op": "exit_code", "pid": pid})
                msg, _ = _recv(self._sock, 30)
            except (OSError, EOFError, TimeoutError, ValueError):
                return None
            return msg.get("code")

    def close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()      # the zygote exits on EOF
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid


# ----------------------------------------------------------------------------- zygote side

CLONE_NEWPID = 0x20000000
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _preload() -> None:
    """Import and warm up what every role uses, without leaving a thread running. The
    roles import one another as dml_app.<module>, so a forked app finds them loaded."""
    global np, torch
    import importlib

    import numpy as np
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    for p in sorted(DML_APP.glob("*.py")):
        if p.stem != "__init__":                  # roles are guarded by __name__ == "__main__"
            importlib.import_module(f"dml_app.{p.stem}")
    from safetensors.torch import load, save

    from dml_app import learn, nns

    for name in ("mnist", "fashion"):
        model = nns.build_model({"name": name, "input_shape": [1, 28, 28], "num_classes": 10})
        x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
        y = np.arange(8, dtype=np.int64) % 10
        learn.train_epochs(model, x, y, epochs=1, batch_size=4, lr=0.01, seed=0)
        learn.evaluate(model, x, y)
        load(save(model.state_dict()))


def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc, ctypes


def _ok(ret: int, what: str, ctypes) -> None:
    if ret < 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def drop_privileges(uid: int, gid: int) -> None:
    """What `setpriv --reuid --regid --clear-groups --inh-caps=-all --ambient-caps=-all
    --bounding-set=-all --no-new-privs` does, checked afterwards in /proc/self/status."""
    libc, ctypes = _libc()
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        _ok(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}", ctypes)
    _ok(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities", ctypes)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()                 # effective, permitted, inheritable: none
    _ok(libc.capset(header, data), "capset", ctypes)
    _ok(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs", ctypes)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    caps = [status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")]
    if any(int(c, 16) for c in caps) or status["NoNewPrivs"].strip() != "1" or os.getgroups():
        raise OSError(f"privileges still held after dropping them: {caps}, groups {os.getgroups()}")


def _overwrite(start: int, end: int, strings: list[str], ctypes) -> None:
    """Write NUL-terminated strings over [start, end) of our memory (the block the kernel
    shows as /proc/PID/cmdline or environ), whole strings only, NUL-padded."""
    block = b""
    for item in strings:
        b = os.fsencode(item) + b"\0"
        if len(block) + len(b) > end - start:
            break
        block += b
    ctypes.memmove(start, block.ljust(end - start, b"\0"), end - start)


def retitle(argv: list[str], env: dict) -> None:
    """What ps and /proc/PID/{cmdline,environ} show: the app's argv and environment, as
    for an exec'd app (the zygote's are overwritten in place; what does not fit is cut)."""
    _libc_, ctypes = _libc()
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    arg_start, arg_end, env_start, env_end = (int(x) for x in stat[45:49])
    _overwrite(arg_start, arg_end, argv, ctypes)
    _overwrite(env_start, env_end, [f"{k}={v}" for k, v in env.items()], ctypes)


def _child(spec_fd: int, out_fd: int) -> None:
    """In the forked child: become the node's app (module docstring). Never returns."""
    code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        spec = launch.read_spec(spec_fd)           # read here, never in the zygote
        os.closerange(3, 1 << 16)                  # the agent's socket and the pidns fd go
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        launch.prepare(spec)
        launch.mount_proc()
        if not spec.get("root"):
            drop_privileges(spec["user"]["uid"], spec["user"]["gid"])
        launch.confine(spec)
        os.environ.clear()
        os.environ.update(spec["env"])
        retitle(spec["argv"], spec["env"])
        random.seed()
        np.random.seed()
        torch.seed()
        argv = spec["argv"][1:]
        script = os.path.abspath(argv[0])
        sys.argv = [script] + argv[1:]
        # What `python3 script.py` does to sys.path[0]: the script's folder in place of
        # the zygote's own (worker/); the rest (PYTHONPATH, site-packages) is the same.
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:   # noqa: BLE001 - whatever it is, it goes to stdout.log
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(sock: socket.socket) -> None:
    libc, ctypes = _libc()
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    codes: dict[int, int] = {}

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            codes[pid] = os.waitstatus_to_exitcode(status)
            if len(codes) > 10000:
                codes.pop(next(iter(codes)))

    while True:
        r = _ready(sock, 1.0)
        reap()
        if not r:
            continue
        try:
            msg, fds = _recv(sock, None)
        except EOFError:
            return
        except ValueError as e:
            _send(sock, {"error": f"bad request: {e}"})
            continue
        if msg.get("op") == "exit_code":
            reap()
            _send(sock, {"code": codes.get(int(msg.get("pid", 0)))})
            continue
        if msg.get("op") != "spawn" or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            _send(sock, {"error": "expected {op: spawn} with two fds (spec, stdout)"})
            continue
        spec_fd, out_fd = fds
        try:
            # Each child is pid 1 of a new PID namespace: reset where our children go to
            # our own namespace, then unshare a fresh one for the next fork.
            _ok(libc.setns(own_pidns, CLONE_NEWPID), "setns pid", ctypes)
            _ok(libc.unshare(CLONE_NEWPID), "unshare pid", ctypes)
            pid = os.fork()
        except OSError as e:
            os.close(spec_fd)
            os.close(out_fd)
            _send(sock, {"error": f"fork: {e}"})
            continue
        if pid == 0:
            _child(spec_fd, out_fd)
        os.close(spec_fd)
        os.close(out_fd)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            _send(sock, {"error": f"pidfd_open {pid}: {e}"})
            continue
        _send(sock, {"pid": pid}, [pidfd])
        os.close(pidfd)


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] != "--sock-fd" or not sys.argv[2].isdigit():
        sys.exit("usage: zygote.py --sock-fd N  (started by the agent)")
    sock = socket.socket(fileno=int(sys.argv[2]))
    global launch, random, runpy, signal, traceback
    import random
    import runpy
    import signal
    import traceback

    from worker import launch
    try:
        launch.seccomp()     # loaded once here: a child's view may hide the project folder
        _preload()
        import gc
        gc.collect()
        gc.freeze()          # the children's collections leave the shared objects alone
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            raise ZygoteError(f"{threads} threads after the preload; a fork would lose all but one")
        _send(sock, {"ready": True, "digest": source_digest(DML_APP), "pid": os.getpid()})
    except Exception as e:  # noqa: BLE001 - the agent says why, then uses exec
        _send(sock, {"error": f"{type(e).__name__}: {e}"})
        raise
    serve(sock)


if __name__ == "__main__":
    main()
