"""worker/cgroups.py on both cgroup layouts.

This machine's hierarchy at /sys/fs/cgroup is v1 (most users' is v2). So:
* both layouts run on directory trees in tmp that mirror them, with a stand-in for the
  kernel (`Mirror`) that makes the interface files a mkdir makes, applies the writes
  that do something (subtree_control, cgroup.procs, cgroup.kill) with the kernel's
  rules, refuses rmdir of a populated cgroup, and records every write: the tests check
  exactly what is written where;
* the real hierarchy at /sys/fs/cgroup (v1 here, v2 on a unified host) with real
  processes moved in, limits read back from the kernel, killed and removed;
* where a cgroup2 mount without the cpu and memory controllers exists (a hybrid host like
  this one: /sys/fs/cgroup/unified), the v2 membership, cgroup.events, cgroup.kill and
  rmdir paths run on it with real processes.
The rules mirrored are those of the kernel's Documentation/admin-guide/cgroup-v2.rst
("Top-down constraint", "No internal process constraint", cgroup.kill, cgroup.events).
"""
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


import pytest

from tests.support import agents as ah
from worker import cgroups

MB = 2**20
V1_UNLIMITED = "9223372036854771712"

V2_ALL = "cpuset cpu io memory hugetlb pids rdma misc"
V2_FILES = {
    None: {"cgroup.procs": "", "cgroup.subtree_control": "", "cgroup.events": "populated 0\nfrozen 0\n",
           "cgroup.type": "domain", "cgroup.freeze": "0", "cgroup.max.depth": "max", "cpu.stat": "usage_usec 0\n"},
    "cpu": {"cpu.max": "max 100000", "cpu.weight": "100", "cpu.max.burst": "0"},
    "memory": {"memory.max": "max", "memory.high": "max", "memory.low": "0", "memory.min": "0",
               "memory.current": "0", "memory.swap.max": "max", "memory.events": "oom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max", "pids.current": "0", "pids.events": "max 0\n"},
}
V1_FILES = {
    None: {"cgroup.procs": "", "tasks": "", "notify_on_release": "0", "cgroup.clone_children": "0"},
    "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1", "cpu.shares": "1024"},
    "memory": {"memory.limit_in_bytes": V1_UNLIMITED, "memory.usage_in_bytes": "0",
               "memory.soft_limit_in_bytes": V1_UNLIMITED},
    "pids": {"pids.max": "max", "pids.current": "0", "pids.events": "max 0\n"},
}
# What a v1 memory hierarchy adds with swap accounting on (swapaccount=1).
V1_MEMSW = {"memory.memsw.limit_in_bytes": V1_UNLIMITED, "memory.memsw.usage_in_bytes": "0"}


