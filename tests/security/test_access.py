"""Who may call the controller, an agent and a node (docs/security.md).

Real servers on loopback; requests from another local user are made by real processes
running as `nobody` (setpriv), so the controller sees a real socket owned by that uid.
"""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller import access
from controller.manager import Manager
from dml_app import net
from tests.support import agents as ah
from tests.support.procs import NodeProc
from tests.unit.test_controller import make_testbed

NOBODY = 65534
TIME_WAIT = 6            # a TCP state (include/net/tcp_states.h)

need_root = ah.need("root", "needs root: it runs requests as another user" if os.geteuid() != 0 else None)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A controller (no nodes deployed) on a free loopback port, and its run folder."""
    def make(sudo_uid: str | None = None):
        if sudo_uid is None:
            monkeypatch.delenv("SUDO_UID", raising=False)
        else:
            monkeypatch.setenv("SUDO_UID", sudo_uid)
        tb = make_testbed(tmp_path, {})
        m = Manager(tb)
        m.runs_dir = tmp_path / "runs"
        m.serve()
        made.append(m)
        return m
    made: list[Manager] = []
    try:
        yield make
    finally:
        for m in made:
            m.close()


def curl_as(uid: int, url: str, *headers: str) -> tuple[int, str]:
    """(HTTP status, body) of `curl URL` run by another user."""
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "curl", "-sS",
            "-o", "-", "-w", "\n%{http_code}", "--max-time", "20"]
    for h in headers:
        argv += ["-H", h]
    p = subprocess.run(argv + [url], capture_output=True, text=True, timeout=30)
    body, _, code = p.stdout.rpartition("\n")
    assert code.isdigit(), p.stderr
    return int(code), body


def status_code(url: str, *, token: str | None = None, headers=None, method: str = "GET") -> tuple[int, str]:
    try:
        r = net.call(method, url, token=token, headers=headers, timeout_s=10)
        return r.status_code, r.text
    except net.HttpError as e:
        return e.status, e.message


# ----------------------------------------------------------------------------- loopback trust

@need_root
def test_other_local_user_gets_401_naming_the_token_file_and_resets_nothing(served):
    m = served()
    url = f"http://127.0.0.1:{m.server.port}"
    code, body = curl_as(NOBODY, url + "/emulated/reset")
    assert code == 401
    assert str(m.access.token_file) in body and net.TOKEN_HEADER in body
    # the file is root's alone and holds the admin token
    st = os.stat(m.access.token_file)
    assert st.st_uid == 0 and st.st_mode & 0o077 == 0
    assert m.access.token_file.read_text().strip() == m.tb.token
    # nothing was reset: the nodes are still known and the run folder untouched
    assert set(net.get_json(url + "/status")["nodes"]) == {"c1", "c2", "c3"}
    code, _ = curl_as(NOBODY, url + "/log?name=c1", "Content-Type: text/plain")
    assert code == 401 and m.run_dir is None
    # with the admin token, the same user gets in
    code, _ = curl_as(NOBODY, url + "/status", f"{net.TOKEN_HEADER}: {m.tb.token}")
    assert code == 200


def test_root_on_loopback_needs_no_token(served):
    m = served()
    assert net.get_json(f"127.0.0.1:{m.server.port}/status")["nodes"]["c1"]["state"] == "not deployed"


@need_root
def test_the_sudo_user_is_trusted_like_root(served):
    m = served(sudo_uid=str(NOBODY))      # as if `sudo python3 fl_run.py` was run by nobody
    code, body = curl_as(NOBODY, f"http://localhost:{m.server.port}/status")
    assert code == 200 and '"c1"' in body


def test_token_file_goes_with_the_controller(served):
    m = served()
    path = m.access.token_file
    assert path.exists()
    m.close()
    assert not path.exists()
    if path.parent == Path("/run/edgetb"):     # nothing else of the testbed's running here
        assert not path.parent.exists() or any(path.parent.iterdir())


# ----------------------------------------------------------------------------- host and origin

@pytest.mark.parametrize("header", [
    "Host: evil.example",
    "Host: evil.example:3333",
    "Origin: http://evil.example",
    "Origin: null",
    "Sec-Fetch-Site: cross-site",
    "Sec-Fetch-Site: same-site",
])
def test_requests_not_meant_for_this_controller_get_403(served, header):
    m = served()
    name, _, value = header.partition(": ")
    for token in (None, m.tb.token):       # a credential does not make them acceptable
        code, body = status_code(f"http://127.0.0.1:{m.server.port}/emulated/reset",
                                 token=token, headers={name: value})
        assert code == 403, (header, code, body)
    assert set(net.get_json(f"127.0.0.1:{m.server.port}/status")["nodes"]) == {"c1", "c2", "c3"}


@pytest.mark.parametrize("header", ["Host: localhost", "Host: 127.0.0.1", "Host: [::1]",
                                    "Sec-Fetch-Site: same-origin", "Sec-Fetch-Site: none"])
def test_the_controllers_own_names_are_fine(served, header):
    m = served()
    name, _, value = header.partition(": ")
    assert status_code(f"http://127.0.0.1:{m.server.port}/status", headers={name: value})[0] == 200


def test_same_origin_page_is_fine(served):
    m = served()
    for origin in (f"http://localhost:{m.server.port}", f"http://127.0.0.1:{m.server.port}"):
        assert status_code(f"http://127.0.0.1:{m.server.port}/status", headers={"Origin": origin})[0] == 200
    # the same host on another port is another site
    assert status_code(f"http://127.0.0.1:{m.server.port}/status",
                       headers={"Origin": "http://localhost:1"})[0] == 403


# ----------------------------------------------------------------------------- node credentials

def test_a_node_speaks_for_itself_only(served):
    m = served()
    base = f"http://127.0.0.1:{m.server.port}"
    c2 = m.tb.node_token("c2")
    r = net.call("POST", base + "/heartbeat", token=c2, json={"node": "c2", "state": "training", "round": 1})
    assert r.status_code == 200 and m.heartbeats["c2"]["state"] == "training"
    # c2 cannot send c1's heartbeat or log
    with pytest.raises(net.HttpError) as ei:
        net.call("POST", base + "/heartbeat", token=c2, json={"node": "c1", "state": "finished", "round": 9})
    assert ei.value.status == 403 and "c2" in ei.value.message
    assert "c1" not in m.heartbeats
    with pytest.raises(net.HttpError) as ei:
        net.call("POST", base + "/log", token=c2, params={"name": "c1"}, data=b"forged")
    assert ei.value.status == 403
    net.call("POST", base + "/log", token=c2, params={"name": "c2"}, data=b"mine")
    assert (m.run_dir / "c2.log").read_text() == "mine" and not (m.run_dir / "c1.log").exists()


@pytest.mark.parametrize("path", ["/emulated/reset", "/status", "/conf/dataset", "/start?root=c1",
                                  "/update/tc?file=links.json", "/share/" + "0" * 64])
def test_a_node_credential_opens_no_admin_route(served, path):
    m = served()
    code, msg = status_code(f"http://127.0.0.1:{m.server.port}{path}", token=m.tb.node_token("c1"))
    assert code == 403 and "node credential" in msg


def test_only_the_root_node_finishes_a_run(served):
    m = served()
    m.root = "c1"
    with pytest.raises(net.HttpError) as ei:
        net.call("GET", f"127.0.0.1:{m.server.port}/finish", token=m.tb.node_token("c2"))
    assert ei.value.status == 403 and m.summary is None


@pytest.mark.parametrize("token", ["wrong", "node.c1.0000", "peer.x"])
def test_wrong_credentials_get_401_even_from_root(served, token):
    m = served()
    assert status_code(f"http://127.0.0.1:{m.server.port}/status", token=token)[0] == 401


def test_credentials_are_bound_to_the_admin_token():
    assert net.token_node("A", net.node_token("A", "n3")) == "n3"
    assert net.token_node("B", net.node_token("A", "n3")) is None
    assert net.token_node("A", net.node_token("A", "n3")[:-1] + "0") in (None,)
    assert net.token_node("A", net.peer_token("A")) is None
    assert net.node_token("A", "n3") != net.node_token("A", "n4")


# ----------------------------------------------------------------------------- agent and node

@pytest.mark.root
def test_an_agent_refuses_node_and_peer_credentials(tmp_path):
    from tests.support import agents as ah

    with ah.running_agent() as agent:
        for token in (net.node_token(agent.token, "n1"), net.peer_token(agent.token)):
            r = agent.raw("POST", "/physical/deploy", token=token,
                          json={"nodes": [{"name": "p1", "id": 1, "ip": "127.0.0.1", "port": 4444,
                                           "cmd": ["id"], "nic": "lo"}], "links": {}})
            assert r.status_code == 401
            assert agent.raw("GET", "/status", token=token).status_code == 401
        assert agent.get("/status")["nodes"] == {}


def test_a_node_takes_confs_from_the_controller_only(scratch):
    own, peer = net.node_token("A", "t1"), net.peer_token("A")
    node = NodeProc("fl_trainer", "t1", log_dir=scratch / "log", dataset_dir=scratch / "data",
                       token=own, peer_token=peer)
    try:
        node.wait_ready()
        assert status_code(node.url("/hi"), token=peer)[0] == 200      # peers reach it
        code, msg = status_code(node.url("/conf/structure"), token=peer, method="POST",
                                headers={"Content-Type": "application/json"})
        assert code == 403 and "controller" in msg
        code, msg = status_code(node.url("/conf/structure"), token=own, method="POST",
                                headers={"Content-Type": "application/json"})
        assert code == 400 and "JSON object" in msg         # let in, and read
        for bad in (None, "wrong", net.node_token("A", "t2"), net.peer_token("B")):
            assert status_code(node.url("/hi"), token=bad)[0] == 401
    finally:
        node.stop()


@ah.need("root", "needs curl (install.sh installs it)" if shutil.which("curl") is None else None)
def test_curl_from_the_terminal_still_works(served):
    m = served()
    p = subprocess.run(["curl", "-sS", f"localhost:{m.server.port}/print?msg=hello"],
                       capture_output=True, text=True, timeout=30)
    assert p.stdout == "ok\n", p.stderr


# ----------------------------------------------------------------------------- whose connection

# Run by another local user: a request from a source port whose earlier connections
# (to the controller's other loopback addresses, or to 127.0.0.1 itself) it closed, so
# the kernel holds closed sockets (TIME_WAIT, orphaned FIN_WAIT) with the same client
# address and ports, which its socket tables list with uid 0. Prints each try's status.
SPOOF = r'''
import socket, sys
port, tries, target, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
earlier = sys.argv[5:]

def bound(p):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", p))
    return s

codes = []
for _ in range(tries):
    first = bound(0)
    p = first.getsockname()[1]
    for i, ip in enumerate(earlier):
        s = first if i == 0 else bound(p)
        s.connect((ip, port))
        s.close()
    s = bound(p)
    s.connect((target, port))
    s.sendall(f"GET {path} HTTP/1.0\r\nHost: {target}:{port}\r\n\r\n".encode())
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    s.close()
    codes.append(answer.split(b" ", 2)[1].decode())
print(" ".join(codes))
'''

# (tries, the address the request goes to, the addresses it connected to and closed first)
ATTACKS = {
    # one connection to 127.0.0.1, closed, then the request from that port over 127.0.0.2;
    # either row may come first in the tables, so a few ports are tried
    "close-then-request": (12, "127.0.0.2", ["127.0.0.1"]),
    # a port bound with SO_REUSEADDR: closed connections to 127.0.0.2..39, then the request
    "reused-port": (3, "127.0.0.1", [f"127.0.0.{i}" for i in range(2, 40)]),
}


def spoof_as(uid: int, port: int, attack: str, path: str) -> list[int]:
    tries, target, earlier = ATTACKS[attack]
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            sys.executable, "-c", SPOOF, str(port), str(tries), target, path, *earlier]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return [int(c) for c in p.stdout.split()]


@need_root
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_closed_sockets_of_the_same_ports_do_not_make_another_user_root(served, capsys, attack):
    m = served()
    mark = f"spoofed-{attack}"
    codes = spoof_as(NOBODY, m.server.port, attack, f"/print?msg={mark}")
    assert codes and set(codes) == {401}, codes
    codes = spoof_as(NOBODY, m.server.port, attack, "/status")
    assert codes and set(codes) == {401}, codes
    assert mark not in capsys.readouterr().out        # the controller printed nothing
    # the same request from root's own connection is served
    assert status_code(f"http://127.0.0.1:{m.server.port}/status")[0] == 200


@need_root
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost"])
def test_root_and_the_sudo_user_are_still_trusted_on_every_loopback_address(served, host):
    m = served(sudo_uid=str(NOBODY))
    url = f"http://{host}:{m.server.port}/status"
    for uid in (0, NOBODY):
        code, body = curl_as(uid, url)
        assert code == 200 and '"c1"' in body, (uid, code, body)
    assert curl_as(12345, url)[0] == 401              # and no other user


def _loopbacks() -> list[str]:
    ips = ["127.0.0.1"]
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        ips.append("::1")
    except OSError:
        pass
    return ips


@contextlib.contextmanager
def connection(ip: str):
    """(client, accepted) sockets of a real TCP connection over `ip`; closed at the end."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with contextlib.ExitStack() as stack:
        lsn = stack.enter_context(socket.socket(family))
        lsn.bind((ip, 0))
        lsn.listen(1)
        client = stack.enter_context(socket.socket(family))
        client.connect(lsn.getsockname()[:2])
        accepted = stack.enter_context(lsn.accept()[0])
        yield client, accepted


