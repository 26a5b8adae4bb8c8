"""Evaluation metrics: FID against a closed form for diagonal Gaussians and against scipy's
sqrtm, KID against an unbiased polynomial-kernel MMD^2 computed here, precision/recall at
its extremes and as computed by hand for each k. Feature nets, sample generation and the
evaluate CLI are tested in test_evaluation.py.
"""

import numpy as np
import pytest
import scipy.linalg

from diffusion_jax import evaluation as ev


def random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def scipy_fid(mu1, s1, mu2, s2):
    """The usual reference implementation: sqrtm of the non-symmetric product."""
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------- FID math


def test_fid_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = ev.fid_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
    np.testing.assert_allclose(got, expected, rtol=1e-12)  # float64 throughout
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2
    np.testing.assert_allclose(ev.fid_from_stats([1.0], [[4.0]], [3.0], [[9.0]]), 4 + 1, rtol=1e-12)


@pytest.mark.parametrize("d", [8, 64, 256])
def test_fid_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    s1, s2 = random_spd(rng, d) + 0.1 * np.eye(d), random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = scipy_fid(mu1, s1, mu2, s2)
    # float64 eigh route vs scipy's sqrtm: measured ~1e-15 relative; allow 1e-9.
    np.testing.assert_allclose(ev.fid_from_stats(mu1, s1, mu2, s2), expected, rtol=1e-9)
    # jnp float32: measured ~1e-7 relative; round-off is ~eps * trace in absolute terms.
    got = float(ev.fid_from_stats_jax(mu1, s1, mu2, s2))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.trace(s1 + s2))


def test_fid_identical_is_zero_and_translation_is_squared_distance():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
    mu, sigma = ev.feature_stats(feats)
    assert abs(ev.fid_from_features(feats, feats)) < 1e-9 * np.trace(sigma)
    shift = rng.normal(size=32)
    np.testing.assert_allclose(ev.fid_from_features(feats + shift, feats), shift @ shift, rtol=1e-7)


def test_fid_singular_covariances():
    """Fewer samples than dimensions (rank-deficient covariances) still give finite,
    correct values: equal singular covariances leave only the mean term."""
    rng = np.random.default_rng(2)
    s = random_spd(rng, 64, rank=10)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    np.testing.assert_allclose(
        ev.fid_from_stats(mu1, s, mu2, s), np.sum((mu1 - mu2) ** 2), rtol=1e-7, atol=1e-7
    )


# --------------------------------------------------------------------------- KID, P/R


def kid_reference(x, y):
    """Unbiased polynomial-kernel MMD^2 on the full sets, in float64 loops-free numpy."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off_diagonal_mean = lambda k, s: (k.sum() - np.trace(k)) / (s * (s - 1))
    return off_diagonal_mean(kxx, m) + off_diagonal_mean(kyy, n) - 2 * kxy.mean()


def test_kid_formula_unbiased_and_sensitive():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 16))
    y = rng.normal(size=(300, 16))
    # one subset covering both sets = the plain unbiased estimator (float32 kernels)
    mean, std = ev.kid(x, y, num_subsets=3, subset_size=300)
    np.testing.assert_allclose(mean, kid_reference(x, y), rtol=1e-4, atol=1e-5)
    assert std < 1e-6 * max(1.0, abs(mean))  # the same full-set subset three times
    # same distribution: ~0 within one subset std; shifted: far above it
    same_mean, same_std = ev.kid(x, y, num_subsets=50, subset_size=100)
    assert abs(same_mean) < same_std
    shift_mean, shift_std = ev.kid(x, y + 0.5, num_subsets=50, subset_size=100)
    assert shift_mean > 5 * shift_std > 0


def test_precision_recall_extremes():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(400, 8)).astype(np.float32)
    assert ev.precision_recall(real, real.copy()) == (1.0, 1.0)
    far = real + 100.0
    assert ev.precision_recall(real, far) == (0.0, 0.0)
    # half the fakes are real points (inside), half far away (outside): precision 1/2
    mixed = np.concatenate([real[:200], far[:200]])
    precision, _ = ev.precision_recall(real, mixed)
    assert precision == 0.5
    # more rows than one distance block (1024) exercises the padded batching
    big = rng.normal(size=(1500, 4)).astype(np.float32)
    assert ev.precision_recall(big, big) == (1.0, 1.0)


def test_precision_recall_depends_on_k_as_computed_by_hand():
    """Kynkaanniemi et al. 2019: a fake point is inside the real manifold iff it lies within
    r_k(x) of some real x, r_k(x) = distance from x to its k-th nearest *other* real point
    (and the reverse for recall). On the line, real R = {0, 1, 2, 3}, fake F = {3.5, 4.5,
    5.5, 9.5}:

      r_k over R:  k=1: 1 1 1 1    k=2: 2 1 1 2    k=3: 3 2 2 3      (for 0 1 2 3)
      r_k over F:  k=1: 1 1 1 4    k=2: 2 1 2 5    k=3: 6 5 4 6      (for 3.5 4.5 5.5 9.5)

    precision: the real point nearest every fake is 3 (r_k(3) = k), and no other real
    point covers more, so fakes at distance 0.5, 1.5, 2.5, 6.5 from 3 are inside iff that
    distance <= k: 1/4, 2/4, 3/4 for k = 1, 2, 3.
    recall: k=1: only real 3 (0.5 from 3.5, radius 1); k=2: also real 2 (1.5 from 3.5,
    radius 2; real 1 is 2.5 from 3.5 and no other fake covers it); k=3: 3.5's radius 6
    covers all of R. So 1/4, 2/4, 4/4.
    Every distance differs from the radius it is compared with by >= 0.5, far outside the
    metric's 1e-5 relative round-off allowance; the values are exact in float32, so the
    fractions (of 4 points) are compared exactly.
    """
    real = np.array([0.0, 1.0, 2.0, 3.0], np.float32)[:, None]
    fake = np.array([3.5, 4.5, 5.5, 9.5], np.float32)[:, None]
    expected = {1: (0.25, 0.25), 2: (0.5, 0.5), 3: (0.75, 1.0)}
    for k, want in expected.items():
        assert ev.precision_recall(real, fake, k=k) == want, k
    # The same configuration rotated into 3-d and translated: only distances matter.
    # (x * u is inexact in float32, ~1e-7 relative: negligible next to the 0.5 margins.)
    u = np.array([2.0, 1.0, 2.0]) / 3.0  # unit vector
    offset = np.array([1.0, -2.0, 0.5])
    embed = lambda x: (x * u + offset).astype(np.float32)
    for k, want in expected.items():
        assert ev.precision_recall(embed(real), embed(fake), k=k) == want, k
    with pytest.raises(ValueError, match="more than 4"):
        ev.precision_recall(real, fake, k=4)  # 4 points have only 3 neighbours each
