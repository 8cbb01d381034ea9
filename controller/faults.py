"""Fault actions and link changes on a deployed testbed, through the agents
(controller/agents.py): a node's app killed, paused, resumed or restarted (and a
restarted one given its confs again), a link taken down or up, a link's rate changed in
place, every link replaced from a links file. The run service (controller/run.py) owns
one Faults; the /fault/* routes, /update/tc and scenarios (controller/scenario.py) come
through it."""
from __future__ import annotations

import threading
from pathlib import Path

from controller import agents, files
from controller.testbed import DefinitionError
from dml_app import formats, net


class Faults:
    """The fault actions of one run (`run`: controller/run.py Run): its nodes, testbed,
    confs and algorithm (whose before_fault, after_fault and on_rejoin hooks it calls)."""

    NODE_FAULTS = formats.NODE_FAULTS
    LINK_FAULTS = formats.LINK_FAULTS

    def __init__(self, run):
        self.run = run
        self.tb = run.tb
        self._links_lock = threading.Lock()      # link_rate's read-modify-write of tb.links

    def update_links(self, path: str) -> dict:
        """Replace every link with those of a links file (relative: to the testbed's
        dir_name) read by controller/files.py: a regular file inside the project's
        folders, at most 16 MiB; anything else is refused naming only that rule."""
        raw = files.read_project_file(path, self.run.file_folders(), files.LINKS_FILE_LIMIT,
                                      what="links file", base=self.tb.dir_name)
        p = Path(path) if Path(path).is_absolute() else Path(self.tb.dir_name) / path
        links = net.parse_json_body(raw, want_object=False, what=str(p))
        problems = self.tb.link_problems(links if isinstance(links, dict) else {}, str(p))
        if not isinstance(links, dict):
            problems.append(f"{p}: expected an object {{node: [links]}}")
        if problems:
            raise DefinitionError(problems)
        agents = self.tb.agents
        out = {c.label: c.update_tc(self.tb.agent_links(links, agents.nodes_of(c))) for c in agents.deployed()}
        self.tb.links = links
        return out


    def _agent_of(self, node) -> agents.AgentClient:
        """The agent of a deployed node; ValueError otherwise."""
        if not isinstance(node, str) or node not in self.run._nodes():
            raise ValueError(f"unknown node {str(node)[:64]!r}")
        client = self.tb.agents.of(node)
        if client is None:
            raise ValueError(f"node {node} is not deployed")
        return client

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

    def _agent_call(self, node: str, call) -> tuple[bool, str, dict]:
        """call(the agent of `node`) -> (done, the worker's label, its answer or
        {"error", "status"} naming the worker)."""
        client = self._agent_of(node)
        try:
            return True, client.label, call(client)
        except net.HttpError as e:
            return False, client.label, {"error": f"{client.label}: {e.message}", "status": e.status}

    def node_fault(self, node: str, action: str) -> dict:
        """kill, pause, resume or restart one node's app, live, through its agent
        (POST /node/fault). -> {"ok", "detail", "node", "action", "state"?}; ValueError
        for an unknown node or action. A restart returns once the app is started again
        (its readiness shows in /status)."""
        if action not in self.NODE_FAULTS:
            raise ValueError(f"action: {str(action)[:32]!r} is not one of {', '.join(self.NODE_FAULTS)}")
        self._agent_of(node)
        self.run.algo.before_fault(node, action)
        if action != "resume":
            self.tb.forget_ready([node])    # /conf/* waits for it to answer again
        ok, label, ans = self._agent_call(node, lambda c: c.node_fault(node, action))
        out = {"ok": ok, "node": node, "action": action}
        if ok:
            out.update(state=ans.get("state"), detail=f"{node}: {action} done on {label} (app {ans.get('state')})")
            if action == "restart":
                rejoin = self.run.rejoin(node)
                out["detail"] += f"; {rejoin}" if rejoin else ""
        else:
            out.update(detail=f"{node}: {action} failed: {ans['error']}", status=ans["status"])
        self.run.algo.after_fault(node, action, out)
        return out

    def link_fault(self, src: str, dest: str, action: str, both: bool = False) -> dict:
        """Take the link src -> dest (and dest -> src when both) down (0 bytes pass) or up
        (its rate as links.json has it now), through the agents (POST /link/fault).
        -> {"ok", "detail", "links": [{"src", "dest", "ok", ...}]}; ValueError for an
        unknown node, a link links.json does not have, or a bad action."""
        if action not in self.LINK_FAULTS:
            raise ValueError(f"action: {str(action)[:32]!r} is not one of {', '.join(self.LINK_FAULTS)}")
        done = []
        for s, d in self._link_pairs(src, dest, both):
            ok, label, ans = self._agent_call(s, lambda c: c.link_fault(s, d, action))
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
                ok, label, ans = self._agent_call(s, lambda c: c.update_tc(self.tb.agent_links(new, [s])))
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

