"""ActionKeyer in real Blender: whole-frame resampling, each bone's own rotation mode, NLA placement, rig
switches, the user's data left as it was, and keying that stops cleanly when its action vanishes."""

from __future__ import annotations

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from mathutils import Quaternion  # noqa: E402

from addon.armature import create_canonical_armature  # noqa: E402
from addon.canonical import SMPL22_BUILTIN  # noqa: E402
from addon.keying import (  # noqa: E402
    PARTIAL_PROPERTY,
    ActionKeyer,
    KeyingStopped,
    action_fcurves,
    remove_partial_actions,
)
from addon.retarget import RetargetResult  # noqa: E402

BONES = ("pelvis", "left_knee", "right_elbow", "spine3")
ROOT = "pelvis"


@pytest.fixture
def rig():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    return create_canonical_armature(bpy.context.scene.collection, SMPL22_BUILTIN)


def motion(frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth motion: each bone turns steadily about its own axis through more than a full turn (so Euler
    angles pass +-180 degrees); roots move along a curve. Signs are kept continuous, as the retargeter does."""
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(len(BONES), 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angle = np.linspace(0, 1, frames)[:, None] * rng.uniform(5.0, 8.0, len(BONES))  # radians, > 2 pi
    quats = np.concatenate([np.cos(angle / 2)[..., None], np.sin(angle / 2)[..., None] * axes], axis=-1)
    t = np.arange(frames)[:, None]
    location = np.concatenate([np.sin(t / 7.0), 0.1 * t, np.cos(t / 5.0)], axis=1)
    return quats, location


def key(obj, quats, location, chunks=(7, 1, 13), switches=None, **options) -> ActionKeyer:
    """Key the motion in uneven chunks (as it streams)."""
    keyer = ActionKeyer(obj, "generated", **options)
    edges = np.cumsum([0, *chunks, len(quats)])
    for a, b in zip(edges[:-1], np.minimum(edges[1:], len(quats))):
        if b > a:
            keyer.append(RetargetResult(BONES, quats[a:b], ROOT, location[a:b], switches or {}))
    return keyer


def curve(action, path: str, index: int):
    return next(fc for fc in action_fcurves(action) if fc.data_path == path and fc.array_index == index)


def keys(action, path: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(frames, values (K, size)) of a vector channel."""
    curves = [curve(action, path, i) for i in range(size)]
    co = np.array([[tuple(k.co) for k in fc.keyframe_points] for fc in curves])  # (size, K, 2)
    return co[0, :, 0], co[:, :, 1].T


def reference(quats: np.ndarray, location: np.ndarray, positions: np.ndarray):
    """mathutils slerp and a linear blend at fractional source positions."""
    rot = np.empty((len(positions), quats.shape[1], 4))
    loc = np.empty((len(positions), 3))
    for k, p in enumerate(positions):
        i = min(int(np.floor(p + 1e-9)), len(quats) - 2)
        u = p - i
        loc[k] = location[i] * (1 - u) + location[i + 1] * u
        for b in range(quats.shape[1]):
            rot[k, b] = Quaternion(quats[i, b]).slerp(Quaternion(quats[i + 1, b]), u)
    return rot, loc


@pytest.mark.parametrize("fps", [24, 30, 25, 60])
def test_keys_on_whole_frames_at_the_scene_rate(rig, fps):
    quats, location = motion(41)  # 2 s at 20 fps
    keyer = key(rig, quats, location, frame_start=1.0, source_fps=20.0, scene_fps=float(fps))
    action = rig.animation_data.action
    frames = keys(action, f'pose.bones["{BONES[2]}"].rotation_quaternion', 4)[0]
    expected_count = 2 * fps + 1  # frames 1 .. 1 + 2 s * fps: the same duration as the source
    assert np.array_equal(frames, 1 + np.arange(expected_count)), frames[:5]
    assert keyer.keyed == expected_count and keyer.received == 41
    want_rot, want_loc = reference(quats, location, np.arange(expected_count) * 20.0 / fps)
    for b, bone in enumerate(BONES):
        got = keys(action, f'pose.bones["{bone}"].rotation_quaternion', 4)[1]
        want = want_rot[:, b] * np.sign(np.sum(got * want_rot[:, b], axis=1, keepdims=True))
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=bone)  # float32 keys
    got_loc = keys(action, f'pose.bones["{ROOT}"].location', 3)[1]
    np.testing.assert_allclose(got_loc, want_loc, atol=1e-5)


def test_keep_source_timing(rig):
    quats, location = motion(30)
    key(rig, quats, location, frame_start=10.0, source_fps=20.0, scene_fps=24.0, keep_timing=True)
    frames, values = keys(rig.animation_data.action, f'pose.bones["{BONES[1]}"].rotation_quaternion', 4)
    np.testing.assert_allclose(frames, 10 + 1.2 * np.arange(30), atol=1e-4)  # fractional frames, source values
    np.testing.assert_allclose(values, quats[:, 1], atol=1e-6)