class Mirror:
    """A cgroup hierarchy as a directory tree, and the kernel's side of it.

    v2: `root` holds cgroup.controllers (`controllers`) and cgroup.subtree_control
    (`root_enabled`); a mkdir gets the core files, cgroup.kill when `kill_file`, and the
    files of each controller its parent enables. v1: `root` is a tmpfs with one
    directory per hierarchy (`hierarchies`, e.g. "cpu,cpuacct"). `true_root=False` makes
    the v2 root a cgroup namespace's root (a container's), which, unlike the real root,
    is bound by "no internal processes". Processes are simulated: `procs` maps a pid to
    how it takes signals ("term": exits on SIGTERM, "ignore-term": only SIGKILL,
    "unkillable": neither, as in D state); signals go through cgroups._signal.
    """

    def __init__(self, root: Path, *, v2: bool, controllers: str = V2_ALL, root_enabled: str = "",
                 kill_file: bool = True, true_root: bool = True, root_pids=(1,),
                 hierarchies=("cpu", "memory"), memsw: bool = False):
        self.root, self.v2, self.kill_file, self.true_root = root, v2, kill_file, true_root
        self.memsw = memsw
        self.writes: list[tuple[str, str]] = []
        self.signals: list[tuple[int, str]] = []
        self.procs: dict[int, str] = {}
        root.mkdir()
        if v2:
            self._files(root, {"cgroup.controllers": controllers, "cgroup.subtree_control": root_enabled,
                               "cgroup.procs": " ".join(map(str, root_pids)), "cgroup.stat": ""})
        else:
            for h in hierarchies:
                (root / h).mkdir()
                self._files(root / h, {"cgroup.procs": "", "tasks": "", "release_agent": ""})
                for c in h.split(","):
                    self._files(root / h, V1_FILES.get(c, {}))

    def install(self, monkeypatch) -> "Mirror":
        monkeypatch.setattr(cgroups, "_mkdir", self.mkdir)
        monkeypatch.setattr(cgroups, "_write", self.write)
        monkeypatch.setattr(cgroups, "_rmdir", self.rmdir)
        monkeypatch.setattr(cgroups, "_signal", self.signal)
        monkeypatch.setattr(cgroups, "KILL_WAIT_S", 0.3)
        monkeypatch.setattr(cgroups, "RMDIR_TRIES", 4)
        return self

    # --------------------------------------------------------------- the tree
    @staticmethod
    def _files(d: Path, files: dict) -> None:
        for name, text in files.items():
            (d / name).write_text(text)

    def rel(self, p: Path) -> str:
        return str(Path(p).relative_to(self.root))

    def _cgroups(self):
        tops = [self.root] if self.v2 else [p for p in self.root.iterdir() if p.is_dir()]
        for top in tops:
            yield top
            yield from (p for p in top.rglob("*") if p.is_dir())

    def _is_root(self, d: Path) -> bool:
        return d == self.root if self.v2 else d.parent == self.root

    def _controllers_of(self, d: Path) -> list[str]:
        if self.v2:
            return (d / "cgroup.controllers").read_text().split()
        top = self.root / Path(self.rel(d)).parts[0]
        return top.name.split(",")

    def pids_in(self, d: Path) -> list[int]:
        return [int(x) for x in (d / "cgroup.procs").read_text().split()]

    def _set_pids(self, d: Path, pids) -> None:
        (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in sorted(pids)))
        if not self.v2:
            (d / "tasks").write_text((d / "cgroup.procs").read_text())
        self._update_events()

    def _update_events(self) -> None:
        if not self.v2:
            return
        for d in self._cgroups():
            if d == self.root:
                continue
            pop = any(self.pids_in(c) for c in [d, *(p for p in d.rglob("*") if p.is_dir())])
            (d / "cgroup.events").write_text(f"populated {int(pop)}\nfrozen 0\n")

    # --------------------------------------------------------------- the kernel's side
    def mkdir(self, d: Path) -> None:
        if d.exists():
            return
        d.mkdir()          # FileNotFoundError without the parent, as the kernel
        table = V2_FILES if self.v2 else V1_FILES
        self._files(d, table[None])
        if self.v2:
            enabled = (d.parent / "cgroup.subtree_control").read_text().split()
            (d / "cgroup.controllers").write_text(" ".join(enabled))
            if self.kill_file:
                (d / "cgroup.kill").write_text("")
            for c in enabled:
                self._files(d, table.get(c, {}))
        else:
            for c in self._controllers_of(d):
                self._files(d, table.get(c, {}))
                if c == "memory" and self.memsw:
                    self._files(d, V1_MEMSW)

    def write(self, path: Path, text: str) -> None:
        path = Path(path)
        if not path.is_file():   # the kernel makes its files; a write never creates one
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        self.writes.append((self.rel(path), text))
        d, name = path.parent, path.name
        if name == "cgroup.subtree_control":
            self._subtree_control(d, text)
        elif name == "cgroup.procs":
            self._migrate(d, int(text))
        elif name == "cgroup.kill":
            assert text.strip() == "1", text
            for sub in [d, *(p for p in d.rglob("*") if p.is_dir())]:   # SIGKILL to each
                dead = [pid for pid in self.pids_in(sub) if self.procs.get(pid) != "unkillable"]
                for pid in dead:
                    self.procs.pop(pid, None)
                self._set_pids(sub, [pid for pid in self.pids_in(sub) if pid not in dead])
        else:
            path.write_text(text)

    def _subtree_control(self, d: Path, text: str) -> None:
        enabled = (d / "cgroup.subtree_control").read_text().split()
        avail = (d / "cgroup.controllers").read_text().split()
        for tok in text.split():
            op, c = tok[0], tok[1:]
            if op not in "+-" or c not in avail:
                raise OSError(errno.ENOENT, "No such file or directory", str(d / "cgroup.subtree_control"))
            if op == "+" and self.pids_in(d) and not (self._is_root(d) and self.true_root):
                raise OSError(errno.EBUSY, "Device or resource busy", str(d / "cgroup.subtree_control"))
            if op == "+" and c not in enabled:
                enabled.append(c)
                for child in (p for p in d.iterdir() if p.is_dir()):
                    self._files(child, V2_FILES.get(c, {}))
                    (child / "cgroup.controllers").write_text(" ".join(enabled))
            elif op == "-" and c in enabled:
                enabled.remove(c)
        order = avail
        (d / "cgroup.subtree_control").write_text(" ".join(c for c in order if c in enabled))

    def _migrate(self, d: Path, pid: int) -> None:
        if self.v2 and (d / "cgroup.subtree_control").read_text().split() and not self._is_root(d):
            raise OSError(errno.EBUSY, "Device or resource busy", str(d / "cgroup.procs"))
        top = None if self.v2 else self.root / Path(self.rel(d)).parts[0]
        for other in self._cgroups():
            if (top is None or other == top or top in other.parents) and pid in self.pids_in(other):
                self._set_pids(other, [p for p in self.pids_in(other) if p != pid])
        self._set_pids(d, [*self.pids_in(d), pid])

    def rmdir(self, d: Path) -> None:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(d))
        if any(p.is_dir() for p in d.iterdir()) or self.pids_in(d):
            raise OSError(errno.EBUSY, "Device or resource busy", str(d))
        shutil.rmtree(d)

    def signal(self, pids, sig) -> None:
        for pid in pids:
            self.signals.append((pid, signal.Signals(sig).name))
            how = self.procs.get(pid)
            if how is None or how == "unkillable":
                continue
            if sig == signal.SIGKILL or how == "term":
                del self.procs[pid]
                for d in self._cgroups():
                    if pid in self.pids_in(d):
                        self._set_pids(d, [p for p in self.pids_in(d) if p != pid])

    def start(self, cg: cgroups.Cgroup, pid: int, how: str = "term") -> None:
        """A process joining the node's cgroups, as worker/launch.py does."""
        self.procs[pid] = how
        for f in cg.procs_files:
            self.write(Path(f), str(pid))


