"""Files the controller reads because a request named them (`/update/tc?file=`) or on a
request's behalf (the node confs pushed by `/conf/dataset` and `/conf/structure`).

The controller runs as root, so a path from a request must not become a way to read the
machine: only regular files inside the project folder (ROOT), the testbed's `dir_name`
or a folder the run script names are read. Every symlink is resolved first and the file
must be inside; then it is opened relative to a descriptor of that folder with
openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS), so a folder on the way swapped for a
symlink between the check and the open (or a `..`) cannot lead out of it. Where the
kernel has no openat2 (before 5.6, or a seccomp filter refuses it) the file is opened
as an O_PATH descriptor first (nothing of it is opened for reading), and what that
descriptor names (fstat, /proc/self/fd) is checked before it is reopened for reading.
The file is opened with O_NOFOLLOW | O_NONBLOCK (a FIFO does not block a handler thread)
and checked with fstat (a FIFO or a device such as /dev/zero is refused before anything
is read); at most `limit` bytes are read. A refusal of a path outside those folders says
only the rule: not whether the path exists, nor anything of its content.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from pathlib import Path
from typing import Iterable

from dml_app import net

# A links file of 300 nodes in a full mesh (89,700 links) is 3.0 MiB of JSON with `bw`
# only and 10.7 MiB indented with delay, jitter and loss on every link: 16 MiB.
LINKS_FILE_LIMIT = 16 * net.MiB
# A node conf is pushed as one JSON body, which a node takes up to net.JSON_LIMIT.
CONF_FILE_LIMIT = net.JSON_LIMIT


class FileRefused(ValueError):
    """A file the controller will not read (HTTP 400); the message names the rule."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def roots_of(*folders) -> list[str]:
    """The real paths of `folders` in their order (None and empty ones skipped), without
    duplicates and without folders inside another one of them."""
    reals = [os.path.realpath(str(f)) for f in folders if f]
    out: list[str] = []
    for i, real in enumerate(reals):
        if real in out or any(_inside(real, o) for j, o in enumerate(reals) if o != real):
            continue
        out.append(real)
    return out


def rule(what: str, roots: list[str], limit: int) -> str:
    others = f" (or {', '.join(roots[1:])})" if len(roots) > 1 else ""
    return f"{what} must be a regular file inside {roots[0]}{others}, at most {net.human_bytes(limit)}"


def read_project_file(path: str | os.PathLike, roots: Iterable[str | os.PathLike], limit: int, *,
                      what: str = "file", base: str | os.PathLike | None = None) -> bytes:
    """The bytes of `path` (relative paths are taken from `base`, default the first root)
    if it is a regular file of at most `limit` bytes whose real path is inside one of
    `roots`; FileRefused otherwise. `what` ("links file") starts every message."""
    roots = roots_of(*roots)
    if not roots:
        raise ValueError("read_project_file: no folder to read from")
    the_rule = rule(what, roots, limit)
    p = Path(path)
    if not p.is_absolute():
        p = Path(base or roots[0]) / p
    real = os.path.realpath(p)          # every symlink resolved, whether or not it exists
    if not any(_inside(real, r) for r in roots):
        raise FileRefused(the_rule)     # nothing more: not whether it exists, not what it is
    shown = str(path)[:200]
    root = next(r for r in roots if _inside(real, r))
    try:
        fd = _open_beneath(root, os.path.relpath(real, root))
    except FileNotFoundError:
        raise FileRefused(f"{what} {shown}: no such file; {the_rule}") from None
    except _Escaped:
        raise FileRefused(the_rule) from None
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.ELOOP):   # led out of the folder on the way
            raise FileRefused(the_rule) from None
        raise FileRefused(f"{what} {shown}: {e.strerror}; {the_rule}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{what} {shown}: not a regular file; {the_rule}")
        if st.st_size > limit:
            raise FileRefused(f"{what} {shown}: {st.st_size} bytes; {the_rule}")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:           # it grew since fstat
            raise FileRefused(f"{what} {shown}: more than {limit} bytes; {the_rule}")
        return data
    finally:
        os.close(fd)


# openat2(2): the open_how struct and the resolve flags of linux/openat2.h.
SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "armv7l": 437, "riscv64": 437,
               "ppc64le": 437, "s390x": 437}.get(platform.machine())
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Escaped(Exception):
    """What an O_PATH descriptor names is not inside the folder (the fallback's check)."""


_libc = None


def _openat2(dirfd: int, rel: str, flags: int, resolve: int) -> int:
    """openat2(dirfd, rel, {flags, 0, resolve}); OSError (ENOSYS without it)."""
    global _libc
    if SYS_OPENAT2 is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        _libc = lib
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(rel)),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return int(fd)


def _open_beneath(root: str, rel: str) -> int:
    """A descriptor open for reading of `rel` inside folder `root` that cannot have been
    reached through anything leading out of it (a symlink, `..`, a /proc magic link)."""
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            return _openat2(dirfd, rel, READ_FLAGS, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM):   # EPERM: a seccomp filter's answer
                raise
        return _open_checked(dirfd, root, rel)
    finally:
        os.close(dirfd)


def _open_checked(dirfd: int, root: str, rel: str) -> int:
    """openat2's stand-in: an O_PATH descriptor first (opening it reads nothing and
    blocks on nothing), what it names checked (inside `root`, by /proc/self/fd), then
    reopened for reading through it and checked to be the same file. Anything but a
    regular file comes back as that O_PATH descriptor, never opened for reading (the
    caller's fstat refuses it)."""
    pfd = os.open(rel, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        st = os.fstat(pfd)
        if stat.S_ISLNK(st.st_mode):    # O_NOFOLLOW gave the link itself: one swapped in
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
        opened = os.readlink(f"/proc/self/fd/{pfd}")
        if not _inside(opened, root):
            raise _Escaped(opened)
        if not stat.S_ISREG(st.st_mode):
            return os.dup(pfd)
        fd = os.open(f"/proc/self/fd/{pfd}", READ_FLAGS & ~os.O_NOFOLLOW)
        again = os.fstat(fd)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise _Escaped(opened)
        return fd
    finally:
        os.close(pfd)
