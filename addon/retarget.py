"""Retargeting canonical-skeleton motion onto any armature: bone-map presets, detection, per-bone rotations.

No UI code, no bpy import: the armature is read through the objects passed in (`TargetRig.from_armature`).
Source motion: root translation (T, 3) metres and local rotations (T, J, 4) w,x,y,z of a `CanonicalSkeleton`
(Y up, facing +Z). For every mapped target bone the pose rotation is chosen so that its armature-space
orientation change from its own rest pose equals the source joint's world rotation, after a per-bone rest
alignment (the rotation taking the target bone's rest direction(s) onto the source's), so T-pose, A-pose, a BVH
zero pose lying along an axis and any bone roll give the same world motion. Rigs keyed through controls (Rigify)
take the joints' rest geometry from other bones (`BoneMap.geometry`). Root motion is scaled by the right-leg
convention of `canonical.ROOT_SCALE_LEG`; planted feet are held by leg IK (`footlock`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from . import footlock, rigify
from .canonical import ROOT_SCALE_LEG, SMPL22_BUILTIN, SMPL22_NAMES, CanonicalSkeleton

# Source (Y up, facing +Z, left = +X) to Blender (Z up, facing -Y, left = +X): +90 degrees about X.
SOURCE_TO_BLENDER = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])

_SIDES = ("left", "right")


def _sided(table: Mapping[str, str], left: str, right: str) -> dict[str, str]:
    """Expand {"hip": "{s}UpLeg"} into left_/right_ entries with the preset's side spellings."""
    out = {}
    for joint, pattern in table.items():
        for side, spelled in zip(_SIDES, (left, right)):
            out[f"{side}_{joint}"] = pattern.format(s=spelled)
    return out


def _rigify(prefix: str) -> dict[str, str]:
    spine = {"pelvis": "spine", "spine1": "spine.001", "spine2": "spine.002", "spine3": "spine.003",
             "neck": "spine.004", "head": "spine.006"}  # fmt: skip
    limbs = _sided({"hip": "thigh.{s}", "knee": "shin.{s}", "ankle": "foot.{s}", "foot": "toe.{s}",
                    "collar": "shoulder.{s}", "shoulder": "upper_arm.{s}", "elbow": "forearm.{s}",
                    "wrist": "hand.{s}"}, "L", "R")  # fmt: skip
    return {joint: prefix + bone for joint, bone in {**spine, **limbs}.items()}


_UNREAL_LIMBS = _sided({"hip": "thigh_{s}", "knee": "calf_{s}", "ankle": "foot_{s}", "foot": "ball_{s}",
                        "collar": "clavicle_{s}", "shoulder": "upperarm_{s}", "elbow": "lowerarm_{s}",
                        "wrist": "hand_{s}"}, "l", "r")  # fmt: skip

