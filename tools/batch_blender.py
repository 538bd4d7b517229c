"""The batch tool's Blender side: the scene and target armature, each motion keyed into an Action with the
add-on's ``Retargeter`` and ``ActionKeyer``, Blender's own BVH/FBX/glTF exporters, the .blend, GIF previews."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any

import bpy
import numpy as np
from batch_prompts import Row

from addon.armature import create_canonical_armature
from addon.canonical import CanonicalSkeleton
from addon.keying import GENERATION_PROPERTY, ActionKeyer, assign_action, generation_settings
from addon.retarget import Retargeter, TargetRig, map_bones

CANONICAL_ARMATURE = "MotionSkeleton"
EXPORTS = ("bvh", "fbx", "glb")


@contextlib.contextmanager
def blender_output_to(log_path: Path):
    """Send what Blender's exporters print (C and Python, file descriptor 1) to a log, not over the progress."""
    sys.stdout.flush()
    saved = os.dup(1)
    with log_path.open("a") as log:
        os.dup2(log.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _exporter(fmt: str, path: Path):
    """Blender's exporter call for ``fmt`` writing ``path`` (the selection, its active action)."""
    if fmt == "fbx":
        return lambda start, end: bpy.ops.export_scene.fbx(
            filepath=str(path), use_selection=True, object_types={"ARMATURE", "MESH"}, bake_anim=True,
            bake_anim_use_all_actions=False, bake_anim_use_nla_strips=False, add_leaf_bones=False)  # fmt: skip
    if fmt == "glb":
        return lambda start, end: bpy.ops.export_scene.gltf(
            filepath=str(path), export_format="GLB", use_selection=True, export_animations=True,
            export_animation_mode="ACTIVE_ACTIONS")  # fmt: skip
    return lambda start, end: bpy.ops.export_anim.bvh(filepath=str(path), frame_start=start, frame_end=end)


class Target:
    """The scene, the target armature, and everything written from Blender: Actions, exports, the .blend."""

    def __init__(self, args: argparse.Namespace, blend_out: Path | None) -> None:
        self.args, self.blend_out = args, blend_out
        self.own_scene = False  # an empty scene this tool made (its frame rate is ours to set)
        if blend_out is not None and blend_out.is_file() and not args.force:
            bpy.ops.wm.open_mainfile(filepath=str(blend_out))  # earlier runs' Actions are kept and added to
        elif args.blend:
            bpy.ops.wm.open_mainfile(filepath=str(args.blend))
        elif not bpy.data.filepath:  # no scene given: an empty one (Blender's startup cube is no use here)
            bpy.ops.wm.read_factory_settings(use_empty=True)
            self.own_scene = True
        self.scene = bpy.context.scene
        self.obj = None
        if args.armature:
            self.obj = bpy.data.objects.get(args.armature)
            if self.obj is None or self.obj.type != "ARMATURE":
                armatures = [o.name for o in bpy.data.objects if o.type == "ARMATURE"]
                raise ValueError(f"no armature object {args.armature!r} in the scene; armatures: {armatures or 'none'}")
        elif (existing := bpy.data.objects.get(CANONICAL_ARMATURE)) is not None and existing.type == "ARMATURE":
            self.obj = existing
        self.dirty = False  # whether there is anything new to save

    def actions(self) -> dict[str, Any]:
        """The batch's Actions in the scene by key."""
        return {a[GENERATION_PROPERTY]["key"]: a for a in bpy.data.actions if "key" in a.get(GENERATION_PROPERTY, {})}

    def prepare(self, skeleton: CanonicalSkeleton, fps: float) -> None:
        """Create the canonical armature when no target was named; read the target's bones."""
        if self.own_scene:  # one key per generated frame
            self.scene.render.fps, self.scene.render.fps_base = round(fps), 1.0
        if self.obj is None:
            self.obj = create_canonical_armature(self.scene.collection, skeleton, CANONICAL_ARMATURE)
        self.skeleton, self.fps = skeleton, fps
        self.rig = TargetRig.from_armature(self.obj)
        self.bone_map = map_bones(self.rig.names, self.args.preset).require(self.obj.name, self.rig.names)

    def add(self, row: Row, root: np.ndarray, rotations: np.ndarray) -> Any:
        """Retarget and key one motion into a new Action (replacing the batch's Action of the same key)."""
        old = self.actions().get(row.key)
        if old is not None:
            bpy.data.actions.remove(old)
        root_motion = not self.args.in_place
        retarget = Retargeter(self.skeleton, self.rig, self.bone_map, root_motion=root_motion)
        settings = generation_settings(row.request, 0, self.bone_map.preset, root_motion, self.fps, key=row.key,
                                       stem=row.stem)  # fmt: skip
        keyer = ActionKeyer.for_generation(self.obj, self.scene, settings, self.fps, name=row.name or None,
                                           place="NONE", keep_timing=True)  # fmt: skip
        keyer.append(retarget(root, rotations))
        keyer.finish()
        self.dirty = True
        last = math.ceil(keyer.end_frame())
        if self.obj.name == CANONICAL_ARMATURE and self.scene.frame_end < last:
            self.scene.frame_end = last
        return bpy.data.actions[keyer.action_name]

    def export(self, action: Any, fmt: str, path: Path) -> None:
        """Write the armature (and the meshes under it) animated by ``action`` as BVH, FBX or GLB."""
        anim = self.obj.animation_data
        previous = (anim.action, getattr(anim, "action_slot", None)) if anim else (None, None)
        assign_action(self.obj, action)
        layer = bpy.context.view_layer
        chosen = {self.obj, *self.obj.children_recursive}
        for obj in layer.objects:
            obj.select_set(obj in chosen)
        layer.objects.active = self.obj
        start, end = self.scene.frame_start, math.ceil(action.frame_range[1])
        frame_end, self.scene.frame_end = self.scene.frame_end, end  # FBX and glTF export the scene's range
        try:
            result = _exporter(fmt, path)(start, end)
        finally:
            self.scene.frame_end = frame_end
            self.obj.animation_data.action = previous[0]
            if previous[0] is not None and previous[1] is not None:
                self.obj.animation_data.action_slot = previous[1]
        if "FINISHED" not in result or not path.is_file():
            raise RuntimeError(f"Blender's {fmt.upper()} exporter did not write {path}")

    def save(self) -> None:
        """Write the .blend with every Action (atomically: a temporary file, then a rename)."""
        if self.blend_out is None or not self.dirty:
            return
        if self.obj.animation_data is None or self.obj.animation_data.action is None:  # open on something animated
            actions = list(self.actions().values())
            if actions:
                assign_action(self.obj, actions[0])
        tmp = self.blend_out.with_name(self.blend_out.stem + ".partial.blend")
        bpy.ops.wm.save_as_mainfile(filepath=str(tmp), copy=True, compress=True)
        os.replace(tmp, self.blend_out)
        self.dirty = False


def write_preview(skeleton_name: str, root: np.ndarray, rotations: np.ndarray, fps: float, title: str,
                  path: Path) -> None:  # fmt: skip
    """A stick-figure GIF of the generated (canonical) motion, with the backend's own preview code."""
    try:
        from backend.motion import forward_kinematics
        from backend.preview import render_preview
        from backend.skeleton import SKELETONS
    except ImportError as exc:
        raise RuntimeError(f"--preview needs the project's Python packages (torch, matplotlib): {exc}") from None
    skeleton = SKELETONS[skeleton_name]
    positions = forward_kinematics(root.astype(np.float64), rotations.astype(np.float64), skeleton)
    render_preview(positions, path, skeleton=skeleton, title=title[:60], fps=fps)
