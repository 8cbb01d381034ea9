#!/usr/bin/env python3
"""Serverless parameter-server training on the embedded single-machine testbed.

    sudo python3 controller/sl_run.py           # deploy, print "tc finish", serve :3333
    sudo python3 controller/sl_run.py --auto    # the whole experiment, then exit

n1 runs dml_app/ps_server.py in serverless mode (the versioned model; workers register
and unregister as they come and go, gradients are applied by the async rule), n2..n5
run dml_app/sl_action.py: OpenWhisk-style action containers (POST /init, POST /run on
port 8080). The controller's invoker (controller/invoker.py) invokes them: rounds of
one activation per data part, at most `concurrency` at once, cold-starting a container
(/init) the first time and reusing warm ones after. Each activation fetches its data
part from the controller (GET /data/<sha256>), pulls the parameters, trains, pushes a
gradient every `update_intv` batches and returns. Settings: dml_tool/sl_structure.json
(its conf tool writes them under the server conf's "invoker"). Start with
`curl 'localhost:3333/start?root=n1'`; the server calls /finish after its last step.
"""
import sys
import threading
import time
from pathlib import Path

from controller import auto, results, scenario, share
from controller.algorithm import Algorithm
from controller.invoker import Invoker
from controller.manager import Manager
from controller.testbed import single_machine
from dml_app import net
from testbed_core import credentials

ROOT = Path(__file__).resolve().parents[1]

ACTION_PORT = 8080               # OpenWhisk's action port (sl_action.py's DML_ACTION_PORT default)
CLOSE_S = 60                     # /finish waits this long for activations still running
SERVER_START_S = 120             # the server's model built after /start (its getVersion: 409 until then)
DONE_GRACE_S = 60                # the server said done: its own /finish should come by then


