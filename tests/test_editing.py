"""Editing around motion that exists (issue 18): continue, bridge, regenerate a range. Kept frames stay exactly as
they were, joins are as smooth as the real motion around them (real HumanML3D takes as context), bad input is
refused with a clear error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from backend.editing import JOIN_S, carry_on, cross_fade, fade, join_frames
from backend.motion import features_to_rotations, forward_kinematics
from backend.pipeline import MotionPipeline

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_editing.py"
spec = importlib.util.spec_from_file_location("bench_editing", TOOL)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def tiny():
    return MotionPipeline.random("tiny")


@pytest.fixture(scope="module")
def shipped():
    return MotionPipeline.from_checkpoint(device="cpu")


@pytest.fixture(scope="module")
def takes(humanml3d_samples):
    """The real HumanML3D takes (~10 s each) as world-space root translation and local rotations."""
    files = sorted((humanml3d_samples / "new_joint_vecs").glob("*.npy"))
    return [features_to_rotations(np.load(f).astype(np.float64)) for f in files]


def test_kept_frames_stay_exactly_and_lengths_add_up(tiny, takes):
    root, rot = takes[0]
    given = root.copy(), rot.copy()
    edited = tiny.edit(root, rot, 60, 100, "a person jumps", steps=2)
    assert np.array_equal(root, given[0]) and np.array_equal(rot, given[1])  # the caller's arrays untouched
    kept = np.r_[0:60, 100:len(root)]
    assert edited.frames == len(root)
    np.testing.assert_allclose(edited.root_translation[kept], root[kept], atol=1e-6)
    np.testing.assert_allclose(edited.rotations[kept], rot[kept], atol=1e-6)
    assert not np.allclose(edited.rotations[60:100], rot[60:100], atol=1e-3)
    np.testing.assert_allclose(edited.positions, forward_kinematics(edited.root_translation, edited.rotations),
                               atol=1e-4)
    more = tiny.continue_motion(root[:80], rot[:80], 2.0, "a person runs", steps=2)
    assert more.frames == 80 + 40
    np.testing.assert_allclose(more.rotations[:80], rot[:80], atol=1e-6)
    second = (root[120:] + np.array([2.0, 0.0, 1.0]), rot[120:])  # somewhere else in the world
    bridged = tiny.bridge((root[:60], rot[:60]), second, 1.5, "a person walks", steps=2)
    assert bridged.frames == 60 + 30 + len(second[0])
    np.testing.assert_allclose(bridged.root_translation[90:], second[0], atol=1e-6)
    for motion in (edited, more, bridged):
        assert all(np.isfinite(a).all() for a in (motion.features, motion.positions, motion.rotations))


def test_joins_add_at_most_a_centimetre_to_the_take_there(shipped, takes):
    """The shipped model continues real takes it never saw and regenerates a range inside them, with a prompt
    unlike the takes (they barely move): at every join (into the generated frames, and out of them into the kept
    suffix) the worst joint's position jump exceeds the real take's own at that frame by at most 1 cm (issue 18's
    gap), its velocity jump by at most 0.5 m/s. Measured: jumps 0.3-1.6 cm, 0.14-0.65 m/s (before the joins
    cross-faded from the kept motion carried on: 2.1-4.6 cm into the range, up to 10 cm into the suffix)."""
    fps = shipped.fps
    for root, rot in takes:
        real = forward_kinematics(root, rot)
        edited = shipped.edit(root, rot, 3 * fps, 6 * fps, "a person walks forward", steps=10)
        more = shipped.continue_motion(root[: 5 * fps], rot[: 5 * fps], 2.0, "a person walks forward", steps=10)
        joins = [(edited.positions, 3 * fps), (edited.positions, 6 * fps), (more.positions, 5 * fps)]
        added = np.array([np.subtract(bench.jumps(p, t, fps), bench.jumps(real, t, fps)) for p, t in joins])
        print(f"\njoins' excess over the take (position m, velocity m/s): {np.round(added, 3).tolist()}")
        assert (added[:, 0] <= 0.01).all() and (added[:, 1] <= 0.5).all(), added


def test_join_starts_as_the_kept_motion_carried_on_and_ends_as_the_window():
    """The join's parts on made-up motion: the kept root moving 5 cm per frame, every joint turning 2 degrees per
    frame; a window 30 cm and 20 degrees away, standing still. The first generated frame continues the kept
    motion's step; after the fade the window is untouched; a big speed change lengthens the fade."""
    fps, n, joints = 20, 30, 22
    kept_root = np.array([[0.0, 0.9, 0.1], [0.0, 0.9, 0.05]])  # nearest the join first
    angle = np.radians([2.0, 0.0])
    kept_rot = np.stack([np.tile([np.cos(a / 2), 0.0, np.sin(a / 2), 0.0], (joints, 1)) for a in angle])
    root_to, rot_to = carry_on(kept_root, kept_rot, n, 5.0)
    assert np.allclose(root_to[0] - kept_root[0], (kept_root[0] - kept_root[1]) * 5 * (1 - np.exp(-1 / 5)))
    assert np.linalg.norm(np.diff(root_to, axis=0), axis=-1).max() < 0.05  # the carried speed only dies away
    window_root = np.tile([0.3, 0.9, 0.0], (n, 1))
    window_rot = np.tile([np.cos(np.radians(10)), np.sin(np.radians(10)), 0.0, 0.0], (n, joints, 1))
    frames = join_frames(kept_root[0] - kept_root[1], np.zeros(3), fps)
    assert frames == JOIN_S * fps  # 1 m/s of change fits in JOIN_S
    root, rot = cross_fade(window_root, window_rot, root_to, rot_to, fade(n, frames))
    first_step = root[0] - kept_root[0]
    assert np.linalg.norm(first_step - (kept_root[0] - kept_root[1])) < 0.02, first_step  # was 0.3 m away
    assert np.allclose(root[int(frames):], window_root[int(frames):]) and np.allclose(rot[int(frames):],
                                                                                      window_rot[int(frames):])
    assert np.allclose(np.linalg.norm(rot, axis=-1), 1.0)
    assert join_frames(np.array([0.15, 0.0, 0.0]), np.zeros(3), fps) > 2 * JOIN_S * fps  # 3 m/s to standing


def test_bad_motion_and_ranges_are_refused(tiny, takes):
    root, rot = takes[0]
    cases = [
        ((root[:, :2], rot, 10, 20), "expected root translation"),
        ((root, rot[:, :21], 10, 20), "expected root translation"),
        ((np.where(np.arange(len(root))[:, None] == 5, np.nan, root), rot, 10, 20), "NaN or infinite"),
        ((root, np.zeros_like(rot), 10, 20), "zero quaternion"),
        ((root, rot, 20, 10), "0 <= start < stop"),
        ((root, rot, -1, 10), "0 <= start < stop"),
        ((root, rot, 10, len(root) + 1), "0 <= start < stop"),
        ((root, rot, 0, len(root)), "nothing is kept"),
        ((root[:0], rot[:0], 0, 1), "0 <= start < stop"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            tiny.edit(*args, "a person walks", steps=2)
    with pytest.raises(ValueError, match="prompt is empty"):
        tiny.edit(root, rot, 10, 20, "  ", steps=2)
    with pytest.raises(ValueError, match="steps"):
        tiny.edit(root, rot, 10, 20, "a person walks", steps=0)