def _read(p: Path) -> str:
    return p.read_text().strip()


# ============================================================================ v2, mirrored

@pytest.fixture
def v2(tmp_path, monkeypatch):
    def make(**kw):
        return Mirror(tmp_path / "cgroup", v2=True, **kw).install(monkeypatch)
    return make


def test_v2_create_enables_controllers_top_down_then_writes_limits(v2):
    m = v2()
    cg = cgroups.Cgroup("n1", root=m.root)
    assert cg.v2 and cg.dirs == {"unified": m.root / "edgetb" / "n1"}
    assert cg.procs_files == [str(m.root / "edgetb" / "n1" / "cgroup.procs")]
    cg.create(0.5, 64)
    assert m.writes == [("cgroup.subtree_control", "+cpu +memory +pids"),
                        ("edgetb/cgroup.subtree_control", "+cpu +memory +pids"),
                        ("edgetb/n1/cpu.max", "50000 100000"),
                        ("edgetb/n1/memory.max", str(64 * MB)),
                        ("edgetb/n1/memory.swap.max", "0"),
                        ("edgetb/n1/pids.max", "512")]
    n1 = m.root / "edgetb" / "n1"
    assert _read(m.root / "cgroup.subtree_control") == "cpu memory pids"
    assert _read(m.root / "edgetb" / "cgroup.subtree_control") == "cpu memory pids"
    assert _read(n1 / "cgroup.controllers") == "cpu memory pids"
    assert _read(n1 / "cpu.max") == "50000 100000" and _read(n1 / "memory.max") == str(64 * MB)
    assert cg.limits() == {"cpu_quota_us": 50_000, "cpu_period_us": 100_000, "memory_bytes": 64 * MB,
                           "swap_bytes": 0, "pids_max": 512, "pids": set()}
    assert cg.box() == {"cpu_quota_us": 50_000, "cpu_period_us": 100_000, "memory_bytes": 64 * MB,
                        "swap_bytes": 0, "pids_max": 512, "pids_current": 0, "pids_max_hits": 0}
    assert cgroups.leftover_groups(m.root) == ["n1"]


