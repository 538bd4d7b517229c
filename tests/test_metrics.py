"""The Guo et al. metrics against cases with known answers."""

import numpy as np
import pytest
import torch

from backend import metrics


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_fid_of_a_set_against_itself_is_zero():
    x = _rng().normal(size=(500, 16)) @ _rng(1).normal(size=(16, 16))  # correlated dimensions
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_singular_covariances_is_finite_and_zero_against_itself():
    x = _rng().normal(size=(10, 64))  # 10 samples in 64 dimensions: rank-9 covariance
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_two_gaussians_matches_the_closed_form():
    # Diagonal covariances commute: tr((s1 s2)^(1/2)) = sum sqrt(a_i b_i), so
    # FID = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 2.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_fid_of_a_rotated_covariance_matches_the_closed_form():
    # s2 = R s1 R^T with a rotation R: (s1 s2) does not commute, check against the 2x2 formula
    # tr(sqrtm(M)) = sqrt(tr M + 2 sqrt(det M)) for a 2x2 matrix M with non-negative eigenvalues.
    s1 = np.diag([4.0, 1.0])
    c, s = np.cos(0.7), np.sin(0.7)
    r = np.array([[c, -s], [s, c]])
    s2 = r @ np.diag([2.0, 0.5]) @ r.T
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.zeros(2), np.array([1.0, -1.0])
    expected = 2.0 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert metrics.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_fid_of_sampled_shifted_gaussians_approaches_the_shift():
    x = _rng(0).normal(size=(20000, 4))
    y = _rng(1).normal(size=(20000, 4)) + np.array([2.0, 0.0, 0.0, 1.0])
    assert metrics.frechet_distance(x, y) == pytest.approx(5.0, abs=0.1)


def test_r_precision_of_aligned_embeddings_is_one():
    x = _rng().normal(size=(320, 32))
    assert metrics.r_precision(x, x, rng=_rng()).tolist() == [1.0, 1.0, 1.0]


def test_r_precision_of_random_embeddings_is_k_over_32():
    text, motion = _rng(0).normal(size=(32 * 300, 8)), _rng(1).normal(size=(32 * 300, 8))
    top = metrics.r_precision(text, motion, rng=_rng())
    np.testing.assert_allclose(top, np.arange(1, 4) / 32, atol=0.01)


def test_r_precision_counts_rank_within_the_batch():
    # 32 pairs; the texts of pairs 0..15 sit exactly on their motions, the others are nearest to the next motion
    motion = np.eye(32) * 10.0
    text = motion.copy()
    text[16:] = np.roll(motion, -1, axis=0)[16:] * 0.9 + motion[16:] * 0.1
    top = metrics.r_precision(text, motion, rng=_rng())
    assert top[0] == pytest.approx(0.5)
    assert top[1] == pytest.approx(1.0)


