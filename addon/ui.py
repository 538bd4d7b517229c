"""The "Motion" tab of the 3D View sidebar and its history list."""

from __future__ import annotations

import textwrap

import bpy
import numpy as np

from .canonical import SMPL22_NAMES
from .live import live_steps
from .operators import current_session
from .properties import target_armature
from .retarget import PRESET_LABELS, REQUIRED_JOINTS, BoneMap, map_bones, rig_warnings

_warnings_cache: dict[tuple, list[str]] = {}  # the last armature's warnings: the panel redraws often


def armature_warnings(obj, bone_map: BoneMap) -> list[str]:
    """`rig_warnings` of the armature object, recomputed only when its bones, placement or map change."""
    heads = np.empty(3 * len(obj.data.bones), dtype=np.float32)
    obj.data.bones.foreach_get("head_local", heads)
    key = (obj.name, bone_map.preset, tuple(sorted(bone_map.bones.items())), heads.tobytes(),
           np.array(obj.matrix_world, dtype=np.float32).tobytes())  # fmt: skip
    if key not in _warnings_cache:
        _warnings_cache.clear()
        _warnings_cache[key] = rig_warnings(obj, bone_map)
    return _warnings_cache[key]


class MOTION_UL_history(bpy.types.UIList):
    """Generated Actions (those carrying the add-on's settings); double-click a name to rename."""

    def draw_item(self, _context, layout, _data, item, _icon, _active_data, _active_prop, _index=0, _flt_flag=0):
        row = layout.row(align=True)
        row.prop(item, "name", text="", emboss=False, icon="ACTION")
        info = item["motion_mamba"]
        row.label(text=f"seed {info['seed']}")

    def filter_items(self, _context, data, propname):
        actions = getattr(data, propname)
        flags = [self.bitflag_filter_item if "motion_mamba" in a else 0 for a in actions]
        return flags, []


class MOTION_UL_timeline(bpy.types.UIList):
    """The prompt timeline's rows: what happens and for how long, back to back from the top."""

    def draw_item(self, _context, layout, _data, item, _icon, _active_data, _active_prop, _index=0, _flt_flag=0):
        row = layout.row(align=True)
        row.prop(item, "prompt", text="", emboss=True)
        row.prop(item, "seconds", text="")


