"""Retarget any BVH skeleton onto a canonical skeleton (SMPL22) through a joint-name map.

Maps are JSON files, all kept in ``backend/data/maps/`` (one per source skeleton). A map gives, for every joint
of the target skeleton, either the name of a source joint or ``{"between": [A, B], "t": f}`` (a point a fraction
``f`` of the way from source joint A to B: how a missing joint, e.g. a third spine joint, is made). It also
states the source units (``units_per_metre``), the up axis ("Y" or "Z"), and which source joints it ``ignore``s
on purpose; any other unmapped source joint is reported by :func:`unmapped_joints`, never dropped silently.

The result is world joint positions in metres, Y up, resampled to the target fps (20); facing and the start
position are left to ``backend.motion.canonicalize_positions``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.data.bvh import Bvh, forward_kinematics, resample
from backend.skeleton import SKELETONS, Skeleton

MAPS_DIR = Path(__file__).with_name("maps")


@dataclass(frozen=True)
class JointMap:
    """A source skeleton -> canonical skeleton joint map (see the module docstring for the JSON format)."""

    name: str
    skeleton: Skeleton
    joints: dict[str, Any]  # target joint name -> source joint name | {"between": [a, b], "t": f}
    units_per_metre: float
    up_axis: str
    ignore: tuple[str, ...]
    source: str  # where the map was loaded from

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> JointMap:
        """Validate a map's JSON object; raises ValueError naming ``source`` and the problem."""
        try:
            skeleton = SKELETONS[data.get("skeleton", "smpl22")]
            joints = dict(data["joints"])
            jmap = cls(
                name=str(data["name"]), skeleton=skeleton, joints=joints,
                units_per_metre=float(data.get("units_per_metre", 1.0)), up_axis=str(data.get("up_axis", "Y")),
                ignore=tuple(data.get("ignore", ())), source=source,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"joint map {source}: missing or bad field ({exc!r})") from None
        missing = [n for n in skeleton.joint_names if n not in joints]
        extra = [n for n in joints if n not in skeleton.joint_names]
        if missing or extra:
            raise ValueError(f"joint map {source}: missing target joints {missing}, unknown target joints {extra}")
        if jmap.up_axis not in ("Y", "Z") or not jmap.units_per_metre > 0:
            raise ValueError(f"joint map {source}: up_axis must be 'Y' or 'Z' and units_per_metre > 0")
        for target, spec in joints.items():
            if not (isinstance(spec, str) or _valid_between(spec)):
                raise ValueError(f"joint map {source}: joint {target!r}: expected a name or "
                                 f"{{'between': [a, b], 't': 0..1}}, got {spec!r}")
        return jmap

    @property
    def source_joints(self) -> set[str]:
        """Every source joint name the map reads."""
        names: set[str] = set()
        for spec in self.joints.values():
            names.update([spec] if isinstance(spec, str) else spec["between"])
        return names


def _valid_between(spec: Any) -> bool:
    if not isinstance(spec, dict) or len(spec.get("between", ())) != 2:
        return False
    t = spec.get("t")
    return isinstance(t, (int, float)) and 0.0 <= t <= 1.0


def available_maps() -> list[str]:
    """Names of the shipped maps."""
    return sorted(p.stem for p in MAPS_DIR.glob("*.json"))


def load_map(name_or_file: str | Path) -> JointMap:
    """A shipped map by name (``bandai_namco``), or a JSON file path."""
    path = Path(name_or_file)
    if not path.suffix and (MAPS_DIR / f"{path.name}.json").is_file():
        path = MAPS_DIR / f"{path.name}.json"
    if not path.is_file():
        raise ValueError(f"joint map {str(name_or_file)!r} not found: give a file or one of {available_maps()}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"joint map {path}: not valid JSON ({exc})") from None
    return JointMap.from_json(data, str(path))


def find_map(joint_names: tuple[str, ...] | list[str]) -> JointMap:
    """The shipped map whose source joints all exist in ``joint_names``; ValueError if none does."""
    present = set(joint_names)
    for name in available_maps():
        jmap = load_map(name)
        if jmap.source_joints <= present:
            return jmap
    shown = ", ".join(list(joint_names)[:12]) + (" ..." if len(joint_names) > 12 else "")
    raise ValueError(
        f"unknown skeleton (joints: {shown}): no shipped joint map fits ({', '.join(available_maps())}); "
        f"write a map JSON (see {MAPS_DIR}) and pass it with --map"
    )


def unmapped_joints(bvh: Bvh, jmap: JointMap) -> list[str]:
    """Source joints the map neither reads nor explicitly ignores."""
    used = jmap.source_joints | set(jmap.ignore)
    return [n for n in bvh.joint_names if n not in used]


def retarget(bvh: Bvh, jmap: JointMap, fps: float | None = None) -> np.ndarray:
    """World positions (T, J, 3) of the map's target joints: metres, Y up, resampled to ``fps`` (default:
    the target skeleton's). Raises ValueError when the BVH lacks joints the map needs."""
    missing = sorted(jmap.source_joints - set(bvh.joint_names))
    if missing:
        raise ValueError(f"skeleton does not fit joint map {jmap.name!r}: missing source joints {missing}")
    trans, quats = bvh.local_transforms()
    trans, quats = resample(trans, quats, bvh.fps, fps or jmap.skeleton.fps)
    world = forward_kinematics(bvh.parents, trans, quats)
    index = {n: i for i, n in enumerate(bvh.joint_names)}
    columns = []
    for target in jmap.skeleton.joint_names:
        spec = jmap.joints[target]
        if isinstance(spec, str):
            columns.append(world[:, index[spec]])
        else:
            a, b = (world[:, index[n]] for n in spec["between"])
            columns.append(torch.lerp(a, b, float(spec["t"])))
    positions = torch.stack(columns, dim=1).numpy() / jmap.units_per_metre
    if jmap.up_axis == "Z":  # right-handed Z up -> right-handed Y up: (x, y, z) -> (x, z, -y)
        positions = np.stack([positions[..., 0], positions[..., 2], -positions[..., 1]], axis=-1)
    return positions
