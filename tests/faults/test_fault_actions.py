"""Fault actions for real: node kill / pause / resume / restart and link
down / up / rate, through a real agent's /node/fault and /link/fault, and through the
controller's Manager.node_fault / link_fault / link_rate and its /fault/* routes.

Real namespaces and processes: SIGKILL to a node's cgroup, the cgroup freezer (docker:
pause/unpause), links measured with iperf3 and the HTB class byte counters. Every wait
is a readiness check with a deadline; every test leaves nothing (ah.assert_clean).
"""
import os
import time
import urllib.error
import urllib.request
from pathlib import Path


import pytest

from tests.support import agents as ah
from tests.support import containers as dt
from dml_app import net
from worker import tc, units
from worker.cgroups import Cgroup

pytestmark = [ah.need_root()]

APP_PORT = 4456
HTTP_APP = ["python3", "-m", "http.server", str(APP_PORT), "--bind", "0.0.0.0"]
DEADLINE_S = 60


# ----------------------------------------------------------------------------- helpers

def until(what: str, fn, timeout_s: float = DEADLINE_S):
    """fn() until it returns something true (returned), or fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.1)


def status(agent) -> dict:
    return agent.get("/status")["nodes"]


def answers(ip: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether an HTTP app at ip:port answers a GET within timeout_s (a frozen app accepts
    the connection in the kernel and never answers)."""
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def env_of(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode(errors="replace").split("=", 1) for x in raw if b"=" in x)


def fault(agent, route: str, body: dict, status_: int = 200):
    r = agent.raw("POST", route, json=body)
    assert r.status_code == status_, (route, body, r.status_code, r.text)
    return r.json()


# ----------------------------------------------------------------------------- agent: nodes

@pytest.fixture
def http3(agent):
    dep = ah.plan(3, cmd=HTTP_APP, port=APP_PORT, ram_mb=96)
    with ah.deployed(agent, dep):
        until("apps ready", lambda: all(s["ready"] for s in status(agent).values() if s))
        yield dep


def test_bad_fault_requests_are_refused(agent, http3):
    a = http3.names[0]
    for body, code, word in [({"node": a}, 400, "action"),
                             ({"node": a, "action": "explode"}, 400, "action"),
                             ({"node": 7, "action": "kill"}, 400, "node"),
                             ({"node": "../x", "action": "kill"}, 400, "node"),
                             ({"node": a, "action": "kill", "x": 1}, 400, "unknown key"),
                             ({"node": "nobody", "action": "kill"}, 404, "nobody")]:
        r = agent.raw("POST", "/node/fault", json=body)
        assert r.status_code == code and word in r.json()["error"], (body, r.status_code, r.text)
    for body, code, word in [({"node": a, "dest": "nobody", "action": "down"}, 404, "no link"),
                             ({"node": a, "dest": http3.names[1], "action": "sideways"}, 400, "action"),
                             ({"node": "nobody", "dest": a, "action": "down"}, 404, "nobody")]:
        r = agent.raw("POST", "/link/fault", json=body)
        assert r.status_code == code and word in r.json()["error"], (body, r.status_code, r.text)
    # the admin token first, as every route
    r = agent.raw("POST", "/node/fault", token=None, json={"node": a, "action": "kill"})
    assert r.status_code in (401, 403)
    assert all(s["state"] == "running" for s in status(agent).values())


