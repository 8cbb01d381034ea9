"""cpu, memory, swap and pids limits for node processes, on cgroup v2 or v1, under `edgetb/`.

The cgroup is also how a node's processes are found at stop and reset: membership is a
fact the kernel keeps, so nothing is killed by guessing a pid.

v2 (unified, `<root>/cgroup.controllers` exists): one directory `<root>/edgetb/<node>`
with `cpu.max` ("<quota> <period>"), `memory.max` (bytes), `memory.swap.max` 0 (no swap
beyond the memory limit) and `pids.max` (processes and threads). A child only gets those
files once its parent has the controller in `cgroup.subtree_control`, so `+cpu +memory
+pids` is enabled on the root and on `edgetb/` (which holds no process itself: "no
internal processes"), before the node's directory is made. Kill is `cgroup.kill` where
the kernel has it (5.14+), emptiness is `populated 0` in `cgroup.events`.

v1: `<root>/cpu/edgetb/<node>` (cpu.cfs_quota_us, cpu.cfs_period_us),
`<root>/memory/edgetb/<node>` (memory.limit_in_bytes, and memory.memsw.limit_in_bytes at
the same value: memory plus swap no more than memory) and `<root>/pids/edgetb/<node>`
(pids.max); the cpu hierarchy may be mounted as `cpu,cpuacct`.

cpu and memory are required. pids and the swap limit are applied wherever the kernel
offers them (a v1 host without the pids hierarchy, a kernel without swap accounting:
`memory.memsw.*` or `memory.swap.max` missing); what the kernel enforces is read back by
`limits()` / `box()`, so a node's status says which limit is not there (None).

Where the v1 `freezer` hierarchy is mounted, also
`<root>/freezer/edgetb/<node>` (optional: only pause/resume need it). Where `cpuacct` is a
hierarchy of its own (not co-mounted with cpu), also `<root>/cpuacct/edgetb/<node>`, so
that the cpu time a node uses can be read (`usage()`, the controller's dashboard).

Freezing (pause/resume, `freeze(True|False)`): v2 writes `cgroup.freeze` and waits for
`frozen 1|0` in `cgroup.events`; v1 writes FROZEN/THAWED to `freezer.state` and waits
until it reads back so (FREEZING is the kernel still at work). A v1 frozen task does not
die of SIGKILL, so kill_all thaws first.

`root` is injectable (default ROOT) so that tests can run either layout on a tree that
mirrors it; the file operations with side effects in the kernel go through `_mkdir`,
`_write` and `_rmdir`, and never create a file the kernel did not make.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
GROUP = "edgetb"
CFS_PERIOD_US = 100_000
CONTROLLERS = ("cpu", "memory")
PIDS = "pids"              # where the kernel has it (v1: mounted; v2: in cgroup.controllers)
DEFAULT_PIDS = 512         # processes and threads of one node
FREEZER = "freezer"        # v1 only, optional
CPUACCT = "cpuacct"        # v1 only, optional: cpu time used (the dashboard), where not co-mounted with cpu
FREEZE_WAIT_S = 10.0       # for the kernel to (un)freeze every member
KILL_WAIT_S = 5.0          # for SIGKILLed members to go
RMDIR_TRIES = 50           # x 0.05 s: rmdir fails while the kernel still reaps members


class CgroupError(RuntimeError):
    pass


def is_v2(root: Path | None = None) -> bool:
    """The unified hierarchy is mounted at root (a v1 or hybrid host has a tmpfs there)."""
    return (Path(root or ROOT) / "cgroup.controllers").exists()


def _v1_mount(root: Path, controller: str) -> Path:
    """The v1 hierarchy of controller: <root>/cpu, or a co-mount like <root>/cpu,cpuacct."""
    d = root / controller
    if d.is_dir():
        return d
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and controller in p.name.split(","):
                return p
    return d   # absent: create() says so


# The kernel's files, through these three, so a test can stand in for the kernel.
def _mkdir(path: Path) -> None:
    try:
        path.mkdir()
    except FileExistsError:
        pass


def _write(path: Path, text: str) -> None:
    """Write to an existing control file (no O_CREAT: a missing file is an error)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _rmdir(path: Path) -> None:
    path.rmdir()


