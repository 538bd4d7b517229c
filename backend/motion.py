"""The motion representation: HumanML3D's 263-dim features (251 for KIT-ML), joint positions and rotations.

Feature layout per frame (J joints): root angular velocity about Y (1), root linear velocity in the root frame
XZ (2), root height (1), root-relative joint positions (J-1)*3 ("ric"), 6D joint rotations (J-1)*6, joint
velocities in the root frame J*3, foot contacts (4). The rotation channels are HumanML3D's swing-only ones, or, for
data prepared from mocap rotations, the joints' local rotations with twist (see :func:`rotation_channels`).
This module reproduces HumanML3D's ``motion_representation.py`` (``process_file``, ``recover_from_ric``) so that
users who own HumanML3D or KIT-ML train on their files unchanged; ``tests/test_motion.py`` checks it against real
HumanML3D clips.

Every public function takes numpy arrays or torch tensors and returns the same kind. Torch inputs keep their
dtype, device and autograd graph (for training losses); numpy inputs are computed in float64 and returned in
their own float dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from backend.quaternion import (
    cont6d_to_matrix,
    matrix_to_quat,
    qbetween,
    qfix,
    qinv,
    qmul,
    qnormalize,
    qrot,
    quat_to_cont6d,
    quat_to_matrix,
)
from backend.skeleton import SKELETONS, SMPL22, Skeleton, skeleton_for_dim

Array = TypeVar("Array", np.ndarray, torch.Tensor)

FORWARD_SMOOTHING_SIGMA = 20.0  # frames; HumanML3D smooths the facing direction before computing root rotations


def _as_tensor(x: Array, name: str, min_rank: int, last_dims: tuple[int, ...] | None) -> tuple[torch.Tensor, Callable]:
    """Validate an array argument; return it as a tensor and a function that converts results back."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        out_dtype = x.dtype
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))

        def back(r: torch.Tensor) -> np.ndarray:
            return r.detach().numpy().astype(out_dtype, copy=False)
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        t = x

        def back(r: torch.Tensor) -> torch.Tensor:
            return r
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if t.dim() < min_rank:
        raise ValueError(f"{name} must have at least {min_rank} dimensions, got shape {tuple(t.shape)}")
    if last_dims is not None and tuple(t.shape[-len(last_dims) :]) != last_dims:
        raise ValueError(f"{name} must end with shape {last_dims}, got shape {tuple(t.shape)}")
    time_axis = t.dim() - (len(last_dims) if last_dims else 1) - 1
    if t.shape[time_axis] == 0:
        raise ValueError(f"{name} is empty: it has no frames (shape {tuple(t.shape)})")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t, back


def _skeleton_for_joints(num_joints: int, skeleton: Skeleton | None) -> Skeleton:
    if skeleton is None:
        matches = [s for s in SKELETONS.values() if s.num_joints == num_joints]
        if not matches:
            known = ", ".join(f"{s.num_joints} ({s.name})" for s in SKELETONS.values())
            raise ValueError(f"no skeleton has {num_joints} joints; known: {known}")
        skeleton = matches[0]
    if skeleton.num_joints != num_joints:
        raise ValueError(f"positions have {num_joints} joints but skeleton {skeleton.name!r} has {skeleton.num_joints}")
    return skeleton


def _positions_arg(positions: Array, skeleton: Skeleton | None) -> tuple[torch.Tensor, Callable, Skeleton]:
    if not isinstance(positions, (np.ndarray, torch.Tensor)):
        raise TypeError(f"positions must be a numpy array or a torch tensor, got {type(positions).__name__}")
    if positions.ndim < 3 or positions.shape[-1] != 3:
        raise ValueError(f"positions must have shape (..., T, J, 3), got {tuple(positions.shape)}")
    skeleton = _skeleton_for_joints(positions.shape[-2], skeleton)
    t, back = _as_tensor(positions, "positions", 3, (skeleton.num_joints, 3))
    return t, back, skeleton


