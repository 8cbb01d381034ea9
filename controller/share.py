"""Sharing dml_app/ and dataset/ with workers that are not the controller's machine.

Three ways, one per situation:

* **bind** (an agent on the controller's own machine, the embedded default): the
  folder itself is bind-mounted into each node; nothing is copied.
* **nfs** (EdgeTB's way, where the kernel has an NFS server and the workers a client):
  the controller exports the folder (`exportfs`), physical nodes mount it, containers get
  an NFS volume. The argv lists and volume options are pure functions below.
* **http** (everywhere else): the folder becomes a content-addressed archive, a tar
  built deterministically (sorted entries, no times or owners) whose sha256 is its
  name; the controller serves it on `GET /share/<sha256>` (token-checked); each agent
  downloads it once, checks the hash, unpacks it in its cache
  (/var/cache/edgetb/agent-<port>/share/<sha256>/) and bind-mounts that. Unchanged
  content has the same name, so it is not downloaded again; a changed file gives a new
  archive at the next deployment; an archive whose bytes do not hash to its name is
  refused and nothing is deployed.

`mode()` decides nfs or http and says why in one line.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

from dml_app import node_data
from worker.shares import (NFS_VERSION, SHA_RE, ShareError, mount_argv,  # noqa: F401
                           umount_argv)  # (one definition for both sides)

SKIP = ("__pycache__",)
SKIP_SUFFIX = (".pyc",)
# Read-only, root squashed: a node (root in it or not) cannot change the app or the data
# every other node runs on; results come back over HTTP.
NFS_EXPORT_OPTIONS = "ro,sync,no_subtree_check,root_squash"

# ----------------------------------------------------------------------------- archives

def _entries(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP)
        base = Path(dirpath)
        if base != folder:
            out.append(base)
        out += [base / f for f in sorted(filenames) if not f.endswith(SKIP_SUFFIX)]
    return out


def build_archive(folder: str | Path) -> bytes:
    """A tar of the folder that depends only on names, modes and contents."""
    folder = Path(folder)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in _entries(folder):
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                continue                      # never follow a link out of the folder
            info = tarfile.TarInfo(rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if p.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif p.is_file():
                info.mode = 0o755 if os.access(p, os.X_OK) else 0o644
                data = p.read_bytes()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The agent's side (download, verify, cache, unpack) is worker/shares.py.


class Store:
    """The controller's archives, by sha256 (kept in memory: dml_app and a split dataset
    are megabytes). `served` counts downloads per archive."""

    def __init__(self):
        self.archives: dict[str, bytes] = {}
        self.served: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, folder: str | Path) -> str:
        data = build_archive(folder)
        digest = sha256(data)
        with self._lock:
            self.archives[digest] = data
        return digest

    def get(self, digest: str) -> bytes | None:
        if not SHA_RE.match(digest or ""):
            return None
        with self._lock:
            data = self.archives.get(digest)
            if data is not None:
                self.served[digest] = self.served.get(digest, 0) + 1
            return data


class DataStore(Store):
    """Content-addressed data bundles (the serverless workers' data parts, whose bytes
    are dml_app/node_data.pack_train_parts), by sha256, kept in memory (in `archives`,
    as Store keeps them) and served on `GET /data/<sha256>` to any node credential
    (controller/access.py). Bounded: at most `max_bytes` in all and `max_bundles`
    bundles; adding past either raises ValueError (nothing is evicted: a URL handed to a
    worker keeps working for the whole run). Adding the same bytes again is free."""

    def __init__(self, max_bytes: int = 1 << 30, max_bundles: int = 4096):
        super().__init__()
        self.max_bytes, self.max_bundles = int(max_bytes), int(max_bundles)
        self.total = 0

    def add(self, data: bytes) -> str:
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"a data bundle is bytes, not {type(data).__name__}")
        data = bytes(data)
        digest = sha256(data)
        with self._lock:
            if digest in self.archives:
                return digest
            if len(self.archives) >= self.max_bundles:
                raise ValueError(f"data store full: {len(self.archives)} bundles (limit {self.max_bundles})")
            if self.total + len(data) > self.max_bytes:
                raise ValueError(f"data store full: {self.total} + {len(data)} bytes is over its "
                                 f"limit of {self.max_bytes} bytes")
            self.archives[digest] = data
            self.total += len(data)
        return digest


DATA_ROUTE = "/data/"       # + sha256: where the controller serves a DataStore's bundles


def publish_parts(store: DataStore, dataset_dir: str | Path, parts) -> list[str]:
    """Pack each (start, count) range of train parts of `dataset_dir` into one bundle
    (node_data.pack_train_parts: the same parts give the same bytes, hence the same
    name), add it to `store` and return the URL paths, "/data/<sha256>" per range, in
    order. A worker's `dataset_url` is f"http://{NET_CTL_ADDRESS}{path}". ValueError
    (node_data.DatasetError) for a range that is not integers or not in the dataset, or
    a store that is full."""
    out = []
    for start, count in parts:
        # As given: pack_train_parts checks them (integers, parts that exist).
        out.append(DATA_ROUTE + store.add(node_data.pack_train_parts(str(dataset_dir), start, count)))
    return out


# ----------------------------------------------------------------------------- NFS

def nfs_unavailable(proc_filesystems: str | None = None, which=shutil.which) -> str | None:
    """Why NFS cannot be used on this machine (server side: the controller; client side:
    mount.nfs), or None when it can."""
    if proc_filesystems is None:
        try:
            proc_filesystems = Path("/proc/filesystems").read_text()
        except OSError as e:
            proc_filesystems = ""
            why_fs = f"cannot read /proc/filesystems ({e})"
        else:
            why_fs = None
    else:
        why_fs = None
    fs = {line.split()[-1] for line in proc_filesystems.splitlines() if line.strip()}
    reasons = []
    if why_fs:
        reasons.append(why_fs)
    elif "nfsd" not in fs:
        reasons.append("no nfsd in /proc/filesystems (the kernel has no NFS server)")
    if "nfs" not in fs and "nfs4" not in fs:
        reasons.append("no nfs in /proc/filesystems (the kernel has no NFS client)")
    for tool in ("exportfs", "mount.nfs"):
        if which(tool) is None:
            reasons.append(f"no {tool}")
    return "; ".join(reasons) or None


def mode(force: str | None = None) -> tuple[str, str]:
    """("nfs" | "http", the line to say at deploy). `force` ("nfs"/"http") overrides."""
    if force == "http":
        return "http", "share: dml_app/dataset over HTTP from the controller (asked for)"
    why = nfs_unavailable()
    if why is None:
        return "nfs", "share: dml_app/dataset over NFS exported by the controller"
    if force == "nfs":
        raise ShareError(f"NFS asked for but not available: {why}")
    return "http", f"share: dml_app/dataset over HTTP from the controller (NFS not available: {why})"


def export_argv(path: str, client: str = "*", options: str = NFS_EXPORT_OPTIONS) -> list[str]:
    """The controller's export of a shared folder (EdgeTB's add_nfs)."""
    return ["exportfs", "-o", options, f"{client}:{path}"]


def unexport_argv(path: str, client: str = "*") -> list[str]:
    return ["exportfs", "-u", f"{client}:{path}"]


def docker_nfs_volume(server: str, path: str, *, ro: bool = True) -> dict:
    """Options of the Docker volume a container mounts a share through (the `local`
    driver with type nfs, as EdgeTB's containers got): docker.types.Mount(...,
    type="volume", driver_config=DriverConfig("local", options=...))."""
    return {"driver": "local",
            "driver_opts": {"type": "nfs", "o": f"addr={server},nfsvers={NFS_VERSION},{'ro' if ro else 'rw'}",
                            "device": f":{path}"}}


class Exports:
    """The folders this controller exported over NFS, each to one worker, so that they
    are unexported again (unexport_all) when the testbed closes."""

    def __init__(self):
        self._done: list[tuple[str, str]] = []      # (path, client)
        self._lock = threading.Lock()

    def export(self, path: str, client: str) -> None:
        """exportfs `path` to `client` once; ShareError saying why it failed."""
        with self._lock:
            if (path, client) in self._done:
                return
            p = subprocess.run(export_argv(path, client), capture_output=True, text=True)
            if p.returncode != 0:
                raise ShareError(f"exporting {path} to {client} over NFS: {p.stderr.strip() or p.stdout.strip()}")
            self._done.append((path, client))

    def unexport_all(self) -> None:
        with self._lock:
            while self._done:
                path, client = self._done.pop()
                subprocess.run(unexport_argv(path, client), capture_output=True)
