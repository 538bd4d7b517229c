"""Editing around motion that exists: continue it, bridge two motions, regenerate a frame range (issue 18).

One operation underlies the three (``MotionPipeline.edit``): a motion in world space (root translation (T, 3),
local rotations (T, J, 4) of the canonical skeleton, metres, Y up, at the model's frame rate) and a frame range
[start, stop) to generate. Frames outside the range are kept exactly. The denoiser sees up to ``CONTEXT_S``
seconds of the kept motion each side as known latent tokens (each side encoded by the VAE on its own, put back,
noised to the step's level, after every denoising step), so the new frames are generated to fit between them.
The decoded range is then placed in the world at the last kept frame before it (heading and position), and
made to join: before a kept suffix the root path's remaining heading and position error is spread over the whole
range, so the suffix stays where it was; at each join the range starts as the kept motion carried on at its last
speed and cross-fades to the decoded frames over ``JOIN_S`` seconds (the decoded frames nearest a join, where
generated latent tokens meet known ones, are the least reliable: they weigh least).

This module holds the world <-> feature steps; the denoising is the pipeline's.
"""

from __future__ import annotations

import numpy as np
import torch

from backend.motion import canonicalize_rotations, forward_kinematics, positions_to_features
from backend.quaternion import qinv, qmul, qnormalize, qrot
from backend.skeleton import SMPL22

CONTEXT_S = 4.0  # seconds of kept motion each side that the denoiser sees
JOIN_S = 0.6  # seconds over which a join cross-fades from the kept motion carried on to the generated frames
JOIN_DECELERATION = 4.0  # m/s^2: the root's speed change a join's cross-fade allows (it lengthens beyond JOIN_S)
SLOPE_S = 0.25  # seconds over which the kept motion's speed, carried on past a join, dies away (exp(-t / SLOPE_S))


