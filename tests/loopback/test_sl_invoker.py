"""The invoker (controller/invoker.py) and the controller's data bundles (GET /data/<sha256>).

* The data side: a controller on loopback serves content-addressed bundles of train
  parts (share.publish_parts) to node credentials, and nothing else to them.
* The invoker against small action servers on loopback (real HTTP, OpenWhisk's action
  protocol; what each run does is in its params): warm containers first, at most N at
  once, one activation per container, OpenWhisk's status names, action errors not
  retried, a container that does not answer lost and its activation retried elsewhere,
  a lost container cold again once its node answers /hi.
* The invoker against real action nodes (netns nodes through the embedded agent:
  n1 ps_server.py in serverless mode, n2..n4 sl_action.py): cold then warm, the
  concurrency limit, the deadline, and a node killed (SIGKILL to its cgroup) during its
  /run retried on another node.
"""
from __future__ import annotations

import hashlib
import re
import threading
import time

import pytest


from controller import share
from controller.invoker import Invoker
from dml_app import net
from tests.support.procs import free_port, wait_until
from tests.security.test_access import served, status_code  # noqa: F401  (served: a fixture)

ADMIN = "invoker-admin-token-0123456789"
HEX32 = re.compile(r"^[0-9a-f]{32}$")


# ----------------------------------------------------------------------------- data bundles

@pytest.fixture(scope="module")
def dataset(module_scratch):
    from dml_tool import splitter

    out = module_scratch / "dataset"
    splitter.split(source="mnist-subset", out=str(out), train_parts=8, test_parts=2, partition="iid", seed=2)
    return out


def test_data_bundles_are_content_addressed_and_a_node_credential_opens_only_them(served, dataset):
    m = served()
    base = f"http://127.0.0.1:{m.server.port}"
    paths = share.publish_parts(m.data_store, dataset, [(1, 2), (3, 2), (1, 2)])
    assert paths[0] == paths[2] != paths[1] and all(re.fullmatch(r"/data/[0-9a-f]{64}", p) for p in paths)
    node = m.tb.node_token("c2")
    r = net.call("GET", base + paths[1], token=node, timeout_s=10)
    assert hashlib.sha256(r.content).hexdigest() == paths[1].rsplit("/", 1)[1]
    from dml_app import node_data

    x, y, meta = node_data.unpack_parts(r.content)
    assert len(x) == len(y) == int(meta["samples"]) > 0 and int(meta["train_start_index"]) == 3
    assert m.data_store.served[paths[1].rsplit("/", 1)[1]] == 1
    # Any node reads any bundle; an unknown one is 404; no credential is 401.
    assert status_code(base + paths[0], token=m.tb.node_token("c3"))[0] == 200
    assert status_code(base + "/data/" + "0" * 64, token=node)[0] == 404
    assert status_code(base + paths[0], token="node.c2.wrong")[0] == 401
    # The node credential opens /data/<64 hex> and nothing else near it.
    digest = paths[0].rsplit("/", 1)[1]
    m.tb.share_store.archives[digest] = b"an archive of the shared folders"
    for path in ["/data/" + digest.upper(), "/data/" + digest + "/", "/data/" + digest + "/x", "/data/",
                 "/data", "/data/" + digest[:63], "/share/" + digest, "/status", "/data/../share/" + digest]:
        code, msg = status_code(base + path, token=node)
        assert code in (403, 404) and (code == 404 or "node credential" in msg), (path, code, msg)
        assert code == 403 or path.startswith("/data/../"), (path, code)   # the client resolves ".."
    # The store is bounded: past its limit nothing is added and it says why.
    small = share.DataStore(max_bytes=10, max_bundles=2)
    small.add(b"12345")
    assert small.add(b"12345") == hashlib.sha256(b"12345").hexdigest()   # the same bytes: free
    with pytest.raises(ValueError, match="over its limit"):
        small.add(b"1234567")
    small.add(b"x")
    with pytest.raises(ValueError, match="2 bundles"):
        small.add(b"y")


# ----------------------------------------------------------------------------- loopback actions

