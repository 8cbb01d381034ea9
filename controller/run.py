"""The run service: one deployed testbed's run, without HTTP.

Conf pushes, start, finish (logs, plots, summary.json), heartbeats, node logs, a
restarted node's rejoin, status, fault actions and link changes, the scenario under
way, and the resets of the workers. The algorithm is an object the run is given
(controller/algorithm.py: the hooks an algorithm adds, with the default FL behaviour);
controller/manager.py serves a run over HTTP (its routes in controller/api/).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from controller import algorithm as algorithms
from controller import dashboard, faults, files, progress, results, scenario, share
from controller.agents import FANOUT, call_once, fan_out
from controller.testbed import ROOT, NotReady, Testbed
from dml_app import net

CONF_DIR = ROOT / "dml_file" / "conf"
RUNS_DIR = ROOT / "runs"
LOG_LIMIT_BYTES = 16 * net.MiB      # a node's log posted to /log (the run scripts' --log-limit-mb)
MAX_ROUND = 10**9

def heartbeat_fields(body) -> tuple[str, str | None, int | None]:
    """(node, state, round) of a /heartbeat body {"node", "state"?, "round"?}; ValueError
    (HTTP 400) naming the field for anything else: a body that is not an object, a node
    that is not a name, a state that is not a short string, a round that is not an
    integer in [0, 1e9] (no bools, strings, NaN, infinities)."""
    if not isinstance(body, dict):
        raise ValueError('heartbeat: expected a JSON object {"node", "state", "round"}')
    node, state, rnd = body.get("node"), body.get("state"), body.get("round")
    if not isinstance(node, str) or not 0 < len(node) <= 64:
        raise ValueError(f"heartbeat 'node' must be a node name, got {str(node)[:40]!r}")
    if state is not None and (not isinstance(state, str) or len(state) > 64):
        raise ValueError(f"heartbeat 'state' must be a string of at most 64 characters, got {str(state)[:40]!r}")
    if rnd is not None:
        rnd = net.number(rnd, "heartbeat 'round'", 0, MAX_ROUND, integer=True)
    return node, state, rnd


def heartbeat_error(body) -> str | None:
    """The optional 'error' of a /heartbeat body (a failed node's message, state error):
    a string, cut to 1000 characters; ValueError (HTTP 400) for anything else."""
    err = body.get("error") if isinstance(body, dict) else None
    if err is not None and not isinstance(err, str):
        raise ValueError(f"heartbeat 'error' must be a string, got {str(err)[:40]!r}")
    return err[:1000] if err else None


def upstream_status(status: int | None) -> int:
    """The controller's answer when a node or a worker did not do what a request asked:
    422 when it refused it (a 4xx other than a refused credential: the request's input
    or the run's state is wrong, e.g. links a worker cannot install, a root that cannot
    start), 502 when it failed, answered 5xx, refused the controller's own credential
    or did not answer."""
    return 422 if status is not None and 400 <= status < 500 and status not in (401, 403) else 502


class Run:
    """One testbed's run: what the EdgeTB routes do, as methods. `algorithm` (an
    algorithm.Algorithm; default: the FL behaviour under the name `name`) adds what its
    algorithm needs through its hooks."""

    name = "dml"             # the algorithm's name when none is given (run folders, /status)
    needs_root = True        # the default algorithm's: /start needs ?root=
    conf_dir = CONF_DIR      # where the dml_tool scripts write the node confs
    runs_dir = RUNS_DIR      # where /finish makes each run's folder
    log_limit_bytes = LOG_LIMIT_BYTES   # the largest body POST /log takes (413 beyond)
    screenshot_s = dashboard.SCREENSHOT_TIMEOUT_S   # dashboard.png at /finish: the browser's bound (0: none)
    file_roots: tuple = ()   # folders besides ROOT, the testbed's dir_name and conf_dir that
                             # requests may name files in (/update/tc?file=)
    server = None            # the HTTP server serving this run, when one does (controller/manager.py)

    def __init__(self, testbed: Testbed, algorithm: algorithms.Algorithm | None = None, *,
                 log_limit_bytes: int | None = None):
        self.tb = testbed
        self.algo = algorithm if algorithm is not None else algorithms.Algorithm(self.name, self.needs_root)
        self.algorithm = self.algo.name
        if log_limit_bytes is not None:
            self.log_limit_bytes = log_limit_bytes
        self.heartbeats: dict[str, dict] = {}
        self.started_at: float | None = None
        self.pushed: set[str] = set()      # conf kinds pushed to the nodes (push_conf)
        self.root: str | None = None
        self.run_dir: Path | None = None
        self.summary: dict | None = None
        self.finished = threading.Event()
        self._finish_lock = threading.Lock()
        # POST /log writes into the run under way; while /finish collects, it gets 409; once
        # the run is finished each node may send its final log once (EdgeTB apps send their
        # whole log after /finish), then 409 until the next /start makes a new folder.
        self._log_lock = threading.Lock()
        self._closing = False
        self._final_logs: set[str] = set()
        # Scenario (controller/scenario.py): the events run at each start, set by --scenario
        # (testbed.scenario) or POST /scenario; the scheduler of the run under way.
        self.scenario: list | None = getattr(testbed, "scenario", None)
        self.scheduler: scenario.Scheduler | None = None
        self.watcher: progress.Watcher | None = None     # the console's account of a run started by /start
        self.dashboard = dashboard.Dashboard(self, agents=testbed.agents, nodes=testbed.all_nodes, port=self.port)
        self.data_store = share.DataStore()   # GET /data/<sha256> (serverless data parts)
        self.faults = faults.Faults(self)
        self.algo.attach(self)

    def port(self) -> int:
        """The port the controller serves this run on (the testbed's until it serves)."""
        return self.server.port if self.server is not None else self.tb.host_port

    def close(self) -> None:
        """End what runs in the background: the algorithm's drivers, the scenario, the
        console's watcher, the dashboard's sampling."""
        self.algo.close()
        self.stop_scenario(resume_paused=False)
        if self.watcher is not None:
            self.watcher.stop()
        self.dashboard.close()

    # ------------------------------------------------------------------ node calls
    def _nodes(self):
        return self.tb.all_nodes()

    def _each(self, fn, names=None) -> dict:
        """fn(node) for every node in parallel, at most FANOUT at once -> {name: result
        or 'error: <name>: ...'} (a failure names its node)."""
        nodes = self._nodes()
        names = list(names) if names is not None else list(nodes)

        def one(name):
            try:
                return name, fn(nodes[name])
            except net.HttpError as e:
                return name, f"error: {name}: {e}"
        return dict(fan_out(one, names, FANOUT))

    def file_folders(self) -> list[str]:
        """Where files named by a request may be read from (controller/files.py)."""
        return files.roots_of(ROOT, self.tb.dir_name, self.conf_dir, *self.file_roots)

    def push_conf(self, kind: str) -> dict:
        """Send every node its dml_file/conf/<node>_<kind>.conf (written by the conf tools).

        Every conf is read (controller/files.py: a regular file inside the project's
        folders, at most 1 MiB, bounded JSON) before any is sent: one bad conf refuses
        the push (HTTP 400) and no node gets anything."""
        self.algo.on_push(kind)
        missing = [n for n in self._nodes() if not self.conf_file(n, kind).exists()]
        have = [n for n in self._nodes() if n not in missing]
        if not have:
            raise FileNotFoundError(f"no {kind} confs in {self.conf_dir}: run dml_tool/"
                                    f"{'dataset_conf.py -d' if kind == 'dataset' else '<alg>_structure_conf.py -s'} first")
        confs = {n: self.read_conf(n, kind) for n in have}
        # Apps still starting (a push right after `tc finish`): wait for them, up to the
        # testbed's readiness deadline (NotReady naming them, HTTP 503), then send once.
        self.tb.wait_ready(have)

        def send(node):
            self.send_conf(node.name, kind, confs[node.name])
            return "ok"
        out = self._each(send, have)
        out.update({n: "skipped: no conf file" for n in missing})
        self.pushed.add(kind)      # a restarted node gets it again (rejoin)
        return out

    def conf_file(self, node: str, kind: str) -> Path:
        return self.conf_dir / f"{node}_{kind}.conf"

    def read_conf_file(self, node: str, kind: str):
        """`node`'s conf file of `kind` as the conf tools wrote it, read by controller/files.py:
        a regular file inside the project's folders, at most 1 MiB, bounded JSON
        (ValueError, OSError otherwise)."""
        raw = files.read_project_file(self.conf_file(node, kind), self.file_folders(), files.CONF_FILE_LIMIT,
                                      what=f"{kind} conf")
        return net.parse_json_body(raw, what=f"{kind} conf {node}_{kind}.conf")

    def read_conf(self, node: str, kind: str):
        """`node`'s conf of `kind` as it is sent: its file's with what the algorithm adds."""
        return self.conf_for(kind, node, self.read_conf_file(node, kind))

    def send_conf(self, node: str, kind: str, conf) -> None:
        """POST /conf/<kind> to `node`'s app (sent once: repeated only if it cannot have arrived)."""
        n = self._nodes()[node]
        call_once("POST", f"{n.ip}:{n.port}/conf/{kind}", json=conf, token=self.tb.node_token(node),
                  timeout_s=120, max_bytes=net.JSON_LIMIT)

    def rejoin(self, node: str) -> str:
        """A restarted app starts with nothing: once it answers, give it again the confs
        pushed so far in this deployment (its own conf files), then the algorithm's
        on_rejoin. Returns what was done, in words ("" when nothing was pushed yet)."""
        # Only its own conf files: a node may have none of a kind (conf_optional).
        kinds = [k for k in ("dataset", "structure") if k in self.pushed and self.conf_file(node, k).exists()]
        if not kinds:
            return ""
        try:
            self.tb.wait_ready([node], deadline=time.monotonic() + self.tb.ready_deadline_s())
            for kind in kinds:
                self.send_conf(node, kind, self.read_conf(node, kind))
            more = self.algo.on_rejoin(node)
        except (net.HttpError, NotReady, OSError, ValueError) as e:
            return f"rejoin failed: {e}"
        return f"{' and '.join(kinds)} conf pushed again" + (f", {more}" if more else "")

    def conf_for(self, kind: str, node: str, conf):
        """The conf of `kind` sent to `node`, from its conf file's, with what the algorithm
        adds (what only the controller knows)."""
        return self.algo.conf_for(kind, node, conf)

    def start_training(self, root: str | None) -> str:
        """Start the run: GET /start on the root (every node when the algorithm has no
        root), after the algorithm's checks; its drivers start once the nodes did."""
        prepared = self.algo.prepare_start(root)
        text = self._start_nodes(root)
        return self.algo.started(root, text, prepared)

    def start_and_watch(self, root: str | None, say=print) -> str:
        """start_training, then the console's account of the run (controller/progress.py:
        each round's figure, the end or the failure) on a thread, as --auto says it."""
        text = self.start_training(root)
        say(text)
        if self.watcher is not None:
            self.watcher.stop()
        self.watcher = progress.Watcher(self, root, say=say)
        self.watcher.start()
        return text

    def _start_nodes(self, root: str | None) -> str:
        nodes = self._nodes()
        if root is None and self.algo.needs_root:
            raise ValueError("say which node starts: /start?root=NAME")
        if root is not None and root not in nodes:
            raise ValueError(f"unknown root node {root!r}")
        before = (self.root, self.summary, self.started_at, self.run_dir)
        self.root = root
        self.summary = None
        with self._log_lock:
            self.run_dir = None      # this run's folder: made by its first POST /log or by /finish
            self._closing = False
            self._final_logs.clear()
        self.finished.clear()
        self.started_at = time.time()
        dash_before = self.dashboard.new_run()
        targets = [root] if root else list(nodes)

        def start(n):
            try:
                return net.call("GET", f"{n.ip}:{n.port}/start", token=self.tb.node_token(n.name), timeout_s=30,
                                max_bytes=net.JSON_LIMIT).text
            except net.HttpError as e:
                return e
        bad = {k: v for k, v in self._each(start, targets).items() if isinstance(v, net.HttpError)}
        if bad:
            if len(bad) == len(targets):      # nothing started: the run is as it was
                self.root, self.summary, self.started_at, self.run_dir = before
                self.dashboard.restore(dash_before)
                if self.summary is not None:
                    self.finished.set()
            # Refused by every node that failed (a 4xx: not a root role, confs missing,
            # already started) -> 422; a node that failed or did not answer -> 502.
            status = next(iter(bad.values())).status
            if any(upstream_status(e.status) == 502 for e in bad.values()):
                status = None
            raise net.HttpError("GET", "/start", status,
                                "start failed: " + "; ".join(f"{k}: {e}" for k, e in sorted(bad.items())))
        self.start_scenario()
        return f"started {', '.join(targets)}"

    # ------------------------------------------------------------------ scenario
    def set_scenario(self, doc) -> list:
        """Validate a scenario document (controller/scenario.py) against this testbed and
        keep it for the next /start; scenario.Busy (409) while a run is under way,
        ScenarioError (400) listing every problem. None clears it."""
        if self.started_at is not None and not self.finished.is_set():
            raise scenario.Busy("a run is under way: set the scenario before /start (or after /finish)")
        if doc is None:
            self.scenario = None
            return []
        missing = scenario.missing_methods(self)
        if missing:
            raise scenario.ScenarioError([f"this controller has no fault actions ({', '.join(missing)})"])
        self.scenario = scenario.parse(doc, nodes=self._nodes(), links=self.tb.links)
        return self.scenario

    def start_scenario(self) -> None:
        if self.scenario and self.started_at is not None:
            self.stop_scenario(resume_paused=False)
            self.scheduler = scenario.Scheduler(list(self.scenario), self)
            self.scheduler.start(self.started_at)
            print(f"controller: scenario of {len(self.scenario)} event(s) started", flush=True)

    def stop_scenario(self, *, resume_paused: bool = True) -> list | None:
        """Stop the scenario under way (at /finish, reset, close); its events' records."""
        sched = self.scheduler
        return sched.stop(resume_paused=resume_paused) if sched is not None else None

    def finish(self) -> dict:
        """Collect every node's log and metrics, draw the plots, write summary.json."""
        if self.summary is None:
            self.algo.before_finish()
        with self._finish_lock:
            if self.summary is not None:
                return self.summary
            with self._log_lock:
                self._closing = True         # no POST /log while the folder is collected
                if self.run_dir is None:     # else a node's POST /log of this run made it
                    self.run_dir = results.new_run_dir(self.runs_dir, self.algorithm)
            try:
                return self._finish()
            finally:
                # Finished: each node's final log once; failed: the run is still open.
                with self._log_lock:
                    self._closing = False

    def _finish(self) -> dict:
        """finish()'s work, in the run's folder (closed to POST /log by then)."""
        wall = time.time() - (self.started_at or time.time())
        events = self.stop_scenario()      # first: a paused node is resumed to give its log

        def collect(node):
            base = f"{node.ip}:{node.port}"
            tok = self.tb.node_token(node.name)
            # A node app's answers are bounded like its POST /log: at most log_limit_bytes.
            cap = self.log_limit_bytes
            log = net.call("GET", f"{base}/log", token=tok, timeout_s=60, max_bytes=cap).text
            met = net.call("GET", f"{base}/metrics", token=tok, timeout_s=60, max_bytes=cap).text
            try:
                stats = net.parse_json_body(net.call("GET", f"{base}/stats", token=tok, timeout_s=30,
                                                     max_bytes=net.JSON_LIMIT).content, what="/stats")
                sent = net.number(stats.get("bytes_sent", 0), "/stats bytes_sent", 0, 2**62, integer=True)
            except ValueError as e:
                return f"error: {e}"
            results.write_run_file(self.run_dir, results.safe_log_path(self.run_dir, node.name).name, log)
            results.write_run_file(self.run_dir, results.safe_log_path(self.run_dir, node.name, ".metrics.jsonl").name,
                                   met)
            return {"metrics": results.parse_metrics(met), "bytes_sent": sent}

        got = self._each(collect)
        metrics = {n: g["metrics"] for n, g in got.items() if isinstance(g, dict)}
        sent = {n: g["bytes_sent"] for n, g in got.items() if isinstance(g, dict)}
        missing = {n: g for n, g in got.items() if not isinstance(g, dict)}
        summary = self.summarize(metrics, wall, sent)
        if missing:
            summary["logs_missing"] = missing
        if events is not None:
            summary["events"] = events
        results.draw(self.run_dir, metrics, self.root, events=events, t0=self.started_at)
        summary["run_dir"] = str(self.run_dir)
        summary["link_fidelity"] = self.dashboard.fidelity_report()
        # The page as it ends, while the nodes still answer (a reset comes after /finish).
        why = self.dashboard.screenshot(self.run_dir)
        summary["dashboard"] = "dashboard.png" if why is None else f"no screenshot: {why}"
        results.write_run_file(self.run_dir, "summary.json", json.dumps(summary, indent=2) + "\n")
        self.summary = summary
        self.finished.set()
        print(f"controller: finished, logs and plots in {self.run_dir}", flush=True)
        return summary

    def summarize(self, metrics: dict, wall: float, sent: dict) -> dict:
        """summary.json's content: the algorithm's summary of the metrics."""
        return self.algo.summarize(metrics, wall, sent)

    # ------------------------------------------------------------------ faults and links
    def node_fault(self, node: str, action: str) -> dict:
        """controller/faults.py Faults.node_fault: kill, pause, resume or restart a node's app."""
        return self.faults.node_fault(node, action)

    def link_fault(self, src: str, dest: str, action: str, both: bool = False) -> dict:
        """controller/faults.py Faults.link_fault: a link down or up."""
        return self.faults.link_fault(src, dest, action, both)

    def link_rate(self, src: str, dest: str, bw: str, both: bool = False) -> dict:
        """controller/faults.py Faults.link_rate: a link's rate changed in place."""
        return self.faults.link_rate(src, dest, bw, both)

    def update_links(self, path: str) -> dict:
        """controller/faults.py Faults.update_links: every link from a links file."""
        return self.faults.update_links(path)
    def conf_optional(self, kind: str) -> set[str]:
        """Nodes that need no conf of `kind` (the algorithm's): a push that skips them (no
        conf file) is not a failure for --auto (controller/auto.py drive)."""
        return self.algo.conf_optional(kind)

    def start_node(self, node: str) -> None:
        """GET /start on one node (a rejoined one)."""
        n = self._nodes()[node]
        call_once("GET", f"{n.ip}:{n.port}/start", token=self.tb.node_token(node), timeout_s=30, max_bytes=net.JSON_LIMIT)

    def status(self) -> dict:
        now = time.time()
        nodes = {}

        def one(client):
            try:
                return client.status()["nodes"]
            except net.HttpError as e:
                return {"error": str(e)}
        deployed = self.tb.agents.deployed()
        agents = dict(zip((c.label for c in deployed), fan_out(one, deployed)))
        for name, n in self._nodes().items():
            worker = next((l for l, a in agents.items() if name in a), None)
            a = agents.get(worker, {}).get(name, {}) if worker else {}
            hb = self.heartbeats.get(name)
            nodes[name] = {"worker": worker, "ip": n.ip, "port": n.port,
                           "state": (hb or {}).get("state") or a.get("state", "not deployed"),
                           "app": a.get("state"), "ready": a.get("ready"), "links": a.get("links", 0),
                           "round": (hb or {}).get("round"), "error": (hb or {}).get("error"),
                           "last_heartbeat_s": round(now - hb["t"], 1) if hb else None}
        return {"algorithm": self.algorithm, "nodes": nodes,
                "finished": self.finished.is_set(), "run_dir": str(self.run_dir) if self.run_dir else None}


    # ------------------------------------------------------------------ what nodes send
    def heartbeat(self, name: str, state: str | None, rnd: int | None, error: str | None, live) -> int | None:
        """A node's heartbeat (fields checked by heartbeat_fields): its state for /status
        and the algorithm; `live` (its new metrics records, dashboard.parse_heartbeat)
        go to the dashboard. -> the last of its records stored (None: none, or a name
        that is no node of this testbed)."""
        if name not in self._nodes():
            return None
        self.heartbeats[name] = {"t": time.time(), "state": state, "round": rnd, "error": error}
        ack = self.dashboard.heartbeat_metrics(name, live)
        self.algo.on_heartbeat(name, state, rnd)
        return ack

    def finish_by(self, me: str | None) -> dict:
        """/finish from node `me` (None: the admin): only the root of a started run may
        (PermissionError); its state becomes finished (its last heartbeat may predate it)."""
        if me is not None and self.started_at is None:
            raise PermissionError(f"no run has started: node {me} cannot finish one")
        if me is not None and self.root is not None and me != self.root:
            raise PermissionError(f"only the root node {self.root} or the admin may finish the run, not {me}")
        if me is not None and me in self.heartbeats:
            self.heartbeats[me] = {**self.heartbeats[me], "state": "finished"}
        return self.finish()

    def take_log(self, name: str, data: bytes) -> None:
        """A node's log, into the folder of the run under way (made by the first one);
        scenario.Busy (409) while /finish collects, and after it for all but each node's
        one final log: a finished run's files are not rewritten."""
        with self._log_lock:
            finished = self.summary is not None and not self._closing
            where = f" ({self.run_dir.name})" if self.run_dir is not None else ""
            if self._closing and not finished:
                raise scenario.Busy(f"the run is finishing: its folder{where} is being collected; "
                                    f"a log is taken while a run is under way, and once after /finish")
            if finished and name in self._final_logs:
                raise scenario.Busy(f"the run is finished: its folder{where} already holds {name}'s "
                                    f"final log; a node sends it once")
            if finished:
                self._final_logs.add(name)
            if self.run_dir is None:
                self.run_dir = results.new_run_dir(self.runs_dir, self.algorithm)
            path = results.safe_log_path(self.run_dir, name)
            results.write_run_file(self.run_dir, path.name, data)

    # ------------------------------------------------------------------ the workers
    def workers_call(self, kind: str, action: str) -> dict:
        """POST /<kind>/<action> (kind emulated or physical: stop, clear, reset, clear/tc)
        to every worker of that kind, in parallel; a failure names its worker (the first
        one raised, after every call has returned). The scenario stops first (the nodes go
        away); after a reset the workers reset are no longer deployed."""
        workers = self.tb.agents.workers(kind)
        self.stop_scenario(resume_paused=False)
        self.tb.forget_ready()      # stopped or removed apps answer no more

        def one(client):
            try:
                return client.control(action)
            except net.HttpError as e:
                return net.HttpError(e.method, e.url, e.status, f"{client.label}: {e.message}")
        out = dict(zip((c.label for c in workers), fan_out(one, workers)))
        for v in out.values():
            if isinstance(v, net.HttpError):
                raise v
        if action == "reset":
            self.tb.agents.forget(kind)
        return out
