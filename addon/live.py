"""Live preview: with "Live" on, a changed prompt or seed regenerates, debounced, with the backend's fast sampler,
and the result replaces the previous preview action in place; turning Live off keeps the last result as a normal
generated action.

The settings' update callbacks (``changed``) only note when the next regeneration is due; the add-on's timer
(``tick``) starts it once the backend is free: a live generation still running is replaced (cancelled), a normal
one is waited for.
"""

from __future__ import annotations

import time
from dataclasses import replace

import bpy

from .keying import keep_live_preview
from .operators import current_session, panel_settings, redraw_panels
from .properties import generate_request, target_armature

DELAY_S = 0.4  # quiet time after the last change before regenerating (typing a word is one generation)
LIVE_STEPS = 1  # fast-sampler steps per preview: the fastest, and nearest real in jerk and skate (docs/fast_sampler.md)
_due: float | None = None  # when the next live regeneration should start


def changed(props, _context=None) -> None:
    """Update callback of the prompt and the seed: with Live on, schedule a regeneration (off: nothing to do)."""
    global _due
    if props.live:
        _due = time.monotonic() + DELAY_S


def toggled(props, context=None) -> None:
    """Update callback of Live: on, schedule a regeneration; off, stop a preview still generating and keep the
    last one as a normal action."""
    global _due
    if props.live:
        changed(props, context)
        return
    _due = None
    session = current_session()
    if session is not None and session.job is not None and session.job.settings.live:
        session.cancel()  # a preview still generating: the last finished one is what Live off keeps
        session.error = ""
    keep_live_preview()


def live_steps(steps: int, fast_steps: int) -> int:
    """Steps of a live preview: ``LIVE_STEPS`` of the backend's fast sampler (``fast_steps``: the most it covers),
    or the panel's ``steps`` where the backend has none."""
    return min(LIVE_STEPS, fast_steps) if fast_steps else steps


def tick() -> None:
    """Start the due live regeneration when the backend is free (called by the add-on's timer)."""
    global _due
    session = current_session()
    if _due is None or time.monotonic() < _due or session is None or not session.connected:
        return
    if session.job is not None:
        if not session.job.settings.live:
            return  # a normal generation: the preview waits for it
        session.cancel()  # a preview of settings already changed again
    _due = None
    context = bpy.context
    props = context.scene.motion_mamba
    try:
        request = generate_request(props)
        request = replace(request, samples=1, steps=live_steps(request.steps, session.fast_steps))
        session.generate(panel_settings(props, request, live=True), target_armature(context))
    except (ValueError, TypeError, ConnectionError) as exc:
        session.error = f"Live: {exc}"
    redraw_panels()
