"""Benchmark: retarget 300 frames of a 22-joint motion onto a Mixamo-named armature and key a new Action.

    .venv/bin/python tools/bench_keying.py [--frames 300] [--repeats 20] [--scene-fps 24]

Prints the median time of each stage (set-up, retarget, keying resampled onto the scene's whole frames, the same
keying with the rig's bones in Euler XYZ mode) and the total against the 50 ms budget, with foot locking on (the
default) and off and their ratio, plus the per-key rate of the bulk path (keyframe_points.add + foreach_set)
against pose_bone.keyframe_insert.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="mm-bench-"))
HUMANML3D = ROOT.parent / "shared" / "data" / "humanml3d-samples" / "new_joint_vecs" / "007005.npy"


def source_motion(frames: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Root translation and rotations of a real HumanML3D clip (looped to length), else a random one."""
    try:
        from backend.motion import features_to_rotations

        root, quats = features_to_rotations(np.load(HUMANML3D))
        reps = -(-frames // len(root))
        return np.tile(root, (reps, 1))[:frames], np.tile(quats, (reps, 1, 1))[:frames], "HumanML3D 007005"
    except (ImportError, OSError):
        rng = np.random.default_rng(0)
        quats = rng.normal(size=(frames, 22, 4))
        return rng.normal(size=(frames, 3)), quats / np.linalg.norm(quats, axis=-1, keepdims=True), "random"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--scene-fps", type=float, default=24.0, help="the scene's frame rate (the motion is 20 fps)")
    args = parser.parse_args()

    import bpy

    from addon.armature import build_armature, canonical_bones
    from addon.canonical import SMPL22_BUILTIN as SKEL
    from addon.keying import ActionKeyer
    from addon.retarget import PRESETS, Retargeter, TargetRig, map_bones

    bpy.ops.wm.read_factory_settings(use_empty=True)
    heads, tails = canonical_bones(SKEL)
    names = ["mixamorig:" + PRESETS["MIXAMO"][j] for j in SKEL.names]
    obj = build_armature(bpy.context.scene.collection, "Rig", names, SKEL.parents, heads, tails)
    root, quats, source = source_motion(args.frames)

    def key(result) -> tuple[float, ActionKeyer]:
        start = time.perf_counter()
        keyer = ActionKeyer(obj, "bench", source_fps=20.0, scene_fps=args.scene_fps)
        keyer.append(result)
        return time.perf_counter() - start, keyer

    keying = f"keying ({args.scene_fps:g} fps, quaternion)"
    euler = "  same, Euler XYZ bones (not in total)"
    stage_names = ("set-up (map + rig + rest alignment)", "retarget", keying, euler)
    timings = {lock: {stage: [] for stage in stage_names} for lock in (True, False)}
    for _ in range(args.repeats):
        for foot_lock in (True, False):  # interleaved, so that the shared machine's load falls on both alike
            t0 = time.perf_counter()
            retargeter = Retargeter(SKEL, TargetRig.from_armature(obj), map_bones(names), foot_lock=foot_lock)
            t1 = time.perf_counter()
            result = retargeter(root, quats)
            t2 = time.perf_counter()
            dt, keyer = key(result)
            keyed = keyer.keyed
            keyer.discard()
            for pb in obj.pose.bones:
                pb.rotation_mode = "XYZ"
            dt_euler, keyer = key(result)
            keyer.discard()
            for pb in obj.pose.bones:
                pb.rotation_mode = "QUATERNION"
            for stage, t in zip(stage_names, (t1 - t0, t2 - t1, dt, dt_euler)):
                timings[foot_lock][stage].append(t)
    keys = keyed * (4 * len(result.bones) + 3)
    print(f"source: {source}, {args.frames} frames at 20 fps -> {keyed} frames at {args.scene_fps:g} fps x "
          f"{len(result.bones)} bones = {keys} keys; median of {args.repeats} runs, "
          f"Blender {bpy.app.version_string}")  # fmt: skip
    totals = {}
    for foot_lock, stages in timings.items():
        print(f"foot locking {'on' if foot_lock else 'off'}:")
        total = 0.0
        for stage, times in stages.items():
            ms = 1000 * float(np.median(times))
            total += ms if stage != euler else 0.0
            print(f"  {stage:<38} {ms:7.2f} ms")
        print(f"  {'total':<38} {total:7.2f} ms  (budget 50 ms: {'OK' if total < 50 else 'OVER'}, {50 / total:.1f}x)")
        totals[foot_lock] = total
    print(f"foot locking on/off: {totals[True]:.2f} / {totals[False]:.2f} ms = {totals[True] / totals[False]:.2f}x")

    # The per-key path the bulk path replaces, on a slice (it is slow): pose_bone.keyframe_insert.
    n = min(30, args.frames)
    bpy.context.scene.frame_set(1)
    obj.animation_data_clear()
    t0 = time.perf_counter()
    for f in range(n):
        for b, name in enumerate(result.bones):
            pb = obj.pose.bones[name]
            pb.rotation_quaternion = result.rotations[f, b]
            pb.keyframe_insert("rotation_quaternion", frame=f + 1)
    slow_per_key = (time.perf_counter() - t0) / (n * 4 * len(result.bones))
    fast_per_key = float(np.median(timings[False][keying])) / keys
    print(f"  per key: bulk {1e6 * fast_per_key:.2f} us, keyframe_insert {1e6 * slow_per_key:.2f} us "
          f"({slow_per_key / fast_per_key:.0f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