@pytest.mark.parametrize("modes", [("XYZ", "ZXY", "AXIS_ANGLE", "QUATERNION"), ("YZX", "XZY", "ZYX", "YXZ")])
def test_each_bone_keyed_in_its_own_rotation_mode(rig, modes):
    """The rig's rotation modes are not changed; the evaluated pose is the motion's; Euler keys are continuous."""
    for bone, mode in zip(BONES, modes):
        rig.pose.bones[bone].rotation_mode = mode
    before = {pb.name: pb.rotation_mode for pb in rig.pose.bones}
    quats, location = motion(60)
    key(rig, quats, location)  # 20 fps scene: keys on the source frames
    assert {pb.name: pb.rotation_mode for pb in rig.pose.bones} == before
    action = rig.animation_data.action
    paths = {fc.data_path for fc in action_fcurves(action)}
    for bone, mode in zip(BONES, modes):
        prop = {"QUATERNION": "rotation_quaternion", "AXIS_ANGLE": "rotation_axis_angle"}.get(mode, "rotation_euler")
        assert {p for p in paths if p.startswith(f'pose.bones["{bone}"].rot')} == {f'pose.bones["{bone}"].{prop}'}
        if prop == "rotation_euler":
            values = keys(action, f'pose.bones["{bone}"].rotation_euler', 3)[1]
            assert np.abs(np.diff(values, axis=0)).max() < 1.0, f"{bone} ({mode}) Euler keys jump"
    scene = bpy.context.scene
    worst = 0.0
    for f in range(0, 60, 7):
        scene.frame_set(1 + f)
        for b, bone in enumerate(BONES):
            got = np.array(rig.pose.bones[bone].matrix_basis.to_quaternion())
            worst = max(worst, 1 - abs(float(np.dot(got, quats[f, b]))))
    assert worst < 1e-5, worst


def test_users_action_kept_alive_without_a_fake_user(rig, tmp_path):
    user = bpy.data.actions.new("users own")
    rig.animation_data_create().action = user
    quats, location = motion(10)
    key(rig, quats, location).finish()
    assert rig.animation_data.action.name == "generated"
    assert not user.use_fake_user and user.users == 1  # the generated action references it
    path = str(tmp_path / "saved.blend")
    bpy.ops.wm.save_as_mainfile(filepath=path)
    bpy.ops.wm.open_mainfile(filepath=path)
    assert "users own" in bpy.data.actions and not bpy.data.actions["users own"].use_fake_user


def test_nla_strip_at_the_current_frame(rig):
    user = bpy.data.actions.new("users own")
    rig.animation_data_create().action = user
    bpy.context.scene.frame_current = 40
    quats, location = motion(21)
    keyer = key(rig, quats, location, place="NLA", strip_frame=40, source_fps=20.0, scene_fps=24.0)
    anim = rig.animation_data
    assert anim.action == user  # untouched
    (track,) = anim.nla_tracks
    (strip,) = track.strips
    assert strip.action.name == "generated" and strip.frame_start == 40
    assert strip.frame_end == pytest.approx(40 + 24) and keyer.end_frame() == pytest.approx(64)
    keyer.discard()
    assert len(anim.nla_tracks) == 0 and anim.action == user and "generated" not in bpy.data.actions


def test_rig_switches_keyed_as_constants(rig):
    bone = rig.pose.bones["left_elbow"]
    bone["IK_FK"] = 0.0
    path = 'pose.bones["left_elbow"]["IK_FK"]'
    quats, location = motion(12)
    key(rig, quats, location, switches={path: 1.0})
    fc = curve(rig.animation_data.action, path, 0)
    assert [tuple(k.co) for k in fc.keyframe_points] == [(1.0, 1.0)]
    bpy.context.scene.frame_set(8)
    assert bone["IK_FK"] == 1.0


def test_keying_stops_cleanly_when_its_action_vanishes(rig):
    user = bpy.data.actions.new("users own")
    rig.animation_data_create().action = user
    quats, location = motion(20)
    keyer = key(rig, quats[:10], location[:10])
    bpy.data.actions.remove(rig.animation_data.action)  # what an undo or a delete does between two ticks
    with pytest.raises(KeyingStopped, match="gone"):
        keyer.append(RetargetResult(BONES, quats[10:], ROOT, location[10:]))
    keyer.discard()  # nothing left to remove: no error
    assert [a.name for a in bpy.data.actions] == ["users own"]


def test_partial_actions_removed_and_replaced_action_restored(rig):
    user = bpy.data.actions.new("users own")
    rig.animation_data_create().action = user
    quats, location = motion(10)
    running = key(rig, quats, location)
    left = ActionKeyer(rig, "left behind")  # e.g. brought back by a redo
    left.append(RetargetResult(BONES, quats, ROOT, location))
    assert rig.animation_data.action.name == "left behind"
    assert remove_partial_actions(keep={running.action_name}) == ["left behind"]
    assert rig.animation_data.action.name == "generated"  # what "left behind" replaced
    running.finish()
    assert PARTIAL_PROPERTY not in bpy.data.actions["generated"]
    assert remove_partial_actions() == []
