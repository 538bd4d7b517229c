"""Build the installable Blender extension: manifest + add-on code at the zip root + ./wheels/*.whl.

    .venv/bin/python tools/build_extension.py [--out dist/] [--fetch-only]

The wheels the manifest lists are fetched once with `pip download --only-binary=:all: --platform ...
--python-version ...` (network needed only then; ./setup.sh does it), checked against the SHA-256 sums below and
cached in .whl/ (git-ignored). The package is built and then validated with Blender's own extension tool
(blender_ext.py from the bpy module; no Blender binary needed).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".whl"
STAGE = ROOT / "build" / "extension"
# The published SHA-256 of every wheel the manifest may list (`sha256sum` format): other bytes are refused.
WHEEL_SHA256 = {name: digest for digest, name in map(str.split, """\
2f9f7ffe9db1187a253fca95191854b3fda24696f086e8789d1d449308a34b88  pyzmq-26.4.0-cp311-cp311-manylinux_2_28_x86_64.whl
963977ac8baed7058c1e126014f3fe58b3773f45c78cce7af5c26c09b6823896  pyzmq-26.4.0-cp311-cp311-win_amd64.whl
bfcf82644c9b45ddd7cd2a041f3ff8dce4a0904429b74d73a439e8cab1bd9e54  pyzmq-26.4.0-cp311-cp311-macosx_10_15_universal2.whl
6332452034be001bbf3206ac59c0d2a7713de5f25bb38b06519fc6967b7cf771  pyzmq-26.4.0-cp313-cp313-manylinux_2_28_x86_64.whl
23ecc9d241004c10e8b4f49d12ac064cd7000e1643343944a10df98e57bc544b  pyzmq-26.4.0-cp313-cp313-win_amd64.whl
c43fac689880f5174d6fc864857d1247fe5cfa22b09ed058a344ca92bf5301e3  pyzmq-26.4.0-cp313-cp313-macosx_10_15_universal2.whl
""".splitlines())}


def blender_ext() -> Path:
    """Blender's extension command-line tool, shipped inside the bpy package."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the bpy module is not installed: pip install bpy==5.0.1 (or use Blender's own python)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    if not found:
        raise SystemExit("blender_ext.py not found in the bpy package")
    return found[-1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_wheel(filename: str) -> Path:
    """The wheel from the cache, downloaded for its own platform and Python tags when missing; its SHA-256 must
    be the one in WHEEL_SHA256 (a mismatching download is deleted)."""
    if filename not in WHEEL_SHA256:
        raise SystemExit(f"{filename}: no SHA-256 in WHEEL_SHA256 (tools/build_extension.py): add the published one")
    path = CACHE / filename
    if not path.is_file():
        name, version, python_tag, _abi, platform_tag = filename[: -len(".whl")].split("-")
        python_version = f"{python_tag[2]}.{python_tag[3:]}"
        CACHE.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--implementation", "cp", "--python-version", python_version, "--dest", str(CACHE),
                   *[arg for tag in platform_tag.split(".") for arg in ("--platform", tag)],
                   f"{name}=={version}"]  # fmt: skip
        print("fetching", filename)
        if subprocess.run(command).returncode != 0:
            raise SystemExit(f"could not download {filename} from PyPI (offline?). Fetch it on a machine with network "
                             f"access and put it in {CACHE}/ (sha256 {WHEEL_SHA256[filename]}), then run this again.")
        if not path.is_file():
            got = ", ".join(p.name for p in CACHE.glob(f"{name}-{version}-*"))
            raise SystemExit(f"pip did not produce {filename} (cache holds: {got}); update the manifest's wheels list")
    digest = _sha256(path)
    if digest != WHEEL_SHA256[filename]:
        path.unlink()
        raise SystemExit(f"{filename}: sha256 {digest} is not the published {WHEEL_SHA256[filename]}; deleted it")
    return path


def manifest_wheels(manifest: dict) -> list[str]:
    """The file names of the wheels the manifest lists."""
    return [Path(entry).name for entry in manifest.get("wheels", [])]


def stage(manifest: dict) -> Path:
    """Copy the manifest, the add-on's modules and the wheels into build/extension/."""
    shutil.rmtree(STAGE, ignore_errors=True)
    shutil.copytree(ROOT / "addon", STAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "blender_manifest.toml", STAGE / "blender_manifest.toml")
    (STAGE / "wheels").mkdir()
    for name in manifest_wheels(manifest):
        shutil.copy2(fetch_wheel(name), STAGE / "wheels" / name)
    return STAGE


def read_manifest() -> dict:
    return tomllib.loads((ROOT / "blender_manifest.toml").read_text())


def build(out: Path) -> Path:
    """Stage, build and validate the extension zip; returns its path."""
    manifest = read_manifest()
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
    parser.add_argument("--fetch-only", action="store_true", help="only fetch and check the wheels into .whl/")
    args = parser.parse_args()
    if args.fetch_only:
        wheels = [fetch_wheel(name) for name in manifest_wheels(read_manifest())]
        print(f"{len(wheels)} wheels in {CACHE}, SHA-256 checked")
        return
    zip_path = build(args.out)
    print(f"built {zip_path} ({zip_path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
