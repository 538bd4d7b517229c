"""Retargeting onto the rigs animators use, in real Blender, against real Bandai-Namco mocap.

A Rigify rig generated here (rigify ships with Blender), Blender's own human metarig, Mixamo- and Unreal-named
(UE4, UE5) rigs, and a real Bandai take imported by Blender's own BVH importer as it comes (its rest pose lies
along the X axis). The motion is the take prepared as the data preparation does (joint map, HumanML3D's
canonicalisation and features) and streamed as the backend does (features_to_rotations), keyed through the real
keying path (ActionKeyer); world joint positions are compared with the motion's after one rigid+scale fit over
the whole take, and on the imported take with Blender's own playback of it after one rigid fit. Foot locking is
measured on the walk on rigs with other proportions (Unreal, Rigify).
"""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from test_retarget import (  # noqa: E402
    build_armature,
    canonical_bones,
    fk,
    mixamo_tpose_rig,
    rigify_metarig,
    synthetic_motion,
    unreal_apose_rig,
)

from addon.canonical import FOOT_CONTACT_THRESHOLD, ROOT_SCALE_LEG, SMPL22_BUILTIN, CanonicalSkeleton  # noqa: E402
from addon.footlock import (  # noqa: E402
    CONTACT_STEP,
    FREE_STEP,
    HOLD_STEP,
    KEEP_STEP,
    MOVE_STEP,
    Plants,
    hold_weights,
    two_bone_ik,
    within_reach,
)
from addon.keying import ActionKeyer, action_fcurves  # noqa: E402
from addon.retarget import PRESETS, BoneMap, Retargeter, TargetRig, map_bones, rig_warnings  # noqa: E402

SKEL = SMPL22_BUILTIN
# real takes early in the archive (read in one pass): a walk, a dash (run) and a wave
TAKES = {name: f"Bandai-Namco-Research-Motiondataset-1/data/dataset-1_{name}_normal_001.bvh"
         for name in ("walk", "dash", "bye")}  # fmt: skip
FPS = 20


@pytest.fixture(scope="module")
def take_texts(bandai_archive: Path) -> dict[str, str]:
    """The BVH text of each of TAKES, read straight from the archive (stops once all are found)."""
    wanted = {member: name for name, member in TAKES.items()}
    out = {}
    with tarfile.open(bandai_archive, "r:xz") as tf:
        for info in tf:
            if info.name in wanted:
                out[wanted[info.name]] = tf.extractfile(info).read().decode()
                if len(out) == len(wanted):
                    return out
    raise FileNotFoundError(f"not in the archive: {sorted(set(TAKES) - set(out))}")


def prepare(text: str) -> dict:
    """A take prepared as `prepare-bvh` does and streamed as the backend does, with its joint positions."""
    motion = pytest.importorskip("backend.motion")
    from backend.data.bvh import parse_bvh
    from backend.data.retarget import find_map, retarget

    bvh = parse_bvh(text, "take")
    jmap = find_map(bvh.joint_names)
    mocap = retarget(bvh, jmap)  # the actor's own joints, metres, 20 fps
    features = motion.positions_to_features(motion.canonicalize_positions(mocap, jmap.skeleton), jmap.skeleton)
    root, quats = (np.asarray(a, np.float64) for a in motion.features_to_rotations(features))
    # the reference: the joints of the motion as streamed (FK of its rotations), which is what the add-on gets
    return {"root": root, "quats": quats, "positions": fk(SKEL, root, quats), "contacts": features[:, -4:] > 0.5}


@pytest.fixture(scope="module")
def walk(take_texts: dict[str, str]) -> dict:
    return prepare(take_texts["walk"])


@pytest.fixture
def collection():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.scene.render.fps = FPS
    return bpy.context.scene.collection


# ---- rigs ----


def generated_rigify_rig(collection):
    """A Rigify rig generated from Blender's human metarig, as an animator gets it."""
    rigify_metarig(collection)
    bpy.ops.pose.rigify_generate()
    return bpy.data.objects["rig"]