def test_kill_pause_resume_restart_netns(agent, http3):
    a, b, c = http3.names
    ip = {n: http3.ip(n) for n in http3.names}
    pids_b = Cgroup(b).pids()
    pids_c = Cgroup(c).pids()
    assert pids_b and pids_c

    # kill: a's app is gone (SIGKILL, no handler), /status says exited; b and c untouched
    before = Cgroup(a).pids()
    old_env = env_of(min(before))
    assert fault(agent, "/node/fault", {"node": a, "action": "kill"})["state"] == "exited"
    assert not Cgroup(a).pids()
    assert all(ah.proc_status(p) is None or ah.proc_status(p)["State"].startswith("Z") for p in before)
    st = status(agent)
    assert (st[a]["state"], st[a]["ready"]) == ("exited", False)
    assert all(st[n]["state"] == "running" and st[n]["ready"] for n in (b, c))
    assert Cgroup(b).pids() == pids_b and Cgroup(c).pids() == pids_c
    assert not answers(ip[a], APP_PORT) and answers(ip[b], APP_PORT)

    # restart: a new process answers on the same ip:port with the same credentials
    assert fault(agent, "/node/fault", {"node": a, "action": "restart"})["state"] == "running"
    until("restarted app ready", lambda: status(agent)[a]["ready"])
    assert answers(ip[a], APP_PORT)
    new = Cgroup(a).pids()
    assert new and not (new & before)
    new_env = env_of(min(new))
    for k in (net.TOKEN_ENV, net.PEER_TOKEN_ENV):
        assert new_env[k] == old_env[k] == (net.node_token(agent.token, a) if k == net.TOKEN_ENV
                                            else net.peer_token(agent.token))

    # pause: b's processes are frozen (the freezer says so, /proc too) and b does not answer
    assert fault(agent, "/node/fault", {"node": b, "action": "pause"})["state"] == "paused"
    cg = Cgroup(b)
    assert cg.frozen()
    states = {p: ah.proc_status(p)["State"] for p in cg.pids()}
    assert states and all(s[0] in "DT" for s in states.values()), states
    assert not answers(ip[b], APP_PORT, timeout_s=1.0)
    assert status(agent)[b]["state"] == "paused" and not status(agent)[b]["ready"]
    assert answers(ip[c], APP_PORT)
    # pausing twice or resuming a running node is refused, naming why
    r = agent.raw("POST", "/node/fault", json={"node": c, "action": "resume"})
    assert r.status_code == 422 and "not paused" in r.json()["error"]

    # resume: it answers again, the same processes
    assert fault(agent, "/node/fault", {"node": b, "action": "resume"})["state"] == "running"
    assert not cg.frozen() and cg.pids() == pids_b
    assert answers(ip[b], APP_PORT)
    assert status(agent)[b]["ready"]

    # a paused node can be killed (thawed first: a v1-frozen task ignores SIGKILL) and restarted
    fault(agent, "/node/fault", {"node": c, "action": "pause"})
    assert fault(agent, "/node/fault", {"node": c, "action": "kill"})["state"] == "exited"
    assert not Cgroup(c).pids() and not Cgroup(c).frozen()
    r = agent.raw("POST", "/node/fault", json={"node": c, "action": "pause"})
    assert r.status_code == 422 and "exited" in r.json()["error"]
    assert fault(agent, "/node/fault", {"node": c, "action": "restart"})["state"] == "running"
    until("c ready after restart", lambda: status(agent)[c]["ready"])

    # a paused node is still removed by the reset (thawed first): ah.deployed checks it
    fault(agent, "/node/fault", {"node": a, "action": "pause"})


