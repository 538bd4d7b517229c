"""Which files of a source are motion clips, what else each needs, and reading any of them into ``SourceMotion``.

Formats: BVH (``.bvh``), Acclaim AMC (``.amc``, over the ASF skeleton in its folder: ``PREFIX.asf`` where the
clip is ``PREFIX_...amc``, or the folder's only ``.asf``) and DeepMimic motion JSON (a ``.txt``/``.json`` holding
``"Frames"``, over the nearest ``skeleton/*.txt`` holding ``"Skeleton"`` in its folder or a folder above).

BVH converters often put a calibration T-pose in frame 0 (every rotation exactly zero, e.g. the cgspeed CMU
conversions, followed by a jump to the first captured pose); such a frame is dropped and the clip says so.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from backend.data.asf_amc import parse_amc, parse_asf
from backend.data.bvh import parse_bvh
from backend.data.deepmimic import parse_motion, parse_skeleton
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


def drop_calibration_frame(motion: SourceMotion) -> tuple[SourceMotion, bool]:
    """The motion without a leading all-zero-rotation T-pose frame (module docstring), and whether one was dropped."""
    if motion.num_frames < 3:
        return motion, False
    still = (motion.rotations[:2, :, 1:].abs() < 1e-9).flatten(1).all(dim=1)  # every rotation the identity
    if not still[0] or still[1]:
        return motion, False
    return SourceMotion(motion.name, motion.joint_names, motion.parents, motion.translations[1:],
                        motion.rotations[1:], motion.fps, motion.tips), True


def read_clip(member: str, kind: str, data: bytes, context: bytes | None = None) -> tuple[SourceMotion, list[str]]:
    """A clip of ``kind`` read into SourceMotion, and notes on what was changed while reading."""
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
    motion, dropped = drop_calibration_frame(motion)
    return motion, (["dropped frame 0: a calibration T-pose (every rotation zero)"] if dropped else [])