class Serverless(Algorithm):
    """The root is the serverless server: its `Aggregate: accuracy=..., round=V,` lines
    count versions. After the server started, a driver thread runs invocation rounds
    until the server says it is done (or `rounds` ran: the run then fails, saying so)."""
    name = "sl"
    needs_root = True
    action_port = ACTION_PORT

    def __init__(self):
        super().__init__()
        self.invoker: Invoker | None = None
        self.settings: dict | None = None       # the server conf's "invoker", checked
        self.failure: str | None = None         # why the driver ended the run, if it failed
        self.rounds_invoked = 0
        self.data_parts: list[dict] = []
        self._driver: threading.Thread | None = None
        self._stop_driver = threading.Event()

    # ------------------------------------------------------------------ confs
    def _structure_conf(self, node: str) -> dict | None:
        if not self.run.conf_file(node, "structure").exists():
            return None
        return self.run.read_conf_file(node, "structure")

    def conf_optional(self, kind: str) -> set[str]:
        """Nodes that need no conf of `kind` (controller/auto.py's drive accepts a skipped
        push for them): the action nodes get their data per invocation, not a dataset conf."""
        if kind != "dataset":
            return set()
        out = set()
        for n in self.run._nodes():
            try:
                conf = self._structure_conf(n)
            except (OSError, ValueError):
                continue
            if isinstance(conf, dict) and conf.get("role") == "action":
                out.add(n)
        return out

    def _settings(self, root: str) -> dict:
        """The root's structure conf's "invoker" settings, checked (ValueError: HTTP 400)."""
        conf = self._structure_conf(root)
        where = f"{root}_structure.conf"
        if conf is None:
            raise FileNotFoundError(f"no {where} in {self.run.conf_dir}: run dml_tool/sl_structure_conf.py -s "
                                    "sl_structure.json first")
        if not isinstance(conf, dict) or conf.get("role") != "server" or conf.get("serverless") is not True:
            raise ValueError(f"{where}: the root must be the serverless server (role server, serverless true)")
        settings = auto.tool("sl_structure_conf").invoker_settings(conf.get("invoker"), f"{where}.invoker")
        nodes = self.run._nodes()
        unknown = [n for n in settings["pool"] if n not in nodes or n == root]
        if unknown:
            raise ValueError(f"{where}.invoker.pool: {', '.join(unknown)} not action nodes of this testbed")
        return settings

    def _ctl_address(self, node: str) -> str:
        """The controller's address as `node` sees it (its NET_CTL_ADDRESS, testbed.deploy)."""
        return self.run.tb.ctl_address(getattr(self.run._nodes()[node], "emulator", None))

    # ------------------------------------------------------------------ run
    def prepare_start(self, root: str | None):
        """The settings checked, the data parts published and the invoker made before the
        server starts: a bad setting refuses /start with nothing started."""
        if root is None:
            raise ValueError("say which node is the server: /start?root=NAME")
        if root not in self.run._nodes():
            raise ValueError(f"unknown root node {root!r}")
        if self._driver is not None and self._driver.is_alive():
            raise scenario.Busy("a serverless run is under way (its invocation rounds go on): /finish it first")
        settings = self._settings(root)
        ctl = {self._ctl_address(n) for n in settings["pool"]}
        if len(ctl) > 1:
            raise ValueError(f"the action nodes see the controller at different addresses ({', '.join(sorted(ctl))}): "
                             "one dataset_url per data part needs one")
        dataset = self.run.tb.nfs.get("dataset")
        dataset_dir = Path(dataset.path) if dataset is not None else ROOT / "dataset"
        # The data parts: content-addressed bundles the controller serves on /data/<sha256>.
        try:
            paths = share.publish_parts(self.run.data_store, dataset_dir,
                                        [(p["train_start_index"], p["train_len"]) for p in settings["data"]])
        except (OSError, ValueError) as e:
            raise ValueError(f"data parts of {dataset_dir}: {e}") from None
        self._end_driver()
        nodes = self.run._nodes()
        server = nodes[root]
        pool = {n: f"{nodes[n].ip}:{self.action_port}" for n in settings["pool"]}
        # Made before the server starts: a bad setting refuses /start with nothing started.
        invoker = Invoker(pool, auth=self.run.tb.node_token,
                          api_key=lambda n: credentials.client_token(self.run.tb.token, root, n),
                          concurrency=settings["concurrency"], deadline_s=settings["deadline_s"],
                          retries=settings["retries"], say=lambda m: print(m, flush=True),
                          server=f"{server.ip}:{server.port}", server_token=self.run.tb.node_token(root),
                          runtime={n: f"{nodes[n].ip}:{nodes[n].port}" for n in settings["pool"]})
        return settings, ctl.pop(), paths, invoker, pool

    def started(self, root: str, out: str, prepared) -> str:
        """The server started: the invocation rounds begin (a driver thread)."""
        settings, host, paths, invoker, pool = prepared
        server = self.run._nodes()[root]
        self.invoker = invoker
        self.settings = settings
        self.failure = None
        self.rounds_invoked = 0
        self.data_parts = [{**p, "dataset_url": f"http://{host}{path}",
                            "bytes": len(self.run.data_store.archives[path.rsplit("/", 1)[-1]])}
                           for p, path in zip(settings["data"], paths)]
        self._stop_driver.clear()
        self._driver = threading.Thread(target=self._drive, args=(self.invoker, root, f"{server.ip}:{server.port}"),
                                        name="sl-driver", daemon=True)
        self._driver.start()
        return out + f"; invoking {len(pool)} action node(s), {len(paths)} data part(s) per round"

    def _version(self, root: str, server: str) -> dict:
        return net.get_json(f"http://{server}/getVersion", token=self.run.tb.node_token(root), timeout_s=30)

    def _wait_started(self, root: str, server: str) -> None:
        """The server builds its model after GET /start answered (its getVersion says 409
        until then): wait for it, at most SERVER_START_S."""
        end = time.monotonic() + SERVER_START_S
        while True:
            try:
                self._version(root, server)
                return
            except net.HttpError as e:
                if e.status != 409 or time.monotonic() > end:
                    raise
            if self._stop_driver.wait(0.2):
                return

    # Invocation rounds are owned here (the actions are stateless; the server's versions are
    # its own), not by dml_app/rounds.py.
    def _drive(self, invoker: Invoker, root: str, server: str) -> None:
        """Invocation rounds until the server is done; a failure ends the run (finish)."""
        s = self.settings
        params = [{**s["params"], "apihost": server, "dataset_url": p["dataset_url"], "device": "cpu"}
                  for p in self.data_parts]
        try:
            self._wait_started(root, server)
            for rnd in range(1, s["rounds"] + 1):
                if self._stop_driver.is_set() or self.run.finished.is_set():
                    return
                records = invoker.invoke_all(params)
                self.rounds_invoked = rnd
                if self._stop_driver.is_set() or self.run.finished.is_set():
                    return
                v = self._version(root, server)
                ok = sum(r.get("status") == "success" for r in records)
                print(f"invoker: round {rnd}/{s['rounds']}: {ok}/{len(records)} activations succeeded, "
                      f"server at version {v.get('version')}/{v.get('steps')}", flush=True)
                if v.get("done"):
                    # The server calls /finish itself; if that does not come, end the run here.
                    if not self.run.finished.wait(DONE_GRACE_S) and not self._stop_driver.is_set():
                        self.run.finish()
                    return
                if not ok:
                    errors = "; ".join(f"{r.get('node')}: {str(r.get('error'))[:200]}" for r in records[:4])
                    self._fail(f"round {rnd}: every activation failed ({errors})")
                    return
            self._fail(f"the server was not done after {s['rounds']} invocation rounds (the structure's "
                       f"'rounds' bound): raise rounds, epoch_n or lower steps")
        except (net.HttpError, ValueError, RuntimeError) as e:
            if not self._stop_driver.is_set() and not self.run.finished.is_set():
                self._fail(f"invocation round {self.rounds_invoked + 1}: {e}")

    def _fail(self, why: str) -> None:
        if self._stop_driver.is_set() or self.run.finished.is_set():
            return
        print(f"invoker: the run failed: {why}", file=sys.stderr, flush=True)
        self.failure = why
        self.run.finish()

    def _end_driver(self, timeout_s: float = CLOSE_S) -> None:
        """No new rounds; close the invoker (activations under way get up to timeout_s)."""
        self._stop_driver.set()
        if self.invoker is not None:
            self.invoker.close(timeout_s=timeout_s)
        d = self._driver
        if d is not None and d is not threading.current_thread():
            d.join(timeout=5)

    def before_finish(self) -> None:
        self._end_driver()

    def close(self) -> None:
        self._end_driver(timeout_s=10)

    # ------------------------------------------------------------------ results
    def _server_stats(self) -> dict:
        root = self.run._nodes().get(self.run.root or "")
        if root is None:
            return {}
        try:
            st = net.get_json(f"http://{root.ip}:{root.port}/stats", token=self.run.tb.node_token(root.name), timeout_s=30)
            return {k: net.number(st.get(k, 0), f"/stats {k}", 0, 2**62, integer=True)
                    for k in ("bytes_sent", "bytes_received")}
        except (net.HttpError, ValueError) as e:
            return {"error": str(e)[:200]}

    def summarize(self, metrics: dict, wall: float, sent: dict) -> dict:
        """The usual summary plus "serverless" (the invoker's summary, the data parts,
        bytes moved, the activation records: the first and the last 100) and "error"
        when the driver ended the run; draws activations.png into the run's folder."""
        summary = super().summarize(metrics, wall, sent)
        inv = self.invoker
        records = inv.records() if inv is not None else []
        kept, left = results.bounded_entries(records)     # at most 200: the first and last 100
        sl = dict(inv.summary()) if inv is not None else {}
        # What each action node's activations moved, by kind (summary "bytes_sent" has
        # their sums: the action counts its calls in the node runtime's /stats).
        by_node: dict = {}
        for r in records:
            b = (r.get("result") or {}).get("bytes") if isinstance(r.get("result"), dict) else None
            if isinstance(b, dict) and r.get("node"):
                acc = by_node.setdefault(r["node"], {"data_down": 0, "params_down": 0, "gradients_up": 0})
                for k in acc:
                    v = b.get(k)
                    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53:
                        acc[k] += v
        sl.update(rounds_invoked=self.rounds_invoked,
                  data_parts=self.data_parts,
                  bytes_moved={**(sl.get("bytes") or {}), "server": self._server_stats(),
                               "by_node": dict(sorted(by_node.items())),
                               "data_served": sum(self.run.data_store.served.get(p["dataset_url"].rsplit("/", 1)[-1], 0)
                                                  * p["bytes"] for p in self.data_parts)},
                  records=kept)
        if left:
            sl["records_left_out"] = left
        summary["serverless"] = sl
        if self.run.run_dir is not None:
            summary["plots"] = results.draw_activations(self.run.run_dir, records, t0=self.run.started_at)
        if self.failure:
            summary["error"] = self.failure
        return summary



class SlManager(Manager):
    """The controller of a serverless run (the manager_class of build())."""
    algorithm = "sl"
    algorithm_class = Serverless


def build(port: int = 3333, links: str = "links.json"):
    """n1 serves, n2..n5 are action containers (see controller/testbed.py:single_machine)."""
    roles = [("n1", "ps_server.py")] + [(f"n{i}", "sl_action.py") for i in range(2, 6)]
    return single_machine(SlManager, roles, port=port, links=links)


def main() -> int:
    return auto.script_main(build, description=__doc__.strip().splitlines()[0], root="n1",
                            structure_tool="sl_structure_conf")


if __name__ == "__main__":
    sys.exit(main())