def _features_arg(features: Array) -> tuple[torch.Tensor, Callable, Skeleton]:
    if not isinstance(features, (np.ndarray, torch.Tensor)):
        raise TypeError(f"features must be a numpy array or a torch tensor, got {type(features).__name__}")
    if features.ndim < 2:
        raise ValueError(f"features must have shape (..., T, D), got {tuple(features.shape)}")
    skeleton = skeleton_for_dim(features.shape[-1])
    t, back = _as_tensor(features, "features", 2, (skeleton.feature_dim,))
    return t, back, skeleton


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.norm(v, dim=-1, keepdim=True)


def _up(like: torch.Tensor) -> torch.Tensor:
    return like.new_tensor([0.0, 1.0, 0.0]).expand_as(like)


def _facing(positions: torch.Tensor, skeleton: Skeleton, *, humanml3d_ik_order: bool) -> torch.Tensor:
    """Forward direction (..., T, 3) from the hips and shoulders.

    HumanML3D unpacks its face joints in two different orders: ``process_file`` as (r_hip, l_hip, r_sdr, l_sdr)
    and ``Skeleton.inverse_kinematics_np`` as (l_hip, r_hip, r_sdr, l_sdr), so in the latter the hip term points
    the other way and only the (wider) shoulders decide the direction. We keep both to reproduce its features.
    """
    a, b, sr, sl = skeleton.face_joints
    hips = positions[..., a, :] - positions[..., b, :]
    if humanml3d_ik_order:
        hips = -hips
    across = _unit(hips + positions[..., sr, :] - positions[..., sl, :])
    return torch.cross(_up(across), across, dim=-1)


