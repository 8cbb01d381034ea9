"""The data side of the controller's live dashboard: JSON endpoints, one
Server-Sent Events stream, the page's static files, live metrics, node and link usage,
and the link fidelity check.

Routes (registered in controller/manager.py, behind controller/access.py; all GET and
read-only but POST /login):

    /                   the page (controller/static/index.html)
    /static/<path>      files under controller/static/ only
    /api/state          run, nodes (state, round, heartbeat age, cpu, memory), links
                        (configured rate, achieved goodput, load) -- bounded at 300 nodes
    /api/metrics?after=SEQ   the run's metrics records, in arrival order, pages of 5000
    /api/events         the scenario events fired in this run
    /api/fidelity       links saturated >= FIDELITY_MIN_S: goodput against rate x 1448/1514
    /api/runs           the runs under runs/ with their summaries and plots
    /runs/<name>/<file> a run's summary.json or one of its PNGs
    /api/stream         SSE: state (each sample), metrics, events, fidelity, pings

Where the data comes from:
* metrics: the nodes' heartbeats carry the records written since the last one the
  controller acknowledged (dml_app/runtime.py); `heartbeat_metrics` stores each once (by
  its per-node sequence number) and answers the ack;
* cpu, memory and link counters: one sampler thread calls every agent's GET /usage
  (worker/agent.py: cgroup cpu time and memory of each node, HTB class bytes and packets
  of each link over netlink), at most SAMPLE_FANOUT at once, every SAMPLE_S, only while
  a page watches (a stream, or an API read in the last WATCH_S) or a run is under way;
  rates are counter deltas over the agent's own clock.

"Achieved" is TCP goodput, what iperf3 and an application see: the class's bytes less
TCP_FRAME_OVERHEAD per packet (Ethernet + IP + TCP with timestamps), so a link of rate R
that is full achieves R x 1448/1514, the ideal the fidelity check compares with.
"""
from __future__ import annotations

import json
import os
import re
import stat as stat_
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from controller import browser
from controller.topology import EmulatedNode
from dml_app import net

SAMPLE_S = 1.0                 # sampling interval (stretched when one sample costs more than half of it)
SAMPLE_FANOUT = 8              # agents asked at once
AGENT_TIMEOUT_S = 5.0
USAGE_ANSWER_MAX = 64 * net.MiB    # an agent's /usage answer (300 nodes full mesh: ~4 MiB)
WATCH_S = 30.0                 # the sampler keeps going this long after the last API read
LINKS_MAX = 2000               # links in a state object (the most loaded)
RECORDS_MAX = 200_000          # metrics records kept per run (the oldest go first)
PAGE_RECORDS = 5000            # records per /api/metrics answer or metrics message
PAGE_BYTES = 1 * net.MiB       # ... and at most this much JSON
STREAMS_MAX = 8                # SSE streams at once (more get 503)
PING_S = 15.0
FIDELITY_EVERY_S = 5.0         # a stream sends the fidelity object at most this often
FIDELITY_MIN_S = 3.0           # seconds in a row a link must be saturated to be judged
FIDELITY_TOLERANCE_PCT = 2.0
SATURATED = 0.9                # of the ideal goodput
TCP_PAYLOAD, TCP_FRAME = 1448, 1514
TCP_FRAME_OVERHEAD = TCP_FRAME - TCP_PAYLOAD   # 66 bytes a frame: Ethernet 14, IP 20, TCP 20 + 12
SCREENSHOT_TIMEOUT_S = 30.0
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_MAX = 16 * net.MiB
RUNS_MAX = 100
RUN_FILE_MAX = 64 * net.MiB
SUMMARY_MAX = 1 * net.MiB
ERROR_CHARS = 300              # a node's error message in a state object
MAX_SEQ = 2**62
HB_RECORDS_MAX = 1000          # records one heartbeat may carry (the runtime sends <= 500)

MIME = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
        ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
        ".json": "application/json", ".map": "application/json", ".svg": "image/svg+xml",
        ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2", ".woff": "font/woff",
        ".txt": "text/plain; charset=utf-8", ".md": "text/plain; charset=utf-8"}
