"""Acclaim ASF (skeleton) / AMC (motion) files, as CMU and HDM05 store mocap, read into ``SourceMotion``.

Conventions (the Acclaim format as the CMU tools and the common ASF/AMC parsers read it):
- ``:units length L``: a length value v is v / L inches (CMU and HDM05: L = 0.45); the reader converts to metres,
  root translation included. ``angle deg`` (the default) or ``rad``.
- Each bone has a ``direction`` (unit vector in the global frame of the rest pose), a ``length``, and an ``axis
  ax ay az ORDER``: the bone's local frame C in the global rest frame, the rotations applied in ORDER (``XYZ``:
  first about X, then Y, then Z, fixed axes; C = Rz Ry Rx). Its ``dof`` (e.g. ``rx ry rz``) name the AMC values
  of the bone in that order; the motion rotation M applies them in the listed order (M = Rz Ry Rx for
  ``rx ry rz``). The bone's rotation in the global rest frame is L = C M C^-1, and its world rotation is
  W = W_parent L; the bone's far end is at its start + W (length * direction). The root: ``order`` names its AMC
  channels (TX TY TZ RX RY RZ), ``orientation`` its C, ``position`` its rest offset.
- The joint tree: ``root``, then one joint per bone at the bone's START (its parent's end), rotating by L, so the
  zero pose is the ASF rest pose with every local frame aligned to the world (no ``tpose`` needed when that rest
  pose is a T-pose, as CMU's and HDM05's are: arms out along +-X, legs down, facing +Z, Y up). The far end of each
  leaf bone is a tip named ``<bone>_End``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from backend.data.source_motion import SourceMotion
from backend.quaternion import matrix_to_quat

METRES_PER_INCH = 0.0254
DEFAULT_FPS = 120.0  # AMC files do not store a rate; CMU and HDM05 capture at 120 fps


class AsfAmcError(ValueError):
    """An ASF or AMC file that cannot be read (the message names the file and what is wrong)."""


@dataclass(frozen=True)
class AsfBone:
    name: str
    direction: np.ndarray  # (3,) unit, global rest frame
    length: float  # metres
    axis: np.ndarray  # (3, 3) C
    dofs: tuple[str, ...]  # e.g. ("rx", "ry", "rz")


@dataclass(frozen=True)
class AsfSkeleton:
    """A parsed ASF file; ``parents`` maps each bone to its parent bone or ``root``."""

    name: str
    bones: dict[str, AsfBone]
    parents: dict[str, str]
    root_order: tuple[str, ...]  # AMC channels of the root, e.g. ("TX", "TY", "TZ", "RX", "RY", "RZ")
    root_axis: np.ndarray  # (3, 3) C of the root
    root_position: np.ndarray  # (3,) metres
    metres_per_unit: float
    radians: bool


def _rotation(angles: list[float] | np.ndarray, order: str, radians: bool) -> np.ndarray:
    """Fixed-axis rotations about ``order``'s axes, applied in that order: R = R_last ... R_first."""
    matrix = np.eye(3)
    for angle, axis in zip(angles, order.upper()):
        a = float(angle) if radians else np.radians(float(angle))
        c, s = np.cos(a), np.sin(a)
        k = "XYZ".index(axis)
        r = np.eye(3)
        i, j = [n for n in range(3) if n != k]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        if k == 1:  # about Y: z -> x is positive
            r[i, j], r[j, i] = s, -s
        matrix = r @ matrix
    return matrix


def parse_asf(text: str, name: str = "<asf>") -> AsfSkeleton:
    """Parse ASF text. Raises :class:`AsfAmcError` naming ``name`` and the problem."""
    sections = re.split(r"^\s*:(\w+)", text, flags=re.MULTILINE)
    blocks = {sections[k].lower(): sections[k + 1] for k in range(1, len(sections) - 1, 2)}
    for needed in ("root", "bonedata", "hierarchy"):
        if needed not in blocks:
            raise AsfAmcError(f"{name}: no :{needed} section (not an ASF skeleton file?)")
    units = dict(_pairs(blocks.get("units", "")))
    try:
        metres_per_unit = METRES_PER_INCH / float(units.get("length", "1"))
        radians = units.get("angle", "deg").lower().startswith("rad")
        root = dict(_pairs(blocks["root"]))
        root_order = tuple(root.get("order", "TX TY TZ RX RY RZ").upper().split())
        root_axis_order = root.get("axis", "XYZ").upper()
        root_axis = _rotation([float(v) for v in root.get("orientation", "0 0 0").split()], root_axis_order, radians)
        root_position = np.array([float(v) for v in root.get("position", "0 0 0").split()]) * metres_per_unit
        bones: dict[str, AsfBone] = {}
        for block in re.findall(r"begin(.*?)end", blocks["bonedata"], flags=re.DOTALL):
            fields = dict(_pairs(block))
            axis = fields["axis"].split()
            direction = np.array([float(v) for v in fields["direction"].split()[:3]])
            bone = AsfBone(
                name=fields["name"], direction=direction / max(np.linalg.norm(direction), 1e-12),
                length=float(fields["length"]) * metres_per_unit,
                axis=_rotation([float(v) for v in axis[:3]], axis[3] if len(axis) > 3 else "XYZ", radians),
                dofs=tuple(fields.get("dof", "").lower().split()),
            )
            bad = [d for d in bone.dofs if d not in ("rx", "ry", "rz")]
            if bad:
                raise AsfAmcError(f"{name}: bone {bone.name!r}: unsupported dof {bad} (only rx, ry, rz)")
            bones[bone.name] = bone
    except (KeyError, ValueError, IndexError) as exc:
        if isinstance(exc, AsfAmcError):
            raise
        raise AsfAmcError(f"{name}: malformed ASF ({exc!r})") from None
    parents: dict[str, str] = {}
    hierarchy = blocks["hierarchy"].split("begin", 1)[-1].split("end", 1)[0]
    for line in hierarchy.splitlines():
        if not line.split():
            continue
        parent, *children = line.split()
        for child in children:
            if child not in bones or (parent != "root" and parent not in bones):
                raise AsfAmcError(f"{name}: hierarchy names unknown bone {child if child not in bones else parent!r}")
            parents[child] = parent
    orphans = sorted(set(bones) - set(parents))
    if orphans or not bones:
        raise AsfAmcError(f"{name}: bones missing from the hierarchy: {orphans}" if orphans else f"{name}: no bones")
    return AsfSkeleton(name, bones, parents, root_order, root_axis, root_position, metres_per_unit, radians)