# canonical joint name -> target bone name. Names are matched ignoring case and any "namespace:" prefix.
# fmt: off
PRESETS: dict[str, dict[str, str]] = {
    "SMPL": {name: name for name in SMPL22_NAMES},
    "MIXAMO": {
        "pelvis": "Hips", "spine1": "Spine", "spine2": "Spine1", "spine3": "Spine2", "neck": "Neck",
        "head": "Head",
        **_sided({"hip": "{s}UpLeg", "knee": "{s}Leg", "ankle": "{s}Foot", "foot": "{s}ToeBase",
                  "collar": "{s}Shoulder", "shoulder": "{s}Arm", "elbow": "{s}ForeArm", "wrist": "{s}Hand"},
                 "Left", "Right"),
    },
    # generated Rigify rigs: key the FK controls (rest geometry from the ORG- bones, see rigify.py); before the
    # DEF-/ORG- maps, which also map every joint of such a rig but move nothing visible
    "RIGIFY": dict(rigify.CONTROLS),
    "RIGIFY_DEF": _rigify("DEF-"),
    "RIGIFY_ORG": _rigify("ORG-"),
    "RIGIFY_META": _rigify(""),
    # UE5 before UE4: on a UE5 rig both map every joint and the first wins; a UE4 rig lacks spine_05
    "UNREAL5": {"pelvis": "pelvis", "spine1": "spine_01", "spine2": "spine_03", "spine3": "spine_05",
                "neck": "neck_01", "head": "head", **_UNREAL_LIMBS},
    "UNREAL": {"pelvis": "pelvis", "spine1": "spine_01", "spine2": "spine_02", "spine3": "spine_03",
               "neck": "neck_01", "head": "head", **_UNREAL_LIMBS},
    "BANDAI": {
        "pelvis": "Hips", "spine1": "Spine", "spine3": "Chest", "neck": "Neck", "head": "Head",
        **_sided({"hip": "UpperLeg_{s}", "knee": "LowerLeg_{s}", "ankle": "Foot_{s}", "foot": "Toes_{s}",
                  "collar": "Shoulder_{s}", "shoulder": "UpperArm_{s}", "elbow": "LowerArm_{s}",
                  "wrist": "Hand_{s}"}, "L", "R"),
    },
}
# fmt: on
PRESET_LABELS = {
    "AUTO": "Auto-detect",
    "SMPL": "Canonical (SMPL)",
    "MIXAMO": "Mixamo",
    "RIGIFY": "Rigify (FK controls)",
    "RIGIFY_DEF": "Rigify (DEF- bones)",
    "RIGIFY_ORG": "Rigify (ORG- bones)",
    "RIGIFY_META": "Rigify metarig",
    "UNREAL5": "Unreal Mannequin (UE5)",
    "UNREAL": "Unreal Mannequin (UE4)",
    "BANDAI": "Bandai-Namco / BVH",
}

# Without these a retarget would leave whole limbs behind: refuse rather than produce a broken action.
REQUIRED_JOINTS = tuple(
    ["pelvis", "head"]
    + [f"{s}_{j}" for j in ("hip", "knee", "ankle", "shoulder", "elbow", "wrist") for s in _SIDES]
)


class UnmappableArmatureError(ValueError):
    """The armature lacks bones for required canonical joints; `missing` names them."""

    def __init__(self, armature: str, preset: str, missing: Iterable[str], bones: Iterable[str]) -> None:
        self.missing = tuple(missing)
        bones = list(bones)
        shown = ", ".join(bones[:12]) + (f", ... ({len(bones)} bones)" if len(bones) > 12 else "")
        super().__init__(
            f"Armature '{armature}' cannot be retargeted with the {PRESET_LABELS.get(preset, preset)} map: "
            f"no bone for {', '.join(self.missing)}. Its bones: {shown or 'none'}. "
            "Pick another bone-map preset or rename the bones."
        )


def _normalise(name: str) -> str:
    return name.rsplit(":", 1)[-1].strip().lower()


@dataclass(frozen=True)
class BoneMap:
    """Which target bone is keyed for each canonical joint, from which preset; `missing` joints have no bone.

    Rigs whose keyed bones are controls away from the anatomy (Rigify) also name, per joint, the `geometry` bone
    whose rest head is the joint (default: the keyed bone itself), the `root` bone keyed with the root location
    (default: the pelvis's), the `anchor` joint whose head the root bone carries, `still` bones keyed at rest and
    constant `switches` (data path -> value).
    """

    preset: str
    bones: dict[str, str]
    missing: tuple[str, ...] = field(default=())
    geometry: dict[str, str] = field(default_factory=dict)
    root: str = ""
    anchor: str = "pelvis"
    still: tuple[str, ...] = field(default=())
    switches: dict[str, float] = field(default_factory=dict)

    def require(self, armature: str, bone_names: Iterable[str]) -> BoneMap:
        """Raise UnmappableArmatureError naming the required joints that found no bone; return self."""
        absent = [j for j in REQUIRED_JOINTS if j not in self.bones]
        if absent:
            raise UnmappableArmatureError(armature, self.preset, absent, bone_names)
        return self

    def geometry_bone(self, joint: str) -> str:
        """The bone whose rest head is this joint."""
        return self.geometry.get(joint, self.bones[joint])

    def warnings(self) -> list[str]:
        """What a user should know about this map before trusting it."""
        out = []
        if self.missing:
            out.append(f"{len(SMPL22_NAMES) - len(self.missing)}/{len(SMPL22_NAMES)} joints mapped: no bone for "
                       f"{', '.join(self.missing)} (their motion is left to the neighbouring bones)")  # fmt: skip
        if self.preset in ("RIGIFY_DEF", "RIGIFY_ORG"):
            out.append(f"{PRESET_LABELS[self.preset]} of a generated Rigify rig are driven by constraints: keys on "
                       "them do not move the rig. Use the Rigify (FK controls) preset.")  # fmt: skip
        return out