def test_freezer_files_on_either_layout(tmp_path, monkeypatch):
    """v1: the freezer hierarchy joins a node's groups where mounted (its cgroup.procs too,
    so the launcher puts the app there), FROZEN/THAWED in freezer.state; v2: cgroup.freeze,
    done when cgroup.events says frozen (a stand-in kernel answers here)."""
    from worker import cgroups

    v1 = tmp_path / "v1"
    for h in ("cpu,cpuacct", "memory"):
        (v1 / h).mkdir(parents=True)
    assert "freezer" not in Cgroup("n1", root=v1).dirs and not Cgroup("n1", root=v1).can_freeze()
    (v1 / "freezer").mkdir()
    cg = Cgroup("n1", root=v1)
    assert cg.dirs["freezer"] == v1 / "freezer" / "edgetb" / "n1"
    assert str(v1 / "freezer" / "edgetb" / "n1" / "cgroup.procs") in cg.procs_files
    cg.dirs["freezer"].mkdir(parents=True)
    (cg.dirs["freezer"] / "freezer.state").write_text("THAWED\n")
    cg.freeze(True)
    assert cg.frozen() and (cg.dirs["freezer"] / "freezer.state").read_text() == "FROZEN"
    cg.freeze(False)
    assert not cg.frozen()
    assert "n1" in cgroups.leftover_groups(v1)

    v2 = tmp_path / "v2"
    (v2 / "edgetb" / "n2").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    d = v2 / "edgetb" / "n2"
    (d / "cgroup.freeze").write_text("0\n")
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    real = cgroups._write

    def kernel(path, text):
        real(path, text)
        if path.name == "cgroup.freeze":
            (path.parent / "cgroup.events").write_text(f"populated 1\nfrozen {text}\n")
    monkeypatch.setattr(cgroups, "_write", kernel)
    cg = Cgroup("n2", root=v2)
    cg.freeze(True)
    assert cg.frozen() and (d / "cgroup.freeze").read_text() == "1"
    cg.freeze(False)
    assert not cg.frozen()
    monkeypatch.setattr(cgroups, "_write", real)      # a kernel that never says frozen: deadline
    with pytest.raises(cgroups.CgroupError, match="not frozen"):
        cg.freeze(True, timeout_s=0.2)


# ----------------------------------------------------------------------------- agent: links

@pytest.fixture
def iperf3(agent):
    """n1 -> n2 and n1 -> n3 at 20 mbit (iperf3 servers on every node)."""
    if ah.missing_requirements() or not __import__("shutil").which("iperf3"):
        pytest.skip("iperf3: not installed")
    dep = ah.plan(3)
    a, b, c = dep.names
    dep.links = {a: [ah.link(dep, a, b, 20_000_000), ah.link(dep, a, c, 20_000_000)],
                 b: [ah.link(dep, b, a, 20_000_000)]}
    with ah.deployed(agent, dep):
        yield dep


measure, assert_near = ah.measure, ah.assert_near      # (tests/support/agents.py)


def class_bytes(dep, src) -> dict[int, int]:
    return tc.class_bytes(dep.ns(src), nb_dev())


def nb_dev() -> str:
    from worker import nodes as nb
    return nb.NODE_DEV


def try_send(dep, src, dst) -> bool:
    """One short iperf3 attempt from src to dst (connect timeout 1 s): whether it sent."""
    p = ah.ns_run(dep.ns(src), ["iperf3", "-c", dep.ip(dst), "-p", str(dep.node(dst)["port"]), "-t", "1",
                                "--connect-timeout", "1000"], check=False, timeout_s=20)
    return p.returncode == 0


def test_link_down_carries_nothing_others_keep_rate_up_restores(agent, iperf3):
    dep = iperf3
    a, b, c = dep.names
    minor_b = tc.FIRST_LINK_MINOR        # the first link of a: to b
    assert_near(measure(dep, a, b, 20e6), 20e6)

    ans = fault(agent, "/link/fault", {"node": a, "dest": b, "action": "down"})
    assert ans["changed"] and ans["down"]
    assert not fault(agent, "/link/fault", {"node": a, "dest": b, "action": "down"})["changed"]
    before = class_bytes(dep, a)[minor_b]
    assert not try_send(dep, a, b)
    assert class_bytes(dep, a)[minor_b] == before            # 0 bytes through a -> b
    assert_near(measure(dep, a, c, 20e6), 20e6)               # a -> c keeps its rate
    # a's answers to b (its SYN-ACKs and ACKs from its DML port) go by a -> b too, so
    # b -> a carries no TCP either: a down link is down for whatever a sends b
    assert not try_send(dep, b, a)

    # a rate change while down keeps it down, and up brings the new rate
    links = {a: [ah.link(dep, a, b, 8_000_000), ah.link(dep, a, c, 20_000_000)]}
    agent.post("/update/tc", {"links": links})
    assert not try_send(dep, a, b)
    assert class_bytes(dep, a)[minor_b] == before
    assert fault(agent, "/link/fault", {"node": a, "dest": b, "action": "up"})["changed"]
    assert tc.read_back(dep.ns(a), nb_dev())["rates_bps"][minor_b] == 8_000_000
    assert_near(measure(dep, a, b, 8e6), 8e6)
    assert class_bytes(dep, a)[minor_b] > before
    assert_near(measure(dep, a, c, 20e6), 20e6)


