"""The node image for docker emulated nodes: build it once, reuse it after.

    sudo python3 worker/image.py build [--tag edgetb-node:latest] [--method auto|dockerfile|offline] [--force]
    sudo python3 worker/image.py show  [--tag edgetb-node:latest]

Two ways to the same image (Python 3, a venv on PATH with dml_app/dml_req.txt installed;
the agent bind-mounts dml_app/ and the dataset at run time):

* dockerfile - the ordinary path for users with a registry: `dml_app/Dockerfile`
  (`FROM python:3.11-slim`, pip install of dml_req.txt) built through the Docker SDK,
  exactly as `docker build -t edgetb-node dml_app/` would.
* offline - for machines without registry access (the CI machines): no base image is
  pulled. `debootstrap --variant=minbase bookworm` makes a Debian root file system; in a
  chroot (its own mount and pid namespaces, so nothing stays mounted) with this host's
  resolv.conf and CA bundle copied in (a network that re-signs TLS needs its CA), apt
  installs python3 and python3-venv, and pip installs dml_req.txt into /opt/venv, taking
  wheels from a local directory first (the CPU torch wheel, e.g. /opt/wheels) and the
  rest from the package index. The CA bundle, wheels and apt lists are removed again and
  `tar -C ROOTFS -c . | docker import` (PATH, WORKDIR and labels set as changes) makes
  the image: about 1.3 GB, about two minutes.

`auto` (the default) takes the Dockerfile when its base image is present or can be
pulled, and the offline builder otherwise. An image already present under the tag is
reused: one this module built is reused while dml_req.txt is unchanged (the label
`edgetb.image.req` holds its hash), one built some other way is trusted as it is;
`--force` rebuilds. Builds take a lock, so the CLI and an agent's `POST /emulated/build`
never build at once.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from worker.secure import UnsafePath, open_private, secure_dir

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "dml_app"
REQ_FILE = APP_DIR / "dml_req.txt"
DEFAULT_TAG = "edgetb-node:latest"
BUILDER_VERSION = "1"          # bump when the offline recipe changes: old images get rebuilt
SUITE = "bookworm"
VENV = "/opt/venv"
NODE_APP_DIR = "/home/worker/dml_app"
# In a root-owned dir, not world-writable /run/lock (where a planted symlink would make
# root write through it).
LOCK_FILE = Path("/run/edgetb/image-build.lock")
LABEL = "edgetb.image"           # "1" on every image this module builds
LABEL_REQ = "edgetb.image.req"   # hash of dml_req.txt and the builder version
LABEL_METHOD = "edgetb.image.method"
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,127}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host variables a build inside the chroot may need (a proxy, a package-index mirror).
# PIP_FIND_LINKS and pip's config files name host paths: never handed over.
PASS_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
            "PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT")


class ImageError(RuntimeError):
    pass


class NoDocker(ImageError):
    """No Docker daemon answers (or the docker SDK is missing)."""


def client(timeout_s: float = 600):
    """A Docker SDK client for the daemon of DOCKER_HOST (default the local socket)."""
    try:
        import docker
    except ImportError:
        raise NoDocker("the Docker SDK is missing: pip install docker==7.1.0 (see requirements.txt)") from None
    try:
        c = docker.from_env(timeout=int(timeout_s))
        c.ping()
        return c
    except docker.errors.DockerException as e:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise NoDocker(f"no Docker daemon answers at {where} ({e}); install docker.io and start "
                       f"dockerd (systemctl start docker, or `dockerd &`)") from None


def daemon_answers() -> bool:
    try:
        client(timeout_s=5).close()
        return True
    except NoDocker:
        return False


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.match(tag):
        raise ImageError(f"bad image tag {tag!r}: use NAME[:TAG] in lower case, e.g. {DEFAULT_TAG}")
    return tag


def req_hash(req_file: Path = REQ_FILE) -> str:
    h = hashlib.sha256(Path(req_file).read_bytes())
    h.update(f"builder={BUILDER_VERSION}".encode())
    return h.hexdigest()[:16]


def find(tag: str, c=None):
    """The image under tag, or None."""
    import docker

    c = c or client()
    try:
        return c.images.get(check_tag(tag))
    except docker.errors.ImageNotFound:
        return None


def present(tag: str = DEFAULT_TAG) -> str | None:
    """Why docker nodes cannot use tag here, or None when the daemon answers and has it."""
    try:
        c = client(timeout_s=10)
    except NoDocker as e:
        return str(e)
    try:
        if find(tag, c) is None:
            return f"no image {tag}: build it with `python3 worker/image.py build --tag {tag}`"
        return None
    finally:
        c.close()


def _reusable(img, req: str) -> bool:
    labels = (img.attrs.get("Config") or {}).get("Labels") or {}
    if LABEL not in labels:
        return True                      # the user's own image: trusted as it is
    return labels.get(LABEL_REQ) == req


@contextlib.contextmanager
def _build_lock():
    """One build at a time on this machine. The lock file is removed when released (so
    /run/edgetb can go once empty); a holder that finds it was replaced meanwhile, or its
    folder removed, takes it again."""
    for _ in range(100):
        try:
            secure_dir(LOCK_FILE.parent, 0o755)
            fd = open_private(LOCK_FILE)
        except FileNotFoundError:
            continue                    # the folder went between the two (an agent's reset)
        except (UnsafePath, OSError) as e:
            raise ImageError(f"build lock {LOCK_FILE}: {e}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            now = os.stat(LOCK_FILE, follow_symlinks=False)
            mine = os.fstat(fd)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise ImageError(f"build lock {LOCK_FILE}: could not be taken")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(LOCK_FILE)
        os.close(fd)                    # closing releases the flock


def build(tag: str = DEFAULT_TAG, *, method: str = "auto", force: bool = False,
          wheels_dir: str | None = None, mirror: str | None = None, say=print) -> dict:
    """Make sure the node image exists under tag; -> {"image", "id", "method", "reused", "seconds", "size_mb"}."""
    check_tag(tag)
    if method not in ("auto", "dockerfile", "offline"):
        raise ImageError(f"bad method {method!r}: auto, dockerfile or offline")
    c = client()
    t0 = time.monotonic()
    req = req_hash()
    with _build_lock():
        old = find(tag, c)
        if old is not None and not force and _reusable(old, req):
            return _answer(old, "present", True, t0)
        if method == "auto":
            method = "dockerfile" if _base_available(c, say) else "offline"
        labels = {LABEL: "1", LABEL_REQ: req, LABEL_METHOD: method}
        if method == "dockerfile":
            _build_dockerfile(c, tag, labels, say)
        else:
            _build_offline(c, tag, labels, wheels_dir=wheels_dir, mirror=mirror, say=say)
        new = c.images.get(tag)
        if old is not None and old.id != new.id:
            with contextlib.suppress(Exception):   # still used by a container: leave it
                c.images.remove(old.id)
        return _answer(new, method, False, t0)


def _answer(img, method: str, reused: bool, t0: float) -> dict:
    return {"image": (img.tags or [img.short_id])[0], "id": img.short_id, "method": method,
            "reused": reused, "seconds": round(time.monotonic() - t0, 1),
            "size_mb": round(img.attrs.get("Size", 0) / 2**20)}


# ----------------------------------------------------------------------------- dockerfile

def base_image(dockerfile: Path = APP_DIR / "Dockerfile") -> str:
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"\s*FROM\s+(\S+)", line, re.I)
        if m:
            return m.group(1)
    raise ImageError(f"{dockerfile}: no FROM line")


def _base_available(c, say) -> bool:
    import docker

    base = base_image()
    try:
        c.images.get(base)
        return True
    except docker.errors.ImageNotFound:
        pass
    try:
        repo, _, tag = base.partition(":")
        c.images.pull(repo, tag=tag or "latest")
        return True
    except docker.errors.DockerException as e:
        why = (getattr(e, "explanation", None) or str(e)).splitlines()[0][:160]
        say(f"image: base image {base} cannot be pulled ({why}); building offline")
        return False


def _build_dockerfile(c, tag: str, labels: dict, say) -> None:
    say(f"image: docker build {APP_DIR} -> {tag}")
    err = None
    for chunk in c.api.build(path=str(APP_DIR), tag=tag, labels=labels, rm=True, forcerm=True, decode=True):
        if "stream" in chunk and chunk["stream"].strip():
            say("  " + chunk["stream"].rstrip())
        if "error" in chunk:
            err = chunk["error"]
    if err:
        raise ImageError(f"docker build of {APP_DIR}/Dockerfile failed: {err.strip()}")


# ----------------------------------------------------------------------------- offline

def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageError(f"the offline image builder needs {tool}: apt-get install -y {package}")
    return path


def _run(argv: list[str], *, env: dict | None = None, what: str) -> None:
    p = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if p.returncode != 0:
        tail = "\n    ".join((p.stderr.strip() or p.stdout.strip()).splitlines()[-15:])
        raise ImageError(f"{what} failed (exit {p.returncode}):\n    {tail}")


def _chroot(rootfs: Path, argv: list[str], *, what: str, env: dict | None = None) -> None:
    """Run argv with rootfs as /, in new mount and pid namespaces with their own /proc:
    nothing stays mounted on the host whatever happens."""
    base = {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    base.update({k: os.environ[k] for k in PASS_ENV if k in os.environ})
    base.update(env or {})
    _run(["unshare", "--fork", "--pid", "--mount", "--propagation", "private", "--mount-proc",
          f"--root={rootfs}", "--wd=/", "--"] + argv, env=base, what=what)


def wheel_dirs(explicit: str | None) -> list[Path]:
    """Where local wheels are: the given dir, else PIP_FIND_LINKS' local dirs, else /opt/wheels."""
    if explicit:
        return [Path(explicit)]
    out = [Path(p) for p in re.split(r"[\s]+", os.environ.get("PIP_FIND_LINKS", "")) if p.startswith("/")]
    return [p for p in out + [Path("/opt/wheels")] if p.is_dir()]


