"""Fuzz tests: random requests against the real controller, its embedded
agent and one running node of each role, with and without each credential.

One netns testbed for the whole module (tests/support/workflow.py): the controller and its
agent in this process, seven node apps (fl_aggregator, fl_trainer, gl_peer, el_peer,
ra_peer, ps_server, ps_worker) in their namespaces with links between them, their dataset
and structure confs pushed through the controller.

Hypothesis draws requests (`requests_to`): method (mostly one the route takes), path (the
servers' real routes, from their Flask url_map, dml_app's sources for the nodes, and
random, traversing, percent-encoded, NUL-holding, very long ones), query string (random
keys and values, file=/etc/shadow, root=, name=../x), headers (Host and Origin variants,
Sec-Fetch-Site, Content-Type variants, random and up to 64 KiB values), body (random
bytes, JSON of random shape, each route's valid body or weights metadata mutated, deep
nesting, NaN/Infinity/1e309, huge numbers and bools where numbers go, safetensors-looking
garbage, real safetensors with random metadata, 1 MiB + 1) and the credential: none,
wrong ones, the admin token, the node's own, another node's, the peer credential, and no
credential from another local user (uid 65534, through a helper process run by setpriv:
from root the controller takes a token-less loopback request as the admin's).

Tests: without the right credential (any route) for the controller, the agent and each
node; each node's credential on the controller's node routes; the admin on every
non-destructive controller and agent route; a node's own and the peer credential on
every route of that node. Then, because random mutation finds a wrong type in one field
only now and then, every single-field variant of each route's valid body ("type
confusion"); and the cases the fuzzing found, kept as fixed tests.

Passes when:
* no answer is a 5xx and every request is answered (no hang, no dropped connection);
* a request without the right credential gets no 2xx and changes nothing: the
  controller's /status, its run folder and conf files, the agent's /status and state
  file, each node's links in the kernel (tc classes and filters), /stats and log are the
  same before and after it (a node's own credential may change that node's heartbeat and
  log on the controller; a node's own or the peer credential may change that node);
* afterwards every server still answers /status or /hi within a deadline.
With the admin credential, destructive requests (reset, stop, clear, physical, finish,
build, a /start naming a node that can start) are never drawn; the others are checked
for "no 5xx and still answering".

Bounded for CI: a fixed number of examples per test (times EDGETB_FUZZ_SCALE), a fixed
seed per test and no example database, so every run sends the same requests; about 100 s
on 2 cores with the deployment. EDGETB_FUZZ_SURVEY=FILE records failures there instead of
stopping (and every request in FILE.all). Requests go only to 127.0.0.1 and the test's own
node addresses; no random string in a body can be a host:port.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import posixpath
import re
import shutil
import subprocess
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from tests.support import ROOT

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from controller import access
from controller.manager import Manager
from dml_app import net

from tests.support import agents as ah

pytestmark = ah.need("root", "needs root: deploys netns nodes" if os.geteuid() != 0 else None)

PORT = 3372                     # the controller; its embedded agent is PORT + 1 (no other test uses them)
SUBNET = "10.247.0.0/24"        # no other test uses it
ROLES = {"zfa": "fl_aggregator.py", "zft": "fl_trainer.py", "zgl": "gl_peer.py", "zel": "el_peer.py",
         "zra": "ra_peer.py", "zps": "ps_server.py", "zpw": "ps_worker.py"}
NAMES = list(ROLES)
NOBODY = 65534
REQUEST_TIMEOUT_S = 30.0
# Examples per test are these numbers times EDGETB_FUZZ_SCALE (default 1: what CI runs).
SCALE = float(os.environ.get("EDGETB_FUZZ_SCALE", "1"))

# Admin requests never drawn (they would take the testbed down or start work); the
# path is compared after percent-decoding and dot-segment removal, as a server sees it.
DESTRUCTIVE_CTL = {"/emulated/reset", "/emulated/stop", "/emulated/clear", "/finish"}
# /start is sent, but never naming a node that can start (zft, a trainer, cannot: its
# answer, a refusal, must come back as a 4xx and leave the run as it was).
STARTABLE = [n for n in NAMES if n != "zft"]
DESTRUCTIVE_AGENT = {"/emulated/reset", "/emulated/stop", "/emulated/clear", "/emulated/build"}
# A node's own or the peer credential may not GET /start (it would begin training).
DESTRUCTIVE_NODE = {"/start"}


class FuzzManager(Manager):
    algorithm = "fuzz"


def _source_rules(*paths: str) -> list[str]:
    """The routes a server's source declares (for test ids; the fixture checks them
    against the running app's url_map): `@app.route(...)` or a blueprint's `@bp.route(...)`."""
    text = "".join((ROOT / path).read_text() for path in paths)
    return sorted(set(re.findall(r"""\n\s*@(?:app|bp)\.(?:route|get|post)\(\s*["'](/[^"']*)["']""", text)))


def _destructive(target: str, rule: str) -> bool:
    """What the admin never sends: it would take the testbed down or start work."""
    if rule.startswith("/physical"):
        return True
    return rule in (DESTRUCTIVE_CTL if target == "ctl" else DESTRUCTIVE_AGENT)


CTL_RULES = _source_rules(*(str(p.relative_to(ROOT)) for p in sorted((ROOT / "controller" / "api").glob("*.py"))))
AGENT_RULES = _source_rules("worker/agent.py")


# ----------------------------------------------------------------------------- the testbed

def _links() -> dict:
    """A ring over the seven nodes and back, so every node has tc classes to compare."""
    return {a: [{"dest": NAMES[(i + 1) % len(NAMES)], "bw": "50mbit"},
                {"dest": NAMES[(i - 1) % len(NAMES)], "bw": "20mbit"}]
            for i, a in enumerate(NAMES)}


def _confs(addr: dict[str, str]) -> dict[str, tuple[dict, dict]]:
    """{node: (dataset conf, structure conf)}: a valid pair for every role."""
    data = {"train_len": 1, "train_start_index": 1, "test_len": 1, "test_start_index": 1, "batch_size": 32}
    structure = {
        "zfa": {"trainer_fraction": 1.0, "sync": 1, "child_node": ["zft"], "connect": {"zft": addr["zft"]}},
        "zft": {"epoch": 1, "father_node": "zfa", "connect": {"zfa": addr["zfa"]}},
        "zgl": {"epoch": 1, "sync": 1, "connect": {"zra": addr["zra"]}},
        "zel": {"layer": [1, 2], "father_node": ["self", "top"], "child_node": [[], ["self"]], "sync": [0, 1],
                "epoch": 1, "connect": {}, "forward": {}},
        "zra": {"epoch": 0, "sync": 1, "next_name": "zgl", "connect": {"zgl": addr["zgl"]}},
        "zps": {"role": "server", "workers": ["zpw"], "connect": {"zpw": addr["zpw"]}, "steps": 2},
        "zpw": {"role": "worker", "server": "zps", "connect": {"zps": addr["zps"]}},
    }
    return {n: (dict(data), structure[n]) for n in NAMES}


def _node_routes(script: str) -> dict[str, list[str]]:
    """{route: its methods} a node running `script` serves: the runtime's and its role's,
    read from dml_app's sources (the app itself lives in the node's process)."""
    runtime = (ROOT / "dml_app" / "runtime.py").read_text()
    role = (ROOT / "dml_app" / script).read_text()
    found: dict[str, list[str]] = {}
    for method, rule in re.findall(r"""\n\s*@app\.(get|post)\(\s*["'](/[^"']*)["']""", runtime):
        found.setdefault(rule, []).append(method.upper())
    for rule, methods in re.findall(r"""\n\s*rt\.route\(\s*["'](/[^"']*)["'],\s*methods=\[([^\]]*)\]""", role):
        found.setdefault(rule, []).extend(re.findall(r"[A-Z]+", methods))
    assert {"/hi", "/stats", "/conf/dataset", "/conf/structure", "/start"} <= set(found), found
    return found


def _rules(app) -> dict[str, list[str]]:
    """{route: its methods} of a Flask app, from its url_map."""
    out: dict[str, list[str]] = {}
    for r in app.url_map.iter_rules():
        if r.endpoint != "static":
            out.setdefault(r.rule, []).extend(sorted(set(r.methods) - {"HEAD", "OPTIONS"}))
    return out


NOBODY_HELPER = r"""
import base64, http.client, json, sys
for line in sys.stdin:
    r = json.loads(line)
    out = {}
    try:
        c = http.client.HTTPConnection(r["host"], r["port"], timeout=r["timeout"])
        c.putrequest(r["method"], r["target"], skip_host=True, skip_accept_encoding=True)
        for k, v in r["headers"]:
            c.putheader(k, v.encode("latin-1"))
        body = base64.b64decode(r["body"]) if r["body"] is not None else None
        if body is not None:
            c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        resp = c.getresponse()
        out = {"status": resp.status, "text": resp.read()[:300].decode("latin-1")}
        c.close()
    except Exception as e:
        out = {"status": None, "text": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


class Nobody:
    """A process running as uid 65534 that sends the requests it is given (one JSON line
    each) and answers their status: the controller sees a socket owned by that user."""

    def __init__(self):
        py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3")
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", py, "-c", NOBODY_HELPER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/", start_new_session=True)

    def send(self, host, port, method, target, headers, body) -> tuple[int | None, str]:
        req = {"host": host, "port": port, "method": method, "target": target, "headers": headers,
               "body": None if body is None else base64.b64encode(body).decode(), "timeout": REQUEST_TIMEOUT_S}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()    # the helper's own timeout bounds this
        if not line:
            raise AssertionError(f"the uid {NOBODY} helper died (exit {self.proc.poll()})")
        out = json.loads(line)
        return out["status"], out["text"]

    def close(self) -> None:
        from worker.nodes import stop_group

        try:
            self.proc.stdin.close()
        except OSError:
            pass
        stop_group(self.proc, 5)
        self.proc.stdout.close()


@dataclass
class Bed:
    tb: object
    manager: Manager
    tmp: Path
    admin: str
    ctl_port: int
    agent_port: int
    addr: dict[str, tuple[str, int]]            # node -> (ip, port)
    ctl_routes: dict[str, list[str]]                 # route -> methods
    agent_routes: dict[str, list[str]]
    node_routes: dict[str, dict[str, list[str]]]     # node -> route -> methods
    nobody: Nobody
    statuses: dict[int | None, int] = field(default_factory=dict)

    def token(self, who: str) -> str:
        return net.node_token(self.admin, who)


def _wait_nodes(bed: Bed, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for name, (ip, port) in bed.addr.items():
        while True:
            code, _ = send(ip, port, "GET", "/hi", [("Host", f"{ip}:{port}"), (net.TOKEN_HEADER, bed.token(name))],
                           None, timeout_s=5)
            if code == 200:
                break
            assert time.monotonic() < deadline, f"node {name} never answered /hi: last {code}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    from tests.support.workflow import netns_testbed
    from worker.agent import make_app

    tmp = tmp_path_factory.mktemp("fuzz")
    with netns_testbed(tmp, FuzzManager, ROLES, _links(), port=PORT, subnet=SUBNET, cpu=2.0,
                       ram_mb=512, emulator="emu-fuzz") as (tb, manager):
        agent, srv = tb.embedded
        addr = {n: (tb.emulated[n].ip, tb.emulated[n].port) for n in NAMES}
        if shutil.which("setpriv") is None:
            pytest.fail("setpriv (util-linux, install.sh) is needed to send requests as another local user")
        nobody = Nobody()
        try:
            b = Bed(tb=tb, manager=manager, tmp=tmp, admin=tb.token, ctl_port=tb.host_port, agent_port=srv.port,
                    addr=addr, ctl_routes=_rules(manager.app), agent_routes=_rules(make_app(agent)),
                    node_routes={n: _node_routes(ROLES[n]) for n in NAMES}, nobody=nobody)
            # the test ids come from the sources: they must be the apps' real routes
            assert sorted(b.ctl_routes) == CTL_RULES and sorted(b.agent_routes) == AGENT_RULES, \
                (sorted(b.ctl_routes), sorted(b.agent_routes))
            # the helper really is another user to the controller
            code, text = nobody.send("127.0.0.1", b.ctl_port, "GET", "/status", [("Host", f"127.0.0.1:{b.ctl_port}")], None)
            assert code == 401, f"a request as uid {NOBODY}: {code} {text}"
            _wait_nodes(b, 180)
            manager.conf_dir.mkdir(parents=True, exist_ok=True)
            for n, (data, structure) in _confs({k: f"{ip}:{port}" for k, (ip, port) in addr.items()}).items():
                (manager.conf_dir / f"{n}_dataset.conf").write_text(json.dumps(data))
                (manager.conf_dir / f"{n}_structure.conf").write_text(json.dumps(structure))
            ctl = f"127.0.0.1:{b.ctl_port}"
            for kind in ("dataset", "structure"):
                got = net.get_json(f"{ctl}/conf/{kind}", token=b.admin, timeout_s=180)
                assert set(got.values()) == {"ok"}, got
            yield b
        finally:
            nobody.close()


# ----------------------------------------------------------------------------- sending

def send(host: str, port: int, method: str, target: str, headers: list[tuple[str, str]],
         body: bytes | None, *, timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[int | None, str]:
    """One raw HTTP/1.1 request (no path normalisation, headers exactly as given):
    (status, start of the body), or (None, why) when nothing answered."""
    c = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        c.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            c.putheader(k, v.encode("latin-1"))
        if body is not None:
            c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        return r.status, r.read()[:300].decode("latin-1")
    except (OSError, http.client.HTTPException) as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        c.close()


# ----------------------------------------------------------------------------- strategies

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
KEYS = ["round", "phase", "step", "index", "name", "have", "wait_s", "node", "state", "version", "samples",
        "loss", "kind", "src", "dst", "hops", "layer", "epoch", "sync", "connect", "ring", "rank", "next_name",
        "child_node", "father_node", "trainer_fraction", "round_timeout_s", "seed", "lr", "forward", "peers",
        "role", "workers", "server", "steps", "mode", "train_len", "train_start_index", "test_len",
        "test_start_index", "batch_size", "emulator", "backend", "cpu", "bridge", "gateway", "cidr", "nodes",
        "links", "id", "ip", "port", "ram_mb", "cmd", "working_dir", "env", "dest", "rate_bps", "delay_us",
        "tag", "method", "force", "root", "image", "gpu"]
FORBIDDEN_KEYS = {"share", "nfs", "url"}     # an agent would fetch or mount from the address given
FILE_VALUES = ["/etc/shadow", "/etc/passwd", "../x", "../../etc/shadow", "/proc/self/environ", "/dev/null",
               "node_info.json", "conf", "/", "", ".", "dataset/meta.json", "%00", "x\x00y", "a" * 300]
QUERY_KEYS = ["file", "root", "name", "msg", "node", "digest", "token", "X-Testbed-Token"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/json; charset=utf-16",
                 "text/plain", "application/octet-stream", "multipart/form-data; boundary=xyz",
                 "multipart/form-data", "application/x-www-form-urlencoded", "application/x-ndjson",
                 "", "garbage/\u00e9", "application/json;;;", "*/*"]
HEADER_NAMES = ["X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded", "X-Real-IP",
                "Cookie", "Authorization", "Expect", "Accept", "Range", "If-None-Match", "Accept-Encoding",
                "Content-Encoding", "User-Agent", "Referer", "X-Http-Method-Override", "Upgrade",
                "Sec-Fetch-Mode", "Connection"]
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

latin1_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                      max_size=40)
segment = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FF), min_size=1, max_size=12)
json_keys = st.one_of(st.sampled_from(KEYS + NAMES), st.text(max_size=10)).filter(
    lambda k: k.lower() not in FORBIDDEN_KEYS)
