"""The linter configured in pyproject.toml passes on the whole repository, and the
product code has its imports at the top of each file without exceptions."""
import subprocess
import sys

from tests.support import ROOT
PRODUCT = ["controller", "worker", "dml_app", "dml_tool", "bench", "testbed_core"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_passes_on_the_repository():
    r = ruff(".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_product_imports_are_at_the_top_without_noqa():
    r = ruff("--select", "E402", "--ignore-noqa", *PRODUCT)
    assert r.returncode == 0, r.stdout + r.stderr
