"""What the controller and the nodes take from peers that need not be trusted: answers
bounded in size and in time, files read only inside the project, text shown on the
console without terminal escapes, finished runs closed, gossip senders checked."""
from __future__ import annotations

import errno
import os
import shutil
import socket
import threading
import tracemalloc

import pytest

from tests.support.procs import wait_until
from controller import files, ra_run, results
from controller.manager import Manager
from controller.ra_run import RaManager
from dml_app import net
from tests.unit.test_controller import make_testbed


# ----------------------------------------------------------------------------- bounded answers

class BadPeer:
    """An HTTP peer on loopback that never finishes an answer. Modes:
    head: a status line, then a header one byte every 0.2 s, forever;
    body: full headers (Content-Length 1 MB), then the body one byte every 0.2 s;
    endless: headers without a length, then 16 KiB chunks as fast as they go, forever."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.sent = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                if self.mode == "head":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                elif self.mode == "body":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                block = b"x" * (16 << 10)
                while not self.stop.is_set():
                    if self.mode == "endless":
                        conn.sendall(block)
                        self.sent += len(block)
                    else:
                        conn.sendall(b"a")
                        self.sent += 1
                        self.stop.wait(0.2)
            except OSError:
                return      # the caller gave up: what we want

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def bad_peer():
    made = []

    def make(mode):
        made.append(BadPeer(mode))
        return made[-1]
    yield make
    for p in made:
        p.close()


def ends(fn, *, within_s: float = 90.0):
    """fn() run in a thread: (its result, its exception); fails if it is still running
    after within_s (a generous bound: the verdict is that it ended)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:   # noqa: BLE001
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(within_s)
    assert not t.is_alive(), f"the call is still running after {within_s} s"
    return out.get("value"), out.get("error")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["head", "body"])
def test_a_trickling_peer_cannot_hold_a_call_past_its_deadline(bad_peer, mode):
    peer = bad_peer(mode)
    _, err = ends(lambda: net.call("GET", f"127.0.0.1:{peer.port}/stats", timeout_s=1.5, retries=2))
    assert isinstance(err, net.HttpError), err
    assert err.status is None and err.sent, str(err)
    assert "no answer within 1.5 s" in err.message and "deadline" in err.message, err.message
    assert peer.sent >= 1      # it did trickle: a per-read timeout alone would never have fired


@pytest.mark.timeout(120)
def test_an_endless_answer_is_cut_at_the_cap_with_bounded_memory(bad_peer):
    peer = bad_peer("endless")
    cap = 2 * net.MiB
    tracemalloc.start()
    try:
        _, err = ends(lambda: net.call("GET", f"127.0.0.1:{peer.port}/log", timeout_s=60, max_bytes=cap))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(err, net.HttpError), err
    assert "over the limit of 2 MiB" in err.message, err.message
    assert peak < 4 * cap, f"{peak} bytes held for an answer capped at {cap}"


@pytest.mark.timeout(180)
def test_an_answer_without_a_cap_gets_the_default_cap(bad_peer):
    peer = bad_peer("endless")
    _, err = ends(lambda: net.call("GET", f"127.0.0.1:{peer.port}/x", timeout_s=120))
    assert isinstance(err, net.HttpError), err
    assert f"over the limit of {net.human_bytes(net.ANSWER_LIMIT)}" in err.message, err.message


@pytest.fixture
def ra_manager(tmp_path):
    tb = make_testbed(tmp_path, {}, names=("n1",))
    m = RaManager(tb)
    yield m
    m.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["head", "body"])
def test_the_ring_driver_loses_a_trickling_member_at_its_deadline(ra_manager, bad_peer, mode):
    peer = bad_peer(mode)
    node = ra_manager._nodes()["n1"]
    node.ip, node.port = "127.0.0.1", peer.port
    missing: dict[str, str] = {}
    got, err = ends(lambda: ra_manager.algo._post(["n1"], "/ra/train", lambda n: {"round": 0}, 1.0, missing, 0))
    assert err is None and got == {} and missing == {"n1": ra_run.TIMEOUT}, (got, err, missing)


@pytest.mark.timeout(120)
def test_the_ring_driver_takes_no_endless_answer(ra_manager, bad_peer):
    peer = bad_peer("endless")
    node = ra_manager._nodes()["n1"]
    node.ip, node.port = "127.0.0.1", peer.port
    _, err = ends(lambda: ra_manager.algo._post(["n1"], "/ra/train", lambda n: {"round": 0}, 60.0, {}, 0))
    assert isinstance(err, RuntimeError) and "over the limit of 1 MiB" in str(err), err


# ----------------------------------------------------------------------------- files read on a request's behalf