# No random string may be an address ("host:port"): a node that forwards or answers to a
# peer named in a body must only ever reach this test's own nodes.
ADDRESS_LIKE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
fuzz_text = st.text(max_size=20).map(lambda t: t + " " if ADDRESS_LIKE.match(t.strip()) else t)
json_leaf = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, 1, -1, 2, 2 ** 63, -(2 ** 63), 2 ** 64, 10 ** 30, 4444, 65536]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 1e308, -1e308, 5e-324, 1e-9]),
    fuzz_text,
    st.sampled_from(NAMES + ["self", "down", "up", "reduce", "gather", "server", "worker", "sync", "async",
                             "10.247.0.2:4444", "127.0.0.1:3373", "netns", "docker", "1e309", "NaN"]),
)
json_values = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                          st.dictionaries(json_keys, c, max_size=5)),
                           max_leaves=25)


@st.composite
def deep_json(draw) -> bytes:
    depth = draw(st.sampled_from([31, 33, 100, 1000, 5000, 100_000]))
    kind = draw(st.sampled_from(["list", "dict", "mixed"]))
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "dict":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"round":' + b'[{"x":' * depth + b"0" + b"}]" * depth + b"}"


@st.composite
def number_bodies(draw) -> bytes:
    key = draw(st.sampled_from(KEYS))
    lit = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e309", "-1e309", "1" + "0" * 5000,
                                "1" + "0" * 400, "true", "false", "null", "-1", "0", "1e-400", "2.5",
                                "9223372036854775808", "\"4\"", "[]", "{}", "1.0", "-0"]))
    extra = draw(st.sampled_from(["", ', "name": "zft"', ', "node": "zfa", "state": "x"',
                                  ', "round": 1, "phase": "reduce", "step": 0', ', "have": -1, "wait_s": 0.01']))
    return ('{"%s": %s%s}' % (key, lit, extra)).encode()