def _ints(text: str) -> set[int]:
    return {int(x) for x in text.split()}


def _limit(path: Path) -> int | None:
    """An integer limit file: None when it says "max" (v2), is v1's "unlimited"
    (PAGE_COUNTER_MAX pages, or -1) or is missing (the kernel does not offer it here)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.lstrip("-").isdigit():
        return None
    value = int(text)
    return None if value < 0 or value >= 2**62 else value


def read_limits(cpu_dir: Path, memory_dir: Path, *, v2: bool | None = None,
                pids_dir: Path | None = None) -> dict:
    """The limits the kernel enforces at these cgroup directories (on v2 all are the
    same unified directory): {'cpu_quota_us', 'cpu_period_us', 'memory_bytes',
    'swap_bytes', 'pids_max'}; None where there is no such limit (unlimited, or not
    offered by this kernel). swap_bytes is the swap allowed beyond memory (0: none):
    v2 memory.swap.max, v1 memory.memsw.limit_in_bytes less memory.limit_in_bytes.
    pids_max from pids_dir (v2: the unified one). `v2` defaults to the layout at ROOT."""
    if v2 is None:
        v2 = is_v2()
    cpu_dir, memory_dir = Path(cpu_dir), Path(memory_dir)
    if v2:
        quota, period = (cpu_dir / "cpu.max").read_text().split()
        mem = (memory_dir / "memory.max").read_text().strip()
        pids = Path(pids_dir) if pids_dir is not None else cpu_dir
        return {"cpu_quota_us": None if quota == "max" else int(quota), "cpu_period_us": int(period),
                "memory_bytes": None if mem == "max" else int(mem),
                "swap_bytes": _limit(memory_dir / "memory.swap.max"), "pids_max": _limit(pids / "pids.max")}
    quota = int((cpu_dir / "cpu.cfs_quota_us").read_text())
    mem = _limit(memory_dir / "memory.limit_in_bytes")   # v1 "unlimited" is PAGE_COUNTER_MAX pages
    memsw = _limit(memory_dir / "memory.memsw.limit_in_bytes")
    return {"cpu_quota_us": None if quota < 0 else quota,
            "cpu_period_us": int((cpu_dir / "cpu.cfs_period_us").read_text()),
            "memory_bytes": mem, "swap_bytes": None if mem is None or memsw is None else max(0, memsw - mem),
            "pids_max": None if pids_dir is None else _limit(Path(pids_dir) / "pids.max")}


def _stat_value(text: str, key: str) -> int | None:
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key and v.strip().isdigit():
            return int(v)
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def read_usage(cpu_dir: Path, memory_dir: Path, *, v2: bool) -> dict:
    """{'cpu_ns', 'mem_bytes'} of the cgroup at these directories (on v2 the same unified
    one): v2 cpu.stat usage_usec and memory.current; v1 cpuacct.usage and
    memory.usage_in_bytes; memory less the inactive file cache (as `docker stats` does).
    A value the kernel does not give here is None."""
    cpu_dir, memory_dir = Path(cpu_dir), Path(memory_dir)
    try:
        mstat = (memory_dir / "memory.stat").read_text()
    except OSError:
        mstat = ""
    if v2:
        try:
            usec = _stat_value((cpu_dir / "cpu.stat").read_text(), "usage_usec")
        except OSError:
            usec = None
        cpu = usec * 1000 if usec is not None else None
        mem = _read_int(memory_dir / "memory.current")
        inactive = _stat_value(mstat, "inactive_file")
    else:
        cpu = _read_int(cpu_dir / "cpuacct.usage")
        mem = _read_int(memory_dir / "memory.usage_in_bytes")
        inactive = _stat_value(mstat, "total_inactive_file")
    if mem is not None and inactive is not None:
        mem = max(0, mem - inactive)
    return {"cpu_ns": cpu, "mem_bytes": mem}


def pid_usage(pid: int, root: Path | None = None) -> dict:
    """read_usage of the cgroup(s) a process is in (a container's init: its cgroup, made
    by the container runtime, wherever that is), from /proc/<pid>/cgroup."""
    root = Path(root or ROOT)
    try:
        lines = Path(f"/proc/{int(pid)}/cgroup").read_text().splitlines()
    except (OSError, ValueError):
        return {"cpu_ns": None, "mem_bytes": None}
    where: dict[str, str] = {}
    for line in lines:
        _, ctrls, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        for c in ctrls.split(",") if ctrls else ["unified"]:
            where[c] = path.lstrip("/")
    if is_v2(root):
        d = root / where.get("unified", "")
        return read_usage(d, d, v2=True)
    acct = where.get(CPUACCT)
    cpu_dir = _v1_mount(root, CPUACCT) / acct if acct is not None else root / "nonexistent"
    mem_dir = _v1_mount(root, "memory") / where.get("memory", "")
    return read_usage(cpu_dir, mem_dir, v2=False)


class Cgroup:
    """One node's cgroup(s). `dirs` are the directories to create/remove."""

    def __init__(self, name: str, root: Path | None = None):
        if not name or "/" in name or name in (".", ".."):
            raise CgroupError(f"bad cgroup name {name!r}")
        self.name = name
        self.root = Path(root or ROOT)
        self.v2 = is_v2(self.root)
        if self.v2:
            self.dirs = {"unified": self.root / GROUP / name}
        else:
            self.dirs = {c: _v1_mount(self.root, c) / GROUP / name for c in CONTROLLERS}
            pids = _v1_mount(self.root, PIDS)
            if pids.is_dir():
                self.dirs[PIDS] = pids / GROUP / name
            fz = _v1_mount(self.root, FREEZER)
            if fz.is_dir():
                self.dirs[FREEZER] = fz / GROUP / name
            acct = _v1_mount(self.root, CPUACCT)
            if acct.is_dir() and acct.resolve() != _v1_mount(self.root, "cpu").resolve():
                self.dirs[CPUACCT] = acct / GROUP / name

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def create(self, cpu: float, ram_mb: int, pids: int = DEFAULT_PIDS) -> None:
        """The group with its limits: cpu, memory, no swap beyond memory, at most `pids`
        processes and threads (the last two where the kernel offers them)."""
        quota = max(1000, int(cpu * CFS_PERIOD_US))
        mem = int(ram_mb) * 1024 * 1024
        pids = int(pids)
        if self.v2:
            _enable_v2_controllers(self.root)
            d = self.dirs["unified"]
            _mkdir(d)
            _write(d / "cpu.max", f"{quota} {CFS_PERIOD_US}")
            _write(d / "memory.max", str(mem))
            if (d / "memory.swap.max").exists():     # swap accounting is on
                _write(d / "memory.swap.max", "0")
            if (d / "pids.max").exists():
                _write(d / "pids.max", str(pids))
        else:
            for c, d in self.dirs.items():
                if not d.parent.parent.is_dir():
                    raise CgroupError(f"cgroup v1: no {c} hierarchy at {d.parent.parent} (controller "
                                      f"disabled or not mounted; a Raspberry Pi needs cgroup_enable={c})")
                _mkdir(d.parent)
                _mkdir(d)
            c = self.dirs["cpu"]
            _write(c / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(c / "cpu.cfs_quota_us", str(quota))
            m = self.dirs["memory"]
            memsw = m / "memory.memsw.limit_in_bytes"     # absent without swap accounting
            if memsw.exists():
                _write(memsw, "-1")          # memsw >= memory at every step: lift it first
            _write(m / "memory.limit_in_bytes", str(mem))
            if memsw.exists():
                _write(memsw, str(mem))
            if PIDS in self.dirs:
                _write(self.dirs[PIDS] / "pids.max", str(pids))

    def usage(self) -> dict:
        """What the group's processes use now: {'cpu_ns': cpu time so far (None when the
        kernel keeps none here), 'mem_bytes': memory less inactive file cache (None when
        unknown)}; both None once the group is gone."""
        if self.v2:
            d = self.dirs["unified"]
            return read_usage(d, d, v2=True)
        cpu = self.dirs.get(CPUACCT) or self.dirs["cpu"]   # co-mounted: cpu,cpuacct holds cpuacct.usage
        return read_usage(cpu, self.dirs["memory"], v2=False)

    def limits(self) -> dict:
        """read_limits of this group, plus its member 'pids'."""
        if self.v2:
            d = self.dirs["unified"]
            out = read_limits(d, d, v2=True, pids_dir=d)
        else:
            out = read_limits(self.dirs["cpu"], self.dirs["memory"], v2=False, pids_dir=self.dirs.get(PIDS))
        return {**out, "pids": self.pids()}

    def box(self) -> dict:
        """What a node's status shows of its limits, from the kernel: the limits
        (read_limits; None: not enforced here), 'pids_current' (processes and threads
        now) and 'pids_max_hits' (forks refused at pids.max so far, from pids.events);
        {} once the group is gone."""
        if not self.exists():
            return {}
        try:
            out = self.limits()
        except (OSError, ValueError):
            return {}
        out.pop("pids")
        d = self.dirs.get("unified") or self.dirs.get(PIDS)
        out["pids_current"] = _read_int(d / "pids.current") if d is not None else None
        try:
            hits = _stat_value((d / "pids.events").read_text(), "max") if d is not None else None
        except OSError:
            hits = None
        out["pids_max_hits"] = hits
        return out

    def pids(self) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files:
            try:
                out |= _ints(Path(f).read_text())
            except FileNotFoundError:
                pass
        return out

    def populated(self) -> bool:
        """Any process in the group (v2: the kernel's own `populated` flag)."""
        if self.v2:
            try:
                events = (self.dirs["unified"] / "cgroup.events").read_text().split("\n")
            except FileNotFoundError:
                return False
            return "populated 1" in events
        return bool(self.pids())

    def _wait_empty(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.populated():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    # ------------------------------------------------------------ freezer
    def can_freeze(self) -> bool:
        return "unified" in self.dirs or FREEZER in self.dirs

    def _freeze_file(self) -> Path:
        if self.v2:
            return self.dirs["unified"] / "cgroup.freeze"
        if FREEZER not in self.dirs:
            raise CgroupError(f"cgroup v1: no freezer hierarchy under {self.root} (pause needs it)")
        return self.dirs[FREEZER] / "freezer.state"

    def frozen(self) -> bool:
        """Whether the kernel holds the group frozen (False if it is gone)."""
        try:
            if self.v2:
                return "frozen 1" in (self.dirs["unified"] / "cgroup.events").read_text().split("\n")
            if FREEZER not in self.dirs:
                return False
            return (self.dirs[FREEZER] / "freezer.state").read_text().strip() == "FROZEN"
        except FileNotFoundError:
            return False

    def freeze(self, on: bool, timeout_s: float = FREEZE_WAIT_S) -> None:
        """Freeze (on) or thaw every member, and wait until the kernel says it is done;
        CgroupError when there is no freezer, no group, or the deadline passes."""
        f = self._freeze_file()
        if not f.exists():
            raise CgroupError(f"cgroup {self.name}: no {f} (the node has no app group)")
        _write(f, ("1" if on else "0") if self.v2 else ("FROZEN" if on else "THAWED"))
        deadline = time.monotonic() + timeout_s
        while self.frozen() != on:
            if time.monotonic() >= deadline:
                raise CgroupError(f"cgroup {self.name}: not {'frozen' if on else 'thawed'} after {timeout_s:g} s")
            if not on and not self.v2:
                _write(f, "THAWED")
            time.sleep(0.01)

    def thaw_quietly(self) -> None:
        """Thaw if frozen (before stopping: a v1 frozen task ignores even SIGKILL)."""
        try:
            if self.can_freeze() and self.frozen():
                self.freeze(False)
        except (CgroupError, OSError) as e:
            print(f"cgroups: thawing {self.name}: {e}", file=sys.stderr)

    def kill_now(self, timeout_s: float = KILL_WAIT_S) -> bool:
        """SIGKILL every member at once (thawed first), until the group is empty or
        timeout_s passes; the group stays. -> whether it is empty."""
        self.thaw_quietly()
        kill = self.dirs["unified"] / "cgroup.kill" if self.v2 else None
        if kill is not None and kill.exists():
            _write(kill, "1")
            return self._wait_empty(timeout_s)
        deadline = time.monotonic() + timeout_s
        while (pids := self.pids()):
            if time.monotonic() >= deadline:
                return False
            _signal(pids, signal.SIGKILL)
            time.sleep(0.02)
        return True

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every member, then SIGKILL what is left after timeout_s: on v2 with
        `cgroup.kill` in one write that also catches what forks meanwhile; otherwise by
        pid, again and again until the group is empty (a forking app keeps adding)."""
        pids = self.pids()
        if not pids:
            return
        self.thaw_quietly()
        _signal(pids, signal.SIGTERM)
        if self._wait_empty(timeout_s):
            return
        kill = self.dirs["unified"] / "cgroup.kill" if self.v2 else None
        if kill is not None and kill.exists():
            _write(kill, "1")
            self._wait_empty(KILL_WAIT_S)
            return
        deadline = time.monotonic() + KILL_WAIT_S
        while (pids := self.pids()) and time.monotonic() < deadline:
            _signal(pids, signal.SIGKILL)
            time.sleep(0.05)

    def remove(self, timeout_s: float = 5.0) -> list[Path]:
        """kill_all(timeout_s), remove the node's directories and `edgetb/` once it is
        empty. Returns the directories left (a member the kernel could not kill yet), and
        says so on stderr."""
        self.kill_all(timeout_s)
        left = []
        for d in self.dirs.values():
            for _ in range(RMDIR_TRIES):
                try:
                    _rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                left.append(d)
            try:
                _rmdir(d.parent)  # edgetb/ itself, once empty
            except OSError:
                pass
        if left:
            print(f"cgroups: could not remove {', '.join(map(str, left))}: members {sorted(self.pids())}",
                  file=sys.stderr)
        return left

    def exists(self) -> bool:
        return any(d.exists() for d in self.dirs.values())


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _enable_v2_controllers(root: Path) -> None:
    """+cpu +memory (and +pids where the kernel has it) in the root's and edgetb/'s
    cgroup.subtree_control, so edgetb/<node> gets cpu.max, memory.max and pids.max.
    edgetb/ must hold no process of its own."""
    avail = (root / "cgroup.controllers").read_text().split()
    missing = [c for c in CONTROLLERS if c not in avail]
    if missing:
        raise CgroupError(f"cgroup v2 at {root}: controller(s) {' '.join(missing)} not available "
                          f"(cgroup.controllers: {' '.join(avail) or 'none'}; bound to a v1 hierarchy, "
                          f"or not delegated to this container)")
    wanted = [*CONTROLLERS, *([PIDS] if PIDS in avail else [])]
    parent = root / GROUP
    for p in (root, parent):
        if p is parent:
            _mkdir(parent)
        ctl = p / "cgroup.subtree_control"
        need = [c for c in wanted if c not in ctl.read_text().split()]
        if not need:
            continue
        try:
            _write(ctl, " ".join(f"+{c}" for c in need))
        except OSError as e:
            if e.errno == errno.EBUSY:
                # Only the true root is exempt from "no internal processes": the root of
                # a cgroup namespace (a container) is not.
                raise CgroupError(f"cgroup v2: cannot enable {' '.join(need)} in {ctl}: the cgroup holds "
                                  f"processes {sorted(_ints((p / 'cgroup.procs').read_text()))} "
                                  f"(move them to a child cgroup first)") from e
            raise CgroupError(f"cgroup v2: cannot enable {' '.join(need)} in {ctl}: {e}") from e


def leftover_groups(root: Path | None = None) -> list[str]:
    """Names of node cgroups present under edgetb/ (after a crash, for reset)."""
    root = Path(root or ROOT)
    if is_v2(root):
        bases = [root / GROUP]
    else:
        bases = [_v1_mount(root, c) / GROUP for c in (*CONTROLLERS, PIDS, FREEZER, CPUACCT)]
    return sorted({p.name for b in bases if b.is_dir() for p in b.iterdir() if p.is_dir()})
