"""cpu and memory limits for node processes, on cgroup v2 or v1, under `edgetb/`.

The cgroup is also how a node's processes are found at stop and reset: membership is a
fact the kernel keeps, so nothing is killed by guessing a pid.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
GROUP = "edgetb"
CFS_PERIOD_US = 100_000


def _v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


class Cgroup:
    """One node's cgroup(s). `dirs` are the directories to create/remove."""

    def __init__(self, name: str):
        self.name = name
        if _v2():
            self.dirs = {"unified": ROOT / GROUP / name}
        else:
            self.dirs = {"cpu": ROOT / "cpu" / GROUP / name, "memory": ROOT / "memory" / GROUP / name}

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def create(self, cpu: float, ram_mb: int) -> None:
        quota = max(1000, int(cpu * CFS_PERIOD_US))
        mem = int(ram_mb) * 1024 * 1024
        if "unified" in self.dirs:
            parent = ROOT / GROUP
            parent.mkdir(exist_ok=True)
            _enable_v2_controllers(parent)
            d = self.dirs["unified"]
            d.mkdir(exist_ok=True)
            (d / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
            (d / "memory.max").write_text(str(mem))
        else:
            for d in self.dirs.values():
                d.parent.mkdir(exist_ok=True)
                d.mkdir(exist_ok=True)
            c = self.dirs["cpu"]
            (c / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (c / "cpu.cfs_quota_us").write_text(str(quota))
            (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(mem))

    def pids(self) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files:
            try:
                out.update(int(x) for x in Path(f).read_text().split())
            except FileNotFoundError:
                pass
        return out

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every member, then SIGKILL what is left after timeout_s."""
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)

    def remove(self) -> None:
        self.kill_all()
        for d in self.dirs.values():
            for _ in range(50):  # rmdir fails while the kernel still reaps members
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
            try:
                d.parent.rmdir()  # edgetb/ itself, once empty
            except OSError:
                pass

    def exists(self) -> bool:
        return any(d.exists() for d in self.dirs.values())


def _enable_v2_controllers(parent: Path) -> None:
    for p in (ROOT, parent):
        ctl = p / "cgroup.subtree_control"
        have = ctl.read_text().split()
        for c in ("cpu", "memory"):
            if c not in have:
                ctl.write_text(f"+{c}")


def leftover_groups() -> list[str]:
    """Names of node cgroups present under edgetb/ (after a crash, for reset)."""
    base = ROOT / GROUP if _v2() else ROOT / "cpu" / GROUP
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir())
