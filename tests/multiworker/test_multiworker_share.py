"""Sharing dml_app/ and dataset/ with workers that are not the controller's machine.

HTTP (controller/share.py, worker/shares.py) end to end with a real agent in a host
namespace: a changed file reaches the nodes at the next deployment, an unchanged archive
is not downloaded again, a corrupted one is refused and nothing is deployed. NFS: the
commands and volume options as data; mounting needs a kernel with NFS.
"""
import hashlib
import os
import io
import tarfile
import time
from pathlib import Path

import pytest


from tests.support import agents as ah
from tests.support import multihost
from controller import share
from controller.deploy import node_body
from controller.manager import Manager
from controller.testbed import DeployError, Testbed
from worker import shares


class ShareManager(Manager):
    algorithm = "share"


# ----------------------------------------------------------------------------- pure

def test_archive_is_content_addressed(tmp_path):
    d = tmp_path / "app"
    (d / "sub").mkdir(parents=True)
    (d / "a.py").write_text("print(1)\n")
    (d / "sub" / "b.txt").write_text("b")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    first = share.build_archive(d)
    time.sleep(0.01)
    (d / "a.py").touch()                              # a new mtime is not a new content
    (d / "__pycache__" / "x.pyc").write_bytes(b"more junk")
    assert share.build_archive(d) == first
    names = tarfile.open(fileobj=io.BytesIO(first)).getnames()
    assert names == ["a.py", "sub", "sub/b.txt"], names
    (d / "sub" / "b.txt").write_text("B")
    assert share.sha256(share.build_archive(d)) != share.sha256(first)


@pytest.mark.root
def test_fetch_verifies_caches_and_refuses_a_mismatch(tmp_path):
    d = tmp_path / "app"
    d.mkdir()
    (d / "m.txt").write_text("v1")
    store = share.Store()
    digest = store.add(d)
    calls = []

    def get(url):
        calls.append(url)
        return store.get(url.rsplit("/", 1)[1])
    cache = tmp_path / "cache"
    out, got = shares.fetch(f"x/share/{digest}", digest, cache, token="t", get=get)
    assert got and (out / "m.txt").read_text() == "v1" and out.name == digest
    out2, got2 = shares.fetch(f"x/share/{digest}", digest, cache, token="t", get=get)
    assert out2 == out and not got2 and len(calls) == 1 and store.served[digest] == 1
    bad = "0" * 64
    with pytest.raises(shares.ShareError) as ei:
        shares.fetch(f"x/share/{bad}", bad, cache, token="t", get=lambda u: b"not it")
    assert f"expected {bad}" in str(ei.value) and hashlib.sha256(b"not it").hexdigest() in str(ei.value)
    assert "sha256 mismatch" in str(ei.value) and not (cache / bad).exists()
    with pytest.raises(shares.ShareError):
        shares.fetch("x", "../../etc", cache, token="t", get=get)
    assert store.get("../etc") is None


def test_nfs_commands_and_volume_options():
    assert share.export_argv("/srv/edgetb/dml_app", "10.246.0.0/16") == [
        "exportfs", "-o", "ro,sync,no_subtree_check,root_squash", "10.246.0.0/16:/srv/edgetb/dml_app"]
    assert share.unexport_argv("/srv/x") == ["exportfs", "-u", "*:/srv/x"]
    assert share.mount_argv("10.246.0.1", "/srv/edgetb/dataset", "/mnt/ds", ro=True) == [
        "mount", "-t", "nfs", "-o", "vers=4,ro,hard,nolock", "10.246.0.1:/srv/edgetb/dataset", "/mnt/ds"]
    assert share.umount_argv("/mnt/ds") == ["umount", "-l", "/mnt/ds"]
    assert share.docker_nfs_volume("10.246.0.1", "/srv/edgetb/dml_app") == {
        "driver": "local",
        "driver_opts": {"type": "nfs", "o": "addr=10.246.0.1,nfsvers=4,ro", "device": ":/srv/edgetb/dml_app"}}


def test_nfs_detection_says_why(monkeypatch):
    have_all = "nodev\tnfs\nnodev\tnfs4\nnodev\tnfsd\n"
    assert share.nfs_unavailable(have_all, which=lambda t: "/usr/sbin/" + t) is None
    why = share.nfs_unavailable("nodev\tproc\n\text4\n", which=lambda t: None)
    assert "no nfsd in /proc/filesystems" in why and "no mount.nfs" in why and "no exportfs" in why
    how, line = share.mode("http")
    assert how == "http" and "HTTP" in line
    # the fallback and its refusal, whatever this machine has
    monkeypatch.setattr(share, "nfs_unavailable", lambda: "no nfsd in /proc/filesystems")
    assert share.mode() == ("http", "share: dml_app/dataset over HTTP from the controller "
                                    "(NFS not available: no nfsd in /proc/filesystems)")
    with pytest.raises(share.ShareError, match="NFS asked for but not available: no nfsd"):
        share.mode("nfs")
    monkeypatch.setattr(share, "nfs_unavailable", lambda: None)
    assert share.mode()[0] == share.mode("nfs")[0] == "nfs"
    assert share.mode("http")[0] == "http"


