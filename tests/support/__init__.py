"""Helpers shared by the tests, one module per concern:

* agents: a real agent process, netns deployments through its API, iperf3, leftovers,
  skip marks tagged with what a test needs (need, skip, need_root, ...)
* procs: real role processes on loopback (NodeProc), a stub controller, free_port,
  wait_until, scratch folders
* peers: a controller manager over role processes on loopback, tiny datasets, conf tools
* workflow: EdgeTB's HTTP workflow on netns nodes through the embedded agent
* containers: docker nodes through a real agent
* multihost: workers with their own agents and addresses on this machine
* flood.py: a script (run by path, as another user) that holds many connections open

The common ones are fixtures in tests/conftest.py.
"""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]      # the repository


def load_script(path: Path) -> ModuleType:
    """A script that is not in a package (a user's run script), imported from its path."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
