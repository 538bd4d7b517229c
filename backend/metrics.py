"""The text-to-motion metrics of Guo et al. 2022 ("Generating Diverse and Natural 3D Human Motions from Text"),
computed on evaluator embeddings, as MLD, MDM, T2M-GPT, MoMask and Motion Mamba report them; and two
quality metrics the eye notices, computed on joint positions: :func:`jerk` and :func:`foot_skate_ratio`.

All functions take numpy arrays (or anything ``np.asarray`` reads, e.g. CPU torch tensors), compute in float64,
and raise ``ValueError`` on empty, non-finite or mismatched input. Randomness comes from a ``np.random.Generator``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "diversity",
    "euclidean_distances",
    "foot_skate_ratio",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "jerk",
    "mean_ci",
    "mm_dist",
    "multimodality",
    "r_precision",
]


def _matrix(x, name: str, min_rows: int = 1) -> np.ndarray:
    """``x`` as a finite float64 (N, D) array with N >= min_rows, or ValueError."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected an (N, D) array of embeddings, got shape {a.shape}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} embeddings, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: embeddings contain NaN or infinity")
    return a


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {a.shape} vs {b.shape}")


def gaussian_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (unbiased, rows are samples) of embeddings x (N, D), N >= 2."""
    a = _matrix(x, "gaussian_stats", min_rows=2)
    return a.mean(axis=0), np.cov(a, rowvar=False)


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((s1 s2)^(1/2)) is the sum of square roots of the eigenvalues of s1 s2, which equal those of the symmetric
    PSD matrix s1^(1/2) s2 s1^(1/2); two symmetric eigendecompositions replace scipy's general ``sqrtm`` and stay
    real and stable for singular covariances (few samples, many dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != mu2.shape or mu1.ndim != 1 or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: inconsistent shapes mu {mu1.shape}, {mu2.shape}, sigma {s1.shape}, {s2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("frechet_distance: statistics contain NaN or infinity")
    root1 = _sqrtm_psd(s1)
    eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def frechet_distance(x, y) -> float:
    """FID between two sets of embeddings x (N, D) and y (M, D), each fitted with a Gaussian."""
    a, b = _matrix(x, "frechet_distance x", 2), _matrix(y, "frechet_distance y", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: embedding sizes differ, {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def euclidean_distances(x, y) -> np.ndarray:
    """Pairwise Euclidean distances (N, M) between rows of x (N, D) and y (M, D)."""
    a, b = _matrix(x, "euclidean_distances x"), _matrix(y, "euclidean_distances y")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"euclidean_distances: embedding sizes differ, {a.shape[1]} vs {b.shape[1]}")
    sq = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return np.sqrt(np.clip(sq, 0.0, None))


def r_precision(
    text, motion, top_k: int = 3, batch_size: int = 32, rng: np.random.Generator | None = None
) -> np.ndarray:
    """R-precision top-1..top_k: shuffle the N (text, motion) pairs, split into batches of ``batch_size``
    (the remainder is dropped, as Guo et al.'s loader does), and count how often a text's own motion is among
    the k motions nearest to it in its batch (itself + batch_size - 1 others). Returns (top_k,) accuracies."""
    t, m = _matrix(text, "r_precision text"), _matrix(motion, "r_precision motion")
    _same_shape(t, m, "r_precision")
    if not 1 <= top_k <= batch_size:
        raise ValueError(f"r_precision: need 1 <= top_k <= batch_size, got {top_k}, {batch_size}")
    if t.shape[0] < batch_size:
        raise ValueError(f"r_precision: needs at least batch_size={batch_size} pairs, got {t.shape[0]}")
    order = (rng or np.random.default_rng()).permutation(t.shape[0])
    batches = order[: t.shape[0] // batch_size * batch_size].reshape(-1, batch_size)
    hits = np.zeros(top_k)
    for idx in batches:
        dist = euclidean_distances(t[idx], m[idx])
        rank = (dist < np.diag(dist)[:, None]).sum(axis=1)  # motions strictly nearer than the right one
        hits += (rank[:, None] < np.arange(1, top_k + 1)[None, :]).sum(axis=0)
    return hits / batches.size


def mm_dist(text, motion) -> float:
    """Multimodal distance: mean Euclidean distance between each text embedding and its motion's."""
    t, m = _matrix(text, "mm_dist text"), _matrix(motion, "mm_dist motion")
    _same_shape(t, m, "mm_dist")
    return float(np.linalg.norm(t - m, axis=1).mean())


def diversity(x, pairs: int = 300, rng: np.random.Generator | None = None) -> float:
    """Mean distance between ``pairs`` random pairs of embeddings x (N, D), N >= pairs (Guo et al. draw each
    side's indices without replacement)."""
    a = _matrix(x, "diversity", min_rows=max(pairs, 2))
    rng = rng or np.random.default_rng()
    first, second = rng.choice(a.shape[0], pairs, replace=False), rng.choice(a.shape[0], pairs, replace=False)
    return float(np.linalg.norm(a[first] - a[second], axis=1).mean())


def multimodality(x, pairs: int = 10, rng: np.random.Generator | None = None) -> float:
    """MultiModality: x (P, S, D) holds S generated samples for each of P prompts; the mean distance between
    ``pairs`` random pairs of samples of the same prompt (the same pair indices for every prompt, as Guo et al.)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 3 or 0 in a.shape:
        raise ValueError(f"multimodality: expected (prompts, samples, D) embeddings, got shape {a.shape}")
    if a.shape[1] < pairs:
        raise ValueError(f"multimodality: needs at least pairs={pairs} samples per prompt, got {a.shape[1]}")
    if not np.isfinite(a).all():
        raise ValueError("multimodality: embeddings contain NaN or infinity")
    rng = rng or np.random.default_rng()
    first, second = rng.choice(a.shape[1], pairs, replace=False), rng.choice(a.shape[1], pairs, replace=False)
    return float(np.linalg.norm(a[:, first] - a[:, second], axis=2).mean())


def mean_ci(values) -> tuple[float, float]:
    """Mean and 95% confidence half-width 1.96 * std / sqrt(n) of repeated measurements (population std, as
    Guo et al.'s ``get_metric_statistics``)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"mean_ci: expected a non-empty 1-D sequence, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("mean_ci: values contain NaN or infinity")
    return float(v.mean()), float(1.96 * v.std() / np.sqrt(v.size))


# Foot skate thresholds of Guided Motion Diffusion (Karunratanakul et al., ICCV 2023), also used by OmniControl.
SKATE_HEIGHT_M = 0.05  # a foot lower than this (above the floor y = 0) touches the ground
SKATE_SPEED_M_S = 0.5  # a touching foot moving horizontally faster than this skates (2.5 cm per frame at 20 fps)
SKATE_WINDOW_S = 0.25  # ... and also on average over a centred window this long (GMD: 5 frames at 20 fps)


def _positions(positions, name: str, min_frames: int) -> np.ndarray:
    """``positions`` as a finite float64 (T, J, 3) array with T >= min_frames, or ValueError."""
    p = np.asarray(positions, dtype=np.float64)
    if p.ndim != 3 or p.shape[1] == 0 or p.shape[2] != 3:
        raise ValueError(f"{name}: expected joint positions of shape (T, J, 3), got {p.shape}")
    if p.shape[0] < min_frames:
        raise ValueError(f"{name}: needs at least {min_frames} frames, got {p.shape[0]}")
    if not np.isfinite(p).all():
        raise ValueError(f"{name}: positions contain NaN or infinity")
    return p


def _fps(fps: float, name: str) -> float:
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"{name}: fps must be positive, got {fps}")
    return float(fps)


def jerk_per_frame(positions, fps: float) -> np.ndarray:
    """Jerk at each of the T - 3 frame steps, in m/s^3: the magnitude of the third time derivative of every
    joint's position (T, J, 3) in metres, by the third finite difference p[t+3] - 3 p[t+2] + 3 p[t+1] - p[t]
    times fps^3 (exact for cubic paths), averaged over the J joints. T >= 4."""
    p = _positions(positions, "jerk", min_frames=4)
    third = np.diff(p, n=3, axis=0) * _fps(fps, "jerk") ** 3
    return np.linalg.norm(third, axis=-1).mean(axis=-1)


def jerk(positions, fps: float) -> float:
    """Mean jerk of a motion, in m/s^3: :func:`jerk_per_frame` averaged over the frames."""
    return float(jerk_per_frame(positions, fps).mean())


def foot_skate_ratio(positions, feet: tuple[int, ...], fps: float) -> float:
    """Foot skate ratio of Guided Motion Diffusion (Karunratanakul et al. 2023, "Guided Motion Diffusion for
    Controllable Human Motion Synthesis", ICCV; its ``calculate_skating_ratio``, reused by OmniControl): the
    fraction of the T - 1 frame steps in which some foot skates.

    Positions (T, J, 3) are in metres, Y up, floor at y = 0 (HumanML3D's placement); ``feet`` are the foot
    joints' indices (SMPL22: 10 and 11, the feet below the ankles, as GMD). A foot skates in the step t -> t+1
    when it touches the ground at both ends (height < ``SKATE_HEIGHT_M``) and its horizontal (XZ) speed exceeds
    ``SKATE_SPEED_M_S`` both in that step and averaged over a centred window of ``SKATE_WINDOW_S`` (an odd
    number of steps, zero-padded at the clip's ends as GMD's ``uniform_filter1d(mode="constant")``). T >= 2."""
    p = _positions(positions, "foot_skate_ratio", min_frames=2)
    fps = _fps(fps, "foot_skate_ratio")
    if len(feet) == 0 or not all(0 <= f < p.shape[1] for f in feet):
        raise ValueError(f"foot_skate_ratio: foot joints {tuple(feet)} not in 0..{p.shape[1] - 1}")
    foot = p[:, list(feet), :]  # (T, F, 3)
    speed = np.linalg.norm(np.diff(foot[..., [0, 2]], axis=0), axis=-1) * fps  # (T-1, F)
    window = round(SKATE_WINDOW_S * fps) | 1
    padded = np.pad(speed, ((window // 2 + 1, window // 2), (0, 0)))  # one more zero in front for the cumsum
    total = np.cumsum(padded, axis=0)
    average = (total[window:] - total[:-window]) / window  # (T-1, F): mean over the window centred on each step
    low = foot[..., 1] < SKATE_HEIGHT_M
    contact = low[:-1] & low[1:]
    skating = contact & (speed > SKATE_SPEED_M_S) & (average > SKATE_SPEED_M_S)
    return float(skating.any(axis=1).mean())
