"""Write each node's serverless parameter-server structure conf.

    python3 dml_tool/sl_structure_conf.py -s sl_structure.json [-l links.json]
        [-n node_info.json] [-o DIR]

sl_structure.json:

    {"steps": 240, "lr": 0.1, "max_staleness": 4, "eval_every": 40,
     "params": {"batch_sz_train": 32, "epoch_n": 1, "update_intv": 2},
     "data": [{"train_start_index": 1, "train_len": 10}, {"train_start_index": 11, "train_len": 10}],
     "rounds": 20, "concurrency": 4, "deadline_s": 60,
     "node_list": [{"name": "n1", "role": "server"}, {"name": "n2", "role": "action"}, ...]}

* `node_list`: exactly one node with "role": "server" (runs dml_app/ps_server.py in
  serverless mode) and at least one "role": "action" node (the default role; runs
  dml_app/sl_action.py: the action containers the invoker keeps);
* the server's async rule: `steps` (the versions it applies before it stops), `lr`,
  optional `lr_end` (the lr falls linearly from `lr` to this at `steps`; default: `lr`
  all along), optional `momentum` (default 0: stale gradients act like extra momentum),
  `max_staleness` (default `concurrency`), `eval_every` (default steps / 10), `seed`;
  `mode` may be given and must be "async" (the workers come and go: no sync rounds);
* the invocations, which the controller's invoker (controller/invoker.py) makes:
  `params`, what every activation is invoked with: `batch_sz_train` (1..4096),
  `epoch_n` (1..100), `update_intv` (1..10000: push a gradient every this many
  batches), optional `lr` (the action's local SGD rate) and `seed`; the invoker adds
  `apihost`, `dataset_url` and `device`;
  `data`, the data part of each worker function: a list of {"train_start_index",
  "train_len"} (EdgeTB's 1-based train parts), one activation per entry per round,
  served by the controller as a content-addressed bundle (GET /data/<sha256>);
  `rounds` (an upper bound: the run fails if the server is not done after them),
  `concurrency` (activations at once, at most one per action node; default every action
  node), `deadline_s` (per activation, default 120), `retries` (an activation whose
  node stopped answering is retried on another node as a new activation; default 1).

Parameters go server -> action and gradients action -> server, so links.json needs a
link each way between the server and every action node (the invoker's own calls to the
action nodes' port 8080 are not links, as OpenWhisk's invoker talks to its containers).
Written per node (DIR/<node>_structure.conf, default ROOT/dml_file/conf): the server
{"role": "server", "serverless": true, "mode": "async", "actions", "steps", "lr",
"lr_end"?, "momentum", "max_staleness", "eval_every", "seed"?, "invoker": {"pool", "params",
"data", "rounds", "concurrency", "deadline_s", "retries"}} ("invoker" is read by the
controller's Serverless algorithm at /start, the server ignores it) and each action node
{"role": "action", "server", "connect"}. Defaults: -l ROOT/links.json, -n
ROOT/node_info.json; a relative path is looked up from the current folder, then from
dml_tool/.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

from dml_tool import conf_utils as cu

FILE_KEYS = ("mode", "steps", "lr", "lr_end", "momentum", "max_staleness", "eval_every", "seed", "params",
             "data", "rounds", "concurrency", "deadline_s", "retries", "node_list")
PARAM_KEYS = ("batch_sz_train", "epoch_n", "update_intv", "lr", "seed")
PART_KEYS = ("train_start_index", "train_len")
MAX_DATA_PARTS = 1024          # worker functions per round
MAX_ROUNDS = 100_000


INVOKER_KEYS = ("pool", "params", "data", "rounds", "concurrency", "deadline_s", "retries")


def _params(p: Any, where: str) -> dict[str, Any]:
    """The invocation parameters every activation gets (ranges as the action checks them)."""
    where = f"{where}.params"
    if not isinstance(p, dict):
        raise cu.ConfError(f"{where}: expected an object {{\"batch_sz_train\", \"epoch_n\", \"update_intv\"}}")
    cu.check_keys(p, PARAM_KEYS, where)
    out = {"batch_sz_train": cu.get_int(p, "batch_sz_train", where, low=1, high=4096),
           "epoch_n": cu.get_int(p, "epoch_n", where, low=1, high=100),
           "update_intv": cu.get_int(p, "update_intv", where, low=1, high=10_000)}
    if "lr" in p:
        out["lr"] = cu.get_number(p, "lr", where, low=0.0, high=10.0, low_open=True)
    if "seed" in p:
        out["seed"] = cu.get_int(p, "seed", where, low=0, high=2**31 - 1)
    return out


def _data(d: Any, where: str) -> list[dict[str, int]]:
    """The data part of each worker function: [{"train_start_index", "train_len"}, ...]."""
    where = f"{where}.data"
    if not isinstance(d, list) or not 1 <= len(d) <= MAX_DATA_PARTS:
        raise cu.ConfError(f"{where}: expected a list of 1..{MAX_DATA_PARTS} objects "
                           "{\"train_start_index\": 1, \"train_len\": 10} (one per worker function)")
    out = []
    for i, part in enumerate(d):
        w = f"{where}[{i}]"
        if not isinstance(part, dict):
            raise cu.ConfError(f"{w}: expected an object {{\"train_start_index\", \"train_len\"}}")
        cu.check_keys(part, PART_KEYS, w)
        out.append({"train_start_index": cu.get_int(part, "train_start_index", w, low=1, high=1_000_000),
                    "train_len": cu.get_int(part, "train_len", w, low=1, high=100_000)})
    return out


def invoker_settings(raw: Any, where: str) -> dict[str, Any]:
    """The invoker's settings {"pool", "params", "data", "rounds", "concurrency",
    "deadline_s", "retries"} checked (ConfError naming `where` and the key): what
    build_confs writes under the server conf's "invoker" and what the controller's
    the Serverless algorithm reads back at /start (a conf file may have been edited in between)."""
    if not isinstance(raw, dict):
        raise cu.ConfError(f"{where}: expected an object with {', '.join(INVOKER_KEYS)}")
    cu.check_keys(raw, INVOKER_KEYS, where)
    pool = raw.get("pool")
    if not isinstance(pool, list) or not pool or len(set(map(str, pool))) != len(pool):
        raise cu.ConfError(f"{where}.pool: expected a list of distinct action node names")
    for name in pool:
        cu.check_name(name, f"{where}.pool")
    for key in ("params", "data", "rounds"):
        if key not in raw:
            raise cu.ConfError(f"{where}: missing {key!r} (the invocations' 'params', the 'data' part of each "
                               f"worker function and an upper bound of 'rounds')")
    return {"pool": list(pool), "params": _params(raw["params"], where), "data": _data(raw["data"], where),
            "rounds": cu.get_int(raw, "rounds", where, low=1, high=MAX_ROUNDS),
            "concurrency": cu.get_int(raw, "concurrency", where, low=1, high=len(pool), default=len(pool)),
            "deadline_s": cu.get_number(raw, "deadline_s", where, low=1.0, high=3600.0, default=120.0),
            "retries": cu.get_int(raw, "retries", where, low=0, high=10, default=1)}


def build_confs(structure: Any, links: Mapping[str, list[str]], nodes: Mapping[str, cu.NodeAddr],
                *, file: str = "sl_structure.json", links_file: str = "links.json",
                nodes_file: str = "node_info.json") -> dict[str, dict[str, Any]]:
    """Check the structure against the links and nodes; return {node: structure conf}."""
    if not isinstance(structure, dict) or not isinstance(structure.get("node_list"), list):
        raise cu.ConfError(f"{file}: expected {{\"steps\": N, \"lr\": ..., \"params\": {{...}}, \"data\": [...], "
                           "\"node_list\": [{\"name\": \"n1\", \"role\": \"server\"}, {\"name\": \"n2\"}, ...]}")
    cu.check_keys(structure, FILE_KEYS, file)
    if structure.get("mode", "async") != "async":
        raise cu.ConfError(f"{file}.mode: serverless workers come and go, so the server's rule is "
                           f"\"async\"; got {structure.get('mode')!r}")
    steps = cu.get_int(structure, "steps", file, low=1, high=10**9)

    server, actions, seen = cu.server_and_members(structure, nodes, file=file, nodes_file=nodes_file,
                                                  member_role="action", members_what="action node")
    invoker = invoker_settings({"pool": actions, **{k: structure[k] for k in INVOKER_KEYS[1:] if k in structure}},
                               file)
    concurrency = invoker["concurrency"]
    conf: dict[str, Any] = {
        "role": "server", "serverless": True, "mode": "async", "actions": actions, "steps": steps,
        **cu.server_rule(structure, file, steps=steps, max_staleness=concurrency),
    }
    if "seed" in structure:
        conf["seed"] = cu.get_int(structure, "seed", file, low=0, high=2**31 - 1)
    conf["invoker"] = invoker
    return {server: conf, **cu.member_confs(server, actions, seen, links, nodes, role="action", file=file,
                                            links_file=links_file)}


# write_confs(structure, links, node_info, out_dir) and main(argv), as every conf tool has
write_confs, main = cu.structure_tool(build_confs, prog="sl_structure_conf.py",
                                      algorithm="a serverless parameter server")


if __name__ == "__main__":
    sys.exit(main())