def _gaussian_smooth_time(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter1d(x, sigma, axis=-2, mode='nearest') for x (..., T, C)."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    t = x.shape[-2]
    padded = x[..., torch.arange(-radius, t + radius, device=x.device).clamp(0, t - 1), :]  # edge frames repeated
    return padded.unfold(-2, 2 * radius + 1, 1) @ kernel  # (..., T, C, taps) @ (taps,): no float64 convolution


def leg_scale(positions: Array, skeleton: Skeleton = SMPL22) -> Array:
    """The root scale convention: canonical over source length of the RIGHT leg (hip->knee->ankle), at frame 0.

    Positions are (..., T, J, 3) of ``skeleton``'s joints; the result has shape (...,). HumanML3D's
    ``uniform_skeleton`` scales root travel by this ratio (its ``l_idx1, l_idx2`` are the right knee and ankle);
    :func:`canonicalize_positions` and rotation-based data preparation (``backend.data.retarget``) use it, and so
    does the add-on in reverse (the rig's right leg over the canonical one: ``addon.canonical.ROOT_SCALE_LEG``).
    """
    p, back, skeleton = _positions_arg(positions, skeleton)
    return back(_leg_scale(p, skeleton))


def _leg_scale(p: torch.Tensor, skeleton: Skeleton) -> torch.Tensor:
    if skeleton.rest_offsets is None:
        raise ValueError(f"skeleton {skeleton.name!r} has no canonical bone lengths to scale to")
    lengths = np.linalg.norm(skeleton.rest_offsets, axis=-1)
    parents = skeleton.parents
    knee, ankle = skeleton.kinematic_chains[0][2:4]  # the right leg: HumanML3D's l_idx1, l_idx2
    source = sum(torch.linalg.norm(p[..., 0, j, :] - p[..., 0, parents[j], :], dim=-1) for j in (knee, ankle))
    return float(lengths[knee] + lengths[ankle]) / source


def _place(p: torch.Tensor, skeleton: Skeleton) -> tuple[torch.Tensor, torch.Tensor]:
    """HumanML3D's placement: lowest joint over the clip at y = 0, root XZ at the origin at frame 0, then a turn
    about Y so the body faces +Z at frame 0. Returns the placed positions and the turn (..., 1, 4)."""
    floor = p[..., 1].amin(dim=(-2, -1), keepdim=True)
    p = p - torch.stack([torch.zeros_like(floor), floor, torch.zeros_like(floor)], dim=-1)
    p = p - p[..., :1, :1, :] * p.new_tensor([1.0, 0.0, 1.0])
    forward = _unit(_facing(p[..., :1, :, :], skeleton, humanml3d_ik_order=False))  # (..., 1, 3)
    turn = qbetween(forward, forward.new_tensor([0.0, 0.0, 1.0]).expand_as(forward))
    return qrot(turn[..., None, :].expand((*p.shape[:-1], 4)), p), turn


def canonicalize_positions(positions: Array, skeleton: Skeleton = SMPL22) -> Array:
    """HumanML3D's steps before feature extraction, on joint positions (..., T, J, 3) in metres, Y up.

    1. Uniform skeleton: every bone keeps its direction and gets the canonical length (the root trajectory is
       scaled by :func:`leg_scale`), as HumanML3D's ``uniform_skeleton`` IK/FK round trip does.
    2. Put on the floor (lowest joint over the clip at y = 0). 3. Root XZ at the origin at frame 0.
    4. Rotate about Y so the body faces +Z at frame 0.
    """
    p, back, skeleton = _positions_arg(positions, skeleton)
    scale = _leg_scale(p, skeleton)  # (...,)
    lengths = p.new_tensor(np.linalg.norm(skeleton.rest_offsets, axis=-1))
    parents = skeleton.parents
    joints = [p[..., 0, :] * scale[..., None, None]]
    for j in range(1, skeleton.num_joints):
        joints.append(joints[parents[j]] + _unit(p[..., j, :] - p[..., parents[j], :]) * lengths[j])
    return back(_place(torch.stack(joints, dim=-2), skeleton)[0])


def canonicalize_rotations(
    root_translation: Array, local_rotations: Array, skeleton: Skeleton = SMPL22
) -> tuple[Array, Array]:
    """A motion given as rotations of ``skeleton`` over its rest pose, placed as :func:`canonicalize_positions`
    places positions (floor, origin, facing +Z at frame 0).

    Takes the root translation (..., T, 3) and local rotations (..., T, J, 4) (metres, Y up, bone lengths are the
    rest's); returns the joint positions (..., T, J, 3) (:func:`forward_kinematics`, then placed) and the local
    rotations with the root rotation turned by the same facing turn (the other joints' are parent-relative).
    """
    q, back = _as_tensor(local_rotations, "local_rotations", 3, (skeleton.num_joints, 4))
    root, _ = _as_tensor(root_translation, "root_translation", 2, (3,))
    p, turn = _place(forward_kinematics(root.to(q.dtype), q, skeleton), skeleton)
    q = qnormalize(q)
    root = qmul(turn.expand((*q.shape[:-2], 4)), q[..., 0, :])
    return back(p), back(qfix(torch.cat([root[..., None, :], q[..., 1:, :]], dim=-2)))


def _humanml3d_channels(p: torch.Tensor, root_quat: torch.Tensor, skeleton: Skeleton) -> torch.Tensor:
    """HumanML3D's per-chain inverse kinematics (swing only): rotations (..., T, J-1, 4) of joints 1..J-1."""
    local = [root_quat] * skeleton.num_joints
    raw = p.new_tensor(skeleton.raw_offsets)
    for chain in skeleton.kinematic_chains:
        accumulated = root_quat
        for parent, child in itertools.pairwise(chain):
            direction = _unit(p[..., child, :] - p[..., parent, :])
            world = qbetween(raw[child].expand_as(direction), direction)
            local[child] = qmul(qinv(accumulated), world)
            accumulated = qmul(accumulated, local[child])
    return torch.stack(local[1:], dim=-2)


def positions_to_features(
    positions: Array,
    skeleton: Skeleton | None = None,
    feet_threshold: float | None = None,
    rotations: Array | None = None,
) -> Array:
    """Joint positions (..., T, J, 3), already canonical, to features (..., T-1, D) exactly as HumanML3D does.

    Rotation channels: without ``rotations``, HumanML3D's (swing-only inverse kinematics of the positions, see
    :func:`rotation_channels`). With ``rotations`` (..., T, J, 4), the local rotations of a motion whose positions
    are their forward kinematics (:func:`canonicalize_rotations`), the channels hold those rotations of joints
    1..J-1, twist included ("local" channels); every other channel is computed from the positions as always.

    The input is what :func:`canonicalize_positions` returns (or HumanML3D's ``new_joints``). Known differences
    from HumanML3D's shipped features when the input is HumanML3D's own ``new_joints``: those files hold one frame
    fewer than the positions the features were made from, so the facing direction, smoothed over +-80 frames, is
    smoothed over a shorter clip near its end; root-relative positions, 6D rotations and velocities of the last
    ~80 frames then differ by a slightly different root yaw. Elsewhere every channel group agrees.
    Like HumanML3D's released files, frame 0 uses the identity root rotation (the input already faces +Z).
    """
    p, back, skeleton = _positions_arg(positions, skeleton)
    if p.shape[-3] < 2:
        raise ValueError(f"positions need at least 2 frames to compute velocities, got {p.shape[-3]}")
    threshold = skeleton.feet_threshold if feet_threshold is None else feet_threshold

    def contacts(feet: tuple[int, int]) -> torch.Tensor:
        step = p[..., 1:, list(feet), :] - p[..., :-1, list(feet), :]
        return ((step**2).sum(-1) < threshold).to(p.dtype)

    # Root rotation from the smoothed facing direction, then HumanML3D's per-chain inverse kinematics.
    forward = _unit(_gaussian_smooth_time(_facing(p, skeleton, humanml3d_ik_order=True), FORWARD_SMOOTHING_SIGMA))
    root_quat = qbetween(forward, forward.new_tensor([0.0, 0.0, 1.0]).expand_as(forward))
    # HumanML3D's released files were made with the root rotation of frame 0 forced to identity (a line of its
    # inverse_kinematics_np that is commented out in today's repository); the shipped features prove it.
    root_quat = torch.cat(
        [torch.ones_like(root_quat[..., :1, :1]) * root_quat.new_tensor([1.0, 0, 0, 0]), root_quat[..., 1:, :]], dim=-2
    )
    if rotations is None:
        rot6d = quat_to_cont6d(_humanml3d_channels(p, root_quat, skeleton))
    else:
        given, _ = _as_tensor(rotations, "rotations", 3, (skeleton.num_joints, 4))
        if given.shape[:-1] != p.shape[:-1]:
            raise ValueError(f"rotations {tuple(given.shape)} do not match positions {tuple(p.shape)}")
        rot6d = quat_to_cont6d(qnormalize(given[..., 1:, :].to(p.dtype)))  # (..., T, J-1, 6)

    root_velocity = qrot(root_quat[..., 1:, :], p[..., 1:, 0, :] - p[..., :-1, 0, :])
    root_turn = qmul(root_quat[..., 1:, :], qinv(root_quat[..., :-1, :]))
    # Shortest arc (w >= 0). HumanML3D omits this, so when the facing crosses +-180 degrees between two frames its
    # arcsin takes the turn with the wrong sign and the recovered path drifts; its sample files never cross there.
    root_turn = root_turn * torch.where(root_turn[..., :1] < 0, -1.0, 1.0).to(root_turn.dtype)
    relative = p - p[..., :1, :] * p.new_tensor([1.0, 0.0, 1.0])
    ric = qrot(root_quat[..., None, :].expand((*p.shape[:-1], 4)), relative)
    joint_velocity = qrot(
        root_quat[..., :-1, None, :].expand((*p.shape[:-3], p.shape[-3] - 1, skeleton.num_joints, 4)),
        p[..., 1:, :, :] - p[..., :-1, :, :],
    )
    t1 = p.shape[-3] - 1
    features = torch.cat(
        [
            torch.arcsin(root_turn[..., 2:3]),
            root_velocity[..., [0, 2]],
            ric[..., :-1, 0, 1:2],
            ric[..., :-1, 1:, :].reshape(*p.shape[:-3], t1, -1),
            rot6d[..., :-1, :, :].reshape(*p.shape[:-3], t1, -1),
            joint_velocity.reshape(*p.shape[:-3], t1, -1),
            contacts(skeleton.foot_left),
            contacts(skeleton.foot_right),
        ],
        dim=-1,
    )
    return back(features)


def _root_rotation_and_position(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HumanML3D's ``recover_root_rot_pos``: root yaw quaternion (..., T, 4) and root position (..., T, 3)."""
    angle = torch.cumsum(F.pad(f[..., :-1, 0], (1, 0)), dim=-1)
    zeros = torch.zeros_like(angle)
    root_quat = torch.stack([torch.cos(angle), zeros, torch.sin(angle), zeros], dim=-1)
    step = torch.stack([f[..., :-1, 1], torch.zeros_like(f[..., :-1, 1]), f[..., :-1, 2]], dim=-1)
    step = F.pad(step, (0, 0, 1, 0))
    position = torch.cumsum(qrot(qinv(root_quat), step), dim=-2)
    position = torch.stack([position[..., 0], f[..., 3], position[..., 2]], dim=-1)
    return root_quat, position


def features_to_positions(features: Array) -> Array:
    """Features (..., T, D) to joint positions (..., T, J, 3): HumanML3D's ``recover_from_ric``."""
    f, back, skeleton = _features_arg(features)
    root_quat, root_position = _root_rotation_and_position(f)
    j = skeleton.num_joints
    ric = f[..., skeleton.feature_groups["positions"]].reshape(*f.shape[:-1], j - 1, 3)
    joints = qrot(qinv(root_quat)[..., None, :].expand((*ric.shape[:-1], 4)), ric)
    joints = joints + (root_position * root_position.new_tensor([1.0, 0.0, 1.0]))[..., None, :]
    return back(torch.cat([root_position[..., None, :], joints], dim=-2))


POSE_SMOOTHING_SIGMA = 0.65  # frames (33 ms at 20 fps): smooth_pose's Gaussian
SMOOTH_REACH = 3  # frames: smooth_pose's result at a frame reads the features this far each side (4 sigma)
PLANT_CONTACT = 0.3  # a foot-contact channel above this holds its joint on the ground (decoded contacts are soft)
PLANT_SMOOTHING_SIGMA = 1.0  # frames: the root's correction is smoothed, so a foot landing or lifting adds no jerk
PLANT_REACH = 6  # frames: plant_feet's result at a frame reads the features this far on (4 sigma + 1) and before


def smooth_pose(features: Array) -> Array:
    """Features (..., T, D) filtered in time by a Gaussian of ``POSE_SMOOTHING_SIGMA`` frames: the
    frame-to-frame jitter a decoder adds (which the eye sees and jerk measures) removed, held poses unchanged.
    The foot joints' root-relative positions and the contact channels stay as they were: filtering feet rounds
    off each step's lift and landing, and a foot dragged near the floor slides (``plant_feet`` holds the planted
    ones instead). A frame's result reads the features within ``SMOOTH_REACH`` frames of it."""
    f, back, skeleton = _features_arg(features)
    feet = list(skeleton.foot_left + skeleton.foot_right)
    smoothed = f.clone()
    pose = slice(0, skeleton.feature_groups["contacts"].start)
    smoothed[..., pose] = _gaussian_smooth_time(f[..., pose], POSE_SMOOTHING_SIGMA)
    kept = skeleton.position_channels(feet)
    smoothed[..., kept] = f[..., kept]
    return back(smoothed)


def plant_feet(features: Array) -> Array:
    """Features (..., T, D) whose root travels with the planted feet (so they do not skate).

    In each frame step where a foot joint's decoded contact channel is above ``PLANT_CONTACT`` at both ends, the
    root's horizontal step changes by minus the mean horizontal slide of the planted joints, which then stay put;
    the change is smoothed over time (Gaussian, ``PLANT_SMOOTHING_SIGMA`` frames). Only the root's linear
    velocity channels (1, 2) change: pose, heights and heading stay. A frame's result reads the features within
    ``PLANT_REACH`` frames of it only, so chunks with that much margin each side give the whole motion's values.
    """
    f, back, skeleton = _features_arg(features)
    if f.shape[-2] < 2:
        return back(f)
    p = features_to_positions(f)
    root_quat, _ = _root_rotation_and_position(f)
    feet = list(skeleton.foot_left + skeleton.foot_right)  # the order of the four contact channels
    contact = (f[..., skeleton.feature_groups["contacts"]] > PLANT_CONTACT).to(f.dtype)
    held = torch.minimum(contact[..., :-1, :], contact[..., 1:, :])  # (..., T-1, 4): planted at both ends
    slide = (p[..., 1:, feet, :] - p[..., :-1, feet, :]) * p.new_tensor([1.0, 0.0, 1.0])
    correction = -(held[..., None] * slide).sum(-2) / held.sum(-1, keepdim=True).clamp(min=1.0)
    step = p[..., 1:, 0, :] - p[..., :-1, 0, :] + _gaussian_smooth_time(correction, PLANT_SMOOTHING_SIGMA)
    local = qrot(root_quat[..., 1:, :], step * step.new_tensor([1.0, 0.0, 1.0]))  # into the root's frame
    planted = f.clone()
    planted[..., :-1, 1] = local[..., 0]
    planted[..., :-1, 2] = local[..., 2]
    return back(planted)


def _kabsch(rest: torch.Tensor, current: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation matrices R (..., 3, 3) minimising sum |R rest_i - current_i|^2 over vectors i (rest: (N, 3)),
    plus, when given, a pull towards the rotation matrices ``prior`` (..., 3, 3) weighing as much as 10% of the
    vectors (it decides what the vectors leave open, and changes nothing where the prior fits them exactly)."""
    h = torch.einsum("ni,...nj->...ij", rest, current)
    if prior is not None:
        h = h + 0.1 * (rest**2).sum() * prior.transpose(-1, -2)
    u, _, vt = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(vt.transpose(-1, -2) @ u.transpose(-1, -2)))
    fix = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], dim=-1))
    return vt.transpose(-1, -2) @ fix @ u.transpose(-1, -2)


def _swing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest rotation from direction a to b, also where they are opposite (then 180 degrees about a normal)."""
    a, b = _unit(a), _unit(b)
    q = torch.cat([1.0 + (a * b).sum(-1, keepdim=True), torch.cross(a, b, dim=-1)], dim=-1)
    opposite = torch.linalg.norm(q, dim=-1, keepdim=True) < 1e-6
    helper = torch.where(a[..., :1].abs() < 0.9, a.new_tensor([1.0, 0.0, 0.0]), a.new_tensor([0.0, 1.0, 0.0]))
    half_turn = torch.cat([torch.zeros_like(a[..., :1]), _unit(torch.cross(a, helper.expand_as(a), dim=-1))], dim=-1)
    return qnormalize(torch.where(opposite, half_turn, q))


def _channel_rotations(f: torch.Tensor, skeleton: Skeleton) -> torch.Tensor:
    """The rotation channels as quaternions (..., T, J-1, 4) of joints 1..J-1."""
    j = skeleton.num_joints
    cont6d = f[..., skeleton.feature_groups["rotations"]].reshape(*f.shape[:-1], j - 1, 6)
    return matrix_to_quat(cont6d_to_matrix(cont6d))


def _bone_agreement(predicted: list[torch.Tensor], actual: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(_unit(a) * _unit(b)).sum(-1).mean() for a, b in zip(predicted, actual)]).mean()


def rotation_channels(features: Array) -> str:
    """Which convention the rotation channels of features (..., T, D) follow: "local" or "humanml3d".

    - "humanml3d": HumanML3D's own (``positions_to_features`` without rotations): the channel of joint c turns
      ``raw_offsets[c]`` onto the bone parent(c)->c, composed from the root's facing rotation along each
      kinematic chain; swing only, no twist.
    - "local": the local rotation of joint c relative to its parent over ``skeleton.rest_offsets`` (the
      rotations streamed to clients), twist included; written by rotation-based data preparation.
    Decided by which convention carries the bones of the motion's own positions closer to where they are, over
    its first :data:`CHANNEL_DETECTION_FRAMES` frames only, so every prefix of a streamed motion decides alike.
    """
    f, _, skeleton = _features_arg(features)
    return _rotation_channels(f, features_to_positions(f), _channel_rotations(f, skeleton), skeleton)


CHANNEL_DETECTION_FRAMES = 20


def _rotation_channels(f: torch.Tensor, p: torch.Tensor, channel: torch.Tensor, skeleton: Skeleton) -> str:
    frames = CHANNEL_DETECTION_FRAMES
    f, p, channel = f[..., :frames, :], p[..., :frames, :, :], channel[..., :frames, :, :]
    parents = skeleton.parents
    bones = [c for c in range(1, skeleton.num_joints) if len(skeleton.children[parents[c]]) == 1]
    actual = [p[..., c, :] - p[..., parents[c], :] for c in bones]
    # "local": forward kinematics of the channels from the pelvis the positions show
    rest = p.new_tensor(skeleton.rest_offsets)
    pelvis_kids = list(skeleton.children[0])
    world = [matrix_to_quat(_kabsch(rest[pelvis_kids], p[..., pelvis_kids, :] - p[..., :1, :]))]
    for j in range(1, skeleton.num_joints):
        world.append(qmul(world[parents[j]], channel[..., j - 1, :]))
    local = _bone_agreement([qrot(world[parents[c]], rest[c].expand_as(a)) for c, a in zip(bones, actual)], actual)
    # "humanml3d": the chains composed from the root's facing rotation, turning raw_offsets
    root_quat = _root_rotation_and_position(f)[0]
    raw = p.new_tensor(skeleton.raw_offsets)
    chain_world: dict[int, torch.Tensor] = {}
    for chain in skeleton.kinematic_chains:
        accumulated = root_quat
        for c in chain[1:]:
            accumulated = qmul(accumulated, channel[..., c - 1, :])
            chain_world[c] = accumulated
    humanml3d = _bone_agreement([qrot(chain_world[c], raw[c].expand_as(a)) for c, a in zip(bones, actual)], actual)
    return "local" if local >= humanml3d else "humanml3d"


ROTATION_CHANNELS = ("auto", "local", "humanml3d")


def features_to_rotations(features: Array, channels: str = "auto") -> tuple[Array, Array]:
    """Features (..., T, D) to (root_translation (..., T, 3), local joint rotations (..., T, J, 4) as w, x, y, z):
    :func:`features_to_joints`, with the root's position for the joint positions."""
    positions, rotations = features_to_joints(features, channels)
    return positions[..., 0, :], rotations


def features_to_joints(features: Array, channels: str = "auto") -> tuple[Array, Array]:
    """Features (..., T, D) to (joint positions (..., T, J, 3) as :func:`features_to_positions` gives them, local
    joint rotations (..., T, J, 4) as w, x, y, z), the positions computed once for both.

    The rotations are standard parent-relative ones over the rest pose ``SMPL22.rest_offsets`` (what the backend
    streams and the add-on keys). Every joint starts from the orientation its rotation channel gives ("local"
    channels, see :func:`rotation_channels`; "auto" detects them) or, for "humanml3d" channels (no twist), its
    parent's; then a joint with one child turns by the smallest swing that points its bone exactly at the child's
    position (the twist about the bone stays the channel's); a joint with several children (pelvis, spine3)
    takes the rigid rotation that best fits them, pulled towards a "local" channel's orientation; an end joint (head,
    wrists, feet) keeps the channel orientation. So :func:`forward_kinematics` of the result lands on
    :func:`features_to_positions` wherever the positions have the rest's bone lengths and a rigid pelvis and chest
    (rotation-prepared data, whatever its channels); HumanML3D's own files, whose hips move a little against the
    pelvis, come within millimetres. Quaternion signs are made continuous over time.
    """
    if channels not in ROTATION_CHANNELS:
        raise ValueError(f"channels must be one of {ROTATION_CHANNELS}, got {channels!r}")
    f, back, skeleton = _features_arg(features)
    if skeleton.rest_offsets is None:
        raise ValueError(f"rotations need a rest pose; skeleton {skeleton.name!r} has none")
    p = features_to_positions(f)
    channel = _channel_rotations(f, skeleton)
    if channels == "auto":
        channels = _rotation_channels(f, p, channel, skeleton)
    rest = p.new_tensor(skeleton.rest_offsets)
    parents, children = skeleton.parents, skeleton.children
    world = p.new_zeros(*p.shape[:-1], 4)  # (..., T, J, 4), filled level by level (a level's joints together)
    for level in skeleton.levels:
        index = list(level)
        guess = None
        if level[0] > 0:
            up = world[..., [parents[j] for j in level], :]
            guess = qmul(up, channel[..., [j - 1 for j in level], :]) if channels == "local" else up
        one = [k for k, j in enumerate(level) if len(children[j]) == 1]
        if one:  # turn by the smallest swing that points the bone at the child
            joints, kids = [index[k] for k in one], [children[index[k]][0] for k in one]
            carried = qrot(guess[..., one, :], rest[kids].expand((*p.shape[:-2], len(one), 3)))
            world[..., joints, :] = qmul(_swing(carried, p[..., kids, :] - p[..., joints, :]), guess[..., one, :])
        for k, j in enumerate(level):
            kids = list(children[j])
            if len(kids) > 1:  # the rigid rotation that best fits the children
                current = p[..., kids, :] - p[..., j : j + 1, :]
                prior = quat_to_matrix(guess[..., k, :]) if j > 0 and channels == "local" else None
                world[..., j, :] = matrix_to_quat(_kabsch(rest[kids], current, prior))
            elif not kids:  # an end joint keeps its channel's orientation
                world[..., j, :] = guess[..., k, :]
    local = torch.cat([world[..., :1, :], qmul(qinv(world[..., list(parents[1:]), :]), world[..., 1:, :])], dim=-2)
    rotations = qfix(qnormalize(local))
    return back(p), back(rotations)


def forward_kinematics(root_translation: Array, local_quaternions: Array, skeleton: Skeleton = SMPL22) -> Array:
    """Joint positions (..., T, J, 3) from a root translation (..., T, 3) and local rotations (..., T, J, 4)."""
    if skeleton.rest_offsets is None:
        raise ValueError(f"skeleton {skeleton.name!r} has no rest pose")
    q, back = _as_tensor(local_quaternions, "local_quaternions", 3, (skeleton.num_joints, 4))
    root, _ = _as_tensor(root_translation, "root_translation", 2, (3,))
    if root.shape[:-1] != q.shape[:-2]:
        raise ValueError(f"root_translation {tuple(root.shape)} and rotations {tuple(q.shape)} disagree on frames")
    root = root.to(q.dtype)
    q = qnormalize(q)
    rest = q.new_tensor(skeleton.rest_offsets)
    parents = skeleton.parents
    world: list[torch.Tensor] = []
    joints: list[torch.Tensor] = []
    for j in range(skeleton.num_joints):
        if j == 0:
            world.append(q[..., 0, :])
            joints.append(root)
        else:
            world.append(qmul(world[parents[j]], q[..., j, :]))
            joints.append(joints[parents[j]] + qrot(world[parents[j]], rest[j].expand_as(root)))
    return back(torch.stack(joints, dim=-2))
