"""Measure how faithfully the streamed rotations reproduce prepared mocap (issue 15), on real BVH takes.

    .venv/bin/python tools/measure_rotations.py fk [--source ARCHIVE_OR_FOLDER] [--match TEXT] [--clips N]
    .venv/bin/python tools/measure_rotations.py blender [--source ...] [--match wave-right-hand] [--clips 1]
    .venv/bin/python tools/measure_rotations.py twist [--source ...] [--clips 40] [--vae-steps N] [--denoiser-steps N]

Each clip is prepared as ``prepare-bvh`` prepares it (``backend.data.prepare.clip_features``: rotations retargeted
onto the SMPL22 rest, twist included) and streamed (``backend.motion.features_to_rotations``). Beside it, "before":
the positions-only preparation used until issue 15 (``canonicalize_positions`` of the retargeted joints,
HumanML3D-style rotation channels), streamed the same way.

fk: forward kinematics of the stream over the announced rest (``SMPL22.rest_offsets``) against the motion's own
positions (``features_to_positions``), in % of the canonical standing height (floor to head joint), and the
direction error of every segment parent -> child (degrees).

blender: Blender's own BVH importer is the reference (bpy, ``import_anim.bvh`` at scale 0.01, NATIVE rotations).
A copy of the imported armature is posed into the map's standing T-pose (the reference of the retargeting
convention, ``backend.data.retarget``) and that pose is applied as its rest; the add-on keys the stream onto the
copy (``addon.retarget.Retargeter`` + ``addon.keying.ActionKeyer``); then every keyed bone's world orientation,
twist included, is compared with the same bone of the import at the same instants (every 2nd stream frame at
20 fps = every 3rd BVH frame at 30 fps), after the constant turn about the vertical that data preparation
applies to face +Z (measured on the bone directions of the first frame).

twist: does a model learn the twist channels? Prepares up to --clips right-hand waves and as many walks, trains
the tiny VAE and denoiser (configs/tiny.json, more steps) on them and, as the control, on the same data with the
twist shuffled across frames (:func:`shuffle_twist`: same positions, twist unrelated to the pose), generates
right-hand waves with both, and compares the twist of the right upper arm and forearm (:func:`bone_twist`) with
the data's in the same arm pose (:func:`twist_deviation`); also the swing-only stream of the same generated
motions (what was streamed before issue 15). Prints the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="mm-measure-"))
BANDAI = ROOT.parent / "shared" / "data" / "bandai-namco-motion.tar.xz"

from backend.data.bvh import Bvh, parse_bvh  # noqa: E402
from backend.data.prepare import clip_features, iter_source  # noqa: E402
from backend.data.retarget import JointMap, find_map, reference_rotations, retarget  # noqa: E402
from backend.motion import (  # noqa: E402
    canonicalize_positions,
    features_to_positions,
    features_to_rotations,
    forward_kinematics,
    positions_to_features,
    rotation_channels,
)
from backend.quaternion import qbetween, qinv, qmul, qrot, quat_to_matrix  # noqa: E402
from backend.skeleton import SMPL22  # noqa: E402


def canonical_height() -> float:
    """Standing height of the canonical rest pose: lowest joint to the head joint (metres)."""
    y = forward_kinematics(np.zeros((1, 3)), np.tile([1.0, 0.0, 0.0, 0.0], (1, SMPL22.num_joints, 1)))[0, :, 1]
    return float(y[SMPL22.joint_names.index("head")] - y.min())


def iter_clips(source: Path, match: str, limit: int) -> Iterator[tuple[str, str]]:
    """(name, BVH text) of up to ``limit`` .bvh clips of a folder or archive whose file name contains ``match``."""
    count = 0
    for member, data in iter_source(source):
        if count >= limit:
            return
        if member.lower().endswith(".bvh") and match in PurePosixPath(member).name:
            count += 1
            yield PurePosixPath(member).stem, data.decode("utf-8", errors="replace")


def before_features(bvh: Bvh, jmap: JointMap) -> np.ndarray:
    """The positions-only preparation used before issue 15 (HumanML3D-style rotation channels)."""
    return positions_to_features(canonicalize_positions(retarget(bvh, jmap), jmap.skeleton), jmap.skeleton)


def segments() -> list[tuple[int, int]]:
    """Every (parent, child) joint pair of the canonical skeleton."""
    return [(p, c) for c, p in enumerate(SMPL22.parents) if p >= 0]


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def stream_errors(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stream a motion's features; return the joint position error of forward kinematics of the stream against
    ``features_to_positions`` (T, J) as a fraction of :func:`canonical_height`, and the direction error of each
    segment of :func:`segments` (T, S) in degrees."""
    features = np.asarray(features, dtype=np.float64)
    positions = features_to_positions(features)
    fk = forward_kinematics(*features_to_rotations(features))
    parent, child = np.array(segments()).T
    directions = _angle(fk[:, child] - fk[:, parent], positions[:, child] - positions[:, parent])
    return np.linalg.norm(fk - positions, axis=-1) / canonical_height(), directions


