"""EdgeTB's workflow routes: conf pushes, start, finish, what nodes send (heartbeats,
logs, prints), /status, and the workers' stop, clear and reset."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from controller import access, results
from controller.api.common import ANY, as_node, run
from controller.run import heartbeat_error, heartbeat_fields

bp = Blueprint("control", __name__)


@bp.route("/print", methods=ANY)
def print_():
    msg = request.args.get("msg", "") or request.get_data(as_text=True)
    who = access.who().node or request.args.get("name", request.remote_addr)
    # One line per call, whatever the message holds, and nothing a terminal acts
    # on: control characters (ESC, BEL, C1, ...) are shown escaped (\x1b).
    line = f"[{str(who)[:64]}] {' '.join(msg.split())[:2000]}"
    print(results.printable(line), flush=True)
    return "ok\n"


@bp.route("/heartbeat", methods=["POST"])
def heartbeat():
    """A node's state; with "metrics" (its new records, dml_app/runtime.py) the
    answer is {"ack": the last of its records stored}."""
    r = run()
    body = request.get_json(silent=True)
    name, state, rnd = heartbeat_fields(body)
    error = heartbeat_error(body)
    live = r.dashboard.parse_heartbeat(body)
    as_node(name)
    ack = r.heartbeat(name, state, rnd, error, live)
    return jsonify(ack=ack) if live is not None else "ok\n"


@bp.route("/conf/dataset", methods=ANY)
def conf_dataset():
    return jsonify(run().push_conf("dataset"))


@bp.route("/conf/structure", methods=ANY)
def conf_structure():
    return jsonify(run().push_conf("structure"))


@bp.route("/start", methods=ANY)
def start():
    """Start the run; the controller's console then says its rounds and its end."""
    return run().start_and_watch(request.args.get("root")) + "\n"


@bp.route("/finish", methods=ANY)
def finish():
    return jsonify(run().finish_by(access.who().node))


@bp.route("/log", methods=["POST"])
def log():
    """A node's log, into the folder of the run under way (made by the first one);
    409 while /finish collects, and after it for all but each node's one final log:
    a finished run's files are not rewritten."""
    name = request.args.get("name", "")
    as_node(name)
    run().take_log(name, request.get_data())
    return "ok\n"


@bp.route("/status", methods=["GET"])
def status():
    return jsonify(run().status())


@bp.route("/emulated/stop", methods=ANY)
def emulated_stop():
    return jsonify(run().workers_call("emulated", "stop"))


@bp.route("/emulated/clear", methods=ANY)
def emulated_clear():
    return jsonify(run().workers_call("emulated", "clear"))


@bp.route("/emulated/reset", methods=ANY)
def emulated_reset():
    return jsonify(run().workers_call("emulated", "reset"))


@bp.route("/physical/stop", methods=ANY)
def physical_stop():
    return jsonify(run().workers_call("physical", "stop"))


@bp.route("/physical/clear/tc", methods=ANY)
def physical_clear_tc():
    return jsonify(run().workers_call("physical", "clear/tc"))


@bp.route("/physical/clear/nfs", methods=ANY)
def physical_clear_nfs():
    # Shares are bind mounts private to each node's mount namespace: they went
    # away with the node's app, so there is nothing to unmount.
    return jsonify({"cleared": "nothing mounted on the workers' hosts"})


@bp.route("/physical/reset", methods=ANY)
def physical_reset():
    return jsonify(run().workers_call("physical", "reset"))
