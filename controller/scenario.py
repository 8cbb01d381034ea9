"""Scenarios: timed faults during a run.

A scenario file is JSON, either a list of events or an object
``{"events": [...], "availability": {...}, "availability_mode": "pause" | "kill"}``.

Events, times in seconds after the start of training (the manager's ``started_at``)::

    {"at": 30, "node": "n3", "action": "kill"}            # kill | pause | resume | restart
    {"at": 10, "node": "n4", "action": "pause", "for": 20}  # resumed at 30
    {"at": 40, "link": ["n1", "n2"], "action": "down", "for": 20}   # down | up; up again at 60
    {"at": 50, "link": ["n1", "n2"], "action": "rate", "bw": "5mbit", "dir": "both"}

A link is one direction (``"dir": "one"``, the default: src -> dest) or both
(``"dir": "both"``); every direction named must be a link of links.json. ``"for"`` is
taken by pause (a resume follows) and down (an up follows).

Availability traces, FedScale's style: ``{"n3": [[0, 30], [50, 80]]}`` = n3 is up during
those intervals and down otherwise (before the first, between two, after the last; an
interval may end with ``null``: up until the end of the run). Down is a ``pause`` and up
again a ``resume`` (the default ``"availability_mode": "pause"``), or ``kill`` and
``restart`` with ``"availability_mode": "kill"``.

`parse` checks the whole file before anything starts and lists every problem at once
(ScenarioError, a ValueError): unknown keys, nodes, actions and links, times that are
not finite numbers in [0, MAX_AT], intervals unsorted or overlapping, and a sequence
that cannot happen (a resume of a node that is not paused, an up of a link that is not
down, ...), checked by playing the events in order.

`Scheduler` fires the events, one thread, each at its time after ``t0``, through the
manager's ``node_fault``, ``link_fault`` and ``link_rate``; it records each event's real
time and outcome (``records``: ``{"at", "t", "action", "node" | "link", "ok", "detail"}``)
and prints a line per event. ``stop()`` ends it (at /finish and at reset) and resumes a
node the scenario left paused, so its log can be collected.
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from controller import results
from dml_app import formats

NODE_ACTIONS = formats.NODE_FAULTS
LINK_ACTIONS = formats.LINK_FAULTS + ("rate",)   # rate: link_rate, a link's bw changed in place
DIRS = ("one", "both")
MODES = ("pause", "kill")
MAX_AT = 7 * 24 * 3600          # a week: later than any run
MAX_EVENTS = 10_000
MAX_INTERVALS = 10_000
MAX_PROBLEMS = 100              # listed in the error; the rest counted
EVENT_KEYS = {"at", "node", "link", "action", "for", "bw", "dir"}
TOP_KEYS = {"events", "availability", "availability_mode"}
MANAGER_METHODS = ("node_fault", "link_fault", "link_rate")
STOP_JOIN_S = 300               # stop(): the longest a fault call under way is waited for


class ScenarioError(ValueError):
    def __init__(self, problems: list[str], where: str = "scenario"):
        self.problems = list(problems)
        shown = self.problems[:MAX_PROBLEMS]
        more = len(self.problems) - len(shown)
        super().__init__(f"{where} refused, nothing started:\n  " + "\n  ".join(shown)
                         + (f"\n  ... and {more} more" if more else ""))


@dataclass
class Event:
    at: float
    action: str
    node: str | None = None
    link: tuple[str, str] | None = None
    both: bool = False
    bw: str | None = None
    source: str = ""            # where it came from: "events[3]", "events[3].for", "availability.n3[1]"

    def label(self) -> str:
        """A short label: 'kill n3', 'down n1->n2', 'rate n1<->n2 5mbit'."""
        if self.node is not None:
            return f"{self.action} {self.node}"
        arrow = "<->" if self.both else "->"
        return f"{self.action} {self.link[0]}{arrow}{self.link[1]}" + (f" {self.bw}" if self.bw else "")

    def as_dict(self) -> dict:
        d: dict[str, Any] = {"at": self.at, "action": self.action}
        if self.node is not None:
            d["node"] = self.node
        else:
            d["link"] = list(self.link)
            d["dir"] = "both" if self.both else "one"
        if self.bw is not None:
            d["bw"] = self.bw
        d["source"] = self.source
        return d


def _time(value: Any, where: str, problems: list[str], *, positive: bool = False) -> float | None:
    """A time in seconds: a finite number in [0, MAX_AT] ((0, MAX_AT] if positive)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or value > MAX_AT or (positive and value == 0):
        rng = f"(0, {MAX_AT}]" if positive else f"[0, {MAX_AT}]"
        problems.append(f"{where}: must be a number of seconds in {rng}, got {formats.shown(value)}")
        return None
    return float(value)