def check_motion(root: np.ndarray, rotations: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The motion as new float64 arrays (the caller's are never written), checked: shapes, finite values,
    0 <= start < stop <= T, a frame kept."""
    root = np.array(root, dtype=np.float64)
    rotations = np.array(rotations, dtype=np.float64)
    j = SMPL22.num_joints
    if root.ndim != 2 or root.shape[1] != 3 or rotations.shape != (root.shape[0], j, 4):
        raise ValueError(f"expected root translation (T, 3) and rotations (T, {j}, 4), got {root.shape} and "
                         f"{rotations.shape}")
    if not (np.isfinite(root).all() and np.isfinite(rotations).all()):
        raise ValueError("the motion holds NaN or infinite values")
    if np.any(np.linalg.norm(rotations, axis=-1) < 1e-6):
        raise ValueError("the motion holds a zero quaternion")
    frames = root.shape[0]
    if not 0 <= start < stop <= frames:
        raise ValueError(f"the range to generate must satisfy 0 <= start < stop <= {frames} frames, got "
                         f"{start}..{stop}")
    if start == 0 and stop == frames:
        raise ValueError("nothing is kept: give frames before or after the range (or generate from a prompt)")
    return root, rotations


def with_gap(root: np.ndarray, rotations: np.ndarray, at: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The motion with ``count`` placeholder frames (copies of frame ``at - 1``) inserted before frame ``at``:
    the frames an edit is to generate (at the end: a continuation; inside: a bridge)."""
    root, rotations = np.asarray(root), np.asarray(rotations)
    return (np.concatenate([root[:at], np.repeat(root[at - 1: at], count, axis=0), root[at:]]),
            np.concatenate([rotations[:at], np.repeat(rotations[at - 1: at], count, axis=0), rotations[at:]]))


def piece_features(root: np.ndarray, rotations: np.ndarray, floor: float) -> np.ndarray:
    """Features (n - 1, 263) of kept frames (n >= 2), placed as the data's clips are (origin, facing +Z at the
    first frame) but on the whole motion's ``floor``, not the piece's own lowest point."""
    positions, local = canonicalize_rotations(root, rotations)
    features = positions_to_features(positions, rotations=local)
    lowest = float(forward_kinematics(root, rotations)[..., 1].min())
    lift = lowest - floor  # canonicalising put this piece's lowest joint at 0: its height over the floor
    groups = SMPL22.feature_groups
    features[:, groups["root_height"]] += lift
    features[:, groups["positions"]][:, 1::3] += lift  # the joints' heights (root-relative in XZ only)
    return features


def yaw(q: np.ndarray) -> np.ndarray:
    """Heading angle (radians about +Y) of rotations (..., 4) w, x, y, z: where they turn +Z to."""
    forward = rotate(q, np.array([0.0, 0.0, 1.0]))
    return np.arctan2(forward[..., 0], forward[..., 2])


def yaw_quat(angle: np.ndarray) -> np.ndarray:
    """Rotations (..., 4) about +Y by ``angle`` radians."""
    angle = np.asarray(angle, dtype=np.float64)
    return np.stack([np.cos(angle / 2), 0 * angle, np.sin(angle / 2), 0 * angle], axis=-1)


def rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectors v (..., 3) turned by rotations q (..., 4), broadcast over the leading axes."""
    qt, vt = torch.as_tensor(q, dtype=torch.float64), torch.as_tensor(v, dtype=torch.float64)
    lead = torch.broadcast_shapes(qt.shape[:-1], vt.shape[:-1])
    return qrot(qt.expand(*lead, 4), vt.expand(*lead, 3)).numpy()


def _qmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return qmul(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)).numpy()


def _qinv(q: np.ndarray) -> np.ndarray:
    return qinv(torch.as_tensor(q, dtype=torch.float64)).numpy()


def qpow(q: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Rotations q (..., 4) raised to the powers t (broadcast to q's leading axes): t times q's angle about its
    axis, the shorter way (t = 0: identity, 1: q; between: the slerp from identity)."""
    q = np.where(q[..., :1] < 0, -q, q)
    half = np.arccos(np.clip(q[..., 0], -1.0, 1.0)) * np.asarray(t)
    axis = q[..., 1:] / np.maximum(np.linalg.norm(q[..., 1:], axis=-1, keepdims=True), 1e-12)
    return np.concatenate([np.cos(half)[..., None], np.sin(half)[..., None] * axis], axis=-1)


def fade(count: int, frames: float) -> np.ndarray:
    """Weights (count,) from 1 at the join falling smoothly (smoothstep) to 0 after ``frames`` frames."""
    u = np.clip(np.arange(1, count + 1) / max(frames, 1.0), 0.0, 1.0)
    return 1.0 - u * u * (3 - 2 * u)


def carry_on(root: np.ndarray, rot: np.ndarray, n: int, slope: float) -> tuple[np.ndarray, np.ndarray]:
    """The kept motion carried on past a join for n frames: its frame nearest the join (index 0 of roots (2, 3)
    and rotations (2, J, 4)) moved on at the per-frame change from the next (index 1), that speed dying away
    over ``slope`` frames (exp(-s / slope)), so a fast motion does not swing far."""
    s = np.arange(1, n + 1, dtype=np.float64)
    reach = slope * (1.0 - np.exp(-s / slope))  # frames of travel at the join's speed after s frames
    root_out = root[0] + reach[:, None] * (root[0] - root[1])
    turn = _qmul(rot[0], _qinv(rot[1]))  # (J, 4): each joint's last per-frame turn
    return root_out, _qmul(qpow(turn[None], reach[:, None]), rot[0][None])


def join_frames(kept_step: np.ndarray, window_step: np.ndarray, fps: float) -> float:
    """Frames a join cross-fades over: ``JOIN_S``, longer where the root's per-frame steps on the two sides differ
    in speed by more than ``JOIN_DECELERATION`` allows to change in that time (e.g. a run into a standing pose)."""
    change = float(np.linalg.norm(kept_step - window_step)) * fps  # m/s
    return fps * max(JOIN_S, 2.0 * change / JOIN_DECELERATION)


def cross_fade(root: np.ndarray, rot: np.ndarray, root_to: np.ndarray, rot_to: np.ndarray,
               weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames (n, 3), (n, J, 4) moved towards others by ``weight`` (n,): 0 keeps them, 1 gives the others
    (positions linearly, rotations by slerp, joint by joint)."""
    w = weight[:, None]
    return root + w * (root_to - root), _qmul(qpow(_qmul(rot_to, _qinv(rot)), w), rot)


def place_range(root_w: np.ndarray, rot_w: np.ndarray, root_c: np.ndarray, rot_c: np.ndarray, lo: int, start: int,
                stop: int, floor: float, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """The generated frames [start, stop) in the world, joined to the kept frames.

    ``root_c``/``rot_c`` are the decoded window (frames lo.., the model's canonical placement, floor at 0). It is
    turned about +Y and moved so that its frame at the last kept frame before the range (else the first kept one
    after) has that kept frame's heading and position. Before a kept suffix, the heading and position the path
    still misses at ``stop`` are spread over the range (by a smoothstep of time: no change of speed at the joins;
    the model does not see where the suffix is, so a range too short for the way to it slides). At each join the
    range cross-fades over ``JOIN_S`` (smoothstep) from the kept motion carried on past the join (``carry_on``:
    every joint's rotation and the root's position at their last per-frame change, dying away over ``SLOPE_S``)
    to the placed window: at the join the kept motion's value and speed, away from it the window's.
    """
    frames = root_w.shape[0]
    anchor = start - 1 if start > 0 else stop
    q_turn = yaw_quat(yaw(rot_w[anchor, 0]) - yaw(rot_c[anchor - lo, 0]))
    root = rotate(q_turn, root_c)
    root[:, [0, 2]] += root_w[anchor, [0, 2]] - root[anchor - lo, [0, 2]]
    root[:, 1] = root_c[:, 1] + floor
    rot = rot_c.copy()
    rot[:, 0] = _qmul(q_turn, rot_c[:, 0])
    n, slope = stop - start, SLOPE_S * fps
    if stop < frames and start > 0:  # reach the kept suffix: spread the heading and position the path misses
        share = np.zeros(len(root))
        u = np.arange(1, n + 2) / (n + 1)  # n + 1 steps, the last into `stop`; smoothstep: no speed jump at joins
        share[start - lo: stop - lo + 1] = u * u * (3 - 2 * u)
        share[stop - lo + 1:] = 1.0
        miss = yaw(rot_w[stop, 0]) - yaw(rot[stop - lo, 0])
        miss = (miss + np.pi) % (2 * np.pi) - np.pi
        turns = yaw_quat(miss * share)
        steps = rotate(turns[1:], np.diff(root, axis=0))
        root = np.concatenate([root[:1], root[:1] + np.cumsum(steps, axis=0)])
        root[:, [0, 2]] += (root_w[stop, [0, 2]] - root[stop - lo, [0, 2]]) * share[:, None]
        rot[:, 0] = _qmul(turns, rot[:, 0])
    gen = slice(start - lo, stop - lo)
    root_g, rot_g = root[gen].copy(), rot[gen].copy()
    if start > 0:
        before = [start - 1, max(start - 2, 0)]
        weight = fade(n, join_frames(root_w[before[0]] - root_w[before[1]], root_g[min(1, n - 1)] - root_g[0], fps))
        root_g, rot_g = cross_fade(root_g, rot_g, *carry_on(root_w[before], rot_w[before], n, slope), weight)
    if stop < frames:
        after = [stop, min(stop + 1, frames - 1)]
        weight = fade(n, join_frames(root_w[after[1]] - root_w[after[0]], root_g[-1] - root_g[max(n - 2, 0)], fps))
        root_to, rot_to = carry_on(root_w[after], rot_w[after], n, slope)
        root_g, rot_g = cross_fade(root_g, rot_g, root_to[::-1].copy(), rot_to[::-1].copy(), weight[::-1].copy())
    return root_g, qnormalize(torch.as_tensor(rot_g)).numpy()
