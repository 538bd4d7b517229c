"""Foot locking: per-foot plant corrections from how still the source holds each ankle, kept across chunks; leg IK.

numpy only (the add-on does not import torch or the backend). HumanML3D's contact rule
(`canonical.FOOT_CONTACT_THRESHOLD`) calls an ankle planted up to ~0.9 m/s, toe-off and heel strike included;
holding an ankle still through those frames bends the knee away from the motion. So a plant follows the source's
own ankle speed, measured over the step from the previous frame: below HOLD_STEP the rig's ankle is held still
(the correction absorbs its step), from MOVE_STEP (the foot rolling off) it moves as the motion moves it with the
correction kept, and from KEEP_STEP to FREE_STEP (in the air) the correction fades out, so letting go happens
while the foot flies, needs no look-ahead, and pops nothing. A correction stays across the ground (heights are
the motion's: heels rise before toe-off), is never longer than `MAX_OFFSET` of the leg (a sliding source drags
the plant along) and never straightens a leg the motion bends (`within_reach`). The state is the previous
frame's, so any chunking gives the same result. The limits were chosen on real Bandai takes against Blender's own
playback of them and on rigs of other proportions (tests/test_rigs.py).
"""

from __future__ import annotations

import math

import numpy as np

from .canonical import FOOT_CONTACT_THRESHOLD

CONTACT_STEP = float(np.sqrt(FOOT_CONTACT_THRESHOLD))  # metres per frame of the 20 fps source: HumanML3D's contact
HOLD_STEP = 0.15 * CONTACT_STEP  # a source ankle moving less than this per frame (0.13 m/s) is held fully still,
MOVE_STEP = 0.5 * CONTACT_STEP  # from this on (0.45 m/s) the rig's ankle moves as the motion's, its hold kept;
KEEP_STEP = 0.6 * CONTACT_STEP  # from this on (0.54 m/s) the hold fades out,
FREE_STEP = 2.0 * CONTACT_STEP  # and from this on (1.8 m/s: in the air) it is gone
MAX_OFFSET = 0.03  # of the leg's length: how far a hold may keep an ankle from where the motion puts it
REACH = 0.98  # a held leg reaches at most this fraction of its length (or as far as the motion's does)
MAX_LIFT = 0.02  # of the leg's length: how far a held ankle may rise to stay within reach


def _falling(x: np.ndarray, start: float, stop: float) -> np.ndarray:
    """1 up to `start`, 0 from `stop`, smooth (smoothstep) in between."""
    u = np.clip((stop - np.asarray(x)) / (stop - start), 0.0, 1.0)
    return u * u * (3 - 2 * u)


