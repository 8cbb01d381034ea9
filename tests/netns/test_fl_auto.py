"""The README's first command: `python3 controller/fl_run.py --auto`, as a user runs it."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

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
