"""A link A->B shapes A's answers to B too: what A's app (on its DML port) sends back to a
request B made (an HTTP GET of model weights from A's server, to B's ephemeral port)
goes at A->B's rate, not unshaped. Measured for real: a real agent, real namespaces (and
docker containers), an HTTP server as A's app, downloads from inside B's namespace.

A link is ip + DML port: answers from another port of A, and answers to a node A has no
link to, stay unshaped. A link taken down drops its answers too (one class, one leaf).
"""
import json
import sys


import pytest

from tests.support import agents as ah
from tests.support import containers as dt


PORT = ah.IPERF_PORT          # every node's DML port (what links name)
OTHER_PORT = PORT + 1         # a second server of A's app: not a link's port
A_TO_B = 8_000_000
B_TO_A = 100_000_000          # high: B's requests and ACKs are not the bottleneck
BODY = A_TO_B // 8 * 3        # about 3 s at A->B's rate

# The app of every node: HTTP servers on the given ports, GET /<n> answers n zero bytes.
SERVER = r"""
import sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
CHUNK = bytes(65536)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            n = int(self.path.strip("/"))
        except ValueError:
            n = -1
        if not 0 <= n <= 1 << 28:
            self.send_error(400)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        while n > 0:
            k = min(n, len(CHUNK))
            self.wfile.write(CHUNK[:k])
            n -= k
    def log_message(self, *a):
        pass
servers = [ThreadingHTTPServer(("0.0.0.0", int(p)), H) for p in sys.argv[1:]]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""

# A download, timed from the answer's headers to its last byte (goodput as the receiver
# sees it); {"error"} when no answer comes within the timeout.
CLIENT = r"""
import http.client, json, sys, time
host, port, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
try:
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    c.request("GET", f"/{n}")
    r = c.getresponse()
    t0 = time.monotonic()
    got = 0
    while True:
        b = r.read(65536)
        if not b:
            break
        got += len(b)
    print(json.dumps({"status": r.status, "bytes": got, "seconds": time.monotonic() - t0}))
except OSError as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
"""


def download(dep: ah.Deployment, src: str, dst: str, port: int, n: int, *, timeout_s: float = 30) -> dict:
    """GET n bytes from node dst's app on port, from inside src's namespace."""
    p = ah.ns_run(dep.ns(src), [sys.executable, "-c", CLIENT, dep.ip(dst), str(port), str(n), str(timeout_s)],
                  timeout_s=timeout_s + 60)
    out = json.loads(p.stdout)
    if "error" not in out:
        assert out["status"] == 200 and out["bytes"] == n, out
        out["goodput_bps"] = out["bytes"] * 8 / out["seconds"]
    return out


def plan(make, n: int = 3) -> ah.Deployment:
    """a, b, c running SERVER on PORT and OTHER_PORT; links a->b 8 mbit, b->a 100 mbit;
    no link to or from c."""
    dep = make(n, cmd=["python3", "-c", SERVER, str(PORT), str(OTHER_PORT)], port=PORT)
    a, b, c = dep.names
    dep.links = {a: [ah.link(dep, a, b, A_TO_B)], b: [ah.link(dep, b, a, B_TO_A)]}
    return dep


def check_answers_are_shaped(agent, dep: ah.Deployment) -> None:
    a, b, c = dep.names
    for port in (PORT, OTHER_PORT):
        ah.wait_listening(dep.ns(a), port)

    # b's GET to a's DML port: the answer comes at a->b's rate
    shaped = download(dep, b, a, PORT, BODY)
    assert "error" not in shaped, shaped
    ah.assert_near(shaped["goodput_bps"], A_TO_B)

    # a link is ip + DML port: a's answers from another port, and a's answers to c (no
    # link a->c), are not shaped
    other = download(dep, b, a, OTHER_PORT, BODY)
    to_c = download(dep, c, a, PORT, BODY)
    for what, got in (("from another port", other), ("to a node without a link", to_c)):
        assert "error" not in got, (what, got)
        assert got["goodput_bps"] >= 10 * A_TO_B, \
            f"a's answer {what}: {got['goodput_bps'] / 1e6:.1f} Mbit/s, expected unshaped"

    # a->b down: b's request still reaches a (b->a is up) but no answer comes back; c's does
    agent.post("/link/fault", {"node": a, "dest": b, "action": "down"})
    try:
        lost = download(dep, b, a, PORT, 100_000, timeout_s=2)
        assert "error" in lost, f"an answer crossed a link that is down: {lost}"
        assert "error" not in download(dep, c, a, PORT, 100_000)
    finally:
        agent.post("/link/fault", {"node": a, "dest": b, "action": "up"})
    back = download(dep, b, a, PORT, 100_000)
    assert "error" not in back, back


@ah.need_root()
@pytest.mark.timeout(120)
def test_answers_of_a_netns_nodes_app_go_by_its_link(agent):
    dep = plan(ah.plan)
    with ah.deployed(agent, dep):
        check_answers_are_shaped(agent, dep)


@dt.need_docker()
@pytest.mark.timeout(300)
def test_answers_of_a_docker_nodes_app_go_by_its_link(agent):
    # the app listens on the node's port inside its container (DML_PORT), which is the
    # port the agent gives the node's table
    dep = plan(dt.plan)
    with dt.deployed(agent, dep):
        check_answers_are_shaped(agent, dep)
