"""Retargeting in real Blender: presets, detection, and measured accuracy on T-pose and A-pose rigs."""

from __future__ import annotations

import math

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from addon.armature import build_armature, canonical_bones  # noqa: E402
from addon.canonical import SMPL22_BUILTIN, CanonicalSkeleton  # noqa: E402
from addon.keying import ActionKeyer  # noqa: E402
from addon.retarget import (  # noqa: E402
    PRESETS,
    SOURCE_TO_BLENDER,
    BoneMap,
    Retargeter,
    TargetRig,
    UnmappableArmatureError,
    detect_preset,
    map_bones,
    quat_from_matrix,
    quat_mul,
    quat_to_matrix,
)

SKEL = SMPL22_BUILTIN
RNG = np.random.default_rng(7)


def fk(skeleton: CanonicalSkeleton, root: np.ndarray, quats: np.ndarray) -> np.ndarray:
    """Source forward kinematics with the backend's convention: world[j] = world[parent] * q[j]."""
    rot = quat_to_matrix(quats)
    world = np.empty_like(rot)
    pos = np.zeros((*quats.shape[:2], 3))
    for j, p in enumerate(skeleton.parents):
        if p < 0:
            world[:, j], pos[:, j] = rot[:, j], root
        else:
            world[:, j] = world[:, p] @ rot[:, j]
            pos[:, j] = pos[:, p] + world[:, p] @ skeleton.offsets[j]
    return pos