def map_bones(bone_names: Iterable[str], preset: str = "AUTO") -> BoneMap:
    """Map canonical joints to the given bones with a preset, or with the best-matching one for "AUTO"."""
    bone_names = list(bone_names)
    if preset == "AUTO":
        candidates = [map_bones(bone_names, name) for name in PRESETS]
        return max(candidates, key=lambda m: len(m.bones))  # max keeps the first of equals
    if preset not in PRESETS:
        raise ValueError(f"unknown bone-map preset {preset!r}; known: AUTO, {', '.join(PRESETS)}")
    by_name = {}
    for bone in bone_names:
        by_name.setdefault(_normalise(bone), bone)

    def find(table: Mapping[str, str]) -> dict[str, str]:
        return {j: by_name[_normalise(b)] for j, b in table.items() if _normalise(b) in by_name}

    if preset != "RIGIFY":
        bones = find(PRESETS[preset])
        return BoneMap(preset, bones, tuple(j for j in SMPL22_NAMES if j not in bones))
    if _normalise(rigify.ROOT_CONTROL) not in by_name:
        return BoneMap(preset, {}, SMPL22_NAMES)
    geometry = find(_rigify(rigify.GEOMETRY_PREFIX))
    bones = {j: b for j, b in find(PRESETS[preset]).items() if j in geometry}
    return BoneMap(
        preset, bones, tuple(j for j in SMPL22_NAMES if j not in bones), geometry={j: geometry[j] for j in bones},
        root=by_name[_normalise(rigify.ROOT_CONTROL)], anchor=rigify.ANCHOR_JOINT,
        still=tuple(by_name[_normalise(b)] for b in rigify.STILL_CONTROLS if _normalise(b) in by_name),
        switches=rigify.switches(bone_names),
    )


def detect_preset(bone_names: Iterable[str]) -> str:
    """The preset that maps the most of these bones."""
    return map_bones(bone_names, "AUTO").preset


def natural_name(prompt: str, limit: int = 48) -> str:
    """A short action name from a prompt: collapsed whitespace, cut at a word boundary."""
    text = re.sub(r"\s+", " ", prompt).strip() or "motion"
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + "..."


