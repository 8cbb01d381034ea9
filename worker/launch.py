"""Starts one node app: joins the node's cgroups and network namespace, gives it a mount
namespace of its own with its volumes, and execs it (as the unprivileged node user
unless the node asked for root).

Run by the agent (worker/nodes.py Runner) as `python3 -I -S worker/launch.py --spec-fd N`:
the spec (argv, the environment with the node's credentials, binds, ...) is JSON in the
inherited file descriptor N (a memfd), never on a command line, which any local user
can read in /proc/PID/cmdline; the launcher closes it before anything is exec'd.
Standalone on purpose: it imports nothing from the project (nor site-packages), so it
runs the same from any working directory. Namespaces are entered and mounts made
through libc (no `ip netns exec`, no `mount` process per mount).

An unprivileged node (the default) sees, in its own mount namespace:
* a private /run (tmpfs) holding /run/edgetb-node/root/<node path> (its volumes,
  read-only where asked), /run/edgetb-node/log (its log dir, DML_LOG_DIR) and
  /run/edgetb-node/home (HOME); the host's /run (other nodes' run dirs, sockets) is gone;
* private size-limited tmpfs on /tmp, /var/tmp and /dev/shm, owned by the node user;
* the agent's Python at its usual path, even where a parent folder (/root) is closed
  to other users (that folder is replaced by an empty tmpfs holding only the Python);
* everything else read-only (one mount_setattr(2), or a remount per mount where that
  syscall is missing);
* a PID namespace of its own with its own /proc, so it cannot see or signal other
  nodes' processes (they share its uid) nor read their environment (their credentials):
  the agent starts this launcher as pid 1 of a new PID namespace (worker/nodes.py
  Runner), which mounts that namespace's /proc;
* an IPC namespace of its own (System V IPC, POSIX message queues);
* the seccomp filter of worker/seccomp.py, installed last, once every mount and unshare
  of the launcher is done (nothing after it needs one): no new namespaces, no mounts,
  no bpf, keyring, ptrace, modules, ... (that module's docstring).
The app then runs through app_chain(): no capabilities (bounding set empty), no
groups, not root, no_new_privs.

A node with "root": true keeps root and the host's view, as before: only its binds
and working dir are set up, and the app is exec'd in place of the launcher.
"""
import ctypes
import json
import os
import re
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME = 0x20, 0x400, 0x800
MS_BIND, MS_MOVE, MS_REC, MS_SLAVE = 0x1000, 0x2000, 0x4000, 0x80000
MS_RELATIME, MS_STRICTATIME = 0x200000, 0x1000000
MNT_DETACH = 2
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x20000, 0x08000000, 0x40000000
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442          # the same number on every architecture
NODE_DIR = "/run/edgetb-node"    # the node's own things, in its view (as in docker nodes)
# Per-mount flags a bind remount must keep (they are replaced, not merged).
KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
              "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.syscall.restype = ctypes.c_long


class LaunchError(Exception):
    pass


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(err)}")


def _b(s):
    return None if s is None else os.fsencode(s)


