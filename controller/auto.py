"""`--auto`: every step of the EdgeTB workflow done by the run script itself.

split the dataset if there is none -> deploy (nodes, links, `tc finish`) -> write the
dataset and structure confs -> push them -> start -> follow the root's rounds -> collect
logs and plots at /finish -> print the summary table -> reset. Exit status 0 only when
the run finished and produced its summary.

`run` is that whole command; `drive` is the workflow on a testbed already deployed (confs,
pushes, start, `follow` until /finish, the summary), and `structure_writer` the usual
way to write its structure confs. The benchmarks and the tests drive runs through these
same functions, so there is one implementation of the workflow.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from controller import results, scenario, stopping
from controller.testbed import ROOT, DefinitionError, DeployError, Testbed
from dml_app import net

DML_TOOL = ROOT / "dml_tool"


def tool(name: str):
    """A dml_tool script as a module (dml_tool.<name>)."""
    return importlib.import_module(f"dml_tool.{name}")


def common_args(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--auto", action="store_true",
                    help="do the whole workflow (confs, start, finish, summary, reset) and exit")
    ap.add_argument("--port", type=int, default=3333, help="controller port (default 3333); "
                    "the embedded agent takes the next one")
    ap.add_argument("--links", default="links.json", help="links file, relative to the repo (default links.json)")
    ap.add_argument("--timeout", type=float, default=1200, help="--auto: give up after this many seconds")
    ap.add_argument("--log-limit-mb", type=_log_limit_mb, default=None, metavar="MB",
                    help="the largest node log POST /log takes, in MiB (default 16); larger ones get 413")
    ap.add_argument("--scenario", default=None, metavar="FILE",
                    help="timed faults (JSON, controller/scenario.py; README: Faults and scenarios) run from "
                         "the start of training; checked whole before anything is deployed")
    return ap


def load_scenario(testbed: Testbed, path: str | None) -> None:
    """Check the scenario file `path` against the testbed (its nodes, its links.json and its
    manager's fault actions) and set it as testbed.scenario, which the manager runs at each
    /start; scenario.ScenarioError listing every problem. Nothing is deployed yet."""
    if path is None:
        return
    p = Path(path)
    events = scenario.load(str(p), nodes=testbed.all_nodes(), links=testbed.links)
    missing = scenario.missing_methods(testbed.manager_class)
    if missing:
        raise scenario.ScenarioError([f"the manager {testbed.manager_class.__name__} has no fault actions "
                                      f"({', '.join(missing)})"], f"scenario {path}")
    testbed.scenario = events


def _log_limit_mb(text: str) -> int:
    """--log-limit-mb: a number of MiB in (0, 4096] -> bytes."""
    try:
        return int(net.number(float(text), "--log-limit-mb", 0, 4096, lo_open=True) * net.MiB)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def with_log_limit(testbed: Testbed, limit_bytes: int | None) -> Testbed:
    """The testbed's manager class with `log_limit_bytes` set (a subclass; the class the
    run script wrote is left as it is)."""
    mc = testbed.manager_class
    if limit_bytes is not None and mc is not None:
        testbed.manager_class = type(mc.__name__, (mc,), {"log_limit_bytes": limit_bytes,
                                                           "__module__": mc.__module__})
    return testbed


def ensure_dataset(say) -> None:
    if (ROOT / "dataset" / "meta.json").exists():
        return
    say("dataset: none in dataset/, splitting the shipped MNIST subset (IID, seed 0)")
    tool("splitter").split(source="mnist-subset", out=str(ROOT / "dataset"), train_parts=40,
                           test_parts=10, partition="iid", seed=0)


def run(testbed: Testbed, *, root: str | None, dataset_json: Path, write_structure, timeout_s: float,
        conf_dir: Path | None = None, scenario_file: str | None = None) -> int:
    """The --auto workflow: split a dataset if there is none, deploy, `drive`, print the
    summary table, reset; the exit status. `write_structure()` writes the structure confs
    into `conf_dir` (default ROOT/dml_file/conf, where the manager reads them).
    `scenario_file` (--scenario) is checked before anything is deployed (exit 2)."""
    say = lambda m: print(m, flush=True)  # noqa: E731
    try:
        load_scenario(testbed, scenario_file)
    except scenario.ScenarioError as e:
        print(f"error: {results.printable(e, newlines=True)}", file=sys.stderr)
        return 2
    # Ctrl-C and SIGTERM alike end the run, and every node and link is removed.
    with stopping.stop_on_signals(stopping.interrupt):
        try:
            return _run(testbed, root=root, dataset_json=dataset_json, write_structure=write_structure,
                        timeout_s=timeout_s, conf_dir=conf_dir, say=say)
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C or SIGTERM): the run was stopped", file=sys.stderr, flush=True)
            return 130


def _run(testbed: Testbed, *, root, dataset_json, write_structure, timeout_s, conf_dir, say) -> int:
    try:
        ensure_dataset(say)
        t0 = time.time()
        manager = testbed.start(serve_forever=False, say=say)
    except (DefinitionError, DeployError) as e:
        print(f"error: {results.printable(e, newlines=True)}", file=sys.stderr)
        return 2
    try:
        say(f"deployed {len(testbed.all_nodes())} nodes in {time.time() - t0:.1f} s")
        if conf_dir is not None:
            manager.conf_dir = Path(conf_dir)
        summary = drive(testbed, manager, root=root, dataset_json=dataset_json, write_structure=write_structure,
                        timeout_s=timeout_s, say=say)
        say("")
        say(results.table(summary))
        say(f"logs, plots and summary.json in {summary['run_dir']}")
        if summary.get("error"):  # a manager that ended the run itself says why it failed
            print(f"error: {summary['error']}", file=sys.stderr)
            return 1
        return 0
    except (RuntimeError, TimeoutError, net.HttpError, OSError, ValueError) as e:
        print(f"error: {results.printable(e, newlines=True)}", file=sys.stderr)
        return 1
    finally:
        with stopping.shielded():
            manager.stop_scenario(resume_paused=False)   # no event fires at nodes being removed
            testbed.close()     # nodes first, so no heartbeat arrives at a closing server
            manager.close()
            say("reset: every node and link removed")


def drive(testbed: Testbed, manager, *, root: str | None, dataset_json: Path, write_structure,
          timeout_s: float, say=print) -> dict:
    """EdgeTB's steps on a deployed testbed whose `manager` serves: write the dataset confs
    from `dataset_json` and the structure confs (`write_structure()`) into
    manager.conf_dir, push both (what GET /conf/dataset and /conf/structure do), start
    (/start?root=, every node when `root` is None), print the aggregates as they come
    (`follow`) and return the summary once /finish has run (by the root, or by the
    manager itself). A push skipped for a node the manager's `conf_optional(kind)` names
    (serverless action nodes have no dataset conf) is not a failure. Raises RuntimeError
    (a push refused, a node app died), TimeoutError
    (no /finish within timeout_s), net.HttpError, OSError or ValueError; the caller
    removes the testbed. The one implementation of the workflow: --auto, the benchmarks
    and the tests all go through it."""
    tool("dataset_conf").write_confs(str(dataset_json), str(manager.conf_dir))
    write_structure()
    for kind in ("dataset", "structure"):
        res = manager.push_conf(kind)
        optional = manager.conf_optional(kind)
        bad = {n: r for n, r in res.items() if r != "ok" and not (n in optional and r.startswith("skipped"))}
        if bad:
            raise RuntimeError(f"pushing {kind} confs: {bad}")
        say(f"{kind} confs pushed to {len(res)} nodes")
    say(manager.start_training(root))
    rounds = None
    if root is not None:
        conf = manager.conf_dir / f"{root}_structure.conf"
        rounds = json.loads(conf.read_text()).get("sync") if conf.exists() else None
        if isinstance(rounds, list):   # E-tree: one sync per layer of the root, the top's last
            rounds = rounds[-1] if rounds else None
    follow(manager, testbed, root, timeout_s, rounds, say=say)
    return manager.summary


def structure_writer(structure_tool: str, structure_json: Path, testbed: Testbed, conf_dir: Path):
    """`write_structure` for `run`/`drive`: the dml_tool module `structure_tool`
    ("<alg>_structure_conf") on `structure_json`, the testbed's links file and
    node_info.json, writing into `conf_dir`."""
    conf_tool = tool(structure_tool)
    return lambda: conf_tool.write_confs(str(structure_json), str(testbed.links_file),
                                         str(testbed.node_info_path), str(conf_dir))


def script_main(build, *, description: str, root: str | None, structure_tool: str) -> int:
    """The main() of a run script <alg>_run.py. Without --auto: deploy and serve, for
    EdgeTB's step-by-step workflow. With --auto: the whole workflow on the shipped
    dml_tool/<alg>_dataset.json and <alg>_structure.json, the confs written by the
    dml_tool module `structure_tool` ("<alg>_structure_conf"). `build(port, links)` makes
    the testbed."""
    args = common_args(description).parse_args()
    testbed = with_log_limit(build(args.port, args.links), args.log_limit_mb)
    if not args.auto:
        try:
            load_scenario(testbed, args.scenario)
            testbed.start()
        except (DefinitionError, DeployError, scenario.ScenarioError) as e:
            print(f"error: {results.printable(e, newlines=True)}", file=sys.stderr)
            return 2
        return 0
    alg = structure_tool.split("_")[0]
    return run(testbed, root=root, dataset_json=DML_TOOL / f"{alg}_dataset.json", timeout_s=args.timeout,
               scenario_file=args.scenario,
               write_structure=structure_writer(structure_tool, DML_TOOL / f"{alg}_structure.json", testbed,
                                                ROOT / "dml_file" / "conf"))


def follow(manager, testbed: Testbed, root: str | None, timeout_s: float, rounds, *, say=print) -> None:
    """Say each new aggregate (of the root, or of every node when there is none) until
    /finish has run; fail at once on a node in state `error` (RuntimeError naming the
    node and its message), on the root's app exiting (or every app's, for algorithms
    without a root), or on no /finish within timeout_s (TimeoutError). Another node's
    app exiting (a killed trainer, a killed peer) is said once; the algorithm decides
    what it means for the run."""
    deadline = time.time() + timeout_s
    nodes = testbed.all_nodes()
    watch = [root] if root else list(nodes)
    seen = {n: 0 for n in watch}
    gone: set[str] = set()
    of = f"/{rounds}" if rounds else ""
    while not manager.finished.wait(1.0):
        if time.time() > deadline:
            raise TimeoutError(f"no /finish after {timeout_s:.0f} s")
        for name in watch:
            node = nodes[name]
            try:
                text = net.call("GET", f"{node.ip}:{node.port}/metrics", token=testbed.node_token(node.name), timeout_s=10,
                                max_bytes=manager.log_limit_bytes).text
            except net.HttpError:
                continue
            recs = [r for r in results.parse_metrics(text) if r.get("event") == "aggregate" and "accuracy" in r]
            for r in recs[seen[name]:]:
                who = "" if root else f"{name} "
                layer = f" (layer {r['layer']})" if "layer" in r else ""
                say(f"{who}round {r['round']}{of}{layer}: accuracy {r['accuracy']:.4f}")
            seen[name] = max(seen[name], len(recs))
        status = manager.status()["nodes"]
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
