"""Write each node's parameter-server structure conf.

    python3 dml_tool/ps_structure_conf.py -s ps_structure.json [-l links.json]
        [-n node_info.json] [-o DIR]

ps_structure.json:

    {"mode": "sync", "steps": 150, "lr": 0.05, "momentum": 0.9, "eval_every": 10,
     "node_list": [{"name": "n1", "role": "server"}, {"name": "n2"}, {"name": "n3"}]}

* `mode`: "sync" (every step waits for one gradient from each worker and applies
  their average) or "async" (each gradient is applied on arrival);
* `steps`: how many updates (versions) the server applies before it stops; EdgeTB's
  `sync` is accepted as another name for it;
* `lr`, optional `lr_end` (the lr falls linearly from `lr` to this at `steps`; default:
  `lr` all along), `momentum` (default 0): the server's SGD (stale gradients act like extra
  momentum: in async mode keep `momentum` 0 or small); `max_staleness` (async; default
  the number of workers): a gradient computed more than this many versions ago is refused;
* `eval_every` (default steps / 10): the server evaluates every this many versions
  (its `Aggregate: accuracy=..., round=V,` lines count versions), and at the last;
* optional `seed` (the initial model), `step_timeout_s` (sync: how long a version
  waits for the workers' gradients after it was served, then the average of those that
  came is applied; default 600) and `step_retries` (sync: with no gradient at all by
  the deadline, wait again this many times, then the run fails; default 2);
* `node_list`: exactly one node with "role": "server"; every other node is a worker
  ("role": "worker" may be written). The batch size is each node's dataset conf's.

Parameters go server -> worker and gradients worker -> server, so links.json needs a
link each way between the server and every worker. Written per node
(DIR/<node>_structure.conf, default ROOT/dml_file/conf): the server {"role": "server",
"workers", "connect", "mode", "steps", "lr", "momentum", "max_staleness", "eval_every",
...} and each worker {"role": "worker", "server", "connect"}. Defaults: -l
ROOT/links.json, -n ROOT/node_info.json; a relative path is looked up from the current
folder, then from dml_tool/.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

from dml_tool import conf_utils as cu

MODES = ("sync", "async")
FILE_KEYS = ("mode", "steps", "sync", "lr", "lr_end", "momentum", "max_staleness", "eval_every", "seed",
             "step_timeout_s", "step_retries", "node_list")


def build_confs(structure: Any, links: Mapping[str, list[str]], nodes: Mapping[str, cu.NodeAddr],
                *, file: str = "ps_structure.json", links_file: str = "links.json",
                nodes_file: str = "node_info.json") -> dict[str, dict[str, Any]]:
    """Check the structure against the links and nodes; return {node: structure conf}."""
    if not isinstance(structure, dict) or not isinstance(structure.get("node_list"), list):
        raise cu.ConfError(f"{file}: expected {{\"mode\": \"sync\", \"steps\": N, \"lr\": ..., "
                           "\"node_list\": [{\"name\": \"n1\", \"role\": \"server\"}, {\"name\": \"n2\"}, ...]}")
    cu.check_keys(structure, FILE_KEYS, file)
    mode = structure.get("mode")
    if mode not in MODES:
        raise cu.ConfError(f"{file}.mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if ("steps" in structure) == ("sync" in structure):
        raise cu.ConfError(f"{file}: give the number of updates as 'steps' (or EdgeTB's 'sync'), once")
    steps = cu.get_int(structure, "steps" if "steps" in structure else "sync", file, low=1)

    server, workers, seen = cu.server_and_members(structure, nodes, file=file, nodes_file=nodes_file,
                                                  member_role="worker", members_what="worker")

    conf: dict[str, Any] = {
        "role": "server", "workers": workers, "connect": cu.connect_map(server, links, nodes),
        "mode": mode, "steps": steps,
        **cu.server_rule(structure, file, steps=steps, max_staleness=len(workers)),
    }
    for key, low, high in (("seed", 0, None), ("step_timeout_s", 0.1, 1e6), ("step_retries", 0, 100)):
        if key in structure:
            conf[key] = (cu.get_number(structure, key, file, low=low, high=high) if key == "step_timeout_s"
                         else cu.get_int(structure, key, file, low=low, high=high))
    return {server: conf, **cu.member_confs(server, workers, seen, links, nodes, role="worker", file=file,
                                            links_file=links_file)}


# write_confs(structure, links, node_info, out_dir) and main(argv), as every conf tool has
write_confs, main = cu.structure_tool(build_confs, prog="ps_structure_conf.py", algorithm="a parameter server")


if __name__ == "__main__":
    sys.exit(main())
