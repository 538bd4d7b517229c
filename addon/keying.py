"""Writing retargeted motion into a new Action in bulk (keyframe_points.add + foreach_set), chunk by chunk.

Works with Blender 4.4+ slotted/layered actions (action.slots, layers, strips, channelbags; the only API in 5.x)
and with the older `action.fcurves` API. The user's data is never modified:

- keys are written in each bone's own rotation mode (quaternion, Euler of any order with continuity, axis-angle),
  so the rig's rotation modes stay as they are and the user's own actions keep driving it;
- the action the new one replaces is kept alive by a reference from the new action (no fake user on it);
- no Blender data is held between two calls: the keyer stores names (object, action, NLA track) and looks them up
  on every call, so an undo or a deletion in between ends the keying (`KeyingStopped`) instead of a crash.

Motion arrives at the source rate (20 fps); keys go on whole scene frames, resampled (slerp for rotations, linear
for locations), or on the source frames spread over the scene's rate when `keep_timing` is set.
"""

from __future__ import annotations

from collections.abc import Collection

import bpy
import numpy as np
from mathutils import Euler, Quaternion

from .retarget import RetargetResult, natural_name

GENERATION_PROPERTY = "motion_mamba"  # the custom property holding a generated Action's prompt, seed and settings
SOURCE_PROPERTY = "motion_mamba_source"  # the motion as the backend sent it (pack_motion's layout, flat float32)
LIVE_PROPERTY = "motion_mamba_live"  # marks the Live preview, which the next live result replaces
PARTIAL_PROPERTY = "motion_mamba_partial"  # set while keys are still arriving; removed by finish()
REPLACED_PROPERTY = "motion_mamba_replaced"  # the action this one replaced on its object (keeps it alive)
PLACEMENTS = ("ACTIVE", "NLA", "NONE")  # the object's active action / an NLA strip / only in the history list
SWITCH_GROUP = "Rig switches"


class KeyingStopped(ValueError):
    """What the keyer writes to is gone (undone, deleted or renamed): nothing more can be keyed."""


def _channelbag(action, slot):
    """The F-curve container of a slotted action for `slot` (one layer, one keyframe strip)."""
    layer = action.layers[0] if action.layers else action.layers.new("Layer")
    strip = layer.strips[0] if layer.strips else layer.strips.new(type="KEYFRAME")
    return strip.channelbag(slot, ensure=True)


def _slot(action, identifier: str | None):
    return next((s for s in getattr(action, "slots", ()) if s.identifier == identifier), None)


def assign_action(obj, action, slot_identifier: str | None = None) -> None:
    """Make `action` the object's active action (with the slot named `slot_identifier`, else its first one)."""
    anim = obj.animation_data or obj.animation_data_create()
    anim.action = action
    if action is not None and getattr(action, "slots", None):
        anim.action_slot = _slot(action, slot_identifier) or action.slots[0]


def action_fcurves(action):
    """All F-curves of an action, on either API."""
    if hasattr(action, "layers"):
        return [fc for layer in action.layers for strip in layer.strips for bag in strip.channelbags
                for fc in bag.fcurves]  # fmt: skip
    return list(action.fcurves)


def generation_settings(request, sample: int, preset: str, root_motion: bool, fps: float, **extra) -> dict:
    """What a generated Action's GENERATION_PROPERTY holds: the fields of ``request`` (an
    ``addon.wire.GenerateRequest``) for its sample ``sample`` (seed ``request.seed + sample``), the bone-map
    preset, root motion, the source frame rate, and ``extra``."""
    from .timeline import format_timeline

    fields = {k: v for k, v in request.to_header().items() if k != "samples"}
    if request.timeline:  # ID properties hold no mixed lists: the timeline as its text, the prompts as a title
        fields.update(prompt=request.title, timeline=format_timeline(request.timeline))
    return {**fields, "seed": request.seed + sample, "sample": sample, "preset": preset, "root_motion": root_motion,
            "fps": fps, **extra}  # fmt: skip