def unreal5_rig(collection):
    """UE5 Mannequin names (five spine bones, two neck bones), canonical proportions 1.8 times as tall, in cm
    (object scale 0.01)."""
    table = PRESETS["UNREAL5"]
    heads, tails = canonical_bones(SKEL, height_scale=180.0)
    names = [table[j] for j in SKEL.names]
    parents = list(SKEL.parents)
    for extra, between in (("spine_02", "spine1"), ("spine_04", "spine2"), ("neck_02", "neck")):
        j = SKEL.names.index(between)  # an unmapped bone half-way along, the mapped child re-parented below it
        names.append(extra)
        parents.append(j)
        child = SKEL.names.index({"spine1": "spine2", "spine2": "spine3", "neck": "head"}[between])
        mid = (heads[j] + heads[child]) / 2
        heads, tails = np.vstack([heads, mid]), np.vstack([tails, heads[child]])
        tails[j] = mid
        parents[child] = len(names) - 1
    order = _parents_first(parents)
    remap = {old: new for new, old in enumerate(order)}
    obj = build_armature(collection, "UE5", [names[i] for i in order],
                         [remap[parents[i]] if parents[i] >= 0 else -1 for i in order], heads[order], tails[order])
    obj.scale = (0.01, 0.01, 0.01)
    bpy.context.view_layer.update()
    return obj


def _parents_first(parents: list[int]) -> list[int]:
    order: list[int] = []
    while len(order) < len(parents):
        order += [i for i, p in enumerate(parents) if i not in order and (p < 0 or p in order)]
    return order


def imported_bvh_rig(collection, text: str, tmp: Path):
    """The Bandai take imported by Blender's own BVH importer, as it comes (rest pose lying along X, cm; one
    scene frame per BVH frame)."""
    path = tmp / "take.bvh"
    path.write_text(text)
    assert bpy.ops.import_anim.bvh(filepath=str(path)) == {"FINISHED"}
    return bpy.context.active_object


# ---- measuring ----


def key(obj, root: np.ndarray, quats: np.ndarray, foot_lock: bool = False, chunks: int = 3) -> Retargeter:
    """Retarget in chunks (as frames stream in) and key through ActionKeyer; returns the retargeter."""
    bone_map = map_bones([b.name for b in obj.data.bones])
    rt = Retargeter(SKEL, TargetRig.from_armature(obj), bone_map, foot_lock=foot_lock)
    keyer = ActionKeyer(obj, "test", frame_start=1)
    for part in np.array_split(np.arange(len(root)), chunks):
        result = rt(root[part], quats[part])
        keyer.append(result)
    keyed = {fc.data_path for fc in action_fcurves(keyer.resolve()[1])}
    assert set(result.switches) <= keyed  # the rig's switches (Rigify's IK/FK) are part of the new action
    return rt


def world_heads(obj, bones: list[str], frames: int | np.ndarray) -> np.ndarray:
    """World positions (F, B, 3) of bone heads after depsgraph evaluation (constraints, drivers) at each scene
    frame (fractional ones included); an int n means frames 1..n."""
    scene = bpy.context.scene
    frames = np.arange(1, frames + 1) if isinstance(frames, int) else frames
    out = np.empty((len(frames), len(bones), 3))
    for f, frame in enumerate(frames):
        scene.frame_set(int(frame), subframe=float(frame % 1))
        evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
        mw = np.array(evaluated.matrix_world)
        heads = np.array([evaluated.pose.bones[b].head for b in bones])
        out[f] = heads @ mw[:3, :3].T + mw[:3, 3]
    return out


