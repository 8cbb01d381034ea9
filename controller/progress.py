"""A run's progress as the controller's console says it, for --auto and for a run
started by hand (`curl localhost:3333/start?root=n1`) alike: each round's figure as the
root reports it (every node's, for algorithms without a root), a node app that exited,
then the end (the summary table and the run's folder) or the failure.

`follow` watches until /finish has run and raises on a failure (--auto's drive: the
caller says it and ends the run); `Watcher` runs it on a thread for a run started over
HTTP, and says the end or the failure itself.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from controller import results
from dml_app import net

POLL_S = 1.0


class Stopped(Exception):
    """The watch was stopped (the controller is closing, or a new /start)."""


def rounds_of(conf_dir: Path, root: str | None):
    """The number of rounds the root's structure conf says (its `sync`; for E-tree, the
    top layer's), None when unknown."""
    if root is None:
        return None
    conf = Path(conf_dir) / f"{root}_structure.conf"
    try:
        rounds = json.loads(conf.read_text()).get("sync") if conf.exists() else None
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(rounds, list):   # E-tree: one sync per layer of the root, the top's last
        rounds = rounds[-1] if rounds else None
    return rounds


def follow(run, testbed, root: str | None, timeout_s: float, rounds, *, say=print,
           stop: threading.Event | None = None) -> None:
    """Say each new aggregate (of the root, or of every node when there is none) until
    /finish has run, and those reported since the last look once it has; fail at once on a node in state `error` (RuntimeError naming the
    node and its message), on the root's app exiting (or every app's, for algorithms
    without a root), or on no /finish within timeout_s (TimeoutError). Another node's
    app exiting (a killed trainer, a killed peer) is said once; the algorithm decides
    what it means for the run. `stop` set ends the watch (Stopped)."""
    deadline = time.time() + timeout_s
    nodes = testbed.all_nodes()
    watch = [root] if root else list(nodes)
    seen = {n: 0 for n in watch}
    gone: set[str] = set()
    of = f"/{rounds}" if rounds else ""

    def say_new_rounds() -> None:
        for name in watch:
            node = nodes[name]
            try:
                text = net.call("GET", f"{node.ip}:{node.port}/metrics", token=testbed.node_token(node.name),
                                timeout_s=10, max_bytes=run.log_limit_bytes).text
            except net.HttpError:
                continue
            recs = [r for r in results.parse_metrics(text) if r.get("event") == "aggregate" and "accuracy" in r]
            for r in recs[seen[name]:]:
                who = "" if root else f"{name} "
                layer = f" (layer {r['layer']})" if "layer" in r else ""
                say(f"{who}round {r['round']}{of}{layer}: accuracy {r['accuracy']:.4f}")
            seen[name] = max(seen[name], len(recs))
    while not run.finished.wait(POLL_S):
        if stop is not None and stop.is_set():
            raise Stopped()
        if time.time() > deadline:
            raise TimeoutError(f"no /finish after {timeout_s:.0f} s")
        say_new_rounds()
        status = run.status()["nodes"]
        failed = {n: s.get("error") or "no message" for n, s in status.items() if s.get("state") == "error"}
        if failed:
            raise RuntimeError("node(s) failed: " + "; ".join(f"{n}: {m}" for n, m in sorted(failed.items())))
        exited = {n for n, s in status.items() if s.get("app") == "exited"}
        # The root's exit ends the run; any other node's (a rootless run's peers too) is
        # said once and its algorithm carries on without it, unless none is left.
        fatal = {root} if root else set(nodes)
        for n in sorted(exited - gone - ({root} if root else set())):
            say(f"{n}: node app exited; the run goes on without it")
        gone |= exited
        dead = sorted(exited & fatal) if root or exited >= fatal else []
        if dead:
            raise RuntimeError(f"node app(s) exited before the end: {', '.join(dead)} "
                               f"(see their stdout.log under /run/edgetb)")
    say_new_rounds()      # the rounds reported since the last look, up to the last one


def report(summary: dict, say=print) -> bool:
    """The end of a run: the summary table and where its files are; the error of a run
    that its algorithm ended as failed (on stderr). -> whether the run succeeded."""
    say("")
    say(results.table(summary))
    say(f"logs, plots and summary.json in {summary['run_dir']}")
    if summary.get("error"):
        print(f"error: {summary['error']}", file=sys.stderr, flush=True)
        return False
    return True


def failed(e: BaseException) -> None:
    """A run's failure, on stderr as --auto says it."""
    print(f"error: {results.printable(e, newlines=True)}", file=sys.stderr, flush=True)


class Watcher:
    """`follow` on a thread for a run started over HTTP: the started line, each round,
    then `report` at the end, or the failure. No deadline: the user ends the run."""

    def __init__(self, run, root: str | None, *, say=print):
        self.run, self.root, self.say = run, root, say
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="run-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=15)

    def _watch(self) -> None:
        run = self.run
        try:
            follow(run, run.tb, self.root, float("inf"), rounds_of(run.conf_dir, self.root), say=self.say,
                   stop=self._stop)
        except Stopped:
            return
        except (RuntimeError, TimeoutError, net.HttpError, OSError, ValueError) as e:
            if not self._stop.is_set():     # not the nodes going away with the controller
                failed(e)
            return
        if run.summary is not None:
            report(run.summary, say=self.say)
