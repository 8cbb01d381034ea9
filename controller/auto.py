"""`--auto`: every step of the EdgeTB workflow done by the run script itself.

split the dataset if there is none -> deploy (nodes, links, `tc finish`) -> write the
dataset and structure confs -> push them -> start -> follow the root's rounds -> collect
logs and plots at /finish -> print the summary table -> reset. Exit status 0 only when
the run finished and produced its summary.

`run` is that whole command; `drive` is the workflow on a testbed already deployed (confs,
pushes, start, `progress.follow` until /finish, the summary), and `structure_writer` the usual
way to write its structure confs. The benchmarks and the tests drive runs through these
same functions, so there is one implementation of the workflow.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from controller import progress, results, scenario, stopping
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
    """The testbed with --log-limit-mb for its manager: `log_limit_bytes`, which the
    manager it starts takes (None: the manager's default)."""
    if limit_bytes is not None:
        testbed.log_limit_bytes = limit_bytes
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
        return 0 if progress.report(summary, say=say) else 1
    except (RuntimeError, TimeoutError, net.HttpError, OSError, ValueError) as e:
        progress.failed(e)
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
    (progress.follow) and return the summary once /finish has run (by the root, or by the
    manager itself). A push skipped for a node the manager's `conf_optional(kind)` names
    (serverless action nodes have no dataset conf) is not a failure. Raises RuntimeError
    (a push refused, a node app died), TimeoutError
    (no /finish within timeout_s), net.HttpError, OSError or ValueError; the caller
    removes the testbed. The one implementation of the workflow: --auto, the benchmarks
    and the tests all go through it; what it says of the run is controller/progress.py's,
    as for a run started by hand."""
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
    progress.follow(manager, testbed, root, timeout_s, progress.rounds_of(manager.conf_dir, root), say=say)
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
    EdgeTB's step-by-step workflow (a run started by GET /start is followed on the
    console as --auto follows it). With --auto: the whole workflow on the shipped
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

