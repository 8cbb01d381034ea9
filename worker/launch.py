"""Starts one node app inside its namespace: joins the node's cgroups, bind-mounts its
volumes in a mount namespace of its own, changes to its working dir and execs the app.

Run by the agent as `python3 worker/launch.py --spec JSON`. Stage one joins the cgroups
on the host (`ip netns exec` mounts a fresh /sys, which hides /sys/fs/cgroup) and execs
`ip netns exec NS` on stage two, which then has a private (slave) mount namespace, so the
binds are seen by the node alone and vanish with it. Standalone on purpose: it imports
nothing from the project, so it runs the same from any working directory.
"""
import json
import os
import subprocess
import sys


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("--spec", "--inside"):
        sys.exit("usage: launch.py --spec JSON")
    spec = json.loads(sys.argv[2])
    if sys.argv[1] == "--spec":
        # Join the cgroups first, so everything the app forks is limited too.
        for procs in spec.get("cgroup_procs", []):
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        spec["host_mnt_ns"] = os.readlink("/proc/self/ns/mnt")
        me = [sys.executable, os.path.abspath(__file__), "--inside", json.dumps(spec)]
        if spec.get("netns"):
            os.execvp("ip", ["ip", "netns", "exec", spec["netns"]] + me)
        # A physical node stays in the host's network namespace but still gets a mount
        # namespace of its own, so its binds never touch the host's mount table.
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "slave"] + me)
    if os.readlink("/proc/self/ns/mnt") == spec.get("host_mnt_ns"):
        sys.exit("launch.py: refusing to mount in the host's mount namespace")
    # Make sure nothing mounted here propagates back to the host.
    subprocess.run(["mount", "--make-rslave", "/"], check=True)
    for vol in spec.get("binds", []):
        os.makedirs(vol["target"], exist_ok=True)
        subprocess.run(["mount", "--bind", vol["source"], vol["target"]], check=True)
        if vol.get("ro"):
            subprocess.run(["mount", "-o", "remount,bind,ro", vol["target"]], check=True)
    os.chdir(spec["cwd"])
    argv = spec["argv"]
    os.execvpe(argv[0], argv, spec["env"])


if __name__ == "__main__":
    main()
