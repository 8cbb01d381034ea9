"""The live dashboard's routes: the page (/ and /static/*), its data (/api/state,
/api/metrics, /api/events, /api/fidelity, /api/runs, /api/stream), a finished run's
files (/runs/<name>/<file>) and /login. controller/dashboard.py holds their data and
documents them."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, make_response, redirect, request

from controller import access, dashboard
from controller.api.common import ACCESS, run
from dml_app import net

bp = Blueprint("dashboard", __name__)


def no_cache(resp):
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def api(obj):
    run().dashboard.watched()
    return no_cache(jsonify(obj))


def file_answer(data, mime):
    resp = no_cache(make_response(data))
    resp.headers["Content-Type"] = mime
    return resp


@bp.route("/", methods=["GET"])
def dashboard_page():
    try:
        data, mime = run().dashboard.static_file("index.html")
    except FileNotFoundError:
        return ("the dashboard page is not installed (controller/static/index.html is missing); "
                "the data is at /api/state, /api/metrics, /api/events, /api/fidelity, /api/runs\n", 404)
    resp = file_answer(data, mime)
    resp.headers["X-Frame-Options"] = "DENY"
    return resp


@bp.route("/static/<path:rel>", methods=["GET"])
def dashboard_static(rel):
    return file_answer(*run().dashboard.static_file(rel))


@bp.route("/api/state", methods=["GET"])
def api_state():
    dash = run().dashboard
    dash.watched()
    return no_cache(Response(dash.state_json(), mimetype="application/json"))


@bp.route("/api/metrics", methods=["GET"])
def api_metrics():
    raw = request.args.get("after", "0")
    if not raw.isdigit() or len(raw) > 19:
        raise ValueError(f"after: expected a record sequence number (0 or more), got {raw[:32]!r}")
    return api(run().dashboard.metrics_page(int(raw)))


@bp.route("/api/events", methods=["GET"])
def api_events():
    return api({"events": run().dashboard.events()})


@bp.route("/api/fidelity", methods=["GET"])
def api_fidelity():
    return api(run().dashboard.fidelity_report())


@bp.route("/api/runs", methods=["GET"])
def api_runs():
    return api(run().dashboard.runs())


@bp.route("/runs/<name>/<file>", methods=["GET"])
def run_file(name, file):
    return file_answer(*run().dashboard.run_file(name, file))


@bp.route("/api/stream", methods=["GET"])
def api_stream():
    """Server-Sent Events for one page; only for a client asking for an event
    stream (EventSource sends Accept: text/event-stream), at most STREAMS_MAX."""
    if "text/event-stream" not in request.headers.get("Accept", ""):
        return ("this is a Server-Sent Events stream: send Accept: text/event-stream "
                "(a browser's EventSource does); for one answer use /api/state\n", 406)
    body = run().dashboard.open_stream()
    if body is None:
        return (f"too many dashboard streams open (at most {dashboard.STREAMS_MAX}): "
                f"close a page, or poll /api/state\n", 503, {"Retry-After": "10"})
    return Response(body, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@bp.route("/login", methods=["POST"])
def login():
    """The admin token (form field `token`) -> a dashboard session cookie."""
    checks: access.Access = current_app.extensions[ACCESS]
    given = request.form.get("token", "")
    if not net.same_token(given.strip(), checks.admin_token):
        return (f"wrong admin token (it is in {checks.token_file} on the controller's "
                f"machine)\n", 401)
    html = "text/html" in request.headers.get("Accept", "")
    resp = redirect("/", code=303) if html else jsonify(ok=True)
    resp.set_cookie(checks.cookie_name, checks.new_session(), max_age=access.SESSION_S,
                    httponly=True, samesite="Strict", path="/")
    return resp