def hold_weights(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For source ankles that moved `steps` metres over the last frame: how much of the rig ankle's own step a
    plant absorbs (1: held still), and how much of the plant's correction is kept (0: let go)."""
    return _falling(steps, HOLD_STEP, MOVE_STEP), _falling(steps, KEEP_STEP, FREE_STEP)


class Plants:
    """Plant corrections of `feet` ankles, carried across successive chunks of one motion."""

    def __init__(self, feet: int, up: np.ndarray, max_offset: float) -> None:
        self.up, self.max_offset, self.feet = up / np.linalg.norm(up), max_offset, feet
        self.last: np.ndarray | None = None  # (feet, 3): the rig's ankles on the previous frame, before correction
        self.offset = np.zeros((feet, 3))  # and their correction there

    def corrections(self, ankles: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Offsets (T, F, 3) to add to the rig's ankles (T, F, 3) as retargeted, for the source ankles' `steps`
        (T, F) from their previous frame: the plant absorbs the rig ankle's step by the hold weight and keeps
        its correction by the keep weight (`hold_weights`), never more than `max_offset` long."""
        if ankles.shape[1:] != (self.feet, 3) or steps.shape != ankles.shape[:2]:
            raise ValueError(f"ankles must be (T, {self.feet}, 3) and steps (T, {self.feet}), "
                             f"got {ankles.shape} and {steps.shape}")  # fmt: skip
        if not len(ankles):
            return np.zeros(ankles.shape)
        hold, keep = hold_weights(steps)
        last = ankles[:1] if self.last is None else self.last[None]
        absorbed = hold[..., None] * np.diff(ankles, axis=0, prepend=last)
        absorbed -= (absorbed @ self.up)[..., None] * self.up  # across the ground: the offsets stay there too
        offsets = np.empty(ankles.shape)
        for f in range(self.feet):  # a recurrence over frames: on Python floats, far quicker than on tiny arrays
            x, y, z = self.offset[f].tolist()
            rows = []
            for k, (ax, ay, az) in zip(keep[:, f].tolist(), absorbed[:, f].tolist()):
                x, y, z = k * x - ax, k * y - ay, k * z - az
                shrink = min(1.0, self.max_offset / max(math.sqrt(x * x + y * y + z * z), 1e-30))
                x, y, z = x * shrink, y * shrink, z * shrink
                rows.append((x, y, z))
            offsets[:, f] = rows
        self.offset = offsets[-1].copy()
        self.last = ankles[-1]
        return offsets


def within_reach(
    hip: np.ndarray, ankle: np.ndarray, offset: np.ndarray, reach: float, up: np.ndarray, lift: float
) -> np.ndarray:
    """`offset` (N, 3) made reachable: ankle + offset within REACH of the leg's `reach` from the hip (or no further
    than the motion's own ankle), so that holding a plant never straightens a leg the motion bends. An ankle out
    of reach is first raised (along `up`, by `lift` at most), then its offset shortened."""
    limit = np.maximum(np.linalg.norm(ankle - hip, axis=-1), REACH * reach)[:, None]

    def roots(start: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both k (smaller, larger) solving |start + k direction| = limit; NaN where none does."""
        sd, dd = np.sum(start * direction, -1, keepdims=True), np.sum(direction * direction, -1, keepdims=True)
        disc = sd**2 - dd * (np.sum(start * start, -1, keepdims=True) - limit**2)
        root = np.where(disc >= 0, np.sqrt(np.abs(disc)), np.nan)
        return (-sd - root) / np.maximum(dd, 1e-30), (-sd + root) / np.maximum(dd, 1e-30)

    d = ankle - hip
    up = np.broadcast_to(up, offset.shape)
    out = np.linalg.norm(d + offset, axis=-1, keepdims=True) > limit
    needed = np.nan_to_num(roots(d + offset, up)[0], nan=np.inf)  # the least rise that brings it within reach
    rise = np.where(out, np.clip(needed, 0.0, lift), 0.0) * up
    # still out of reach: the largest part k in [0, 1] of the offset across the ground that is within reach
    k = np.nan_to_num(roots(d + rise, offset)[1], nan=0.0)
    still_out = np.linalg.norm(d + rise + offset, axis=-1, keepdims=True) > limit
    return rise + np.where(still_out, np.clip(k, 0.0, 1.0), 1.0) * offset


def two_bone_ik(
    hip: np.ndarray, knee: np.ndarray, ankle: np.ndarray, target: np.ndarray, forward: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """New knee and ankle positions (N, 3) putting the ankle on `target` (as near as the leg reaches).

    Bone lengths are kept, the hip stays, and the knee stays in its bend plane (the plane of hip, target and the
    original knee), bending the way it bent; a straight leg bends its knee towards `forward` (3,).
    """
    thigh = np.linalg.norm(knee - hip, axis=-1, keepdims=True)
    shin = np.linalg.norm(ankle - knee, axis=-1, keepdims=True)
    reach = target - hip
    dist = np.linalg.norm(reach, axis=-1, keepdims=True)
    along = reach / np.maximum(dist, 1e-9)
    dist = np.clip(dist, np.abs(thigh - shin) * (1 + 1e-12), (thigh + shin) * (1 - 1e-12))

    def off_line(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = v - np.sum(v * along, axis=-1, keepdims=True) * along
        n = np.linalg.norm(v, axis=-1, keepdims=True)
        return v / np.maximum(n, 1e-12), n

    pole, bent = off_line(knee - hip)
    pole = np.where(bent > 1e-4 * thigh, pole, off_line(np.broadcast_to(forward, along.shape))[0])
    cos_hip = np.clip((thigh**2 + dist**2 - shin**2) / (2 * thigh * dist), -1.0, 1.0)
    new_knee = hip + thigh * (cos_hip * along + np.sqrt(1 - cos_hip**2) * pole)
    return new_knee, hip + dist * along