class Actions:
    """Action servers on loopback speaking OpenWhisk's protocol (/init once, /run one at
    a time, /hi for the prober), each counting what it saw; a run's params say what it
    does: {"sleep": s, "sleep_on": {name: s}, "error": msg, "deadline": True, "garbage": True}."""

    def __init__(self, names, token_of, *, init_fail=()):
        from flask import Flask, jsonify, request

        self.lock = threading.Lock()
        self.running, self.most = 0, 0
        self.inits = {n: 0 for n in names}
        self.runs = {n: [] for n in names}
        self.unregistered: list[str] = []
        self.servers = {}
        self.states = {}
        for name in names:
            app = Flask(f"action-{name}")
            net.require_token(app, token_of(name))
            state = self.states[name] = {"initialized": False, "busy": False}

            def init(name=name, state=state):
                if name in init_fail:
                    return jsonify(error="main must be main or train"), 502
                if state["initialized"]:
                    return jsonify(error="Cannot initialize the action more than once."), 403
                state["initialized"] = True
                with self.lock:
                    self.inits[name] += 1
                return jsonify(ok=True)

            def run(name=name, state=state):
                body = request.get_json()
                if not state["initialized"]:
                    return jsonify(error="The action has not been initialized: POST /init first."), 502
                with self.lock:
                    if state["busy"]:
                        return jsonify(error="busy"), 409
                    state["busy"] = True
                    self.running += 1
                    self.most = max(self.most, self.running)
                    self.runs[name].append(body)
                try:
                    v = body["value"]
                    time.sleep(v.get("sleep_on", {}).get(name, v.get("sleep", 0)))
                    if v.get("error"):
                        return jsonify(error=v["error"]), 502
                    if v.get("deadline"):
                        return jsonify(error="deadline exceeded after 2 batches" + " ." * v.get("pad", 0)), 502
                    if v.get("garbage"):
                        return "not json", 200
                    return jsonify(node=name, worker_id=body["activation_id"],
                                   timings={"train_s": v.get("sleep", 0)},
                                   bytes={"data_down": 10, "params_down": 20, "gradients_up": 30})
                finally:
                    with self.lock:
                        self.running -= 1
                        state["busy"] = False

            def unregister():
                self.unregistered.append(request.get_json()["worker_id"])
                return jsonify(unregistered=True)

            app.add_url_rule("/init", view_func=init, methods=["POST"])
            app.add_url_rule("/run", view_func=run, methods=["POST"])
            app.add_url_rule("/hi", view_func=lambda name=name: f"{name}\n", methods=["GET"])
            app.add_url_rule("/unregisterWorker", view_func=unregister, methods=["POST"])
            self.servers[name] = net.Server(app, "127.0.0.1", 0, threads=4).start()

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.servers[name].port}"

    def close(self):
        for s in self.servers.values():
            s.close()


@pytest.fixture
def actions():
    made: list[Actions] = []

    def make(names, **kw):
        a = Actions(names, lambda n: net.node_token(ADMIN, n), **kw)
        made.append(a)
        return a
    try:
        yield make
    finally:
        for a in made:
            a.close()


def invoker_for(pool: dict, said: list, **kw) -> Invoker:
    kw.setdefault("deadline_s", 10)
    return Invoker(pool, auth=lambda n: net.node_token(ADMIN, n),
                   api_key=lambda n: net.client_token(ADMIN, "n1", n), say=said.append, **kw)


def most_at_once(records) -> int:
    """The largest number of records whose [start, end] overlap."""
    edges = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records],
                   key=lambda e: (e[0], e[1]))
    now = most = 0
    for _, d in edges:
        now += d
        most = max(most, now)
    return most


@pytest.mark.timeout(60)
def test_warm_containers_first_one_activation_each_at_most_n_at_once(actions):
    a = actions(["c1", "c2", "c3"])
    said: list[str] = []
    inv = invoker_for({n: a.address(n) for n in ("c1", "c2", "c3")}, said, concurrency=2)
    try:
        recs = inv.invoke_all([{"sleep": 0.4}] * 6)
    finally:
        inv.close(timeout_s=10)
    assert [r["status"] for r in recs] == ["success"] * 6, recs
    assert a.most == 2 and most_at_once(inv.records()) <= 2       # in parallel, never more than 2
    # Warm first: the two containers that ran stay in use, the third is never initialised.
    assert sum(r["cold"] for r in recs) == 2 and sum(not r["cold"] for r in recs) == 4
    assert sorted(a.inits.values()) == [0, 1, 1] and a.inits["c3"] == 0 and a.runs["c3"] == []
    assert all(r["init_s"] is not None for r in recs if r["cold"]) and \
        all(r["init_s"] is None for r in recs if not r["cold"])
    ids = [r["activation_id"] for r in recs]
    assert len(set(ids)) == 6 and all(HEX32.match(i) for i in ids)
    body = a.runs[recs[0]["node"]][0]
    assert body["activation_id"] in ids and body["api_key"] == net.client_token(ADMIN, "n1", recs[0]["node"])
    assert abs(body["deadline"] / 1000 - (time.time() + 10)) < 15 and body["value"] == {"sleep": 0.4}
    s = inv.summary()
    assert (s["activations"], s["cold"], s["warm"], s["errors"], s["retries"]) == (6, 2, 4, 0, 0)
    assert s["bytes"] == {"data_down": 60, "params_down": 120, "gradients_up": 180}
    assert s["cold_start_s"]["n"] == 2 and s["warm_start_s"]["n"] == 4
    # One line per activation start and end, while it happens.
    assert sum(" starts on " in m for m in said) == 6 and sum(": success in " in m for m in said) == 6
    with pytest.raises(RuntimeError, match="closed"):
        inv.invoke({"sleep": 0})


