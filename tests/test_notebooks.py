"""Run every chapter notebook as a test, the way `nbdev_test` does.

Each notebook runs in a fresh Python process, as it would in its own Jupyter kernel, so
global state one chapter sets (grad mode, thread counts, registered ops) cannot leak into
the next chapter or into the pytest files.

Cells flagged with one of settings.ini's `tst_flags` (`slow`, `gpu`) are skipped, exactly as
`nbdev_test` skips them. To run them too, list the flags in OMNIHUMAN_TEST_FLAGS, e.g.
`OMNIHUMAN_TEST_FLAGS="slow" python -m pytest tests -k notebook`.
"""
import os, subprocess, sys
from configparser import ConfigParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))

RUNNER = """
import sys
from pathlib import Path
from nbdev.test import test_nb
nb, skip, force, root = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
ok, secs = test_nb(Path(nb), skip_flags=skip, force_flags=force, basepath=root)
print(f"{Path(nb).name}: {'passed' if ok else 'FAILED'} in {secs:.1f} s")
sys.exit(0 if ok else 1)
"""

def _skip_flags():
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"].get("tst_flags", "")

def test_there_are_notebooks():
    assert len(NBS) >= 2, f"no chapter notebooks found in {ROOT / 'nbs'}"

@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.stem)
def test_notebook(nb):
    force = os.environ.get("OMNIHUMAN_TEST_FLAGS", "")
    r = subprocess.run([sys.executable, "-c", RUNNER, str(nb), _skip_flags(), force, str(ROOT)],
                       capture_output=True, text=True, timeout=1800, env=os.environ.copy())
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-5000:] + r.stderr[-20000:])
    assert r.returncode == 0, f"{nb.name} failed (its traceback is in the captured stderr)"
