"""A node is a box: beside cpu and memory, no swap beyond its memory, a pids limit, a
sized run dir (its logs and stdout.log), an IPC namespace of its own and a seccomp
filter; docker nodes the same pids limit and swap rule.

The filter's verdicts run in a child process of the test; everything else on real
nodes through a real agent (tests/support/agents.py), as root. Each test resets what it
deployed and checks that nothing of it is left, even when it fails.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest


from tests.support import agents as ah
from dml_app import net
from worker import nodes as nb
from worker import seccomp

ROOT = ah.ROOT
MB = 2**20


# ----------------------------------------------------------------------------- the filter alone

# Every refused call with arguments that would fail anyway if it were let through
# (EINVAL, EFAULT, EBADF, ESRCH...), so EPERM can only be the filter's, even as root.
VERDICTS = r'''
import ctypes, errno, json, os, subprocess, sys, threading
from worker import seccomp
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = seccomp.NUMBERS.get(seccomp.machine())
def call(name, *args, nr=None):
    ret = libc.syscall(ctypes.c_long(nr if nr is not None else NR[name]), *[ctypes.c_long(a) for a in args])
    if ret == 0 and name == "clone":
        os._exit(0)               # a child made after all: it must not run on
    return 0 if ret >= 0 else errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())
out = {"installed": seccomp.install(), "active": seccomp.active()}
bad = -1
args = {"reboot": (0, 0, 0, 0), "kexec_load": (0, 0, 0, 0xFFFFFFFF), "kexec_file_load": (bad, bad, 0, 0, 0xFFFFFFFF),
        "swapon": (0, 0), "swapoff": (0,), "init_module": (0, 0, 0), "finit_module": (bad, 0, 0),
        "delete_module": (0, 0), "mount": (0, 0, 0, 0, 0), "umount2": (0, 0), "pivot_root": (0, 0),
        "open_tree": (bad, 0, 0), "move_mount": (bad, 0, bad, 0, 0), "fsopen": (0, 0), "fsconfig": (bad, 0, 0, 0, 0),
        "fsmount": (bad, 0, 0), "fspick": (bad, 0, 0), "mount_setattr": (bad, 0, 0, 0, 0), "setns": (bad, 0),
        "bpf": (bad, 0, 0), "keyctl": (0x7FFF, 0, 0, 0, 0), "add_key": (0, 0, 0, 0, 0), "request_key": (0, 0, 0, 0),
        "ptrace": (0x7FFF, 0, 0, 0), "process_vm_readv": (0, 0, 0, 0, 0, 0), "process_vm_writev": (0, 0, 0, 0, 0, 0),
        "userfaultfd": (0x7FFF,), "io_uring_setup": (0, 0), "io_uring_enter": (bad, 0, 0, 0, 0, 0),
        "io_uring_register": (bad, 0, 0, 0)}
out["refused"] = {name: call(name, *a) for name, a in args.items()}
out["unshare_user"] = call("unshare", 0x10000000)
out["unshare_net"] = call("unshare", 0x40000000)
out["unshare_ipc"] = call("unshare", 0x08000000)
out["unshare_nothing"] = call("unshare", 0)
out["clone_user"] = call("clone", 0x10000000 | 17, 0, 0, 0, 0)
out["clone3"] = call("clone3", 0, 0)
if seccomp.machine() == "x86_64":
    out["x32"] = call("getpid", nr=0x40000000 | 39)
out["getpid"] = call("getpid", nr={"x86_64": 39, "aarch64": 172}[seccomp.machine()])
t = threading.Thread(target=lambda: None)
t.start(); t.join()
out["thread"] = "ok"
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
out["subprocess"] = subprocess.run(["true"]).returncode
print(json.dumps(out))
'''


@pytest.mark.skipif(seccomp.machine() not in seccomp.NUMBERS, reason=ah.skip_reason(
    "has-it", f"no seccomp numbers for {seccomp.machine()}: node apps run without a filter there"))
def test_the_filter_refuses_what_apps_have_no_business_doing_and_nothing_else():
    p = subprocess.run([sys.executable, "-c", VERDICTS, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got.pop("installed") is True and got.pop("active") is True
    assert got.pop("refused") == dict.fromkeys(seccomp.REFUSED, "EPERM")
    assert got == {"unshare_user": "EPERM", "unshare_net": "EPERM", "unshare_ipc": "EPERM", "unshare_nothing": 0,
                   "clone_user": "EPERM", "clone3": "ENOSYS", "getpid": 0, "thread": "ok", "fork": 7,
                   "subprocess": 0, **({"x32": "EPERM"} if seccomp.machine() == "x86_64" else {})}, got


def test_the_program_is_well_formed_and_its_numbers_are_the_kernels():
    prog = seccomp.program()
    assert 0 < len(prog) < 4096           # BPF_MAXINSNS
    for i, (code, jt, jf, k) in enumerate(prog):
        if code & 0x07 == 0x05:           # a jump: forward, inside the program
            assert i + 1 + max(jt, jf) < len(prog), i
    assert prog[-1][0] == seccomp.BPF_RET_K
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if header.exists():
        have = dict(re.findall(r"#define __NR_(\w+) (\d+)", header.read_text()))
        assert {n: int(have[n]) for n in seccomp.NUMBERS["x86_64"]} == seccomp.NUMBERS["x86_64"]
    generic = Path("/usr/include/asm-generic/unistd.h")
    if generic.exists():
        have = dict(re.findall(r"#define __NR(?:3264)?_(\w+) (\d+)", generic.read_text()))
        assert {n: int(have[n]) for n in seccomp.NUMBERS["aarch64"]} == seccomp.NUMBERS["aarch64"]


def test_pids_and_log_size_are_checked_per_node():
    base = {"name": "bx1", "id": 1, "ip": "10.0.0.2", "port": 4444, "cmd": ["true"]}
    spec = nb.NodeSpec.from_dict(base)
    assert (spec.pids, spec.log_mb) == (nb.DEFAULT_PIDS, nb.DEFAULT_LOG_MB) == (512, 64)
    assert nb.NodeSpec.from_dict({**base, "pids": 100, "log_mb": 8}).pids == 100
    for key, value in (("pids", 3), ("pids", "512"), ("pids", 1.5), ("pids", True), ("pids", 10**7),
                       ("log_mb", 0), ("log_mb", "64")):
        with pytest.raises(nb.NodeError, match=rf"bad node 'bx1': {key} must be an integer in"):
            nb.NodeSpec.from_dict({**base, key: value})
    from controller.deploy import node_body
    from controller.testbed import Testbed, DefinitionError

    tb = Testbed("127.0.0.1", str(ROOT))
    emu = tb.add_emulator("e1", "127.0.0.1", cpu=2, ram=4)
    tb.add_emulated_node("bx2", "/x", ["true"], emulator=emu, pids=64, log_mb=16)
    tb.add_emulated_node("bx3", "/x", ["true"], emulator=emu, pids=8)
    body = node_body(tb.emulated["bx2"], "c", "a")
    assert (body["pids"], body["log_mb"]) == (64, 16)
    assert "pids" not in node_body(tb.emulated["bx3"], "c", "a")      # the agent's default
    with pytest.raises(DefinitionError, match=r"node bx3: pids must be an integer in \[16, 65536\], got 8"):
        tb.validate()


# ----------------------------------------------------------------------------- real nodes



@pytest.fixture(scope="module")
def agent():
    why = ah.missing_requirements()
    if why:
        pytest.skip(why)
    with ah.running_agent() as a:
        yield a


def _status(agent, name: str) -> dict:
    return agent.get("/status")["nodes"][name]


FORK_BOMB = r'''
import errno, json, os, sys, time
kids, why = [], None
for _ in range(100000):                       # bounded: the pids limit stops it long before
    try:
        pid = os.fork()
    except OSError as e:
        why = errno.errorcode[e.errno]
        break
    if pid == 0:
        time.sleep(120)                       # each child ends on its own too
        os._exit(0)
    kids.append(pid)
print(json.dumps({"forked": len(kids), "error": why}), flush=True)
time.sleep(300)
'''
HTTP_PORT = 4467


@ah.need_root()
@ah.need_node_user()
def test_a_fork_bomb_stops_at_its_pids_limit_and_harms_no_one(agent):
    dep = ah.plan(2, cmd=["python3", "-m", "http.server", str(HTTP_PORT), "--bind", "0.0.0.0"],
                  port=HTTP_PORT, cpu=0.3, ram_mb=256)
    bomb, other = dep.names
    dep.nodes[0].update(cmd=["python3", "-c", FORK_BOMB], pids=64)
    with ah.deployed(agent, dep):
        got = ah.node_report(agent, bomb)
        # tini, the app and its children: the fork that would be the 65th task fails.
        assert got["error"] == "EAGAIN" and 55 <= got["forked"] < 64, got
        # Meanwhile (the bomb's children still alive) the other node answers, the host forks.
        assert ah.cgroup_limits(bomb)["pids_max"] == 64 and len(ah.cgroup_limits(bomb)["pids"]) > 55
        ah.wait_port(dep.ip(other), HTTP_PORT)
        import requests
        s = requests.Session()
        s.trust_env = False
        assert s.get(f"http://{dep.ip(other)}:{HTTP_PORT}/", timeout=10).status_code == 200
        assert subprocess.run(["true"]).returncode == 0
        st = _status(agent, bomb)
        assert st["box"]["pids_max"] == 64 and st["box"]["pids_current"] >= 55, st
        assert any(h.startswith("pids.max 64 reached") for h in st["box_hits"]), st
        other_box = _status(agent, other)["box"]
        assert other_box["pids_max"] == 512 and other_box["swap_bytes"] in (0, None)
        assert other_box["own_ipc_namespace"] is True and other_box["seccomp"] is True
        assert _status(agent, other)["box_hits"] == []


LOG_FILLER = r'''
import errno, json, os
chunk = b"x" * (1 << 20)
out = {}
path = os.path.join(os.environ["DML_LOG_DIR"], "big")
written = 0
try:
    with open(path, "wb", buffering=0) as f:
        while written < (2 << 30):            # 2 GiB asked
            written += f.write(chunk)
except OSError as e:
    out["log_error"] = errno.errorcode[e.errno]
out["log_written"] = written
os.unlink(path)
written = 0
try:
    while written < (2 << 30):
        written += os.write(1, chunk)         # stdout.log, the agent's redirect
except OSError as e:
    out["stdout_error"] = errno.errorcode[e.errno]
out["stdout_written"] = written
os.ftruncate(1, 0)                            # room again for the report
print(json.dumps(out), flush=True)
import time; time.sleep(300)
'''


@ah.need_root()
@ah.need_node_user()
def test_a_2gb_log_write_fails_at_the_log_size_and_the_hosts_run_is_untouched(agent):
    dep = ah.plan(1, cmd=["python3", "-c", LOG_FILLER], cpu=0.5, ram_mb=256)
    dep.nodes[0]["log_mb"] = 32
    name = dep.names[0]
    rundir = agent.state_dir / "nodes" / name
    free_before = os.statvfs("/run").f_bavail * os.statvfs("/run").f_frsize
    with ah.deployed(agent, dep):
        assert os.path.ismount(rundir)
        got = ah.node_report(agent, name)
        assert got["log_error"] == "ENOSPC" and 24 * MB <= got["log_written"] <= 32 * MB, got
        assert got["stdout_error"] == "ENOSPC" and 24 * MB <= got["stdout_written"] <= 32 * MB, got
        free_after = os.statvfs("/run").f_bavail * os.statvfs("/run").f_frsize
        # Other work on this machine may write meanwhile; 2 GB would show whatever it did.
        assert abs(free_after - free_before) < 256 * MB, (free_before, free_after)
        assert _status(agent, name)["box"]["log_bytes"] == 32 * MB
        # The agent still reads the node's files on the host side.
        assert (rundir / "log").is_dir() and (rundir / "stdout.log").exists()
    assert not os.path.ismount(rundir) and not rundir.exists()


PROBE = r'''
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def err(ret):
    return 0 if ret >= 0 else errno.errorcode[ctypes.get_errno()]
nr = {"bpf": 321, "keyctl": 250} if os.uname().machine == "x86_64" else {"bpf": 280, "keyctl": 219}
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print(json.dumps({
    "unshare_user": err(libc.unshare(0x10000000)),
    "bpf": err(libc.syscall(ctypes.c_long(nr["bpf"]), ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))),
    "keyctl": err(libc.syscall(ctypes.c_long(nr["keyctl"]), ctypes.c_long(0), ctypes.c_long(0))),
    "ipc": os.readlink("/proc/self/ns/ipc"), "seccomp": status["Seccomp"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip()}), flush=True)
import time; time.sleep(300)
'''


@ah.need_root()
@ah.need_node_user()
def test_an_exec_app_has_its_own_ipc_namespace_and_the_filter(agent):
    dep = ah.plan(1, cmd=["python3", "-c", PROBE], cpu=0.3, ram_mb=128)
    with ah.deployed(agent, dep):
        got = ah.node_report(agent, dep.names[0])
    assert got == {"unshare_user": "EPERM", "bpf": "EPERM", "keyctl": "EPERM", "ipc": got["ipc"],
                   "seccomp": "2", "no_new_privs": "1"}, got
    assert got["ipc"] != os.readlink("/proc/self/ns/ipc")


@ah.need_root()
@ah.need_node_user()
def test_a_forked_runtime_role_has_its_own_ipc_namespace_and_the_filter(agent):
    dep = ah.trainer_plan()
    node = dep.nodes[0]
    with ah.deployed(agent, dep):
        ah.wait_port(node["ip"], 4444, timeout_s=120)
        apps = [p for p in ah.cgroup_limits(node["name"])["pids"]
                if os.path.realpath(f"/proc/{p}/exe") == os.path.realpath(sys.executable)]
        assert len(apps) == 1, apps
        pid = apps[0]
        assert "worker/zygote.py" in Path(f"/proc/{ah.proc_status(pid)['PPid']}/cmdline").read_text()
        st = ah.proc_status(pid)
        assert (st["Seccomp"].strip(), st["NoNewPrivs"].strip()) == ("2", "1"), st
        assert os.readlink(f"/proc/{pid}/ns/ipc") != os.readlink("/proc/self/ns/ipc")
        assert ah.cgroup_limits(node["name"])["pids_max"] == 512
        # It trains all the same: the filter leaves threads (clone3 -> clone) to it.
        assert net.get_json(f"{node['ip']}:4444/hi", token=net.node_token(agent.token, node["name"]),
                            timeout_s=10)["node"] == node["name"]


@ah.need_root()
@ah.need_node_user()
def test_a_root_node_keeps_the_hosts_ipc_and_no_filter_but_is_limited(agent):
    dep = ah.plan(1, cmd=["sleep", "300"], cpu=0.2, ram_mb=64)
    dep.nodes[0].update(root=True, pids=32)
    name = dep.names[0]
    with ah.deployed(agent, dep):
        deadline = time.monotonic() + 30
        while not ah.cgroup_limits(name)["pids"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pid = min(ah.cgroup_limits(name)["pids"])
        assert ah.proc_status(pid)["Seccomp"].strip() == "0"
        assert os.readlink(f"/proc/{pid}/ns/ipc") == os.readlink("/proc/self/ns/ipc")
        assert ah.cgroup_limits(name)["pids_max"] == 32
        assert os.path.ismount(agent.state_dir / "nodes" / name)


@ah.need_root()
@ah.need_node_user()
def test_a_bad_pids_value_is_refused_naming_the_node(agent):
    dep = ah.plan(2, cmd=["sleep", "300"])
    dep.nodes[1]["pids"] = 5
    with pytest.raises(net.HttpError) as e:
        ah.deploy(agent, dep)
    assert e.value.status == 400 and f"bad node '{dep.names[1]}': pids must be an integer" in e.value.message
    ah.assert_clean(dep)


# ----------------------------------------------------------------------------- docker nodes

@pytest.mark.docker
def test_a_docker_node_has_the_pids_limit_no_extra_swap_and_private_ipc(agent):
    from tests.support import containers as dt

    why = dt.why_not()
    if why:
        pytest.skip(f"docker: {why}")   # why is tagged (dt.why_not)
    dep = dt.plan(1, ram_mb=256)
    dep.nodes[0]["pids"] = 100
    client = dt.client()
    try:
        with dt.deployed(agent, dep):
            host = client.containers.get(f"etb-{dep.names[0]}").attrs["HostConfig"]
            assert host["PidsLimit"] == 100
            assert host["Memory"] == host["MemorySwap"] == 256 * MB
            assert host["IpcMode"] == "private"
            assert "seccomp=unconfined" not in (host.get("SecurityOpt") or [])
            assert _status(agent, dep.names[0])["box"]["pids_max"] == 100
            assert os.path.ismount(agent.state_dir / "nodes" / dep.names[0])
    finally:
        client.close()
