"""Every call the controller makes to a worker's agent goes through here.

An `AgentClient` is one worker's agent (worker/agent.py) as the controller sees it: a
label ("emulator emu-1", "physical 10.0.0.5:3333"), the kind of nodes it runs
("emulated" or "physical"), its address, and one method per agent route the controller
uses. Two implementations:

* `HttpAgent`: an agent on another machine or port, called over HTTP with the admin token
  (net.call), each answer bounded (AGENT_ANSWER_LIMIT) and each call given a deadline;
* `LocalAgent`: the agent the controller runs itself (the embedded default), called in
  process through its own Flask app (no loopback connection, no dependence on its server
  being able to take one), with the same routes, checks, answers and deadlines.

Every method raises net.HttpError when the agent did not do what it was asked (`status`
None when it did not answer), whichever implementation it is.

`Agents` is the registry: every configured worker's client, and which nodes each
deployed, so callers ask for "the agent of node n1" instead of building addresses.

The calling helpers the controller uses for nodes as well (`fan_out`, `call_once`) are
here too.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from dml_app import net

AGENT_ANSWER_LIMIT = 16 * net.MiB   # an agent's JSON answer (/status of hundreds of nodes, /update/tc)
DEPLOY_TIMEOUT_S = 600.0            # building a worker's part (images, namespaces, links)
CALL_TIMEOUT_S = 120.0              # a change: links, a fault, stop, clear, reset
STATUS_TIMEOUT_S = 10.0             # reading a worker's /status
CONNECT_RETRIES = 5         # a call repeated only while its connection is refused (~2.5 s)
FANOUT = 32                 # calls in flight at once when the controller calls every node or worker
KINDS = ("emulated", "physical")


def fan_out(fn, items, limit: int = FANOUT) -> list:
    """[fn(item) for item in items], at most `limit` calls at once, in the items' order."""
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(min(limit, len(items))) as ex:
        return list(ex.map(fn, items))


def not_sent(e: net.HttpError) -> bool:
    """Whether a failed call cannot have reached its peer: the TCP connection was refused
    or timed out before it was made (requests' NewConnectionError, ConnectTimeout), so
    sending it again cannot apply it twice. A read timeout or a dropped connection may
    have delivered it."""
    return e.not_sent


def call_once(method: str, url: str, **kw):
    """net.call sent once; repeated (up to CONNECT_RETRIES, waits from 0.1 s to 1 s) only
    where it cannot have arrived (not_sent)."""
    for attempt in range(CONNECT_RETRIES + 1):
        try:
            return net.call(method, url, retries=0, **kw)
        except net.HttpError as e:
            if attempt == CONNECT_RETRIES or not not_sent(e):
                raise
        time.sleep(min(0.1 * 2 ** attempt, 1.0))


class AgentClient:
    """One worker's agent. Subclasses give `_call`; the routes are written once here."""

    def __init__(self, label: str, kind: str, address: str, token: str):
        if kind not in KINDS:
            raise ValueError(f"agent kind {kind!r} is not one of {', '.join(KINDS)}")
        self.label, self.kind, self.address, self.token = label, kind, address, token

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, {self.address!r})"

    def _call(self, method: str, route: str, body: Any = None, *, timeout_s: float,
              max_bytes: int | None, once: bool = False) -> Any:
        """The agent's parsed JSON answer to `method route` (body: a JSON document);
        net.HttpError otherwise. once: a call that is repeated only while it cannot have
        arrived (call_once)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- routes
    def deploy(self, body: dict) -> dict:
        """POST /<kind>/deploy: build this worker's nodes and links -> {"nodes": {name: {...}}}."""
        return self._call("POST", f"/{self.kind}/deploy", body, timeout_s=DEPLOY_TIMEOUT_S,
                          max_bytes=None, once=True)

    def status(self, timeout_s: float = STATUS_TIMEOUT_S) -> dict:
        """GET /status -> {"nodes": {name: {"state", "ready", "links", ...}}, ...}."""
        return self._call("GET", "/status", timeout_s=timeout_s, max_bytes=AGENT_ANSWER_LIMIT)

    def usage(self, timeout_s: float, max_bytes: int) -> Any:
        """GET /usage: cpu and memory of each node, the counters of each link."""
        return self._call("GET", "/usage", timeout_s=timeout_s, max_bytes=max_bytes)

    def update_tc(self, links: dict) -> dict:
        """POST /update/tc: replace the links of this worker's nodes ({src: [link]})."""
        return self._call("POST", "/update/tc", {"links": links}, timeout_s=CALL_TIMEOUT_S,
                          max_bytes=AGENT_ANSWER_LIMIT)

    def node_fault(self, node: str, action: str) -> dict:
        """POST /node/fault: kill, pause, resume or restart one node's app."""
        return self._call("POST", "/node/fault", {"node": node, "action": action},
                          timeout_s=CALL_TIMEOUT_S, max_bytes=AGENT_ANSWER_LIMIT)

    def link_fault(self, node: str, dest: str, action: str) -> dict:
        """POST /link/fault: take the link node -> dest down or up."""
        return self._call("POST", "/link/fault", {"node": node, "dest": dest, "action": action},
                          timeout_s=CALL_TIMEOUT_S, max_bytes=AGENT_ANSWER_LIMIT)

    def control(self, action: str) -> Any:
        """POST /<kind>/<action> with an empty object: "stop", "reset", and "clear"
        (emulated) or "clear/tc" (physical)."""
        return self._call("POST", f"/{self.kind}/{action}", {}, timeout_s=CALL_TIMEOUT_S,
                          max_bytes=AGENT_ANSWER_LIMIT)

    def reset(self) -> Any:
        """POST /<kind>/reset: remove every node and link of this kind it made."""
        return self.control("reset")


