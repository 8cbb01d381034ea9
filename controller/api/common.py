"""What every route of the controller's HTTP API shares: the run service it serves
(`run()`), the methods of EdgeTB's routes, the node-credential check, and the error
answers (a ValueError is 400, a missing file 404, scenario.Busy 409, a node or worker
that failed 422/502, ...)."""
from __future__ import annotations

from flask import current_app, jsonify

from controller import access, scenario
from controller.run import upstream_status
from controller.testbed import NotReady
from dml_app import net

EXTENSION = "edgetb.run"
ACCESS = "edgetb.access"     # the app's access.Access (POST /login checks the admin token)
ANY = ["GET", "POST"]        # the methods of EdgeTB's routes


def run():
    """The run service the app serving this request was installed over."""
    return current_app.extensions[EXTENSION]


def as_node(name) -> None:
    """A node credential speaks for its own node only (PermissionError: 403)."""
    me = access.who().node
    if me is not None and name != me:
        raise PermissionError(f"node {me} cannot speak for {str(name)[:40]!r}")


def _bad(e):
    return jsonify(error=str(e)), 400


def _missing(e):
    return jsonify(error=str(e)), 404


def _upstream(e):
    return jsonify(error=str(e)), upstream_status(e.status)


def _busy(e):
    return jsonify(error=str(e)), 409


def _not_ready(e):
    return jsonify(error=str(e), not_answering=e.not_answering, exited=e.exited), 503


def _forbidden(e):
    return jsonify(error=str(e)), 403


ERRORS = ((ValueError, _bad), (FileNotFoundError, _missing), (net.HttpError, _upstream),
          (scenario.Busy, _busy), (NotReady, _not_ready), (PermissionError, _forbidden))