@pytest.fixture(params=["openat2", "fallback"])
def opener(request, monkeypatch):
    """read_project_file through openat2, or through its stand-in (a kernel without it)."""
    if request.param == "fallback":
        def no_openat2(*a, **kw):
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        monkeypatch.setattr(files, "_openat2", no_openat2)
    else:
        probe = os.open("/", os.O_PATH | os.O_DIRECTORY)
        try:
            os.close(files._openat2(probe, "etc", os.O_PATH, files.RESOLVE_BENEATH))
        except OSError as e:
            pytest.skip(f"no openat2 on this kernel ({e})")
        finally:
            os.close(probe)
    return request.param


def project(tmp_path):
    root = tmp_path / "project"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "links.json").write_text("{}")
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "links.json").write_text('{"secret": 1}')
    return root, outside


def test_files_inside_the_folder_are_read(tmp_path, opener):
    root, _ = project(tmp_path)
    (root / "alias.json").symlink_to("sub/links.json")        # a symlink that stays inside
    assert files.read_project_file("sub/links.json", [root], 100) == b"{}"
    assert files.read_project_file(str(root / "alias.json"), [root], 100) == b"{}"


class BlockedWriter:
    """A FIFO with a writer blocked in open() until some reader opens it: whether it got
    through says whether anyone opened the FIFO."""

    def __init__(self, path):
        os.mkfifo(path)
        self.path, self.opened = path, threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self):
        fd = os.open(self.path, os.O_WRONLY)
        self.opened.set()
        os.close(fd)

    def release(self):
        if not self.opened.is_set():
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self.thread.join(10)
            os.close(fd)


@pytest.mark.parametrize("swap", ["absolute", "dotdot"])
def test_a_folder_swapped_for_a_symlink_after_the_check_is_refused_unopened(tmp_path, opener, monkeypatch, swap):
    """The path is checked (realpath: inside), then a folder on the way becomes a symlink
    leading out before the open: the outside file (a FIFO with a writer waiting for a
    reader) is refused without ever being opened."""
    root, outside = project(tmp_path)
    (outside / "sub" / "links.json").unlink()
    writer = BlockedWriter(outside / "sub" / "links.json")
    rule = f"x must be a regular file inside {os.path.realpath(root)}, at most 100 bytes"
    real_realpath = os.path.realpath

    def check_then_swap(p, *a, **kw):
        out = real_realpath(p, *a, **kw)
        if str(p).endswith("links.json") and not (root / "sub").is_symlink():
            shutil.rmtree(root / "sub")
            (root / "sub").symlink_to(outside / "sub" if swap == "absolute" else "../outside/sub")
        return out
    monkeypatch.setattr(files.os.path, "realpath", check_then_swap)
    try:
        _, err = ends(lambda: files.read_project_file("sub/links.json", [root], 100, what="x"), within_s=30)
        assert isinstance(err, files.FileRefused) and str(err) == rule, err
        assert not writer.opened.wait(0.5), "the outside FIFO was opened before the check"
    finally:
        writer.release()


def test_symlinks_dotdot_and_fifos_are_refused(tmp_path, opener):
    root, outside = project(tmp_path)
    rule = f"x must be a regular file inside {os.path.realpath(root)}, at most 100 bytes"
    (root / "out.json").symlink_to(outside / "sub" / "links.json")
    (root / "rel.json").symlink_to("../outside/sub/links.json")
    for p in ("out.json", "rel.json", "../outside/sub/links.json", "sub/../../outside/sub/links.json",
              str(outside / "sub" / "links.json")):
        with pytest.raises(files.FileRefused) as ei:
            files.read_project_file(p, [root], 100, what="x")
        assert str(ei.value) == rule, p
    os.mkfifo(root / "fifo.json")
    _, err = ends(lambda: files.read_project_file("fifo.json", [root], 100, what="x"), within_s=30)
    assert isinstance(err, files.FileRefused), err
    assert "not a regular file" in str(err) and rule in str(err)


# ----------------------------------------------------------------------------- a real controller

@pytest.fixture
def controller(tmp_path, monkeypatch):
    """A controller (nodes c1..c3 defined, none deployed: their ports refuse) serving on
    loopback, without screenshots; its runs go to tmp_path/runs."""
    monkeypatch.delenv("SUDO_UID", raising=False)
    tb = make_testbed(tmp_path, {})
    m = Manager(tb)
    m.runs_dir = tmp_path / "runs"
    m.screenshot_s = 0
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))          # bound, never listening: connections are refused
    for n in tb.all_nodes().values():
        n.ip, n.port = "127.0.0.1", closed.getsockname()[1]
    m.serve()
    try:
        yield m
    finally:
        m.close()
        closed.close()


def node_call(m, node: str, method: str, path: str, **kw):
    return net.call(method, f"http://127.0.0.1:{m.server.port}{path}", token=m.tb.node_token(node),
                    timeout_s=30, **kw)


