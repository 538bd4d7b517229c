"""Which files of a source are motion clips, what else each needs, and reading any of them into ``SourceMotion``.

Formats: BVH (``.bvh``), Acclaim AMC (``.amc``, over the ASF skeleton in its folder: ``PREFIX.asf`` where the
clip is ``PREFIX_...amc``, or the folder's only ``.asf``) and DeepMimic motion JSON (a ``.txt``/``.json`` holding
``"Frames"``, over the nearest ``skeleton/*.txt`` holding ``"Skeleton"`` in its folder or a folder above).

BVH converters often put a calibration T-pose in frame 0 (e.g. the cgspeed CMU conversions: the zero pose,
followed by a jump to the first captured pose); :func:`drop_calibration_frame` finds and drops it.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

from backend.data.asf_amc import parse_amc, parse_asf
from backend.data.bvh import parse_bvh
from backend.data.deepmimic import parse_motion, parse_skeleton
from backend.data.retarget import JointMap, retarget
from backend.data.source_motion import SourceMotion


def clip_kind(member: str, head: bytes) -> str | None:
    """"bvh", "amc" or "deepmimic" when ``member`` (starting with bytes ``head``) is a motion clip, else None."""
    name = member.lower()
    if name.endswith(".bvh"):
        return "bvh"
    if name.endswith(".amc"):
        return "amc"
    if name.endswith((".txt", ".json")) and head.lstrip().startswith(b"{") and b'"Frames"' in head[:400]:
        return "deepmimic"
    return None


def is_deepmimic_skeleton(member: str, head: bytes) -> bool:
    return member.lower().endswith(".txt") and head.lstrip().startswith(b"{") and b'"Skeleton"' in head[:400]


def context_member(member: str, kind: str, files: dict[str, bytes]) -> str | None:
    """The member a clip needs beside it (module docstring), or None for BVH; ValueError when it is missing."""
    if kind == "bvh":
        return None
    path = PurePosixPath(member)
    if kind == "amc":
        in_folder = [m for m in files if PurePosixPath(m).parent == path.parent and m.lower().endswith(".asf")]
        named = [m for m in in_folder if path.stem.startswith(PurePosixPath(m).stem + "_")]
        found = named or (in_folder if len(in_folder) == 1 else [])
        if not found:
            raise ValueError(f"no ASF skeleton for it (expected PREFIX.asf beside it; found {len(in_folder)} .asf)")
        return max(found, key=len)
    for folder in path.parents:
        candidates = sorted(m for m in files if PurePosixPath(m).parent == folder / "skeleton"
                            and is_deepmimic_skeleton(m, files[m][:400]))
        if candidates:
            return candidates[0]
    raise ValueError("no DeepMimic skeleton file (skeleton/*.txt with \"Skeleton\") in its folder or above")


CALIBRATION_TOLERANCE_DEG = 15.0  # frame 0's limbs this close to a T-pose ...
CALIBRATION_JUMP_DEG = 20.0  # ... and some limb turning this much within 1/20 s: a converter's calibration start
CALIBRATION_DROP_S = 0.1  # what is dropped then: the T-pose and the converter's blend out of it


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


def drop_calibration_frame(motion: SourceMotion, jmap: JointMap) -> tuple[SourceMotion, int]:
    """The motion without a leading calibration T-pose (module docstring), and how many frames were dropped: when
    frame 0 has the arms horizontal (within 15 degrees), the upper arms out to opposite sides (within 30) and the
    legs straight down (within 15), in any facing, and some limb turns more than 20 degrees within 1/20 s (the
    cgspeed conversions blend from their inserted T-pose into the capture over ~5 frames at 120 fps), the first
    0.1 s go."""
    look = max(1, round(motion.fps / 20))
    drop = max(1, round(motion.fps * CALIBRATION_DROP_S))
    if motion.num_frames <= drop + 2:
        return motion, 0
    head = SourceMotion(motion.name, motion.joint_names, motion.parents, motion.translations[:look + 1],
                        motion.rotations[:look + 1], motion.fps, motion.tips)
    points = retarget(head, jmap, fps=motion.fps)[[0, look]]  # (2, J, 3), Y up
    names = jmap.skeleton.joint_names
    bones = np.stack([points[:, names.index(f"{side}_{b}")] - points[:, names.index(f"{side}_{a}")]
                      for side in ("left", "right")
                      for a, b in (("shoulder", "elbow"), ("elbow", "wrist"), ("hip", "knee"), ("knee", "ankle"))],
                     axis=1)  # (2, 8, 3): left arm (2), left leg (2), right arm (2), right leg (2)
    down = np.array([0.0, -1.0, 0.0])
    arms, legs = bones[0, [0, 1, 4, 5]], bones[0, [2, 3, 6, 7]]
    straight_out = (_angles(arms[0], -arms[2]) < 2 * CALIBRATION_TOLERANCE_DEG  # upper arms to opposite sides
                    and np.abs(90 - _angles(arms, np.broadcast_to(down, arms.shape))).max() < CALIBRATION_TOLERANCE_DEG)
    legs_down = _angles(legs, np.broadcast_to(down, legs.shape)).max() < CALIBRATION_TOLERANCE_DEG
    jump = _angles(bones[0], bones[1]).max() > CALIBRATION_JUMP_DEG
    if not (straight_out and legs_down and jump):
        return motion, 0
    return SourceMotion(motion.name, motion.joint_names, motion.parents, motion.translations[drop:],
                        motion.rotations[drop:], motion.fps, motion.tips), drop


def read_clip(member: str, kind: str, data: bytes, context: bytes | None = None) -> SourceMotion:
    """A clip of ``kind`` read into SourceMotion."""
    text = data.decode("utf-8", errors="replace")
    if kind == "bvh":
        motion = SourceMotion.from_bvh(parse_bvh(text, name=member), member)
    elif kind == "amc":
        assert context is not None
        motion = parse_amc(text, parse_asf(context.decode("utf-8", errors="replace"), member), member)
    elif kind == "deepmimic":
        assert context is not None
        motion = parse_motion(text, parse_skeleton(context.decode("utf-8", errors="replace"), member), member)
    else:
        raise ValueError(f"unknown clip kind {kind!r}")
    return motion