def _safetensors(header: dict, data: bytes, length: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return (len(h) if length is None else length).to_bytes(8, "little", signed=False) + h + data


def rarely(draw, n: int) -> bool:
    """True about once in n draws (a value inside the range: Hypothesis favours the ends)."""
    return draw(st.integers(0, n - 1)) == n // 2


@st.composite
def mutated(draw, template):
    """`template` (a valid body or metadata) with some values replaced by random JSON of
    any type, some keys dropped and some added: the handlers' own checks get exercised."""
    def walk(v):
        if rarely(draw, 4):
            return draw(json_values)
        if isinstance(v, dict):
            out = {k: walk(x) for k, x in v.items() if not rarely(draw, 12)}
            if rarely(draw, 8):
                out[draw(json_keys)] = draw(json_values)
            return out
        if isinstance(v, list):
            return [walk(x) for x in v] + ([draw(json_values)] if rarely(draw, 8) else [])
        return v
    return walk(template)


@st.composite
def safetensors_bodies(draw, meta_template: dict | None = None) -> bytes:
    """Real safetensors with random metadata, or something that looks like it."""
    if meta_template is not None and draw(st.integers(0, 9)) < 7:
        meta = draw(mutated(meta_template))
    else:
        meta = draw(st.one_of(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6), json_values))
    meta_s = json.dumps(meta, allow_nan=True)
    if draw(st.booleans()):
        meta_s = draw(st.sampled_from([meta_s, "{" * 50 + "}" * 50, '{"samples": 1e309, "round": 1}',
                                       '{"round": NaN}', "[" * 5000 + "]" * 5000, "not json", "",
                                       '{"samples": 1' + "0" * 5000 + "}"]))
    n = draw(st.integers(0, 8))
    dtype = draw(st.sampled_from(["F32", "F64", "I64", "F16", "BF16", "U8", "BOOL", "X9", ""]))
    shape = draw(st.one_of(st.just([n]), st.lists(st.integers(-2, 2 ** 40), max_size=4)))
    esize = {"F32": 4, "F64": 8, "I64": 8, "F16": 2, "BF16": 2, "U8": 1, "BOOL": 1}.get(dtype, 4)
    name = draw(st.sampled_from(["chunk", "conv1.weight", "fc.bias", "", "__metadata__x", "a" * 200]))
    size = n * esize
    offsets = draw(st.one_of(st.just([0, size]), st.lists(st.integers(-1, 2 ** 64 - 1), min_size=0, max_size=3)))
    header = {name: {"dtype": dtype, "shape": shape, "data_offsets": offsets}}
    if draw(st.booleans()):
        header["__metadata__"] = {"edgetb": meta_s}
    elif draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    data = draw(st.binary(min_size=size, max_size=size)) + draw(st.binary(max_size=8))
    length = draw(st.one_of(st.none(), st.sampled_from([0, 1, 7, 2 ** 63, 2 ** 64 - 1, 100_000_000])))
    return _safetensors(header, data, length)


