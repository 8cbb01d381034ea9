"""The controller's HTTP server: a run service (controller/run.py) served with EdgeTB's
routes (controller/api/).

Routes answer GET (EdgeTB users type `curl localhost:3333/start?root=n1`) and POST.
Every request is checked first (controller/access.py): the admin token opens every
route, a node's credential only its own /heartbeat, /log, /print, (the root's) /finish
and the data bundles GET /data/<sha256>, a dashboard session cookie (POST /login) only the dashboard's read-only routes,
and a request without a token only from root or the sudo user on loopback.

`Manager(testbed, algorithm)` is what a Testbed starts (its `manager_class`, called with
the testbed): the algorithm is an object (controller/algorithm.py; e.g.
controller/ra_run.py's RingAllReduce); without one, the default FL behaviour under the
class's `algorithm` name (`class M(Manager): algorithm = "fl"` as EdgeTB scripts write).
A run script's manager class names its algorithm in `algorithm_class`.
"""
from __future__ import annotations

import sys
import threading

from flask import Flask

from controller import access, api, dashboard, stopping
from controller.algorithm import Algorithm
from controller.run import Run
from controller.testbed import Testbed
from dml_app import net


class Manager(Run):
    """A run service served over HTTP: the Flask app, its access checks and body limits,
    serve / close / wait_forever."""

    algorithm = "dml"        # the default algorithm's name (class attribute, as EdgeTB scripts set it)
    algorithm_class: type[Algorithm] | None = None   # a run script's algorithm, made for each Manager

    def __init__(self, testbed: Testbed, algorithm: Algorithm | None = None, *, log_limit_bytes: int | None = None):
        if algorithm is None:
            algorithm = self.algorithm_class() if self.algorithm_class is not None else \
                Algorithm(type(self).algorithm, self.needs_root)
        if log_limit_bytes is None:
            log_limit_bytes = getattr(testbed, "log_limit_bytes", None)   # --log-limit-mb (controller/auto.py)
        super().__init__(testbed, algorithm, log_limit_bytes=log_limit_bytes)
        self.app = Flask(f"edgetb-{self.algorithm}", static_folder=None)   # /static/ is the dashboard's
        self.server: net.Server | None = None
        self._stop = threading.Event()
        self.access = access.Access(testbed.token, names=self._names,
                                    port=self.port,
                                    token_file=access.token_path(testbed.host_port))
        self.access.install(self.app)
        # After the access check: JSON routes take 1 MiB, /log log_limit_bytes (read at
        # each request); the server refuses more than the largest from the headers.
        self.body_limits = net.limit_bodies(self.app, routes={"/log": lambda: self.log_limit_bytes})
        api.install(self.app, self, self.access)

    def _names(self) -> set[str]:
        """Names and addresses this controller answers to besides its machine's own."""
        return {self.tb.ip, *self.tb.allowed_hosts, *(e.gateway for e in self.tb.emulators.values())}

    def serve(self) -> None:
        # Each dashboard stream holds a thread while it is open: room for all of them.
        self.server = net.serve(self.app, "0.0.0.0", self.tb.host_port, threads=16 + dashboard.STREAMS_MAX)
        self.dashboard.start()
        # The admin token, for the users that loopback does not trust (docs/security.md).
        self.access.token_file = access.token_path(self.server.port)
        access.write_token(self.access.token_file, self.tb.token)
        print(f"controller: serving on port {self.server.port}; live dashboard at "
              f"http://localhost:{self.server.port}/", flush=True)

    def close(self) -> None:
        super().close()          # the dashboard's streams end before the server waits for them
        if self.server is not None:
            self.server.close()
            self.server = None
            access.remove_token(self.access.token_file, self.tb.token)

    def wait_forever(self) -> None:
        """Serve until Ctrl-C or SIGTERM, then remove everything deployed."""
        try:
            with stopping.stop_on_signals(lambda *_: self._stop.set()):
                while not self._stop.wait(0.5):
                    pass
        finally:
            with stopping.shielded():
                print("controller: stopping, removing every node and link", file=sys.stderr, flush=True)
                self.tb.close()     # nodes first, so no heartbeat arrives at a closing server
                self.close()
