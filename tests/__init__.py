"""The test suite, by feature: one folder per kind of test, helpers in tests/support.

The node apps import each other as top-level modules (`import net`, as `python3
fl_trainer.py` in dml_app/ does) and so do the tests that drive them in process; the
same holds for dml_tool/'s scripts. Both folders are on the path for every test.
"""
import sys
from pathlib import Path

for _folder in ("dml_tool", "dml_app"):
    _path = str(Path(__file__).resolve().parents[1] / _folder)
    if _path not in sys.path:
        sys.path.insert(0, _path)
