"""Fault actions and link changes: /fault/node, /fault/link, /fault/rate, the
scenario for the next /start (/scenario), and /update/tc (every link from a file)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from controller.api.common import ANY, run, upstream_status
from dml_app import net

bp = Blueprint("faults", __name__)


def fault_answer(out: dict):
    return jsonify(out), 200 if out["ok"] else upstream_status(out.get("status"))


def direction() -> bool:
    """?dir=one (the default: src -> dest) or both."""
    d = request.args.get("dir", "one")
    if d not in ("one", "both"):
        raise ValueError(f"dir: {d[:16]!r} is not one or both")
    return d == "both"


@bp.route("/fault/node", methods=ANY)
def fault_node():
    """/fault/node?node=n3&action=kill|pause|resume|restart"""
    return fault_answer(run().node_fault(request.args.get("node", ""), request.args.get("action", "")))


@bp.route("/fault/link", methods=ANY)
def fault_link():
    """/fault/link?src=n1&dest=n2&action=down|up[&dir=both]"""
    a = request.args
    return fault_answer(run().link_fault(a.get("src", ""), a.get("dest", ""), a.get("action", ""),
                                         both=direction()))


@bp.route("/fault/rate", methods=ANY)
def fault_rate():
    """/fault/rate?src=n1&dest=n2&bw=2mbit[&dir=both]"""
    a = request.args
    return fault_answer(run().link_rate(a.get("src", ""), a.get("dest", ""), a.get("bw", ""), both=direction()))


@bp.route("/scenario", methods=["GET", "POST", "DELETE"])
def scenario_():
    """GET: the scenario and the events fired so far; POST (JSON body, a scenario
    document): set it for the next /start; DELETE: clear it. 409 during a run."""
    r = run()
    if request.method == "POST":
        doc = net.parse_json_body(request.get_data(), want_object=False, what="scenario")
        return jsonify(events=[e.as_dict() for e in r.set_scenario(doc)])
    if request.method == "DELETE":
        r.set_scenario(None)
        return jsonify(events=[])
    return jsonify(events=[e.as_dict() for e in r.scenario or []],
                   fired=list(r.scheduler.records) if r.scheduler else [])


@bp.route("/update/tc", methods=ANY)
def update_tc():
    f = request.args.get("file")
    if not f:
        raise ValueError("say which links file: /update/tc?file=links.json")
    return jsonify(run().update_links(f))
