"""The forking launcher (worker/zygote.py): a node app forked from the zygote is
indistinguishable from an exec'd one where it matters, and leaves nothing behind.

Two fl_trainer nodes on one real agent: one runs the scripts of the repository's
dml_app/ (the zygote forks it), the other those of a copy with one file more (a user's
changed app folder: exec'd through worker/launch.py). Their processes are compared
through /proc: user, capabilities, namespaces, address and routes, cgroups and limits,
mounts, working dir, environment and credentials. Real namespaces, real processes; root.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


from tests.support import agents as ah
from dml_app import net
from worker import nodes as nb

ROOT = ah.ROOT
pytestmark = [ah.need_root(), ah.need_node_user()]

PORT = 4444
PY = os.path.realpath(sys.executable)


def _trainers(app_dirs: list[Path]) -> ah.Deployment:
    dep = ah.plan(len(app_dirs), cmd=["python3", "fl_trainer.py"], port=PORT, cpu=0.5, ram_mb=700)
    for node, app in zip(dep.nodes, app_dirs):
        node.update(working_dir="/home/worker/dml_app",
                    volumes=[{"host": str(app), "node": "/home/worker/dml_app", "ro": True},
                             {"host": str(ROOT / "dataset"), "node": "/home/worker/dataset", "ro": True}])
        node["env"].update(NET_NODE_NAME=node["name"], DML_PORT=str(PORT), EDGE_TB_ID="7")
    return dep


def _changed_copy(tmp_path: Path) -> Path:
    """dml_app/ with one file more: not what the zygote loaded, so exec'd."""
    copy = tmp_path / "dml_app"
    shutil.copytree(ROOT / "dml_app", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "my_helper.py").write_text("X = 1\n")
    os.chmod(tmp_path, 0o755)
    for d, _, files in os.walk(copy):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    return copy