def slerp(q0: np.ndarray, q1: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Spherical interpolation of unit quaternions (..., 4) at fractions `u` (broadcast over the leading axes);
    the shorter arc is taken."""
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)
    dot = np.clip(np.abs(dot), 0.0, 1.0)
    theta = np.arccos(dot)
    sin = np.sin(theta)
    small = sin < 1e-6
    safe = np.where(small, 1.0, sin)
    w0 = np.where(small, 1.0 - u, np.sin((1.0 - u) * theta) / safe)
    w1 = np.where(small, u, np.sin(u * theta) / safe)
    out = w0 * q0 + w1 * q1
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


class Resampler:
    """Streams frames at `source_fps` into frames of a scene at `scene_fps`, chunk by chunk.

    Default: values on whole scene frames (0, 1, 2, ... from the start), slerped/lerped between the two source
    frames around each; a scene frame past the last source frame received waits for the next chunk.
    `keep_timing`: the source frames themselves, at offsets of scene_fps / source_fps frames (fractional).
    """

    def __init__(self, source_fps: float, scene_fps: float, keep_timing: bool = False) -> None:
        if not (source_fps > 0 and scene_fps > 0):
            raise ValueError(f"frame rates must be positive, got {source_fps} and {scene_fps}")
        self.ratio = scene_fps / source_fps  # scene frames per source frame
        self.keep_timing = keep_timing
        self.received = 0  # source frames pushed so far
        self.emitted = 0  # output frames returned so far
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # the last source frame (rotations, location)

    def push(self, rotations: np.ndarray, location: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feed source frames (T, B, 4) and (T, 3); returns the output frames now complete: their offsets from
        the start frame (M,), rotations (M, B, 4) and locations (M, 3)."""
        if self._last is not None:
            rotations = np.concatenate([self._last[0][None], rotations])
            location = np.concatenate([self._last[1][None], location])
        base = self.received - (self._last is not None)  # source index of rotations[0]
        self.received += len(rotations) - (self._last is not None)
        if self.received == 0:
            return np.zeros(0), rotations[:0], location[:0]
        if self.keep_timing:
            positions = np.arange(self.emitted, self.received, dtype=float)
            offsets = positions * self.ratio
        else:  # whole scene frames k with k / ratio <= the last source index
            end = int(np.floor((self.received - 1) * self.ratio + 1e-9)) + 1
            offsets = np.arange(self.emitted, end, dtype=float)
            positions = offsets / self.ratio
        self.emitted += len(offsets)
        self._last = (rotations[-1], location[-1])
        local = positions - base
        i = np.minimum(np.floor(local + 1e-9).astype(int), len(rotations) - 1)
        j = np.minimum(i + 1, len(rotations) - 1)
        u = np.clip(local - i, 0.0, 1.0)
        rot = slerp(rotations[i], rotations[j], u[:, None, None])
        loc = location[i] + (location[j] - location[i]) * u[:, None]
        return offsets, rot, loc


class _Rotations:
    """Quaternions -> the F-curve values of one bone's rotation mode, continuous across chunks."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.euler: Euler | None = None if mode in ("QUATERNION", "AXIS_ANGLE") else Euler((0, 0, 0), mode)
        self.axis = np.array([0.0, 1.0, 0.0])  # Blender's default axis, kept while the angle is ~0

    @property
    def path(self) -> str:
        return {"QUATERNION": "rotation_quaternion", "AXIS_ANGLE": "rotation_axis_angle"}.get(self.mode,
                                                                                           "rotation_euler")

    @property
    def size(self) -> int:
        return 3 if self.euler is not None else 4

    def __call__(self, quats: np.ndarray) -> np.ndarray:
        """(M, 4) w,x,y,z -> (M, size) channel values."""
        if self.mode == "QUATERNION":
            return quats
        if self.mode == "AXIS_ANGLE":  # (angle, x, y, z); the retargeter keeps w's sign continuous
            out = np.empty_like(quats)
            out[:, 0] = 2.0 * np.arccos(np.clip(quats[:, 0], -1.0, 1.0))
            for f, xyz in enumerate(quats[:, 1:]):
                norm = np.linalg.norm(xyz)
                if norm > 1e-6:
                    self.axis = xyz / norm
                out[f, 1:] = self.axis
            return out
        out = np.empty((len(quats), 3))
        for f, q in enumerate(quats):  # the Euler nearest the previous one (no 360-degree jumps)
            self.euler = Quaternion(q).to_euler(self.mode, self.euler)
            out[f] = self.euler
        return out


class ActionKeyer:
    """A new Action for the object `obj`, filled by successive `append(result)` calls.

    `place`: "ACTIVE" makes it the object's active action, "NLA" puts it as a strip on a new NLA track at
    `strip_frame` (the active action is untouched), "NONE" only creates it. `finish()` marks it complete;
    `discard()` removes it and whatever placed it.
    """

    def __init__(
        self, obj, name: str, frame_start: float = 1.0, source_fps: float = 20.0, scene_fps: float = 20.0,
        keep_timing: bool = False, place: str = "ACTIVE", strip_frame: float = 1.0,
    ) -> None:  # fmt: skip
        if place not in PLACEMENTS:
            raise ValueError(f"place must be one of {PLACEMENTS}, got {place!r}")
        self.object_name, self.frame_start, self.strip_frame = obj.name, frame_start, round(strip_frame)
        self.resampler = Resampler(source_fps, scene_fps, keep_timing)
        anim = obj.animation_data
        previous = anim.action if anim is not None and place == "ACTIVE" else None
        self.previous = previous.name if previous is not None else None
        slot = getattr(anim, "action_slot", None) if previous is not None else None
        self.previous_slot = slot.identifier if slot is not None else None
        action = bpy.data.actions.new(name)
        action.use_fake_user = True  # results stay in the history list while not assigned
        action[PARTIAL_PROPERTY] = True
        if previous is not None:
            action[REPLACED_PROPERTY] = previous  # an ID reference is a user: the user's action is not lost
        if hasattr(action, "slots"):
            self.slot = action.slots.new(id_type="OBJECT", name=obj.name).identifier
        else:
            self.slot = None
        self.action_name = action.name
        self.track: str | None = None
        if place == "ACTIVE":
            assign_action(obj, action, self.slot)
        elif place == "NLA":
            anim = obj.animation_data or obj.animation_data_create()
            track = anim.nla_tracks.new()
            track.name = self.track = action.name
            strip = track.strips.new(action.name, self.strip_frame, action)
            if self.slot is not None:
                strip.action_slot = _slot(action, self.slot)
        self.channels: list[tuple[str, int, str]] = []  # (data path, index, group) per column of `values`
        self.rotations: list[_Rotations] = []
        self.offsets = np.zeros(0)  # keyed frames, as offsets from frame_start
        self.values = np.zeros((0, 0))

    @classmethod
    def for_generation(
        cls, obj, scene, settings: dict, source_fps: float, name: str | None = None, place: str = "ACTIVE",
        keep_timing: bool = False,
    ) -> ActionKeyer:  # fmt: skip
        """A keyer for one generated motion: the Action is named "<prompt> (seed N)" unless `name` is given,
        `settings` (prompt, seed and whatever else describes the generation) are stored on it, keys start at the
        scene's start frame at its frame rate, and an NLA strip goes to the current frame."""
        name = name or f"{natural_name(settings['prompt'])} (seed {settings['seed']})"
        keyer = cls(obj, name, frame_start=scene.frame_start, source_fps=float(source_fps),
                    scene_fps=scene.render.fps / scene.render.fps_base, keep_timing=keep_timing, place=place,
                    strip_frame=scene.frame_current)  # fmt: skip
        keyer.resolve()[1][GENERATION_PROPERTY] = settings
        return keyer

    @property
    def received(self) -> int:
        """Source frames appended so far."""
        return self.resampler.received

    @property
    def keyed(self) -> int:
        """Frames keyed so far."""
        return len(self.offsets)

    def resolve(self):
        """(object, action) looked up by name now; KeyingStopped if either is gone."""
        obj = bpy.data.objects.get(self.object_name)
        if obj is None or obj.type != "ARMATURE":
            raise KeyingStopped(f"the target armature '{self.object_name}' is gone")
        action = bpy.data.actions.get(self.action_name)
        if action is None or PARTIAL_PROPERTY not in action:
            raise KeyingStopped(f"the action being keyed, '{self.action_name}', is gone (undone, deleted or renamed)")
        return obj, action

    def end_frame(self) -> float:
        """The scene frame where the keyed motion ends (on the NLA strip's timeline when placed there)."""
        last = self.frame_start + (self.offsets[-1] if len(self.offsets) else 0.0)
        return last if self.track is None else self.strip_frame + last - self.frame_start

    def _fcurves(self, action) -> list:
        """This keyer's F-curves (one per channel), found by data path; KeyingStopped if one is gone."""
        if self.slot is not None:
            slot = _slot(action, self.slot)
            if slot is None:
                raise KeyingStopped(f"the slot of '{action.name}' is gone")
            curves = _channelbag(action, slot).fcurves
        else:
            curves = action.fcurves
        found = [curves.find(path, index=index) for path, index, _ in self.channels]
        if any(fc is None for fc in found):
            raise KeyingStopped(f"an F-curve of '{action.name}' is gone")
        return found

    def _create_fcurves(self, obj, action, result: RetargetResult) -> None:
        for bone in result.bones:
            rotation = _Rotations(obj.pose.bones[bone].rotation_mode)
            self.rotations.append(rotation)
            path = f'pose.bones["{bone}"].{rotation.path}'
            self.channels += [(path, i, bone) for i in range(rotation.size)]
        self.channels += [(f'pose.bones["{result.root_bone}"].location', i, result.root_bone) for i in range(3)]
        bag = _channelbag(action, _slot(action, self.slot)) if self.slot is not None else None
        for path, index, group in self.channels:
            if bag is not None:
                bag.fcurves.new(path, index=index, group_name=group)
            else:
                action.fcurves.new(path, index=index, action_group=group)
        for path, value in result.switches.items():  # constant channels: one key at the start
            fc = (bag.fcurves.new(path, index=0, group_name=SWITCH_GROUP) if bag is not None
                  else action.fcurves.new(path, index=0, action_group=SWITCH_GROUP))  # fmt: skip
            fc.keyframe_points.add(1)
            fc.keyframe_points.foreach_set("co", [self.frame_start, float(value)])
            fc.update()

    def append(self, result: RetargetResult) -> None:
        """Key the next source frames (the chunk's rotations and root location) after those already received:
        every output frame that can be computed now is keyed; KeyingStopped if the action or object is gone."""
        obj, action = self.resolve()
        if not self.channels:
            self._create_fcurves(obj, action, result)
        offsets, rot, loc = self.resampler.push(np.asarray(result.rotations, dtype=float),
                                                np.asarray(result.root_location, dtype=float))  # fmt: skip
        if not len(offsets):
            return
        columns = [r(rot[:, b]) for b, r in enumerate(self.rotations)] + [loc]
        new_values = np.concatenate(columns, axis=1)
        start = len(self.offsets)
        self.offsets = np.concatenate([self.offsets, offsets])
        self.values = np.concatenate([self.values.reshape(start, new_values.shape[1]), new_values])
        co = np.empty((len(self.offsets), 2), dtype=np.float32)
        co[:, 0] = self.frame_start + self.offsets
        for c, fc in enumerate(self._fcurves(action)):
            co[:, 1] = self.values[:, c]
            fc.keyframe_points.add(len(offsets))
            fc.keyframe_points.foreach_set("co", co.ravel())
            fc.update()
        if self.track is not None:  # the strip spans the keys so far
            track = obj.animation_data.nla_tracks.get(self.track) if obj.animation_data else None
            strip = track.strips.get(action.name) if track is not None else None
            if strip is None:
                raise KeyingStopped(f"the NLA strip of '{action.name}' is gone")
            strip.action_frame_start, strip.action_frame_end = self.frame_start, max(co[-1, 0], self.frame_start + 1)

    def finish(self, source: np.ndarray | None = None) -> None:
        """Mark the action complete (a partial one is removed by `remove_partial_actions`), storing the motion
        it was keyed from (the backend's (T, 3 + 4J) frames: what Continue and Regenerate range edit)."""
        _, action = self.resolve()
        del action[PARTIAL_PROPERTY]
        if source is not None:
            action[SOURCE_PROPERTY] = np.ascontiguousarray(source, dtype=np.float32).ravel()

    def discard(self) -> None:
        """Remove the action (and its NLA track) and give the object back its previous action; whatever is
        already gone is skipped."""
        obj = bpy.data.objects.get(self.object_name)
        action = bpy.data.actions.get(self.action_name)
        anim = obj.animation_data if obj is not None else None
        if anim is not None and action is not None and anim.action == action:
            assign_action(obj, bpy.data.actions.get(self.previous or ""), self.previous_slot)
        if anim is not None and self.track is not None and self.track in anim.nla_tracks:
            anim.nla_tracks.remove(anim.nla_tracks[self.track])
        if action is not None:
            bpy.data.actions.remove(action)


def source_motion(action, joints: int) -> np.ndarray | None:
    """The motion a generated action was keyed from, (T, 3 + 4 * joints) float32, or None if it holds none."""
    if action is None or SOURCE_PROPERTY not in action:
        return None
    flat = np.asarray(action[SOURCE_PROPERTY], dtype=np.float32)
    width = 3 + 4 * joints
    return flat.reshape(-1, width) if flat.size % width == 0 and flat.size else None


def remove_partial_actions(keep: Collection[str] = ()) -> list[str]:
    """Remove generated actions left incomplete (by a redo or a file saved mid-generation), except those named in
    `keep` (still being keyed); objects wearing one get back the action it replaced, its NLA tracks go.
    Returns the names removed."""
    partial = [a for a in bpy.data.actions if PARTIAL_PROPERTY in a and a.name not in keep]
    for action in partial:
        for obj in bpy.data.objects:
            anim = obj.animation_data
            if anim is None:
                continue
            if anim.action == action:
                assign_action(obj, action.get(REPLACED_PROPERTY))
            for track in [t for t in anim.nla_tracks if any(s.action == action for s in t.strips)]:
                anim.nla_tracks.remove(track)
    names = [a.name for a in partial]
    for action in partial:
        bpy.data.actions.remove(action)
    return names


def replace_live_preview(names: Collection[str]) -> list[str]:
    """Make the actions ``names`` the Live preview: the previous preview's actions are removed (their users get
    the new one, as it was keyed in their place), these are marked. Returns the names removed."""
    old = [a for a in bpy.data.actions if LIVE_PROPERTY in a and a.name not in names]
    removed = [a.name for a in old]
    for action in old:
        bpy.data.actions.remove(action)
    for name in names:
        bpy.data.actions[name][LIVE_PROPERTY] = True
    return removed


def keep_live_preview() -> list[str]:
    """Live is off: the preview's actions become normal generated actions (nothing replaces them). Returns their
    names."""
    kept = [a for a in bpy.data.actions if LIVE_PROPERTY in a]
    for action in kept:
        del action[LIVE_PROPERTY]
    return [a.name for a in kept]
