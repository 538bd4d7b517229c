"""Motion Mamba Blender extension: text-to-motion from a local backend, retargeted onto your armature.

bpy is imported only inside register()/unregister() (and the submodules they import), so `import addon.wire`
works in a plain Python process (the backend uses it).
"""

import traceback

_timer = None


def register() -> None:
    """Register the settings, preferences, operators and panel, and start polling the backend."""
    global _timer
    import bpy

    from . import live, operators, properties, ui

    properties.register()
    for cls in (*operators.CLASSES, *ui.CLASSES):
        bpy.utils.register_class(cls)

    def tick() -> float:
        try:
            session = operators.session(bpy.context)
            interval = session.tick()
            properties.apply_limits(session.client.limits)  # the backend's announced ranges in the panel
            live.tick()
        except Exception:  # a timer that raises is dropped by Blender: report and keep polling
            traceback.print_exc()
            interval = 1.0
        operators.redraw_panels()
        return interval

    _timer = tick
    bpy.app.timers.register(_timer, first_interval=0.1, persistent=True)
    for handlers, function in _handlers(bpy, operators):
        handlers.append(function)


def _handlers(bpy, operators) -> list:
    """(handler list, function): a generation stops before undo/redo/load and incomplete actions go after."""
    h = bpy.app.handlers
    return [(h.undo_pre, operators.stop_generation), (h.redo_pre, operators.stop_generation),
            (h.load_pre, operators.stop_generation), (h.undo_post, operators.drop_partial_actions),
            (h.redo_post, operators.drop_partial_actions), (h.load_post, operators.drop_partial_actions)]


def unregister() -> None:
    """Stop polling, close the connection (and a backend it started), unregister everything."""
    global _timer
    import bpy

    from . import operators, properties, ui

    if _timer is not None and bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    _timer = None
    for handlers, function in _handlers(bpy, operators):
        if function in handlers:
            handlers.remove(function)
    operators.close_session()
    for cls in reversed((*operators.CLASSES, *ui.CLASSES)):
        bpy.utils.unregister_class(cls)
    properties.unregister()