json_objects = st.dictionaries(json_keys, json_values, max_size=8).map(
    lambda v: json.dumps(v, allow_nan=True).encode())
other_bodies = st.one_of(
    st.none(),
    st.binary(max_size=2048),
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    deep_json(),
    st.sampled_from([b"", b"{}", b"[]", b"[1]", b"\"x\"", b"null", b"\xff\xfe{", b"{\"a\": 1,}", b"\x00" * 64,
                     b"x" * (1024 * 1024 + 1), b"{\"node\": [\"zfa\"]}", b"{\"node\": {\"a\": 1}}"]),
)
# Routes that take model weights (safetensors); every other route takes JSON or nothing.
WEIGHTS_ROUTES = {"/train", "/combine", "/gossip", "/el/message", "/ra/chunk", "/ps/push", "/ps/params"}


def templates(bed: Bed, target: str, me: str) -> dict[str, dict]:
    """{route: a valid JSON body (or, for weights routes, valid metadata)} of one server;
    `me`: the node the request speaks for (or a node)."""
    a = {n: f"{ip}:{port}" for n, (ip, port) in bed.addr.items()}
    if target == "ctl":
        return {"/heartbeat": {"node": me, "state": "idle", "round": 0}}
    if target == "agent":
        # Named after no deployed node ("q..."), and the deploy puts its node outside its
        # bridge's network: no mutation of it can deploy anything.
        link = {"dest": "qft", "ip": "10.247.0.3", "port": 4444, "rate_bps": 1_000_000, "delay_us": 0}
        node = {"name": "qghost", "id": 99, "ip": "10.247.2.2", "port": 4444, "cpu": 0.1, "ram_mb": 64,
                "cmd": [], "working_dir": "", "volumes": [], "env": {}}
        return {"/update/tc": {"links": {"qfa": [link]}},
                "/emulated/deploy": {"emulator": "emu-qghost", "backend": "netns", "cpu": 1,
                                     "bridge": {"cidr": "10.247.1.0/24", "gateway": "10.247.1.1"},
                                     "nodes": [node], "links": {"qghost": [link]}},
                "/physical/deploy": {"nodes": [dict(node, nic="lo")], "links": {}},
                "/emulated/build": {"tag": "edgetb-fuzz:none", "method": "offline", "force": False}}
    data, structure = _confs(a)[target]
    return {"/conf/dataset": data, "/conf/structure": structure,
            "/ra/train": {"round": 1}, "/ra/evaluate": {"round": 1},
            "/ra/step": {"round": 1, "phase": "reduce", "step": 0},
            "/ps/pull": {"name": "zpw", "have": -1, "wait_s": 0.05},
            # metadata of the weights routes
            "/train": {"round": 1, "name": "zfa"},
            "/combine": {"name": "zft", "round": 1, "samples": 10, "loss": 0.5},
            "/gossip": {"name": "zra", "round": 1, "samples": 10},
            "/el/message": {"kind": "up", "src": "zfa", "dst": target, "path": ["zfa", target], "layer": 1,
                            "round": 1, "samples": 3},
            "/ra/chunk": {"round": 1, "phase": "reduce", "step": 0, "index": 0, "name": "zgl"},
            "/ps/push": {"name": "zpw", "version": 0, "samples": 32, "loss": 0.1},
            "/ps/params": {"version": 1}}


@st.composite
def bodies(draw, rule: str, template: dict | None) -> bytes | None:
    pick = draw(st.integers(0, 9))
    if rule in WEIGHTS_ROUTES:
        return draw(safetensors_bodies(template)) if pick < 7 else draw(st.one_of(json_objects, other_bodies))
    if template is not None and pick < 5:
        return json.dumps(draw(mutated(template)), allow_nan=True).encode()
    if pick < 6:
        return draw(json_objects)
    if pick < 8:
        return draw(number_bodies())
    return draw(st.one_of(other_bodies, safetensors_bodies()))


def _encode_path(p: str) -> str:
    return quote(p, safe="/%:@!$&'()*+,;=-._~")


@st.composite
def paths(draw, rule: str, rules: list[str]) -> str:
    rule = re.sub(r"<[^>]+>", lambda m: draw(st.one_of(st.text("0123456789abcdef", min_size=0, max_size=64),
                                                        segment)), rule)
    how = draw(st.sampled_from(["route"] * 14 + ["random", "traversal", "encoded", "nul", "long", "double",
                                                 "trailing", "case", "dots"]))
    if how == "random" or not rules:
        rule = "/" + "/".join(draw(st.lists(segment, min_size=0, max_size=5)))
    elif how == "traversal":
        rule = draw(st.sampled_from(["/../" + rule.lstrip("/"), rule + "/../../etc/passwd", "/..%2f..%2fetc%2fshadow",
                                     "/x/..%2f" + rule.lstrip("/"), "/%2e%2e/" + rule.lstrip("/"),
                                     "/./" + rule.lstrip("/")]))
    elif how == "encoded":
        rule = "".join("%%%02X" % ord(c) if c.isalnum() and draw(st.booleans()) else c for c in rule)
    elif how == "nul":
        rule = rule + draw(st.sampled_from(["%00", "%00.json", "\x00", "%", "%zz", "%ff%fe"]))
    elif how == "long":
        rule = rule + "/" + "a" * draw(st.sampled_from([300, 5000, 20000]))
    elif how == "double":
        rule = "/" + rule
    elif how == "trailing":
        rule = rule + "/"
    elif how == "case":
        rule = rule.upper()
    elif how == "dots":
        rule = rule + draw(st.sampled_from([";.json", "?", "#frag", "/.", "//", "\\..\\x"]))
    return _encode_path(rule)


@st.composite
def queries(draw) -> str:
    pairs = draw(st.lists(st.tuples(st.one_of(st.sampled_from(QUERY_KEYS), st.text(max_size=8)),
                                    st.one_of(st.sampled_from(FILE_VALUES + NAMES + ["../x", "zfa/../zft"]),
                                              st.text(max_size=30))), max_size=4))
    if not pairs:
        return ""
    raw = draw(st.booleans())
    parts = []
    for k, v in pairs:
        if raw:   # as a client that does not encode sends them (the server must cope)
            parts.append(_encode_path(k) + "=" + _encode_path(v))
        else:
            parts.append(quote(k, safe="") + "=" + quote(v, safe=""))
    return "?" + draw(st.sampled_from(["&", ";", "&&"])).join(parts)