class MOTION_PT_panel(bpy.types.Panel):
    bl_label = "Motion Mamba"
    bl_idname = "MOTION_PT_panel"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Motion"

    def draw(self, context):
        layout = self.layout
        props = context.scene.motion_mamba
        session = current_session()

        layout.prop(props, "use_timeline", icon="SEQUENCE")
        if props.use_timeline:
            draw_timeline(layout, props)
            col = layout.column(align=True)
        else:
            row = layout.row(align=True)
            row.prop(props, "prompt", text="")
            row.prop(props, "live", toggle=True, icon="REC" if props.live else "PLAY")
            col = layout.column(align=True)
            col.prop(props, "seconds")
        row = col.row(align=True)
        row.prop(props, "seed")
        row.prop(props, "randomise_seed", text="", icon="FILE_REFRESH", toggle=True)
        col.prop(props, "guidance")
        col.prop(props, "steps")
        col.prop(props, "samples")

        box = layout.box()
        box.prop(props, "target")
        target = target_armature(context)
        if target is None:
            box.label(text="No armature selected", icon="ERROR")
            box.operator("motion_mamba.create_armature", icon="ARMATURE_DATA")
        elif props.target is None:
            box.label(text=f"Using the active armature: {target.name}", icon="INFO")
        box.prop(props, "preset")
        if target is not None:
            bone_map = map_bones([b.name for b in target.data.bones], props.preset)
            missing = [j for j in REQUIRED_JOINTS if j not in bone_map.bones]
            if missing:
                box.label(text=f"No bone for: {', '.join(missing)}", icon="ERROR")
            else:
                mapped = f"{len(bone_map.bones)}/{len(SMPL22_NAMES)} joints mapped"
                box.label(text=f"{PRESET_LABELS[bone_map.preset]}: {mapped}", icon="BONE_DATA")
                for warning in armature_warnings(target, bone_map):
                    for i, line in enumerate(textwrap.wrap(warning, 56)):
                        box.label(text=line, icon="ERROR" if i == 0 else "BLANK1")
        row = box.row(align=True)
        row.prop(props, "root_motion")
        row.prop(props, "foot_lock")
        row = box.row(align=True)
        row.prop(props, "keep_timing")
        row.prop(props, "nla_strip")

        if props.live and session is not None:
            fast = session.fast_steps
            steps = live_steps(props.steps, fast)
            text = (f"Live: regenerates in place at {steps} fast step{'s' * (steps != 1)}" if fast else
                    f"Live: this backend has no fast sampler ({props.steps} steps per change)")  # fmt: skip
            layout.label(text=text, icon="REC")
        job = session.job if session is not None else None
        if job is None:
            layout.operator("motion_mamba.generate", icon="PLAY")
            row = layout.row(align=True)
            row.operator("motion_mamba.continue_action", icon="FORWARD")
            row.operator("motion_mamba.regenerate_range", text="Regenerate range", icon="PREVIEW_RANGE")
        else:
            row = layout.row(align=True)
            keyed = max((k.keyed for k in job.keyers.values()), default=0)
            generation = job.generation
            if keyed:
                text = f"Keyed {keyed} frames..."
            elif generation.total:
                text = f"Step {generation.step}/{generation.total}"
            else:
                text = "Waiting for the backend..."
            row.progress(factor=generation.progress, type="BAR", text=text)
            row.operator("motion_mamba.cancel", text="", icon="CANCEL")

        if session is not None and session.notice:
            for i, line in enumerate(textwrap.wrap(session.notice, 56)):
                layout.label(text=line, icon="INFO" if i == 0 else "BLANK1")
        if session is not None and session.actions:
            box = layout.box()
            shown = props.show_actions
            box.prop(props, "show_actions", text=f"What this model knows ({len(session.actions)} actions)",
                     icon="DISCLOSURE_TRI_DOWN" if shown else "DISCLOSURE_TRI_RIGHT", emboss=False)
            for action in session.actions if shown else ():
                box.label(text=action)
        if session is not None and session.error:
            layout.label(text=session.error, icon="ERROR")
        elif session is not None and session.result:
            layout.label(text=session.result, icon="CHECKMARK")
        status = layout.box()
        text = session.describe() if session is not None else "Backend: not connected yet"
        icon = "LINKED" if session is not None and session.connected else "UNLINKED"
        for i, line in enumerate(ln for paragraph in text.splitlines() for ln in textwrap.wrap(paragraph, 56)):
            status.label(text=line, icon=icon if i == 0 else "BLANK1")  # a local backend's last output, wrapped
        row = status.row(align=True)
        row.operator("motion_mamba.start_backend", icon="CONSOLE")
        row.operator("motion_mamba.stop_backend", text="", icon="X")

        layout.label(text="Generated actions")
        layout.template_list("MOTION_UL_history", "", bpy.data, "actions", props, "history_index", rows=3)
        row = layout.row(align=True)
        row.operator("motion_mamba.apply_action", icon="CHECKMARK")
        row.operator("motion_mamba.delete_action", icon="TRASH")


def draw_timeline(layout, props) -> None:
    """The timeline's rows with add/remove/move buttons and their total length."""
    row = layout.row()
    row.template_list("MOTION_UL_timeline", "", props, "timeline", props, "timeline_index", rows=3)
    buttons = row.column(align=True)
    for action, icon in (("ADD", "ADD"), ("REMOVE", "REMOVE"), ("UP", "TRIA_UP"), ("DOWN", "TRIA_DOWN")):
        buttons.operator("motion_mamba.timeline_edit", text="", icon=icon).action = action
    total = sum(row.seconds for row in props.timeline)
    layout.label(text=f"{len(props.timeline)} rows, {total:g} s in all" if props.timeline else
                 "Add rows: a prompt and a duration each", icon="TIME")  # fmt: skip


CLASSES = (MOTION_UL_history, MOTION_UL_timeline, MOTION_PT_panel)
