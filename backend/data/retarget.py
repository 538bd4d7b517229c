"""Retarget any source skeleton (BVH, ASF/AMC, DeepMimic: ``backend.data.source_motion``) onto a canonical
skeleton (SMPL22) through a joint-name map.

Maps are JSON files, all kept in ``backend/data/maps/`` (one per source skeleton). A map gives, for every joint
of the target skeleton, either the name of a source joint or ``{"between": [A, B], "t": f}`` (a point a fraction
``f`` of the way from source joint A to B: how a missing joint, e.g. a third spine joint, is made). It also
states the source units (``units_per_metre``), the up axis ("Y" or "Z"), which source joints it ``ignore``s
on purpose (a list of names, or ``{reason: [names or fnmatch patterns]}``; any other unmapped source joint is
reported by :func:`unmapped_joints`, never dropped silently), and optionally ``tpose``: the source's standing
T-pose, see below.

Choosing a map (:func:`choose_map`): every shipped map whose source joints all exist in the clip is a candidate by
bone names; a candidate must also pass the rest-geometry check (:func:`geometry_problems`: in its T-pose the legs
hang below the hips, the head is above the pelvis, the left arm reaches out to +X and the right to -X, the feet
point forward, the standing height is a human's) and fit the canonical rest (every bone within 45 degrees). The
first that passes is used, and :func:`mapping_report` says what was mapped, what was dropped and why.

:func:`retarget` gives world joint positions; :func:`retarget_rotations` (what data preparation uses) gives the
canonical skeleton's rotations, twist included, with positions their forward kinematics. Both are in metres,
Y up, resampled to the target fps (20); facing and the start position are left to ``backend.motion``.

Rotation retargeting convention. The canonical world rotation of joint j is ``G_j(t) = W_s(t) * C_j``: ``W_s`` is
the world rotation of its source joint s (for a ``between`` joint, of A, whose bone carries the point), and
``C_j`` a constant fixed by the source's standing T-pose (the "reference"): in the reference the canonical joint's
world rotation is ``A_j``, the rotation that takes the canonical rest bone onto the source's reference bone (the
shortest arc for one child; for the pelvis and spine3, the frame of the middle child's bone exactly plus the
left-right line as well as it can, as the add-on aligns rests; an end joint takes its parent's), so
``C_j = W_ref_s^-1 * A_j``. Hence the canonical rest pose is the source's T-pose with each bone swung by the
shortest arc onto the canonical direction, and the twist of every bone about itself is the performer's relative
to that T-pose. The reference is the map's ``tpose``: for each source joint, where its local X, Y and Z axes
point in world axes ("+X", "-Z", ...; Y up, facing +Z, after the up-axis conversion) when the performer stands
in a T-pose (arms out along +-X, palms down, legs down, feet forward); joints it does not list keep their zero-pose
orientation, and a map without ``tpose`` says the source's zero pose is its T-pose (as BVH files written by
``backend.data.bvh.write_bvh`` are). Root travel: the canonical hips' midpoint follows the source's, scaled by
``backend.motion.leg_scale`` (the right leg's hip->knee->ankle ratio, HumanML3D's convention).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.data.bvh import Bvh, resample, world_transforms
from backend.data.source_motion import SourceMotion
from backend.motion import leg_scale
from backend.quaternion import matrix_to_quat, qinv, qmul, qnormalize, qrot, quat_to_matrix
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
    ignore: dict[str, tuple[str, ...]]  # reason -> source joint names or fnmatch patterns the map drops on purpose
    source: str  # where the map was loaded from
    tpose: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # source joint -> world axes of its X, Y, Z

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> JointMap:
        """Validate a map's JSON object; raises ValueError naming ``source`` and the problem."""
        try:
            skeleton = SKELETONS[data.get("skeleton", "smpl22")]
            joints = dict(data["joints"])
            jmap = cls(
                name=str(data["name"]), skeleton=skeleton, joints=joints,
                units_per_metre=float(data.get("units_per_metre", 1.0)), up_axis=str(data.get("up_axis", "Y")),
                ignore=_ignore_groups(data.get("ignore", ())), source=source,
                tpose={str(k): tuple(v) for k, v in data.get("tpose", {}).items()},
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
        for joint, axes in jmap.tpose.items():
            if len(axes) != 3 or any(a not in _AXIS for a in axes) or np.linalg.det(_axes_matrix(axes)) < 0.5:
                raise ValueError(f"joint map {source}: tpose of {joint!r} must name three world axes of a rotation "
                                 f"(e.g. [\"+Y\", \"-X\", \"+Z\"]), got {list(axes)!r}")
        return jmap

    @property
    def source_joints(self) -> set[str]:
        """Every source joint name the map reads."""
        names: set[str] = set()
        for spec in self.joints.values():
            names.update([spec] if isinstance(spec, str) else spec["between"])
        return names


    def ignored_because(self, joint: str) -> str | None:
        """Why the map drops ``joint`` on purpose, or None."""
        return next((reason for reason, patterns in self.ignore.items()
                     if any(fnmatch.fnmatchcase(joint, p) for p in patterns)), None)


def _ignore_groups(raw: Any) -> dict[str, tuple[str, ...]]:
    if isinstance(raw, dict):
        return {str(reason): tuple(str(n) for n in names) for reason, names in raw.items()}
    return {"ignored by the map": tuple(str(n) for n in raw)} if raw else {}


_AXIS = {f"{sign}{name}": sgn * np.eye(3)[k] for k, name in enumerate("XYZ") for sign, sgn in (("+", 1), ("-", -1))}


def _axes_matrix(axes: tuple[str, str, str]) -> np.ndarray:
    """The matrix whose columns are the named world axes."""
    return np.stack([_AXIS[a] for a in axes], axis=1)


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
    if "extends" in data:  # another shipped map, with these fields (and these target joints) replaced
        base = load_map(str(data["extends"]))
        joints = {**base.joints, **data.get("joints", {})}
        data = {"units_per_metre": base.units_per_metre, "up_axis": base.up_axis, "ignore": base.ignore,
                "tpose": base.tpose, "skeleton": base.skeleton.name, **data, "joints": joints}
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


Clip = Bvh | SourceMotion


def as_source(clip: Clip) -> SourceMotion:
    """A parsed clip as :class:`SourceMotion` (BVH End Sites become tips)."""
    return clip if isinstance(clip, SourceMotion) else SourceMotion.from_bvh(clip)


def unmapped_joints(clip: Clip, jmap: JointMap) -> list[str]:
    """Source joints the map neither reads nor explicitly ignores (tips are end points, not joints)."""
    tips = set(clip.tips) if isinstance(clip, SourceMotion) else set()
    return [n for n in clip.joint_names
            if n not in jmap.source_joints and n not in tips and jmap.ignored_because(n) is None]


def mapping_report(clip: Clip, jmap: JointMap, chosen_by: str) -> dict[str, Any]:
    """What a clip's map reads and drops: {map, chosen_by, mapped: {target: source}, dropped: {reason: [joints]}}."""
    src = as_source(clip)
    dropped: dict[str, list[str]] = {}
    for name in src.joint_names:
        if name in jmap.source_joints or name in src.tips:
            continue
        reason = jmap.ignored_because(name) or f"no counterpart in map {jmap.name!r} (not read, not ignored)"
        dropped.setdefault(reason, []).append(name)
    mapped = {t: spec if isinstance(spec, str) else f"{spec['t']:g} of {spec['between'][0]} -> {spec['between'][1]}"
              for t, spec in jmap.joints.items()}
    return {"map": jmap.name, "chosen_by": chosen_by, "mapped": mapped, "dropped": dropped}


HEIGHT_RANGE_M = (1.2, 2.3)  # floor to head joint of a standing adult in its T-pose, before any scaling


def geometry_problems(reference: np.ndarray, skeleton: Skeleton) -> list[str]:
    """What is not human about target joint positions (J, 3) in a map's T-pose (metres, Y up, facing +Z)."""
    p = dict(zip(skeleton.joint_names, np.asarray(reference)))
    problems = []
    for side in ("left", "right"):
        hip, knee, ankle = (p[f"{side}_{n}"][1] for n in ("hip", "knee", "ankle"))
        if not hip > knee > ankle:
            problems.append(f"the {side} leg does not hang below the hip (hip, knee, ankle heights "
                            f"{hip:.2f}, {knee:.2f}, {ankle:.2f} m)")
        if not p[f"{side}_foot"][2] > p[f"{side}_ankle"][2]:
            problems.append(f"the {side} foot does not point forward (+Z)")
    if not p["head"][1] > p["neck"][1] > p["pelvis"][1]:
        problems.append("the head is not above the neck and the neck not above the pelvis")
    for side, sign in (("left", 1), ("right", -1)):
        xs = [sign * p[f"{side}_{n}"][0] for n in ("collar", "shoulder", "elbow", "wrist")]
        if not xs[1] < xs[2] < xs[3]:
            problems.append(f"the {side} arm does not reach out to {'+' if sign > 0 else '-'}X")
    height = p["head"][1] - min(p["left_ankle"][1], p["right_ankle"][1])
    if not HEIGHT_RANGE_M[0] <= height <= HEIGHT_RANGE_M[1]:
        problems.append(f"standing height {height:.2f} m (ankle to head joint) is outside {HEIGHT_RANGE_M} m: "
                        "wrong units_per_metre?")
    return problems


def choose_map(clip: Clip) -> JointMap:
    """The first shipped map that fits the clip by bone names AND rest geometry (module docstring); ValueError
    saying why each candidate was refused when none fits."""
    src = as_source(clip)
    present = set(src.joint_names)
    refused = []
    for name in available_maps():
        jmap = load_map(name)
        if not jmap.source_joints <= present:
            continue
        try:
            reference = _reference(src, jmap)
            problems = geometry_problems((reference / jmap.units_per_metre).numpy(), jmap.skeleton)
            if not problems:
                _rest_alignment(reference, jmap)
                return jmap
            refused.append(f"{name}: {'; '.join(problems)}")
        except ValueError as exc:
            refused.append(f"{name}: {exc}")
    if refused:
        raise ValueError(f"the bone names fit {len(refused)} map(s) but the rest geometry does not: "
                         + " | ".join(refused))
    return find_map(src.joint_names)  # raises, naming the joints


def _source_motion(clip: Clip, jmap: JointMap, fps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Resampled world positions (T, Js, 3) in metres and world rotations (T, Js, 4) of the source joints, Y up."""
    bvh = as_source(clip)
    missing = sorted(jmap.source_joints - set(bvh.joint_names))
    if missing:
        raise ValueError(f"skeleton does not fit joint map {jmap.name!r}: missing source joints {missing}")
    trans, quats = bvh.local_transforms()
    trans, quats = resample(trans, quats, bvh.fps, fps or jmap.skeleton.fps)
    positions, rotations = world_transforms(bvh.parents, trans, quats)
    up = _to_y_up(jmap)
    return qrot(up.expand_as(rotations), positions / jmap.units_per_metre), qmul(up.expand_as(rotations), rotations)


def _to_y_up(jmap: JointMap) -> torch.Tensor:
    """The rotation from the source's world axes to Y up: identity, or (x, y, z) -> (x, z, -y) for Z up."""
    half = np.sqrt(0.5)
    return torch.tensor([1.0, 0.0, 0.0, 0.0] if jmap.up_axis == "Y" else [half, -half, 0.0, 0.0], dtype=torch.float64)


def _target_points(points: torch.Tensor, bvh: Clip, jmap: JointMap) -> torch.Tensor:
    """The map's target joints (..., J, 3) from source joint positions (..., Js, 3)."""
    index = {n: i for i, n in enumerate(bvh.joint_names)}
    columns = []
    for target in jmap.skeleton.joint_names:
        spec = jmap.joints[target]
        if isinstance(spec, str):
            columns.append(points[..., index[spec], :])
        else:
            a, b = (points[..., index[n], :] for n in spec["between"])
            columns.append(torch.lerp(a, b, float(spec["t"])))
    return torch.stack(columns, dim=-2)


def retarget(bvh: Clip, jmap: JointMap, fps: float | None = None) -> np.ndarray:
    """World positions (T, J, 3) of the map's target joints: metres, Y up, resampled to ``fps`` (default:
    the target skeleton's). Raises ValueError when the clip lacks joints the map needs."""
    src = as_source(bvh)
    return _target_points(_source_motion(src, jmap, fps)[0], src, jmap).numpy()


def reference_rotations(bvh: Clip, jmap: JointMap) -> np.ndarray:
    """World rotations (Js, 4) w, x, y, z of the source joints in the map's standing T-pose (Y up, facing +Z);
    a tip turns with its joint."""
    src = as_source(bvh)
    unknown = sorted(set(jmap.tpose) - set(src.joint_names))
    if unknown:
        raise ValueError(f"joint map {jmap.name!r}: tpose names joints the skeleton lacks: {unknown}")
    zero = quat_to_matrix(_to_y_up(jmap)).numpy()  # a joint's zero-pose orientation, seen Y up
    matrices: list[np.ndarray] = []
    for name, parent in zip(src.joint_names, src.parents):
        if name in src.tips:
            matrices.append(matrices[parent])
        else:
            matrices.append(_axes_matrix(jmap.tpose[name]) if name in jmap.tpose else zero)
    return matrix_to_quat(torch.from_numpy(np.stack(matrices))).numpy()


def _frame(main: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns: along ``main``, then ``lateral`` made perpendicular to it, then their cross product."""
    e1 = main / torch.linalg.norm(main)
    e2 = lateral - torch.dot(lateral, e1) * e1
    e2 = e2 / torch.linalg.norm(e2)
    return torch.stack([e1, e2, torch.linalg.cross(e1, e2)], dim=1)


MAX_REFERENCE_ANGLE = 45.0  # degrees between a canonical rest bone and the source's T-pose bone


def _rest_alignment(reference: torch.Tensor, jmap: JointMap) -> torch.Tensor:
    """A_j (J, 4): the world rotation of each canonical joint in the source's reference pose (module docstring);
    ``reference`` holds the target joints' positions (J, 3) in that pose."""
    skeleton = jmap.skeleton
    rest = torch.from_numpy(skeleton.rest_offsets)
    align: list[torch.Tensor] = []
    for j, name in enumerate(skeleton.joint_names):
        kids = skeleton.children[j]
        bones = {c: reference[c] - reference[j] for c in kids}
        short = [skeleton.joint_names[c] for c, v in bones.items() if torch.linalg.norm(v) < 1e-6]
        if short:
            raise ValueError(f"joint map {jmap.name!r}: {name!r} and {short} fall on the same source point")
        if len(kids) == 1:
            (c,) = kids
            a, b = rest[c] / torch.linalg.norm(rest[c]), bones[c] / torch.linalg.norm(bones[c])
            angle = float(torch.rad2deg(torch.arccos(torch.dot(a, b).clamp(-1.0, 1.0))))
            if angle > MAX_REFERENCE_ANGLE:
                raise ValueError(
                    f"joint map {jmap.name!r}: in its T-pose the bone {name} -> {skeleton.joint_names[c]} is "
                    f"{angle:.0f} degrees from the canonical rest (more than {MAX_REFERENCE_ANGLE:.0f}); "
                    "give the map a 'tpose' that stands the source skeleton in a T-pose")
            axis = torch.linalg.cross(a, b)
            align.append(qnormalize(torch.cat([(1.0 + torch.dot(a, b))[None], axis])))
        elif kids:
            sides = {s: [c for c in kids if skeleton.joint_names[c].startswith(f"{s}_")] for s in ("left", "right")}
            main = [c for c in kids if c not in sides["left"] + sides["right"]]
            if not (len(main) == len(sides["left"]) == len(sides["right"]) == 1):
                raise ValueError(f"joint {name!r} of {skeleton.name!r}: expected one middle, one left and one "
                                 "right child to align its rest")
            (m,), (left,), (right,) = main, sides["left"], sides["right"]
            if torch.linalg.norm(bones[left] - bones[right]) < 1e-6:
                raise ValueError(f"joint map {jmap.name!r}: the left and right children of {name!r} fall on the "
                                 "same source point (no left-right line to align its rest)")
            source = _frame(bones[m], bones[left] - bones[right])
            canonical = _frame(rest[m], rest[left] - rest[right])
            align.append(matrix_to_quat(source @ canonical.T))
        else:
            align.append(align[skeleton.parents[j]])
    return torch.stack(align)


def reference_points(clip: Clip, jmap: JointMap) -> torch.Tensor:
    """The map's target joints (J, 3) in the source's T-pose (metres, Y up): the T-pose world rotations over the
    clip's own bone vectors at its first frame (offsets or channels)."""
    return _reference(as_source(clip), jmap) / jmap.units_per_metre


def _reference(src: SourceMotion, jmap: JointMap) -> torch.Tensor:
    """:func:`reference_points` in the source's units."""
    ref_world = torch.from_numpy(reference_rotations(src, jmap))
    trans = src.local_transforms()[0][0]
    points = [trans[0]]
    for j, p in enumerate(src.parents[1:], start=1):  # one root, parents before children
        points.append(points[p] + qrot(ref_world[p], trans[j]))
    return _target_points(torch.stack(points), src, jmap)


def retarget_rotations(bvh: Clip, jmap: JointMap, fps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Root translation (T, 3) and local rotations (T, J, 4) w, x, y, z of the map's canonical skeleton over its
    rest pose, twist included (module docstring): metres, Y up, resampled to ``fps`` (default: the skeleton's).

    Forward kinematics of the result (``backend.motion.forward_kinematics``) gives the canonical positions: each
    bone points where the source's bone points, with the canonical length, and the pelvis and chest are the
    canonical skeleton's rigid ones. Raises ValueError when the BVH lacks joints the map needs or the map's
    T-pose does not fit the canonical rest.
    """
    skeleton = jmap.skeleton
    if skeleton.rest_offsets is None:
        raise ValueError(f"skeleton {skeleton.name!r} has no rest pose to retarget rotations onto")
    bvh = as_source(bvh)
    positions, rotations = _source_motion(bvh, jmap, fps)
    index = {n: i for i, n in enumerate(bvh.joint_names)}
    ref_world = torch.from_numpy(reference_rotations(bvh, jmap))
    reference = _reference(bvh, jmap)
    carrier = [index[spec if isinstance(spec, str) else spec["between"][0]]
               for spec in (jmap.joints[n] for n in skeleton.joint_names)]
    offset = qmul(qinv(ref_world[carrier]), _rest_alignment(reference, jmap))  # C_j
    world = qmul(rotations[:, carrier], offset.expand((len(rotations), -1, -1)))
    parents = list(skeleton.parents)
    local = torch.cat([world[:, :1], qmul(qinv(world[:, [max(p, 0) for p in parents[1:]]]), world[:, 1:])], dim=1)

    points = _target_points(positions, bvh, jmap)
    rest = torch.from_numpy(skeleton.rest_offsets)
    left, right = (skeleton.joint_names.index(f"{s}_hip") for s in ("left", "right"))
    hips = (points[:, left] + points[:, right]) / 2 * leg_scale(points, skeleton)
    root = hips - qrot(world[:, 0], ((rest[left] + rest[right]) / 2).expand_as(hips))
    return root.numpy(), local.numpy()