@st.composite
def extra_headers(draw, port: int, weights: bool) -> list[tuple[str, str]]:
    hs: list[tuple[str, str]] = []
    # Mostly a Host the server answers to, so that most requests reach the credential
    # check and the handlers; sometimes none, one of its other names or a foreign one.
    host = f"127.0.0.1:{port}" if not rarely(draw, 6) else draw(st.sampled_from(
        [None, "localhost", f"localhost:{port}", f"[::1]:{port}", "evil.example", f"evil.example:{port}", "",
         f"127.0.0.1:{port}:1", "127.0.0.1:x", "10.247.0.1", "a" * 300, "127.0.0.1:99999", "[::1",
         "user@evil.example", "127.0.0.1\tx"]))
    if host is not None:
        hs.append(("Host", host))
    if rarely(draw, 12):
        hs.append(("Origin", draw(st.sampled_from(["null", "http://evil.example", f"http://localhost:{port}",
                                                   f"http://127.0.0.1:{port}", "http://127.0.0.1:1", "garbage",
                                                   "http://[::1", f"https://localhost:{port}"]))))
    if rarely(draw, 12):
        hs.append(("Sec-Fetch-Site", draw(st.sampled_from(["cross-site", "same-site", "same-origin", "none", "x"]))))
    # Mostly the type the route reads (weights or JSON), so that bodies reach its parser.
    pick = draw(st.integers(0, 9))
    usual, other = ("application/octet-stream", "application/json") if weights else \
        ("application/json", "application/octet-stream")
    ct = (usual if pick < 7 else other if pick < 8 else draw(st.one_of(st.none(), st.sampled_from(CONTENT_TYPES))))
    if ct is not None:
        hs.append(("Content-Type", ct))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.one_of(st.sampled_from(HEADER_NAMES), st.text(TOKEN_CHARS, min_size=1, max_size=20)))
        if name.lower() in ("content-length", "transfer-encoding", "host", net.TOKEN_HEADER.lower()):
            continue
        value = draw(st.one_of(latin1_text, st.sampled_from(["chunked", "100-continue", "close", "keep-alive",
                                                             "gzip", "bytes=0-1", "127.0.0.1", "evil.example",
                                                             "upgrade", "websocket", "DELETE"]),
                               st.integers(1, 64 * 1024).map(lambda n: "v" * n)))
        hs.append((name, value.strip(" \t")))
    return hs


@dataclass
class Req:
    target: str                  # "ctl", "agent" or a node name
    method: str
    path: str                    # as sent (percent-encoded, not normalised)
    query: str
    headers: list[tuple[str, str]]
    body: bytes | None
    cred: str                    # none|nobody|wrong|admin|peer|node:<name>
    token: str | None

    def route(self) -> str:
        """The path as the server routes it: decoded, dot segments and double slashes gone."""
        p = unquote(self.path, errors="replace").split("?")[0]
        return posixpath.normpath("/" + p.lstrip("/")) if p else "/"

    def show(self) -> str:
        body = "none" if self.body is None else f"{len(self.body)} bytes {self.body[:120]!r}"
        hs = [(k, v if len(v) < 80 else v[:77] + "...") for k, v in self.headers]
        return (f"{self.method} {self.target}{self.path[:200]}{self.query[:200]} cred={self.cred} "
                f"headers={hs} body={body}")


def wrong_tokens(admin: str) -> list[str]:
    return ["wrong", admin[:-1], admin + "0", admin.upper() if admin.upper() != admin else admin + "x",
            net.node_token("not-the-admin", "zfa"), net.peer_token("not-the-admin"), "node.zfa." + "0" * 40,
            "node..x", "peer." + "0" * 40, "node.zfa", "x" * 5000, net.node_token(admin, "zfa")[:-1],
            "\u00e9" + admin]


def credentials(bed: Bed, target: str, kind: str) -> list[str]:
    """The credentials of one kind for a target:
    controller: "admin" (the admin token, or root on loopback without one), "node" (each
    node's own), "other" (another local user without a token, wrong ones, the peer's);
    agent: "admin", "other" (none, wrong, peer, node credentials);
    node: "owner" (its own, the peer credential), "other" (none, wrong, the admin token,
    another node's)."""
    nodes = [f"node:{n}" for n in NAMES]
    table = {
        ("ctl", "admin"): ["admin", "none"],
        ("ctl", "node"): nodes,
        ("ctl", "other"): ["nobody"] * 3 + ["wrong", "wrong", "peer"],
        ("agent", "admin"): ["admin"],
        ("agent", "other"): ["none", "wrong", "peer"] + nodes,
        ("node", "owner"): [f"node:{target}", "peer"],
        ("node", "other"): ["none", "wrong", "admin"] + [n for n in nodes if n != f"node:{target}"],
    }
    return table[("node" if target in NAMES else target, kind)]


@st.composite
def requests_to(draw, bed: Bed, target: str, kind: str, route: str = "*") -> Req:
    if target == "ctl":
        rules, port = bed.ctl_routes, bed.ctl_port
    elif target == "agent":
        rules, port = bed.agent_routes, bed.agent_port
    else:
        rules, (_, port) = bed.node_routes[target], bed.addr[target]
    cred = draw(st.sampled_from(credentials(bed, target, kind)))
    me = cred[5:] if cred.startswith("node:") else draw(st.sampled_from(NAMES))
    token = {"admin": bed.admin, "peer": net.peer_token(bed.admin), "none": None, "nobody": None}.get(cred)
    if cred == "wrong":
        token = draw(st.sampled_from(wrong_tokens(bed.admin)))
    elif cred.startswith("node:"):
        token = bed.token(cred[5:])
    rule = route if route != "*" else draw(st.sampled_from(sorted(rules)))
    # Mostly a method the route takes, so that most requests reach its handler.
    method = draw(st.sampled_from(rules[rule])) if draw(st.integers(0, 9)) < 7 else draw(st.sampled_from(METHODS))
    req = Req(target=target, method=method, path=draw(paths(rule, sorted(rules))), query=draw(queries()),
              headers=draw(extra_headers(port, rule in WEIGHTS_ROUTES)), cred=cred, token=token,
              body=draw(bodies(rule, templates(bed, target, me).get(rule))))
    if token is not None:
        req.headers.append((net.TOKEN_HEADER, token))
    # The admin never sends what would take the testbed down; a node's own or the peer
    # credential never starts training.
    route = req.route()
    if authority(req) == "all":
        if target == "ctl" and (route in DESTRUCTIVE_CTL or route.startswith("/physical")):
            req.path = _encode_path(draw(st.sampled_from([r for r in sorted(rules) if r not in DESTRUCTIVE_CTL
                                                          and not r.startswith("/physical") and "<" not in r])))
        if target == "agent" and (route in DESTRUCTIVE_AGENT or route.startswith("/physical")):
            req.path = _encode_path(draw(st.sampled_from(["/hi", "/status", "/update/tc", "/emulated/deploy"])))
        if target == "agent" and req.body:
            # /update/tc and /emulated/deploy with random bodies, but never naming a
            # deployed node (an empty link list for one would be a real change of links)
            for n in NAMES:
                req.body = req.body.replace(n.encode(), b"q" + n[1:].encode())
    if target in NAMES and authority(req) != "none" and req.route() in DESTRUCTIVE_NODE:
        req.path = "/hi"
    if target == "ctl" and authority(req) == "all" and "links.json" in unquote(req.query):
        req.query = ""
    if target == "ctl" and authority(req) == "all" and route == "/start" and \
            any(n in unquote(req.query, errors="replace") for n in STARTABLE):
        req.query = draw(st.sampled_from(["", "?root=zft", "?root=ghost", "?root=zft&root=zfa", "?root="]))
    return req