SAFE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
RUN_FILE = re.compile(r"^(summary\.json|[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\.png)$")


def ideal_bps(rate_bps: float) -> float:
    """TCP goodput of a full link of rate_bps: full-size frames carry 1448 of 1514 bytes."""
    return rate_bps * TCP_PAYLOAD / TCP_FRAME


def _count(v, hi: int = MAX_SEQ) -> int:
    """A counter from an agent: an int in [0, hi] (fast: called for every link each second)."""
    if type(v) is not int or not 0 <= v <= hi:
        raise ValueError(f"counter must be an integer in [0, {hi}], got {str(v)[:40]!r}")
    return v


def _sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _record(rec, i: int) -> dict:
    """A metrics record from a node, its known fields checked; ValueError otherwise."""
    if not isinstance(rec, dict):
        raise ValueError(f"heartbeat metrics record {i}: not an object")
    rec = dict(rec)
    ev = rec.get("event")
    if not isinstance(ev, str) or not 0 < len(ev) <= 64:
        raise ValueError(f"heartbeat metrics record {i}: 'event' must be a string of 1..64 characters")
    if "round" in rec:
        rec["round"] = net.number(rec["round"], f"heartbeat metrics record {i} round", 0, 10**9, integer=True)
    if "t" in rec:
        rec["t"] = net.number(rec["t"], f"heartbeat metrics record {i} t", 0, 1e11)
    for k in ("accuracy", "loss"):
        if rec.get(k) is not None:
            rec[k] = net.number(rec[k], f"heartbeat metrics record {i} {k}", -1e300, 1e300)
    if rec.get("layer") is not None:
        rec["layer"] = net.number(rec["layer"], f"heartbeat metrics record {i} layer", 0, 64, integer=True)
    return rec


class Fidelity:
    """Per link (and rate): streaks of samples where the link was saturated; those that
    lasted FIDELITY_MIN_S or more count. goodput = their bits / their seconds. The first
    and last sample of a streak are left out: their windows hold the flow's start or end
    (partly idle, though >= SATURATED), which would pull the goodput down."""

    def __init__(self):
        self.lock = threading.Lock()
        self.links: dict[tuple[str, str, int], dict] = {}
        self.version = 0          # bumped when a judged link's numbers change

    def clear(self) -> None:
        with self.lock:
            self.links.clear()
            self.version += 1

    def add(self, src: str, dst: str, rate_bps: int, dt: float, goodput_bps: float, down: bool) -> None:
        key = (src, dst, rate_bps)
        with self.lock:
            st = self.links.get(key)
            full = not down and rate_bps > 0 and goodput_bps >= SATURATED * ideal_bps(rate_bps)
            if st is None:
                if not full:
                    return
                st = self.links[key] = {"run_s": 0.0, "run_bits": 0.0, "s": 0.0, "bits": 0.0,
                                        "in_run": False, "last": None}
            if not full:
                self._close(st)
            elif not st["in_run"]:          # a streak's first sample: left out
                st["in_run"] = True
            else:
                if st["last"] is not None:  # the previous one was not the streak's last
                    last_dt, last_bits = st["last"]
                    st["run_s"] += last_dt
                    st["run_bits"] += last_bits
                    if st["run_s"] >= FIDELITY_MIN_S:
                        self.version += 1
                st["last"] = (dt, goodput_bps * dt)

    @staticmethod
    def _close(st: dict) -> None:
        if st["run_s"] >= FIDELITY_MIN_S:
            st["s"] += st["run_s"]
            st["bits"] += st["run_bits"]
        st["run_s"] = st["run_bits"] = 0.0
        st["in_run"], st["last"] = False, None

    def report(self) -> dict:
        out = []
        with self.lock:
            for (src, dst, rate), st in sorted(self.links.items()):
                s, bits = st["s"], st["bits"]
                if st["run_s"] >= FIDELITY_MIN_S:       # a streak still going counts too
                    s, bits = s + st["run_s"], bits + st["run_bits"]
                if s < FIDELITY_MIN_S:
                    continue
                ideal = ideal_bps(rate)
                good = bits / s
                err = (good / ideal - 1) * 100
                out.append({"src": src, "dst": dst, "rate_bps": rate, "ideal_bps": round(ideal),
                            "goodput_bps": round(good), "saturated_s": round(s, 1),
                            "error_pct": round(err, 2), "ok": abs(err) <= FIDELITY_TOLERANCE_PCT})
        return {"tolerance_pct": FIDELITY_TOLERANCE_PCT, "min_saturated_s": FIDELITY_MIN_S,
                "links": out}