def mount(source, target, fstype=None, flags=0, data=None) -> None:
    _check(libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {source} on {target}")


def umount(target: str) -> None:
    _check(libc.umount2(_b(target), MNT_DETACH), f"umount {target}")


# ----------------------------------------------------------------------------- namespaces

def enter_netns(name: str) -> None:
    """What `ip netns exec NAME` does before its exec: the namespace, a private (slave)
    mount namespace, a /sys of that network namespace and /etc/netns/NAME's files."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(libc.setns(fd, CLONE_NEWNET), f"setns {name}")
    finally:
        os.close(fd)
    private_mounts()
    flags = 0
    try:
        umount("/sys")
    except LaunchError:
        if os.statvfs("/sys").f_flag & os.ST_RDONLY:   # can only be overlaid as it is
            flags = MS_RDONLY
    mount(name, "/sys", "sysfs", flags)
    etc = f"/etc/netns/{name}"
    if os.path.isdir(etc):
        for entry in sorted(os.listdir(etc)):
            if os.path.exists(f"/etc/{entry}"):
                mount(f"{etc}/{entry}", f"/etc/{entry}", None, MS_BIND)


def private_mounts() -> None:
    """A mount namespace of our own where nothing mounted propagates back to the host."""
    host = os.readlink("/proc/self/ns/mnt")
    _check(libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    if os.readlink("/proc/self/ns/mnt") == host:
        raise LaunchError("refusing to mount in the host's mount namespace")
    mount("none", "/", None, MS_REC | MS_SLAVE)


# ----------------------------------------------------------------------------- mounts

def bind(source, target: str, ro: bool = False) -> None:
    mount(source, target, None, MS_BIND)
    if ro:
        set_readonly(target, True)


def set_readonly(target: str, ro: bool, recursive: bool = False) -> None:
    """Make the mount at target (and with recursive, every mount below) read-only or
    writable again: one mount_setattr(2), else a bind remount per mount."""
    attr = MountAttr(MOUNT_ATTR_RDONLY if ro else 0, 0 if ro else MOUNT_ATTR_RDONLY, 0, 0)
    ret = libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), _b(target),
                       ctypes.c_uint(AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr)))
    if ret == 0:
        return
    if ctypes.get_errno() not in (38, 1):            # ENOSYS, or EPERM under seccomp
        _check(ret, f"mount_setattr {target}")
    for point, opts in _mounts(target if recursive else None, target):
        flags = MS_REMOUNT | MS_BIND | (MS_RDONLY if ro else 0)
        flags |= sum(f for o, f in KEEP_FLAGS.items() if o in opts)
        try:
            mount(None, point, None, flags)
        except LaunchError:
            if point == target:
                raise
            # A mount hidden under another one cannot be reached by its path: nor by the app.


def _mounts(under: str | None, exact: str) -> list[tuple[str, set]]:
    """(mount point, per-mount options) from /proc/self/mountinfo: those at or below
    `under`, or only the topmost one at `exact`."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            # Octal escapes (\040 is a space) in the mount point.
            point = os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4]))
            opts = set(os.fsdecode(fields[5]).split(","))
            if under is not None:
                if under == "/" or point == under or point.startswith(under.rstrip("/") + "/"):
                    out.append((point, opts))
            elif point == exact:
                out = [(point, opts)]          # the last one listed is on top
    return out


