"""Operators: generate, continue / regenerate a range of a generated action, cancel, canonical armature, local
backend, history (apply / delete), timeline rows."""

from __future__ import annotations

import random

import bpy
from bpy.app.handlers import persistent

from .armature import create_canonical_armature
from .canonical import SMPL22_BUILTIN
from .keying import GENERATION_PROPERTY, SOURCE_PROPERTY, assign_action, remove_partial_actions, source_motion
from .properties import generate_request, preferences, target_armature
from .session import Session, Settings
from .wire import GenerateRequest

_session: Session | None = None
UNDOABLE = {"REGISTER", "UNDO"}


def session(context) -> Session:
    """The add-on's connection, (re)made when the backend address or keys in the preferences change."""
    global _session
    prefs = preferences(context)
    if _session is None or (_session.endpoint, _session.keys_dir) != (prefs.endpoint, prefs.keys_dir):
        close_session()
        _session = Session(prefs.endpoint, prefs.keys_dir)
    return _session


def close_session() -> None:
    """Close the connection, discarding a running generation and stopping a backend the add-on started."""
    global _session
    if _session is not None:
        _session.close()
        _session.stop_backend()
        _session = None


def current_session() -> Session | None:
    """The session if one exists (the panel shows its state without connecting)."""
    return _session


@persistent
def stop_generation(*_args) -> None:
    """Before an undo, redo or file load (they replace Blender's data): a running generation stops, the server is
    told, and nothing of it is kept (the state undone to predates its actions)."""
    if _session is not None and _session.job is not None:
        _session.abandon("Stopped by undo, redo or a file load: the generation was cancelled, nothing was kept")


@persistent
def drop_partial_actions(*_args) -> None:
    """After an undo, redo or load: remove generated actions left incomplete (e.g. in an undo step the user made
    while keys were streaming in, then redone, or in a file saved then)."""
    remove_partial_actions(keep=_session.keyed_actions() if _session is not None else ())


def redraw_panels() -> None:
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()


def _run(operator, context, settings: Settings) -> set[str]:
    """Send a generation for the target armature; an error goes to the panel and the report."""
    try:
        session(context).generate(settings, target_armature(context))
    except (ValueError, TypeError, ConnectionError) as exc:  # UnmappableArmatureError is a ValueError
        session(context).error = str(exc)
        operator.report({"ERROR"}, str(exc))
        return {"CANCELLED"}
    redraw_panels()
    return {"FINISHED"}


def panel_settings(props, request, motion=None, live: bool = False) -> Settings:
    """How the panel's options put ``request``'s motion on the rig."""
    return Settings(request, props.preset, props.root_motion, props.keep_timing, props.nla_strip, props.foot_lock,
                    motion, live)  # fmt: skip


def edited_action(context):
    """The target armature's active action when it was generated here (it keeps the motion it was keyed from)."""
    target = target_armature(context)
    action = target.animation_data.action if target is not None and target.animation_data else None
    return action if action is not None and SOURCE_PROPERTY in action else None


def _edit(operator, context, start: int | None, stop: int | None) -> set[str]:
    """Generate frames [start, stop) of the active generated action's motion for the panel's prompt (None: from
    its end, the panel's duration long) into a new action; the original stays as it is."""
    props = context.scene.motion_mamba
    action = edited_action(context)
    skeleton = session(context).skeleton or SMPL22_BUILTIN
    motion = source_motion(action, len(skeleton.names)) if action is not None else None
    if motion is None:
        operator.report({"ERROR"}, "The target's active action was not generated here: nothing to continue")
        return {"CANCELLED"}
    fps = float(action[GENERATION_PROPERTY].get("fps", 20.0))
    if start is None:
        start, stop = len(motion), len(motion) + max(1, round(props.seconds * fps))
    if props.randomise_seed:
        props.seed = random.randint(0, props.bl_rna.properties["seed"].hard_max)
    request = GenerateRequest(props.prompt, seed=props.seed, guidance=props.guidance, steps=props.steps,
                              edit=(start, stop))
    return _run(operator, context, panel_settings(props, request, motion))


class MOTION_OT_generate(bpy.types.Operator):
    """Generate a motion from the prompt onto the target armature (a new Action; yours stay untouched)"""

    bl_idname = "motion_mamba.generate"
    bl_label = "Generate"

    def execute(self, context):
        props = context.scene.motion_mamba
        if props.randomise_seed:
            props.seed = random.randint(0, props.bl_rna.properties["seed"].hard_max)  # the backend's range
        return _run(self, context, panel_settings(props, generate_request(props)))


class MOTION_OT_continue_action(bpy.types.Operator):
    """Continue the target's generated action from its end: the prompt, for the panel's duration (a new Action;
    the original stays as it is)"""

    bl_idname = "motion_mamba.continue_action"
    bl_label = "Continue action"

    @classmethod
    def poll(cls, context):
        return edited_action(context) is not None

    def execute(self, context):
        return _edit(self, context, None, None)


