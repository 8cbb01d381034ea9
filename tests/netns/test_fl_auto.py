"""The README's first command: `python3 controller/fl_run.py --auto`, as a user runs it."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT

from tests.support import agents as ah
from controller import access
from dml_app import net

PORT = 3350


def test_fl_run_auto_end_to_end():
    with ah.CmdlineWatch(access.token_path(PORT)) as watch:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "controller/fl_run.py", "--auto", "--port", str(PORT)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        elapsed = time.monotonic() - t0
    out = p.stdout
    # No secret on any command line during the whole run: the admin token, the peer
    # credential, each node's own (and their MAC parts alone).
    assert watch.token, "the controller never wrote its token file"
    secrets_ = [watch.token, net.peer_token(watch.token)] + [net.node_token(watch.token, f"n{i}") for i in range(1, 6)]
    secrets_ += [s.rpartition(".")[2] for s in secrets_[1:]]
    assert any(b"fl_trainer.py" in c for c in watch.seen)     # the apps were seen
    assert not watch.leaked(secrets_), watch.leaked(secrets_)[:3]
    assert not access.token_path(PORT).exists(), "the token file goes with the controller"
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-3000:]}\n{p.stderr[-3000:]}"
    # progress as it happens
    assert "5 node(s) up" in out and "12 link(s) in place" in out
    assert out.index("tc finish") < out.index("started n1")
    assert re.search(r"round 1/\d+: accuracy", out)
    run_dir = Path(re.search(r"logs, plots and summary.json in (\S+)", out).group(1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "fl"
    assert summary["rounds"] == len(summary["accuracy_per_round"]) > 1
    assert summary["final_accuracy"] >= 0.90
    # the run's own wall time: in seconds, within the time the whole command took, and
    # the figure the printed table gives
    assert 0 < summary["wall_seconds"] <= elapsed, (summary["wall_seconds"], elapsed)
    assert f"wall time {summary['wall_seconds']:.1f} s" in out
    assert set(summary["bytes_sent"]) == {"n1", "n2", "n3", "n4", "n5"}
    # the summary table is printed, and nothing is left behind
    assert "final accuracy" in out and "bytes sent" in out
    ah.assert_clean()


MANUAL_PORT = 3353


def _line(p: subprocess.Popen, pattern: str, out: list[str]) -> str:
    """The next line of p's output matching `pattern` (the lines read on the way go to
    `out`); AssertionError when p's output ends first."""
    for line in p.stdout:
        out.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"output ended (exit {p.wait()}) before {pattern!r}:\n{''.join(out[-40:])}")


@pytest.mark.timeout(900)
def test_fl_run_by_hand_says_the_run_on_its_console():
    """EdgeTB's manual workflow: `python3 controller/fl_run.py`, the conf tools, then curl
    the pushes and /start. After /start the controller's console says what --auto says,
    in this order: started, each round's figure as the root reports it, the summary
    table and the run's folder."""
    from controller import auto
    auto.ensure_dataset(print)
    p = subprocess.Popen([sys.executable, "controller/fl_run.py", "--port", str(MANUAL_PORT)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out: list[str] = []
    try:
        _line(p, r"tc finish", out)
        for tool, arg in (("dataset_conf.py", ["-d", "fl_dataset.json"]),
                          ("fl_structure_conf.py", ["-s", "fl_structure.json"])):
            subprocess.run([sys.executable, f"dml_tool/{tool}", *arg], cwd=ROOT, check=True, timeout=120,
                           capture_output=True)
        ctl = f"127.0.0.1:{MANUAL_PORT}"      # root on loopback: no token needed, as with curl
        for kind in ("dataset", "structure"):
            assert set(net.get_json(f"{ctl}/conf/{kind}", timeout_s=300).values()) == {"ok"}
        assert net.call("GET", f"{ctl}/start", params={"root": "n1"}, timeout_s=60).text == "started n1\n"
        _line(p, r"^started n1$", out)
        first = _line(p, r"round \d+/\d+: accuracy", out)
        assert re.search(r"^round 1/10: accuracy \d\.\d{4}$", first), first
        _line(p, r"final accuracy", out)
        folder = _line(p, r"logs, plots and summary.json in ", out)
        summary = json.loads((Path(folder.split(" in ", 1)[1].strip()) / "summary.json").read_text())
        said = "".join(out)
        rounds = [int(r) for r in re.findall(r"^round (\d+)/10: accuracy", said, re.M)]
        assert rounds == list(range(1, summary["rounds"] + 1)), said      # each once, in order
        assert summary["algorithm"] == "fl" and "error" not in summary, summary
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)     # Ctrl-C: every node and link is removed
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
    assert p.returncode == 0, "".join(out[-40:]) + p.stdout.read()
    ah.assert_clean()
