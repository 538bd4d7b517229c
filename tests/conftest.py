"""Shared test fixtures: where the real data lives, and an isolated Blender user folder."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOTION_MAMBA_DATA", ROOT.parent / "shared" / "data"))
HUMANML3D_SAMPLES = SHARED_DATA / "humanml3d-samples"
BANDAI_ARCHIVE = SHARED_DATA / "bandai-namco-motion.tar.xz"

# The Python that runs backend.serve for the add-on tests: this one, unless the add-on tests run on another
# Blender's Python without torch (tests/test_newest_blender.py points this at the main venv's).
BACKEND_PYTHON = os.environ.get("MOTION_MAMBA_BACKEND_PYTHON") or sys.executable

# bpy writes to ~/.config/blender unless told otherwise; keep tests out of the user's real config.
os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="mm-blender-user-"))


@pytest.fixture(scope="session")
def humanml3d_samples() -> Path:
    """The three real HumanML3D clips shipped in ../shared/data (skips when absent)."""
    if not (HUMANML3D_SAMPLES / "new_joint_vecs").is_dir():
        pytest.skip(f"HumanML3D samples not found at {HUMANML3D_SAMPLES}")
    return HUMANML3D_SAMPLES


@pytest.fixture(scope="session")
def bandai_archive() -> Path:
    """The real Bandai-Namco BVH archive in ../shared/data (skips when absent)."""
    if not BANDAI_ARCHIVE.is_file():
        pytest.skip(f"Bandai-Namco archive not found at {BANDAI_ARCHIVE}")
    return BANDAI_ARCHIVE


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models: one torch thread is as fast, and far faster on a shared CPU (no threads waiting on each
    other); the previous count is restored after the module."""
    from backend.pipeline import torch_threads

    with torch_threads(1):
        yield