# ---- quaternion helpers (w, x, y, z), vectorised over leading dimensions ----


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a * b."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def quat_conj(q: np.ndarray) -> np.ndarray:
    """Conjugate (the inverse of a unit quaternion)."""
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def quat_from_matrix(m: np.ndarray) -> np.ndarray:
    """Unit quaternion (..., 4) of rotation matrices (..., 3, 3)."""
    m = np.asarray(m, dtype=np.float64)
    # Bar-Itzhack's method: the eigenvector of K with the largest eigenvalue; robust for any rotation.
    k = np.empty((*m.shape[:-2], 4, 4))
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    k[..., 0, 0] = m00 + m11 + m22
    k[..., 1, 1] = m00 - m11 - m22
    k[..., 2, 2] = m11 - m00 - m22
    k[..., 3, 3] = m22 - m00 - m11
    k[..., 0, 1] = k[..., 1, 0] = m21 - m12
    k[..., 0, 2] = k[..., 2, 0] = m02 - m20
    k[..., 0, 3] = k[..., 3, 0] = m10 - m01
    k[..., 1, 2] = k[..., 2, 1] = m01 + m10
    k[..., 1, 3] = k[..., 3, 1] = m02 + m20
    k[..., 2, 3] = k[..., 3, 2] = m12 + m21
    q = np.linalg.eigh(k / 3.0)[1][..., -1]
    return q * np.where(q[..., :1] < 0, -1.0, 1.0)


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of unit quaternions (..., 4)."""
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=-2,
    )


def _align(target_vectors: np.ndarray, source_vectors: np.ndarray) -> np.ndarray:
    """Rotation matrix taking the target vectors onto the source ones: shortest arc for one, Kabsch for more."""
    if len(target_vectors) == 1:
        a = target_vectors[0] / np.linalg.norm(target_vectors[0])
        b = source_vectors[0] / np.linalg.norm(source_vectors[0])
        v, c = np.cross(a, b), float(np.dot(a, b))
        if c < -1 + 1e-9:  # opposite: half turn about any perpendicular axis
            axis = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
            axis /= np.linalg.norm(axis)
            return 2 * np.outer(axis, axis) - np.eye(3)
        vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
        return np.eye(3) + vx + vx @ vx / (1 + c)
    t = target_vectors / np.linalg.norm(target_vectors, axis=1, keepdims=True)
    s = source_vectors / np.linalg.norm(source_vectors, axis=1, keepdims=True)
    u, _, vt = np.linalg.svd(s.T @ t)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _frame(main: np.ndarray, lateral: np.ndarray) -> np.ndarray:
    """Orthonormal columns: along `main`, then `lateral` made perpendicular to it, then their cross product."""
    e1 = main / np.linalg.norm(main)
    e2 = lateral - np.dot(lateral, e1) * e1
    e2 /= np.linalg.norm(e2)
    return np.stack([e1, e2, np.cross(e1, e2)], axis=1)


def _snap(v: np.ndarray, within_degrees: float = 30.0) -> np.ndarray:
    """The signed coordinate axis nearest to unit vector v when it is that close, else v."""
    axis = np.zeros(3)
    k = int(np.argmax(np.abs(v)))
    axis[k] = np.sign(v[k])
    return axis if np.dot(axis, v) > np.cos(np.radians(within_degrees)) else v


STANDING_WITHIN_DEGREES = 45.0  # a rest pelvis->neck line further than this from the world's up is not standing


def _body_frame(
    heads: Mapping[str, np.ndarray], world_up: np.ndarray, world_left: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """Orthonormal columns (left, back, up) of a rig in armature space, and warnings when they are guessed.

    Up is the object's world up (Blender: Z): the rest pose cannot be trusted with it, since a character may lean
    at rest (a take's first frame) or lie along an axis (a BVH importer's zero pose); the per-bone rest alignment
    takes care of how its bones lie. Left is the rest hip line across that up, snapped to the armature's axes when
    near one (rigs are built axis-aligned), or the object's left (+X, facing -Y) when the hips do not lie across
    the spine. `world_up`/`world_left` are those world axes in armature space. The warnings say when the rest
    pose is not standing (facing is then less certain) or the hips give no left.
    """
    warnings = []
    top = heads["neck"] if "neck" in heads else heads["head"]
    spine = _unit(top - heads["pelvis"])
    spine_angle = float(np.degrees(np.arccos(np.clip(np.dot(spine, world_up), -1.0, 1.0))))
    if spine_angle > STANDING_WITHIN_DEGREES:
        warnings.append(f"The rest pose is not standing (its spine is {spine_angle:.0f} degrees from the object's "
                        "up): up and forward are taken from the object's axes (Z up, facing -Y). Apply a "
                        "standing rest pose if the motion comes out turned.")  # fmt: skip
    up = world_up
    left = heads["left_hip"] - heads["right_hip"]
    across = left - np.dot(left, up) * up
    if np.linalg.norm(across) < 0.5 * np.linalg.norm(left):
        warnings.append("The hips do not lie across the spine at rest: left and right are taken from the "
                        "object's axes.")  # fmt: skip
        across = world_left - np.dot(world_left, up) * up
    left = _snap(_unit(across))
    left = _unit(left - np.dot(left, up) * up)
    return np.stack([left, np.cross(up, left), up], axis=1), warnings


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectors v (..., 3) rotated by unit quaternions q (..., 4)."""
    u, w = q[..., 1:], q[..., :1]
    t = 2 * np.cross(u, v)
    return v + w * t + np.cross(u, t)


