"""The panel's settings (per scene) and the add-on preferences."""

from __future__ import annotations

import os

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from . import wire
from .retarget import PRESET_LABELS
from .timeline import rows_from_durations

ADDON_ID = __package__
# MOTION_MAMBA_ENDPOINT overrides the default address (headless runs, tests)
DEFAULT_ENDPOINT = os.environ.get("MOTION_MAMBA_ENDPOINT", wire.DEFAULT_ENDPOINT)


def _is_armature(_self, obj) -> bool:
    return obj.type == "ARMATURE"


def _live_changed(props, context) -> None:
    from . import live  # live imports this module

    live.changed(props, context)


def _live_toggled(props, context) -> None:
    from . import live

    live.toggled(props, context)


DEFAULTS = wire.GenerateRequest.defaults()  # the request's optional fields: the panel starts from these
INT_MAX = 2**31 - 1  # Blender's int properties are 32-bit


def _seconds(limits: wire.Limits) -> FloatProperty:
    return FloatProperty(name="Duration", description="Length of the motion in seconds", default=DEFAULTS["seconds"],
                         min=limits.min_seconds, max=limits.max_seconds, subtype="TIME_ABSOLUTE",
                         unit="TIME_ABSOLUTE")  # fmt: skip


def _seed(limits: wire.Limits) -> IntProperty:
    return IntProperty(name="Seed", description="Same prompt + seed + settings give the same motion",
                       default=DEFAULTS["seed"], min=limits.min_seed, max=min(limits.max_seed, INT_MAX),
                       update=_live_changed)  # fmt: skip


def _guidance(limits: wire.Limits) -> FloatProperty:
    return FloatProperty(name="Guidance", description="Classifier-free guidance: how closely to follow the prompt",
                         default=DEFAULTS["guidance"], min=limits.min_guidance, max=limits.max_guidance)  # fmt: skip


def _steps(limits: wire.Limits) -> IntProperty:
    return IntProperty(name="Steps", description="Denoising steps (a few use the backend's fast sampler; more: slower)",
                       default=DEFAULTS["steps"],
                       min=limits.min_steps, max=min(limits.max_steps, INT_MAX))  # fmt: skip


def _samples(limits: wire.Limits) -> IntProperty:
    return IntProperty(name="Samples", description="Variations to generate (one Action each)",
                       default=DEFAULTS["samples"], min=limits.min_samples,
                       max=min(limits.max_samples, INT_MAX))  # fmt: skip


# the request's optional fields, whose ranges the backend sets (announced in hello)
RANGED = {"seconds": _seconds, "seed": _seed, "guidance": _guidance, "steps": _steps, "samples": _samples}


class TimelineRowSettings(bpy.types.PropertyGroup):
    """One row of the panel's prompt timeline: what happens, for how long (rows play back to back)."""

    prompt: StringProperty(name="Prompt", description="What happens in this part, e.g. 'a person waves'")
    seconds: FloatProperty(name="Duration", description="How long this part lasts", default=3.0, min=0.5,
                           soft_max=60.0, subtype="TIME_ABSOLUTE", unit="TIME_ABSOLUTE")  # fmt: skip


