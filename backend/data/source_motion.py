"""One clip of any source format as local joint transforms: what retargeting (``backend.data.retarget``) reads.

Every reader (BVH: :meth:`SourceMotion.from_bvh`; ASF/AMC: ``backend.data.asf_amc``; DeepMimic:
``backend.data.deepmimic``) produces this structure: a joint tree with parents before children, per frame each
joint's translation from its parent (in the parent's frame, source units) and its rotation relative to its parent,
so that world_rot[j] = world_rot[parent] * rot[j] and pos[j] = pos[parent] + world_rot[parent] * trans[j]
(``backend.data.bvh.world_transforms``). ``tips`` are end points that carry no motion of their own (BVH End
Sites, the far ends of ASF bones, DeepMimic's body-shape points): maps may place joints on them, and they are never
reported as dropped joints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.data.bvh import Bvh


@dataclass(frozen=True)
class SourceMotion:
    """Local transforms of one clip (see the module docstring)."""

    name: str
    joint_names: tuple[str, ...]
    parents: tuple[int, ...]
    translations: torch.Tensor  # (T, J, 3) float64, source units
    rotations: torch.Tensor  # (T, J, 4) float64, w, x, y, z
    fps: float
    tips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        t, j = self.translations.shape[:2]
        if self.rotations.shape != (t, j, 4) or self.translations.shape != (t, j, 3) or len(self.parents) != j:
            raise ValueError(f"{self.name}: translations {tuple(self.translations.shape)}, rotations "
                             f"{tuple(self.rotations.shape)} and {len(self.parents)} joints disagree")
        if any(p >= k for k, p in enumerate(self.parents)):
            raise ValueError(f"{self.name}: every joint's parent must come before it")
        if not (torch.isfinite(self.translations).all() and torch.isfinite(self.rotations).all()):
            raise ValueError(f"{self.name}: motion holds NaN or infinite values")
        if not self.fps > 0:
            raise ValueError(f"{self.name}: frame rate must be positive, got {self.fps}")

    @property
    def num_frames(self) -> int:
        return int(self.translations.shape[0])

    def local_transforms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(translations (T, J, 3), local rotations (T, J, 4)), as :meth:`backend.data.bvh.Bvh.local_transforms`."""
        return self.translations, self.rotations

    @classmethod
    def from_bvh(cls, bvh: Bvh, name: str = "<bvh>") -> SourceMotion:
        """A parsed BVH file, its End Sites as tips named ``<joint>_End``."""
        trans, quats = bvh.local_transforms()
        names, parents = list(bvh.joint_names), list(bvh.parents)
        tips = []
        if bvh.end_sites:
            t = trans.shape[0]
            offsets = torch.tensor([o for _, o in bvh.end_sites], dtype=torch.float64)
            identity = torch.zeros(t, len(bvh.end_sites), 4, dtype=torch.float64)
            identity[..., 0] = 1.0
            trans = torch.cat([trans, offsets.expand(t, -1, -1)], dim=1)
            quats = torch.cat([quats, identity], dim=1)
            counts: dict[str, int] = {}
            for joint, _ in bvh.end_sites:
                base = f"{bvh.joint_names[joint]}_End"
                counts[base] = counts.get(base, 0) + 1
                tips.append(base if counts[base] == 1 else f"{base}{counts[base]}")
                parents.append(joint)
            names += tips
        return cls(name, tuple(names), tuple(parents), trans, quats, bvh.fps, tuple(tips))
