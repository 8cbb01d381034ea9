"""The controller's HTTP API (EdgeTB's routes) over a deployed Testbed.

Routes answer GET (EdgeTB users type `curl localhost:3333/start?root=n1`) and POST.
Every request is checked first (controller/access.py): the admin token opens every
route, a node's credential only its own /heartbeat, /log, /print, (the root's) /finish
and the data bundles GET /data/<sha256>, a dashboard session cookie (POST /login) only the dashboard's read-only routes,
and a request without a token only from root or the sudo user on loopback.

The live dashboard's routes (/, /static/*, /api/*, /runs/*, /login) are thin hooks into
controller/dashboard.py, which holds their data and documents them.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from flask import Flask, Response, jsonify, make_response, redirect, request

from controller import access, dashboard, files, results, scenario, share, stopping
from controller.testbed import FANOUT, ROOT, DefinitionError, NotReady, Testbed, call_once, fan_out
from dml_app import net

CONF_DIR = ROOT / "dml_file" / "conf"
RUNS_DIR = ROOT / "runs"
LOG_LIMIT_BYTES = 16 * net.MiB      # a node's log posted to /log (the run scripts' --log-limit-mb)
AGENT_ANSWER_LIMIT = 16 * net.MiB   # an agent's JSON answer (/status of hundreds of nodes, /update/tc)
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


class Manager:
    """Base manager: conf pushing, start, finish (logs, plots, summary), links, reset."""

    algorithm = "dml"
    needs_root = True
    conf_dir = CONF_DIR      # where the dml_tool scripts write the node confs
    runs_dir = RUNS_DIR      # where /finish makes each run's folder
    log_limit_bytes = LOG_LIMIT_BYTES   # the largest body POST /log takes (413 beyond)
    screenshot_s = dashboard.SCREENSHOT_TIMEOUT_S   # dashboard.png at /finish: the browser's bound (0: none)
    file_roots: tuple = ()   # folders besides ROOT, the testbed's dir_name and conf_dir that
                             # requests may name files in (/update/tc?file=)

    def __init__(self, testbed: Testbed):
        self.tb = testbed
        self.app = Flask(f"edgetb-{self.algorithm}", static_folder=None)   # /static/ is the dashboard's
        self.server: net.Server | None = None
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
        self._stop = threading.Event()
        # Scenario (controller/scenario.py): the events run at each start, set by --scenario
        # (testbed.scenario) or POST /scenario; the scheduler of the run under way.
        self.scenario: list | None = getattr(testbed, "scenario", None)
        self.scheduler: scenario.Scheduler | None = None
        self.access = access.Access(testbed.token, names=self._names,
                                    port=lambda: self.tb.host_port,
                                    token_file=access.token_path(testbed.host_port))
        self.access.install(self.app)
        # After the access check: JSON routes take 1 MiB, /log log_limit_bytes (read at
        # each request); the server refuses more than the largest from the headers.
        self.body_limits = net.limit_bodies(self.app, routes={"/log": lambda: self.log_limit_bytes})
        self.dashboard = dashboard.Dashboard(self)
        self.data_store = share.DataStore()   # GET /data/<sha256> (serverless data parts)
        self._routes()

    def _names(self) -> set[str]:
        """Names and addresses this controller answers to besides its machine's own."""
        return {self.tb.ip, *self.tb.allowed_hosts, *(e.gateway for e in self.tb.emulators.values())}

    # ------------------------------------------------------------------ serving
    def serve(self) -> None:
        # Each dashboard stream holds a thread while it is open: room for all of them.
        self.server = net.serve(self.app, "0.0.0.0", self.tb.host_port, threads=16 + dashboard.STREAMS_MAX)
        self.dashboard.start()
        self.tb.host_port = self.server.port
        # The admin token, for the users that loopback does not trust (docs/security.md).
        self.access.token_file = access.token_path(self.server.port)
        access.write_token(self.access.token_file, self.tb.token)
        print(f"controller: serving on port {self.server.port}; live dashboard at "
              f"http://localhost:{self.server.port}/", flush=True)

    def close(self) -> None:
        self.stop_scenario(resume_paused=False)
        self.dashboard.close()          # its streams end before the server waits for them
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
        missing = [n for n in self._nodes() if not (self.conf_dir / f"{n}_{kind}.conf").exists()]
        have = [n for n in self._nodes() if n not in missing]
        if not have:
            raise FileNotFoundError(f"no {kind} confs in {self.conf_dir}: run dml_tool/"
                                    f"{'dataset_conf.py -d' if kind == 'dataset' else '<alg>_structure_conf.py -s'} first")
        confs = {}
        for n in have:
            raw = files.read_project_file(self.conf_dir / f"{n}_{kind}.conf", self.file_folders(),
                                          files.CONF_FILE_LIMIT, what=f"{kind} conf")
            confs[n] = self.conf_for(kind, n, net.parse_json_body(raw, what=f"{kind} conf {n}_{kind}.conf"))
        # Apps still starting (a push right after `tc finish`): wait for them, up to the
        # testbed's readiness deadline (NotReady naming them, HTTP 503), then send once.
        self.tb.wait_ready(have)

        def send(node):
            body = confs[node.name]
            call_once("POST", f"{node.ip}:{node.port}/conf/{kind}", json=body, token=self.tb.node_token(node.name),
                      timeout_s=120, max_bytes=net.JSON_LIMIT)
            return "ok"
        out = self._each(send, have)
        out.update({n: "skipped: no conf file" for n in missing})
        self.pushed.add(kind)      # a restarted node gets it again (_rejoin)
        return out

    def conf_for(self, kind: str, node: str, conf):
        """The conf of `kind` sent to `node`, from its conf file's; algorithms may add
        what only the controller knows (the base sends it as it is)."""
        return conf

    def start_training(self, root: str | None) -> str:
        nodes = self._nodes()
        if root is None and self.needs_root:
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

    def on_heartbeat(self, node: str, state, round_) -> None:
        """Algorithm managers may act on node states (gossip finishes when all are done)."""

    def summarize(self, metrics: dict, wall: float, sent: dict) -> dict:
        """Algorithm managers may override; the base uses the root's aggregate lines."""
        return results.summarize(self.algorithm, metrics, self.root, wall, sent)

    def update_links(self, path: str) -> dict:
        """Replace every link with those of a links file (relative: to the testbed's
        dir_name) read by controller/files.py: a regular file inside the project's
        folders, at most 16 MiB; anything else is refused naming only that rule."""
        raw = files.read_project_file(path, self.file_folders(), files.LINKS_FILE_LIMIT,
                                      what="links file", base=self.tb.dir_name)
        p = Path(path) if Path(path).is_absolute() else Path(self.tb.dir_name) / path
        links = net.parse_json_body(raw, want_object=False, what=str(p))
        problems = self.tb.link_problems(links if isinstance(links, dict) else {}, str(p))
        if not isinstance(links, dict):
            problems.append(f"{p}: expected an object {{node: [links]}}")
        if problems:
            raise DefinitionError(problems)
        out = {}
        for label, info in list(self.tb.deployed.items()):
            names = list(info["answer"]["nodes"])
            body = {"links": self.tb.agent_links(links, names)}
            out[label] = net.post_json(f"{info['addr']}/update/tc", body, token=self.tb.token, timeout_s=120,
                                       max_bytes=AGENT_ANSWER_LIMIT)
        self.tb.links = links
        return out

    # ------------------------------------------------------------------ faults (issue 11)
    NODE_FAULTS = ("kill", "pause", "resume", "restart")
    LINK_FAULTS = ("down", "up")
    _links_lock = threading.Lock()      # link_rate's read-modify-write of tb.links

    def _agent_of(self, node) -> tuple[str, str]:
        """(worker label, agent address) of a deployed node; ValueError otherwise."""
        if not isinstance(node, str) or node not in self._nodes():
            raise ValueError(f"unknown node {str(node)[:64]!r}")
        for label, info in list(self.tb.deployed.items()):
            if node in info["answer"]["nodes"]:
                return label, info["addr"]
        raise ValueError(f"node {node} is not deployed")

    def _has_link(self, src: str, dest: str) -> bool:
        return any(isinstance(l, dict) and l.get("dest") == dest for l in self.tb.links.get(src) or [])

    def _link_pairs(self, src, dest, both: bool) -> list[tuple[str, str]]:
        for n in (src, dest):
            self._agent_of(n)
        if not isinstance(both, bool):
            raise ValueError(f"both: expected true or false, got {str(both)[:16]!r}")
        pairs = [(src, dest)] + ([(dest, src)] if both else [])
        for s, d in pairs:
            if not self._has_link(s, d):
                raise ValueError(f"no link from {s} to {d} in the links (links.json)")
        return pairs

    def _agent_post(self, node: str, route: str, body: dict) -> tuple[bool, str, dict]:
        label, addr = self._agent_of(node)
        try:
            return True, label, net.post_json(f"{addr}{route}", body, token=self.tb.token, timeout_s=120,
                                              max_bytes=AGENT_ANSWER_LIMIT)
        except net.HttpError as e:
            return False, label, {"error": f"{label}: {e.message}", "status": e.status}

    def node_fault(self, node: str, action: str) -> dict:
        """kill, pause, resume or restart one node's app, live, through its agent
        (POST /node/fault). -> {"ok", "detail", "node", "action", "state"?}; ValueError
        for an unknown node or action. A restart returns once the app is started again
        (its readiness shows in /status)."""
        if action not in self.NODE_FAULTS:
            raise ValueError(f"action: {str(action)[:32]!r} is not one of {', '.join(self.NODE_FAULTS)}")
        self._agent_of(node)
        if action != "resume":
            with self.tb._ready_lock:
                self.tb.ready_names.discard(node)    # /conf/* waits for it to answer again
        ok, label, ans = self._agent_post(node, "/node/fault", {"node": node, "action": action})
        out = {"ok": ok, "node": node, "action": action}
        if ok:
            out.update(state=ans.get("state"), detail=f"{node}: {action} done on {label} (app {ans.get('state')})")
            if action == "restart":
                rejoin = self._rejoin(node)
                out["detail"] += f"; {rejoin}" if rejoin else ""
        else:
            out.update(detail=f"{node}: {action} failed: {ans['error']}", status=ans["status"])
        return out

    def _rejoin(self, node: str) -> str:
        """A restarted app starts with nothing: once it answers, give it again the confs
        pushed so far in this deployment (its own conf files), then on_rejoin. Returns
        what was done, in words ("" when nothing was pushed yet)."""
        # Only its own conf files: a node may have none of a kind (conf_optional).
        kinds = [k for k in ("dataset", "structure")
                 if k in self.pushed and (self.conf_dir / f"{node}_{k}.conf").exists()]
        if not kinds:
            return ""
        try:
            self.tb.wait_ready([node], deadline=time.monotonic() + self.tb.ready_deadline_s())
            n = self._nodes()[node]
            for kind in kinds:
                raw = files.read_project_file(self.conf_dir / f"{node}_{kind}.conf", self.file_folders(),
                                              files.CONF_FILE_LIMIT, what=f"{kind} conf")
                call_once("POST", f"{n.ip}:{n.port}/conf/{kind}", token=self.tb.node_token(node), timeout_s=120,
                          max_bytes=net.JSON_LIMIT,
                          json=self.conf_for(kind, node, net.parse_json_body(raw, what=f"{kind} conf {node}_{kind}.conf")))
            more = self.on_rejoin(node)
        except (net.HttpError, NotReady, OSError, ValueError) as e:
            return f"rejoin failed: {e}"
        return f"{' and '.join(kinds)} conf pushed again" + (f", {more}" if more else "")

    def conf_optional(self, kind: str) -> set[str]:
        """Nodes that need no conf of `kind`: a push that skips them (no conf file) is not
        a failure for --auto (controller/auto.py drive). Every node needs both here."""
        return set()

    def on_rejoin(self, node: str) -> str:
        """After a restarted node got its confs again: what the algorithm does to take it
        back (e.g. start it). Rootless algorithms start it when the run is under way;
        others wait for their root to call it in. Returns what was done, in words."""
        if self.needs_root or self.started_at is None or self.finished.is_set():
            return ""
        n = self._nodes()[node]
        call_once("GET", f"{n.ip}:{n.port}/start", token=self.tb.node_token(node), timeout_s=30, max_bytes=net.JSON_LIMIT)
        return "started"

    def link_fault(self, src: str, dest: str, action: str, both: bool = False) -> dict:
        """Take the link src -> dest (and dest -> src when both) down (0 bytes pass) or up
        (its rate as links.json has it now), through the agents (POST /link/fault).
        -> {"ok", "detail", "links": [{"src", "dest", "ok", ...}]}; ValueError for an
        unknown node, a link links.json does not have, or a bad action."""
        if action not in self.LINK_FAULTS:
            raise ValueError(f"action: {str(action)[:32]!r} is not one of {', '.join(self.LINK_FAULTS)}")
        done = []
        for s, d in self._link_pairs(src, dest, both):
            ok, label, ans = self._agent_post(s, "/link/fault", {"node": s, "dest": d, "action": action})
            done.append({"src": s, "dest": d, "ok": ok, "worker": label, **ans})
        ok = all(x["ok"] for x in done)
        detail = "; ".join(f"{x['src']}->{x['dest']} {action}" + ("" if x["ok"] else f" failed: {x['error']}")
                           for x in done)
        out = {"ok": ok, "detail": detail, "links": done}
        if not ok:
            out["status"] = next(x["status"] for x in done if not x["ok"])
        return out

    def link_rate(self, src: str, dest: str, bw: str, both: bool = False) -> dict:
        """Change the rate of src -> dest (and dest -> src when both) in place to bw (tc
        units as links.json: "10mbit", "5mbps"), through the agents' /update/tc; a link
        that is down stays down with its new rate. -> {"ok", "detail", "links"};
        ValueError for an unknown node or link, or a bad bw (the message names it)."""
        if not isinstance(bw, str):
            raise ValueError(f"bw: expected a tc rate string like \"10mbit\", got {str(bw)[:32]!r}")
        with self._links_lock:
            pairs = self._link_pairs(src, dest, both)
            new = {k: [dict(l) if isinstance(l, dict) else l for l in v] if isinstance(v, list) else v
                   for k, v in self.tb.links.items()}
            for s, d in pairs:
                for l in new[s]:
                    if isinstance(l, dict) and l.get("dest") == d:
                        l["bw"] = bw
            problems = self.tb.link_problems(new, "link_rate")
            if problems:
                raise ValueError("; ".join(problems))
            done = []
            for s in dict.fromkeys(s for s, _ in pairs):
                ok, label, ans = self._agent_post(s, "/update/tc", {"links": self.tb.agent_links(new, [s])})
                done.append({"src": s, "ok": ok, "worker": label, **ans})
            ok = all(x["ok"] for x in done)
            if ok:
                self.tb.links = new
        detail = ", ".join(f"{s}->{d}" for s, d in pairs) + f" at {bw}" + (
            "" if ok else ": " + "; ".join(x["error"] for x in done if not x["ok"]))
        out = {"ok": ok, "detail": detail, "links": done}
        if not ok:
            out["status"] = next(x["status"] for x in done if not x["ok"])
        return out

    def status(self) -> dict:
        now = time.time()
        nodes = {}

        def one(item):
            label, info = item
            try:
                return net.get_json(f"{info['addr']}/status", token=self.tb.token, timeout_s=10,
                                    max_bytes=AGENT_ANSWER_LIMIT)["nodes"]
            except net.HttpError as e:
                return {"error": str(e)}
        deployed = list(self.tb.deployed.items())
        agents = dict(zip((label for label, _ in deployed), fan_out(one, deployed)))
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

    # ------------------------------------------------------------------ routes
    def _routes(self) -> None:
        app = self.app
        any_ = ["GET", "POST"]

        @app.errorhandler(ValueError)
        def _bad(e):
            return jsonify(error=str(e)), 400

        @app.errorhandler(FileNotFoundError)
        def _missing(e):
            return jsonify(error=str(e)), 404

        @app.errorhandler(net.HttpError)
        def _upstream(e):
            return jsonify(error=str(e)), upstream_status(e.status)

        @app.errorhandler(scenario.Busy)
        def _busy(e):
            return jsonify(error=str(e)), 409

        @app.route("/scenario", methods=["GET", "POST", "DELETE"])
        def scenario_():
            """GET: the scenario and the events fired so far; POST (JSON body, a scenario
            document): set it for the next /start; DELETE: clear it. 409 during a run."""
            if request.method == "POST":
                doc = net.parse_json_body(request.get_data(), want_object=False, what="scenario")
                return jsonify(events=[e.as_dict() for e in self.set_scenario(doc)])
            if request.method == "DELETE":
                self.set_scenario(None)
                return jsonify(events=[])
            return jsonify(events=[e.as_dict() for e in self.scenario or []],
                           fired=list(self.scheduler.records) if self.scheduler else [])

        @app.errorhandler(NotReady)
        def _not_ready(e):
            return jsonify(error=str(e), not_answering=e.not_answering, exited=e.exited), 503

        def as_node(name) -> None:
            """A node credential speaks for its own node only."""
            me = access.who().node
            if me is not None and name != me:
                raise PermissionError(f"node {me} cannot speak for {str(name)[:40]!r}")

        @app.errorhandler(PermissionError)
        def _forbidden(e):
            return jsonify(error=str(e)), 403

        @app.route("/print", methods=any_)
        def print_():
            msg = request.args.get("msg", "") or request.get_data(as_text=True)
            who = access.who().node or request.args.get("name", request.remote_addr)
            # One line per call, whatever the message holds, and nothing a terminal acts
            # on: control characters (ESC, BEL, C1, ...) are shown escaped (\x1b).
            line = f"[{str(who)[:64]}] {' '.join(msg.split())[:2000]}"
            print(results.printable(line), flush=True)
            return "ok\n"

        @app.route("/heartbeat", methods=["POST"])
        def heartbeat():
            """A node's state; with "metrics" (its new records, dml_app/runtime.py) the
            answer is {"ack": the last of its records stored}."""
            body = request.get_json(silent=True)
            name, state, rnd = heartbeat_fields(body)
            error = heartbeat_error(body)
            live = self.dashboard.parse_heartbeat(body)
            as_node(name)
            ack = None
            if name in self._nodes():
                self.heartbeats[name] = {"t": time.time(), "state": state, "round": rnd, "error": error}
                ack = self.dashboard.heartbeat_metrics(name, live)
                self.on_heartbeat(name, state, rnd)
            return jsonify(ack=ack) if live is not None else "ok\n"

        @app.route("/conf/dataset", methods=any_)
        def conf_dataset():
            return jsonify(self.push_conf("dataset"))

        @app.route("/conf/structure", methods=any_)
        def conf_structure():
            return jsonify(self.push_conf("structure"))

        @app.route("/start", methods=any_)
        def start():
            return self.start_training(request.args.get("root")) + "\n"

        @app.route("/finish", methods=any_)
        def finish():
            me = access.who().node
            if me is not None and self.started_at is None:
                raise PermissionError(f"no run has started: node {me} cannot finish one")
            if me is not None and self.root is not None and me != self.root:
                raise PermissionError(f"only the root node {self.root} or the admin may finish the run, not {me}")
            if me is not None and me in self.heartbeats:   # it finished: its last heartbeat may predate that
                self.heartbeats[me] = {**self.heartbeats[me], "state": "finished"}
            return jsonify(self.finish())

        @app.route("/log", methods=["POST"])
        def log():
            """A node's log, into the folder of the run under way (made by the first one);
            409 while /finish collects, and after it for all but each node's one final log:
            a finished run's files are not rewritten."""
            name = request.args.get("name", "")
            as_node(name)
            with self._log_lock:
                finished = self.summary is not None and not self._closing
                where = f" ({self.run_dir.name})" if self.run_dir is not None else ""
                if self._closing and not finished:
                    return jsonify(error=f"the run is finishing: its folder{where} is being collected; "
                                         f"a log is taken while a run is under way, and once after /finish"), 409
                if finished and name in self._final_logs:
                    return jsonify(error=f"the run is finished: its folder{where} already holds {name}'s "
                                         f"final log; a node sends it once"), 409
                if finished:
                    self._final_logs.add(name)
                if self.run_dir is None:
                    self.run_dir = results.new_run_dir(self.runs_dir, self.algorithm)
                path = results.safe_log_path(self.run_dir, name)
                results.write_run_file(self.run_dir, path.name, request.get_data())
            return "ok\n"

        @app.route("/update/tc", methods=any_)
        def update_tc():
            f = request.args.get("file")
            if not f:
                raise ValueError("say which links file: /update/tc?file=links.json")
            return jsonify(self.update_links(f))

        def fault_answer(out: dict):
            return jsonify(out), 200 if out["ok"] else upstream_status(out.get("status"))

        def direction() -> bool:
            d = request.args.get("dir", "one")
            if d not in ("one", "both"):
                raise ValueError(f"dir: {d[:16]!r} is not one or both")
            return d == "both"

        @app.route("/fault/node", methods=any_)
        def fault_node():
            """/fault/node?node=n3&action=kill|pause|resume|restart"""
            return fault_answer(self.node_fault(request.args.get("node", ""), request.args.get("action", "")))

        @app.route("/fault/link", methods=any_)
        def fault_link():
            """/fault/link?src=n1&dest=n2&action=down|up[&dir=both]"""
            a = request.args
            return fault_answer(self.link_fault(a.get("src", ""), a.get("dest", ""), a.get("action", ""),
                                                both=direction()))

        @app.route("/fault/rate", methods=any_)
        def fault_rate():
            """/fault/rate?src=n1&dest=n2&bw=2mbit[&dir=both]"""
            a = request.args
            return fault_answer(self.link_rate(a.get("src", ""), a.get("dest", ""), a.get("bw", ""),
                                               both=direction()))

        def agents_call(kind: str, action: str) -> dict:
            """POST /<kind>/<action> to every worker of that kind, in parallel; a failure
            names its worker (the first one raised, after every call has returned)."""
            workers = [(label, addr) for label, addr in self.tb.workers()
                       if (kind == "emulated") == label.startswith("emulator")]
            self.stop_scenario(resume_paused=False)    # the nodes go away: no more events
            with self.tb._ready_lock:
                self.tb.ready_names.clear()      # stopped or removed apps answer no more

            def one(w):
                label, addr = w
                try:
                    return net.post_json(f"{addr}/{kind}/{action}", {}, token=self.tb.token, timeout_s=120,
                                         max_bytes=AGENT_ANSWER_LIMIT)
                except net.HttpError as e:
                    return net.HttpError(e.method, e.url, e.status, f"{label}: {e.message}")
            out = dict(zip((label for label, _ in workers), fan_out(one, workers)))
            for v in out.values():
                if isinstance(v, net.HttpError):
                    raise v
            return out

        @app.route("/emulated/stop", methods=any_)
        def emulated_stop():
            return jsonify(agents_call("emulated", "stop"))

        @app.route("/emulated/clear", methods=any_)
        def emulated_clear():
            return jsonify(agents_call("emulated", "clear"))

        @app.route("/emulated/reset", methods=any_)
        def emulated_reset():
            out = agents_call("emulated", "reset")
            for label in [l for l in self.tb.deployed if l.startswith("emulator")]:
                self.tb.deployed.pop(label)
            return jsonify(out)

        @app.route("/physical/stop", methods=any_)
        def physical_stop():
            return jsonify(agents_call("physical", "stop"))

        @app.route("/physical/clear/tc", methods=any_)
        def physical_clear_tc():
            return jsonify(agents_call("physical", "clear/tc"))

        @app.route("/physical/clear/nfs", methods=any_)
        def physical_clear_nfs():
            # Shares are bind mounts private to each node's mount namespace: they went
            # away with the node's app, so there is nothing to unmount.
            return jsonify({"cleared": "nothing mounted on the workers' hosts"})

        @app.route("/physical/reset", methods=any_)
        def physical_reset():
            out = agents_call("physical", "reset")
            for label in [l for l in self.tb.deployed if l.startswith("physical")]:
                self.tb.deployed.pop(label)
            return jsonify(out)

        @app.route("/status", methods=["GET"])
        def status():
            return jsonify(self.status())

        # ---------------------------------------------------------- dashboard (issue 12)
        dash = self.dashboard

        def no_cache(resp):
            resp.headers["Cache-Control"] = "no-cache"
            resp.headers["X-Content-Type-Options"] = "nosniff"
            return resp

        def api(obj):
            dash.watched()
            return no_cache(jsonify(obj))

        @app.route("/", methods=["GET"])
        def dashboard_page():
            try:
                data, mime = dash.static_file("index.html")
            except FileNotFoundError:
                return ("the dashboard page is not installed (controller/static/index.html is missing); "
                        "the data is at /api/state, /api/metrics, /api/events, /api/fidelity, /api/runs\n", 404)
            resp = no_cache(make_response(data))
            resp.headers["Content-Type"] = mime
            resp.headers["X-Frame-Options"] = "DENY"
            return resp

        @app.route("/static/<path:rel>", methods=["GET"])
        def dashboard_static(rel):
            data, mime = dash.static_file(rel)
            resp = no_cache(make_response(data))
            resp.headers["Content-Type"] = mime
            return resp

        @app.route("/api/state", methods=["GET"])
        def api_state():
            dash.watched()
            return no_cache(Response(dash.state_json(), mimetype="application/json"))

        @app.route("/api/metrics", methods=["GET"])
        def api_metrics():
            raw = request.args.get("after", "0")
            if not raw.isdigit() or len(raw) > 19:
                raise ValueError(f"after: expected a record sequence number (0 or more), got {raw[:32]!r}")
            return api(dash.metrics_page(int(raw)))

        @app.route("/api/events", methods=["GET"])
        def api_events():
            return api({"events": dash.events()})

        @app.route("/api/fidelity", methods=["GET"])
        def api_fidelity():
            return api(dash.fidelity_report())

        @app.route("/api/runs", methods=["GET"])
        def api_runs():
            return api(dash.runs())

        @app.route("/runs/<name>/<file>", methods=["GET"])
        def run_file(name, file):
            data, mime = dash.run_file(name, file)
            resp = no_cache(make_response(data))
            resp.headers["Content-Type"] = mime
            return resp

        @app.route("/api/stream", methods=["GET"])
        def api_stream():
            """Server-Sent Events for one page; only for a client asking for an event
            stream (EventSource sends Accept: text/event-stream), at most STREAMS_MAX."""
            if "text/event-stream" not in request.headers.get("Accept", ""):
                return ("this is a Server-Sent Events stream: send Accept: text/event-stream "
                        "(a browser's EventSource does); for one answer use /api/state\n", 406)
            body = dash.open_stream()
            if body is None:
                return (f"too many dashboard streams open (at most {dashboard.STREAMS_MAX}): "
                        f"close a page, or poll /api/state\n", 503, {"Retry-After": "10"})
            return Response(body, mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        @app.route("/login", methods=["POST"])
        def login():
            """The admin token (form field `token`) -> a dashboard session cookie."""
            given = request.form.get("token", "")
            if not net.same_token(given.strip(), self.tb.token):
                return (f"wrong admin token (it is in {self.access.token_file} on the controller's "
                        f"machine)\n", 401)
            html = "text/html" in request.headers.get("Accept", "")
            resp = redirect("/", code=303) if html else jsonify(ok=True)
            resp.set_cookie(self.access.cookie_name, self.access.new_session(), max_age=access.SESSION_S,
                            httponly=True, samesite="Strict", path="/")
            return resp

        @app.route("/share/<digest>", methods=["GET"])
        def share_archive(digest):
            # A content-addressed archive of a shared folder (controller/share.py), for
            # agents on other machines; token-checked like every route.
            data = self.tb.share_store.get(digest)
            if data is None:
                return jsonify(error=f"no shared archive {digest[:80]!r} on this controller"), 404
            return data, 200, {"Content-Type": "application/x-tar"}

        @app.route("/data/<digest>", methods=["GET"])
        def data_bundle(digest):
            # A content-addressed data bundle (share.DataStore: a serverless worker's data
            # part); a node credential opens it (access.node_route), any node any bundle.
            data = self.data_store.get(digest)
            if data is None:
                return jsonify(error=f"no data bundle {digest[:80]!r} on this controller"), 404
            return data, 200, {"Content-Type": "application/octet-stream"}
