"""Retargeting canonical-skeleton motion onto any armature: bone-map presets, detection, per-bone rotations.

No UI code, no bpy import: the armature is read through the objects passed in (`TargetRig.from_armature`).
Source motion: root translation (T, 3) metres and local rotations (T, J, 4) w,x,y,z of a `CanonicalSkeleton`
(Y up, facing +Z). For every mapped target bone the pose rotation is chosen so that its armature-space
orientation change from its own rest pose equals the source joint's world rotation, after a per-bone rest
alignment (the rotation taking the target bone's rest direction(s) onto the source's), so T-pose, A-pose and any
bone roll give the same world motion. Root motion is scaled by the ratio of leg lengths.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .canonical import SMPL22_NAMES, CanonicalSkeleton

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
    """Which target bone drives each canonical joint, from which preset; `missing` joints have no bone."""

    preset: str
    bones: dict[str, str]
    missing: tuple[str, ...] = field(default=())

    def require(self, armature: str, bone_names: Iterable[str]) -> BoneMap:
        """Raise UnmappableArmatureError naming the required joints that found no bone; return self."""
        absent = [j for j in REQUIRED_JOINTS if j not in self.bones]
        if absent:
            raise UnmappableArmatureError(armature, self.preset, absent, bone_names)
        return self


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
    table = PRESETS[preset]
    bones = {j: by_name[_normalise(b)] for j, b in table.items() if _normalise(b) in by_name}
    missing = tuple(j for j in SMPL22_NAMES if j not in bones)
    return BoneMap(preset, bones, missing)


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


def _body_frame(heads, joint, has) -> np.ndarray:
    """Orthonormal columns (left, back, up) of a rig from its hips (left) and pelvis-to-neck line (up).

    Both snap to the armature's axes when near them: rigs are built axis-aligned, and a spine that leans at rest
    must not tilt the whole motion.
    """
    top = next(joint(n) for n in ("neck", "head") if has(joint(n)))
    up = heads[top] - heads[joint("pelvis")]
    up = _snap(up / np.linalg.norm(up))
    left = heads[joint("left_hip")] - heads[joint("right_hip")]
    left = left - np.dot(left, up) * up
    left = _snap(left / np.linalg.norm(left))
    left = left - np.dot(left, up) * up
    left /= np.linalg.norm(left)
    return np.stack([left, np.cross(up, left), up], axis=1)


@dataclass(frozen=True)
class TargetRig:
    """An armature's bones: names, parent indices (-1 for none) and armature-space rest matrices (B, 4, 4)."""

    name: str
    names: tuple[str, ...]
    parents: tuple[int, ...]
    rest: np.ndarray

    @classmethod
    def from_armature(cls, obj) -> TargetRig:
        """Read a Blender armature object's bones (bone.matrix_local is the armature-space rest matrix)."""
        if getattr(obj, "type", None) != "ARMATURE":
            raise TypeError(f"{getattr(obj, 'name', obj)!r} is not an armature object")
        bones = list(obj.data.bones)
        index = {b.name: i for i, b in enumerate(bones)}
        parents = tuple(index[b.parent.name] if b.parent else -1 for b in bones)
        rest = np.array([np.array(b.matrix_local) for b in bones]).reshape(len(bones), 4, 4)
        return cls(obj.name, tuple(index), parents, rest)


@dataclass(frozen=True)
class RetargetResult:
    """Pose-bone channels: `rotations` (T, B, 4) w,x,y,z for `bones`; `root_location` (T, 3) for `root_bone`."""

    bones: tuple[str, ...]
    rotations: np.ndarray
    root_bone: str
    root_location: np.ndarray
    switches: Mapping[str, float] = field(default_factory=dict)