def test_v2_enables_only_what_is_missing(v2):
    """A systemd host has cpu and memory on at the root already: nothing is written there;
    a second node finds edgetb/ ready and writes only its own limits."""
    m = v2(root_enabled="cpuset cpu io memory pids")
    cgroups.Cgroup("n1", root=m.root).create(2, 512)
    cgroups.Cgroup("n2", root=m.root).create(0.001, 16, pids=64)   # below the kernel's 1 ms minimum
    assert m.writes == [("edgetb/cgroup.subtree_control", "+cpu +memory +pids"),
                        ("edgetb/n1/cpu.max", "200000 100000"), ("edgetb/n1/memory.max", str(512 * MB)),
                        ("edgetb/n1/memory.swap.max", "0"), ("edgetb/n1/pids.max", "512"),
                        ("edgetb/n2/cpu.max", "1000 100000"), ("edgetb/n2/memory.max", str(16 * MB)),
                        ("edgetb/n2/memory.swap.max", "0"), ("edgetb/n2/pids.max", "64")]
    assert _read(m.root / "cgroup.subtree_control") == "cpuset cpu io memory pids"
    assert cgroups.leftover_groups(m.root) == ["n1", "n2"]


def test_v2_controllers_not_available_is_a_clear_error_and_makes_nothing(v2):
    """A hybrid host's cgroup2 mount, or a container the controllers were not delegated to."""
    m = v2(controllers="cpuset io pids")
    with pytest.raises(cgroups.CgroupError, match=r"controller\(s\) cpu memory not available"):
        cgroups.Cgroup("n1", root=m.root).create(1, 64)
    assert m.writes == [] and not (m.root / "edgetb").exists()


def test_v2_without_pids_or_swap_accounting_keeps_cpu_and_memory_and_says_so(v2, monkeypatch):
    """A kernel (or a container) without the pids controller and without swap
    accounting: the node still gets cpu and memory; its box shows None for the rest."""
    monkeypatch.setitem(V2_FILES, "memory", {k: v for k, v in V2_FILES["memory"].items() if k != "memory.swap.max"})
    m = v2(controllers="cpuset cpu io memory")
    cg = cgroups.Cgroup("n1", root=m.root)
    cg.create(1, 64)
    assert m.writes == [("cgroup.subtree_control", "+cpu +memory"),
                        ("edgetb/cgroup.subtree_control", "+cpu +memory"),
                        ("edgetb/n1/cpu.max", "100000 100000"), ("edgetb/n1/memory.max", str(64 * MB))]
    assert cg.box() == {"cpu_quota_us": 100_000, "cpu_period_us": 100_000, "memory_bytes": 64 * MB,
                        "swap_bytes": None, "pids_max": None, "pids_current": None, "pids_max_hits": None}


def test_v2_root_of_a_container_with_processes_is_a_clear_error(v2):
    """Only the true root is exempt from "no internal processes": in a container's
    cgroup namespace the root holds the container's processes, and enabling fails EBUSY."""
    m = v2(true_root=False, root_pids=(1, 7))
    with pytest.raises(cgroups.CgroupError, match=r"holds processes \[1, 7\]"):
        cgroups.Cgroup("n1", root=m.root).create(1, 64)
    assert not (m.root / "edgetb").exists()


def test_v2_a_process_in_edgetb_itself_is_a_clear_error(v2):
    m = v2(root_enabled="cpu memory")
    cgroups._mkdir(m.root / "edgetb")
    m.write(m.root / "edgetb" / "cgroup.procs", "4242")     # somebody put a process there
    with pytest.raises(cgroups.CgroupError, match=r"edgetb/cgroup.subtree_control.*holds processes \[4242\]"):
        cgroups.Cgroup("n1", root=m.root).create(1, 64)


def test_v2_launch_joins_the_leaf_and_kill_uses_cgroup_kill(v2):
    m = v2()
    cg = cgroups.Cgroup("n1", root=m.root)
    cg.create(1, 64)
    m.start(cg, 101, "term")
    m.start(cg, 102, "ignore-term")
    assert cg.pids() == {101, 102} and cg.populated()
    assert m.pids_in(m.root / "edgetb") == []          # never an internal process
    m.writes.clear()
    cg.kill_all(timeout_s=0.2)
    assert sorted(m.signals) == [(101, "SIGTERM"), (102, "SIGTERM")]   # no SIGKILL by pid
    assert m.writes == [("edgetb/n1/cgroup.kill", "1")]
    assert cg.pids() == set() and not cg.populated()
    assert cg.remove() == []
    assert not (m.root / "edgetb").exists() and cgroups.leftover_groups(m.root) == []


