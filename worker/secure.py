"""Root-owned directories and private files for the agent's locks and state.

The agent runs as root on machines shared with other users: a directory or file it
writes must not be one another user made or can swap for a symlink (a root process
writing through a planted symlink overwrites any file). So every directory the testbed
keeps state in is made here, checked to be a real directory owned by root, with its
mode set; and lock and state files are opened without following symlinks, mode 0600.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


class UnsafePath(RuntimeError):
    pass


def secure_dir(path, mode: int = 0o755) -> Path:
    """Make the directory chain of `path` (missing parts with `mode`), then check that
    every part is owned by root and the last a real directory (not a symlink), and set
    its mode to `mode`. -> Path. UnsafePath when a part is someone else's."""
    p = Path(path)
    if not p.is_absolute():
        raise UnsafePath(f"{p}: not an absolute path")
    cur = Path(p.anchor)
    for part in p.parts[1:]:
        cur = cur / part
        try:
            os.mkdir(cur, mode)
        except FileExistsError:
            pass
        st = os.lstat(cur)
        # A root-owned symlink on the way (/var/run -> /run) is the system's own.
        if st.st_uid != 0 or not (stat.S_ISDIR(st.st_mode) or (stat.S_ISLNK(st.st_mode) and cur != p)):
            raise UnsafePath(f"{cur}: expected a directory owned by root "
                             f"(found {'a symlink' if stat.S_ISLNK(st.st_mode) else 'uid %d' % st.st_uid}); "
                             f"refusing to keep testbed state there")
    # Mode set through a descriptor of the very directory checked (no symlink race).
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{p}: not a directory owned by root")
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return p


def open_private(path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """A file descriptor of `path` opened without following a symlink, created 0600,
    refused unless it is a regular file owned by root."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if st.st_uid != 0 or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePath(f"{path}: not a regular file owned by root")
    return fd


def write_private(path, data: str | bytes, dir_mode: int = 0o700) -> None:
    """Replace `path` atomically with `data`, mode 0600, in a secure_dir of its parent."""
    p = Path(path)
    secure_dir(p.parent, dir_mode)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, p)
