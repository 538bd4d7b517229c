"""Writing retargeted motion into a new Action in bulk (keyframe_points.add + foreach_set), chunk by chunk.

Works with Blender 4.4+ slotted/layered actions (action.slots, layers, strips, channelbags; the only API in 5.x)
and with the older `action.fcurves` API. The user's existing actions are never modified.
"""

from __future__ import annotations

import bpy
import numpy as np

from .retarget import RetargetResult, natural_name

GENERATION_PROPERTY = "motion_mamba"  # the custom property holding a generated Action's prompt, seed and settings
ROTATION_PATH = 'pose.bones["{}"].rotation_quaternion'
LOCATION_PATH = 'pose.bones["{}"].location'


def _channelbag(action, slot):
    """The F-curve container of a slotted action for `slot` (one layer, one keyframe strip)."""
    layer = action.layers[0] if action.layers else action.layers.new("Layer")
    strip = layer.strips[0] if layer.strips else layer.strips.new(type="KEYFRAME")
    return strip.channelbag(slot, ensure=True)


def assign_action(obj, action) -> None:
    """Make `action` the object's active action (with its first slot on slotted actions)."""
    anim = obj.animation_data or obj.animation_data_create()
    anim.action = action
    if hasattr(action, "slots") and action.slots:
        anim.action_slot = action.slots[0]


def action_fcurves(action):
    """All F-curves of an action, on either API."""
    if hasattr(action, "layers"):
        return [fc for layer in action.layers for strip in layer.strips for bag in strip.channelbags
                for fc in bag.fcurves]  # fmt: skip
    return list(action.fcurves)


class ActionKeyer:
    """A new Action for `obj` (made its active action when `assign`), filled by successive `append(result)`
    calls; `discard()` removes it again."""

    def __init__(
        self, obj, name: str, frame_start: float = 1.0, frame_step: float = 1.0, assign: bool = True
    ) -> None:
        self.obj, self.frame_start, self.frame_step = obj, frame_start, frame_step
        anim = obj.animation_data
        self.previous = (anim.action, getattr(anim, "action_slot", None)) if anim else (None, None)
        # keep the user's action alive once unassigned (undone again by discard())
        self.faked = assign and self.previous[0] is not None and not self.previous[0].use_fake_user
        if self.faked:
            self.previous[0].use_fake_user = True
        self.action = bpy.data.actions.new(name)
        self.action.use_fake_user = True  # results stay in the history list while not assigned
        self.slot = self.action.slots.new(id_type="OBJECT", name=obj.name) if hasattr(self.action, "slots") else None
        if assign:
            assign_action(obj, self.action)
        self.fcurves: list = []
        self.rotation_modes: dict[str, str] = {}  # restored by discard()
        self.frames = np.zeros(0)
        self.values = np.zeros((0, 0))

    @classmethod
    def for_generation(
        cls, obj, scene, settings: dict, source_fps: float, name: str | None = None, assign: bool = True
    ) -> ActionKeyer:
        """A keyer for one generated motion: the Action is named "<prompt> (seed N)" unless `name` is given,
        `settings` (prompt, seed and whatever else describes the generation) are stored on it, and frames at
        `source_fps` are spread over the scene's frame rate from its start frame."""
        step = scene.render.fps / scene.render.fps_base / float(source_fps)
        name = name or f"{natural_name(settings['prompt'])} (seed {settings['seed']})"
        keyer = cls(obj, name, frame_start=scene.frame_start, frame_step=step, assign=assign)
        keyer.action[GENERATION_PROPERTY] = settings
        return keyer

    def _create_fcurves(self, result: RetargetResult) -> None:
        bag = _channelbag(self.action, self.slot) if self.slot is not None else None
        channels = [(ROTATION_PATH.format(b), i, b) for b in result.bones for i in range(4)]
        channels += [(LOCATION_PATH.format(result.root_bone), i, result.root_bone) for i in range(3)]
        for path, index, group in channels:
            if bag is not None:
                self.fcurves.append(bag.fcurves.new(path, index=index, group_name=group))
            else:
                self.fcurves.append(self.action.fcurves.new(path, index=index, action_group=group))
        for bone in result.bones:
            pose_bone = self.obj.pose.bones[bone]
            self.rotation_modes[bone] = pose_bone.rotation_mode
            pose_bone.rotation_mode = "QUATERNION"

    def append(self, result: RetargetResult) -> None:
        """Key the next frames (the chunk's rotations and root location) after those already written."""
        if not self.fcurves:
            self._create_fcurves(result)
        count = result.rotations.shape[0]
        start = len(self.frames)
        new_frames = self.frame_start + self.frame_step * np.arange(start, start + count)
        new_values = np.concatenate([result.rotations.reshape(count, -1), result.root_location], axis=1)
        self.frames = np.concatenate([self.frames, new_frames])
        self.values = np.concatenate([self.values.reshape(start, new_values.shape[1]), new_values])
        co = np.empty((len(self.frames), 2), dtype=np.float32)
        co[:, 0] = self.frames
        for c, fc in enumerate(self.fcurves):
            co[:, 1] = self.values[:, c]
            fc.keyframe_points.add(count)
            fc.keyframe_points.foreach_set("co", co.ravel())
            fc.update()

    def discard(self) -> None:
        """Remove the action and give the object back its previous action."""
        anim = self.obj.animation_data
        if anim is not None and anim.action == self.action:
            anim.action = self.previous[0]
            if self.previous[1] is not None and self.previous[0] is not None:
                anim.action_slot = self.previous[1]
        if self.faked:
            self.previous[0].use_fake_user = False
        for bone, mode in self.rotation_modes.items():
            self.obj.pose.bones[bone].rotation_mode = mode
        bpy.data.actions.remove(self.action)
        self.action = None