def _event(i: int, e: Any, nodes: Collection[str], links: Mapping[str, Any], problems: list[str]) -> list[Event]:
    where = f"events[{i}]"
    if not isinstance(e, dict):
        problems.append(f"{where}: expected an object {{\"at\", \"node\" or \"link\", \"action\", ...}}, "
                        f"got {formats.shown(e)}")
        return []
    n0 = len(problems)
    extra = sorted(set(e) - EVENT_KEYS)
    if extra:
        problems.append(f"{where}: unknown key(s) {', '.join(map(repr, extra))} (known: {', '.join(sorted(EVENT_KEYS))})")
    at = _time(e.get("at"), f"{where}.at", problems) if "at" in e else problems.append(f"{where}: no \"at\"")
    action = e.get("action")
    dur = _time(e["for"], f"{where}.for", problems, positive=True) if "for" in e else None
    node = link = None
    both = False
    if ("node" in e) == ("link" in e):
        problems.append(f"{where}: give exactly one of \"node\" or \"link\"")
    elif "node" in e:
        node = e["node"]
        if not formats.is_name(node) or node not in nodes:
            problems.append(f"{where}.node: {formats.shown(node)} is not a node of this testbed "
                            f"(nodes: {formats.name_list(sorted(nodes))})")
            node = None
        if action not in NODE_ACTIONS:
            problems.append(f"{where}.action: a node's action is one of {', '.join(NODE_ACTIONS)}, "
                            f"got {formats.shown(action)}")
        if "for" in e and action != "pause":
            problems.append(f"{where}.for: only a node's \"pause\" takes \"for\" (a resume follows)")
        for k in ("bw", "dir"):
            if k in e:
                problems.append(f"{where}.{k}: only a link event takes {k!r}")
    else:
        raw = e["link"]
        if not (isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, str) for x in raw)):
            problems.append(f"{where}.link: expected [src, dest], two node names, got {formats.shown(raw)}")
        else:
            d = e.get("dir", "one")
            if d not in DIRS:
                problems.append(f"{where}.dir: one of {', '.join(map(repr, DIRS))}, got {formats.shown(d)}")
            both = d == "both"
            pairs = [tuple(raw)] + ([tuple(raw[::-1])] if both else [])
            ok = True
            for s, t in pairs:
                if not any(isinstance(l, dict) and l.get("dest") == t for l in (links.get(s) or [])
                           if isinstance(links.get(s), list)):
                    problems.append(f"{where}.link: {s} -> {t} is not a link of links.json")
                    ok = False
            link = tuple(raw) if ok else None
        if action not in LINK_ACTIONS:
            problems.append(f"{where}.action: a link's action is one of {', '.join(LINK_ACTIONS)}, "
                            f"got {formats.shown(action)}")
        if "for" in e and action != "down":
            problems.append(f"{where}.for: only a link's \"down\" takes \"for\" (an up follows)")
        if action == "rate":
            try:
                formats.parse_rate(e.get("bw"))
            except formats.FormatError as err:
                problems.append(f"{where}.bw: {err}")
        elif "bw" in e:
            problems.append(f"{where}.bw: only a \"rate\" event takes \"bw\"")
    if len(problems) > n0:
        return []
    ev = Event(at=at, action=action, node=node, link=link, both=both,
               bw=e.get("bw") if action == "rate" else None, source=where)
    out = [ev]
    if dur is not None:
        if at + dur > MAX_AT:
            problems.append(f"{where}: at + for = {at + dur:g} s is beyond {MAX_AT} s")
            return []
        out.append(Event(at=at + dur, action="resume" if node else "up", node=node, link=link, both=both,
                         source=f"{where}.for"))
    return out


