"""The agent's side of HTTP sharing (controller/share.py): fetch a content-addressed
archive of a shared folder from the controller, check that its bytes hash to its name,
and unpack it once into this agent's cache; unchanged content is never fetched again.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
import threading
from pathlib import Path

from worker.secure import UnsafePath, secure_dir

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
CACHE_BASE = Path("/var/cache/edgetb")
NFS_VERSION = "4"


# The largest archive an agent downloads (the controller builds each one in memory, so
# a real share is far smaller): a stray answer cannot fill the worker's memory.
SHARE_LIMIT_BYTES = 4 << 30


class ShareError(RuntimeError):
    pass


def cache_dir(agent_port: int) -> Path:
    return CACHE_BASE / f"agent-{int(agent_port)}" / "share"


def fetch(url: str, digest: str, cache: Path, *, token: str, get=None) -> tuple[Path, bool]:
    """The unpacked folder of archive `digest` in `cache`, downloading it from `url` unless
    already there. -> (folder, downloaded). ShareError when the bytes do not hash to
    `digest` (then nothing is kept)."""
    if not SHA_RE.match(digest or ""):
        raise ShareError(f"bad archive name {digest!r}: expected a sha256 (64 hex digits)")
    out = cache / digest
    if out.is_dir():
        return out, False
    if get is None:
        from dml_app import calls

        def get(u):
            return calls.call("GET", u, token=token, timeout_s=300, retries=3,
                            max_bytes=SHARE_LIMIT_BYTES).content
    data = get(url)
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise ShareError(f"archive {url} refused: sha256 mismatch, expected {digest}, got {got} "
                         f"({len(data)} bytes); nothing deployed")
    try:
        secure_dir(cache, 0o700)     # root's alone; nodes see their folder through binds
    except (UnsafePath, OSError) as e:
        raise ShareError(f"share cache: {e}; nothing deployed") from None
    tmp = cache / f".{digest}.{os.getpid()}.{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            tar.extractall(tmp, filter="data")    # no absolute paths, no '..', no devices
        os.replace(tmp, out)
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)       # another thread unpacked it first
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.is_dir():
            raise ShareError(f"unpacking archive {digest}: {e}") from None
    except tarfile.TarError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ShareError(f"archive {digest} is not a tar: {e}") from None
    return out, True


# ----------------------------------------------------------------------------- NFS (client side)

def mount_argv(server: str, path: str, target: str, *, ro: bool = True) -> list[str]:
    """A physical node's (or an agent's) mount of a share: read-only (the export is too)."""
    opts = f"vers={NFS_VERSION},{'ro' if ro else 'rw'},hard,nolock"
    return ["mount", "-t", "nfs", "-o", opts, f"{server}:{path}", target]


def umount_argv(target: str) -> list[str]:
    return ["umount", "-l", target]
