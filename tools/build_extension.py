"""Build the installable Blender extension: manifest + add-on code at the zip root + ./wheels/*.whl.

    .venv/bin/python tools/build_extension.py [--out dist/]

The wheels the manifest lists are fetched once with `pip download --only-binary=:all: --platform ...
--python-version ...` (network needed only then) and cached in .whl/ (git-ignored). The package is built and
then validated with Blender's own extension tool (blender_ext.py from the bpy module; no Blender binary needed).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".whl"
STAGE = ROOT / "build" / "extension"


def blender_ext() -> Path:
    """Blender's extension command-line tool, shipped inside the bpy package."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the bpy module is not installed: pip install bpy==5.0.1 (or use Blender's own python)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    if not found:
        raise SystemExit("blender_ext.py not found in the bpy package")
    return found[-1]


def fetch_wheel(filename: str) -> Path:
    """The wheel from the cache, downloaded for its own platform and Python tags when missing."""
    path = CACHE / filename
    if path.is_file():
        return path
    name, version, python_tag, _abi, platform_tag = filename[: -len(".whl")].split("-")
    python_version = f"{python_tag[2]}.{python_tag[3:]}"
    CACHE.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--implementation", "cp", "--python-version", python_version, "--dest", str(CACHE),
               *[arg for tag in platform_tag.split(".") for arg in ("--platform", tag)],
               f"{name}=={version}"]  # fmt: skip
    print("fetching", filename)
    subprocess.run(command, check=True)
    if not path.is_file():
        got = ", ".join(p.name for p in CACHE.glob(f"{name}-{version}-*"))
        raise SystemExit(f"pip did not produce {filename} (cache holds: {got}); update the manifest's wheels list")
    return path


def stage(manifest: dict) -> Path:
    """Copy the manifest, the add-on's modules and the wheels into build/extension/."""
    shutil.rmtree(STAGE, ignore_errors=True)
    shutil.copytree(ROOT / "addon", STAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "blender_manifest.toml", STAGE / "blender_manifest.toml")
    (STAGE / "wheels").mkdir()
    for entry in manifest.get("wheels", []):
        shutil.copy2(fetch_wheel(Path(entry).name), STAGE / "wheels" / Path(entry).name)
    return STAGE


def build(out: Path) -> Path:
    """Stage, build and validate the extension zip; returns its path."""
    manifest = tomllib.loads((ROOT / "blender_manifest.toml").read_text())
    source = stage(manifest)
    out.mkdir(parents=True, exist_ok=True)
    zip_path = out / f"{manifest['id']}-{manifest['version']}.zip"
    tool = [sys.executable, str(blender_ext())]
    subprocess.run([*tool, "build", "--source-dir", str(source), "--output-filepath", str(zip_path)], check=True)
    subprocess.run([*tool, "validate", str(zip_path)], check=True)
    return zip_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    zip_path = build(parser.parse_args().out)
    print(f"built {zip_path} ({zip_path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