def _availability(avail: Any, mode: str, nodes: Collection[str], problems: list[str]) -> list[Event]:
    if not isinstance(avail, dict):
        problems.append(f"availability: expected an object {{node: [[up_from, up_to], ...]}}, got {formats.shown(avail)}")
        return []
    down, up = ("pause", "resume") if mode == "pause" else ("kill", "restart")
    out = []
    for node, intervals in avail.items():
        where = f"availability.{str(node)[:40]}"
        if not formats.is_name(node) or node not in nodes:
            problems.append(f"{where}: {formats.shown(node)} is not a node of this testbed "
                            f"(nodes: {formats.name_list(sorted(nodes))})")
            continue
        if not isinstance(intervals, list) or len(intervals) > MAX_INTERVALS:
            problems.append(f"{where}: expected a list of at most {MAX_INTERVALS} [up_from, up_to] intervals, "
                            f"got {formats.shown(intervals)}")
            continue
        prev_end: float | None = 0.0     # the end of the previous interval (0: the run's start)
        first = True
        n0 = len(problems)
        evs = []
        for j, iv in enumerate(intervals):
            w = f"{where}[{j}]"
            last = j == len(intervals) - 1
            if not (isinstance(iv, list) and len(iv) == 2):
                problems.append(f"{w}: expected [up_from, up_to] (up_to null: until the end), got {formats.shown(iv)}")
                prev_end = None
                continue
            a = _time(iv[0], f"{w}[0]", problems)
            b = None if iv[1] is None and last else _time(iv[1], f"{w}[1]", problems)
            if iv[1] is None and not last:
                problems.append(f"{w}[1]: only the last interval may end with null")
            if a is None or (b is None and iv[1] is not None):
                prev_end = None
                continue
            if b is not None and b <= a:
                problems.append(f"{w}: ends ({b:g}) at or before it starts ({a:g})")
                prev_end = None
                continue
            if prev_end is not None and not first and a <= prev_end:
                problems.append(f"{w}: starts at {a:g}, not after the previous interval's end ({prev_end:g}): "
                                "intervals must be sorted and must not overlap or touch (merge them)")
            if first and a > 0:
                evs.append(Event(at=0.0, action=down, node=node, source=w))    # down until its first interval
            if not first or a > 0:
                evs.append(Event(at=a, action=up, node=node, source=w))
            if b is not None:
                evs.append(Event(at=b, action=down, node=node, source=f"{w}"))
            prev_end = b
            first = False
        if not intervals:
            evs.append(Event(at=0.0, action=down, node=node, source=where))   # never up
        if len(problems) == n0:
            out += evs
    return out


def check_sequence(events: list[Event], problems: list[str]) -> None:
    """Play the events in order: a node is up, paused or dead; a link direction up or down.
    pause needs up; resume needs paused; kill needs up or paused; restart takes any state
    (a dead node starts again, a live or paused one is stopped and started); down needs up;
    up needs down."""
    node_state: dict[str, str] = {}
    link_down: set[tuple[str, str]] = set()
    need = {"pause": ("up",), "resume": ("paused",), "kill": ("up", "paused"), "restart": ("dead", "up", "paused")}
    after = {"pause": "paused", "resume": "up", "kill": "dead", "restart": "up"}
    for ev in events:
        if ev.node is not None:
            st = node_state.get(ev.node, "up")
            if st not in need[ev.action]:
                problems.append(f"{ev.source}: {ev.action} {ev.node} at {ev.at:g} s, but {ev.node} is {st} then "
                                f"({ev.action} needs a node that is {' or '.join(need[ev.action])})")
                continue
            node_state[ev.node] = after[ev.action]
        elif ev.action in ("down", "up"):
            dirs = [ev.link] + ([ev.link[::-1]] if ev.both else [])
            for d in dirs:
                is_down = d in link_down
                if (ev.action == "down") == is_down:
                    problems.append(f"{ev.source}: {ev.action} {d[0]}->{d[1]} at {ev.at:g} s, but that link is "
                                    f"{'down' if is_down else 'up'} then")
                elif ev.action == "down":
                    link_down.add(d)
                else:
                    link_down.discard(d)


def parse(doc: Any, *, nodes: Collection[str], links: Mapping[str, Any], where: str = "scenario") -> list[Event]:
    """The scenario document -> its events in firing order (by time, then file order:
    the events' list first, then the availability traces); ScenarioError listing every
    problem."""
    problems: list[str] = []
    if isinstance(doc, list):
        doc = {"events": doc}
    if not isinstance(doc, dict):
        raise ScenarioError([f"expected a list of events or an object {{\"events\", \"availability\", "
                             f"\"availability_mode\"}}, got {formats.shown(doc)}"], where)
    extra = sorted(set(doc) - TOP_KEYS)
    if extra:
        problems.append(f"unknown key(s) {', '.join(map(repr, extra))} (known: {', '.join(sorted(TOP_KEYS))})")
    events_raw = doc.get("events", [])
    mode = doc.get("availability_mode", "pause")
    if mode not in MODES:
        problems.append(f"availability_mode: one of {', '.join(map(repr, MODES))}, got {formats.shown(mode)}")
        mode = "pause"
    events: list[Event] = []
    if not isinstance(events_raw, list) or len(events_raw) > MAX_EVENTS:
        problems.append(f"events: expected a list of at most {MAX_EVENTS} events, got {formats.shown(events_raw)}")
    else:
        for i, e in enumerate(events_raw):
            events += _event(i, e, nodes, links, problems)
    if "availability" in doc:
        events += _availability(doc["availability"], mode, nodes, problems)
    events.sort(key=lambda ev: ev.at)      # stable: file order among equal times
    if len(events) > MAX_EVENTS:
        problems.append(f"{len(events)} events in all, at most {MAX_EVENTS}")
    check_sequence(events, problems)     # on the events that passed their own checks
    if problems:
        raise ScenarioError(problems, where)
    return events