class Dashboard:
    """Everything the page reads; one per Manager (`manager.dashboard`).

    `agents`: the workers' agent clients (controller/agents.py Agents) the sampler reads
    /usage from; `nodes`: a function giving the testbed's nodes {name: node}; `port`: a
    function giving the controller's port (the screenshot's page)."""

    def __init__(self, manager, *, agents, nodes, port):
        self.m = manager
        self.agents, self.nodes, self.port = agents, nodes, port
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)     # new sample, records or events
        # metrics of the current run: records[i] has seq first_seq + i
        self.records: list[dict] = []
        self.first_seq = 1
        self.next_seq = 1
        self.records_dropped = 0       # by this store (RECORDS_MAX) in this run
        self.records_refused = 0       # records whose fields were not right (parse_heartbeat)
        self.node_seq: dict[str, tuple[str, int]] = {}    # node -> (boot, last seq stored)
        self.nodes_dropped: dict[str, int] = {}           # records nodes could not send live
        # samples
        self.sample_no = 0
        self.sample_s = SAMPLE_S
        self.sample_cost_s: float | None = None
        self.usage: dict[str, dict] = {}          # node -> {"state", "cpu_pct", "mem_mb", "worker"}
        self.link_now: dict[tuple[str, str], dict] = {}
        self._prev_cpu: dict[str, tuple[float, int]] = {}
        self._prev_link: dict[tuple[str, str], tuple[float, int, int]] = {}
        self.agent_errors: dict[str, str] = {}
        self.fidelity = Fidelity()
        self.rounds_target: int | None = None
        self._state_cache: tuple[int, float, str] | None = None
        self._last_read = 0.0
        self.streams = 0
        self.finishing = False         # /finish is taking the page's picture: show the run as finished
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None    # the sampler's agent calls (kept: keep-alive)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._pool = ThreadPoolExecutor(SAMPLE_FANOUT, thread_name_prefix="dashboard-agents")
            self._thread = threading.Thread(target=self._sampler, daemon=True, name="dashboard-sampler")
            self._thread.start()

    def close(self) -> None:
        """Stop the sampler and end every stream (within a second)."""
        self._stop.set()
        self._wake.set()
        with self.changed:
            self.changed.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(AGENT_TIMEOUT_S + 2)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def watched(self) -> None:
        """An API read: keep sampling for WATCH_S."""
        self._last_read = time.monotonic()
        self._wake.set()

    def new_run(self) -> tuple:
        """/start: the records and fidelity of the run before go; returns them so that a
        start that failed everywhere can put them back (restore)."""
        with self.lock:
            before = (self.records, self.first_seq, self.records_dropped, self.rounds_target)
            self.records, self.first_seq, self.records_dropped = [], self.next_seq, 0
            self.rounds_target = self._target_rounds()
            self.changed.notify_all()
        self.fidelity.clear()
        self._wake.set()
        return before

    def restore(self, before: tuple) -> None:
        with self.lock:
            self.records, self.first_seq, self.records_dropped, self.rounds_target = before
            self.next_seq = max(self.next_seq, self.first_seq + len(self.records))

    def _target_rounds(self) -> int | None:
        """The run's rounds as its confs say ("sync" of the root's structure conf, or of
        any node's when the algorithm has no root); None when they do not say."""
        from controller import files

        m = self.m
        names = [m.root] if m.root else sorted(self.nodes())[:1]
        for n in names:
            try:
                raw = files.read_project_file(m.conf_dir / f"{n}_structure.conf", m.file_folders(),
                                              files.CONF_FILE_LIMIT, what="structure conf")
                sync = net.parse_json_body(raw, what="structure conf").get("sync")
                return net.number(sync, "sync", 1, 10**9, integer=True)
            except (OSError, ValueError):
                return None
        return None

    # ------------------------------------------------------------------ live metrics
    def parse_heartbeat(self, body) -> dict | None:
        """The 'metrics' of a /heartbeat body, checked: {"boot": str, "records": [[seq,
        {event, round?, t?, accuracy?, loss?, layer?, ...}], ...], "dropped": int} or None;
        ValueError (400) naming what is wrong in its shape; a record whose fields are not
        what they should be (an event that is not a short string, a round, t, accuracy,
        loss or layer that is not a number in range) becomes None: skipped when stored,
        acknowledged all the same. Nothing is stored here."""
        live = body.get("metrics") if isinstance(body, dict) else None
        if live is None:
            return None
        if not isinstance(live, dict):
            raise ValueError("heartbeat 'metrics' must be an object {boot, records, dropped}")
        boot, recs = live.get("boot"), live.get("records")
        if not isinstance(boot, str) or not 0 < len(boot) <= 64:
            raise ValueError(f"heartbeat metrics 'boot' must be a string of 1..64 characters, got {str(boot)[:40]!r}")
        if not isinstance(recs, list) or len(recs) > HB_RECORDS_MAX:
            raise ValueError(f"heartbeat metrics 'records' must be a list of at most {HB_RECORDS_MAX} [seq, record]")
        dropped = net.number(live.get("dropped", 0), "heartbeat metrics 'dropped'", 0, MAX_SEQ, integer=True)
        out, last, refused = [], 0, 0
        for i, item in enumerate(recs):
            if not isinstance(item, list) or len(item) != 2:
                raise ValueError(f"heartbeat metrics record {i}: expected [seq, {{...}}]")
            seq = net.number(item[0], f"heartbeat metrics record {i} seq", 1, MAX_SEQ, integer=True)
            if seq <= last:
                raise ValueError(f"heartbeat metrics record {i}: seq {seq} does not follow {last}")
            last = seq
            try:
                out.append((seq, _record(item[1], i)))
            except ValueError:
                # A role's odd record is left out (and counted), not the node's heartbeats:
                # its seq is acknowledged all the same, so it is not sent again.
                out.append((seq, None))
                refused += 1
        return {"boot": boot, "records": out, "dropped": dropped, "refused": refused}

    def heartbeat_metrics(self, node: str, live: dict | None) -> int | None:
        """Store the records of a checked heartbeat (parse_heartbeat) that this controller
        does not have yet; -> the ack (last seq stored for the node's app), None if none."""
        if live is None:
            return None
        with self.changed:
            boot, last = self.node_seq.get(node, ("", 0))
            if boot != live["boot"]:
                last = 0                    # a new app (restarted): it numbers from 1 again
            added = 0
            for seq, rec in live["records"]:
                if seq <= last:
                    continue                # sent again after a lost answer: stored already
                last = seq
                if rec is None:
                    self.records_refused += 1
                    continue
                rec.pop("seq", None)
                rec["node"] = node          # a node speaks for itself only
                self.records.append({"seq": self.next_seq, **rec})
                self.next_seq += 1
                added += 1
            self.node_seq[node] = (live["boot"], last)
            self.nodes_dropped[node] = live["dropped"]
            over = len(self.records) - RECORDS_MAX
            if over > 0:
                del self.records[:over]
                self.first_seq += over
                self.records_dropped += over
            if added:
                self.changed.notify_all()
            return last

    def metrics_page(self, after: int) -> dict:
        """{"seq": last seq, "records": those after `after`, at most PAGE_RECORDS and
        PAGE_BYTES of JSON}."""
        with self.lock:
            start = max(0, after + 1 - self.first_seq)
            chunk = self.records[start:start + PAGE_RECORDS]
            last_seq = self.next_seq - 1
        out, size = [], 0
        for r in chunk:
            n = len(_dumps(r)) + 1
            if out and size + n > PAGE_BYTES:
                break
            out.append(r)
            size += n
        return {"seq": out[-1]["seq"] if out else last_seq, "last_seq": last_seq, "records": out}

    # ------------------------------------------------------------------ events
    def events(self) -> list[dict]:
        sched = self.m.scheduler
        if sched is None or self.m.started_at is None or getattr(sched, "t0", None) != self.m.started_at:
            return []
        return list(sched.records)

    # ------------------------------------------------------------------ sampling
    def _active(self) -> bool:
        m = self.m
        running = m.started_at is not None and not m.finished.is_set()
        return self.streams > 0 or running or time.monotonic() - self._last_read < WATCH_S

    def _sampler(self) -> None:
        while not self._stop.is_set():
            if not self._active():
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            t0 = time.monotonic()
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - the sampler must not die; say why once
                self.agent_errors["sampler"] = f"{type(e).__name__}: {e}"[:300]
            cost = time.monotonic() - t0
            self.sample_cost_s = round(cost, 4)
            # At most half of one core: a sample that costs more stretches the interval.
            self.sample_s = max(SAMPLE_S, 2 * cost)
            self._stop.wait(max(0.05, self.sample_s - cost))

    def sample(self) -> None:
        """One sample: every agent's /usage (bounded fan-out, each with a deadline), then
        cpu %, memory, and per link the achieved goodput, load, and the fidelity streaks."""
        agents = self.agents.deployed()

        def one(agent):
            try:
                return agent.label, agent.usage(AGENT_TIMEOUT_S, USAGE_ANSWER_MAX), None
            except (net.HttpError, ValueError) as e:
                return agent.label, None, str(e)[:300]
        got = []
        if agents and self._pool is not None:
            got = list(self._pool.map(one, agents, timeout=AGENT_TIMEOUT_S * 2 * (1 + len(agents) // SAMPLE_FANOUT)))
        elif agents:        # sample() called without start() (tests)
            with ThreadPoolExecutor(min(SAMPLE_FANOUT, len(agents))) as ex:
                got = list(ex.map(one, agents))
        usage, links, errors = {}, {}, {}
        for label, ans, err in got:
            if err is not None:
                errors[label] = err
                continue
            try:
                self._read_answer(label, ans, usage, links)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                errors[label] = f"bad /usage answer: {e}"[:300]
        if not errors:      # forget the counters of links and nodes that went (a reset)
            self._prev_link = {k: v for k, v in self._prev_link.items() if k in links}
            self._prev_cpu = {k: v for k, v in self._prev_cpu.items() if k in usage}
        with self.changed:
            self.usage, self.link_now, self.agent_errors = usage, links, errors
            self.sample_no += 1
            self.changed.notify_all()

    def _read_answer(self, label: str, ans: dict, usage: dict, links: dict) -> None:
        nodes = ans.get("nodes")
        if not isinstance(nodes, dict):
            raise ValueError("no 'nodes' object")
        known = self.nodes()
        for name, nd in nodes.items():
            if name not in known or not isinstance(nd, dict):
                continue
            t = net.number(nd.get("t"), f"{name} t", 0, 1e12)
            state = nd.get("state") if isinstance(nd.get("state"), str) else None
            cpu = nd.get("cpu_ns")
            cpu = None if cpu is None else net.number(cpu, f"{name} cpu_ns", 0, MAX_SEQ, integer=True)
            mem = nd.get("mem_bytes")
            mem = None if mem is None else net.number(mem, f"{name} mem_bytes", 0, MAX_SEQ, integer=True)
            pct = None
            prev = self._prev_cpu.get(name)
            if cpu is not None:
                if prev is not None and t > prev[0] and cpu >= prev[1]:
                    pct = round((cpu - prev[1]) / 1e9 / (t - prev[0]) * 100, 1)
                self._prev_cpu[name] = (t, cpu)
            usage[name] = {"state": state[:32] if state else None, "cpu_pct": pct,
                           "mem_mb": None if mem is None else round(mem / 2**20, 1), "worker": label}
        lk = ans.get("links")
        if not isinstance(lk, dict):
            raise ValueError("no 'links' object")
        for src, entry in lk.items():
            if src not in known or not isinstance(entry, dict) or not isinstance(entry.get("links"), list):
                continue
            t = net.number(entry.get("t"), f"{src} links t", 0, 1e12)
            for item in entry["links"]:
                if not isinstance(item, list) or len(item) != 5 or not isinstance(item[0], str):
                    raise ValueError(f"{src}: a link is not [dest, bytes, packets, rate_bps, down]")
                dst = item[0]
                b, p, rate = _count(item[1]), _count(item[2]), _count(item[3], 10**13)
                down = item[4] is True
                key = (src, dst)
                prev = self._prev_link.get(key)
                self._prev_link[key] = (t, b, p)
                now = {"src": src, "dst": dst[:64], "rate_bps": rate, "achieved_bps": None, "wire_bps": None,
                       "load": None, "down": down}
                if prev is not None and t > prev[0] and b >= prev[1]:
                    dt = t - prev[0]
                    db, dp = b - prev[1], (p - prev[2]) % 2**32
                    wire = db * 8 / dt
                    good = max(0, db - TCP_FRAME_OVERHEAD * dp) * 8 / dt
                    now.update(achieved_bps=round(good), wire_bps=round(wire),
                               load=round(wire / rate, 3) if rate else None)
                    self.fidelity.add(src, dst, rate, dt, good, down)
                links[key] = now

    # ------------------------------------------------------------------ state
    def _role(self, node) -> str | None:
        for a in getattr(node, "cmd", None) or []:
            if isinstance(a, str) and a.endswith(".py"):
                return Path(a).stem[:64]
        return None

    def state(self) -> dict:
        """The /api/state object (bounded: LINKS_MAX links, ERROR_CHARS per error)."""
        m = self.m
        now = time.time()
        with self.lock:
            usage, link_now, sample_no = self.usage, self.link_now, self.sample_no
        nodes = []
        for name, n in self.nodes().items():
            hb = m.heartbeats.get(name)
            u = usage.get(name, {})
            app = u.get("state")
            if app in ("exited", "paused", "gone", "stopped", "created"):
                st = app
            elif hb and hb.get("state"):
                st = hb["state"]
            else:
                st = app or "not deployed"
            kind = getattr(n.emulator, "backend", None) if isinstance(n, EmulatedNode) else "physical"
            err = (hb or {}).get("error")
            nodes.append({"name": name, "role": self._role(n), "kind": kind, "worker": u.get("worker"),
                          "state": str(st)[:64], "round": (hb or {}).get("round"),
                          "hb_age_s": round(now - hb["t"], 1) if hb else None,
                          "cpu_pct": u.get("cpu_pct"), "mem_mb": u.get("mem_mb"),
                          "error": err[:ERROR_CHARS] if err else None})
        links = list(link_now.values())
        total = len(links)
        cut = total > LINKS_MAX
        if cut:
            links = sorted(links, key=lambda l: -(l["wire_bps"] or 0))[:LINKS_MAX]
        run = {"algorithm": m.algorithm, "root": m.root, "started": m.started_at,
               "finished": m.finished.is_set() or self.finishing, "run_dir": str(m.run_dir) if m.run_dir else None,
               "rounds": self.rounds_target}
        out = {"t": round(now, 3), "run": run, "nodes": nodes, "links": links, "links_total": total,
               "sample_s": round(self.sample_s, 3), "sample_no": sample_no,
               "sample_cost_s": self.sample_cost_s, "agent_errors": dict(self.agent_errors),
               "metrics_seq": self.next_seq - 1, "metrics_refused": self.records_refused,
               "metrics_dropped": self.records_dropped + sum(self.nodes_dropped.values())}
        if cut:
            out["links_cut"] = True
        return out

    def state_json(self) -> str:
        """The state as JSON, made once per sample for every stream."""
        cached = self._state_cache
        if cached is not None and cached[0] == self.sample_no and time.monotonic() - cached[1] < SAMPLE_S:
            return cached[2]
        text = _dumps(self.state())
        self._state_cache = (self.sample_no, time.monotonic(), text)
        return text

    def fidelity_report(self) -> dict:
        return self.fidelity.report()

    # ------------------------------------------------------------------ files
    def static_file(self, rel: str) -> tuple[bytes, str]:
        """(content, MIME type) of controller/static/<rel>; FileNotFoundError (404) for a
        path that is not a plain relative one of safe names, leaves the folder (a symlink
        too), is not a regular file, or is larger than STATIC_MAX."""
        parts = rel.split("/")
        if not rel or len(rel) > 512 or not all(SAFE_PART.match(p) for p in parts):
            raise FileNotFoundError(f"no such file under static/: {rel[:100]!r}")
        base = STATIC_DIR.resolve()
        path = (base / rel).resolve()
        if base not in path.parents:
            raise FileNotFoundError(f"no such file under static/: {rel[:100]!r}")
        return _read_regular(path, STATIC_MAX, f"static/{rel[:100]}"), \
            MIME.get(path.suffix.lower(), "application/octet-stream")

    def runs(self) -> dict:
        base = Path(self.m.runs_dir)
        found = []
        try:
            with os.scandir(base) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False) and SAFE_PART.match(e.name):
                        found.append((e.stat(follow_symlinks=False).st_mtime, e.name))
        except OSError:
            return {"runs": []}
        out = []
        for _, name in sorted(found, reverse=True)[:RUNS_MAX]:
            d = base / name
            summary = None
            try:
                s = json.loads(_read_regular(d / "summary.json", SUMMARY_MAX, "summary.json"))
                if isinstance(s, dict):
                    summary = {k: s.get(k) for k in ("algorithm", "rounds", "final_accuracy", "wall_seconds")}
            except (OSError, ValueError):
                pass
            try:
                plots = sorted(p.name for p in d.iterdir() if p.suffix == ".png" and RUN_FILE.match(p.name)
                               and p.is_file() and not p.is_symlink())[:20]
            except OSError:
                plots = []
            out.append({"name": name, "summary": summary, "plots": plots, "dashboard": "dashboard.png" in plots})
        return {"runs": out}

    def run_file(self, name: str, file: str) -> tuple[bytes, str]:
        if not SAFE_PART.match(name) or not RUN_FILE.match(file):
            raise FileNotFoundError("a run's files are runs/<run>/summary.json and runs/<run>/<plot>.png")
        base = Path(self.m.runs_dir).resolve()
        path = (base / name / file).resolve()
        if path.parent.parent != base:
            raise FileNotFoundError(f"no run file {name[:64]}/{file[:64]}")
        return _read_regular(path, RUN_FILE_MAX, f"{name[:64]}/{file[:64]}"), \
            "application/json" if file.endswith(".json") else "image/png"

    # ------------------------------------------------------------------ stream
    def open_stream(self):
        """The SSE body for one page, or None past STREAMS_MAX (the route answers 503)."""
        with self.lock:
            if self.streams >= STREAMS_MAX or self._stop.is_set():
                return None
            self.streams += 1
        self._wake.set()
        return _Stream(self)

    # ------------------------------------------------------------------ finish
    def screenshot(self, run_dir: Path) -> str | None:
        """dashboard.png of the page into run_dir through controller/browser.py; None when
        saved, else why not (no chromium, ...). Never raises, never waits past its timeout."""
        timeout = float(getattr(self.m, "screenshot_s", SCREENSHOT_TIMEOUT_S))
        if os.environ.get("EDGETB_SCREENSHOT", "1") == "0" or timeout <= 0:
            return "screenshots are off (EDGETB_SCREENSHOT=0 or Manager.screenshot_s = 0)"
        port = self.port()
        out: dict = {}
        # The page shows the run as finished (body[data-finished]) and is drawn (ready):
        # the state says finished from here, though /finish returns only after the picture.
        wait_for = f"({browser.READY_JS}) && document.body.dataset.finished === '1'"

        def run():
            try:
                out["why"] = browser.screenshot(f"http://127.0.0.1:{port}/", Path(run_dir) / "dashboard.png",
                                                timeout_s=timeout, wait_for=wait_for)
            except Exception as e:  # noqa: BLE001 - finish must go on whatever the browser did
                out["why"] = f"{type(e).__name__}: {e}"
        self.watched()
        self.finishing = True
        self._state_cache = None
        try:
            t = threading.Thread(target=run, daemon=True, name="dashboard-screenshot")
            t.start()
            t.join(timeout + 5)
        finally:
            self.finishing = False
        if t.is_alive():
            return f"no screenshot within {timeout:g} s"
        why = out.get("why")
        return None if why is None else str(why)[:300]


class _Stream:
    """One page's event stream (an iterator waitress writes as it goes); close() -- by
    waitress when the client went or the stream ended -- frees its slot, once."""

    def __init__(self, d: Dashboard):
        self.d = d
        self._closed = False
        self._gen = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self._gen)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self.d.lock:
                self.d.streams -= 1
            self._gen.close()

    def _metrics(self, after: int):
        while True:
            page = self.d.metrics_page(after)
            if not page["records"]:
                return after
            after = page["records"][-1]["seq"]
            yield _sse("metrics", _dumps({"seq": after, "records": page["records"]}))

    def _run(self):
        d = self.d
        yield b"retry: 3000\n\n"
        yield _sse("state", d.state_json())
        sent_sample = d.sample_no
        after = yield from self._metrics(0)
        events = d.events()
        yield _sse("events", _dumps({"events": events}))
        n_events = len(events)
        fid = d.fidelity_report()
        yield _sse("fidelity", _dumps(fid))
        fid_version, fid_at = d.fidelity.version, time.monotonic()
        ping_at = time.monotonic()
        first_seq = d.first_seq
        while not d._stop.is_set():
            with d.changed:
                if d.sample_no == sent_sample and d.next_seq - 1 <= after:
                    d.changed.wait(1.0)
            if d._stop.is_set():
                return
            d._last_read = time.monotonic()
            if d.first_seq != first_seq:           # a new run: its records from the start
                first_seq = d.first_seq
                after = min(after, first_seq - 1)
                n_events = 0
            if d.sample_no != sent_sample:
                sent_sample = d.sample_no
                yield _sse("state", d.state_json())
            after = yield from self._metrics(after)
            events = d.events()
            if len(events) != n_events:
                new = events[n_events:] if len(events) > n_events else events
                n_events = len(events)
                yield _sse("events", _dumps({"events": new}))
            now = time.monotonic()
            if d.fidelity.version != fid_version and now - fid_at >= FIDELITY_EVERY_S:
                fid_version, fid_at = d.fidelity.version, now
                yield _sse("fidelity", _dumps(d.fidelity_report()))
            if now - ping_at >= PING_S:
                ping_at = now
                yield b": ping\n\n"


def _read_regular(path: Path, limit: int, what: str) -> bytes:
    """A regular file's bytes, not through a symlink at its last step, at most limit."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise FileNotFoundError(f"no such file: {what}") from None
    try:
        st = os.fstat(fd)
        if not stat_.S_ISREG(st.st_mode):
            raise FileNotFoundError(f"no such file: {what}")
        if st.st_size > limit:
            raise FileNotFoundError(f"{what} is larger than {net.human_bytes(limit)}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)


LOGIN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>EdgeTB controller: sign in</title></head>
<body style="font-family: sans-serif; max-width: 36em; margin: 4em auto">
<h1>EdgeTB controller</h1>
<p>Paste the controller's admin token (on the controller's machine:
<code>sudo cat {token_file}</code>) to open the dashboard in this browser.</p>
<form method="post" action="/login">
<input type="password" name="token" autocomplete="off" size="40" autofocus>
<button type="submit">Sign in</button></form>
</body></html>
"""
