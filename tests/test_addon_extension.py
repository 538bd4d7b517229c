"""The extension package: manifest, build with Blender's own tool, install of the zip through Blender's own
extension operator on this Python's Blender (3.11: bpy 5.0.1; test_newest_blender.py runs this file again on the
newest bpy, Python 3.13).

The build uses the wheels ./setup.sh fetched into .whl/ (`tools/build_extension.py --fetch-only`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as Blender's own
pytest.importorskip("bpy")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_extension  # noqa: E402

MANIFEST = build_extension.read_manifest()
PLATFORM_TAGS = ("manylinux_2_28_x86_64", "win_amd64", "macosx_10_15_universal2")  # universal2: both Macs


def test_manifest_bundles_one_pyzmq_for_every_python_and_platform():
    assert MANIFEST["type"] == "add-on" and MANIFEST["id"].isidentifier()
    assert MANIFEST["blender_version_min"] == "4.2.13"  # the 4.2 LTS line from the update that filters wheels
    assert "blender_version_max" not in MANIFEST  # an artificial cap locked out Blender 5.1+
    assert "localhost" in MANIFEST["permissions"]["network"]
    wheels = build_extension.manifest_wheels(MANIFEST)
    assert len({w.split("-")[1] for w in wheels}) == 1, "one pyzmq release, or Blender mixes incompatible builds"
    expected = {f"cp{v}-cp{v}-{tag}" for v in ("311", "313") for tag in PLATFORM_TAGS}
    assert {w.split("-", 2)[2].removesuffix(".whl") for w in wheels} == expected
    assert set(wheels) == set(build_extension.WHEEL_SHA256)  # every wheel is hash-pinned, no stale pins


def test_a_wheel_with_other_bytes_is_refused(tmp_path, monkeypatch):
    name = build_extension.manifest_wheels(MANIFEST)[0]
    monkeypatch.setattr(build_extension, "CACHE", tmp_path)
    (tmp_path / name).write_bytes(b"not the published wheel")
    with pytest.raises(SystemExit, match="is not the published"):
        build_extension.fetch_wheel(name)
    assert not (tmp_path / name).exists()  # deleted, so the next run fetches it again
    with pytest.raises(SystemExit, match="no SHA-256"):
        build_extension.fetch_wheel("pyzmq-0.0.0-cp311-cp311-win_amd64.whl")


INSTALL = """
import os, sys
import bpy
result = bpy.ops.extensions.package_install_files(filepath=sys.argv[1], repo="user_default", enable_on_install=True)
module = "bl_ext.user_default.{id}"
enabled = module in bpy.context.preferences.addons  # the operator says FINISHED even when it refuses a package
# the wheel for this Python was installed: its compiled module carries this interpreter's ABI tag
site = os.path.join(os.environ["BLENDER_USER_RESOURCES"], "extensions", ".local", "lib",
                    "python%d.%d" % sys.version_info[:2], "site-packages")
abi = "cpython-%d%d" % sys.version_info[:2]
compiled = [f for _, _, files in os.walk(os.path.join(site, "zmq")) for f in files if abi in f and ".so" in f]
print("RESULT", sorted(result), enabled, hasattr(bpy.types.Scene, "motion_mamba"),
      bpy.context.preferences.addons[module].preferences.endpoint if enabled else None, bool(compiled))
bpy.ops.motion_mamba.create_armature()
print("ARMATURE", bpy.context.scene.motion_mamba.target.type, len(bpy.context.scene.motion_mamba.target.data.bones))
repos = [r.module for r in bpy.context.preferences.extensions.repos]
bpy.ops.extensions.package_uninstall(repo_index=repos.index("user_default"), pkg_id="{id}")
print("UNINSTALLED", hasattr(bpy.types.Scene, "motion_mamba"))
"""


@pytest.fixture(scope="module")
def extension_zip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "tools/build_extension.py", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    zip_path = out / f"{MANIFEST['id']}-{MANIFEST['version']}.zip"
    assert zip_path.is_file()
    return zip_path


def test_built_zip_installs_and_enables_in_blender(extension_zip, tmp_path):
    """Blender's own operator installs the zip, picks this Python's pyzmq wheel and really enables the add-on."""
    script = tmp_path / "install.py"
    script.write_text(INSTALL.format(id=MANIFEST["id"]))
    # a clean user folder and no project on the path: the add-on and zmq must come from the installed extension
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(tmp_path / "user"), "PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([sys.executable, "-I", str(script), str(extension_zip)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    lines = {ln.split(" ", 1)[0]: ln for ln in out.stdout.splitlines() if ln.startswith(("RESULT", "ARMATURE", "UNI"))}
    assert "RESULT" in lines, out.stdout[-2000:] + out.stderr[-3000:]
    assert lines["RESULT"] == "RESULT ['FINISHED'] True True tcp://127.0.0.1:5557 True", out.stderr[-3000:]
    assert lines.get("ARMATURE") == "ARMATURE ARMATURE 22", out.stderr[-3000:]  # its operators run
    assert lines.get("UNINSTALLED") == "UNINSTALLED False", out.stderr[-3000:]