def test_v2_without_cgroup_kill_kills_by_pid(v2):
    """Kernels before 5.14 have no cgroup.kill."""
    m = v2(kill_file=False)
    cg = cgroups.Cgroup("n1", root=m.root)
    cg.create(1, 64)
    m.start(cg, 101, "ignore-term")
    cg.kill_all(timeout_s=0.2)
    assert m.signals == [(101, "SIGTERM"), (101, "SIGKILL")]
    assert not cg.populated() and cg.remove() == []


def test_v2_remove_keeps_edgetb_for_other_nodes(v2):
    m = v2()
    a, b = cgroups.Cgroup("a", root=m.root), cgroups.Cgroup("b", root=m.root)
    a.create(1, 64)
    b.create(1, 64)
    m.start(b, 201)
    assert a.remove() == [] and not a.exists()
    assert (m.root / "edgetb").is_dir() and cgroups.leftover_groups(m.root) == ["b"]
    assert b.pids() == {201}                           # untouched
    assert b.remove() == [] and m.signals == [(201, "SIGTERM")]
    assert not (m.root / "edgetb").exists()


def test_v2_populated_group_is_not_removed_and_is_reported(v2, capsys):
    m = v2()
    cg = cgroups.Cgroup("n1", root=m.root)
    cg.create(1, 64)
    m.start(cg, 301, "unkillable")
    assert cg.remove(timeout_s=0.1) == [m.root / "edgetb" / "n1"]
    assert "could not remove" in capsys.readouterr().err
    assert cg.exists() and cg.pids() == {301} and (m.root / "edgetb").is_dir()
    assert ("edgetb/n1/cgroup.kill", "1") in m.writes


def test_read_limits_v2_unlimited(v2):
    """What a fresh child reads before any limit is written."""
    m = v2(root_enabled="cpu memory")
    d = m.root / "edgetb"
    cgroups._mkdir(d)
    assert cgroups.read_limits(d, d, v2=True) == \
        {"cpu_quota_us": None, "cpu_period_us": 100_000, "memory_bytes": None, "swap_bytes": None,
         "pids_max": None}


# ============================================================================ v1, mirrored

@pytest.mark.parametrize("cpu_mount", ["cpu", "cpu,cpuacct"])
def test_v1_create_kill_remove(tmp_path, monkeypatch, cpu_mount):
    m = Mirror(tmp_path / "cgroup", v2=False, hierarchies=(cpu_mount, "memory", "pids")).install(monkeypatch)
    cg = cgroups.Cgroup("n1", root=m.root)
    cpu, mem, pids = (m.root / h / "edgetb" / "n1" for h in (cpu_mount, "memory", "pids"))
    assert not cg.v2 and cg.dirs == {"cpu": cpu, "memory": mem, "pids": pids}
    assert read_default_limits(m.root / cpu_mount, m.root / "memory") == \
        {"cpu_quota_us": None, "cpu_period_us": 100_000, "memory_bytes": None, "swap_bytes": None,
         "pids_max": None}
    cg.create(1.5, 256)
    assert m.writes == [(f"{cpu_mount}/edgetb/n1/cpu.cfs_period_us", "100000"),
                        (f"{cpu_mount}/edgetb/n1/cpu.cfs_quota_us", "150000"),
                        ("memory/edgetb/n1/memory.limit_in_bytes", str(256 * MB)),
                        ("pids/edgetb/n1/pids.max", "512")]
    # Without swap accounting (no memory.memsw.* files) there is no swap limit: None says so.
    assert cg.limits() == {"cpu_quota_us": 150_000, "cpu_period_us": 100_000, "memory_bytes": 256 * MB,
                           "swap_bytes": None, "pids_max": 512, "pids": set()}
    m.start(cg, 101, "ignore-term")
    m.start(cg, 102, "term")
    assert m.pids_in(cpu) == [101, 102] and m.pids_in(mem) == [101, 102] and m.pids_in(pids) == [101, 102]
    assert cg.populated() and cgroups.leftover_groups(m.root) == ["n1"]
    assert cg.remove(timeout_s=0.2) == []
    assert sorted(m.signals) == [(101, "SIGKILL"), (101, "SIGTERM"), (102, "SIGTERM")]
    for h in (cpu_mount, "memory", "pids"):
        assert not (m.root / h / "edgetb").exists()


