"""The canonical skeletons: HumanML3D's 22-joint SMPL chain and KIT-ML's 21-joint chain.

Conventions (HumanML3D's): metres, Y up, the character faces +Z at frame 0, so its left side is +X.
``raw_offsets`` are HumanML3D's unit bone directions (``paramUtil.t2m_raw_offsets``); they define HumanML3D-style
6D rotation features and must not change. ``rest_offsets`` are the bone vectors of the rest pose that the backend
announces to clients and that :func:`backend.motion.forward_kinematics` uses (the rest that "local" rotation
features and rotation-based data preparation refer to): a T-pose whose bone lengths are HumanML3D's uniform target
skeleton. Those lengths, and the rigid pelvis and upper-chest offsets, were measured on the real HumanML3D clips in
``shared/data/humanml3d-samples`` (every clip of HumanML3D has exactly these bone lengths).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_X, _Y, _Z = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
_NEG_X, _NEG_Y = (-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)


@dataclass(frozen=True)
class Skeleton:
    """A kinematic tree: joint names, parents, bone directions, rest pose and feature layout."""

    name: str
    joint_names: tuple[str, ...]
    kinematic_chains: tuple[tuple[int, ...], ...]
    raw_offsets: np.ndarray = field(repr=False)
    rest_offsets: np.ndarray | None = field(repr=False)
    foot_left: tuple[int, int]
    foot_right: tuple[int, int]
    face_joints: tuple[int, int, int, int]  # r_hip, l_hip, r_shoulder, l_shoulder (HumanML3D's order)
    feet_threshold: float
    fps: float = 20.0

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @property
    def feature_groups(self) -> dict[str, slice]:
        """HumanML3D's feature layout, group by group, in order: the root's angular velocity about Y (1), its
        linear XZ velocity in its own frame (2), its height (1); joints 1..J-1's root-relative positions
        (3 each) and 6D rotations (6 each); all J joints' velocities (3 each); the foot contacts (4)."""
        j = self.num_joints
        sizes = {"root_angular": 1, "root_linear": 2, "root_height": 1, "positions": (j - 1) * 3,
                 "rotations": (j - 1) * 6, "velocities": j * 3, "contacts": 4}
        groups, start = {}, 0
        for name, size in sizes.items():
            groups[name] = slice(start, start + size)
            start += size
        return groups

    @property
    def feature_dim(self) -> int:
        return self.feature_groups["contacts"].stop

    def position_channels(self, joints: Sequence[int]) -> list[int]:
        """The feature channels holding these joints' root-relative positions (x, y, z each; not the root's)."""
        if not all(0 < j < self.num_joints for j in joints):
            raise ValueError(f"joints must be in 1..{self.num_joints - 1} (the root has no position channels)")
        first = self.feature_groups["positions"].start
        return [first + 3 * (j - 1) + k for j in joints for k in range(3)]

    @property
    def parents(self) -> tuple[int, ...]:
        parents = [-1] * self.num_joints
        for chain in self.kinematic_chains:
            for parent, child in itertools.pairwise(chain):
                parents[child] = parent
        return tuple(parents)

    @property
    def children(self) -> tuple[tuple[int, ...], ...]:
        parents = self.parents
        return tuple(tuple(c for c in range(self.num_joints) if parents[c] == j) for j in range(self.num_joints))

    @property
    def levels(self) -> tuple[tuple[int, ...], ...]:
        """Joints grouped by their depth in the tree (the root alone first): a level's parents are all in the
        levels before it, so a level's joints can be posed together."""
        parents, depth = self.parents, [0] * self.num_joints
        for j in range(1, self.num_joints):  # parents come before children
            depth[j] = depth[parents[j]] + 1
        return tuple(tuple(j for j in range(self.num_joints) if depth[j] == d) for d in range(max(depth) + 1))

    def to_json(self) -> dict[str, Any]:
        """What clients need to rebuild the skeleton: names, parents and rest offsets (metres, Y up)."""
        if self.rest_offsets is None:
            raise ValueError(f"skeleton {self.name!r} has no rest pose")
        return {
            "name": self.name,
            "joint_names": list(self.joint_names),
            "parents": list(self.parents),
            "rest_offsets": np.round(self.rest_offsets, 6).tolist(),
            "up_axis": "Y",
            "forward_axis": "Z",
            "units": "metres",
            "fps": self.fps,
        }


def _rest_pose(directions: list[tuple[float, float, float]], lengths: list[float]) -> np.ndarray:
    dirs = np.asarray(directions, dtype=np.float64)
    norms = np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.divide(dirs, norms, out=np.zeros_like(dirs), where=norms > 0) * np.asarray(lengths)[:, None]