def _pairs(block: str) -> list[tuple[str, str]]:
    """(keyword, rest of line) for each line of a section."""
    out = []
    for line in block.splitlines():
        words = line.strip().split(None, 1)
        if words and not words[0].startswith("#"):
            out.append((words[0].lower(), words[1] if len(words) > 1 else ""))
    return out


def parse_amc(text: str, skeleton: AsfSkeleton, name: str = "<amc>", fps: float = DEFAULT_FPS) -> SourceMotion:
    """Parse AMC text over its ASF skeleton into local transforms (module docstring), metres, Y up as in the file."""
    frames: list[dict[str, list[float]]] = []
    try:
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ":")):
                continue
            if line.isdigit():
                frames.append({})
                continue
            if not frames:
                raise AsfAmcError(f"{name}: values before the first frame number")
            bone, *values = line.split()
            frames[-1][bone] = [float(v) for v in values]
    except ValueError as exc:
        if isinstance(exc, AsfAmcError):
            raise
        raise AsfAmcError(f"{name}: non-numeric motion data ({exc})") from None
    if not frames:
        raise AsfAmcError(f"{name}: no frames (an empty or truncated AMC file)")

    order = _joint_order(skeleton)
    names = ["root", *order]
    index = {n: k for k, n in enumerate(names)}
    t, j = len(frames), len(names)
    trans = np.zeros((t, j, 3))
    mats = np.tile(np.eye(3), (t, j, 1, 1))
    for f, values in enumerate(frames):
        root = values.get("root")
        if root is None or len(root) != len(skeleton.root_order):
            raise AsfAmcError(f"{name}: frame {f + 1}: root needs {len(skeleton.root_order)} values")
        channels = dict(zip(skeleton.root_order, root))
        trans[f, 0] = skeleton.root_position + np.array([channels.get(a, 0.0) for a in ("TX", "TY", "TZ")]) \
            * skeleton.metres_per_unit
        rot_axes = "".join(c[1] for c in skeleton.root_order if c.startswith("R"))
        m = _rotation([channels[f"R{a}"] for a in rot_axes], rot_axes, skeleton.radians)
        mats[f, 0] = skeleton.root_axis @ m @ skeleton.root_axis.T
        for bone_name in order:
            bone = skeleton.bones[bone_name]
            if bone.dofs:
                got = values.get(bone_name)
                if got is None or len(got) != len(bone.dofs):
                    raise AsfAmcError(f"{name}: frame {f + 1}: bone {bone_name!r} needs {len(bone.dofs)} values, "
                                      f"got {got}")
                m = _rotation(got, "".join(d[1] for d in bone.dofs), skeleton.radians)
                mats[f, index[bone_name]] = bone.axis @ m @ bone.axis.T
    parents = [-1]
    for bone_name in order:
        parent = skeleton.parents[bone_name]
        parents.append(index[parent])
        if parent != "root":
            pb = skeleton.bones[parent]
            trans[:, index[bone_name]] = pb.direction * pb.length
    tips = [b for b in order if b not in skeleton.parents.values()]
    for tip in tips:
        names.append(f"{tip}_End")
        parents.append(index[tip])
    tip_trans = np.stack([skeleton.bones[b].direction * skeleton.bones[b].length for b in tips])
    trans = np.concatenate([trans, np.broadcast_to(tip_trans, (t, len(tips), 3))], axis=1)
    mats = np.concatenate([mats, np.tile(np.eye(3), (t, len(tips), 1, 1))], axis=1)
    quats = matrix_to_quat(torch.from_numpy(mats))
    return SourceMotion(name, tuple(names), tuple(parents), torch.from_numpy(trans), quats, fps,
                        tuple(f"{b}_End" for b in tips))


def _joint_order(skeleton: AsfSkeleton) -> list[str]:
    """Bones with every parent before its children (depth first from the root, in hierarchy order)."""
    children: dict[str, list[str]] = {}
    for bone, parent in skeleton.parents.items():
        children.setdefault(parent, []).append(bone)
    order: list[str] = []
    stack = list(reversed(children.get("root", [])))
    while stack:
        bone = stack.pop()
        order.append(bone)
        stack.extend(reversed(children.get(bone, [])))
    return order