def _share_testbed(tmp_path, h, host, agent, app, names) -> Testbed:
    """A testbed on the harness `h`: an emulator on `host` (its `agent`), one node per
    name printing app/marker.txt (dml_app/ shared from `app`) and sleeping."""
    tb = Testbed(multihost.CONTROLLER_IP, str(tmp_path), ShareManager, host_port=h.controller_port,
                 token=h.token)
    tb.node_info_path = tmp_path / "node_info.json"
    nfs = tb.add_nfs("dml_app", str(app))
    emu = tb.add_emulator(f"{h.tag}e", host.ip, cpu=1, ram=1, agent_port=agent.port, subnet=host.subnet)
    for name in names:
        node = tb.add_emulated_node(name, "/home/worker/dml_app", ["sh", "-c", "cat marker.txt; exec sleep 300"],
                                    cpu=0.2, ram=128, unit="M", emulator=emu)
        node.mount_nfs(nfs, "/home/worker/dml_app")
    return tb


@ah.need("nfs", share.nfs_unavailable() and f"this kernel/machine has no NFS: {share.nfs_unavailable()}")
@multihost.need()
def test_nfs_share_reaches_the_nodes_for_real(tmp_path):   # pragma: no cover - needs kernel NFS
    """NFS as a user gets it: the controller exports dml_app/ to a worker, whose agent
    mounts it for its nodes; the node reads the file; reset unmounts it."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "marker.txt").write_text("nfs-v1\n")
    with multihost.Harness() as h:
        a = h.add_host()
        agent = a.start_agent()
        h.route(a.subnet, a)
        name = f"{h.tag}n1"
        tb = _share_testbed(tmp_path, h, a, agent, app, [name])
        tb.share_mode = "nfs"
        tb.wait_for_apps = False      # this app prints and sleeps: nothing answers on a DML port
        said = []
        manager = tb.start(serve_forever=False, say=said.append)
        source = f"{multihost.CONTROLLER_IP}:{app}"
        try:
            assert [m for m in said if m.startswith("share:")] == [share.mode("nfs")[1]], said
            _stdout(agent, name, "nfs-v1")
            assert source in Path("/proc/mounts").read_text(), "the agent mounted no NFS share"
        finally:
            tb.close()
            manager.close()
        assert source not in Path("/proc/mounts").read_text(), "the NFS share is still mounted"
        left = h.leftovers([name])
        assert not any(left.values()), left


def test_local_workers_still_bind_the_folder(tmp_path):
    """The embedded agent (or any on loopback) gets the controller's own path: no copy."""
    (tmp_path / "app").mkdir()
    tb = Testbed("127.0.0.1", str(tmp_path), None, host_port=3389)
    app = tb.add_nfs("dml_app", str(tmp_path / "app"))
    emu = tb.add_emulator("e1", "127.0.0.1", cpu=1, ram=1)
    n = tb.add_emulated_node("n1", "/home/worker/dml_app", ["true"], emulator=emu)
    n.mount_nfs(app, "/home/worker/dml_app")
    said = []
    assert tb.deployer.remote_shares(said.append, host_port=tb.host_port, serving=False) is None and said == []
    body = node_body(n, "c", "a", None)
    assert body["volumes"] == [{"host": str(tmp_path / "app"), "node": "/home/worker/dml_app", "ro": True}]


# ----------------------------------------------------------------------------- end to end

def _stdout(agent, name, want, timeout_s=15):
    path = Path(f"/run/edgetb/agent-{agent.port}/nodes/{name}/stdout.log")
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if want in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{name} printed {text!r}, not {want!r}\n{agent.log()}")