def authority(req: Req) -> str:
    """What the request's credential may change: 'all' (the admin on the controller or an
    agent; root without a token on the controller's loopback), 'node' (a node credential
    on the controller: that node's heartbeat and log), 'owner' (a node's own or the peer
    credential on that node), or 'none'."""
    if req.target == "ctl":
        if req.cred in ("admin", "none"):
            return "all"
        return "node" if req.cred.startswith("node:") else "none"
    if req.target == "agent":
        return "all" if req.cred == "admin" else "none"
    if req.cred == f"node:{req.target}":
        return "owner"
    if req.cred == "peer":
        return "none" if req.route() in ("/conf/dataset", "/conf/structure") else "owner"
    return "none"


# ----------------------------------------------------------------------------- state

def _files(base: Path, tag: str, out: dict) -> None:
    if not base.exists():
        return
    for p in sorted(base.rglob("*")):
        key = (tag, str(p.relative_to(base)))
        if p.is_file() and not p.is_symlink():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        else:
            out[key] = "dir" if p.is_dir() else "other"


UNSHAPED = "100Gbit"      # worker/tc.py UNSHAPED_RATE as `tc class show` prints it


def _tc(name: str) -> str:
    """A node's links as the kernel has them: every class's rate and ceil, and what each
    u32 filter matches (destination ip and port) with the rate of the class it selects.
    Class ids are left out: a link removed and added again may get another one."""
    p = subprocess.run(["tc", "-n", f"etb-{name}", "-batch", "-"], input="class show dev eth0\nfilter show dev eth0\n",
                       capture_output=True, text=True, timeout=20)
    out = p.stdout + p.stderr
    classes = {m.group(1): f"rate {m.group(2)} ceil {m.group(3)}"
               for m in re.finditer(r"class \S+ (\S+) .*?rate (\S+) ceil (\S+)", out)}
    # A destination without a link keeps its filter to a class at the unshaped rate
    # (worker/tc.py change_lines): such classes and filters are "no link".
    unshaped = f"rate {UNSHAPED} ceil {UNSHAPED}"
    filters = []
    for block in re.split(r"\n(?=filter )", out):
        flow = re.search(r"flowid (\S+)", block)
        if flow and block.startswith("filter") and classes.get(flow.group(1)) != unshaped:
            matches = sorted(re.findall(r"match (\S+) at (\d+)", block))
            filters.append(f"{matches} -> {classes.get(flow.group(1), flow.group(1))}")
    other = [l for l in out.splitlines() if not l.startswith(("class ", "filter ", " "))]
    return json.dumps({"classes": sorted(c for c in classes.values() if c != unshaped),
                       "filters": sorted(filters), "other": other})


def snapshot(bed: Bed) -> dict:
    """Everything a request without the right credential must leave as it was."""
    s: dict = {}
    ctl = net.get_json(f"127.0.0.1:{bed.ctl_port}/status", token=bed.admin, timeout_s=20)
    for name, n in ctl["nodes"].items():
        for k in ("worker", "ip", "port", "app", "links", "state", "round"):
            s[("ctl", name, k)] = n.get(k)
    s[("ctl", "finished")] = ctl["finished"]
    s[("ctl", "run_dir")] = ctl["run_dir"]
    s[("ctl", "nodes")] = sorted(ctl["nodes"])
    m = bed.manager
    s[("mgr", "root")], s[("mgr", "started_at")], s[("mgr", "summary")] = m.root, m.started_at, m.summary is None
    s[("mgr", "deployed")] = sorted(bed.tb.deployed)
    s[("mgr", "links")] = json.dumps(bed.tb.links, sort_keys=True)
    _files(m.runs_dir, "runs", s)
    _files(m.conf_dir, "conf", s)
    for f in sorted(bed.tmp.glob("*.json")):
        s[("tmp", f.name)] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    agent = net.get_json(f"127.0.0.1:{bed.agent_port}/status", token=bed.admin, timeout_s=20)
    s[("agent", "nodes")] = sorted(agent["nodes"])
    for name, n in agent["nodes"].items():
        # The box's limits, but not what the node uses of them (its log grows as it runs).
        box = {k: v for k, v in (n.get("box") or {}).items() if k not in ("pids_current", "log_used_bytes")}
        s[("agent", name)] = json.dumps({**n, "box": box}, sort_keys=True)
    state_dir = Path(f"/run/edgetb/agent-{bed.agent_port}")
    s[("agentstate", "state.json")] = (hashlib.sha256((state_dir / "state.json").read_bytes()).hexdigest()[:16]
                                       if (state_dir / "state.json").exists() else None)

    def node(name):
        ip, port = bed.addr[name]
        stats = net.get_json(f"{ip}:{port}/stats", token=bed.token(name), timeout_s=20)
        log = state_dir / "nodes" / name / "log" / f"{name}.log"
        # Its log, but for the lines its own heartbeat loop writes when the controller is slow.
        lines = [l for l in log.read_text(errors="replace").splitlines() if "heartbeat" not in l] \
            if log.exists() else None
        return name, stats, _tc(name), None if lines is None else hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    with ThreadPoolExecutor(len(NAMES)) as ex:
        for name, stats, tc, log in ex.map(node, NAMES):
            for k in ("bytes_sent", "bytes_received", "state", "round"):
                s[("stats", name, k)] = stats.get(k)
            s[("tc", name)] = tc
            s[("nodelog", name)] = log
    return s


def refused_start(req: Req, code: int | None) -> bool:
    """The admin's /start that a node refused (or that named no node): nothing started."""
    return req.target == "ctl" and authority(req) == "all" and req.route() == "/start" and \
        code is not None and 400 <= code < 500


def disallowed_changes(req: Req, before: dict, after: dict, code: int | None = None) -> dict:
    """{key: (before, after)} of what changed that the request's credential may not change
    (with the admin's credential: nothing may change when a /start was refused)."""
    auth = authority(req)
    if auth == "all" and not refused_start(req, code):
        return {}
    me = req.cred[5:] if req.cred.startswith("node:") else None
    out = {}
    for key in sorted(set(before) | set(after), key=repr):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        # A node's heartbeat always may bring the controller its true state and round.
        if key[0] == "ctl" and len(key) == 3 and key[2] in ("state", "round") and key[1] in NAMES:
            if b == after.get(("stats", key[1], key[2])):
                continue
        if auth == "node" and me is not None:
            if key in (("ctl", me, "state"), ("ctl", me, "round"), ("ctl", "run_dir")):
                continue
            if key[0] == "runs" and (key[1].count("/") == 0 and b == "dir" or key[1].endswith(f"/{me}.log")):
                continue
        if auth == "owner":
            if key[:2] == ("stats", req.target) or key == ("nodelog", req.target) or \
                    key in (("ctl", req.target, "state"), ("ctl", req.target, "round")):
                continue
        out[key] = (a, b)
    return out


