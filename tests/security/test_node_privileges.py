"""Node apps are unprivileged by default: no secret on any command line while
nodes start, apps run as the edgetb-node user without capabilities, write only to their
binds and private tmpfs, see only their own processes; a node asking for root gets it.

Real namespaces, a real agent (tests/support/agents.py), real processes; as root.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


from tests.support import agents as ah
from dml_app import net
from worker import nodes as nb

ROOT = ah.ROOT
pytestmark = [ah.need_root(), ah.need_node_user()]

APP_PORT = 4466
HTTP_APP = ["python3", "-m", "http.server", str(APP_PORT), "--bind", "0.0.0.0"]


# ----------------------------------------------------------------------------- helpers

def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _app_pid(name: str, argv0: str, timeout_s: float = 30) -> int:
    """The node's app process, found through its cgroup: the one whose argv[0] is
    argv0 (the launcher's setpriv and tini name the app only as arguments)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for pid in sorted(ah.cgroup_limits(name)["pids"]):
            if _cmdline(pid)[:1] == [argv0]:
                return pid
        assert time.monotonic() < deadline, f"{name}: no process {argv0} in its cgroup"
        time.sleep(0.05)


def _user_of(pid: int) -> str:
    return subprocess.run(["ps", "-o", "user:32=", "-p", str(pid)], capture_output=True, text=True,
                          check=True).stdout.strip()


def _probe_nodes(n: int, script: str, **kw) -> ah.Deployment:
    return ah.plan(n, cmd=["python3", "-c", script], cpu=0.2, ram_mb=256, **kw)


# ----------------------------------------------------------------------------- (a) command lines

def test_no_credential_on_any_command_line_from_deploy_to_ready(clean_agent):
    agent = clean_agent
    dep = ah.plan(6, cmd=HTTP_APP, port=APP_PORT, cpu=0.2, ram_mb=128)
    with ah.CmdlineWatch() as watch:
        ah.deploy(agent, dep)
        for name in dep.names:
            ah.wait_port(dep.ip(name), APP_PORT)
    secrets_ = [agent.token, net.peer_token(agent.token)] + [net.node_token(agent.token, n) for n in dep.names]
    secrets_ += [s.rpartition(".")[2] for s in secrets_[1:]]     # their MAC parts alone too
    leaked = [c[:200] for c in watch.seen for s in secrets_ if s.encode() in c]
    assert not leaked, leaked[:3]
    # The watch did see the launch: the launcher itself (short-lived) and the app chains.
    assert any(b"launch.py\0--spec-fd\0" in c for c in watch.seen), f"{watch.sweeps} sweeps, no launcher seen"
    assert any(c.split(b"\0")[0].endswith(b"/tini") and b"http.server" in c for c in watch.seen)


# ----------------------------------------------------------------------------- (b), (e) users

def test_trainer_runs_as_the_node_user_without_capabilities(clean_agent):
    dep = ah.trainer_plan()
    node = dep.nodes[0]
    ah.deploy(clean_agent, dep)
    ah.wait_port(node["ip"], 4444, timeout_s=120)
    pid = _app_pid(node["name"], sys.executable)
    assert _user_of(pid) == nb.NODE_USER
    status = {k: v.strip() for k, v in (line.split(":", 1) for line in
                                        Path(f"/proc/{pid}/status").read_text().splitlines())}
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0" * 16
    assert status["NoNewPrivs"] == "1"
    assert status["Groups"] == ""


def test_a_node_asking_for_root_runs_as_root(clean_agent):
    dep = ah.plan(2, cmd=["sleep", "300"])
    dep.nodes[0]["root"] = True
    ah.deploy(clean_agent, dep)
    root_node, plain = dep.names
    assert _user_of(_app_pid(root_node, "sleep")) == "root"
    assert _user_of(_app_pid(plain, "sleep")) == nb.NODE_USER


def test_root_must_be_a_real_bool(clean_agent):
    dep = ah.plan(1, cmd=["sleep", "300"])
    dep.nodes[0]["root"] = "false"          # truthy: must not be taken as anything
    with pytest.raises(net.HttpError) as e:
        ah.deploy(clean_agent, dep)
    assert e.value.status == 400 and "root must be true or false" in e.value.message
    ah.assert_clean(dep)


# ----------------------------------------------------------------------------- (c) writes

WRITER = r'''
import json, os, sys
name = sys.argv[1]
targets = {"/": "/", "/etc": "/etc", "repo": sys.argv[2], "app": os.getcwd(), "data": "../dataset",
           "out": "../out", "/tmp": "/tmp", "/var/tmp": "/var/tmp", "/dev/shm": "/dev/shm",
           "home": os.environ["HOME"], "log": os.environ["DML_LOG_DIR"]}
done = {}
for key, d in targets.items():
    try:
        with open(os.path.join(d, name), "x") as f:
            f.write("x")
        done[key] = "ok"
    except OSError as e:
        done[key] = e.strerror
print(json.dumps({"writes": done, "cwd": os.getcwd()}), flush=True)
import time; time.sleep(300)
'''


def test_app_writes_only_to_its_binds_and_private_tmpfs(clean_agent, tmp_path):
    app, data, out = (tmp_path / d for d in ("app", "data", "out"))
    for d in (app, data, out):
        d.mkdir()
        d.chmod(0o777)        # open to all: only the mount keeps app and data read-only
    mark = f"etb-priv-{ah.new_tag()}"
    dep = ah.plan(1, cmd=["python3", "-c", WRITER, mark, str(ROOT)], cpu=0.2, ram_mb=256)
    node = dep.nodes[0]
    node.update(working_dir="/home/worker/dml_app",
                volumes=[{"host": str(app), "node": "/home/worker/dml_app", "ro": True},
                         {"host": str(data), "node": "/home/worker/dataset", "ro": True},
                         {"host": str(out), "node": "/home/worker/out", "ro": False}])
    host_paths = [Path(p) / mark for p in ("/", "/etc", str(ROOT), "/tmp", "/var/tmp", "/dev/shm")]
    try:
        ah.deploy(clean_agent, dep)
        got = ah.node_report(clean_agent, node["name"])["writes"]
        # The node's own: its rw volume, its private tmpfs, its home and log dir.
        assert {k: got[k] for k in ("out", "/tmp", "/var/tmp", "/dev/shm", "home", "log")} == \
            dict.fromkeys(("out", "/tmp", "/var/tmp", "/dev/shm", "home", "log"), "ok"), got
        # Nothing else, shared read-only volumes included.
        for key in ("/", "/etc", "repo", "app", "data"):
            # A repo under a folder closed to other users (/root) is not even visible.
            hidden = ("No such file or directory",) if key == "repo" else ()
            assert got[key] in ("Read-only file system", "Permission denied") + hidden, (key, got)
        assert (out / mark).exists(), "the rw volume's write did not reach the host folder"
        assert not any((d / mark).exists() for d in (app, data))
        assert [p for p in host_paths if p.exists()] == [], "a node write reached the host"
        log = clean_agent.state_dir / "nodes" / node["name"] / "log"
        assert (log / mark).exists(), "the log dir is not the node's run dir log"
    finally:
        for p in host_paths:
            if p.exists() and p.is_file():
                p.unlink()


# ----------------------------------------------------------------------------- (d) processes

LISTER = r'''
import json, os, sys, time
procs = {}
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            procs[p] = open(f"/proc/{p}/comm").read().strip()
        except OSError:
            pass
try:
    os.kill(int(sys.argv[1]), 0)
    other = "visible"
except ProcessLookupError:
    other = "no such process"
except PermissionError:
    other = "permission denied"
print(json.dumps({"procs": procs, "me": os.getpid(), "other": other}), flush=True)
time.sleep(300)
'''


def test_a_node_sees_only_its_own_processes(clean_agent):
    # First a node to hide from; then a lister given that node's app pid (as the host sees it).
    dep = ah.plan(2, cmd=["sleep", "300"])
    first = ah.Deployment(emulator=dep.emulator, bridge=dep.bridge, network=dep.network,
                          gateway=dep.gateway, nodes=dep.nodes[:1])
    ah.deploy(clean_agent, first)
    victim = _app_pid(first.names[0], "sleep")
    lister = dict(dep.nodes[1], cmd=["python3", "-c", LISTER, str(victim)])
    second = ah.Deployment(emulator=dep.emulator, bridge=dep.bridge, network=dep.network,
                           gateway=dep.gateway, nodes=[lister])
    ah.deploy(clean_agent, second)
    got = ah.node_report(clean_agent, lister["name"])
    # pid 1 is tini (its init), the app is pid 2; nothing else of the machine.
    assert got["procs"] == {"1": "tini", str(got["me"]): "python3"}, got
    assert got["me"] == 2
    assert got["other"] == "no such process"      # the other node's app cannot be named


# ----------------------------------------------------------------------------- refusals

def test_a_host_working_dir_the_node_user_cannot_read_is_refused(clean_agent, tmp_path):
    closed = tmp_path / "closed"           # under pytest's 0700 folder: root's alone
    closed.mkdir()
    dep = ah.plan(2, cmd=["sleep", "300"])
    dep.nodes[1]["working_dir"] = str(closed)
    with pytest.raises(net.HttpError) as e:
        ah.deploy(clean_agent, dep)
    assert e.value.status == 422 and f"working_dir {closed}" in e.value.message and "root=True" in e.value.message
    ah.assert_clean(dep)
    dep.nodes[1]["root"] = True            # as root it may
    ah.deploy(clean_agent, dep)
    assert _user_of(_app_pid(dep.names[1], "sleep")) == "root"


def test_without_the_node_user_nothing_is_deployed(tmp_path, monkeypatch):
    from worker import agent as agent_mod

    monkeypatch.setattr(nb, "NODE_USER", "edgetb-no-such-user")
    a = agent_mod.Agent(name="t", port=1, token="x", state_dir=tmp_path / "state")
    dep = ah.plan(2, cmd=["sleep", "300"])
    with pytest.raises(nb.NodeError, match=r"no user edgetb-no-such-user.*install\.sh"):
        a.deploy_emulated(dep.body())
    ah.assert_clean(dep)
    assert a.nodes == {} and a.bridges == {}
    dep.nodes[0]["root"] = dep.nodes[1]["root"] = True      # root nodes do not need it
    try:
        a.deploy_emulated(dep.body())
        assert _user_of(_app_pid(dep.names[0], "sleep")) == "root"
    finally:
        a.reset("all")
    ah.assert_clean(dep)


# ----------------------------------------------------------------------------- docker nodes

@pytest.mark.docker
def test_docker_nodes_run_as_the_node_user_without_capabilities(clean_agent):
    from tests.support import containers as dt

    why = dt.why_not()
    if why:
        pytest.skip(f"docker: {why}")   # why is tagged (dt.why_not)
    dep = dt.plan(2, cmd=["sh", "-c", "touch /run/edgetb-node/log/started; "
                                      "touch /run/edgetb-node/x 2>/dev/null && echo rundir-writable; "
                                      "exec sleep infinity"])
    dep.nodes[1]["root"] = True
    plain, root_node = dep.names
    uid, gid = nb.node_user()
    client = dt.client()
    try:
        with dt.deployed(clean_agent, dep):
            for name in dep.names:
                log = clean_agent.state_dir / "nodes" / name / "log" / "started"
                deadline = time.monotonic() + 60
                while not log.exists():
                    assert time.monotonic() < deadline, f"{name}: its app never wrote to its log dir"
                    time.sleep(0.1)
            ctr = client.containers.get(f"etb-{plain}")
            assert ctr.attrs["Config"]["User"] == f"{uid}:{gid}"
            assert ctr.attrs["HostConfig"]["CapDrop"] == ["ALL"]
            assert "no-new-privileges" in ctr.attrs["HostConfig"]["SecurityOpt"]
            top = ctr.top(ps_args="-o pid,user:32,args")["Processes"]
            assert {p[1] for p in top} == {nb.NODE_USER}, top          # tini and the gate too
            assert b"rundir-writable" not in ctr.logs()
            boss = client.containers.get(f"etb-{root_node}")
            assert boss.attrs["Config"]["User"] in ("", "0", "root")
            top = boss.top(ps_args="-o pid,user:32,args")["Processes"]
            assert [p[1] for p in top if p[-1] == "sleep infinity"] == ["root"], top
    finally:
        client.close()
    dt.assert_clean(dep)


# ----------------------------------------------------------------------------- the launcher's fallback

FALLBACK = r'''
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("launch", sys.argv[1])
launch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch)
launch.SYS_MOUNT_SETATTR = 100000           # ENOSYS: as on a kernel without mount_setattr
base, t = sys.argv[2], os.path.join(sys.argv[2], "t")
os.mkdir(t)
launch.tmpfs(t, 1, "0755")
def opts(point):
    return [o for p, o in launch._mounts(None, point)][0]
before = opts("/dev/shm") if os.path.ismount("/dev/shm") else None
def write(d):
    try:
        open(os.path.join(d, "x"), "w").close()
        return "ok"
    except OSError as e:
        return e.strerror
launch.set_readonly("/", True, recursive=True)
out = {"base": write(base), "t": write(t)}
launch.set_readonly(t, False)
out.update(t_again=write(t), base_again=write(base), shm_flags_kept=before is None or
           (before - {"rw", "ro"}) <= opts("/dev/shm"), shm_ro="ro" in opts("/dev/shm") if before else True)
print(json.dumps(out))
'''


def test_read_only_by_remounts_where_mount_setattr_is_missing(tmp_path):
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-I", "-S", "-c",
                        FALLBACK, nb.LAUNCH, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got == {"base": "Read-only file system", "t": "Read-only file system", "t_again": "ok",
                   "base_again": "Read-only file system", "shm_flags_kept": True, "shm_ro": True}, got
    (tmp_path / "host-still-writes").touch()    # the host's mounts never changed