def load(path: str, *, nodes: Collection[str], links: Mapping[str, Any]) -> list[Event]:
    """parse() of a scenario file; ScenarioError (naming the file) for it or its JSON."""
    try:
        doc = formats.read_json(path, path)
    except formats.FormatError as e:
        raise ScenarioError([str(e)], f"scenario {path}") from None
    return parse(doc, nodes=nodes, links=links, where=f"scenario {path}")


def missing_methods(manager_or_class) -> list[str]:
    """The fault methods a manager lacks (a scenario needs them all)."""
    return [m for m in MANAGER_METHODS if not callable(getattr(manager_or_class, m, None))]


@dataclass
class Scheduler:
    """Fires `events` (sorted) at t0 + ev.at through `manager`, one thread; `clock` and
    `wait(timeout) -> stopped?` are replaceable for tests (a fake clock)."""
    events: list[Event]
    manager: Any
    say: Callable[[str], None] = lambda m: print(m, flush=True)
    clock: Callable[[], float] = time.time
    records: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._paused: set[str] = set()
        self.t0: float | None = None
        self.wait: Callable[[float], bool] = self._stop.wait

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread = threading.Thread(target=self.run, daemon=True, name="scenario")
        self._thread.start()

    def run(self) -> None:
        """Fire each event at its time; return when all have fired or stop() was called."""
        for ev in self.events:
            while True:
                left = self.t0 + ev.at - self.clock()
                if self._stop.is_set() or (left > 0 and self.wait(left)):
                    return
                if left <= 0:
                    break
            with self._lock:
                if self._stop.is_set():
                    return
                self.fire(ev)

    def fire(self, ev: Event, source: str | None = None) -> dict:
        t = self.clock() - self.t0
        try:
            if ev.node is not None:
                res = self.manager.node_fault(ev.node, ev.action)
            elif ev.action == "rate":
                res = self.manager.link_rate(ev.link[0], ev.link[1], ev.bw, both=ev.both)
            else:
                res = self.manager.link_fault(ev.link[0], ev.link[1], ev.action, both=ev.both)
            ok = bool(res.get("ok")) if isinstance(res, dict) else False
            detail = str(res.get("detail", "")) if isinstance(res, dict) else f"unexpected answer {res!r}"
        except Exception as e:  # noqa: BLE001  (an event that failed is recorded, the rest go on)
            ok, detail = False, f"{type(e).__name__}: {e}"
        if ok and ev.node is not None:
            (self._paused.add if ev.action == "pause" else self._paused.discard)(ev.node)
        rec = {"at": ev.at, "t": round(t, 3), "action": ev.action}
        if ev.node is not None:
            rec["node"] = ev.node
        else:
            rec["link"] = list(ev.link)
            rec["dir"] = "both" if ev.both else "one"
        if ev.bw is not None:
            rec["bw"] = ev.bw
        rec.update(ok=ok, detail=detail[:500], source=source or ev.source)
        self.records.append(rec)
        self.say(f"scenario: t={t:.1f} s (at {ev.at:g} s) {ev.label()}: {'ok' if ok else 'FAILED'}"
                 f"{': ' + results.printable(' '.join(detail.split())[:200]) if detail else ''}")
        return rec

    def stop(self, *, resume_paused: bool = True) -> list[dict]:
        """End the thread (waiting at most STOP_JOIN_S for a fault call under way); resume
        the nodes the scenario left paused (recorded, source "end of run"); the records."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_JOIN_S)
        with self._lock:
            if resume_paused and self.t0 is not None:
                for node in sorted(self._paused):
                    t = self.clock() - self.t0
                    self.fire(Event(at=round(max(t, 0.0), 3), action="resume", node=node), source="end of run")
                self._paused.clear()
        return list(self.records)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def dumps(events: list[Event]) -> str:
    return json.dumps([e.as_dict() for e in events])


class Busy(RuntimeError):
    """A scenario set while a run is under way (HTTP 409)."""
