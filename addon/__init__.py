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

    from . import operators, properties, ui

    properties.register()
    for cls in (*operators.CLASSES, *ui.CLASSES):
        bpy.utils.register_class(cls)

    def tick() -> float:
        try:
            interval = operators.session(bpy.context).tick()
        except Exception:  # a timer that raises is dropped by Blender: report and keep polling
            traceback.print_exc()
            interval = 1.0
        operators.redraw_panels()
        return interval

    _timer = tick
    bpy.app.timers.register(_timer, first_interval=0.1, persistent=True)
    bpy.app.handlers.load_pre.append(_cancel_on_load)


def _cancel_on_load(*_args) -> None:
    """A generation cannot continue into another file: stop it before the current one goes away."""
    from . import operators

    session = operators.current_session()
    if session is not None and session.job is not None:
        session.cancel()


def unregister() -> None:
    """Stop polling, close the connection (and a backend it started), unregister everything."""
    global _timer
    import bpy

    from . import operators, properties, ui

    if _timer is not None and bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    _timer = None
    if _cancel_on_load in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_cancel_on_load)
    operators.close_session()
    for cls in reversed((*operators.CLASSES, *ui.CLASSES)):
        bpy.utils.unregister_class(cls)
    properties.unregister()