class Retargeter:
    """Turns canonical motion into pose-bone rotations (and root location) of one target rig.

    Call it on successive chunks of one motion: quaternion signs stay continuous across calls.
    """

    def __init__(
        self, skeleton: CanonicalSkeleton, rig: TargetRig, bone_map: BoneMap, root_motion: bool = True
    ) -> None:
        bone_map.require(rig.name, rig.names)
        self.skeleton, self.rig, self.root_motion = skeleton, rig, root_motion
        self.source_index = {n: i for i, n in enumerate(skeleton.names)}
        unknown = [j for j in bone_map.bones if j not in self.source_index]
        if unknown:
            raise ValueError(f"bone map names joints the skeleton lacks: {', '.join(unknown)}")
        bone_index = {n: i for i, n in enumerate(rig.names)}
        # target bone index -> source joint index, for the mapped bones, in hierarchy order
        self.joint_of = {bone_index[b]: self.source_index[j] for j, b in bone_map.bones.items()}
        self.bones = sorted(self.joint_of, key=self._depth)
        self.rest_quat = quat_from_matrix(rig.rest[:, :3, :3])
        heads = rig.rest[:, :3, 3]
        joint_head = {j: heads[b] for b, j in self.joint_of.items()}
        src_rest = skeleton.rest_positions()

        def joint(name: str) -> int:
            return self.source_index[name]

        # Global frame: the rig's own left and up, so Y-up armatures and rigs facing any way get the motion in
        # their frame. Source axes (left +X, up +Y) go to Blender's (left +X, back +Y, up +Z), then to the rig's.
        self.to_rig = _body_frame(joint_head, joint, lambda j: j in joint_head) @ SOURCE_TO_BLENDER
        self.to_rig_quat = quat_from_matrix(self.to_rig)
        self.up = self.to_rig[:, 1]  # the source's up (Y) in the rig

        def leg(positions: Mapping[int, np.ndarray] | np.ndarray) -> float:
            return float(
                np.mean([
                    np.linalg.norm(positions[joint(f"{s}_knee")] - positions[joint(f"{s}_hip")])
                    + np.linalg.norm(positions[joint(f"{s}_ankle")] - positions[joint(f"{s}_knee")])
                    for s in _SIDES
                ])
            )  # fmt: skip

        self.scale = leg(joint_head) / leg(src_rest)
        self.root_bone = next(b for b, j in self.joint_of.items() if j == joint("pelvis"))
        pelvis = joint("pelvis")
        # Root motion anchors the middle of the hips (where rigs disagree least about the pelvis): the target's
        # hip centre follows the scaled source's; the root bone's head hangs off it, turning with the pelvis.
        src_hips = (src_rest[joint("left_hip")] + src_rest[joint("right_hip")]) / 2
        rig_hips = (joint_head[joint("left_hip")] + joint_head[joint("right_hip")]) / 2
        self.pelvis = pelvis
        self.hips_from_source_pelvis = self.scale * self.to_rig @ (src_hips - src_rest[pelvis])
        self.root_from_rig_hips = heads[self.root_bone] - rig_hips
        self.floor_offset = rig_hips - self.scale * self.to_rig @ src_hips

        # Rest alignment per mapped bone: target rest direction(s) to the mapped descendants -> source's.
        align: dict[int, np.ndarray] = {}  # rotation matrices
        mapped_joints = {j: b for b, j in self.joint_of.items()}
        for b in self.bones:
            j = self.joint_of[b]
            children = self._mapped_descendants(j, mapped_joints)
            target = {c: heads[mapped_joints[c]] - heads[b] for c in children}
            source = {c: self.to_rig @ (src_rest[c] - src_rest[j]) for c in children}
            side = {c: skeleton.names[c].split("_")[0] for c in children}
            left, right = ([c for c in children if side[c] == s] for s in _SIDES)
            main = [c for c in children if side[c] not in _SIDES]
            if len(left) == len(right) == len(main) == 1:
                # pelvis, chest: the chain onwards (spine, neck) exactly, the left-right line as well as it can;
                # robust to where a rig puts this joint relative to its hips or shoulders
                lat_t, lat_s = target[left[0]] - target[right[0]], source[left[0]] - source[right[0]]
                align[b] = _frame(source[main[0]], lat_s) @ _frame(target[main[0]], lat_t).T
            elif children:
                align[b] = _align(np.array(list(target.values())), np.array(list(source.values())))
            else:  # a leaf (head, hands, toes): keep the alignment of the nearest mapped ancestor
                anc = self._mapped_ancestor(b)
                align[b] = align[anc] if anc >= 0 else np.eye(3)

        # constants of the per-frame formula in __call__
        position = {b: i for i, b in enumerate(self.bones)}
        ancestors = [self._mapped_ancestor(b) for b in self.bones]
        self.keyed_joints = np.array([self.joint_of[b] for b in self.bones])
        self.keyed_ancestor = np.array([position[a] if a >= 0 else len(self.bones) for a in ancestors])
        self.keyed_root = position[self.root_bone]
        rest_bones = self.rest_quat[self.bones]
        self.aligned_rest = quat_mul(quat_from_matrix(np.stack([align[b] for b in self.bones])), rest_bones)
        rest_ancestors = np.array([self.rest_quat[a] if a >= 0 else [1.0, 0.0, 0.0, 0.0] for a in ancestors])
        self.ancestor_to_bone = quat_mul(quat_conj(rest_bones), rest_ancestors)
        self._last: np.ndarray | None = None

    def _depth(self, b: int) -> int:
        depth = 0
        while self.rig.parents[b] >= 0:
            b, depth = self.rig.parents[b], depth + 1
        return depth

    def _mapped_ancestor(self, b: int) -> int:
        b = self.rig.parents[b]
        while b >= 0 and b not in self.joint_of:
            b = self.rig.parents[b]
        return b

    def _mapped_descendants(self, j: int, mapped_joints: Mapping[int, int]) -> list[int]:
        out = []
        for c in self.skeleton.children(j):
            out += [c] if c in mapped_joints else self._mapped_descendants(c, mapped_joints)
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
        for j, p in enumerate(self.skeleton.parents):
            world[:, j] = rotations[:, j] if p < 0 else quat_mul(world[:, p], rotations[:, j])
        # source world rotations expressed in the rig's armature space
        delta = quat_mul(quat_mul(self.to_rig_quat, world), quat_conj(self.to_rig_quat))

        # Armature-space posed orientation of each keyed bone: its rest, aligned to the source rest, then moved
        # by the source joint's world rotation. Its pose-bone rotation is relative to the nearest keyed ancestor
        # (unkeyed bones in between keep their rest pose): local = conj(rest_b) * rest_a * conj(posed_a) * posed_b.
        posed = quat_mul(delta[:, self.keyed_joints], self.aligned_rest)
        identity = np.broadcast_to([1.0, 0.0, 0.0, 0.0], (len(posed), 1, 4))
        ancestor = np.concatenate([posed, identity], axis=1)[:, self.keyed_ancestor]
        local = quat_mul(self.ancestor_to_bone, quat_mul(quat_conj(ancestor), posed))
        local = self._continuous(local)

        travel = self.scale * root_translation @ self.to_rig.T
        if not self.root_motion:
            travel = np.outer(travel @ self.up, self.up)
        root_turn = quat_mul(posed[:, self.keyed_root], quat_conj(self.rest_quat[self.root_bone]))
        head = (
            travel
            + quat_to_matrix(delta[:, self.pelvis]) @ self.hips_from_source_pelvis
            + quat_to_matrix(root_turn) @ self.root_from_rig_hips
            + self.floor_offset
        )
        rest = self.rig.rest[self.root_bone]
        location = (head - rest[:3, 3]) @ rest[:3, :3]  # into the root bone's rest frame
        names = tuple(self.rig.names[b] for b in self.bones)
        return RetargetResult(names, local, self.rig.names[self.root_bone], location)

    def _continuous(self, q: np.ndarray) -> np.ndarray:
        """Flip signs so consecutive quaternions of a bone lie in the same hemisphere (smooth interpolation)."""
        prev = np.concatenate([self._last[None] if self._last is not None else q[:1], q[:-1]], axis=0)
        flips = np.cumprod(np.where(np.sum(q * prev, axis=-1) < 0, -1.0, 1.0), axis=0)
        q = q * flips[..., None]
        self._last = q[-1]
        return q