@pytest.mark.parametrize("ip", _loopbacks())
def test_the_kernel_names_the_owner_of_that_very_connection(ip):
    with connection(ip) as (client, accepted):
        ends = client.getsockname()[:2], accepted.getsockname()[:2]
        assert access.socket_owner(*ends) == os.geteuid()
        assert access.connection_owner(accepted) == os.geteuid()
        assert access.connection_owner(accepted, peer=ip) == os.geteuid()
        # the client end is asked for, not the server's (whose ports are the other way)
        assert access.socket_owner(ends[1], ends[0]) == os.geteuid()
        # anything else about the 4-tuple, and there is no such socket
        other = "127.0.0.2" if ip == "127.0.0.1" else "::2"
        assert access.socket_owner((other, ends[0][1]), ends[1]) is None
        assert access.socket_owner(ends[0], (ends[1][0], ends[1][1] ^ 1)) is None
        assert access.connection_owner(accepted, peer=other) is None
        # malformed or mixed ends
        assert access.socket_owner(("not an ip", 1), ends[1]) is None
        assert access.socket_owner((ends[0][0], 0), ends[1]) is None
        assert access.socket_owner(("::1" if ip == "127.0.0.1" else "127.0.0.1", ends[0][1]), ends[1]) is None
        # it runs on every tokenless loopback request: its cost shown, speed is the benches' matter
        t0 = time.monotonic()
        for _ in range(200):
            access.connection_owner(accepted)
        print(f"\nconnection_owner: {(time.monotonic() - t0) / 200 * 1e3:.2f} ms a call")
    assert access.connection_owner(accepted) is None          # a closed socket


@pytest.mark.parametrize("ip", _loopbacks())
def test_a_closed_connection_has_no_owner(ip):
    with connection(ip) as (client, accepted):
        ends = client.getsockname()[:2], accepted.getsockname()[:2]
        client.close()                                   # the client closes first ...
        assert accepted.recv(1) == b""                   # ... the server sees it ...
        accepted.close()                                 # ... and closes: TIME_WAIT
        deadline = time.monotonic() + 10
        while (got := access.diag_socket(*ends)) is None or got.state != TIME_WAIT:
            assert time.monotonic() < deadline, got
            time.sleep(0.01)
        assert got.uid == 0 and got.inode == 0           # what the kernel says of it
        assert access.socket_owner(*ends) is None


def test_no_loopback_trust_without_the_accepted_socket(tmp_path):
    a = access.Access("t" * 32, names=lambda: (), port=lambda: 3333, token_file=tmp_path / "token")
    got = a.caller({"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000"}, {})
    assert isinstance(got, tuple) and got[1] == 401