class MotionSettings(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description="Describe the motion, e.g. 'a person walks forward and waves'",
                           update=_live_changed)  # fmt: skip
    live: BoolProperty(name="Live", default=False, update=_live_toggled,
                       description="Regenerate as the prompt or seed changes, with the backend's fast sampler, "
                       "replacing the preview action in place; off keeps the last result")  # fmt: skip
    use_timeline: BoolProperty(name="Timeline", default=False,
                               description="Direct one continuous motion by a list of prompts and durations "
                               "(played back to back, blended where they meet)")  # fmt: skip
    timeline: CollectionProperty(type=TimelineRowSettings)
    timeline_index: IntProperty(name="Timeline row", default=0)
    seconds: _seconds(wire.DEFAULT_LIMITS)
    seed: _seed(wire.DEFAULT_LIMITS)
    randomise_seed: BoolProperty(name="Randomise", description="Pick a new seed for every generation", default=True)
    guidance: _guidance(wire.DEFAULT_LIMITS)
    steps: _steps(wire.DEFAULT_LIMITS)
    samples: _samples(wire.DEFAULT_LIMITS)
    target: PointerProperty(name="Armature", type=bpy.types.Object, poll=_is_armature,
                            description="Armature to animate (empty: the active armature)")  # fmt: skip
    preset: EnumProperty(name="Bone map", description="How the armature's bones are named",
                         items=[(k, v, "") for k, v in PRESET_LABELS.items()], default="AUTO")  # fmt: skip
    root_motion: BoolProperty(name="Root motion", default=True,
                              description="Move the character through space (off: in place, height kept)")  # fmt: skip
    foot_lock: BoolProperty(name="Foot locking", default=True,
                            description="Feet planted in the motion stay planted")  # fmt: skip
    keep_timing: BoolProperty(name="Source timing", default=False,
                              description="Key the motion's own frames (20 fps), spread over the scene's frame rate "
                              "on fractional frames; off: keys on whole frames, resampled")  # fmt: skip
    nla_strip: BoolProperty(name="As NLA strip", default=False,
                            description="Place the result as an NLA strip at the current frame; the active action "
                            "stays as it is")  # fmt: skip
    history_index: IntProperty(name="History", default=-1)
    show_actions: BoolProperty(name="What this model knows", description="List the actions the model was trained on",
                               default=False)


class MotionPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    endpoint: StringProperty(name="Backend address", default=DEFAULT_ENDPOINT,
                             description="ZeroMQ address of the generation backend")  # fmt: skip
    python: StringProperty(name="Python interpreter", subtype="FILE_PATH",
                           description="Python with the backend installed (e.g. <project>/.venv/bin/python)")
    project: StringProperty(name="Project folder", subtype="DIR_PATH",
                            description="Folder holding the backend package (python -m backend.serve runs there)")
    arguments: StringProperty(name="Backend arguments", default="",
                              description="Extra arguments for backend.serve, e.g. --checkpoint DIR --device cuda")
    keys_dir: StringProperty(name="Remote keys", subtype="DIR_PATH",
                             description="For a remote backend: folder from `python -m backend.serve keygen` "
                             "(server.key, client.key_secret)")  # fmt: skip

    def draw(self, _context) -> None:
        layout = self.layout
        layout.prop(self, "endpoint")
        layout.prop(self, "keys_dir")
        box = layout.box()
        box.label(text="Start local backend")
        box.prop(self, "python")
        box.prop(self, "project")
        box.prop(self, "arguments")


def preferences(context):
    """The add-on preferences, or their defaults when the add-on runs unregistered with Blender (tests)."""
    addon = context.preferences.addons.get(ADDON_ID)
    if addon is not None:
        return addon.preferences
    endpoint = os.environ.get("MOTION_MAMBA_ENDPOINT", wire.DEFAULT_ENDPOINT)
    return type("Defaults", (), {"endpoint": endpoint, "python": "", "project": "", "arguments": "", "keys_dir": ""})


def generate_request(props) -> wire.GenerateRequest:
    """The request the panel's settings ask for (its fields read from the settings of the same names): the
    prompt, or with "Timeline" on, the rows back to back (the duration is then theirs)."""
    fields = {name: getattr(props, name) for name in DEFAULTS}
    if props.use_timeline:
        rows = rows_from_durations((row.prompt, row.seconds) for row in props.timeline)
        fields.pop("seconds")
        return wire.GenerateRequest(timeline=rows, **fields)
    return wire.GenerateRequest(props.prompt, **fields)


def target_armature(context):
    """The armature to animate: the chosen one, else the active object if it is an armature."""
    target = context.scene.motion_mamba.target
    if target is None and context.active_object is not None and context.active_object.type == "ARMATURE":
        return context.active_object
    return target


CLASSES = (TimelineRowSettings, MotionSettings, MotionPreferences)
_applied: wire.Limits | None = None  # the limits the ranged settings were last defined with


def apply_limits(limits: wire.Limits) -> None:
    """Give the request's settings the ranges a backend announced (values outside are clamped)."""
    global _applied
    if limits != _applied:
        for name, define in RANGED.items():
            setattr(MotionSettings, name, define(limits))
        _applied = limits


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.motion_mamba = PointerProperty(type=MotionSettings)


def unregister() -> None:
    global _applied
    _applied = None
    del bpy.types.Scene.motion_mamba
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
