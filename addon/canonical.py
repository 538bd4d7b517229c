"""The canonical source skeleton the backend animates (SMPL/HumanML3D 22 joints), numpy only.

The backend announces its skeleton in the `hello` reply; `SMPL22_BUILTIN` is the add-on's offline copy of the
same rest pose, used to build the canonical armature when no backend is reachable.
Conventions (as the backend's): metres, Y up, the character faces +Z, its left side is +X; rotations are local
(parent-relative) quaternions w,x,y,z relative to this rest pose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SMPL22_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle",
    "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
)  # fmt: skip
SMPL22_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19)

# Root-scale convention, shared by the data preparation and the add-on: a body's size is the length of its RIGHT
# leg, hip->knee + knee->ankle. HumanML3D's ``uniform_skeleton`` (reproduced by backend.motion.canonicalize_positions,
# its kinematic_chains[0][1:4]) scales a mocap actor's root path by canonical/actor right-leg length; the add-on
# scales the canonical root path by target/canonical right-leg length, the inverse, so travel is not off by the
# actor's left/right leg difference and planted feet do not slide (tests/test_rigs.py checks both sides agree).
ROOT_SCALE_LEG = ("right_hip", "right_knee", "right_ankle")

# HumanML3D's foot-contact rule (backend.motion.positions_to_features, skeleton.feet_threshold): a joint is on the
# ground when its squared displacement over one frame of the 20 fps canonical motion is below this (metres^2).
FOOT_CONTACT_THRESHOLD = 0.002


@dataclass(frozen=True)
class CanonicalSkeleton:
    """Joint names, parent indices (-1 for the root) and rest offsets (J, 3) from the parent, metres, Y up."""

    names: tuple[str, ...]
    parents: tuple[int, ...]
    offsets: np.ndarray

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets, dtype=np.float64)
        if len(self.names) != len(self.parents) or offsets.shape != (len(self.names), 3):
            raise ValueError(
                f"skeleton needs one parent and one (x, y, z) offset per joint: {len(self.names)} names, "
                f"{len(self.parents)} parents, offsets of shape {offsets.shape}"
            )
        if any(not (-1 <= p < i) for i, p in enumerate(self.parents)):
            raise ValueError("skeleton parents must come before their children (-1 for the root)")
        object.__setattr__(self, "offsets", offsets)

    @classmethod
    def from_json(cls, data: dict) -> CanonicalSkeleton:
        """Build from the `skeleton` object of the backend's hello reply (names, parents, rest offsets)."""
        if not isinstance(data, dict):
            raise TypeError(f"skeleton must be a JSON object, got {type(data).__name__}")
        names = data.get("joint_names", data.get("names"))
        offsets = data.get("rest_offsets", data.get("offsets"))
        if names is None or offsets is None or "parents" not in data:
            raise ValueError(f"skeleton needs names, parents and rest offsets; got keys {sorted(data)}")
        return cls(tuple(str(n) for n in names), tuple(int(p) for p in data["parents"]), np.asarray(offsets))

    def rest_positions(self) -> np.ndarray:
        """World rest positions (J, 3) with the lowest joint on the floor (y = 0) and the root above x=z=0."""
        pos = np.zeros((len(self.names), 3))
        for j, p in enumerate(self.parents):
            if p >= 0:
                pos[j] = pos[p] + self.offsets[j]
        pos[:, 1] -= pos[:, 1].min()
        return pos

    def children(self, j: int) -> list[int]:
        """Indices of the joints whose parent is `j`."""
        return [c for c, p in enumerate(self.parents) if p == j]


# A copy of backend.skeleton.SMPL22's rest offsets (tests/test_retarget.py checks they stay equal).
SMPL22_BUILTIN = CanonicalSkeleton(
    names=SMPL22_NAMES,
    parents=SMPL22_PARENTS,
    offsets=np.array([
        [0.0, 0.0, 0.0], [0.052221, -0.079986, -0.038723], [-0.064662, -0.079965, -0.038712],
        [0.014283, 0.13079, 0.0], [0.0, -0.393623, 0.0], [0.0, -0.390188, 0.0],
        [0.0, 0.14319, 0.0], [0.0, -0.432433, 0.0], [0.0, -0.425643, 0.0],
        [0.0, 0.057365, 0.0], [0.0, 0.0, 0.143382], [0.0, 0.0, 0.149419],
        [-0.012025, 0.21903, 0.0], [0.071065, 0.117608, -0.004566], [-0.0819, 0.117602, -0.004566],
        [0.0, 0.103039, 0.0], [0.131614, 0.0, 0.0], [-0.122984, 0.0, 0.0],
        [0.25684, 0.0, 0.0], [-0.263092, 0.0, 0.0], [0.266012, 0.0, 0.0],
        [-0.269876, 0.0, 0.0],
    ]),
)  # fmt: skip