def _yaw(source: np.ndarray, canonical: np.ndarray) -> float:
    """The turn about +Y (radians) taking the source's single-child bone directions of one frame onto the
    prepared motion's (both (J, 3) joint positions of the canonical skeleton)."""
    bones = [(p, c) for p, c in segments() if len(SMPL22.children[p]) == 1]
    parent, child = np.array(bones).T
    a, b = source[child] - source[parent], canonical[child] - canonical[parent]
    a, b = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
    # rotation about Y by t: (x, z) -> (x cos t + z sin t, -x sin t + z cos t); maximise sum b . R a
    sin = (a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2]).sum()
    return float(np.arctan2(sin, (a[:, 0] * b[:, 0] + a[:, 2] * b[:, 2]).sum()))


def blender_errors(bvh_path: Path, bvh: Bvh, jmap: JointMap, features: np.ndarray) -> dict[str, np.ndarray]:
    """Per keyed bone, the orientation error (degrees, per compared instant) of the stream of ``features`` keyed
    by the add-on onto an upright copy of Blender's import of ``bvh_path``, against the import (module docstring)."""
    import bpy
    from mathutils import Matrix

    from addon.canonical import CanonicalSkeleton
    from addon.keying import ActionKeyer
    from addon.retarget import SOURCE_TO_BLENDER, Retargeter, TargetRig, map_bones

    features = np.asarray(features, dtype=np.float64)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    bpy.ops.import_anim.bvh(filepath=str(bvh_path), global_scale=0.01, rotate_mode="NATIVE",
                            update_scene_duration=True)
    ref = bpy.context.active_object
    target = ref.copy()
    target.data = ref.data.copy()
    target.animation_data_clear()
    scene.collection.objects.link(target)

    # the upright rest: every bone turned by its source joint's T-pose world rotation (source axes -> Blender's)
    tpose = reference_rotations(bvh, jmap)
    order = sorted(target.pose.bones, key=lambda pb: len(pb.parent_recursive))
    to_bl = SOURCE_TO_BLENDER
    for pb in order:
        bpy.context.view_layer.update()
        w = tpose[bvh.joint_names.index(pb.name)]
        rot = to_bl @ quat_to_matrix(torch.from_numpy(w)).numpy() @ to_bl.T @ np.array(pb.bone.matrix_local.to_3x3())
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = rot, np.array(pb.head)
        pb.matrix = Matrix(m.tolist())
    bpy.context.view_layer.objects.active = target
    bpy.ops.object.mode_set(mode="POSE")
    bpy.ops.pose.armature_apply(selected=False)
    bpy.ops.object.mode_set(mode="OBJECT")

    skeleton = CanonicalSkeleton.from_json(SMPL22.to_json())
    bone_map = map_bones([b.name for b in target.data.bones], "BANDAI")
    # foot locking off: it holds planted ankles by leg IK, a deliberate change of the legs' orientations
    retargeter = Retargeter(skeleton, TargetRig.from_armature(target), bone_map, foot_lock=False)
    keyed = retargeter(*features_to_rotations(features))
    ActionKeyer(target, "stream", frame_start=1).append(keyed)
    bones = list(keyed.bones)

    source = retarget(bvh, jmap)
    turn = _yaw(source[0], features_to_positions(features)[0])
    c, s = np.cos(turn), np.sin(turn)
    yaw = to_bl @ np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]) @ to_bl.T

    def orientations(obj, frame: int) -> np.ndarray:
        scene.frame_set(frame)
        world = np.array(obj.matrix_world)[:3, :3]
        return np.stack([world @ np.array(obj.pose.bones[b].matrix)[:3, :3] for b in bones])

    instants = range(0, min((len(features) - 1) // 2, (bvh.num_frames - 1) // 3) + 1)
    errors = []
    for k in instants:
        got, want = orientations(target, 1 + 2 * k), yaw @ orientations(ref, 1 + 3 * k)
        cos = (np.einsum("bij,bij->b", got, want) - 1.0) / 2.0
        errors.append(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    return dict(zip(bones, np.array(errors).T))


TWIST_JOINTS = ("right_shoulder", "right_elbow")
WAVE_PROMPT = "a person waves with the right hand"


def _world(rotations: torch.Tensor) -> list[torch.Tensor]:
    world = [rotations[..., 0, :]]
    for k, p in enumerate(SMPL22.parents[1:], start=1):
        world.append(qmul(world[p], rotations[..., k, :]))
    return world


def bone_twist(rotations: np.ndarray, joint: str) -> np.ndarray:
    """Signed twist (T,) in degrees of a one-child joint's world rotation about its bone: the rotation left after
    the shortest arc from the rest bone to the posed bone (0 for swing-only rotations) of local rotations (T, J, 4)."""
    q = torch.from_numpy(np.asarray(rotations, dtype=np.float64))
    j = SMPL22.joint_names.index(joint)
    world = _world(q)[j]
    axis = _bone_axis(j).expand(len(q), 3)
    twist = qmul(qinv(qbetween(axis, qrot(world, axis))), world)
    return _wrap(np.degrees(2 * torch.atan2((twist[:, 1:] * axis).sum(-1), twist[:, 0]).numpy()))


def _bone_axis(j: int) -> torch.Tensor:
    (child,) = SMPL22.children[j]
    return torch.from_numpy(SMPL22.rest_offsets[child] / np.linalg.norm(SMPL22.rest_offsets[child]))


def shuffle_twist(motions: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """The twist-shuffled control: local rotations (T, J, 4) whose every one-child joint takes, in place of its
    own twist (:func:`bone_twist`), the twist of that joint in a random frame of any of ``motions``; every other
    joint keeps its world rotation, so the joint positions do not change."""
    rng = np.random.default_rng(seed)
    joints = [j for j in range(1, SMPL22.num_joints) if len(SMPL22.children[j]) == 1]
    twists = {j: np.concatenate([bone_twist(m, SMPL22.joint_names[j]) for m in motions]) for j in joints}
    out = []
    for m in motions:
        world = _world(torch.from_numpy(np.asarray(m, dtype=np.float64)))
        for j in joints:
            own = bone_twist(m, SMPL22.joint_names[j])
            delta = torch.from_numpy(np.radians(rng.choice(twists[j], size=len(m)) - own))[:, None]
            turn = torch.cat([torch.cos(delta / 2), torch.sin(delta / 2) * _bone_axis(j)], dim=-1)
            world[j] = qmul(world[j], turn)
        local = [world[0]] + [qmul(qinv(world[p]), world[k]) for k, p in enumerate(SMPL22.parents[1:], start=1)]
        out.append(torch.stack(local, dim=1).numpy())
    return out


def _wrap(degrees: np.ndarray) -> np.ndarray:
    return (degrees + 180.0) % 360.0 - 180.0


def arm_pose(rotations: np.ndarray) -> np.ndarray:
    """Directions (T, 6) of the right upper arm and forearm in the pelvis frame, from local rotations (T, J, 4)."""
    q = np.array(rotations, dtype=np.float64)
    q[:, 0] = [1.0, 0.0, 0.0, 0.0]
    p = forward_kinematics(np.zeros((len(q), 3)), q)
    shoulder, elbow, wrist = (SMPL22.joint_names.index(f"right_{n}") for n in ("shoulder", "elbow", "wrist"))
    bones = np.concatenate([p[:, elbow] - p[:, shoulder], p[:, wrist] - p[:, elbow]], axis=-1).reshape(-1, 2, 3)
    return (bones / np.linalg.norm(bones, axis=-1, keepdims=True)).reshape(-1, 6)


def twist_deviation(data: list[np.ndarray], motions: list[np.ndarray], joint: str, neighbours: int = 10) -> float:
    """Mean |angle| (degrees) between a joint's twist in ``motions`` and the twist the ``data`` shows in the same
    arm pose: the circular mean twist of the ``neighbours`` data frames nearest in :func:`arm_pose`. All motions
    are lists of local rotations (T, J, 4)."""
    pose_data = np.concatenate([arm_pose(m) for m in data])
    twist_data = np.radians(np.concatenate([bone_twist(m, joint) for m in data]))
    pose = np.concatenate([arm_pose(m) for m in motions])
    twist = np.concatenate([bone_twist(m, joint) for m in motions])
    nearest = np.argsort(((pose[:, None] - pose_data[None]) ** 2).sum(-1), axis=1)[:, :neighbours]
    expected = np.degrees(np.arctan2(np.sin(twist_data[nearest]).mean(1), np.cos(twist_data[nearest]).mean(1)))
    return float(np.abs(_wrap(twist - expected)).mean())


def _raised(motions: list[np.ndarray]) -> float:
    """Share of frames whose right upper arm points above horizontal."""
    return float(np.mean(np.concatenate([arm_pose(m)[:, 1] > 0 for m in motions])))


def twist_experiment(source: Path, clips: int, vae_steps: int, denoiser_steps: int, samples: int) -> dict:
    """Train the tiny model twice on ``clips`` right-hand waves and as many walks of ``source``: on the prepared
    data, and on the same data with its twist shuffled (:func:`shuffle_twist`, the control); generate ``samples``
    right-hand waves with each. Returns {"setup": text, "raised": {...}, joint: {...} for :data:`TWIST_JOINTS`}
    with :func:`twist_deviation` of: the data itself, the shuffled data, each model's generated motions, and the
    swing-only stream of the first model's motions (what was streamed before issue 15)."""
    from backend.data.prepare import prepare_bvh
    from backend.pipeline import MotionPipeline
    from backend.quaternion import quat_to_cont6d
    from backend.train import train

    with tempfile.TemporaryDirectory(prefix="mm-twist-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "bvh"
        count = {"wave-right-hand": 0, "walk": 0}
        chosen: set[str] = set()
        for member, data in iter_source(source):
            name = PurePosixPath(member)
            kind = next((k for k in count if f"_{k}_" in name.name), None)
            if kind is not None and name.suffix == ".bvh" and count[kind] < clips:
                count[kind] += 1
                chosen.add(name.stem)
            if name.stem in chosen or name.parent.name == "cfg":  # the clip, its label .json, the label lists
                (folder / member).parent.mkdir(parents=True, exist_ok=True)
                (folder / member).write_bytes(data)
        prepare_bvh(folder, tmp / "data", workers=1, progress=False)
        shutil.copytree(tmp / "data", tmp / "shuffled")
        paths = sorted((tmp / "data" / "new_joint_vecs").glob("*.npy"))
        features = [np.load(p).astype(np.float64) for p in paths]
        rotations = [features_to_rotations(f)[1] for f in features]
        shuffled = shuffle_twist(rotations)
        j = SMPL22.num_joints
        for path, f, q in zip(paths, features, shuffled):
            f[:, 4 + (j - 1) * 3 : 4 + (j - 1) * 9] = quat_to_cont6d(torch.from_numpy(q[:, 1:])).reshape(len(f), -1)
            np.save(tmp / "shuffled" / "new_joint_vecs" / path.name, f.astype(np.float32))
        generated, channels = {}, set()
        for kind in ("data", "shuffled"):
            train("vae", tmp / kind, tmp / kind / "vae", config="tiny", steps=vae_steps, progress=False)
            train("denoiser", tmp / kind, tmp / kind / "run", config="tiny", steps=denoiser_steps,
                  vae=tmp / kind / "vae", progress=False)
            pipeline = MotionPipeline.from_checkpoint(tmp / kind / "run", device="cpu")
            motions = pipeline(WAVE_PROMPT, seconds=4.0, seed=0, samples=samples)
            generated[kind] = [m.rotations for m in motions]
            channels |= {rotation_channels(m.features) for m in motions}
            if kind == "data":
                swing_only = [features_to_rotations(m.features, channels="humanml3d")[1] for m in motions]
    waves = [q for p, q in zip(paths, rotations) if "wave-right-hand" in p.name]
    waves_shuffled = [q for p, q in zip(paths, shuffled) if "wave-right-hand" in p.name]
    setup = (f"tiny model: VAE {vae_steps} steps, denoiser {denoiser_steps} steps, on {count['wave-right-hand']} "
             f"right-hand waves and {count['walk']} walks, and again on the same with twist shuffled; {samples} "
             f"generated '{WAVE_PROMPT}' (4 s) from each; channels read as {sorted(channels)}")
    rows = {
        "data (wave clips)": waves,
        "twist-shuffled data": waves_shuffled,
        "generated": generated["data"],
        "generated by the control": generated["shuffled"],
        "swing-only stream of generated": swing_only,
    }
    return {
        "setup": setup,
        "raised": {k: _raised(v) for k, v in (("data", waves), ("generated", generated["data"]),
                                              ("control", generated["shuffled"]))},
        **{joint: {k: twist_deviation(waves, v, joint) for k, v in rows.items()} for joint in TWIST_JOINTS},
    }


def _twist_report(source: Path, clips: int, vae_steps: int, denoiser_steps: int, samples: int) -> None:
    result = twist_experiment(source, clips, vae_steps, denoiser_steps, samples)
    print(result["setup"])
    print("share of frames with the right upper arm above horizontal: "
          + ", ".join(f"{k} {v:.0%}" for k, v in result["raised"].items()))
    print("twist vs the data's twist in the same arm pose (10 nearest data frames), mean |deviation| in degrees")
    print(f"{'':32s}" + "".join(f"{joint:>16s}" for joint in TWIST_JOINTS))
    for row in result[TWIST_JOINTS[0]]:
        print(f"{row:32s}" + "".join(f"{result[joint][row]:16.1f}" for joint in TWIST_JOINTS))


def _fk_report(clips: list[tuple[str, str]]) -> None:
    height = canonical_height()
    print(f"FK of the stream vs the motion's positions, % of the canonical height ({height:.3f} m)")
    print(f"{'clip':45s} {'frames':>6s} {'before mean':>11s} {'before max':>10s} {'now mean':>9s} {'now max':>8s}")
    angles: dict[str, list[np.ndarray]] = {"before": [], "now": []}
    for name, text in clips:
        bvh = parse_bvh(text, name)
        jmap = find_map(bvh.joint_names)
        row = []
        for key, features in (("before", before_features(bvh, jmap)), ("now", clip_features(bvh, jmap)[0])):
            position, direction = stream_errors(features.astype(np.float32))  # as stored on disk
            row += [100 * position.mean(), 100 * position.max()]
            angles[key].append(direction)
        print(f"{name:45s} {len(features):6d} {row[0]:11.3f} {row[1]:10.3f} {row[2]:9.1e} {row[3]:8.1e}")
    print("\nsegment direction error of the stream (degrees, all clips)")
    print(f"{'segment':32s} {'before mean':>11s} {'before max':>10s} {'now mean':>9s} {'now max':>8s}")
    before, now = np.concatenate(angles["before"]), np.concatenate(angles["now"])
    for k, (p, c) in enumerate(segments()):
        label = f"{SMPL22.joint_names[p]} -> {SMPL22.joint_names[c]}"
        print(f"{label:32s} {before[:, k].mean():11.2f} {before[:, k].max():10.2f} "
              f"{now[:, k].mean():9.1e} {now[:, k].max():8.1e}")


def _blender_report(clips: list[tuple[str, str]]) -> None:
    for name, text in clips:
        bvh = parse_bvh(text, name)
        jmap = find_map(bvh.joint_names)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.bvh"
            path.write_text(text, encoding="utf-8")
            table = {key: blender_errors(path, bvh, jmap, features.astype(np.float32)) for key, features in
                     (("before", before_features(bvh, jmap)), ("now", clip_features(bvh, jmap)[0]))}
        print(f"\n{name}: bone world orientation vs Blender's own BVH import, twist included (degrees)")
        print(f"{'bone':14s} {'before mean':>11s} {'before max':>10s} {'now mean':>9s} {'now max':>8s}")
        for bone in table["now"]:
            b, n = table["before"][bone], table["now"][bone]
            print(f"{bone:14s} {b.mean():11.2f} {b.max():10.2f} {n.mean():9.3f} {n.max():8.3f}")
        b, n = (np.stack(list(table[k].values())) for k in ("before", "now"))
        print(f"{'all bones':14s} {b.mean():11.2f} {b.max():10.2f} {n.mean():9.3f} {n.max():8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("fk", "blender", "twist"))
    parser.add_argument("--source", type=Path, default=BANDAI, help="BVH folder or archive (default: Bandai-Namco)")
    parser.add_argument("--match", default="", help="only clips whose file name contains this")
    parser.add_argument("--clips", type=int, default=6, help="how many clips (twist: of each kind; default 6)")
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--denoiser-steps", type=int, default=800)
    parser.add_argument("--samples", type=int, default=8, help="twist: generated motions")
    args = parser.parse_args()
    if args.what == "twist":
        _twist_report(args.source, args.clips, args.vae_steps, args.denoiser_steps, args.samples)
        return
    clips = list(iter_clips(args.source, args.match, args.clips))
    if not clips:
        parser.error(f"no .bvh clip in {args.source} matches {args.match!r}")
    (_fk_report if args.what == "fk" else _blender_report)(clips)


if __name__ == "__main__":
    main()