class MOTION_OT_regenerate_range(bpy.types.Operator):
    """Regenerate the scene's preview range of the target's generated action for the prompt, keeping the rest
    (a new Action; the original stays as it is)"""

    bl_idname = "motion_mamba.regenerate_range"
    bl_label = "Regenerate preview range"

    @classmethod
    def poll(cls, context):
        return edited_action(context) is not None and context.scene.use_preview_range

    def execute(self, context):
        scene, action = context.scene, edited_action(context)
        info = action[GENERATION_PROPERTY]
        per_frame = float(info.get("fps", 20.0)) / (scene.render.fps / scene.render.fps_base)  # source frames
        first = float(info.get("frame_start", scene.frame_start))
        start = max(0, round((scene.frame_preview_start - first) * per_frame))
        stop = round((scene.frame_preview_end + 1 - first) * per_frame)
        return _edit(self, context, start, stop)


class MOTION_OT_cancel(bpy.types.Operator):
    """Stop the running generation; its partial Action is removed"""

    bl_idname = "motion_mamba.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, _context):
        return _session is not None and _session.job is not None

    def execute(self, _context):
        _session.cancel()
        redraw_panels()
        return {"FINISHED"}


class MOTION_OT_create_armature(bpy.types.Operator):
    """Add an armature with the backend's canonical skeleton (the built-in one when offline) and target it"""

    bl_idname = "motion_mamba.create_armature"
    bl_label = "Create canonical armature"
    bl_options = UNDOABLE

    def execute(self, context):
        skeleton = (_session.skeleton if _session is not None else None) or SMPL22_BUILTIN
        obj = create_canonical_armature(context.scene.collection, skeleton)
        context.scene.motion_mamba.target = obj
        return {"FINISHED"}


class MOTION_OT_start_backend(bpy.types.Operator):
    """Start `python -m backend.serve` with the interpreter and project folder from the add-on preferences"""

    bl_idname = "motion_mamba.start_backend"
    bl_label = "Start local backend"

    def execute(self, context):
        prefs = preferences(context)
        if not prefs.python or not prefs.project:
            self.report({"ERROR"}, "Set the Python interpreter and project folder in the add-on preferences first.")
            return {"CANCELLED"}
        try:
            session(context).start_backend(bpy.path.abspath(prefs.python), bpy.path.abspath(prefs.project),
                                           prefs.arguments)
        except (OSError, ValueError) as exc:
            self.report({"ERROR"}, f"Could not start the backend: {exc}")
            return {"CANCELLED"}
        return {"FINISHED"}


class MOTION_OT_stop_backend(bpy.types.Operator):
    """Stop the backend this add-on started"""

    bl_idname = "motion_mamba.stop_backend"
    bl_label = "Stop local backend"

    @classmethod
    def poll(cls, _context):
        return _session is not None and _session.backend_process is not None

    def execute(self, _context):
        _session.stop_backend()
        return {"FINISHED"}


def _history_action(context):
    props = context.scene.motion_mamba
    actions = bpy.data.actions
    if 0 <= props.history_index < len(actions) and "motion_mamba" in actions[props.history_index]:
        return actions[props.history_index]
    return None


class MOTION_OT_apply_action(bpy.types.Operator):
    """Put the selected generated Action on the target armature"""

    bl_idname = "motion_mamba.apply_action"
    bl_label = "Apply"
    bl_options = UNDOABLE

    @classmethod
    def poll(cls, context):
        return _history_action(context) is not None and target_armature(context) is not None

    def execute(self, context):
        assign_action(target_armature(context), _history_action(context))
        return {"FINISHED"}


class MOTION_OT_delete_action(bpy.types.Operator):
    """Delete the selected generated Action"""

    bl_idname = "motion_mamba.delete_action"
    bl_label = "Delete"
    bl_options = UNDOABLE

    @classmethod
    def poll(cls, context):
        return _history_action(context) is not None

    def execute(self, context):
        bpy.data.actions.remove(_history_action(context))
        return {"FINISHED"}


class MOTION_OT_timeline_edit(bpy.types.Operator):
    """Add, remove or move a row of the prompt timeline"""

    bl_idname = "motion_mamba.timeline_edit"
    bl_label = "Edit timeline"
    bl_options = UNDOABLE

    action: bpy.props.EnumProperty(items=[("ADD", "Add", "Add a row after the selected one"),
                                          ("REMOVE", "Remove", "Remove the selected row"),
                                          ("UP", "Move up", "Move the selected row earlier"),
                                          ("DOWN", "Move down", "Move the selected row later")])  # fmt: skip

    def execute(self, context):
        props = context.scene.motion_mamba
        rows, index = props.timeline, props.timeline_index
        if self.action == "ADD":
            row = rows.add()
            row.prompt = props.prompt if len(rows) == 1 else ""
            rows.move(len(rows) - 1, min(index + 1, len(rows) - 1))
            props.timeline_index = min(index + 1, len(rows) - 1)
        elif not 0 <= index < len(rows):
            return {"CANCELLED"}
        elif self.action == "REMOVE":
            rows.remove(index)
            props.timeline_index = min(index, len(rows) - 1)
        else:
            other = index - 1 if self.action == "UP" else index + 1
            if not 0 <= other < len(rows):
                return {"CANCELLED"}
            rows.move(index, other)
            props.timeline_index = other
        return {"FINISHED"}


CLASSES = (MOTION_OT_generate, MOTION_OT_cancel, MOTION_OT_create_armature, MOTION_OT_start_backend,
           MOTION_OT_stop_backend, MOTION_OT_apply_action, MOTION_OT_delete_action,
           MOTION_OT_timeline_edit, MOTION_OT_continue_action, MOTION_OT_regenerate_range)  # fmt: skip