def _hi(agent, dep, name: str, timeout_s: float = 120) -> dict:
    """GET /hi of the node's app with its own credential, once it answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return net.get_json(f"{dep.ip(name)}:{PORT}/hi", token=net.node_token(agent.token, name), timeout_s=5)
        except net.HttpError:
            assert time.monotonic() < deadline, f"{name}: the app never answered"
            time.sleep(0.1)


def _app_pid(name: str) -> int:
    """The node's Python app: the process of its cgroup whose program is the agent's Python."""
    pids = [p for p in ah.cgroup_limits(name)["pids"] if _exe(p) == PY]
    assert len(pids) == 1, (name, {p: _exe(p) for p in ah.cgroup_limits(name)["pids"]})
    return pids[0]


def _exe(pid: int) -> str | None:
    try:
        return os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return None


def _ns(pid, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _environ(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


def _mounts(pid: int) -> dict[str, set]:
    out = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        f = line.split()
        out[f[4]] = set(f[5].split(","))
    return out


def _in_ns(pid: int, argv: list[str]) -> str:
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True, text=True,
                          check=True, timeout=30).stdout


def _facts(agent, dep, name: str) -> dict:
    """What a user (or another node) can tell about a node's app."""
    pid = _app_pid(name)
    st = ah.proc_status(pid)
    env = _environ(pid)
    mounts = _mounts(pid)
    cg = ah.cgroup_limits(name)
    return {
        "user": (st["Uid"].split(), st["Gid"].split(), st["Groups"].strip()),
        "caps": [st[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
        "no_new_privs": st["NoNewPrivs"],
        "pid_in_own_ns": st["NSpid"].split()[-1],
        "own_pid_ns": _ns(pid, "pid") != _ns("self", "pid"),
        "own_mnt_ns": _ns(pid, "mnt") != _ns("self", "mnt"),
        "netns": os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{dep.ns(name)}").st_ino,
        "ip": dep.ip(name) in _in_ns(pid, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]),
        "route": f"default via {dep.gateway}" in _in_ns(pid, ["ip", "route"]),
        "in_cgroup": pid in cg["pids"],
        "limits": (cg["cpu_quota_us"], cg["memory_bytes"]),
        "cwd": os.readlink(f"/proc/{pid}/cwd"),
        "app_ro": "ro" in mounts.get(f"{nb.NODE_DIR}/root/home/worker/dml_app", {"missing"}),
        "log_rw": "rw" in mounts.get(f"{nb.NODE_DIR}/log", {"missing"}),
        "tmp_private": "/tmp" in mounts and "rw" in mounts["/tmp"],
        "root_ro": "ro" in mounts["/"],
        "env": {k: env.get(k) for k in ("NET_NODE_NAME", "DML_PORT", "EDGE_TB_ID", "HOME", "USER",
                                         "DML_LOG_DIR", "DML_CPU")},
        "own_token": env.get(net.TOKEN_ENV) == net.node_token(agent.token, name),
        "peer_token": env.get(net.PEER_TOKEN_ENV) == net.peer_token(agent.token),
        "admin_token_absent": agent.token not in "".join(env.values()),
        "env_keys": sorted(k for k in env if k != ah.MARKER_ENV),
    }


def _parent_cmdline(pid: int) -> str:
    ppid = int(ah.proc_status(pid)["PPid"])
    return Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_a_forked_app_is_like_an_exec_app(clean_agent, tmp_path):
    dep = _trainers([ROOT / "dml_app", _changed_copy(tmp_path)])
    forked, execd = dep.names
    ah.deploy(clean_agent, dep)
    for name in dep.names:
        assert _hi(clean_agent, dep, name)["node"] == name
    # Which launcher ran which: the forked app's parent is the zygote, the other's is tini.
    assert "worker/zygote.py" in _parent_cmdline(_app_pid(forked))
    assert _parent_cmdline(_app_pid(execd)).split()[0].endswith("tini")
    a, b = _facts(clean_agent, dep, forked), _facts(clean_agent, dep, execd)
    uid = subprocess.run(["id", "-u", nb.NODE_USER], capture_output=True, text=True).stdout.strip()
    assert a["user"][0] == [uid] * 4 and a["user"][2] == ""
    assert a["caps"] == ["0" * 16] * 5 and a["no_new_privs"] == "1"
    assert a["limits"] == (50_000, 700 << 20)
    for key in ("netns", "ip", "route", "in_cgroup", "own_pid_ns", "own_mnt_ns", "app_ro", "log_rw",
                "tmp_private", "root_ro", "own_token", "peer_token", "admin_token_absent"):
        assert a[key] is True, (key, a)
    # The app is pid 1 of its PID namespace when forked, pid 2 (under tini) when exec'd.
    assert (a.pop("pid_in_own_ns"), b.pop("pid_in_own_ns")) == ("1", "2")
    assert a["env"].pop("NET_NODE_NAME") == forked and b["env"].pop("NET_NODE_NAME") == execd
    assert a == b


def test_kill_and_reset_leave_nothing(clean_agent):
    dep = _trainers([ROOT / "dml_app"] * 3)
    ah.deploy(clean_agent, dep)
    for name in dep.names:
        _hi(clean_agent, dep, name)
    victim = dep.names[0]
    pid = _app_pid(victim)
    assert "worker/zygote.py" in _parent_cmdline(pid)
    dep.record_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while clean_agent.get("/status")["nodes"][victim]["state"] != "exited":
        assert time.monotonic() < deadline, clean_agent.get("/status")
        time.sleep(0.1)
    others = clean_agent.get("/status")["nodes"]
    assert [others[n]["state"] for n in dep.names[1:]] == ["running", "running"]
    clean_agent.post("/emulated/reset")
    ah.assert_clean(dep)


def test_a_forked_app_that_fails_says_why_in_its_stdout_log(clean_agent):
    dep = _trainers([ROOT / "dml_app"])
    node = dep.nodes[0]
    node["env"]["NET_NODE_NAME"] = "bad name!"          # the runtime refuses it and exits 2
    ah.deploy(clean_agent, dep)
    deadline = time.monotonic() + 60
    while clean_agent.get("/status")["nodes"][node["name"]]["state"] != "exited":
        assert time.monotonic() < deadline, clean_agent.get("/status")
        time.sleep(0.1)
    log = (clean_agent.state_dir / "nodes" / node["name"] / "stdout.log").read_text()
    assert "NET_NODE_NAME='bad name!'" in log, log


def _memory_holds(pid: int, needles: list[bytes]) -> list[bytes]:
    """Which needles are anywhere in the writable memory of process pid (read as root)."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if "w" not in perms:
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(lo)
                chunk = mem.read(hi - lo)
            except (OSError, ValueError, OverflowError):
                continue
            found |= {n for n in needles if n in chunk}
    return sorted(found)


def test_no_node_credential_stays_in_the_zygote(clean_agent):
    """Every child copies the zygote's memory: had the zygote read a node's spec, the nodes
    forked after it would hold that node's credential. Only the child reads its spec."""
    dep = _trainers([ROOT / "dml_app"] * 3)
    ah.deploy(clean_agent, dep)
    for name in dep.names:
        _hi(clean_agent, dep, name)
    zygote = int(ah.proc_status(_app_pid(dep.names[0]))["PPid"])
    assert "worker/zygote.py" in Path(f"/proc/{zygote}/cmdline").read_bytes().decode()
    tokens = [net.node_token(clean_agent.token, n).encode() for n in dep.names]
    assert _memory_holds(zygote, tokens) == []
    # The check can fail: the last node's own app does hold its credential.
    assert _memory_holds(_app_pid(dep.names[-1]), tokens) == [tokens[-1]]
