#!/usr/bin/env python3
"""Your own app (examples/own_app/app.py) on three nodes of the embedded testbed.

    sudo python3 examples/own_app/own_run.py             # netns nodes: deploy, "tc finish", serve :3333
    sudo python3 examples/own_app/own_run.py --docker    # the same nodes as Docker containers

n1 is the root, n2 and n3 its children; links from examples/own_app/links.json. Then
EdgeTB's workflow (docs/own-app.md): the conf tools, curl /conf/dataset, /conf/structure,
/start?root=n1; Ctrl-C removes every node and link.
"""
import argparse
import sys
from pathlib import Path

from controller.manager import Manager
from controller.testbed import DefinitionError, DeployError, default_testbed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

NODES = ["n1", "n2", "n3"]
IMAGE = "edgetb-node:latest"          # python3 worker/image.py build


class OwnManager(Manager):
    algorithm = "own"                 # runs/<time>-own/, "algorithm" in summary.json
    needs_root = True                 # /start needs ?root=


def build(port: int = 3333, backend: str = "netns", *, dir_name: Path = ROOT,
          dataset: Path = ROOT / "dataset", links: Path = HERE / "links.json",
          subnet: str | None = None):
    testbed = default_testbed(ip="127.0.0.1", dir_name=str(dir_name), manager_class=OwnManager, host_port=port)
    app = testbed.add_nfs(tag="own_app", path=str(HERE))
    data = testbed.add_nfs(tag="dataset", path=str(dataset))
    emu = testbed.add_emulator("emu-own", "127.0.0.1", cpu=2, ram=4, unit="G", backend=backend, subnet=subnet)
    for name in NODES:
        node = testbed.add_emulated_node(name, "/home/worker/own_app", ["python3", "app.py"], IMAGE,
                                         cpu=0.5, ram=512, unit="M", emulator=emu)
        node.mount_nfs(app, "/home/worker/own_app")      # read-only to the node
        node.mount_nfs(data, "/home/worker/dataset")     # ../dataset from the working dir
    testbed.load_link(str(links))
    return testbed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--docker", action="store_true", help=f"Docker nodes ({IMAGE}) instead of netns nodes")
    ap.add_argument("--port", type=int, default=3333, help="controller port (the embedded agent takes the next)")
    args = ap.parse_args()
    testbed = build(args.port, "docker" if args.docker else "netns")
    try:
        testbed.start()              # serves until Ctrl-C, then removes everything
    except (DefinitionError, DeployError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