@pytest.mark.timeout(60)
def test_statuses_as_openwhisk_and_action_errors_are_not_retried(actions):
    a = actions(["c1", "c2", "bad"], init_fail=("bad",))
    said: list[str] = []
    inv = invoker_for({"c1": a.address("c1"), "c2": a.address("c2")}, said, concurrency=1, retries=2)
    try:
        assert inv.invoke({"error": "boom"})["status"] == "application error"
        rec = inv.invoke({"deadline": True})
        assert rec["status"] == "timeout" and rec["error"].startswith("deadline exceeded")
        rec = inv.invoke({"deadline": True, "pad": 400})     # an answer longer than HttpError keeps
        assert rec["status"] == "timeout" and rec["error"].startswith("deadline exceeded"), rec
        rec = inv.invoke({"garbage": True})
        assert rec["status"] == "action developer error" and "not a JSON object" in rec["error"]
        assert len(inv.records()) == 4 and all(r["attempt"] == 1 and r["retry_of"] is None for r in inv.records())
        assert sum(len(v) for v in a.runs.values()) == 4           # none ran twice
    finally:
        inv.close(timeout_s=10)
    inv = invoker_for({"bad": a.address("bad")}, said, concurrency=1)
    try:
        rec = inv.invoke({"sleep": 0})
        assert rec["status"] == "action developer error" and rec["error"].startswith("/init: HTTP 502")
        assert rec["cold"] and a.runs["bad"] == [] and inv.containers() == {"bad": "cold"}
    finally:
        inv.close(timeout_s=10)


@pytest.mark.timeout(60)
def test_close_waits_for_running_activations_and_starts_no_queued_one(actions):
    a = actions(["c1"])
    said: list[str] = []
    inv = invoker_for({"c1": a.address("c1")}, said, concurrency=1)
    out: list[dict] = []
    threads = [threading.Thread(target=lambda: out.append(inv.invoke({"sleep": 1}))) for _ in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: inv.containers() == {"c1": "busy"}, 10, "one activation to run")
    inv.close(timeout_s=10)
    for t in threads:
        t.join(10)
    assert sorted(r["status"] for r in out) == ["success", "timeout"], out
    queued = next(r for r in out if r["status"] == "timeout")
    assert queued["node"] is None and "closed before" in queued["error"] and len(a.runs["c1"]) == 1


@pytest.mark.timeout(60)
def test_a_warm_container_whose_app_restarted_unseen_is_cold_again(actions):
    a = actions(["c1", "c2"])
    said: list[str] = []
    inv = invoker_for({"c1": a.address("c1"), "c2": a.address("c2")}, said, concurrency=1)
    try:
        assert inv.invoke({"sleep": 0})["node"] == "c1"
        a.states["c1"]["initialized"] = False       # its app restarted: it refuses /run before /init
        rec = inv.invoke({"sleep": 0})
        first = inv.records()[1]
        assert first["status"] == "lost" and "restarted since its /init" in first["error"]
        assert rec["status"] == "success" and rec["node"] == "c2" and rec["retry_of"] == first["activation_id"]
        assert inv.containers() == {"c1": "cold", "c2": "warm"}
        assert inv.invoke({"sleep": 0})["node"] == "c2"                       # warm first
        assert len(a.runs["c1"]) == 1 and len(a.runs["c2"]) == 2         # the refused /run ran nothing
    finally:
        inv.close(timeout_s=10)


