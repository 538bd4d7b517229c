"""Foot locking: foot contacts from the source motion, plant targets kept across chunks, two-bone leg IK.

numpy only (the add-on does not import torch or the backend). Contacts follow HumanML3D's rule
(`canonical.FOOT_CONTACT_THRESHOLD`); an ankle in contact is held across the ground where it touched down, and
when it lifts (or slips too far to hold) the correction fades out over `RELEASE_FRAMES` frames instead of popping.
A hold never asks a leg to straighten past what the motion does (`within_reach`). The limits were chosen on a real
Bandai walk (tests/test_rigs.py): stronger holds straighten knees at toe-off, where HumanML3D's loose threshold
still reports contact.
"""

from __future__ import annotations

import numpy as np

from .canonical import FOOT_CONTACT_THRESHOLD

RELEASE_FRAMES = 4
REACH = 0.98  # a held leg reaches at most this fraction of its length (or as far as the motion's does)
MAX_LIFT = 0.02  # of the leg's length: how far a held ankle may rise to stay within reach
MAX_SLIP = 0.08  # of the leg's length: how far a plant may hold an ankle from where the motion puts it


def contacts(positions: np.ndarray, threshold: float = FOOT_CONTACT_THRESHOLD) -> np.ndarray:
    """Booleans (T, K): joint k of positions (T, K, 3) moves less than sqrt(threshold) to the next frame.

    HumanML3D's rule looks one frame ahead; the last frame of a chunk, whose next frame has not streamed in yet,
    is judged by the step that led to it.
    """
    if len(positions) < 2:
        return np.zeros(positions.shape[:2], dtype=bool)
    step = np.sum((positions[1:] - positions[:-1]) ** 2, axis=-1)
    return np.concatenate([step, step[-1:]]) < threshold


class Plants:
    """Per-foot plant state across successive chunks: where each planted ankle is held on the ground plane.

    A planted ankle keeps its place across the ground (its height follows the motion: heels rise before toe-off)
    until the contact ends or the motion's ankle has moved more than `max_slip` away (the leg would straighten to
    hold it); then the correction fades out over RELEASE_FRAMES frames.
    """

    def __init__(self, feet: int, up: np.ndarray, max_slip: float) -> None:
        self.up, self.max_slip = up / np.linalg.norm(up), max_slip
        self.plant: list[np.ndarray | None] = [None] * feet
        self.slipped = [False] * feet  # let go during this contact: wait for the next one
        self.release = [np.zeros(3) for _ in range(feet)]  # correction still fading out after a lift
        self.fade = [0] * feet

    def _across(self, v: np.ndarray) -> np.ndarray:
        return v - np.dot(v, self.up) * self.up

    def corrections(self, ankles: np.ndarray, contact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offsets (T, F, 3) to add to the motion's ankles (T, F, 3) given contacts (T, F), and where they are set."""
        offsets = np.zeros(ankles.shape)
        solve = np.zeros(contact.shape, dtype=bool)
        for f in range(ankles.shape[1]):
            for t in range(len(ankles)):
                fading = self.release[f] * (self.fade[f] / (RELEASE_FRAMES + 1))
                if not contact[t, f]:
                    self.slipped[f] = False
                elif self.plant[f] is None and not self.slipped[f]:  # touch down where the foot is now
                    self.plant[f], self.fade[f] = ankles[t, f] + fading, 0
                if self.plant[f] is not None:
                    away = self.plant[f] - ankles[t, f]
                    held = self._across(away)
                    if contact[t, f] and np.linalg.norm(away) <= self.max_slip:
                        offsets[t, f], solve[t, f] = held, True
                        continue
                    self.slipped[f] = bool(contact[t, f])  # lift off, or slipped too far: fade the correction out
                    self.release[f], self.fade[f], self.plant[f] = held, RELEASE_FRAMES, None
                    fading = self.release[f] * (self.fade[f] / (RELEASE_FRAMES + 1))
                if self.fade[f] > 0:
                    offsets[t, f], solve[t, f] = fading, True
                    self.fade[f] -= 1
        return offsets, solve


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