@multihost.need()
def test_http_share_reaches_nodes_caches_and_refuses_corruption(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "marker.txt").write_text("v1\n")
    with multihost.Harness() as h:
        a = h.add_host()
        agent = a.start_agent()
        h.route(a.subnet, a)
        names = [f"{h.tag}n1", f"{h.tag}n2"]
        tb = _share_testbed(tmp_path, h, a, agent, app, names)
        # over HTTP: by itself where NFS is missing (saying why), asked for where it is not
        why = share.nfs_unavailable()
        if why is None:
            tb.share_mode = "http"
        expected_line = ("share: dml_app/dataset over HTTP from the controller "
                         + ("(asked for)" if why is None else f"(NFS not available: {why})"))
        tb.wait_for_apps = False      # these apps print and sleep: nothing answers on a DML port
        said = []
        manager = tb.start(serve_forever=False, say=said.append)
        try:
            lines = [m for m in said if m.startswith("share:")]
            assert lines == [expected_line], said
            (d1,) = tb.share_store.served
            assert tb.share_store.served == {d1: 1}       # two nodes, one download
            for name in names:
                _stdout(agent, name, "v1")

            tb.reset(say=lambda m: None)                   # unchanged: not downloaded again
            tb.deploy(say=lambda m: None)
            assert tb.share_store.served == {d1: 1}
            _stdout(agent, names[0], "v1")

            tb.reset(say=lambda m: None)                   # changed: reaches the nodes
            (app / "marker.txt").write_text("v2\n")
            tb.deploy(say=lambda m: None)
            d2 = next(d for d in tb.share_store.served if d != d1)
            assert tb.share_store.served == {d1: 1, d2: 1}
            for name in names:
                _stdout(agent, name, "v2")

            tb.reset(say=lambda m: None)                   # corrupted on the way: refused
            (app / "marker.txt").write_text("v3\n")
            add = tb.share_store.add

            def corrupting_add(folder):
                digest = add(folder)
                tb.share_store.archives[digest] = tb.share_store.archives[digest][:-512] + b"x" * 512
                return digest
            tb.share_store.add = corrupting_add
            with pytest.raises(DeployError) as ei:
                tb.deploy(say=lambda m: None)
            msg = str(ei.value)
            assert f"emulator {h.tag}e ({a.ip}:{agent.port})" in msg and "sha256 mismatch" in msg, msg
            assert "nothing deployed" in msg, msg
            assert agent.get("/status")["nodes"] == {}
            cache = shares.cache_dir(agent.port)
            assert sorted(p.name for p in cache.iterdir()) == sorted([d1, d2])   # nothing kept of it
        finally:
            tb.close()
            manager.close()
        left = h.leftovers(names)
        assert not any(left.values()), left


def test_nfs_mode_sends_nfs_volumes_and_exports_to_the_workers(tmp_path, monkeypatch):
    """Where NFS works the controller exports each folder to the workers that use it and
    their nodes get {"nfs": {server, path}} volumes (checked as data here)."""
    (tmp_path / "app").mkdir()
    tb = Testbed("10.246.0.1", str(tmp_path), None, host_port=3389)
    app = tb.add_nfs("dml_app", str(tmp_path / "app"))
    emu = tb.add_emulator("e1", "10.246.0.11", cpu=1, ram=1, agent_port=3381)
    n = tb.add_emulated_node("n1", "/home/worker/dml_app", ["true"], emulator=emu)
    n.mount_nfs(app, "/home/worker/dml_app")
    monkeypatch.setattr(share, "mode", lambda force=None: ("nfs", "share: over NFS"))
    exported = []
    monkeypatch.setattr(tb.exports, "export", lambda path, client: exported.append((path, client)))
    said = []
    remote = tb.deployer.remote_shares(said.append, host_port=tb.host_port, serving=False)
    assert said == ["share: over NFS"] and exported == [(str(tmp_path / "app"), "10.246.0.11")]
    body = node_body(n, "c", "a", remote)
    assert body["volumes"] == [{"nfs": {"server": "10.246.0.1", "path": str(tmp_path / "app"), "tag": "dml_app"},
                                "node": "/home/worker/dml_app", "ro": True}]


@pytest.mark.root
def test_agent_mounts_nfs_shares_once_and_says_why_it_cannot(tmp_path, monkeypatch):
    from worker import agent as agent_mod

    agent = agent_mod.Agent(name="t", port=1, token="x", state_dir=tmp_path / "state")
    calls = []

    class Done:
        returncode, stdout, stderr = 0, "", ""
    monkeypatch.setattr(agent_mod.subprocess, "run", lambda argv, **kw: calls.append(argv) or Done())
    mounted = set()
    monkeypatch.setattr(agent_mod.os.path, "ismount", lambda p: str(p) in mounted)
    target = agent._nfs_mount({"server": "10.246.0.1", "path": "/srv/app"}, "n1")
    assert calls == [share.mount_argv("10.246.0.1", "/srv/app", target)]
    mounted.add(target)
    assert agent._nfs_mount({"server": "10.246.0.1", "path": "/srv/app"}, "n2") == target and len(calls) == 1
    agent.reset("all")
    assert calls[-1] == share.umount_argv(target) and agent.nfs_mounts == []
    with pytest.raises(agent_mod.BadRequest, match="bad nfs share"):
        agent._nfs_mount({"server": "not-an-ip", "path": "/srv/app"}, "n1")


@ah.need("root", "needs root (mount)" if os.geteuid() != 0 else None)
def test_agent_without_nfs_client_refuses_clearly(tmp_path):
    if share.nfs_unavailable() is None:
        ah.skip("has-it", "this machine has NFS: the refusal is for machines without it")
    from worker import agent as agent_mod

    agent = agent_mod.Agent(name="t", port=1, token="x", state_dir=tmp_path / "state")
    with pytest.raises(shares.ShareError, match=r"mounting NFS share 10\.246\.0\.1:/srv/app: .*nothing deployed"):
        agent._nfs_mount({"server": "10.246.0.1", "path": "/srv/app"}, "n1")
    agent.reset("all")
    assert not (tmp_path / "state").exists()