def test_mm_dist_is_the_mean_pair_distance():
    text = np.zeros((4, 2))
    motion = np.array([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert metrics.mm_dist(text, motion) == pytest.approx((5 + 1 + 0 + 1) / 4)


def test_diversity_of_identical_vectors_is_zero_and_of_spread_ones_is_not():
    assert metrics.diversity(np.ones((300, 8)), rng=_rng()) == 0.0
    # Two points at distance 2 (half the set each): a random pair is apart with probability ~1/2
    x = np.concatenate([np.zeros((500, 1)), np.full((500, 1), 2.0)])
    assert metrics.diversity(x, rng=_rng()) == pytest.approx(1.0, abs=0.2)


def test_multimodality_of_identical_samples_is_zero_and_scales_with_spread():
    assert metrics.multimodality(np.ones((5, 30, 4)), rng=_rng()) == 0.0
    x = _rng().normal(size=(50, 30, 16))
    # Two independent N(0, I_16) vectors are sqrt(2 * 16) ~ 5.66 apart on average (a bit less: chi mean)
    assert metrics.multimodality(x, rng=_rng()) == pytest.approx(5.57, abs=0.2)
    assert metrics.multimodality(3 * x, rng=_rng()) == pytest.approx(3 * metrics.multimodality(x, rng=_rng()))


def test_mean_ci_is_196_std_over_sqrt_n():
    mean, ci = metrics.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert ci == pytest.approx(1.96 * np.std([1, 2, 3, 4]) / 2)
    assert metrics.mean_ci([7.0]) == (7.0, 0.0)


def test_metrics_accept_torch_tensors():
    x = torch.randn(64, 8)
    assert metrics.mm_dist(x, x) == 0.0


# --- jerk and foot skate on hand-made joint paths ----------------------------------------------------------


def _path(x, y, z) -> np.ndarray:
    """One joint's path (T, 1, 3) from three coordinate sequences (numbers are held constant)."""
    n = max(np.size(c) for c in (x, y, z))
    return np.stack([np.broadcast_to(np.asarray(c, dtype=np.float64), (n,)) for c in (x, y, z)], -1)[:, None]


def test_jerk_of_a_cubic_path_is_six_a_at_any_frame_rate():
    # p(t) = (a t^3, b t^3, 0): d^3p/dt^3 = (6a, 6b, 0) everywhere, |.| = 6 sqrt(a^2 + b^2) m/s^3
    a, b = 0.7, -2.4
    for fps in (20.0, 30.0, 12.5):
        t = np.arange(50) / fps
        assert metrics.jerk(_path(a * t**3, b * t**3, 0.0), fps) == pytest.approx(6 * np.hypot(a, b), rel=1e-6)


def test_jerk_of_uniformly_accelerated_joints_is_zero_and_ignores_standing_joints():
    t = np.arange(40) / 20.0
    moving = _path(1.3 * t, 0.9, 0.5 * 9.81 * t**2)  # constant velocity in x, constant acceleration in z
    assert metrics.jerk(moving, 20.0) == pytest.approx(0.0, abs=1e-9)
    cubic = _path(2.0 * t**3, 0.0, 0.0)
    still = _path(np.zeros_like(t), 1.0, 0.0)
    two = np.concatenate([cubic, still], axis=1)  # the mean over joints halves the cubic joint's 12 m/s^3
    assert metrics.jerk(two, 20.0) == pytest.approx(6.0, rel=1e-6)


def test_jerk_of_a_sine_matches_its_analytic_third_derivative():
    # x = A sin(w t): the third derivative's magnitude is A w^3 |cos(w t)|, whose mean over whole periods is
    # A w^3 * 2 / pi
    amplitude, w, fps = 0.1, 2 * np.pi * 1.5, 200.0
    t = np.arange(round(4 / 1.5 * fps) + 3) / fps  # four whole periods of steps, plus the 3 the difference eats
    got = metrics.jerk(_path(amplitude * np.sin(w * t), 1.0, 0.0), fps)
    assert got == pytest.approx(amplitude * w**3 * 2 / np.pi, rel=0.01)


T_SKATE, FPS = 41, 20.0  # 40 steps of 1/20 s


def _foot(speed_m_s, height_m) -> np.ndarray:
    """A foot moving along x with the given speeds (one number, or one per step) at the given height(s), metres."""
    steps = np.broadcast_to(np.asarray(speed_m_s, dtype=np.float64), (T_SKATE - 1,)) / FPS
    return _path(np.concatenate([[0.0], np.cumsum(steps)]), height_m, 0.0)


def _feet(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """A (T, 2, 3) 'skeleton' of two feet, joints 0 and 1."""
    return np.concatenate([left, right], axis=1)


def test_a_foot_sliding_on_the_floor_skates_and_a_planted_or_lifted_one_does_not():
    planted, sliding = _foot(0.0, 0.02), _foot(1.0, 0.02)
    flying = _foot(1.0, 0.30)  # a swinging foot, well above the 5 cm contact height
    slow = _foot(0.3, 0.02)  # a shuffle slower than 0.5 m/s is not counted
    assert metrics.foot_skate_ratio(_feet(planted, planted), (0, 1), FPS) == 0.0
    assert metrics.foot_skate_ratio(_feet(flying, flying), (0, 1), FPS) == 0.0
    assert metrics.foot_skate_ratio(_feet(slow, planted), (0, 1), FPS) == 0.0
    assert metrics.foot_skate_ratio(_feet(sliding, planted), (0, 1), FPS) == 1.0  # either foot counts
    assert metrics.foot_skate_ratio(_feet(planted, sliding), (0,), FPS) == 0.0  # only the named feet


def test_foot_skate_counts_the_steps_that_slide_in_contact():
    half = _foot(np.r_[np.ones(20), np.zeros(20)], 0.02)  # slides for 20 of 40 steps, then stands
    assert metrics.foot_skate_ratio(_feet(half, half), (0, 1), FPS) == pytest.approx(0.5)
    lifting = _foot(1.0, np.r_[np.full(10, 0.02), np.full(31, 0.2)])  # on the floor at both ends of 9 steps
    assert metrics.foot_skate_ratio(_feet(lifting, lifting), (0, 1), FPS) == pytest.approx(9 / 40)
    # Heights are above the floor y = 0: the same slide 4 cm up touches the ground, 6 cm up does not
    low_high = _feet(_foot(1.0, 0.04), _foot(1.0, 0.06))
    assert metrics.foot_skate_ratio(low_high, (0,), FPS) == 1.0
    assert metrics.foot_skate_ratio(low_high, (1,), FPS) == 0.0


def test_a_one_step_jitter_of_a_planted_foot_is_not_a_skate():
    # 2 m/s in one step only: fast in that step, but 0.4 m/s averaged over the 5-step window (GMD's filter)
    jitter = _foot(np.r_[np.zeros(20), 2.0, np.zeros(19)], 0.02)
    assert metrics.foot_skate_ratio(_feet(jitter, jitter), (0, 1), FPS) == 0.0
    two = _foot(np.r_[np.zeros(20), 1.2, 1.2, np.zeros(18)], 0.02)  # two fast steps: 0.48 m/s averaged
    assert metrics.foot_skate_ratio(_feet(two, two), (0, 1), FPS) == 0.0
    three = _foot(np.r_[np.zeros(20), 1.0, 1.0, 1.0, np.zeros(17)], 0.02)  # three: 0.6 m/s averaged, all count
    assert metrics.foot_skate_ratio(_feet(three, three), (0, 1), FPS) == pytest.approx(3 / 40)


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.frechet_distance(np.zeros((0, 4)), np.zeros((5, 4))),
        lambda: metrics.frechet_distance(np.ones((5, 4)), np.ones((5, 3))),
        lambda: metrics.frechet_distance(np.full((5, 4), np.nan), np.ones((5, 4))),
        lambda: metrics.frechet_distance(np.ones(4), np.ones(4)),
        lambda: metrics.frechet_distance_from_stats(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)),
        lambda: metrics.r_precision(np.ones((64, 4)), np.ones((64, 5))),
        lambda: metrics.r_precision(np.ones((10, 4)), np.ones((10, 4))),
        lambda: metrics.r_precision(np.ones((64, 4)), np.ones((64, 4)), top_k=0),
        lambda: metrics.mm_dist(np.ones((4, 2)), np.ones((3, 2))),
        lambda: metrics.mm_dist(np.array([[np.inf, 0.0]]), np.ones((1, 2))),
        lambda: metrics.diversity(np.ones((10, 2))),
        lambda: metrics.diversity(np.ones((0, 2)), pairs=0),
        lambda: metrics.multimodality(np.ones((5, 4, 2))),
        lambda: metrics.multimodality(np.ones((5, 2))),
        lambda: metrics.mean_ci([]),
        lambda: metrics.mean_ci([1.0, float("nan")]),
        lambda: metrics.jerk(np.zeros((3, 22, 3)), 20.0),
        lambda: metrics.jerk(np.zeros((10, 22)), 20.0),
        lambda: metrics.jerk(np.full((10, 22, 3), np.nan), 20.0),
        lambda: metrics.jerk(np.zeros((10, 22, 3)), 0.0),
        lambda: metrics.foot_skate_ratio(np.zeros((1, 22, 3)), (10, 11), 20.0),
        lambda: metrics.foot_skate_ratio(np.zeros((10, 22, 3)), (10, 22), 20.0),
        lambda: metrics.foot_skate_ratio(np.zeros((10, 22, 3)), (), 20.0),
        lambda: metrics.foot_skate_ratio(np.zeros((10, 22, 3)), (10, 11), -1.0),
    ],
)
def test_bad_input_is_a_value_error(call):
    with pytest.raises(ValueError):
        call()