@pytest.mark.timeout(60)
def test_a_container_that_does_not_answer_is_lost_and_its_activation_retried_elsewhere(actions):
    a = actions(["c1", "hang", "srv"])
    dead = free_port()                       # nothing listens there: connection refused
    hi = {"up": False}
    from flask import Flask
    app = Flask("dead-node-runtime")
    app.add_url_rule("/hi", view_func=lambda: ("n\n", 200) if hi["up"] else ("down\n", 503))
    runtime = net.Server(app, "127.0.0.1", 0, threads=2).start()
    said: list[str] = []
    srv_token = net.node_token(ADMIN, "srv")
    inv = invoker_for({"dead": f"127.0.0.1:{dead}", "c1": a.address("c1")}, said, concurrency=2,
                      server=a.address("srv"), server_token=srv_token,
                      runtime={"dead": f"127.0.0.1:{runtime.port}"})
    try:
        rec = inv.invoke({"sleep": 0.1})
        first, last = inv.records()
        assert first["status"] == "lost" and first["node"] == "dead" and "no answer to /init" in first["error"]
        assert last == rec and rec["status"] == "success" and rec["node"] == "c1"
        assert rec["retry_of"] == first["activation_id"] and rec["attempt"] == 2
        assert a.unregistered == [first["activation_id"]]          # with the server's own credential
        assert inv.containers()["dead"] == "lost"
        assert any("dead's container is lost" in m for m in said)
        hi["up"] = True                                             # its node answers /hi again
        wait_until(lambda: inv.containers()["dead"] == "cold", 10, "the lost container to be cold again")
        s = inv.summary()
        assert (s["activations"], s["lost"], s["retries"], s["errors"]) == (2, 1, 1, 1)
    finally:
        inv.close(timeout_s=10)
        runtime.close()
    # No answer by the deadline + grace: lost too, retried on the other container.
    inv = invoker_for({"hang": a.address("hang"), "c1": a.address("c1")}, said, concurrency=2, deadline_s=1,
                      grace_s=0.5, queue_timeout_s=2, runtime={"hang": f"127.0.0.1:{dead}"})
    try:
        rec = inv.invoke({"sleep": 0.1, "sleep_on": {"hang": 2.5}})
        first = inv.records()[0]
        assert first["status"] == "lost" and first["node"] == "hang" and "deadline + 0.5 s grace" in first["error"]
        assert first["run_s"] > 1.4          # given up only once the deadline and the grace had passed
        assert rec["status"] == "success" and rec["node"] == "c1" and rec["retry_of"] == first["activation_id"]
        # Bounded: the retry (retries=1) hangs too; then no container is left and it says so
        # after its queue timeout, not after the action's 2.5 s.
        rec = inv.invoke({"sleep": 2.5})
        assert rec["status"] == "timeout" and rec["node"] is None and rec["attempt"] == 2
        assert "no action container free within 2 s" in rec["error"]
        assert [r["status"] for r in inv.records()] == ["lost", "success", "lost", "timeout"]
    finally:
        inv.close(timeout_s=10)


# ----------------------------------------------------------------------------- real action nodes

PORT, SUBNET = 3412, "10.229.12.0/24"     # the controller; its embedded agent takes PORT + 1
SERVER, ACTIONS = "i1", ["i2", "i3", "i4"]
ACTION_PORT = 8080


@pytest.fixture(scope="module")
def real(module_scratch):
    """(testbed, manager, server "ip:port", {part: dataset_url}): netns nodes deployed by
    the embedded agent, i1 ps_server.py in serverless mode (started, far from its last
    step), i2..i4 sl_action.py; the data parts published on the controller."""
    import json

    from tests.support import agents as ah
    from tests.support import workflow as nw
    from controller.manager import Manager

    ah.need_root()
    tmp = module_scratch / "real"
    tmp.mkdir()
    roles = {SERVER: "ps_server.py", **{a: "sl_action.py" for a in ACTIONS}}
    with nw.netns_testbed(tmp, Manager, roles, {}, port=PORT, subnet=SUBNET) as (tb, m):
        m.conf_dir.mkdir(parents=True, exist_ok=True)
        confs = {f"{SERVER}_structure": {"role": "server", "serverless": True, "mode": "async", "actions": ACTIONS,
                                         "steps": 100000, "lr": 0.05, "max_staleness": 8, "eval_every": 100000,
                                         "seed": 0},
                 f"{SERVER}_dataset": {"test_len": 1, "test_start_index": 1, "batch_size": 64},
                 **{f"{a}_structure": {"role": "action"} for a in ACTIONS}}
        for name, conf in confs.items():
            (m.conf_dir / f"{name}.conf").write_text(json.dumps(conf))
        m.push_conf("structure")
        m.push_conf("dataset")
        m.start_training(SERVER)
        n1 = tb.all_nodes()[SERVER]
        emu = n1.emulator
        ctl = f"{emu.gateway}:{tb.host_port}" if emu.agent_port is None else f"{tb.ip}:{tb.host_port}"
        paths = share.publish_parts(m.data_store, tmp / "dataset", [(1, 1), (2, 10)])
        bed = (tb, m, f"{n1.ip}:{n1.port}", {"small": f"http://{ctl}{paths[0]}", "big": f"http://{ctl}{paths[1]}"})

        def started() -> bool:          # /start answers at once; the model (version 0) comes next
            try:
                return server_state(bed)["version"] == 0
            except net.HttpError as e:
                if e.status != 409:
                    raise
                return False
        wait_until(started, 60, "the server's model at version 0")
        yield bed


