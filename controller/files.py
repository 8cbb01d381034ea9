"""Files the controller reads because a request named them (`/update/tc?file=`) or on a
request's behalf (the node confs pushed by `/conf/dataset` and `/conf/structure`).

The controller runs as root, so a path from a request must not become a way to read the
machine: only regular files inside the project folder (ROOT), the testbed's `dir_name`
or a folder the run script names are read; every symlink is resolved first and the file
must still be inside; the file is opened with O_NOFOLLOW | O_NONBLOCK (a FIFO does not
block a handler thread) and checked with fstat (a FIFO or a device such as /dev/zero is
refused before anything is read); at most `limit` bytes are read. A refusal of a path
outside those folders says only the rule: not whether the path exists, nor anything of
its content.
"""
from __future__ import annotations

import os
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
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise FileRefused(f"{what} {shown}: no such file; {the_rule}") from None
    except OSError as e:
        raise FileRefused(f"{what} {shown}: {e.strerror}; {the_rule}") from None
    try:
        st = os.fstat(fd)
        # What was opened must still be inside: a folder on the way may have been swapped
        # for a symlink between realpath() and open().
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            opened = real
        if not any(_inside(opened, r) for r in roots):
            raise FileRefused(the_rule)
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
