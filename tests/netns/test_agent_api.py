"""The agent's HTTP API refuses what it must, clearly, and keeps serving."""
import copy


import pytest

from tests.support import agents as ah

pytestmark = ah.need_root()


api = ah.clean_agent_fixture()


# ----------------------------------------------------------------------------- the token

@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_requests_without_the_token_get_401_and_change_nothing(api, token):
    """None: no header at all; "": an empty header; else a wrong token."""
    dep = ah.linked_pair()
    headers = {} if token is None else {ah.TOKEN_HEADER: token}
    r = api.raw("POST", "/emulated/deploy", json=dep.body(), token=None, headers=headers)
    assert r.status_code == 401, r.text
    ah.assert_clean(dep)
    assert api.get("/status")["nodes"] == {}
    for method, path in (("GET", "/hi"), ("GET", "/status"), ("POST", "/emulated/reset"),
                         ("POST", "/update/tc"), ("POST", "/physical/reset"), ("POST", "/emulated/stop")):
        r = api.raw(method, path, json={}, token=None, headers=headers)
        assert r.status_code == 401, (method, path, r.status_code)


def test_reset_without_token_leaves_a_deployment_alone(api):
    dep = ah.linked_pair()
    ah.deploy(api, dep)
    r = api.raw("POST", "/emulated/reset", token=None)
    assert r.status_code == 401
    st = api.get("/status")["nodes"]
    assert set(st) == set(dep.names)
    assert ah.leftovers(dep)["namespaces"] == sorted(dep.ns(n) for n in dep.names)


# ----------------------------------------------------------------------------- bad bodies

def test_malformed_json_is_400(api):
    r = api.raw("POST", "/emulated/deploy", data=b'{"emulator": "x", "nodes": [',
                headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = api.raw("POST", "/emulated/deploy", json=["not", "an", "object"])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]
    r = api.raw("POST", "/update/tc", data=b"\xff\xfe", headers={"Content-Type": "application/json"})
    assert r.status_code == 400


def _set(path, value):
    """A mutation of the valid body: set body[path...] = value (value may be a callable
    taking the deployment)."""
    def apply(body, dep):
        cur = body
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value(dep) if callable(value) else value
    return apply


BAD = {
    "unknown node in links": (lambda body, dep: body["links"].update({"ghost": []}), "ghost"),
    "link from unknown node to node": (
        lambda body, dep: body["links"].update({"ghost": [ah.link(dep, dep.names[0], dep.names[1], 10**6)]}),
        "ghost"),
    "bad node ip": (_set(("nodes", 0, "ip"), "10.251.0.999"), "bad node"),
    "node ip outside the bridge": (_set(("nodes", 0, "ip"), "192.0.2.7"), "not in"),
    "bad link ip": (lambda body, dep: body["links"][dep.names[0]][0].update(ip="not-an-ip"), "bad link"),
    "link rate out of range": (lambda body, dep: body["links"][dep.names[0]][0].update(rate_bps=1), "rate"),
    "link port out of range": (lambda body, dep: body["links"][dep.names[0]][0].update(port=70000), "port"),
    "duplicate names": (lambda body, dep: body["nodes"][1].update(name=body["nodes"][0]["name"]), "duplicate"),
    "duplicate ids": (lambda body, dep: body["nodes"][1].update(id=body["nodes"][0]["id"]), "duplicate"),
    "duplicate ips": (lambda body, dep: body["nodes"][1].update(ip=body["nodes"][0]["ip"]), "duplicate"),
    "name with a slash": (_set(("nodes", 0, "name"), "../etc"), "bad node name"),
    "name with a space": (_set(("nodes", 0, "name"), "a b"), "bad node name"),
    "volume node path with ..": (_set(("nodes", 0, "volumes"), [{"host": "/tmp", "node": "/data/../../etc"}]),
                                 "bad volume"),
    "relative volume host path": (_set(("nodes", 0, "volumes"), [{"host": "tmp", "node": "/data"}]),
                                  "bad volume"),
    "relative volume node path": (_set(("nodes", 0, "volumes"), [{"host": "/tmp", "node": "data"}]),
                                  "bad volume"),
    "working_dir with ..": (_set(("nodes", 0, "working_dir"), "/../../tmp"), "working_dir"),
    "relative working_dir": (_set(("nodes", 0, "working_dir"), "app"), "working_dir"),
    "no nodes": (_set(("nodes",), []), "nodes"),
    "links not an object": (_set(("links",), ["x"]), "links"),
    "bad bridge cidr": (_set(("bridge", "cidr"), "10.251.0.0/99"), "bridge"),
    "bad emulator name": (_set(("emulator",), "emu/../x"), "emulator"),
    "unknown backend": (_set(("backend",), "vmware"), "backend"),
    "cpu not a number": (_set(("nodes", 0, "cpu"), "lots"), "bad node"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_deploy_is_4xx_with_a_clear_message_and_nothing_made(api, case):
    mutate, words = BAD[case]
    dep = ah.linked_pair()
    body = copy.deepcopy(dep.body())
    mutate(body, dep)
    r = api.raw("POST", "/emulated/deploy", json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    msg = r.json()["error"]
    assert words.lower() in msg.lower(), msg
    ah.assert_clean(dep)
    assert api.get("/status")["nodes"] == {}


def test_update_tc_for_unknown_or_bad_link_is_400(api):
    dep = ah.linked_pair()
    ah.deploy(api, dep)
    a, b = dep.names
    for body, words in (({"links": {"ghost": []}}, "ghost"),
                        ({"links": {a: [{"dest": b, "ip": "x", "port": 1, "rate_bps": 10**6}]}}, "bad link"),
                        ({"links": []}, "links")):
        r = api.raw("POST", "/update/tc", json=body)
        assert r.status_code == 400 and words in r.json()["error"], r.text
    assert api.get("/status")["nodes"][a]["links"] == 1