def test_v1_memsw_is_the_memory_limit_raised_first(tmp_path, monkeypatch):
    """With swap accounting, memory+swap is held at the memory limit; the kernel wants
    memsw >= memory at every step, so memsw is lifted before memory is written."""
    m = Mirror(tmp_path / "cgroup", v2=False, hierarchies=("cpu", "memory", "pids"), memsw=True)
    m.install(monkeypatch)
    cg = cgroups.Cgroup("n1", root=m.root)
    cg.create(1, 128, pids=100)
    assert m.writes[2:] == [("memory/edgetb/n1/memory.memsw.limit_in_bytes", "-1"),
                            ("memory/edgetb/n1/memory.limit_in_bytes", str(128 * MB)),
                            ("memory/edgetb/n1/memory.memsw.limit_in_bytes", str(128 * MB)),
                            ("pids/edgetb/n1/pids.max", "100")]
    (cg.dirs["pids"] / "pids.current").write_text("100\n")
    (cg.dirs["pids"] / "pids.events").write_text("max 7\n")
    assert cg.box() == {"cpu_quota_us": 100_000, "cpu_period_us": 100_000, "memory_bytes": 128 * MB,
                        "swap_bytes": 0, "pids_max": 100, "pids_current": 100, "pids_max_hits": 7}


def test_v1_without_a_pids_hierarchy_still_limits_cpu_and_memory(tmp_path, monkeypatch):
    m = Mirror(tmp_path / "cgroup", v2=False).install(monkeypatch)
    cg = cgroups.Cgroup("n1", root=m.root)
    cg.create(1, 64)
    assert "pids" not in cg.dirs and cg.limits()["pids_max"] is None and cg.box()["pids_max_hits"] is None


def read_default_limits(cpu_dir, mem_dir):
    return cgroups.read_limits(cpu_dir, mem_dir, v2=False)


def test_v1_leftovers_in_either_hierarchy(tmp_path, monkeypatch):
    """A crash between the two mkdirs leaves a group in memory/ only: reset must see it."""
    m = Mirror(tmp_path / "cgroup", v2=False, hierarchies=("cpu", "memory", "pids")).install(monkeypatch)
    cgroups._mkdir(m.root / "memory" / "edgetb")
    cgroups._mkdir(m.root / "memory" / "edgetb" / "half")
    cgroups._mkdir(m.root / "pids" / "edgetb")
    cgroups._mkdir(m.root / "pids" / "edgetb" / "pidsonly")
    cgroups.Cgroup("whole", root=m.root).create(1, 64)
    assert cgroups.leftover_groups(m.root) == ["half", "pidsonly", "whole"]


def test_v1_memory_hierarchy_missing_is_a_clear_error(tmp_path, monkeypatch):
    m = Mirror(tmp_path / "cgroup", v2=False, hierarchies=("cpu",)).install(monkeypatch)
    with pytest.raises(cgroups.CgroupError, match="no memory hierarchy"):
        cgroups.Cgroup("n1", root=m.root).create(1, 64)


def test_layout_detection(tmp_path):
    Mirror(tmp_path / "v2", v2=True)
    Mirror(tmp_path / "v1", v2=False)
    assert cgroups.is_v2(tmp_path / "v2") and not cgroups.is_v2(tmp_path / "v1")
    with pytest.raises(cgroups.CgroupError):
        cgroups.Cgroup("../x", root=tmp_path / "v2")


# ============================================================================ real kernel

# Joins the cgroups the way worker/launch.py does (its own pid into each cgroup.procs),
# ignores SIGTERM, and says "ready" once in. Two of them make a group of two members;
# both are children of this process, so the test reaps them (no zombie left behind).
MEMBER = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for f in sys.argv[1:]:
    with open(f, "w") as fh:
        fh.write(str(os.getpid()))
