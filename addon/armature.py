"""Building armatures from joint positions: the canonical armature for the backend's skeleton."""

from __future__ import annotations

from collections.abc import Sequence

import bpy
import numpy as np

from .canonical import CanonicalSkeleton
from .retarget import SOURCE_TO_BLENDER


def build_armature(
    collection,
    name: str,
    bone_names: Sequence[str],
    parents: Sequence[int],
    heads: np.ndarray,
    tails: np.ndarray,
    rolls: Sequence[float] | None = None,
):
    """A new armature object in `collection` with one bone per row of heads/tails (armature space)."""
    data = bpy.data.armatures.new(name)
    obj = bpy.data.objects.new(name, data)
    collection.objects.link(obj)
    view_layer = bpy.context.view_layer
    previous_active = view_layer.objects.active
    view_layer.objects.active = obj
    with bpy.context.temp_override(active_object=obj, object=obj):
        bpy.ops.object.mode_set(mode="EDIT")
        edit = []
        for i, bone_name in enumerate(bone_names):
            bone = data.edit_bones.new(bone_name)
            bone.head, bone.tail = tuple(heads[i]), tuple(tails[i])
            bone.roll = rolls[i] if rolls is not None else 0.0
            if parents[i] >= 0:
                bone.parent = edit[parents[i]]
            edit.append(bone)
        bpy.ops.object.mode_set(mode="OBJECT")
    view_layer.objects.active = previous_active if previous_active is not None else obj
    return obj


def canonical_bones(skeleton: CanonicalSkeleton, height_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Heads and tails (J, 3) in Blender axes (Z up, facing -Y) for the skeleton's rest pose, feet on z=0.

    A bone points at its only child, or its first one above it (the spine from the pelvis); leaves continue
    their parent's direction (or point up).
    """
    heads = skeleton.rest_positions() @ SOURCE_TO_BLENDER.T * height_scale
    tails = np.empty_like(heads)
    for j in range(len(heads)):
        children = skeleton.children(j)
        if len(children) > 1:  # pelvis, chest: aim up the spine
            children = [max(children, key=lambda c: heads[c][2])]
        if children:
            tails[j] = heads[children[0]]
        else:
            p = skeleton.parents[j]
            direction = heads[j] - heads[p] if p >= 0 else np.array([0.0, 0.0, 1.0])
            tails[j] = heads[j] + direction / np.linalg.norm(direction) * 0.08 * height_scale
        if np.linalg.norm(tails[j] - heads[j]) < 1e-4:
            tails[j] = heads[j] + np.array([0.0, 0.0, 0.05 * height_scale])
    return heads, tails


def create_canonical_armature(collection, skeleton: CanonicalSkeleton, name: str = "MotionSkeleton"):
    """The backend's skeleton as an armature (bones named like its joints), in `collection`."""
    heads, tails = canonical_bones(skeleton)
    return build_armature(collection, name, skeleton.names, skeleton.parents, heads, tails)