def tmpfs(target: str, size_mb: int, mode: str, uid: int = 0, gid: int = 0) -> None:
    mount("edgetb-node", target, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={int(size_mb)}m,mode={mode},uid={uid},gid={gid}")


def node_view(spec: dict) -> list[str]:
    """Build the unprivileged node's file system view (module docstring); -> the mount
    points it may write to (read-only is applied to all the rest by the caller)."""
    uid, gid = spec["user"]["uid"], spec["user"]["gid"]
    size = spec.get("tmpfs_mb", 64)
    stage = os.path.join(spec["rundir"], "view")     # the new /run, made under the node's run dir
    tmpfs(stage, size, "0755")
    mine = stage + NODE_DIR[len("/run"):]
    for d in ("root", "log", "home"):
        os.makedirs(f"{mine}/{d}", exist_ok=True)
    os.chown(f"{mine}/home", uid, gid)
    os.chmod(f"{mine}/home", 0o700)
    writable = [NODE_DIR + "/log", "/run"]          # /run: only home in it is the node user's
    for vol in spec.get("binds", []):
        target = f"{mine}/root/{vol['target'].lstrip('/')}"
        os.makedirs(target, exist_ok=True)
        bind(vol["source"], target)
        if not vol.get("ro"):
            writable.append(f"{NODE_DIR}/root/{vol['target'].lstrip('/')}")
    bind(os.path.join(spec["rundir"], "log"), f"{mine}/log")
    # Folders closed to the node user on the way to the agent's Python (/root): an empty
    # tmpfs in their place, with only the Python bound back at its own path. The fds keep
    # the originals reachable once covered.
    for hide, paths in spec.get("expose", []):
        fds = [os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for p in paths]
        tmpfs(hide, 1, "0755")
        for p, fd in zip(paths, fds):
            os.makedirs(p, exist_ok=True)
            bind(f"/proc/self/fd/{fd}", p, ro=True)
            os.close(fd)
    mount(stage, "/run", None, MS_MOVE)
    for t in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(t) and not os.path.islink(t):
            tmpfs(t, size, "1777", uid, gid)
            writable.append(t)
    return writable


# ----------------------------------------------------------------------------- the app

def app_chain(spec: dict) -> list[str]:
    """The argv that runs the app unprivileged, in place of this launcher (pid 1 of the
    node's PID namespace), small C programs that exec one another (a few hundred kB per
    node, against megabytes for a Python parent; 300 nodes per machine):
      setpriv               drops every capability (bounding set included), the groups
                            and root, sets no_new_privs;
      tini (pid 1 there)    passes signals on to the app's process group (pid 1 alone
                            would drop a SIGTERM it has no handler for) and reaps
                            orphans; when it exits the kernel kills the namespace.
    No parent-death signal: the parent is the agent's thread that started the node,
    which ends long before the node does."""
    t, uid, gid = spec["tools"], spec["user"]["uid"], spec["user"]["gid"]
    return ([t["setpriv"], f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
             "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
             t["tini"], "-g", "--"] + list(spec["argv"]))


def lock_view(spec: dict) -> None:
    """The unprivileged node's view (node_view), then read-only but for its own folders."""
    writable = node_view(spec)
    set_readonly("/", True, recursive=True)
    for w in writable:
        set_readonly(w, False)


def prepare(spec: dict) -> None:
    """Everything done for an app before it runs, in this process: join the node's
    cgroups (first, so everything it forks is limited too), enter its network namespace
    and a mount namespace of its own, build its view (its binds; the whole locked view
    and an IPC namespace of its own for an unprivileged node) and chdir to its working
    dir. Shared by this launcher (which then execs the app) and the zygote's children
    (worker/zygote.py); both then mount_proc() and confine()."""
    for procs in spec.get("cgroup_procs", []):
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    if spec.get("netns"):
        enter_netns(spec["netns"])
    else:
        # A physical node keeps the host's network but not its mount table.
        private_mounts()
    if spec.get("root"):
        for vol in spec.get("binds", []):
            os.makedirs(vol["target"], exist_ok=True)
            bind(vol["source"], vol["target"], ro=bool(vol.get("ro")))
    else:
        lock_view(spec)
        _check(libc.unshare(CLONE_NEWIPC), "unshare IPC namespace")
    os.chdir(spec["cwd"])


_seccomp_module = None


def seccomp():
    """worker/seccomp.py, loaded by path beside this file (this launcher imports nothing
    of the project by name); call it before the node's view hides the project folder."""
    global _seccomp_module
    if _seccomp_module is None:
        import importlib.util
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seccomp.py")
        spec = importlib.util.spec_from_file_location("edgetb_seccomp", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _seccomp_module = mod
    return _seccomp_module


def confine(spec: dict) -> None:
    """The last step before an unprivileged app runs: the seccomp filter (with
    no_new_privs). After every mount and unshare of the launch; a root node gets none."""
    if spec.get("root"):
        return
    try:
        seccomp().install()
    except OSError as e:
        raise LaunchError(str(e)) from None


def read_spec(fd: int) -> dict:
    """The launch spec from the memfd the agent wrote it to; the fd is closed here, so the
    app never inherits it."""
    os.lseek(fd, 0, os.SEEK_SET)
    with os.fdopen(fd, "rb") as f:
        return json.loads(f.read())


def mount_proc() -> None:
    """A /proc of this process's PID namespace (what `unshare --mount-proc` does)."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] != "--spec-fd" or not sys.argv[2].isdigit():
        sys.exit("usage: launch.py --spec-fd N  (the spec is JSON in file descriptor N)")
    fd = int(sys.argv[2])
    try:
        spec = read_spec(fd)
    except (OSError, ValueError) as e:
        sys.exit(f"launch.py: cannot read the spec from fd {fd}: {e}")
    try:
        if not spec.get("root"):
            if os.getpid() != 1:
                raise LaunchError("an unprivileged node starts as pid 1 of a PID namespace of its own "
                                  "(worker/nodes.py Runner starts this launcher so)")
            # pid 1 drops a signal it has no handler for: until tini runs, SIGTERM ends us.
            import signal
            signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
            seccomp()                  # loaded while the project folder is still in view
        prepare(spec)
        if not spec.get("root"):
            mount_proc()
        confine(spec)
        argv = spec["argv"] if spec.get("root") else app_chain(spec)
        os.execvpe(argv[0], argv, spec["env"])
    except (LaunchError, OSError) as e:
        sys.exit(f"launch.py: node {spec.get('name')}: {e}")


if __name__ == "__main__":
    main()