print("ready", flush=True)
time.sleep(600)
"""


def _members(procs_files, n=2):
    ps = []
    for _ in range(n):
        ps.append(subprocess.Popen([sys.executable, "-c", MEMBER, *procs_files], stdout=subprocess.PIPE, text=True))
        assert ps[-1].stdout.readline().strip() == "ready"
    return ps


def _reap(ps):
    for p in ps:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()


def _cgroup_lines(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cgroup").read_text().splitlines()


@ah.need_root()
def test_real_hierarchy_limits_membership_kill_remove():
    """The machine's own hierarchy at /sys/fs/cgroup (v1 here), real processes."""
    name = f"cgtest{os.getpid()}"
    cg = cgroups.Cgroup(name)
    assert cg.v2 == cgroups.is_v2(Path("/sys/fs/cgroup"))
    parents = {d.parent for d in cg.dirs.values()}
    had_parent = {p: p.exists() for p in parents}
    ps = []
    try:
        cg.create(0.25, 96, pids=40)
        lim = cg.limits()
        swap = lim.pop("swap_bytes")
        assert lim == {"cpu_quota_us": 25_000, "cpu_period_us": 100_000, "memory_bytes": 96 * MB,
                       "pids_max": 40, "pids": set()}
        swap_file = ("memory.swap.max" if cg.v2 else "memory.memsw.limit_in_bytes")
        assert swap == (0 if (cg.dirs.get("unified") or cg.dirs["memory"]).joinpath(swap_file).exists() else None)
        ps = _members(cg.procs_files)
        assert cg.pids() == {p.pid for p in ps}
        lines = _cgroup_lines(ps[0].pid)
        if cg.v2:
            assert f"0::/edgetb/{name}" in lines
        else:
            for c in ("cpu", "memory", "pids"):
                assert any(c in ln.split(":")[1].split(",") and ln.endswith(f"/edgetb/{name}") for ln in lines), lines
        cg.kill_all(timeout_s=0.3)                     # SIGTERM is ignored: SIGKILL it is
        assert [p.wait(10) for p in ps] == [-signal.SIGKILL] * 2
        assert cg.pids() == set() and not cg.populated()
        assert cg.remove() == []
        assert not cg.exists()
        for parent, existed in had_parent.items():   # edgetb/ goes with the last group
            assert existed or not parent.exists(), parent
    finally:
        _reap(ps)
        cg.remove()


def _hybrid_unified() -> Path | None:
    d = Path("/sys/fs/cgroup/unified")
    return d if cgroups.is_v2(d) else None


@ah.need_root()
@ah.need("has-it", None if _hybrid_unified() is not None else
         "no cgroup2 mount at /sys/fs/cgroup/unified (not a hybrid host; on a unified host "
         "test_real_hierarchy_limits_membership_kill_remove runs v2 instead)")
def test_real_cgroup2_without_controllers_membership_events_kill(monkeypatch):
    """The kernel's own v2 files where this host has them: a hybrid host's cgroup2 mount
    (cpu and memory are bound to v1, so create() must refuse), real processes moved in,
    `populated` from cgroup.events, killed with cgroup.kill, removed."""
    root = _hybrid_unified()
    name = f"cgtest{os.getpid()}"
    cg = cgroups.Cgroup(name, root=root)
    assert cg.v2 and cg.dirs == {"unified": root / "edgetb" / name}
    had_parent = (root / "edgetb").exists()
    avail = (root / "cgroup.controllers").read_text().split()
    ps = []
    try:
        if not {"cpu", "memory"} <= set(avail):
            with pytest.raises(cgroups.CgroupError, match="not available"):
                cg.create(1, 64)
        (root / "edgetb").mkdir(exist_ok=True)
        (root / "edgetb" / name).mkdir(exist_ok=True)
        assert not cg.populated()
        ps = _members(cg.procs_files)
        assert cg.pids() == {p.pid for p in ps} and cg.populated()
        assert f"0::/edgetb/{name}" in _cgroup_lines(ps[0].pid)
        sent = []
        real_signal = cgroups._signal
        monkeypatch.setattr(cgroups, "_signal", lambda pids, sig: (sent.append(sig), real_signal(pids, sig)))
        cg.kill_all(timeout_s=0.3)
        assert sent == [signal.SIGTERM]                # the SIGKILL was cgroup.kill's
        assert [p.wait(10) for p in ps] == [-signal.SIGKILL] * 2
        assert not cg.populated() and cg.pids() == set()
        assert cg.remove() == [] and not cg.exists()
        assert had_parent or not (root / "edgetb").exists()
    finally:
        _reap(ps)
        cg.remove()