def fit(target: np.ndarray, source: np.ndarray, scale: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`target` (..., 3) moved by the one rotation (and scale) and translation that best fits it onto `source`,
    and that rotation."""
    a, b = target.reshape(-1, 3), source.reshape(-1, 3)
    ma, mb = a.mean(0), b.mean(0)
    u, s, vt = np.linalg.svd((b - mb).T @ (a - ma))
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    factor = np.trace(np.diag(s) @ d) / np.sum((a - ma) ** 2) if scale else 1.0
    rotation = u @ d @ vt
    return ((a - ma) @ rotation.T * factor + mb).reshape(target.shape), rotation


SOURCE_HEIGHT = float(SKEL.rest_positions()[SKEL.names.index("head"), 1])


def position_errors(obj, bone_of: dict[str, str], positions: np.ndarray) -> np.ndarray:
    """Per-frame, per-joint distance (fraction of height) between the rig's joints, fitted, and the source's."""
    joints = [j for j in SKEL.names if j in bone_of]
    got = world_heads(obj, [bone_of[j] for j in joints], len(positions))
    src = positions[:, [SKEL.names.index(j) for j in joints]]
    return np.linalg.norm(fit(got, src)[0] - src, axis=-1) / SOURCE_HEIGHT


# ---- tests ----


def test_root_scale_and_contact_rules_are_the_data_preparations(walk):
    skeleton = pytest.importorskip("backend.skeleton").SMPL22
    chain = skeleton.kinematic_chains[0]  # canonicalize_positions scales by the bones ending at chain[2], chain[3]
    assert tuple(skeleton.joint_names[j] for j in chain[1:4]) == ROOT_SCALE_LEG
    assert skeleton.feet_threshold == FOOT_CONTACT_THRESHOLD
    # the add-on holds an ankle only on frames the features flag as contact: its hold thresholds lie well inside
    # HumanML3D's rule (it measures a frame's step from the one before, as frames stream in, the rule the next)
    assert HOLD_STEP < MOVE_STEP < CONTACT_STEP == pytest.approx(math.sqrt(FOOT_CONTACT_THRESHOLD))
    ankles = walk["positions"][:, [SKEL.names.index("left_ankle"), SKEL.names.index("right_ankle")]]
    hold = hold_weights(np.linalg.norm(ankles[1:] - ankles[:-1], axis=-1))[0] > 0.01
    contact = walk["contacts"][1:, [0, 2]]
    print(f"held on {hold.sum()} of {contact.sum()} contact frames x feet, on {(hold & ~contact).sum()} others")
    assert not (hold & ~contact).any() and hold.sum() > 0.6 * contact.sum()


def test_root_scale_follows_the_right_leg(collection):
    offsets = SKEL.offsets.copy()
    for name, factor in (("left_knee", 1.1), ("left_ankle", 1.1), ("right_knee", 0.9), ("right_ankle", 0.9)):
        offsets[SKEL.names.index(name)] *= factor  # the left leg 22% longer than the right
    skel = CanonicalSkeleton(SKEL.names, SKEL.parents, offsets)
    obj = build_armature(collection, "Legs", SKEL.names, SKEL.parents, *canonical_bones(skel))
    rt = Retargeter(SKEL, TargetRig.from_armature(obj), map_bones(SKEL.names))
    assert rt.scale == pytest.approx(0.9, abs=1e-5)


def test_auto_detect_prefers_rigify_controls(collection):
    obj = generated_rigify_rig(collection)
    bone_map = map_bones([b.name for b in obj.data.bones])
    assert bone_map.preset == "RIGIFY" and not bone_map.missing
    assert bone_map.bones["left_elbow"] == "forearm_fk.L" and bone_map.root == "torso"
    assert bone_map.switches['pose.bones["thigh_parent.R"]["IK_FK"]'] == 1.0
    assert rig_warnings(obj, bone_map) == []
    partial = BoneMap(**{**vars(bone_map), "bones": {j: b for j, b in bone_map.bones.items() if j != "spine2"}})
    with pytest.raises(ValueError, match="root at joint 'spine2'"):
        Retargeter(SKEL, TargetRig.from_armature(obj), partial)
    assert any("do not move the rig" in w for w in rig_warnings(obj, map_bones(obj.data.bones.keys(), "RIGIFY_DEF")))


@pytest.mark.parametrize("source", ["synthetic", "bandai"])
def test_generated_rigify_rig_moves(collection, source, request):
    if source == "bandai":
        walk = request.getfixturevalue("walk")
        root, quats, positions = walk["root"][:150], walk["quats"][:150], walk["positions"][:150]
    else:  # numpy only: runs where the backend (torch) is not installed
        root, quats = synthetic_motion(60)
        positions = fk(SKEL, root, quats)
    obj = generated_rigify_rig(collection)
    key(obj, root, quats)
    errors = position_errors(obj, PRESETS["RIGIFY_DEF"], positions)  # the DEF- bones the mesh follows
    meta = bpy.data.objects["metarig"]  # the same motion on the metarig (plain bones, the same anatomy)
    key(meta, root, quats)
    plain = world_heads(meta, [PRESETS["RIGIFY_META"][j] for j in SKEL.names], len(root))
    deform = world_heads(obj, [PRESETS["RIGIFY_DEF"][j] for j in SKEL.names], len(root))
    off_metarig = float(np.linalg.norm(deform - plain, axis=-1).max())
    travel = np.ptp(deform[:, [SKEL.names.index("left_wrist"), SKEL.names.index("right_ankle")]], axis=0).max(-1)
    print(f"Rigify ({source}): DEF joints off the source by {100 * errors.mean():.2f}% of height on average, "
          f"max {100 * errors.max():.2f}% (the metarig's proportions); off the metarig keyed directly by "
          f"{1000 * off_metarig:.3f} mm at most; wrist moves {travel[0]:.2f} m, ankle {travel[1]:.2f} m")  # fmt: skip
    assert off_metarig < 1e-3  # metres: the controls drive the deform bones exactly as the plain bones move
    assert errors.mean() < 0.06 and errors.max() < 0.15
    assert travel.min() > 0.5


# rig -> (builder, bounds on the mean and max joint error as a fraction of height). Mixamo and UE5 here have the
# canonical proportions; the UE4 rig other bone lengths, an A-pose and twist bones; Blender's metarig legs 11%
# longer for its height and shorter arms, which no retargeting removes from joint positions.
RIGS = {"metarig": (rigify_metarig, 0.06, 0.10), "mixamo": (mixamo_tpose_rig, 0.001, 0.002),
        "unreal4": (unreal_apose_rig, 0.01, 0.02), "unreal5": (unreal5_rig, 0.001, 0.002)}  # fmt: skip


@pytest.mark.parametrize("name", RIGS)
def test_rigs_follow_a_real_take(collection, name, walk):
    make_rig, mean_bound, max_bound = RIGS[name]
    obj = make_rig(collection)
    rt = key(obj, walk["root"], walk["quats"])
    bone_map = map_bones([b.name for b in obj.data.bones])
    errors = position_errors(obj, bone_map.bones, walk["positions"])
    head, pelvis = world_heads(obj, [bone_map.bones["head"], bone_map.bones["pelvis"]], len(walk["root"])).T[2]
    print(f"{name:>8} ({bone_map.preset}): mean {100 * errors.mean():.2f}% of height, max {100 * errors.max():.2f}%; "
          f"head above pelvis by {(head - pelvis).min():.2f} m at least; warnings: {list(rt.warnings)}")  # fmt: skip
    assert errors.mean() < mean_bound and errors.max() < max_bound
    assert (head - pelvis > 0.3).all()  # metres: upright in the world
    assert not rt.warnings


@pytest.mark.parametrize("rest", ["as imported", "upright"])
@pytest.mark.parametrize("take", TAKES)
def test_bvh_imported_by_blender_follows_its_own_take(collection, take_texts, take, tmp_path, rest):
    """Blender's import of the take, its rest lying along X as imported or with its first (standing) frame applied
    as rest: the motion prepared from the same take and retargeted onto it lands where Blender's own playback of
    the take puts the joints."""
    text, motion = take_texts[take], prepare(take_texts[take])
    obj = imported_bvh_rig(collection, text, tmp_path)
    bone_map = map_bones([b.name for b in obj.data.bones])
    bones = list(bone_map.bones.values())
    frames = len(motion["root"])
    take_fps = 1.0 / float(text.split("Frame Time:")[1].split()[0])
    reference = world_heads(obj, bones, 1 + np.arange(frames) * take_fps / FPS)  # Blender's playback of the take
    height = float(np.ptp(reference[0, :, 2]))
    bpy.context.scene.frame_set(1)
    obj.animation_data_clear()  # the pose of frame 1 stays on the bones
    if rest == "upright":
        with bpy.context.temp_override(active_object=obj, object=obj, selected_objects=[obj]):
            bpy.ops.object.mode_set(mode="POSE")
            bpy.ops.pose.armature_apply(selected=False)
            bpy.ops.object.mode_set(mode="OBJECT")
    errors = {}
    for lock in (True, False):  # foot locking (the default) holds feet the take lets slip a little
        rt = key(obj, motion["root"], motion["quats"], foot_lock=lock)
        got = world_heads(obj, bones, frames)
        fitted, rotation = fit(got, reference, scale=False)
        errors[lock] = np.linalg.norm(fitted - reference, axis=-1) / height
        assert rotation[2, 2] > math.cos(math.radians(2))  # only turned about the world's up: nothing tilted
    pelvis, head = bones.index(bone_map.bones["pelvis"]), bones.index(bone_map.bones["head"])
    print(f"imported BVH {take}, rest {rest} ({bone_map.preset}, {len(bones)} bones), against Blender's playback "
          f"of the take: mean {100 * errors[False].mean():.2f}% of height, max {100 * errors[False].max():.2f}% (foot "
          f"locking on: {100 * errors[True].mean():.2f}%, {100 * errors[True].max():.2f}%); head above pelvis by "
          f"{(got[:, head, 2] - got[:, pelvis, 2]).min():.1f} cm at least; warnings: {list(rt.warnings)}")  # fmt: skip
    assert (got[:, head, 2] - got[:, pelvis, 2] > 0.25 * height).all()  # standing: head well above the pelvis
    assert errors[False].mean() <= 0.01 and errors[False].max() <= 0.025  # the bar: 1% and 2.5%
    assert errors[True].mean() <= 0.01 and errors[True].max() <= 0.025  # and with foot locking, the default
    assert rig_warnings(obj, bone_map) == list(rt.warnings)
    lying = rest == "as imported"
    assert any("not standing" in w for w in rt.warnings) == lying
    assert any("hips do not lie across" in w for w in rt.warnings) == lying  # its zero pose has them along Z


def test_two_bone_ik_reaches_and_keeps_lengths_and_bend_plane():
    rng = np.random.default_rng(3)
    hip = rng.normal(size=(50, 3))
    knee = hip + np.array([0.0, 0.05, -0.45]) + 0.05 * rng.normal(size=(50, 3))
    ankle = knee + np.array([0.0, -0.1, -0.4]) + 0.05 * rng.normal(size=(50, 3))
    target = hip + 0.85 * (ankle - hip) + 0.03 * rng.normal(size=(50, 3))  # within reach
    new_knee, new_ankle = two_bone_ik(hip, knee, ankle, target, np.array([0.0, 1.0, 0.0]))
    np.testing.assert_allclose(new_ankle, target, atol=1e-9)
    far = hip + 3 * (ankle - hip)  # out of reach: the leg straightens towards it
    _, reached = two_bone_ik(hip, knee, ankle, far, np.array([0.0, 1.0, 0.0]))
    reach = np.linalg.norm(knee - hip, axis=1) + np.linalg.norm(ankle - knee, axis=1)
    np.testing.assert_allclose(reached, hip + (far - hip) / np.linalg.norm(far - hip, axis=1)[:, None] * reach[:, None],
                               atol=1e-5)
    for a, b, c, d in ((knee, hip, new_knee, hip), (ankle, knee, new_ankle, new_knee)):
        np.testing.assert_allclose(np.linalg.norm(a - b, axis=1), np.linalg.norm(c - d, axis=1), atol=1e-9)
    normal = np.cross(knee - hip, target - hip)  # the bend plane: hip, target and the original knee
    assert np.abs(np.sum((new_knee - hip) * normal, axis=1)).max() < 1e-9
    assert (np.sum(np.cross(new_knee - hip, target - hip) * normal, axis=1) > 0).all()  # bends the same way


def test_plants_hold_still_feet_across_chunks_carry_while_rolling_and_let_go_in_the_air():
    up = np.array([0.0, 0.0, 1.0])
    ankles = np.zeros((24, 1, 3))
    ankles[:, 0, 0] = 0.004 * np.arange(24)  # the rig's ankle creeping forward 4 mm a frame
    ankles[:, 0, 2] = 0.002 * np.arange(24)  # and rising: height is left to the motion
    slow, rolling, flying = 0.5 * HOLD_STEP, (MOVE_STEP + KEEP_STEP) / 2, FREE_STEP
    steps = np.array([slow] * 8 + [rolling] * 3 + [(KEEP_STEP + FREE_STEP) / 2] * 2 + [flying] * 11)[:, None]
    plants = Plants(1, up, max_offset=0.1)
    first = plants.corrections(ankles[:5], steps[:5])  # two chunks, as frames stream in
    offsets = np.concatenate([first, plants.corrections(ankles[5:], steps[5:])])
    np.testing.assert_allclose(offsets[:, 0, 2], 0.0)  # across the ground only
    held = (ankles + offsets)[:, 0, 0]
    np.testing.assert_allclose(held[:8], 0.0, atol=1e-12)  # held where it touched down, across the chunks
    np.testing.assert_allclose(np.diff(held[7:11]), 0.004)  # rolling: moves as the motion, the hold kept
    assert 0 < offsets[12, 0, 0] / offsets[10, 0, 0] < offsets[11, 0, 0] / offsets[10, 0, 0] < 1  # fading out
    np.testing.assert_allclose(offsets[13:], 0.0)  # in the air: let go
    capped = Plants(1, up, max_offset=0.01).corrections(ankles, np.full((24, 1), slow))
    np.testing.assert_allclose(np.abs(capped[:, 0, 0]).max(), 0.01)  # a sliding plant is dragged along
    np.testing.assert_allclose(np.diff((ankles + capped)[4:, 0, 0]), 0.004)
    with pytest.raises(ValueError, match="steps"):
        plants.corrections(ankles, steps[:3])
    # a hold out of the leg's reach is raised (at most `lift`), then shortened: the leg never straightens further
    hip, ankle = np.zeros((1, 3)), np.array([[0.0, 0.0, -0.8]])
    offset = within_reach(hip, ankle, np.array([[0.3, 0.0, 0.0]]), 0.8, up, lift=0.01)
    assert offset[0, 2] == pytest.approx(0.01) and 0 < offset[0, 0] < 0.3
    assert np.linalg.norm(ankle + offset) == pytest.approx(0.8)


@pytest.mark.parametrize("name", ["unreal4", "rigify"])
def test_foot_locking_holds_planted_feet(collection, walk, name):
    """On rigs with other proportions, ankles the mocap plants move no faster than the mocap's own."""
    contact = walk["contacts"][:, [0, 2]]  # left ankle, right ankle: the features' contact flags
    src = walk["positions"][:, [SKEL.names.index("left_ankle"), SKEL.names.index("right_ankle")]]
    in_contact = contact[: len(walk["root"]) - 1]

    def speed(p: np.ndarray) -> tuple[float, float]:  # mean and median ankle speed over the contact frames, m/s
        step = np.linalg.norm(p[1:] - p[:-1], axis=-1)[in_contact] * FPS
        return float(step.mean()), float(np.median(step))

    obj, ankles = {"unreal4": (unreal_apose_rig, ["foot_l", "foot_r"]),
                   "rigify": (generated_rigify_rig, ["DEF-foot.L", "DEF-foot.R"])}[name]  # fmt: skip
    obj = obj(collection)
    speeds = {}
    for lock in (False, True):
        rt = key(obj, walk["root"], walk["quats"], foot_lock=lock, chunks=5)  # each a new action
        speeds[lock] = speed(world_heads(obj, ankles, len(walk["root"])))
    source = tuple(v * rt.scale for v in speed(src))
    print(f"{name}: ankle speed on contact frames, mean (median) in m/s, the mocap's scaled x{rt.scale:.3f} to the "
          f"rig: mocap {source[0]:.3f} ({source[1]:.3f}), rig without foot locking {speeds[False][0]:.3f} "
          f"({speeds[False][1]:.3f}), with {speeds[True][0]:.3f} ({speeds[True][1]:.3f}); "
          f"{int(in_contact.sum())} contact frames x feet")  # fmt: skip
    assert speeds[True][0] <= source[0] and speeds[True][1] <= source[1]
    assert speeds[True][0] < speeds[False][0]


def test_foot_locking_is_the_same_for_any_chunking(collection, walk):
    obj = unreal_apose_rig(collection)  # other proportions than the motion's: its feet slide unless held
    rig, bone_map = TargetRig.from_armature(obj), map_bones([b.name for b in obj.data.bones])
    root, quats = walk["root"], walk["quats"]
    whole = Retargeter(SKEL, rig, bone_map)(root, quats)
    for sizes in ([1] * 12 + [40], [3, 1, 2, 50, 7], [64]):
        rt = Retargeter(SKEL, rig, bone_map)
        cuts = np.cumsum(sizes)
        parts = [rt(root[a:b], quats[a:b]) for a, b in zip([0, *cuts], [*cuts, len(root)])]
        np.testing.assert_allclose(np.concatenate([p.rotations for p in parts]), whole.rotations, atol=1e-12)
        np.testing.assert_allclose(np.concatenate([p.root_location for p in parts]), whole.root_location, atol=1e-12)
    free = Retargeter(SKEL, rig, bone_map, foot_lock=False)(root, quats)
    thigh = whole.bones.index(bone_map.bones["left_hip"])
    turned = 2 * np.arccos(np.clip(np.abs(np.sum(whole.rotations * free.rotations, -1)), 0, 1))[:, thigh]
    print(f"foot locking turns the left thigh by up to {math.degrees(turned.max()):.1f} degrees")
    assert math.radians(0.5) < turned.max() < math.radians(10)  # it does hold feet, and only a little