def real_invoker(real, said: list, nodes=ACTIONS, **kw) -> Invoker:
    tb, m, server, _ = real
    kw.setdefault("deadline_s", 60)
    nodes_ = tb.all_nodes()
    return Invoker({n: f"{nodes_[n].ip}:{ACTION_PORT}" for n in nodes}, auth=tb.node_token,
                   api_key=lambda n: net.client_token(tb.token, SERVER, n), say=said.append,
                   server=server, server_token=tb.node_token(SERVER),
                   runtime={n: f"{nodes_[n].ip}:{nodes_[n].port}" for n in nodes}, **kw)


def params(real, part: str = "small", **kw) -> dict:
    _, _, server, urls = real
    return {"batch_sz_train": 32, "epoch_n": 1, "update_intv": 1, "apihost": server, "dataset_url": urls[part],
            "device": "cpu", "lr": 0.05, **kw}


def server_state(real) -> dict:
    tb, _, server, _ = real
    return net.get_json(f"http://{server}/getVersion", token=tb.node_token(SERVER), timeout_s=10)


@pytest.mark.root
@pytest.mark.timeout(180)
def test_real_nodes_cold_then_warm_at_most_n_at_once(real):
    said: list[str] = []
    v0 = server_state(real)["version"]
    inv = real_invoker(real, said, concurrency=2)
    try:
        recs = inv.invoke_all([params(real, "big", update_intv=4)] * 4)     # ~1 s each: they overlap
    finally:
        inv.close(timeout_s=60)
    assert [r["status"] for r in recs] == ["success"] * 4, [(r["status"], r["error"]) for r in recs]
    assert most_at_once(inv.records()) == 2                # two at once, never three
    by_node: dict[str, list] = {}
    for r in sorted(inv.records(), key=lambda r: r["start"]):
        by_node.setdefault(r["node"], []).append(r)
    assert len(by_node) == 2 and all(len(v) == 2 for v in by_node.values()), by_node.keys()
    assert inv.containers()[next(n for n in ACTIONS if n not in by_node)] == "cold"   # warm ones first
    for node, (cold, warm) in by_node.items():
        assert cold["cold"] and cold["init_s"] is not None and not cold["result"]["cached_data"]
        assert not warm["cold"] and warm["init_s"] is None and warm["result"]["cached_data"]
        assert cold["result"]["node"] == node and cold["result"]["worker_id"] == cold["activation_id"]
        assert warm["start_s"] < cold["start_s"], (node, cold["start_s"], warm["start_s"])
        assert warm["result"]["bytes"]["data_down"] == 0 < cold["result"]["bytes"]["data_down"]
    s = inv.summary()
    assert (s["cold"], s["warm"], s["errors"]) == (2, 2, 0)
    assert s["warm_start_s"]["mean"] < s["cold_start_s"]["mean"]
    st = server_state(real)
    assert st["version"] >= v0 + sum(r["result"]["applied"] for r in recs) > v0 and st["registered"] == 0
    print(f"real nodes: cold start {s['cold_start_s']}, warm start {s['warm_start_s']}, init {s['init_s']}")