def still_answering(bed: Bed, timeout_s: float = 30.0) -> None:
    """The controller, the agent and every node answer within the deadline."""
    deadline = time.monotonic() + timeout_s
    targets = [("controller", "127.0.0.1", bed.ctl_port, "/status", bed.admin),
               ("agent", "127.0.0.1", bed.agent_port, "/hi", bed.admin)]
    targets += [(n, ip, port, "/hi", bed.token(n)) for n, (ip, port) in bed.addr.items()]
    for what, host, port, path, token in targets:
        while True:
            code, text = send(host, port, "GET", path, [("Host", f"{host}:{port}"), (net.TOKEN_HEADER, token)],
                              None, timeout_s=10)
            if code == 200:
                break
            assert time.monotonic() < deadline, f"{what} no longer answers {path}: {code} {text}"
            time.sleep(0.5)


def run_one(bed: Bed, req: Req) -> None:
    before = snapshot(bed) if authority(req) != "all" or req.target == "ctl" and req.route() == "/start" else None
    host, port = (("127.0.0.1", bed.ctl_port) if req.target == "ctl" else
                  ("127.0.0.1", bed.agent_port) if req.target == "agent" else bed.addr[req.target])
    t0 = time.monotonic()
    if req.cred == "nobody":
        code, text = bed.nobody.send(host, port, req.method, req.path + req.query, req.headers, req.body)
    else:
        code, text = send(host, port, req.method, req.path + req.query, req.headers, req.body)
    took = time.monotonic() - t0
    bed.statuses[code] = bed.statuses.get(code, 0) + 1
    if SURVEY:
        with open(SURVEY + ".all", "a") as f:
            f.write(f"{code} {took:.2f}s {text.strip()[:100]!r} <- {req.show()[:400]}\n")
    assert code is not None, f"no answer after {took:.1f} s ({text}) to\n  {req.show()}"
    assert code < 500, f"HTTP {code} ({text.strip()[:300]}) to\n  {req.show()}"
    if authority(req) == "none" and req.target != "ctl" or req.cred in ("nobody", "wrong", "peer") and req.target == "ctl":
        assert not 200 <= code < 400, f"let in without the right credential: HTTP {code} ({text[:200]}) to\n  {req.show()}"
    if before is not None:
        changed = disallowed_changes(req, before, snapshot(bed), code)
        assert not changed, f"state changed without the right credential: {changed}\n  by {req.show()}"


# ----------------------------------------------------------------------------- the tests

SURVEY = os.environ.get("EDGETB_FUZZ_SURVEY")   # a file: record every failure there and go on


def _fuzz(bed: Bed, target: str, kind: str, route: str, examples: int) -> None:
    examples = max(1, round(examples * SCALE))

    # A fixed seed per server, credential kind and route (derandomize would give every
    # test the same seed: they share this function), no example database: CI runs the
    # same requests every time.
    @seed(zlib.crc32(f"{target}/{kind}/{route}".encode()))
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
              print_blob=False)
    @given(st.data())
    def inner(data):
        req = data.draw(requests_to(bed, target, kind, route))
        if not SURVEY:
            run_one(bed, req)
            return
        try:
            run_one(bed, req)
        except AssertionError as e:
            with open(SURVEY, "a") as f:
                f.write(f"{e}\n\n")
    bed.statuses.clear()
    try:
        inner()
    finally:
        print(f"\n{target} {kind} {route}: answers by status: {dict(sorted(bed.statuses.items(), key=repr))}")
        still_answering(bed)
    assert sum(bed.statuses.values()) >= min(examples, 10), bed.statuses


# Requests without the right credential: any route, random paths too.
def test_fuzz_controller_without_credential(bed):
    _fuzz(bed, "ctl", "other", "*", 80)


def test_fuzz_agent_without_credential(bed):
    _fuzz(bed, "agent", "other", "*", 60)


@pytest.mark.parametrize("name", NAMES)
def test_fuzz_node_without_credential(bed, name):
    _fuzz(bed, name, "other", "*", 30)


# A node's own credential on the controller: its routes ("*": any route, random paths).
@pytest.mark.parametrize("route", sorted(access.NODE_ROUTES) + ["*"])
def test_fuzz_controller_node_credential(bed, route):
    _fuzz(bed, "ctl", "node", route, 20)


# The admin: every route but the destructive ones, each with its own examples.
@pytest.mark.parametrize("route", [r for r in CTL_RULES if not _destructive("ctl", r)] + ["*"])
def test_fuzz_controller_admin(bed, route):
    _fuzz(bed, "ctl", "admin", route, 25)


@pytest.mark.parametrize("route", [r for r in AGENT_RULES if not _destructive("agent", r)] + ["*"])
def test_fuzz_agent_admin(bed, route):
    _fuzz(bed, "agent", "admin", route, 20)


# A node's own and the peer credential on that node: every route but /start.
@pytest.mark.parametrize("name,route", [(n, r) for n in NAMES for r in sorted(_node_routes(ROLES[n]))
                                        if r not in DESTRUCTIVE_NODE] + [(n, "*") for n in NAMES])
def test_fuzz_node_owner(bed, name, route):
    _fuzz(bed, name, "owner", route, 15)



# ----------------------------------------------------------------------------- type confusion
# Random mutation finds a wrong type in one field only now and then; these send every
# single-field variant of each route's valid body (or weights metadata): each value (and
# the whole body) replaced by each of these, and each key dropped.
CONFUSION = [None, True, -1, 2 ** 64, 1e308, "x", [], {}]


def _paths(v, at=()):
    yield at
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, at + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, at + (i,))


def _set(v, at, new, drop=False):
    if not at:
        return new
    v = json.loads(json.dumps(v))
    cur = v
    for k in at[:-1]:
        cur = cur[k]
    if drop:
        del cur[at[-1]]
    else:
        cur[at[-1]] = new
    return v


def confused(template) -> list:
    out = []
    for at in _paths(template):
        out += [_set(template, at, c) for c in CONFUSION]
        if at:
            out.append(_set(template, at, None, drop=True))
    return out


def _weights(meta) -> bytes:
    """A valid safetensors body (one tiny tensor) carrying `meta`."""
    return _safetensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "__metadata__": {"edgetb": json.dumps(meta)}}, b"\0\0\0\0")


