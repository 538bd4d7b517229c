"""The extension package: manifest, build with Blender's own tool, headless install of the zip.

Building fetches the pyzmq wheels from PyPI once (then cached in .whl/), so the build/install test is marked
slow: run it with `pytest -m slow tests/test_addon_extension.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as Blender's own
ROOT = Path(__file__).resolve().parents[1]
MANIFEST = tomllib.loads((ROOT / "blender_manifest.toml").read_text())


def test_manifest_declares_what_the_addon_needs():
    assert MANIFEST["type"] == "add-on" and MANIFEST["id"].isidentifier()
    assert MANIFEST["blender_version_min"] == "4.2.0"
    assert "localhost" in MANIFEST["permissions"]["network"]
    wheels = [Path(w).name for w in MANIFEST["wheels"]]
    assert all(w.startswith("pyzmq-") and "-cp311-" in w for w in wheels)
    tags = " ".join(wheels)
    for platform in ("manylinux", "win_amd64", "macosx"):  # linux x64, windows x64, both Macs (universal2)
        assert platform in tags
    assert "universal2" in tags or ("arm64" in tags and "x86_64" in tags.split("macosx")[-1])


INSTALL = """
import os, sys
import bpy
result = bpy.ops.extensions.package_install_files(filepath=sys.argv[1], repo="user_default", enable_on_install=True)
addon = bpy.context.preferences.addons["bl_ext.user_default.{id}"]
site = os.path.join(os.environ["BLENDER_USER_RESOURCES"], "extensions", ".local", "lib", "python3.11", "site-packages")
print("RESULT", sorted(result), hasattr(bpy.types.Scene, "motion_mamba"), addon.preferences.endpoint,
      os.path.isdir(os.path.join(site, "zmq")))
bpy.ops.extensions.package_uninstall(repo_index=[r.module for r in bpy.context.preferences.extensions.repos].index(
    "user_default"), pkg_id="{id}")
print("UNINSTALLED", hasattr(bpy.types.Scene, "motion_mamba"))
"""


@pytest.mark.slow
def test_built_zip_validates_and_installs_headless(tmp_path):
    build = subprocess.run([sys.executable, "tools/build_extension.py", "--out", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    zip_path = tmp_path / f"{MANIFEST['id']}-{MANIFEST['version']}.zip"
    assert zip_path.is_file()
    script = tmp_path / "install.py"
    script.write_text(INSTALL.format(id=MANIFEST["id"]))
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(tmp_path / "user")}
    out = subprocess.run([sys.executable, str(script), str(zip_path)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    lines = {ln.split(" ", 1)[0]: ln for ln in out.stdout.splitlines() if ln.startswith(("RESULT", "UNINSTALLED"))}
    assert "RESULT" in lines, out.stdout[-2000:] + out.stderr[-2000:]
    assert lines["RESULT"] == "RESULT ['FINISHED'] True tcp://127.0.0.1:5557 True"  # registered, wheel installed
    assert lines.get("UNINSTALLED") == "UNINSTALLED False", out.stderr[-2000:]
