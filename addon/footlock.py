"""Foot locking: foot contacts from the source motion, plant targets kept across chunks, two-bone leg IK.

numpy only (the add-on does not import torch or the backend). Contacts follow HumanML3D's rule
(`canonical.FOOT_CONTACT_THRESHOLD`); an ankle in contact is held where it touched down, and when it lifts the
correction fades out over `RELEASE_FRAMES` frames instead of popping.
"""

from __future__ import annotations

import numpy as np

from .canonical import FOOT_CONTACT_THRESHOLD

RELEASE_FRAMES = 4


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
    """Per-foot plant state across successive chunks: where each planted ankle is held."""

    def __init__(self, feet: int) -> None:
        self.plant: list[np.ndarray | None] = [None] * feet
        self.release = [np.zeros(3) for _ in range(feet)]  # correction still fading out after a lift
        self.fade = [0] * feet

    def targets(self, ankles: np.ndarray, contact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ankle targets (T, F, 3) and whether to solve IK (T, F), from the motion's ankles and contacts (T, F)."""
        targets = ankles.copy()
        solve = np.zeros(contact.shape, dtype=bool)
        for f in range(ankles.shape[1]):
            for t in range(len(ankles)):
                fading = self.release[f] * (self.fade[f] / (RELEASE_FRAMES + 1))
                if contact[t, f]:
                    if self.plant[f] is None:  # touch down where the foot is now (fade included: no jump)
                        self.plant[f], self.fade[f] = ankles[t, f] + fading, 0
                    targets[t, f], solve[t, f] = self.plant[f], True
                    continue
                if self.plant[f] is not None:  # lift off: fade the correction out
                    self.release[f], self.fade[f] = self.plant[f] - ankles[t, f], RELEASE_FRAMES
                    self.plant[f] = None
                    fading = self.release[f] * (self.fade[f] / (RELEASE_FRAMES + 1))
                if self.fade[f] > 0:
                    targets[t, f], solve[t, f] = ankles[t, f] + fading, True
                    self.fade[f] -= 1
        return targets, solve


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
