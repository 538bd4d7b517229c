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
    ],
)
def test_bad_input_is_a_value_error(call):
    with pytest.raises(ValueError):
        call()
