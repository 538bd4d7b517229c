"""The add-on's tests once more on the newest Blender: bpy for Python 3.13 in .venv-blender (./setup.sh makes it
where a Python 3.13 exists), with the generation backend run by this venv's Python (the 3.13 venv has no torch)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEWEST_PYTHON = ROOT / ".venv-blender" / "bin" / "python"
# every test file that exercises the add-on in Blender
ADDON_TESTS = sorted({p.name for pattern in ("test_addon*.py", "test_retarget*.py", "test_rigs*.py")
                      for p in (ROOT / "tests").glob(pattern)})  # fmt: skip


@pytest.mark.timeout(1800)
@pytest.mark.skipif(not NEWEST_PYTHON.exists(), reason="no .venv-blender (./setup.sh makes it when Python 3.13 exists)")
def test_addon_tests_pass_on_the_newest_blender(tmp_path):
    probe = "import sys, bpy; print(*sys.version_info[:2], *bpy.app.version[:2])"
    version = subprocess.run([str(NEWEST_PYTHON), "-c", probe], capture_output=True, text=True, timeout=120)
    python_major, python_minor, blender_major, blender_minor = map(int, version.stdout.split())
    assert (python_major, python_minor) >= (3, 13) and (blender_major, blender_minor) >= (5, 1), version.stdout
    env = {**os.environ, "MOTION_MAMBA_BACKEND_PYTHON": sys.executable, "BLENDER_USER_RESOURCES": str(tmp_path)}
    out = subprocess.run([str(NEWEST_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                          *[f"tests/{name}" for name in ADDON_TESTS]],
                         cwd=ROOT, capture_output=True, text=True, timeout=1700, env=env)  # fmt: skip
    tail = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    passed = int(re.search(r"(\d+) passed", out.stdout).group(1))
    assert passed >= 20, tail  # the add-on suite ran there, not just a skip
    assert "test_addon_backend" not in " ".join(re.findall(r"SKIPPED.*", out.stdout)), tail  # with a live backend
    print(f"Blender {blender_major}.{blender_minor} (Python {python_major}.{python_minor}): {passed} passed")