def _stage_wheels(dirs: list[Path], dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for d in dirs:
        for f in sorted(glob.glob(str(d / "*.whl"))):
            target = dest / os.path.basename(f)
            if target.exists():
                continue
            try:
                os.link(f, target)        # same file system: no copy
            except OSError:
                shutil.copy2(f, target)
            names.append(target.name)
    return names


def _build_offline(c, tag: str, labels: dict, *, wheels_dir: str | None, mirror: str | None, say) -> None:
    _need("debootstrap", "debootstrap")
    _need("unshare", "util-linux")
    _need("tar", "tar")
    if os.geteuid() != 0:
        raise ImageError("the offline image builder must run as root (debootstrap, chroot)")
    work = Path(tempfile.mkdtemp(prefix="etb-rootfs-", dir="/var/tmp"))
    rootfs = work / "rootfs"
    try:
        t = time.monotonic()
        say(f"image: debootstrap --variant=minbase {SUITE} (offline builder, in {work})")
        _run(["debootstrap", "--variant=minbase", SUITE, str(rootfs)] + ([mirror] if mirror else []),
             what="debootstrap")
        say(f"image:   root file system in {time.monotonic() - t:.0f} s")
        shutil.copy2("/etc/resolv.conf", rootfs / "etc/resolv.conf")
        ca = Path("/etc/ssl/certs/ca-certificates.crt")
        pip_env = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}
        if ca.exists():
            shutil.copy2(ca, rootfs / "tmp/etb-ca.crt")
            pip_env["PIP_CERT"] = "/tmp/etb-ca.crt"
        shutil.copy2(REQ_FILE, rootfs / "tmp/etb-req.txt")
        staged = _stage_wheels(wheel_dirs(wheels_dir), rootfs / "tmp/etb-wheels")
        t = time.monotonic()
        say("image: apt-get install python3 python3-venv")
        _chroot(rootfs, ["apt-get", "update", "-qq"], what="apt-get update in the chroot")
        _chroot(rootfs, ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "python3", "python3-venv"],
                what="apt-get install python3 python3-venv in the chroot")
        say(f"image:   in {time.monotonic() - t:.0f} s")
        t = time.monotonic()
        say(f"image: pip install -r dml_req.txt into {VENV} (local wheels: {', '.join(staged) or 'none'})")
        _chroot(rootfs, ["python3", "-m", "venv", VENV], what="python3 -m venv")
        _chroot(rootfs, [f"{VENV}/bin/pip", "install", "-q", "--find-links", "/tmp/etb-wheels",
                         "-r", "/tmp/etb-req.txt"], env=pip_env, what="pip install -r dml_req.txt in the chroot")
        _chroot(rootfs, [f"{VENV}/bin/python", "-c", "import torch, flask, waitress, safetensors, requests"],
                what="importing the node requirements in the image")
        say(f"image:   in {time.monotonic() - t:.0f} s")
        _chroot(rootfs, ["apt-get", "clean"], what="apt-get clean")
        for junk in ("tmp/etb-ca.crt", "tmp/etb-req.txt", "tmp/etb-wheels"):
            p = rootfs / junk
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        for p in (rootfs / "var/lib/apt/lists").glob("*"):
            if p.is_file():
                p.unlink()
        (rootfs / "etc/resolv.conf").write_text("")     # Docker provides its own
        (rootfs / NODE_APP_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        say(f"image: tar | docker import -> {tag}")
        _import(c, rootfs, tag, labels)
        say(f"image:   in {time.monotonic() - t:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _import(c, rootfs: Path, tag: str, labels: dict) -> None:
    """Stream `tar -C rootfs -c .` into the daemon's import endpoint (no temp file)."""
    import json

    repo, _, version = tag.rpartition(":") if ":" in tag.split("/")[-1] else (tag, "", "latest")
    changes = [f"ENV PATH={VENV}/bin:{CHROOT_PATH}", "ENV PYTHONUNBUFFERED=1", "ENV LANG=C.UTF-8",
               f"WORKDIR {NODE_APP_DIR}", 'CMD ["python3"]',
               "LABEL " + " ".join(f"{k}={json.dumps(v)}" for k, v in labels.items())]
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = c.api.import_image_from_stream(tar.stdout, repository=repo, tag=version, changes=changes)
    finally:
        tar.stdout.close()
        err = tar.stderr.read().decode(errors="replace")
        tar.stderr.close()
        rc = tar.wait()
    if rc != 0:
        raise ImageError(f"tar of the root file system failed: {err.strip()}")
    for line in str(out).splitlines():
        with contextlib.suppress(ValueError):
            msg = json.loads(line)
            if isinstance(msg, dict) and msg.get("error"):
                raise ImageError(f"docker import failed: {msg['error']}")


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build (or show) the node image for docker emulated nodes.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the image unless it is already there")
    b.add_argument("--tag", default=DEFAULT_TAG, help="image tag (default %(default)s)")
    b.add_argument("--method", default="auto", choices=("auto", "dockerfile", "offline"),
                   help="dml_app/Dockerfile, the offline debootstrap builder, or auto (default)")
    b.add_argument("--force", action="store_true", help="rebuild even if the image is there")
    b.add_argument("--wheels", default=None, help="local wheels to prefer (default: PIP_FIND_LINKS dirs, /opt/wheels)")
    b.add_argument("--mirror", default=None, help="Debian mirror for debootstrap (default its own)")
    s = sub.add_parser("show", help="say whether the image is there")
    s.add_argument("--tag", default=DEFAULT_TAG)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "show":
            why = present(a.tag)
            print(why or f"{a.tag}: present")
            return 1 if why else 0
        res = build(a.tag, method=a.method, force=a.force, wheels_dir=a.wheels, mirror=a.mirror,
                    say=lambda m: print(m, flush=True))
    except ImageError as e:
        print(f"image.py: {e}", file=sys.stderr)
        return 1
    what = "reused" if res["reused"] else f"built ({res['method']})"
    print(f"{res['image']} {res['id']}: {what} in {res['seconds']} s, {res['size_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