def _swing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Quaternions (..., 4) of the shortest arcs from directions a to b (..., 3); not for opposite directions."""
    a, b = _unit(a), _unit(b)
    q = np.concatenate([1.0 + np.sum(a * b, axis=-1, keepdims=True), np.cross(a, b)], axis=-1)
    return _unit(q)


@dataclass(frozen=True)
class TargetRig:
    """An armature's bones: names, parent indices (-1 for none), armature-space rest matrices (B, 4, 4) and
    the object's world matrix (4, 4)."""

    name: str
    names: tuple[str, ...]
    parents: tuple[int, ...]
    rest: np.ndarray
    world: np.ndarray = field(default_factory=lambda: np.eye(4))

    @classmethod
    def from_armature(cls, obj) -> TargetRig:
        """Read a Blender armature object's bones (bone.matrix_local is the armature-space rest matrix)."""
        if getattr(obj, "type", None) != "ARMATURE":
            raise TypeError(f"{getattr(obj, 'name', obj)!r} is not an armature object")
        bones = list(obj.data.bones)
        index = {b.name: i for i, b in enumerate(bones)}
        parents = tuple(index[b.parent.name] if b.parent else -1 for b in bones)
        rest = np.array([np.array(b.matrix_local) for b in bones]).reshape(len(bones), 4, 4)
        return cls(obj.name, tuple(index), parents, rest, np.array(obj.matrix_world, dtype=np.float64))

    def world_axes(self) -> tuple[np.ndarray, np.ndarray]:
        """The world's up (+Z) and a character's left (+X, facing -Y) as unit vectors in armature space."""
        rotation = self.world[:3, :3] / np.linalg.norm(self.world[:3, :3], axis=0)
        return _unit(rotation.T @ [0.0, 0.0, 1.0]), _unit(rotation.T @ [1.0, 0.0, 0.0])


@dataclass(frozen=True)
class RetargetResult:
    """Pose-bone channels: `rotations` (T, B, 4) w,x,y,z for `bones`; `root_location` (T, 3) for `root_bone`;
    `switches`: custom properties (data path -> value) to key as constants."""

    bones: tuple[str, ...]
    rotations: np.ndarray
    root_bone: str
    root_location: np.ndarray
    switches: Mapping[str, float] = field(default_factory=dict)


def rig_warnings(obj_or_rig, bone_map: BoneMap) -> list[str]:
    """Warnings for the panel: an incomplete or doubtful bone map, a rest pose whose up/forward is guessed."""
    rig = obj_or_rig if isinstance(obj_or_rig, TargetRig) else TargetRig.from_armature(obj_or_rig)
    try:
        return list(Retargeter(SMPL22_BUILTIN, rig, bone_map).warnings)
    except UnmappableArmatureError as err:
        return [str(err)]


