"""Suite-wide rules: fixtures, markers, skips (EDGETB_REQUIRE) and the closing skip summary.

Tests import the project as the installed package (`from dml_app import net`,
`from dml_tool import splitter`).

Markers say what a test needs, so a lane can pick what its machine has:
`python3 -m pytest -m "not root" tests` runs the tests that need no root (pure and
loopback ones) on any machine; `-m "not root and not processes"` only the pure ones, in
seconds. A folder's tests carry its markers (FOLDER_NEEDS); any
test also carries what its skip marks stand for (their `needs`, or the tag of their
reason: "[requires: docker]"), root when it uses the real agent (the `agent` fixture),
and the markers it or its module sets (`@pytest.mark.root`). docker and browser imply root.

Every environment skip's reason ends in a tag made by tests.support.agents.skip_reason:
"[requires: root|docker|iperf3|browser]" or "[may skip: netem|nfs|gpu|has-it]".

EDGETB_REQUIRE=root,docker,iperf3,browser (a comma list; .ci/run sets it) turns a skip tagged
with a listed requirement into a FAILURE naming the requirement and the reason, so a CI
run cannot go green with those tests silently skipped. With EDGETB_REQUIRE set, a skip
with no tag at all fails too (nobody said why it may skip); "[may skip: ...]" skips
(what a machine may truly lack) still skip. Without EDGETB_REQUIRE nothing changes.

The run ends with pytest's short summary of skips and their reasons (-rs, added here so
the README's command stays as it is).

The controller's dashboard.png at /finish (a headless browser, 2-3 s) is off for the
suite's many runs (EDGETB_SCREENSHOT=0); the dashboard's own tests turn it on.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support import agents as ah
from tests.support.procs import module_scratch, scratch  # noqa: F401  (fixtures for every test)

agent = ah.agent_fixture()              # a real agent on loopback, one per test module (root)
clean_agent = ah.clean_agent_fixture()  # the same, checked to answer and hold no node after each test

os.environ.setdefault("EDGETB_SCREENSHOT", "0")

# what a test needs, as markers: the requirements of skip tags, a VM lane, several hosts
MARKERS = {
    "root": "needs root: namespaces, qdiscs, cgroups, a real agent, another user",
    "docker": "needs a Docker daemon and the node image",
    "iperf3": "needs iperf3",
    "browser": "needs Debian's chromium (the dashboard's page)",
    "vm": "needs a virtual machine of its own (the VM lane)",
    "multihost": "drives several workers, each with its own agent and address",
    "processes": "starts real processes or servers (nodes, controllers, agents): minutes, not seconds",
}
FOLDER_NEEDS = {
    "loopback": ("processes",),
    "faults": ("processes",),
    "security": ("processes",),
    "dashboard": ("processes",),
    "multiworker": ("processes",),
    "netns": ("root",),
    "docker": ("root", "docker"),
}

_TAG = re.compile(r"\[(requires|may skip): ([\w-]+)\]\s*$")


def required() -> set[str]:
    want = {r.strip() for r in os.environ.get("EDGETB_REQUIRE", "").split(",") if r.strip()}
    unknown = want - set(ah.REQUIREMENTS)
    if unknown:
        raise pytest.UsageError(f"EDGETB_REQUIRE: unknown {sorted(unknown)}; known: {ah.REQUIREMENTS}")
    return want


def classify(reason: str) -> tuple[str | None, str | None]:
    """(kind, requirement) of a skip reason: ('requires', 'root'), ('may skip', 'gpu') or (None, None)."""
    m = _TAG.search(reason)
    return (m.group(1), m.group(2)) if m else (None, None)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    for name, why in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {why}")
    config._edgetb_required = required()
    chars = config.option.reportchars or ""
    if "s" not in chars and "a" not in chars and "A" not in chars:
        config.option.reportchars = chars + "s"


def _enforce(rep, config):
    """Turn a skip report into a failure when EDGETB_REQUIRE asks for it."""
    need = getattr(config, "_edgetb_required", set())
    if not (need and rep.skipped and isinstance(rep.longrepr, tuple)) or hasattr(rep, "wasxfail"):
        return rep
    path, line, reason = rep.longrepr
    reason = reason.removeprefix("Skipped: ")
    kind, req = classify(reason)
    if kind == "requires" and req in need:
        why = f"EDGETB_REQUIRE lists {req}, but this test would skip: {reason}"
    elif kind is None:
        why = (f"EDGETB_REQUIRE is set and this skip says no requirement "
               f"(tag it with tests.support.agents.need/skip): {reason}")
    else:
        return rep
    rep.outcome = "failed"
    rep.longrepr = f"{path}:{line}: {why}"
    return rep


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _enforce((yield), item.config)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Module-level skips (pytest.skip(allow_module_level=True), importorskip) too."""
    return _enforce((yield), collector.config)


def needs(item) -> set[str]:
    """What a collected test needs: its folder's markers, what its skip marks stand for
    (tests.support.agents.need's `needs`, or the tag of their reason) and its own markers."""
    folder = Path(str(item.path)).parent.name
    want = set(FOLDER_NEEDS.get(folder, ()))
    for mark in item.iter_markers("skipif"):
        kind, req = classify(str(mark.kwargs.get("reason", "")))
        if kind == "requires":
            want.add(req)
        stands_for = mark.kwargs.get("needs", ())
        want.update(n for n in ((stands_for,) if isinstance(stands_for, str) else stands_for) if n in MARKERS)
    want |= {name for name in MARKERS if item.get_closest_marker(name)}
    if "agent" in getattr(item, "fixturenames", ()):
        want.add("root")        # a real agent (tests.support.agents) creates namespaces
    if "docker" in want or "browser" in want:
        want.add("root")        # the docker and dashboard tests drive a real agent or run as root
    return want


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in sorted(needs(item)):
            item.add_marker(getattr(pytest.mark, name))