def synthetic_motion(frames: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Smoothly varying rotations of every joint (up to ~35 degrees) and a walk-like root path."""
    t = np.linspace(0, 2 * math.pi, frames)[:, None]
    axes = RNG.normal(size=(len(SKEL.names), 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angle = 0.6 * np.sin(t + RNG.uniform(0, 6, size=len(SKEL.names)))
    quats = np.concatenate([np.cos(angle / 2)[..., None], np.sin(angle / 2)[..., None] * axes], axis=-1)
    root = np.stack([0.1 * np.sin(t[:, 0]), 0.93 + 0.03 * np.sin(2 * t[:, 0]), 0.8 * t[:, 0]], axis=1)
    return root, quats


def rot_about(axis, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    return quat_to_matrix(np.array([math.cos(angle / 2), *(math.sin(angle / 2) * axis)]))


def mixamo_tpose_rig(collection):
    """A Mixamo-style import: Y-up cm armature space, object rotated 90 deg about X and scaled 0.01."""
    heads, tails = canonical_bones(SKEL, height_scale=1.1)
    to_yup = rot_about([1, 0, 0], -math.pi / 2) * 100.0
    table = PRESETS["MIXAMO"]
    names = ["mixamorig:" + table[j] for j in SKEL.names] + ["mixamorig:HeadTop_End"]
    parents = [*SKEL.parents, SKEL.names.index("head")]
    head_top = heads[SKEL.names.index("head")] + np.array([0, 0, 0.18])
    heads = np.vstack([heads, head_top]) @ to_yup.T
    tails = np.vstack([tails, head_top + np.array([0, 0, 0.05])]) @ to_yup.T
    rolls = RNG.uniform(-math.pi, math.pi, size=len(names))
    obj = build_armature(collection, "MixamoRig", names, parents, heads, tails, rolls)
    obj.rotation_euler = (math.pi / 2, 0, 0)
    obj.scale = (0.01, 0.01, 0.01)
    obj.location = (1.5, -2.0, 0.0)
    bpy.context.view_layer.update()  # matrix_world, as in a user's evaluated scene
    return obj


def unreal_apose_rig(collection):
    """Unreal names, A-pose arms (45 deg down), other bone lengths and rolls, a root bone and twist bones."""
    lengths = {"hip": 0.95, "knee": 1.05, "ankle": 1.04, "shoulder": 0.96, "elbow": 0.97, "wrist": 1.05,
               "spine1": 1.06, "spine2": 0.95, "neck": 1.05, "collar": 1.1}  # fmt: skip
    offsets = SKEL.offsets.copy()
    for j, name in enumerate(SKEL.names):
        offsets[j] *= lengths.get(name.split("_")[-1], 1.0) * 1.07
    skel = CanonicalSkeleton(SKEL.names, SKEL.parents, offsets)
    heads, tails = canonical_bones(skel)
    for side, sign in (("left", 1.0), ("right", -1.0)):  # A-pose: arms rotate down about the forward axis
        pivot = heads[SKEL.names.index(f"{side}_shoulder")]
        down = rot_about([0, 1, 0], sign * math.radians(45))
        for part in ("shoulder", "elbow", "wrist"):
            j = SKEL.names.index(f"{side}_{part}")
            heads[j] = pivot + down @ (heads[j] - pivot)
            tails[j] = pivot + down @ (tails[j] - pivot)
    table = PRESETS["UNREAL"]
    names = ["root"] + [table[j] for j in SKEL.names]
    parents = [-1] + [p + 1 for p in SKEL.parents]  # pelvis under root
    parents[1] = 0
    heads = np.vstack([[0, 0, 0], heads])
    tails = np.vstack([[0, 0.2, 0], tails])
    for side in ("l", "r"):  # twist bones: unmapped children half-way along the upper arms
        arm = names.index(f"upperarm_{side}")
        names.append(f"upperarm_twist_01_{side}")
        parents.append(arm)
        mid = (heads[arm] + tails[arm]) / 2
        heads, tails = np.vstack([heads, mid]), np.vstack([tails, tails[arm]])
    rolls = RNG.uniform(-math.pi, math.pi, size=len(names))
    return build_armature(collection, "UnrealRig", names, parents, heads, tails, rolls)


def bandai_bvh_rig(collection):
    """A BVH import of the Bandai-Namco skeleton: one spine joint fewer than the canonical chain, Y-up space."""
    heads, tails = canonical_bones(SKEL, height_scale=0.95)
    table = PRESETS["BANDAI"]
    keep = [j for j in SKEL.names if j in table]  # spine2 has no joint here
    index = [SKEL.names.index(j) for j in keep]
    parents = []
    for j in index:
        p = SKEL.parents[j]
        while p >= 0 and SKEL.names[p] not in table:
            p = SKEL.parents[p]
        parents.append(keep.index(SKEL.names[p]) if p >= 0 else -1)
    tails = tails.copy()
    tails[SKEL.names.index("spine1")] = heads[SKEL.names.index("spine3")]
    return build_armature(collection, "BandaiRig", [table[j] for j in keep], parents, heads[index], tails[index])


def rigify_metarig(collection):
    """Blender's own human metarig (Rigify): an artist-made A-pose rig with 159 bones, face and fingers."""
    addon_utils = pytest.importorskip("addon_utils")
    addon_utils.enable("rigify", default_set=True)
    bpy.ops.object.armature_human_metarig_add()
    return bpy.context.active_object


def posed_world_heads(obj, bones: list[str], frames: np.ndarray) -> np.ndarray:
    """World positions (F, B, 3) of bone heads, evaluating the object's action at each frame."""
    scene = bpy.context.scene
    out = np.empty((len(frames), len(bones), 3))
    for f, frame in enumerate(frames):
        scene.frame_set(int(frame))
        mw = np.array(obj.matrix_world)
        heads = np.array([obj.pose.bones[b].head for b in bones])
        out[f] = heads @ mw[:3, :3].T + mw[:3, 3]
    return out


def retarget_error(
    obj, root: np.ndarray, quats: np.ndarray, positions: np.ndarray | None = None
) -> tuple[float, float]:
    """Retarget + key the motion (foot locking off: this measures how the motion itself lands), evaluate in
    Blender against the source joints.

    Returns (mean joint position error as a fraction of body height, mean segment direction error in degrees).
    `positions` (T, J, 3) are the source joints to compare with (default: forward kinematics of the motion).
    """
    scene = bpy.context.scene
    scene.render.fps = 20
    bone_map = map_bones([b.name for b in obj.data.bones])
    rt = Retargeter(SKEL, TargetRig.from_armature(obj), bone_map, foot_lock=False)
    keyer = ActionKeyer(obj, "test", frame_start=1)
    half = len(root) // 2  # two chunks, as streaming delivers them
    keyer.append(rt(root[:half], quats[:half]))
    keyer.append(rt(root[half:], quats[half:]))
    joints = [j for j in SKEL.names if j in bone_map.bones]
    bones = [bone_map.bones[j] for j in joints]
    got = posed_world_heads(obj, bones, np.arange(1, len(root) + 1))
    src = (fk(SKEL, root, quats) if positions is None else positions)[:, [SKEL.names.index(j) for j in joints]]

    # Both in a floor-anchored, height-normalised frame: source via the retargeter's axes, target via world.
    mw = np.array(obj.matrix_world)
    to_world = mw[:3, :3] @ rt.to_rig  # source axes -> world, with the rig's scale
    unit = to_world / np.linalg.norm(to_world[:, 0])
    rest = SKEL.rest_positions()
    src_height = rest[SKEL.names.index("head"), 1] - rest[SKEL.names.index("left_ankle"), 1]
    rig = TargetRig.from_armature(obj)
    rest_world = rig.rest[:, :3, 3] @ mw[:3, :3].T + mw[:3, 3]
    idx = {n: i for i, n in enumerate(rig.names)}
    up = unit[:, 1]
    ankle = rest_world[idx[bone_map.bones["left_ankle"]]]
    tgt_height = float(np.dot(rest_world[idx[bone_map.bones["head"]]] - ankle, up))
    # origin: the middle of the hips at rest, down at ankle level (rigs disagree on where the pelvis joint is)
    hips = (rest_world[idx[bone_map.bones["left_hip"]]] + rest_world[idx[bone_map.bones["right_hip"]]]) / 2
    floor_origin = hips - np.dot(hips - ankle, up) * up
    src_origin = (rest[SKEL.names.index("left_hip")] + rest[SKEL.names.index("right_hip")]) / 2
    src_origin[1] = rest[SKEL.names.index("left_ankle"), 1]
    src_norm = (src - src_origin) / src_height
    tgt_norm = ((got - floor_origin) @ unit) / tgt_height  # unit is orthonormal: inverse = transpose
    world = float(np.linalg.norm(src_norm - tgt_norm, axis=-1).mean())
    # proportion-free: angle between each limb/spine segment's direction in the target and in the source
    # (except pelvis->hips and chest->collars, whose rest directions depend on where a rig puts those joints)
    def mapped_parent(j: str) -> int:
        p = SKEL.parents[SKEL.names.index(j)]
        while SKEL.names[p] not in joints:
            p = SKEL.parents[p]
        return joints.index(SKEL.names[p])

    segments = [(mapped_parent(j), joints.index(j)) for j in joints
                if j != "pelvis" and not j.endswith(("_hip", "_collar"))]  # fmt: skip
    parent, child = np.array(segments).T
    src_dir, tgt_dir = src_norm[:, child] - src_norm[:, parent], tgt_norm[:, child] - tgt_norm[:, parent]
    cos = np.sum(src_dir * tgt_dir, -1) / np.linalg.norm(src_dir, axis=-1) / np.linalg.norm(tgt_dir, axis=-1)
    return world, float(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean())


@pytest.fixture
def collection():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    return bpy.context.scene.collection


def test_presets_are_detected_from_bone_names():
    for preset, table in PRESETS.items():
        names = [("mixamorig:" if preset == "MIXAMO" else "") + b for b in table.values()] + ["Extra"]
        if preset == "UNREAL5":
            names += ["spine_02", "spine_04", "neck_02"]  # the whole UE5 chain
        if preset == "RIGIFY":  # a generated rig: controls, the torso, and ORG-/DEF- bones it also maps
            names += ["torso", *PRESETS["RIGIFY_ORG"].values(), *PRESETS["RIGIFY_DEF"].values()]
        assert detect_preset(names) == preset
        assert not map_bones(names, preset).missing or preset == "BANDAI"
    bandai = map_bones(PRESETS["BANDAI"].values(), "BANDAI")
    assert bandai.missing == ("spine2",)  # the Bandai skeleton has one spine joint fewer


def test_unmappable_armature_names_missing_joints():
    bone_map = map_bones(["Bone", "Bone.001", "mixamorig:Hips", "mixamorig:LeftUpLeg"], "MIXAMO")
    with pytest.raises(UnmappableArmatureError) as err:
        bone_map.require("Rig", ["Bone", "Bone.001"])
    assert "right_hip" in err.value.missing and "left_hip" not in err.value.missing
    assert "no bone for" in str(err.value) and "'Rig'" in str(err.value) and "Bone.001" in str(err.value)
    with pytest.raises(ValueError, match="unknown bone-map preset"):
        map_bones(["Hips"], "NOPE")


def test_quaternion_helpers_round_trip():
    q = RNG.normal(size=(50, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q *= np.sign(q[:, :1])
    np.testing.assert_allclose(quat_from_matrix(quat_to_matrix(q)), q, atol=1e-9)
    a, b = q[:25], q[25:]
    np.testing.assert_allclose(quat_to_matrix(quat_mul(a, b)), quat_to_matrix(a) @ quat_to_matrix(b), atol=1e-9)


def test_canonical_armature_rest_pose_is_identity_motion(collection):
    heads, tails = canonical_bones(SKEL)
    obj = build_armature(collection, "Canon", SKEL.names, SKEL.parents, heads, tails)
    rt = Retargeter(SKEL, TargetRig.from_armature(obj), map_bones(SKEL.names))
    rest = SKEL.rest_positions()
    quats = np.tile([1.0, 0, 0, 0], (3, len(SKEL.names), 1))
    out = rt(np.tile(rest[0], (3, 1)), quats)
    np.testing.assert_allclose(np.abs(out.rotations[..., 0]), 1.0, atol=1e-5)  # float32 bones
    np.testing.assert_allclose(out.root_location, 0.0, atol=1e-6)
    assert rt.scale == pytest.approx(1.0)
    np.testing.assert_allclose(rt.to_rig, SOURCE_TO_BLENDER, atol=1e-5)


@pytest.mark.parametrize("make_rig", [mixamo_tpose_rig, unreal_apose_rig])
def test_synthetic_motion_lands_on_source_positions(collection, make_rig):
    root, quats = synthetic_motion()
    error, degrees = retarget_error(make_rig(collection), root, quats)
    print(f"{make_rig.__name__}: mean joint error {100 * error:.2f}% of height, segment directions off by "
          f"{degrees:.2f} deg (synthetic motion)")  # fmt: skip
    assert error < 0.03


@pytest.fixture(scope="module")
def real_clip(humanml3d_samples):
    """A real HumanML3D clip as the backend streams it: rotations + root, and its recovered joint positions."""
    motion = pytest.importorskip("backend.motion")
    features = np.load(humanml3d_samples / "new_joint_vecs" / "007005.npy")[:200]
    root, quats = motion.features_to_rotations(features)
    positions = motion.features_to_positions(features)
    return np.asarray(root, dtype=np.float64), np.asarray(quats, dtype=np.float64), positions


@pytest.mark.parametrize("make_rig", [mixamo_tpose_rig, unreal_apose_rig, bandai_bvh_rig, rigify_metarig])
def test_real_clip_retargets_within_3_percent_of_height(collection, make_rig, real_clip):
    root, quats, positions = real_clip
    error, degrees = retarget_error(make_rig(collection), root, quats, positions)
    print(f"{make_rig.__name__}: mean joint error {100 * error:.2f}% of height, segment directions off by "
          f"{degrees:.2f} deg (real HumanML3D clip 007005)")  # fmt: skip
    if make_rig is rigify_metarig:
        # Blender's own metarig is built otherwise: legs 11% longer for its height than SMPL's, shorter arms,
        # hips above its pelvis bone. Root motion follows leg length (no foot sliding), so positions scaled by
        # height drift with the distance walked; what must match is the direction of every body segment.
        assert degrees < 5.0
    else:
        assert error < 0.03


def test_builtin_skeleton_matches_the_backend():
    skeleton = pytest.importorskip("backend.skeleton")
    backend = CanonicalSkeleton.from_json(skeleton.SMPL22.to_json())
    assert backend.names == SKEL.names and backend.parents == SKEL.parents
    np.testing.assert_allclose(backend.offsets, SKEL.offsets, atol=1e-6)


def test_in_place_keeps_height_drops_travel(collection):
    obj = mixamo_tpose_rig(collection)
    root, quats = synthetic_motion()
    rig = TargetRig.from_armature(obj)
    bone_map = map_bones([b.name for b in obj.data.bones])
    # without foot locking: planted feet would (rightly) hold the legs differently with and without travel
    moving = Retargeter(SKEL, rig, bone_map, foot_lock=False)(root, quats)
    still = Retargeter(SKEL, rig, bone_map, root_motion=False, foot_lock=False)(root, quats)
    np.testing.assert_allclose(moving.rotations, still.rotations)
    # Mixamo armature space is Y up: height is the location's Y in the root bone frame (rolls aside)
    travel = np.ptp(moving.root_location, axis=0)
    assert np.linalg.norm(travel) > 100  # cm: it walked
    rest = rig.rest[rig.names.index("mixamorig:Hips")]
    world_still = still.root_location @ rest[:3, :3].T
    assert np.abs(world_still[:, [0, 2]]).max() < 1e-4  # cm  # no travel on the floor plane (x, z in Y-up space)


def test_bad_motion_shapes_and_values_are_refused(collection):
    heads, tails = canonical_bones(SKEL)
    obj = build_armature(collection, "Canon", SKEL.names, SKEL.parents, heads, tails)
    rt = Retargeter(SKEL, TargetRig.from_armature(obj), map_bones(SKEL.names))
    with pytest.raises(ValueError, match="rotations must be"):
        rt(np.zeros((2, 3)), np.zeros((2, 21, 4)))
    bad = np.tile([1.0, 0, 0, 0], (2, 22, 1))
    bad[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rt(np.zeros((2, 3)), bad)
    with pytest.raises(ValueError, match="no bone for"):
        Retargeter(SKEL, TargetRig.from_armature(obj), BoneMap("SMPL", {"pelvis": "pelvis"}))