SMPL22 = Skeleton(
    name="smpl22",
    joint_names=(
        "pelvis",
        "left_hip",
        "right_hip",
        "spine1",
        "left_knee",
        "right_knee",
        "spine2",
        "left_ankle",
        "right_ankle",
        "spine3",
        "left_foot",
        "right_foot",
        "neck",
        "left_collar",
        "right_collar",
        "head",
        "left_shoulder",
        "right_shoulder",
        "left_elbow",
        "right_elbow",
        "left_wrist",
        "right_wrist",
    ),
    kinematic_chains=(
        (0, 2, 5, 8, 11),
        (0, 1, 4, 7, 10),
        (0, 3, 6, 9, 12, 15),
        (9, 14, 17, 19, 21),
        (9, 13, 16, 18, 20),
    ),
    raw_offsets=np.array(
        [
            (0.0, 0.0, 0.0),
            _X,
            _NEG_X,
            _Y,
            _NEG_Y,
            _NEG_Y,
            _Y,
            _NEG_Y,
            _NEG_Y,
            _Y,
            _Z,
            _Z,
            _Y,
            _X,
            _NEG_X,
            _Z,
            _NEG_Y,
            _NEG_Y,
            _NEG_Y,
            _NEG_Y,
            _NEG_Y,
            _NEG_Y,
        ]
    ),
    # T-pose: legs down, feet forward, spine up, arms out along +-X. Pelvis and upper-chest children keep the
    # measured (rigid) directions so that forward kinematics reproduces real HumanML3D joints to millimetres.
    rest_offsets=_rest_pose(
        [
            (0, 0, 0),
            (0.052177, -0.079919, -0.03869),
            (-0.064625, -0.079919, -0.03869),
            (0.014283, 0.13079, 0),
            _NEG_Y,
            _NEG_Y,
            _Y,
            _NEG_Y,
            _NEG_Y,
            _Y,
            _Z,
            _Z,
            (-0.012025, 0.219029, 0),
            (0.071036, 0.117559, -0.004564),
            (-0.08187, 0.117559, -0.004564),
            _Y,
            _X,
            _NEG_X,
            _X,
            _NEG_X,
            _X,
            _NEG_X,
        ],
        [
            0.0,
            0.103074,
            0.109883,
            0.131568,
            0.393623,
            0.390188,
            0.14319,
            0.432433,
            0.425643,
            0.057365,
            0.143382,
            0.149419,
            0.21936,
            0.137487,
            0.143383,
            0.103039,
            0.131614,
            0.122984,
            0.25684,
            0.263092,
            0.266012,
            0.269876,
        ],
    ),
    foot_left=(7, 10),
    foot_right=(8, 11),
    face_joints=(2, 1, 17, 16),
    feet_threshold=0.002,
)

KIT21 = Skeleton(
    name="kit21",
    joint_names=(
        "root",
        "spine_lower",
        "spine_upper",
        "neck",
        "head",
        "right_shoulder",
        "right_elbow",
        "right_wrist",
        "left_shoulder",
        "left_elbow",
        "left_wrist",
        "right_hip",
        "right_knee",
        "right_ankle",
        "right_ball",
        "right_toe",
        "left_hip",
        "left_knee",
        "left_ankle",
        "left_ball",
        "left_toe",
    ),
    kinematic_chains=((0, 11, 12, 13, 14, 15), (0, 16, 17, 18, 19, 20), (0, 1, 2, 3, 4), (3, 5, 6, 7), (3, 8, 9, 10)),
    raw_offsets=np.array(
        [
            (0.0, 0.0, 0.0),
            _Y,
            _Y,
            _Y,
            _Y,
            _X,
            _NEG_Y,
            _NEG_Y,
            _NEG_X,
            _NEG_Y,
            _NEG_Y,
            _X,
            _NEG_Y,
            _NEG_Y,
            _Z,
            _Z,
            _NEG_X,
            _NEG_Y,
            _NEG_Y,
            _Z,
            _Z,
        ]
    ),
    rest_offsets=None,  # KIT-ML ships no uniform rest skeleton; features <-> positions work, rotations do not.
    foot_left=(19, 20),
    foot_right=(14, 15),
    face_joints=(11, 16, 5, 8),
    feet_threshold=0.05,
    fps=12.5,
)

SKELETONS = {s.name: s for s in (SMPL22, KIT21)}


def skeleton_for_dim(dim: int) -> Skeleton:
    """The skeleton whose feature vector has ``dim`` channels (263: SMPL22, 251: KIT21)."""
    for skeleton in SKELETONS.values():
        if skeleton.feature_dim == dim:
            return skeleton
    known = ", ".join(f"{s.feature_dim} ({s.name})" for s in SKELETONS.values())
    raise ValueError(f"no skeleton has {dim}-dimensional features; known: {known}")
