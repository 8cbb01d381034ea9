"""The controller's HTTP API over a run service (controller/run.py), split by concern.

* control.py: EdgeTB's workflow (/conf/*, /start, /finish, /log, /print, /heartbeat,
  /status) and the workers' stop/clear/reset routes;
* faults.py: node and link faults (/fault/*), scenarios (/scenario), /update/tc;
* dashboard.py: the live dashboard's page and data (/, /static/*, /api/*, /runs/*, /login);
* sharing.py: the content-addressed stores (/share/<sha256>, /data/<sha256>).

Each module is a Flask Blueprint whose views find the run through `run()`; `install`
registers them all, with the error answers every route shares (a ValueError is 400, a
missing file 404, scenario.Busy 409, a node or worker that failed 422/502, ...).
Routes answer GET (EdgeTB users type `curl localhost:3333/start?root=n1`) and POST.
"""
from __future__ import annotations

from flask import Flask

from controller import access
from controller.api import control, dashboard, faults, sharing
from controller.api.common import ACCESS, ERRORS, EXTENSION


def install(app: Flask, the_run, checks: access.Access) -> None:
    """Every route of the controller on `app`, over the run service `the_run`, whose
    requests `checks` guards (installed on the app before)."""
    app.extensions[EXTENSION] = the_run
    app.extensions[ACCESS] = checks
    for exc, handler in ERRORS:
        app.register_error_handler(exc, handler)
    for module in (control, faults, dashboard, sharing):
        app.register_blueprint(module.bp)