def _variants(bed: Bed, target: str, routes: dict[str, list[str]], me: str) -> list[tuple[str, str, bytes, str]]:
    """(method, route, body, content type) of every single-field variant for a server."""
    out = []
    for rule, tpl in templates(bed, target, me).items():
        if rule not in routes or (target in ("ctl", "agent") and _destructive(target, rule)):
            continue
        method = "POST" if "POST" in routes[rule] else routes[rule][0]
        if rule in WEIGHTS_ROUTES:
            out += [(method, rule, _weights(v), "application/octet-stream") for v in confused(tpl)]
        else:
            out += [(method, rule, json.dumps(v).encode(), "application/json") for v in confused(tpl)]
    return out


def _send_variants(bed: Bed, target: str, variants, token: str, scrub: bool = True) -> dict:
    host, port = (("127.0.0.1", bed.ctl_port) if target == "ctl" else
                  ("127.0.0.1", bed.agent_port) if target == "agent" else bed.addr[target])
    seen: dict = {}
    for method, rule, body, ctype in variants:
        if target == "agent" and scrub:     # never naming a deployed node (see requests_to)
            for n in NAMES:
                body = body.replace(n.encode(), b"q" + n[1:].encode())
        code, text = send(host, port, method, rule, [("Host", f"{host}:{port}"), ("Content-Type", ctype),
                                                     (net.TOKEN_HEADER, token)], body)
        seen[code] = seen.get(code, 0) + 1
        assert code is not None and code < 500, f"HTTP {code} ({text.strip()[:300]}) to {method} {target}{rule} " \
                                                f"body {body[:300]!r}"
    return seen


def _restore_confs(bed: Bed, name: str) -> None:
    """Accepted variants of a conf replace it: give the node the fixture's confs again."""
    ip, port = bed.addr[name]
    data, structure = _confs({n: f"{a}:{p}" for n, (a, p) in bed.addr.items()})[name]
    for kind, conf in (("dataset", data), ("structure", structure)):
        net.call("POST", f"{ip}:{port}/conf/{kind}", json=conf, token=bed.token(name), timeout_s=60)


@pytest.mark.parametrize("target", ["ctl", "agent"])
def test_type_confusion_admin(bed, target):
    routes = bed.ctl_routes if target == "ctl" else bed.agent_routes
    variants = _variants(bed, target, routes, "zfa")
    assert variants
    seen = _send_variants(bed, target, variants, bed.admin)
    print(f"\n{target}: {len(variants)} variants, answers by status: {seen}")
    still_answering(bed)


def test_type_confusion_agent_links_of_a_deployed_node(bed):
    """The agent's /update/tc with zfa's real links, one wrong field at a time: the
    variants it refuses change nothing, those it takes change zfa's classes in place;
    then the testbed's links.json is applied again and every table is as before."""
    before = snapshot(bed)
    real = {"links": bed.tb.agent_links(bed.tb.links, ["zfa"])}
    variants = [("POST", "/update/tc", json.dumps(v).encode(), "application/json") for v in confused(real)]
    try:
        seen = _send_variants(bed, "agent", variants, bed.admin, scrub=False)
    finally:
        code, text = _admin(bed, "/update/tc?file=links.json")
        assert code == 200, (code, text)
    after = snapshot(bed)
    diff = {k: (before[k], after.get(k)) for k in before if k[0] in ("tc", "agent") and before[k] != after.get(k)}
    assert not diff, "\n".join(f"{k}:\n  before {a}\n  after  {b}" for k, (a, b) in diff.items())
    print(f"\nagent /update/tc on zfa: {len(variants)} variants, answers by status: {seen}")


def test_type_confusion_node_credential_on_the_controller(bed):
    """A node's heartbeat variants: its own entry may change, nothing else."""
    before = snapshot(bed)
    seen = _send_variants(bed, "ctl", _variants(bed, "ctl", bed.ctl_routes, "zgl"), bed.token("zgl"))
    req = Req("ctl", "POST", "/heartbeat", "", [], None, "node:zgl", bed.token("zgl"))
    changed = disallowed_changes(req, before, snapshot(bed))
    assert not changed, changed
    print(f"\nheartbeat variants, answers by status: {seen}")


@pytest.mark.parametrize("name", NAMES)
def test_type_confusion_node(bed, name):
    """Every conf, role route and weights metadata of one node, one wrong field at a
    time, with its own credential: no 5xx, and nothing changes on any other node."""
    routes = {r: m for r, m in bed.node_routes[name].items() if r not in DESTRUCTIVE_NODE}
    variants = _variants(bed, name, routes, name)
    assert variants
    before = snapshot(bed)
    try:
        seen = _send_variants(bed, name, variants, bed.token(name))
    finally:
        _restore_confs(bed, name)
    req = Req(name, "POST", "/conf/structure", "", [], None, f"node:{name}", bed.token(name))
    changed = disallowed_changes(req, before, snapshot(bed))
    assert not changed, changed
    print(f"\n{name}: {len(variants)} variants, answers by status: {seen}")
    still_answering(bed)

# Found by the fuzz tests, kept as fixed cases.
def _admin(bed: Bed, path: str) -> tuple[int | None, str]:
    return send("127.0.0.1", bed.ctl_port, "GET", path, [("Host", f"127.0.0.1:{bed.ctl_port}"),
                                                       (net.TOKEN_HEADER, bed.admin)], None)


def test_a_start_the_root_refuses_is_a_4xx_and_starts_nothing(bed):
    """zft (a trainer) has no start: the controller answered 500 (an uncaught
    RuntimeError) and kept the run marked started, so that zft could then finish it."""
    before = snapshot(bed)
    code, text = _admin(bed, "/start?root=zft")
    assert code == 422 and "zft" in text, (code, text)
    assert bed.manager.started_at is None and bed.manager.root is None
    req = Req("ctl", "GET", "/start", "?root=zft", [], None, "admin", bed.admin)
    assert not disallowed_changes(req, before, snapshot(bed), code)


def test_links_a_worker_refuses_are_a_4xx_and_change_nothing(bed):
    """A delay beyond a minute (the agent's netem limit) was taken by the controller and
    refused by the agent (once answered 502, as if the agent had failed); the controller
    now holds the same rule (dml_app/formats.py) and refuses it itself, naming the link."""
    links = _links()
    links["zfa"] = [dict(links["zfa"][0], delay="100000s")]
    (bed.tmp / "links-far.json").write_text(json.dumps(links))
    before = snapshot(bed)
    code, text = _admin(bed, "/update/tc?file=links-far.json")
    assert code == 400 and "zfa[0].delay: time '100000s' is more than 60s" in text, (code, text)
    req = Req("ctl", "GET", "/update/tc", "", [], None, "wrong", None)     # compare everything
    changed = disallowed_changes(req, before, snapshot(bed))
    assert set(changed) <= {("tmp", "links-far.json")}, changed