def test_print_shows_terminal_escapes_escaped(controller, capfd):
    evil = "\x1b[2J\x1b]0;pwned\x07 \x9b31m hi\x7f \u202eevil"
    node_call(controller, "c1", "POST", "/print", data=evil.encode())
    node_call(controller, "c2", "GET", "/print", params={"msg": evil})
    net.call("GET", f"http://127.0.0.1:{controller.server.port}/print",      # the admin, naming a node
             token=controller.tb.token, params={"msg": "x", "name": "n\x1b[31m"})
    out = capfd.readouterr().out
    for raw in ("\x1b", "\x07", "\x9b", "\x7f", "\u202e"):
        assert raw not in out, repr(out)
    line = r"\x1b[2J\x1b]0;pwned\x07 \x9b31m hi\x7f \u202eevil"
    assert f"[c1] {line}\n" in out and f"[c2] {line}\n" in out, out
    assert r"[n\x1b[31m] x" in out, out


def test_printable_keeps_ordinary_text():
    assert results.printable("round 3: accuracy 0.91, ü 中 ✓") == "round 3: accuracy 0.91, ü 中 ✓"
    assert results.printable("a\nb\tc\rd", newlines=True) == r"a" + "\n" + r"b\x09c\x0dd"
    assert "\x1b" not in results.table({"accuracy_per_round": [], "bytes_sent": {"n\x1b]0;x\x07": 1},
                                        "final_accuracy": None, "algorithm": "gl", "wall_seconds": 1.0})


def test_a_finished_run_takes_each_nodes_final_log_once_and_nothing_more(controller, tmp_path):
    m = controller
    node_call(m, "c1", "POST", "/log", params={"name": "c1"}, data=b"during the run")
    run_dir = m.run_dir
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    (run_dir / "c2.log").symlink_to(outside)            # finish replaces it, never writes through it
    summary = net.call("GET", f"http://127.0.0.1:{m.server.port}/finish", token=m.tb.token, timeout_s=120).json()
    assert summary["run_dir"] == str(run_dir) and set(summary["logs_missing"]) == {"c1", "c2", "c3"}
    assert outside.read_text() == "untouched"
    assert (run_dir / "c1.log").read_bytes() == b"during the run"
    # EdgeTB apps send their whole log after /finish: once per node, into the same folder
    node_call(m, "c1", "POST", "/log", params={"name": "c1"}, data=b"the whole log, finish line too")
    assert (run_dir / "c1.log").read_bytes() == b"the whole log, finish line too"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if not p.is_symlink()}
    # and never again: a second final log, or one in another node's name, is refused
    with pytest.raises(net.HttpError) as ei:
        node_call(m, "c1", "POST", "/log", params={"name": "c1"}, data=b"forged after the run")
    assert ei.value.status == 409 and "the run is finished" in ei.value.message, ei.value
    with pytest.raises(net.HttpError) as ei:
        node_call(m, "c1", "POST", "/log", params={"name": "c3"}, data=b"forged for another")
    assert ei.value.status == 403, ei.value
    # a late finish (the admin again; a node that is not the root) writes nothing either
    assert net.call("GET", f"http://127.0.0.1:{m.server.port}/finish", token=m.tb.token,
                    timeout_s=120).json() == summary
    with pytest.raises(net.HttpError) as ei:
        node_call(m, "c1", "GET", "/finish")
    assert ei.value.status == 403
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if not p.is_symlink()} == before
    assert not (run_dir / "c3.log").exists() and [p.name for p in m.runs_dir.iterdir()] == [run_dir.name]


def test_a_log_sent_while_finish_collects_is_refused(controller):
    m = controller
    with m._log_lock:
        m._closing = True        # what finish() holds while it collects the run's folder
    try:
        with pytest.raises(net.HttpError) as ei:
            node_call(m, "c1", "POST", "/log", params={"name": "c1"}, data=b"mid-collection")
        assert ei.value.status == 409 and "finishing" in ei.value.message, ei.value
    finally:
        with m._log_lock:
            m._closing = False


def test_write_run_file_replaces_a_planted_link_and_leaves_no_part_file(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "n1.log").symlink_to(target)
    os.link(target, run / "n2.log")
    results.write_run_file(run, "n1.log", "one")
    results.write_run_file(run, "n2.log", b"two")
    assert target.read_text() == "keep"
    assert (run / "n1.log").read_text() == "one" and not (run / "n1.log").is_symlink()
    assert (run / "n2.log").read_text() == "two" and sorted(p.name for p in run.iterdir()) == ["n1.log", "n2.log"]
    with pytest.raises(ValueError):
        results.write_run_file(run, "../x", "no")


# ----------------------------------------------------------------------------- gossip senders