@pytest.mark.root
@pytest.mark.timeout(120)
def test_real_nodes_deadline(real):
    said: list[str] = []
    inv = real_invoker(real, said, nodes=ACTIONS[:1], concurrency=1, deadline_s=4, grace_s=5)
    try:
        rec = inv.invoke(params(real, "big", epoch_n=100))
    finally:
        inv.close(timeout_s=30)
    # ended by the deadline (the node said so), not by the action's 100 epochs; not retried
    assert rec["status"] == "timeout" and "deadline exceeded" in rec["error"], rec
    assert len(inv.records()) == 1
    assert inv.containers() == {ACTIONS[0]: "warm"} and server_state(real)["registered"] == 0


@pytest.mark.root
@pytest.mark.timeout(180)
def test_real_node_killed_mid_invocation_is_retried_on_another_node(real):
    tb, m, _, _ = real
    said: list[str] = []
    inv = real_invoker(real, said, nodes=ACTIONS[1:], concurrency=2)
    out: dict = {}
    try:
        t = threading.Thread(target=lambda: out.update(rec=inv.invoke(params(real, "big", epoch_n=2))))
        t.start()
        # Mid-run: the activation has registered its worker id on the server.
        wait_until(lambda: server_state(real)["registered"] == 1, 60, "the activation to register on the server")
        victim = next(n for n, s in inv.containers().items() if s == "busy")
        killed = m.node_fault(victim, "kill")
        assert killed["ok"], killed
        t.join(150)
        assert not t.is_alive()
        first, rec = inv.records()
        assert first["status"] == "lost" and first["node"] == victim, first
        assert rec == out["rec"] and rec["status"] == "success" and rec["node"] != victim, rec
        assert rec["retry_of"] == first["activation_id"] and rec["attempt"] == 2 and rec["cold"]
        assert rec["activation_id"] != first["activation_id"] and HEX32.match(rec["activation_id"])
        assert server_state(real)["registered"] == 0        # the lost one's worker id unregistered
        assert any(f"{victim}'s container is lost" in s for s in said)
        # Back (the agent restarts its app): cold again, so the next activation there starts with /init.
        assert m.node_fault(victim, "restart")["ok"]
        wait_until(lambda: inv.containers()[victim] == "cold", 60, f"{victim} to be cold again")
        again = inv.invoke_all([params(real)] * 2)
        assert [r["status"] for r in again] == ["success"] * 2, again
        assert {(r["node"], r["cold"]) for r in again} == {(victim, True), (rec["node"], False)}
    finally:
        inv.close(timeout_s=60)
    print(f"killed {victim}: lost after {first['run_s']} s, retried on {rec['node']} in {rec['run_s']} s")


@pytest.mark.root
@pytest.mark.timeout(180)
def test_real_node_frozen_mid_invocation_is_given_up_at_the_deadline_plus_grace(real):
    tb, m, _, _ = real
    said: list[str] = []
    # deadline 10 s: the retry (a cold start, 2 epochs) must fit in it on a loaded machine too
    inv = real_invoker(real, said, nodes=ACTIONS[1:], concurrency=2, deadline_s=10, grace_s=1)
    out: dict = {}
    victim = None
    try:
        t = threading.Thread(target=lambda: out.update(rec=inv.invoke(params(real, "big", epoch_n=2))))
        t.start()
        wait_until(lambda: server_state(real)["registered"] == 1, 60, "the activation to register on the server")
        victim = next(n for n, s in inv.containers().items() if s == "busy")
        assert m.node_fault(victim, "pause")["ok"]              # SIGSTOP: no answer, no refusal
        t.join(150)
        assert not t.is_alive()
        first, rec = inv.records()[:2]
        assert first["status"] == "lost" and first["node"] == victim and "deadline + 1 s grace" in first["error"]
        assert first["run_s"] > 10.0, first["run_s"]       # given up once the deadline had passed
        assert rec == out["rec"] and rec["status"] == "success" and rec["node"] != victim
        assert rec["retry_of"] == first["activation_id"]
        # Thawed: its app kept its /init; once it answers /hi it is taken again (cold).
        assert m.node_fault(victim, "resume")["ok"]
        victim_back = victim
        victim = None
        wait_until(lambda: inv.containers()[victim_back] == "cold", 60, f"{victim_back} to be cold again")
        again = inv.invoke_all([params(real)] * 2)
        assert [r["status"] for r in again] == ["success"] * 2, again
    finally:
        if victim is not None:
            m.node_fault(victim, "resume")
        inv.close(timeout_s=60)
    print(f"froze {first['node']}: given up after {first['run_s']} s, retried on {rec['node']} in {rec['run_s']} s")