# ----------------------------------------------------------------------------- agent: docker

@dt.need_docker()
def test_docker_kill_pause_resume(agent):
    dep = dt.plan(2, cmd=HTTP_APP, port=APP_PORT)
    a, b = dep.names
    dep.links = {a: [ah.link(dep, a, b, 10_000_000)]}
    with dt.deployed(agent, dep):
        until("containers ready", lambda: all(s["ready"] for s in status(agent).values()))
        cli = dt.client()
        ctr = cli.containers.get(f"etb-{a}")

        assert fault(agent, "/node/fault", {"node": a, "action": "pause"})["state"] == "paused"
        ctr.reload()
        assert ctr.status == "paused"
        assert not answers(dep.ip(a), APP_PORT, timeout_s=1.0) and answers(dep.ip(b), APP_PORT)
        assert fault(agent, "/node/fault", {"node": a, "action": "resume"})["state"] == "running"
        assert answers(dep.ip(a), APP_PORT)

        # (a stopped container has no eth0 any more: its link is taken down before)
        assert fault(agent, "/link/fault", {"node": a, "dest": b, "action": "down"})["changed"]
        assert fault(agent, "/node/fault", {"node": a, "action": "kill"})["state"] == "exited"
        ctr.reload()
        assert ctr.status == "exited"
        st = status(agent)
        assert st[a]["state"] == "exited" and not st[a]["ready"]
        assert st[b]["state"] == "running" and st[b]["ready"] and answers(dep.ip(b), APP_PORT)

        # restart: the container again, its links back in its new namespace (a down link
        # still down), then the app
        old_ns = os.stat(f"/run/netns/{dep.ns(a)}").st_ino
        assert fault(agent, "/node/fault", {"node": a, "action": "restart"})["state"] == "running"
        until("restarted container ready", lambda: status(agent)[a]["ready"])
        assert answers(dep.ip(a), APP_PORT)
        assert os.stat(f"/run/netns/{dep.ns(a)}").st_ino != old_ns
        assert status(agent)[a]["links"] == 1
        assert tc.read_back(dep.ns(a), "eth0")["rates_bps"][tc.FIRST_LINK_MINOR] == 10_000_000
        assert "limit 0p" in ah.ns_run(dep.ns(a), ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert fault(agent, "/link/fault", {"node": a, "dest": b, "action": "up"})["changed"]
        assert "limit 0p" not in ah.ns_run(dep.ns(a), ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        fault(agent, "/node/fault", {"node": b, "action": "pause"})   # the reset copes with it


# ----------------------------------------------------------------------------- controller

def test_controller_fault_methods_and_routes(tmp_path):
    from controller.manager import Manager
    from tests.support.workflow import netns_testbed, node_outputs

    class FlManager(Manager):
        algorithm = "fl"

    names = ["fx1", "fx2", "fx3"]
    links = {"fx1": [{"dest": "fx2", "bw": "20mbit"}, {"dest": "fx3", "bw": "20mbit"}],
             "fx2": [{"dest": "fx1", "bw": "20mbit"}], "fx3": [{"dest": "fx1", "bw": "20mbit"}]}
    roles = {n: "fl_aggregator.py" if n == "fx1" else "fl_trainer.py" for n in names}
    with netns_testbed(tmp_path, FlManager, roles, links, port=3392, subnet="10.236.0.0/24",
                       ram_mb=512) as (tb, m):
        info = {n: tb.all_nodes()[n] for n in names}

        def hi(n, timeout_s=5.0):
            try:
                net.get_json(f"http://{info[n].ip}:{info[n].port}/hi", token=net.node_token(tb.token, n),
                             timeout_s=timeout_s)
                return True
            except net.HttpError:
                return False

        def app(n):
            return m.status()["nodes"][n]

        # bad input: ValueError naming it
        for call, word in [(lambda: m.node_fault("nobody", "kill"), "unknown node"),
                           (lambda: m.node_fault("fx2", "explode"), "action"),
                           (lambda: m.link_fault("fx2", "fx3", "down"), "no link"),
                           (lambda: m.link_fault("fx1", "fx3", "down", both="yes"), "both"),
                           (lambda: m.link_fault("fx1", "fx2", "sideways"), "action"),
                           (lambda: m.link_rate("fx1", "fx2", "10 parsecs"), "fx1"),
                           (lambda: m.link_rate("fx1", "fx2", 10), "bw")]:
            with pytest.raises(ValueError, match=word):
                call()

        # kill, then restart: the same credentials open the new app on the same ip:port
        out = m.node_fault("fx3", "kill")
        assert out["ok"] and out["state"] == "exited", out
        assert app("fx3")["app"] == "exited" and not hi("fx3", 2)
        assert hi("fx2") and app("fx2")["ready"]
        out = m.node_fault("fx3", "restart")
        assert out["ok"], out
        until("fx3 ready after restart", lambda: app("fx3")["ready"], timeout_s=120)
        assert hi("fx3"), node_outputs(tb)

        # pause / resume
        assert m.node_fault("fx2", "pause")["ok"]
        assert app("fx2")["app"] == "paused" and not hi("fx2", 1.0)
        assert m.node_fault("fx2", "resume")["ok"] and hi("fx2")

        # links: down both ways, up, rate in place
        out = m.link_fault("fx1", "fx2", "down", both=True)
        assert out["ok"] and [(x["src"], x["dest"]) for x in out["links"]] == [("fx1", "fx2"), ("fx2", "fx1")], out
        for ns, leaf in (("etb-fx1", "pfifo"), ("etb-fx2", "pfifo")):
            shown = ah.ns_run(ns, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
            assert f"{leaf} 10: " in shown and "limit 0p" in shown, shown
        out = m.link_rate("fx1", "fx2", "5mbit", both=True)
        assert out["ok"], out
        assert tc.read_back("etb-fx1", "eth0")["rates_bps"][tc.FIRST_LINK_MINOR] == 5_000_000
        assert "limit 0p" in ah.ns_run("etb-fx1", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert m.link_fault("fx1", "fx2", "up", both=True)["ok"]
        assert "limit 0p" not in ah.ns_run("etb-fx1", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert tb.links["fx1"][0]["bw"] == "5mbit" and tb.links["fx2"][0]["bw"] == "5mbit"

        # the curl-able routes, admin credential as every route
        base = f"http://127.0.0.1:{tb.host_port}"
        got = net.get_json(f"{base}/fault/link?src=fx1&dest=fx3&action=down", token=tb.token)
        assert got["ok"]
        got = net.get_json(f"{base}/fault/rate?src=fx1&dest=fx3&bw={units.parse_rate('1mbps')}bit",
                           token=tb.token)
        assert got["ok"]
        assert net.get_json(f"{base}/fault/link?src=fx1&dest=fx3&action=up", token=tb.token)["ok"]
        assert tc.read_back("etb-fx1", "eth0")["rates_bps"][tc.FIRST_LINK_MINOR + 1] == 8_000_000
        assert net.get_json(f"{base}/fault/node?node=fx2&action=pause", token=tb.token)["ok"]
        assert net.get_json(f"{base}/fault/node?node=fx2&action=resume", token=tb.token)["ok"]
        for q, code in [("/fault/node?node=zz&action=kill", 400), ("/fault/node?node=fx2&action=nap", 400),
                        ("/fault/link?src=fx1&dest=fx2&action=down&dir=sideways", 400)]:
            with pytest.raises(net.HttpError) as e:
                net.get_json(base + q, token=tb.token)
            assert e.value.status == code, (q, e.value)
        with pytest.raises(net.HttpError) as e:
            net.get_json(f"{base}/fault/node?node=fx2&action=kill", token=net.node_token(tb.token, "fx2"))
        assert e.value.status in (401, 403)
        assert app("fx2")["ready"]