@pytest.fixture
def gl_node(scratch):
    """One gl_peer in-process (no server): (runtime, GlPeer, Flask test client); its conf
    says n2 sends from 10.9.0.2 ("senders", the controller's) and n3 is at 10.9.0.3."""
    import torch
    from dml_app.gl_peer import GlPeer
    from tests.support.peers import tiny_dataset
    from dml_app.runtime import Runtime
    from tests.support.procs import TOKEN

    threads = torch.get_num_threads()
    tiny_dataset(scratch / "ds", num_classes=10)
    rt = Runtime("gl_peer", env={"NET_NODE_NAME": "n1", "EDGE_TB_TOKEN": TOKEN, "DML_PORT": "0",
                                 "DML_LOG_DIR": str(scratch / "log"), "DML_DATASET_DIR": str(scratch / "ds")})
    peer = GlPeer(rt)
    client = rt.app.test_client()
    hdr = {net.TOKEN_HEADER: TOKEN}
    conf = {"epoch": 1, "sync": 1, "connect": {"n3": "10.9.0.3:4000"}, "senders": {"n2": "10.9.0.2:4000"}}
    try:
        assert client.post("/conf/structure", json=conf, headers=hdr).status_code == 200
        assert client.post("/conf/dataset", json={"train_len": 1, "test_len": 1}, headers=hdr).status_code == 200
        yield rt, peer, client, hdr
    finally:
        rt.close()
        torch.set_num_threads(threads)


def test_a_gossip_under_another_peers_name_is_403(gl_node):
    import torch
    from dml_app import nns
    rt, peer, client, hdr = gl_node
    weights = nns.build_model(rt.data.meta).state_dict()

    def gossip(name, remote):
        body = net.pack_weights({k: v.clone() for k, v in weights.items()}, {"name": name, "round": 1})
        return client.post("/gossip", data=body, environ_base={"REMOTE_ADDR": remote},
                           headers={**hdr, "Content-Type": "application/octet-stream"})
    for name, remote, words in (("n2", "10.9.0.3", "says it is from n2 came from 10.9.0.3, but n2 is at 10.9.0.2"),
                                ("n3", "10.9.0.2", "says it is from n3 came from 10.9.0.2, but n3 is at 10.9.0.3"),
                                ("n9", "10.9.0.9", "'n9', a node it does not know")):
        r = gossip(name, remote)
        assert r.status_code == 403 and words in r.get_data(as_text=True), (name, r.status_code, r.data)
    assert peer._inbox == []
    assert gossip("n2", "10.9.0.2").status_code == 200          # from the node it names: taken
    assert gossip("n3", "::ffff:10.9.0.3").status_code == 200   # the same address, IPv4-mapped
    assert [s for _, s, _ in peer._inbox] == ["n2", "n3"]
    assert torch.equal(peer._inbox[0][0][next(iter(weights))], weights[next(iter(weights))])


def test_a_ring_chunk_from_another_address_than_the_predecessors_is_403(scratch):
    """ra_peer: the chunk names the predecessor, but comes from elsewhere."""
    import torch
    from tests.support.peers import ra_node
    from tests.support.procs import TOKEN
    hdr = {net.TOKEN_HEADER: TOKEN}
    conf = {"epoch": 0, "sync": 1, "next_name": "ry3", "connect": {"ry3": "10.9.0.3:9", "ry1": "10.9.0.1:9"}}
    with ra_node(scratch, "ry2") as (rt, peer, client):
        assert client.post("/conf/structure", json=conf, headers=hdr).status_code == 200
        assert client.post("/conf/dataset", json={"train_len": 1, "test_len": 1}, headers=hdr).status_code == 200
        assert client.get("/start", headers=hdr).status_code == 200
        wait_until(lambda: rt.state == "ready", 20, "ready")
        assert client.post("/ra/train", json={"round": 1, "ring": ["ry1", "ry2", "ry3"]}, headers=hdr).status_code == 200
        wait_until(lambda: rt.state == "trained", 20, "trained")
        n = peer.ar.bounds[0][1] - peer.ar.bounds[0][0]
        before = peer.ar.vector.clone()
        body = net.pack_weights({"chunk": torch.ones(n)}, {"round": 1, "phase": "reduce", "step": 0,
                                                            "index": 0, "name": "ry1"})

        def send(remote):
            return client.post("/ra/chunk", data=body, environ_base={"REMOTE_ADDR": remote},
                               headers={**hdr, "Content-Type": "application/octet-stream"})
        r = send("10.9.0.3")
        assert r.status_code == 403 and "came from 10.9.0.3, but ry1 is at 10.9.0.1" in r.get_data(as_text=True)
        assert torch.equal(peer.ar.vector, before)
        assert send("10.9.0.1").status_code == 200
