"""DeepMimic motion JSON (``{"Loop": ..., "Frames": [[dt, root xyz, root quat, joint rotations...], ...]}``) over
its skeleton file (``humanoid3d.txt``: ``{"Skeleton": {"Joints": [...]}, "BodyDefs": [...]}``), read into
``SourceMotion``.

Conventions (DeepMimic's): metres, Y up, the character facing +X with its right side on +Z in the zero pose,
arms hanging down. A frame is ``dt`` (seconds to the next frame), the root position (x, y, z), the root rotation
(w, x, y, z), then every non-root joint in skeleton order: a ``spherical`` joint as a quaternion (w, x, y, z), a
``revolute`` joint (knees, elbows) as one angle in radians about its local Z axis, a ``fixed`` joint as nothing.
A joint's translation from its parent is its ``Attach`` point, its rest rotation ``AttachTheta`` (XYZ Euler).

The skeleton has no toes, head or collar joints; the reader adds them as tips fixed to their body (so maps can
place SMPL joints there): ``<side>_toe`` at the front bottom edge of the foot box, ``head_top`` at the centre of
the head sphere, ``<side>_collar`` on the chest 0.07 m from the midline at the shoulders' depth, 0.02 m below
them. Tips never move against their joint.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from backend.data.source_motion import SourceMotion
from backend.quaternion import matrix_to_quat, qmul, qnormalize

TOLERANCE_DT = 1e-3  # seconds: frames must share one dt within this


class DeepMimicError(ValueError):
    """A DeepMimic skeleton or motion file that cannot be read (the message names the file and the problem)."""


def _euler_xyz(theta: tuple[float, float, float]) -> np.ndarray:
    cx, cy, cz = np.cos(theta)
    sx, sy, sz = np.sin(theta)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def parse_skeleton(text: str, name: str = "<skeleton>") -> dict[str, Any]:
    """The joints of a DeepMimic skeleton file: {names, parents, types, attach (J, 3), rest (J, 4), tips}."""
    try:
        data = json.loads(text)
        joints = sorted(data["Skeleton"]["Joints"], key=lambda j: int(j["ID"]))
        bodies = {b["Name"]: b for b in data.get("BodyDefs", [])}
        names = [str(j["Name"]) for j in joints]
        parents = [int(j["Parent"]) for j in joints]
        types = [str(j["Type"]).lower() for j in joints]
        attach = np.array([[float(j[f"Attach{a}"]) for a in "XYZ"] for j in joints])
        rest = [matrix_to_quat(torch.from_numpy(_euler_xyz(tuple(float(j.get(f"AttachTheta{a}", 0.0))
                                                                     for a in "XYZ"))))
                for j in joints]
        foot = bodies["right_ankle"]
        shoulder = attach[names.index("right_shoulder")]
        head = bodies["neck"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DeepMimicError(f"{name}: not a DeepMimic humanoid skeleton file ({exc!r})") from None
    if parents[0] != -1 or any(p >= k for k, p in enumerate(parents)):
        raise DeepMimicError(f"{name}: joints must be listed root first, parents before children")
    bad = sorted({t for t in types[1:] if t not in ("spherical", "revolute", "fixed")})
    if bad:
        raise DeepMimicError(f"{name}: unsupported joint types {bad}")
    toe = np.array([float(foot["AttachX"]) + float(foot["Param0"]) / 2,
                    float(foot["AttachY"]) - float(foot["Param1"]) / 2, 0.0])
    tips = {f"{side}_toe": (f"{side}_ankle", toe) for side in ("left", "right")}
    tips["head_top"] = ("neck", np.array([float(head["AttachX"]), float(head["AttachY"]), float(head["AttachZ"])]))
    for side, sign in (("right", 1.0), ("left", -1.0)):
        tips[f"{side}_collar"] = ("chest", np.array([shoulder[0], shoulder[1] - 0.02, sign * 0.07]))
    return {"names": names, "parents": parents, "types": types, "attach": attach,
            "rest": torch.stack(rest), "tips": tips}


def parse_motion(text: str, skeleton: dict[str, Any], name: str = "<motion>") -> SourceMotion:
    """Parse a DeepMimic motion over its parsed skeleton (module docstring)."""
    try:
        frames = np.asarray(json.loads(text)["Frames"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise DeepMimicError(f"{name}: not a DeepMimic motion file ({exc!r})") from None
    types = skeleton["types"]
    width = 1 + 3 + 4 + sum({"spherical": 4, "revolute": 1, "fixed": 0}[t] for t in types[1:])
    if frames.ndim != 2 or frames.shape[0] < 1 or frames.shape[1] != width:
        raise DeepMimicError(f"{name}: expected frames of {width} numbers for this skeleton, got shape "
                             f"{frames.shape}")
    if not np.isfinite(frames).all():
        raise DeepMimicError(f"{name}: frames hold NaN or infinite values")
    dt = frames[:-1, 0] if len(frames) > 1 else frames[:, 0]
    if not (dt > 0).all() or np.ptp(dt) > TOLERANCE_DT:
        raise DeepMimicError(f"{name}: frame durations must be one positive dt, got {dt.min():g}..{dt.max():g} s")
    t = frames.shape[0]
    j = len(types)
    data = torch.from_numpy(frames)
    quats = torch.zeros(t, j, 4, dtype=torch.float64)
    quats[..., 0] = 1.0
    quats[:, 0] = data[:, 4:8]
    col = 8
    for k, kind in enumerate(types[1:], start=1):
        if kind == "spherical":
            quats[:, k] = data[:, col:col + 4]
            col += 4
        elif kind == "revolute":
            half = data[:, col] / 2
            quats[:, k, 0], quats[:, k, 3] = torch.cos(half), torch.sin(half)
            col += 1
    quats = qnormalize(qmul(skeleton["rest"].expand(t, -1, -1), quats))
    trans = torch.from_numpy(np.broadcast_to(skeleton["attach"], (t, j, 3)).copy())
    trans[:, 0] = data[:, 1:4]
    names, parents = list(skeleton["names"]), list(skeleton["parents"])
    tips = skeleton["tips"]
    for tip, (joint, _) in tips.items():
        names.append(tip)
        parents.append(names.index(joint))
    tip_trans = torch.from_numpy(np.stack([offset for _, offset in tips.values()])).expand(t, -1, -1)
    identity = torch.zeros(t, len(tips), 4, dtype=torch.float64)
    identity[..., 0] = 1.0
    return SourceMotion(name, tuple(names), tuple(parents), torch.cat([trans, tip_trans], dim=1),
                        torch.cat([quats, identity], dim=1), round(1.0 / float(dt.mean()), 3), tuple(tips))