class HttpAgent(AgentClient):
    """An agent reached over HTTP at `address` (host:port) with the admin token."""

    def _call(self, method, route, body=None, *, timeout_s, max_bytes, once=False):
        send = call_once if once else net.call
        kw = {} if body is None else {"json": body}
        r = send(method, f"{self.address}{route}", token=self.token, timeout_s=timeout_s,
                 max_bytes=max_bytes, **kw)
        return net.parse_json_body(r.content, want_object=False, what=f"{self.label} {route}")


class LocalAgent(AgentClient):
    """The agent this controller runs, called in process through a Flask app of its
    routes (worker.agent.make_app; `app` a function giving it, built once by the
    caller), so every route answers as it does over HTTP (the token and body checks,
    4xx for a bad request, 422 when a node could not be made); `address` is where its
    server listens, for messages. A call still has its deadline: past it the caller gets
    net.HttpError as from HttpAgent while the agent finishes the work, as a server would.
    An exception the agent did not turn into an answer comes back as HTTP 500 with its
    type and message."""

    def __init__(self, label: str, kind: str, address: str, token: str, app: Callable[[], Any]):
        super().__init__(label, kind, address, token)
        self._app = app

    def _call(self, method, route, body=None, *, timeout_s, max_bytes, once=False):
        url = f"http://{self.address}{route}"
        done: dict = {}

        def run():
            try:
                done["answer"] = self._app().test_client(use_cookies=False).open(
                    route, method=method, json=body, headers={net.TOKEN_HEADER: self.token})
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                done["error"] = e
        t = threading.Thread(target=run, daemon=True, name=f"agent-call {route}")
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            raise net.HttpError(method, url, None, f"no answer within {timeout_s:g} s, the deadline of the "
                                                   f"whole call (in process)", sent=True)
        if "error" in done:
            raise net.HttpError(method, url, 500, f"{type(done['error']).__name__}: {done['error']}")
        r = done["answer"]
        data = r.get_data()
        limit = net.ANSWER_LIMIT if max_bytes is None else int(max_bytes)
        if len(data) > limit:
            raise net.HttpError(method, url, r.status_code, f"answer of {len(data)} bytes is over the limit of "
                                                            f"{net.human_bytes(limit)} ({limit} bytes)")
        if r.status_code >= 300:
            raise net.HttpError(method, url, r.status_code, data.decode(errors="replace").strip()[:500])
        return net.parse_json_body(data, want_object=False, what=f"{self.label} {route}")


class Agents:
    """The registry: every worker's client (`workers`: a function giving them as they are
    configured now) and the nodes each one deployed, in the order they were deployed."""

    def __init__(self, workers: Callable[[], list[AgentClient]]):
        self._workers = workers
        self._lock = threading.Lock()
        self._deployed: dict[str, tuple[AgentClient, dict]] = {}    # label -> (client, its deploy answer)

    def workers(self, kind: str | None = None) -> list[AgentClient]:
        """Every configured worker (of `kind`), deployed or not, emulators first."""
        return [w for w in self._workers() if kind is None or w.kind == kind]

    def record(self, client: AgentClient, answer: dict) -> None:
        """`client` deployed: its answer {"nodes": {name: ...}} says which nodes it has."""
        with self._lock:
            self._deployed[client.label] = (client, answer)

    def deployed(self, kind: str | None = None) -> list[AgentClient]:
        """The workers that have nodes deployed (of `kind`)."""
        with self._lock:
            return [c for c, _ in self._deployed.values() if kind is None or c.kind == kind]

    def nodes_of(self, client: AgentClient) -> list[str]:
        """The names of the nodes `client` deployed ([] when it has none)."""
        with self._lock:
            got = self._deployed.get(client.label)
        return list(got[1].get("nodes", {})) if got else []

    def answers(self) -> dict[str, dict]:
        """{label: {"addr", "kind", "answer"}} of every deployed worker (a copy)."""
        with self._lock:
            return {label: {"addr": c.address, "kind": c.kind, "answer": a}
                    for label, (c, a) in self._deployed.items()}

    def of(self, node: str) -> AgentClient | None:
        """The agent that deployed node `node`, None when none did."""
        with self._lock:
            for c, answer in self._deployed.values():
                if node in answer.get("nodes", {}):
                    return c
        return None

    def forget(self, kind: str | None = None) -> None:
        """Its workers (of `kind`) were reset: they have no nodes any more."""
        with self._lock:
            for label in [l for l, (c, _) in self._deployed.items() if kind is None or c.kind == kind]:
                del self._deployed[label]