class Retargeter:
    """Turns canonical motion into pose-bone rotations (and root location) of one target rig.

    Call it on successive chunks of one motion: quaternion signs and planted feet carry over, so any chunking
    gives the same result. With `foot_lock` (and root motion), an ankle the source holds still is held still on
    the target (`footlock`: as firmly as the source holds it) by two-bone IK of its leg, solved per frame. Root
    travel is scaled by the target/canonical ratio of `canonical.ROOT_SCALE_LEG` lengths (the data preparation's
    convention). `warnings` say what is guessed.
    """

    def __init__(
        self, skeleton: CanonicalSkeleton, rig: TargetRig, bone_map: BoneMap, root_motion: bool = True,
        foot_lock: bool = True,
    ) -> None:  # fmt: skip
        bone_map.require(rig.name, rig.names)
        self.skeleton, self.rig, self.root_motion = skeleton, rig, root_motion
        self.foot_lock = foot_lock and root_motion  # in place, planted feet slide back under the body: none to hold
        self.source_index = {n: i for i, n in enumerate(skeleton.names)}
        unknown = [j for j in bone_map.bones if j not in self.source_index]
        if unknown:
            raise ValueError(f"bone map names joints the skeleton lacks: {', '.join(unknown)}")
        bone_index = {n: i for i, n in enumerate(rig.names)}
        named = [bone_map.geometry_bone(j) for j in bone_map.bones] + [bone_map.root, *bone_map.still]
        absent = sorted({b for b in named if b and b not in bone_index})
        if absent:
            raise ValueError(f"bone map names bones armature '{rig.name}' lacks: {', '.join(absent)}")
        if bone_map.anchor not in bone_map.bones:
            raise ValueError(f"bone map carries the root at joint {bone_map.anchor!r}, which has no bone")
        # mapped joints in skeleton order (parents first); per joint: its keyed bone and its geometry bone
        self.joints = [j for j, n in enumerate(skeleton.names) if n in bone_map.bones]
        position = {j: m for m, j in enumerate(self.joints)}
        self.keyed = [bone_index[bone_map.bones[skeleton.names[j]]] for j in self.joints]
        heads = rig.rest[:, :3, 3]
        head = {skeleton.names[j]: heads[bone_index[bone_map.geometry_bone(skeleton.names[j])]] for j in self.joints}
        src_rest = skeleton.rest_positions()

        def joint(name: str) -> int:
            return self.source_index[name]

        # Global frame: the rig's own left and up, so Y-up armatures and rigs facing any way get the motion in
        # their frame. Source axes (left +X, up +Y) go to Blender's (left +X, back +Y, up +Z), then to the rig's.
        frame, frame_warnings = _body_frame(head, *rig.world_axes())
        self.warnings = tuple(bone_map.warnings() + frame_warnings)
        self.to_rig = frame @ SOURCE_TO_BLENDER
        self.to_rig_quat = quat_from_matrix(self.to_rig)
        self.up = self.to_rig[:, 1]  # the source's up (Y) in the rig
        self.forward = self.to_rig[:, 2]  # the source's forward (+Z) in the rig

        def leg(positions: Mapping[str, np.ndarray]) -> float:
            hip, knee, ankle = (positions[n] for n in ROOT_SCALE_LEG)
            return float(np.linalg.norm(knee - hip) + np.linalg.norm(ankle - knee))

        self.scale = leg(head) / leg({n: src_rest[joint(n)] for n in ROOT_SCALE_LEG})
        # Root motion anchors the middle of the hips (where rigs disagree least about the pelvis): the target's
        # hip centre follows the scaled source's.
        self.pelvis = joint("pelvis")
        src_hips = (src_rest[joint("left_hip")] + src_rest[joint("right_hip")]) / 2
        rig_hips = (head["left_hip"] + head["right_hip"]) / 2
        self.hips_from_source_pelvis = self.scale * self.to_rig @ (src_hips - src_rest[self.pelvis])
        self.floor_offset = rig_hips - self.scale * self.to_rig @ src_hips
        self.hip_joints = [position[joint(f"{s}_hip")] for s in _SIDES]
        # the root bone: keyed with the location that carries the anchor joint's head where it belongs
        self.root_bone = bone_index[bone_map.root] if bone_map.root else self.keyed[position[self.pelvis]]
        self.anchor = position[joint(bone_map.anchor)]

        # Rest alignment per mapped joint: target rest direction(s) to the mapped descendants -> source's.
        align: dict[int, np.ndarray] = {}  # rotation matrices
        for j in self.joints:
            children = self._mapped_descendants(j)
            target = {c: head[skeleton.names[c]] - head[skeleton.names[j]] for c in children}
            source = {c: self.to_rig @ (src_rest[c] - src_rest[j]) for c in children}
            side = {c: skeleton.names[c].split("_")[0] for c in children}
            left, right = ([c for c in children if side[c] == s] for s in _SIDES)
            main = [c for c in children if side[c] not in _SIDES]
            if len(left) == len(right) == len(main) == 1:
                # pelvis, chest: the chain onwards (spine, neck) exactly, the left-right line as well as it can;
                # robust to where a rig puts this joint relative to its hips or shoulders
                lat_t, lat_s = target[left[0]] - target[right[0]], source[left[0]] - source[right[0]]
                align[j] = _frame(source[main[0]], lat_s) @ _frame(target[main[0]], lat_t).T
            elif children:
                align[j] = _align(np.array(list(target.values())), np.array(list(source.values())))
            else:  # a leaf (head, hands, toes): keep the alignment of the nearest mapped ancestor
                anc = self._mapped_parent(j)
                align[j] = align[anc] if anc >= 0 else np.eye(3)
        self.align = quat_from_matrix(np.stack([align[j] for j in self.joints]))

        # Target forward kinematics over the mapped joints: each head hangs off its mapped parent's.
        self.fk_parent = [position.get(self._mapped_parent(j), -1) for j in self.joints]
        self.fk_offset = np.array([head[skeleton.names[j]] - head[skeleton.names[self.joints[p]]] if p >= 0
                                   else np.zeros(3) for j, p in zip(self.joints, self.fk_parent)])  # fmt: skip
        self.rest_heads = np.array([head[skeleton.names[j]] for j in self.joints])
        self.legs = [[position[joint(f"{s}_{part}")] for part in ("hip", "knee", "ankle")] for s in _SIDES]
        self.leg_reach = [float(np.linalg.norm(self.fk_offset[knee]) + np.linalg.norm(self.fk_offset[ankle]))
                          for _, knee, ankle in self.legs]  # fmt: skip

        # Keyed bones turn with the keyed bone (or geometry bone) they hang from: the nearest up their parent chain
        owner = {self.keyed[m]: m for m in range(len(self.joints))}
        owner.update({bone_index[bone_map.geometry_bone(skeleton.names[j])]: m for m, j in enumerate(self.joints)})
        none = len(self.joints)  # index of the identity appended to the per-joint rotations
        self.keyed_ancestor = np.array([self._owner_above(b, m, owner, none) for m, b in enumerate(self.keyed)])
        self.keyed_rest = quat_from_matrix(rig.rest[self.keyed, :3, :3])
        self.still = [bone_index[b] for b in bone_map.still if bone_index[b] not in self.keyed]
        self.switches = dict(bone_map.switches)
        self._last: np.ndarray | None = None
        self._last_feet: np.ndarray | None = None  # source ankles (1, 2, 3) of the previous chunk's last frame
        self.plants = footlock.Plants(len(_SIDES), self.up, footlock.MAX_OFFSET * leg(head))

    def _owner_above(self, b: int, m: int, owner: Mapping[int, int], none: int) -> int:
        b = self.rig.parents[b]
        while b >= 0 and owner.get(b, m) == m:
            b = self.rig.parents[b]
        return owner[b] if b >= 0 else none

    def _mapped_parent(self, j: int) -> int:
        """The nearest mapped joint above source joint j, -1 for none."""
        j = self.skeleton.parents[j]
        while j >= 0 and j not in self.joints:
            j = self.skeleton.parents[j]
        return j

    def _mapped_descendants(self, j: int) -> list[int]:
        out = []
        for c in self.skeleton.children(j):
            out += [c] if c in self.joints else self._mapped_descendants(c)
        return out

    def __call__(self, root_translation: np.ndarray, rotations: np.ndarray) -> RetargetResult:
        """Retarget (T, 3) root translation and (T, J, 4) local w,x,y,z rotations of the source skeleton."""
        rotations = np.asarray(rotations, dtype=np.float64)
        root_translation = np.asarray(root_translation, dtype=np.float64)
        n_joints = len(self.skeleton.names)
        if rotations.ndim != 3 or rotations.shape[1:] != (n_joints, 4):
            raise ValueError(f"rotations must be (T, {n_joints}, 4), got {rotations.shape}")
        if root_translation.shape != (rotations.shape[0], 3):
            raise ValueError(f"root translation must be ({rotations.shape[0]}, 3), got {root_translation.shape}")
        if not (np.isfinite(rotations).all() and np.isfinite(root_translation).all()):
            raise ValueError("motion contains NaN or infinite values")
        rotations = rotations / np.linalg.norm(rotations, axis=-1, keepdims=True)
        world = np.empty_like(rotations)
        source = np.empty((*root_translation.shape[:1], n_joints, 3))  # source joint positions (metres, Y up)
        for j, p in enumerate(self.skeleton.parents):
            world[:, j] = rotations[:, j] if p < 0 else quat_mul(world[:, p], rotations[:, j])
            source[:, j] = root_translation if p < 0 else source[:, p] + _rotate(world[:, p], self.skeleton.offsets[j])
        # source world rotations expressed in the rig's armature space
        delta = quat_mul(quat_mul(self.to_rig_quat, world), quat_conj(self.to_rig_quat))
        # each mapped joint's armature-space rotation from its rest: aligned to the source rest, then moved
        turn = quat_mul(delta[:, self.joints], self.align[None])

        travel = self.scale * root_translation @ self.to_rig.T
        if not self.root_motion:
            travel = np.outer(travel @ self.up, self.up)
        hips = travel + _rotate(delta[:, self.pelvis], self.hips_from_source_pelvis) + self.floor_offset
        heads = self._forward_kinematics(turn)
        heads += (hips - heads[:, self.hip_joints].mean(axis=1))[:, None]
        if self.foot_lock:
            self._lock_feet(turn, heads, source)

        # Pose-bone rotation of a keyed bone: its turn relative to the turn of the bone it hangs from (bones in
        # between keep their rest pose): local = conj(rest_b) * conj(turn_a) * turn_b * rest_b.
        identity = np.broadcast_to([1.0, 0.0, 0.0, 0.0], (len(turn), 1, 4))
        ancestor = np.concatenate([turn, identity], axis=1)[:, self.keyed_ancestor]
        relative = quat_mul(quat_conj(ancestor), turn)
        local = quat_mul(quat_conj(self.keyed_rest), quat_mul(relative, self.keyed_rest))
        local = self._continuous(local)
        if self.still:
            local = np.concatenate([local, np.broadcast_to(identity, (len(turn), len(self.still), 4))], axis=1)

        rest = self.rig.rest[self.root_bone]
        moved = heads[:, self.anchor] - self.rest_heads[self.anchor]
        location = moved @ rest[:3, :3]  # into the root bone's rest frame
        names = tuple(self.rig.names[b] for b in [*self.keyed, *self.still])
        return RetargetResult(names, local, self.rig.names[self.root_bone], location, dict(self.switches))

    def _forward_kinematics(self, turn: np.ndarray) -> np.ndarray:
        """Armature-space heads (T, M, 3) of the mapped joints for their turns, the pelvis at the origin."""
        heads = np.zeros((*turn.shape[:2], 3))
        for m, p in enumerate(self.fk_parent):
            if p >= 0:
                heads[:, m] = heads[:, p] + _rotate(turn[:, p], self.fk_offset[m])
        return heads

    def _lock_feet(self, turn: np.ndarray, heads: np.ndarray, source: np.ndarray) -> None:
        """Hold ankles as firmly as the source holds them still: two-bone IK turns hips and knees (in place)."""
        feet = source[:, [self.source_index[f"{s}_ankle"] for s in _SIDES]]
        before = feet[:1] if self._last_feet is None else self._last_feet  # the motion's first frame: no step
        steps = np.linalg.norm(feet - np.concatenate([before, feet[:-1]]), axis=-1)
        self._last_feet = feet[-1:]
        offsets = self.plants.corrections(heads[:, [leg[2] for leg in self.legs]], steps)
        solve = np.any(offsets != 0, axis=-1)
        for f, (hip, knee, ankle) in enumerate(self.legs):
            frames = np.flatnonzero(solve[:, f])
            if not len(frames):
                continue
            old_knee, old_ankle = heads[frames, knee], heads[frames, ankle]
            offset = footlock.within_reach(heads[frames, hip], old_ankle, offsets[frames, f], self.leg_reach[f],
                                           self.up, footlock.MAX_LIFT * self.leg_reach[f])
            new_knee, new_ankle = footlock.two_bone_ik(
                heads[frames, hip], old_knee, old_ankle, old_ankle + offset, self.forward
            )
            thigh = _swing(old_knee - heads[frames, hip], new_knee - heads[frames, hip])
            shin = _swing(_rotate(thigh, old_ankle - old_knee), new_ankle - new_knee)
            turn[frames, hip] = quat_mul(thigh, turn[frames, hip])
            turn[frames, knee] = quat_mul(shin, quat_mul(thigh, turn[frames, knee]))
            heads[frames, knee], heads[frames, ankle] = new_knee, new_ankle

    def _continuous(self, q: np.ndarray) -> np.ndarray:
        """Flip signs so consecutive quaternions of a bone lie in the same hemisphere (smooth interpolation)."""
        prev = np.concatenate([self._last[None] if self._last is not None else q[:1], q[:-1]], axis=0)
        flips = np.cumprod(np.where(np.sum(q * prev, axis=-1) < 0, -1.0, 1.0), axis=0)
        q = q * flips[..., None]
        self._last = q[-1]
        return q
