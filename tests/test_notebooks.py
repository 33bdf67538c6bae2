"""Run every chapter notebook as a test, the way `nbdev_test` does.

Cells flagged with one of settings.ini's `tst_flags` (`slow`, `gpu`) are skipped, exactly as
`nbdev_test` skips them. To run them too, list the flags in OMNIHUMAN_TEST_FLAGS, e.g.
`OMNIHUMAN_TEST_FLAGS="slow" python -m pytest tests -k notebook`.
"""
import os
from configparser import ConfigParser
from pathlib import Path

import pytest
from nbdev.test import test_nb as run_notebook   # aliased: pytest would collect a `test_*` name

ROOT = Path(__file__).resolve().parent.parent
NBS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))

def _skip_flags():
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"].get("tst_flags", "").split()

def test_there_are_notebooks():
    assert len(NBS) >= 2, f"no chapter notebooks found in {ROOT / 'nbs'}"

@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.stem)
def test_notebook(nb):
    force = os.environ.get("OMNIHUMAN_TEST_FLAGS", "").split()
    ok, secs = run_notebook(nb, skip_flags=_skip_flags(), force_flags=force, basepath=ROOT)
    assert ok, f"{nb.name} failed (its traceback is in the captured stderr above)"
