"""The motion representation reproduces HumanML3D's own files (shared/data/humanml3d-samples)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.motion import (
    PLANT_CONTACT,
    POSE_SMOOTHING_SIGMA,
    _gaussian_smooth_time,
    canonicalize_positions,
    features_to_positions,
    features_to_rotations,
    forward_kinematics,
    plant_feet,
    positions_to_features,
    smooth_pose,
)
from backend.skeleton import KIT21, SMPL22, skeleton_for_dim

GROUPS = {
    "root angular velocity": slice(0, 1),
    "root linear velocity": slice(1, 3),
    "root height": slice(3, 4),
    "root-relative positions": slice(4, 67),
    "6D rotations": slice(67, 193),
    "joint velocities": slice(193, 259),
    "foot contacts": slice(259, 263),
}
SMOOTHING_RADIUS = 80  # frames: HumanML3D's gaussian_filter1d(sigma=20) reaches 4 sigma


def load_clips(samples):
    clips = []
    for path in sorted((samples / "new_joint_vecs").glob("*.npy")):
        clips.append((path.stem, np.load(path), np.load(samples / "new_joints" / path.name)))
    assert len(clips) == 3
    return clips


def test_feature_layout():
    assert SMPL22.feature_dim == 263 and KIT21.feature_dim == 251
    assert skeleton_for_dim(263) is SMPL22 and skeleton_for_dim(251) is KIT21
    for skeleton in (SMPL22, KIT21):
        assert all(p < j for j, p in enumerate(skeleton.parents) if j > 0), "parents must precede children"
    bones = np.linalg.norm(SMPL22.rest_offsets, axis=1)
    assert bones[0] == 0 and (bones[1:] > 0.05).all()
    assert SMPL22.rest_offsets[SMPL22.joint_names.index("left_hip"), 0] > 0, "left is +X when facing +Z"
    assert SMPL22.to_json()["parents"][0] == -1


def test_features_to_positions_reproduces_new_joints(humanml3d_samples):
    for name, features, joints in load_clips(humanml3d_samples):
        positions = features_to_positions(features)
        assert positions.shape == joints.shape and positions.dtype == np.float32
        assert np.abs(positions - joints).max() < 1e-4, name


def test_positions_to_features_matches_shipped_features(humanml3d_samples):
    for name, features, joints in load_clips(humanml3d_samples):
        ours = positions_to_features(joints)
        assert ours.shape == (len(features) - 1, 263)
        shipped = features[:-1]
        head = len(ours) - SMOOTHING_RADIUS  # frames the missing last frame cannot reach
        for group, cols in GROUPS.items():
            assert np.abs(ours[:head, cols] - shipped[:head, cols]).max() < 1e-5, f"{name}: {group}"
        # Near the end the facing direction is smoothed over a clip one frame shorter (see the docstring):
        # only yaw-dependent groups may move there, and only a little.
        for group in ("root height", "foot contacts"):
            assert np.array_equal(ours[:, GROUPS[group]], shipped[:, GROUPS[group]]), f"{name}: {group}"
        assert (
            np.abs(ours[:, GROUPS["root-relative positions"]] - shipped[:, GROUPS["root-relative positions"]]).max()
            < 0.01
        )
        assert np.abs(ours - shipped).max() < 0.05


def test_rotations_forward_kinematics_round_trip(humanml3d_samples):
    for name, features, _ in load_clips(humanml3d_samples):
        root, quats = features_to_rotations(features)
        assert root.shape == (len(features), 3) and quats.shape == (len(features), 22, 4)
        np.testing.assert_allclose(np.linalg.norm(quats, axis=-1), 1.0, atol=1e-5)
        assert (np.sum(quats[1:] * quats[:-1], axis=-1) >= 0).all(), "quaternion signs must be continuous"
        error = np.linalg.norm(forward_kinematics(root, quats) - features_to_positions(features), axis=-1)
        assert error.mean() < 0.01, f"{name}: mean FK error {error.mean():.4f} m"
        assert error.max() < 0.03, f"{name}: max FK error {error.max():.4f} m"


def test_canonicalize_is_idempotent_on_humanml3d_joints(humanml3d_samples):
    _, _, joints = load_clips(humanml3d_samples)[0]
    assert np.abs(canonicalize_positions(joints) - joints).max() < 1e-4


def test_canonicalize_undoes_scale_turn_and_offset(humanml3d_samples):
    _, _, joints = load_clips(humanml3d_samples)[1]
    angle = 1.1
    turn = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    moved = (joints @ turn.T) * 1.3 + np.array([2.0, 0.5, -3.0])
    np.testing.assert_allclose(canonicalize_positions(moved), joints, atol=1e-4)


def test_torch_batched_and_differentiable(humanml3d_samples):
    clips = load_clips(humanml3d_samples)
    batch = torch.tensor(np.stack([c[1][:150] for c in clips]), requires_grad=True)
    positions = features_to_positions(batch)
    assert positions.shape == (3, 150, 22, 3) and positions.dtype == torch.float32
    for i, (_, _, joints) in enumerate(clips):
        assert (positions[i].detach().numpy() - joints[:150]).__abs__().max() < 1e-4
    positions.square().sum().backward()
    assert batch.grad is not None and torch.isfinite(batch.grad).all() and batch.grad.abs().sum() > 0
    features = positions_to_features(torch.tensor(np.stack([c[2][:100] for c in clips]), dtype=torch.float64))
    assert features.shape == (3, 99, 263) and features.dtype == torch.float64


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (np.zeros((10, 262), np.float32), ValueError, "262-dimensional"),
        (np.zeros((0, 263), np.float32), ValueError, "empty"),
        (np.full((5, 263), np.nan, np.float32), ValueError, "NaN"),
        (np.zeros(263, np.float32), ValueError, "shape"),
        (np.zeros((5, 263), np.int64), TypeError, "floating-point"),
        ([[0.0] * 263], TypeError, "numpy array or a torch tensor"),
    ],
)
def test_bad_features_are_rejected(bad, error, message):
    for fn in (features_to_positions, features_to_rotations):
        with pytest.raises(error, match=message):
            fn(bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((10, 22, 2)), "shape"),
        (np.zeros((10, 22)), "shape"),
        (np.zeros((10, 23, 3)), "no skeleton has 23 joints"),
        (np.zeros((0, 22, 3)), "empty"),
        (np.zeros((1, 22, 3)), "at least 2 frames"),
        (np.full((4, 22, 3), np.inf), "NaN or infinite"),
    ],
)
def test_bad_positions_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        positions_to_features(bad)


def test_forward_kinematics_rejects_mismatched_frames():
    with pytest.raises(ValueError, match="disagree"):
        forward_kinematics(np.zeros((4, 3)), np.tile([1.0, 0, 0, 0], (5, 22, 1)))


def test_turning_through_180_degrees_round_trips():
    """The facing crosses +-180 degrees between frames: the root yaw must take the short way round."""
    frames = 40
    yaw = np.linspace(0.0, 2.5 * np.pi, frames)  # keeps turning: passes +180 degrees
    turn = np.stack([np.cos(yaw / 2), np.zeros(frames), np.sin(yaw / 2), np.zeros(frames)], -1)
    local = np.tile([1.0, 0.0, 0.0, 0.0], (frames, 22, 1))  # the rest T-pose, turning on the spot
    local[:, 0] = turn
    root = np.stack([np.linspace(0, 2, frames), np.full(frames, 0.95), np.zeros(frames)], -1)
    positions = canonicalize_positions(forward_kinematics(root, local))
    recovered = features_to_positions(positions_to_features(positions))
    assert np.abs(recovered - positions[:-1]).max() < 1e-4


def test_single_frame_rotations(humanml3d_samples):
    features = load_clips(humanml3d_samples)[0][1][:1]
    root, quats = features_to_rotations(features)
    assert root.shape == (1, 3) and quats.shape == (1, 22, 4)
    error = np.linalg.norm(forward_kinematics(root, quats) - features_to_positions(features), axis=-1)
    assert error.mean() < 0.01


def _planted_slide(features: np.ndarray) -> float:
    """Mean horizontal slide (m per frame) of the foot joints over the steps their contact channel holds."""
    p = features_to_positions(features)
    feet = list(SMPL22.foot_left + SMPL22.foot_right)
    held = (features[:-1, -4:] > PLANT_CONTACT) & (features[1:, -4:] > PLANT_CONTACT)
    slide = np.linalg.norm(np.diff(p[:, feet][..., [0, 2]], axis=0), axis=-1)
    return float(slide[held].mean())


def test_plant_feet_holds_planted_feet_where_the_root_drifts(humanml3d_samples):
    """Real clips with a sideways root drift added (the skate a model's root makes): planting takes the drift
    out of the planted feet, changes only the root's velocity channels, and leaves real motion nearly as it was."""
    for name, features, _ in load_clips(humanml3d_samples):
        drifted = features.astype(np.float64).copy()
        drifted[:, 2] += 0.02  # 2 cm per frame sideways, in the root's frame
        planted = plant_feet(drifted)
        assert planted.dtype == np.float64 and planted.shape == drifted.shape
        changed = np.flatnonzero(np.abs(planted - drifted).max(axis=0) > 1e-9)
        assert set(changed) <= {1, 2}, (name, changed)
        assert _planted_slide(drifted) > 0.015, name
        assert _planted_slide(planted) < 0.5 * _planted_slide(features) + 0.002, name  # below the real clip's
        before, after = (features_to_positions(f)[:, 0, [0, 2]] for f in (features.astype(np.float64), planted))
        travel = [np.linalg.norm(np.diff(p, axis=0), axis=-1).sum() for p in (before, after)]
        assert abs(travel[1] - travel[0]) < 0.15 * travel[0] + 0.2, (name, travel)  # the drift (4 m) is gone


def test_plant_feet_reads_only_its_reach_so_chunks_match_the_whole(humanml3d_samples):
    from backend.motion import PLANT_REACH

    features = load_clips(humanml3d_samples)[0][1]
    whole = plant_feet(features)
    for a, b in ((0, 40), (40, 100), (100, len(features))):
        lo, hi = max(0, a - PLANT_REACH), min(len(features), b + PLANT_REACH)
        np.testing.assert_allclose(plant_feet(features[lo:hi])[a - lo: b - lo], whole[a:b], atol=1e-6)
    batch = plant_feet(torch.from_numpy(np.stack([features, features[::-1].copy()])))  # torch, leading dims
    np.testing.assert_allclose(batch[0].numpy(), whole, atol=1e-5)
    assert np.array_equal(plant_feet(features[:1]), features[:1])  # one frame: no step to correct
    bad = features.copy()
    bad[3, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        plant_feet(bad)


def test_smooth_pose_takes_out_jitter_and_keeps_held_poses_and_feet(humanml3d_samples):
    """Frame-to-frame jitter (what a decoder adds) added to real clips goes; a held pose, the feet's positions
    and the contacts stay exactly; a frame reads only its reach."""
    from backend.metrics import jerk
    from backend.motion import SMOOTH_REACH

    feet = list(SMPL22.foot_left + SMPL22.foot_right)
    feet_channels = SMPL22.position_channels(feet) + list(range(259, 263))
    assert SMPL22.position_channels([1])[0] == GROUPS["root-relative positions"].start
    rng = np.random.default_rng(0)
    for name, features, _ in load_clips(humanml3d_samples):
        clean = features.astype(np.float64)
        noisy = clean.copy()
        noisy[:, 4:67] += rng.normal(0.0, 0.01, size=noisy[:, 4:67].shape)  # 1 cm of jitter on every joint
        smoothed = smooth_pose(noisy)
        assert np.array_equal(smoothed[:, feet_channels], noisy[:, feet_channels]), name
        before, after = (jerk(features_to_positions(f), 20) for f in (noisy, smoothed))
        assert after < 0.5 * before, (name, before, after)
        a, b = 60, 120
        np.testing.assert_allclose(smooth_pose(noisy[a - SMOOTH_REACH: b + SMOOTH_REACH])[SMOOTH_REACH:-SMOOTH_REACH],
                                   smoothed[a:b], atol=1e-9)
    held = np.repeat(load_clips(humanml3d_samples)[0][1][:1], 30, axis=0)
    np.testing.assert_allclose(smooth_pose(held), held, atol=1e-5)  # float32 in, float32 out


def test_time_smoothing_is_a_gaussian_filter_with_repeated_edges():
    """``_gaussian_smooth_time`` against numpy's convolution of each channel, edge frames repeated (scipy's
    ``gaussian_filter1d(mode='nearest')``), at the pose filter's, the foot planting's and HumanML3D's sigmas; also
    sequences shorter than the kernel, leading dimensions, and torch tensors with gradients."""
    rng = np.random.default_rng(0)
    for sigma in (POSE_SMOOTHING_SIGMA, 1.0, 20.0):
        radius = int(4.0 * sigma + 0.5)
        kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        kernel /= kernel.sum()
        for frames in (1, 5, 200):
            x = rng.normal(size=(2, frames, 3))
            expected = np.stack([np.stack([np.convolve(np.pad(x[b, :, c], radius, mode="edge"), kernel, "valid")
                                           for c in range(3)], -1) for b in range(2)])
            got = _gaussian_smooth_time(torch.from_numpy(x), sigma).numpy()
            np.testing.assert_allclose(got, expected, atol=1e-12)
    x = torch.randn(12, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: _gaussian_smooth_time(v, 1.0), (x,))  # training losses smooth too
