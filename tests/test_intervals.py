"""Intervals and paired comparisons (evaluation/intervals.py) on synthetic data whose
answer is known: Gaussian values with a known mean, arms with a known difference, and
Gaussian features whose matched-FID spread over independent draws can be measured."""

import numpy as np
import pytest

from diffusion_jax.evaluation import intervals
from diffusion_jax.evaluation.stats import matched_fid


def test_t_interval_closed_form():
    # [1, 2, 3]: mean 2, s = 1, t_{0.975, 2} = 4.302653 (tables): 2 +- 4.302653 / sqrt(3)
    ci = intervals.t_interval([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3
    np.testing.assert_allclose([ci.low, ci.high], 2 + np.array([-1, 1]) * 4.302653 / 3**0.5, 1e-6)
    one = intervals.t_interval([5.0, None])  # one run: no spread, an unbounded interval
    assert one.mean == 5.0 and one.n == 1 and one.low == -np.inf
    assert intervals.t_interval([None]) is None


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    # 4,000 experiments of 3 draws each from N(1.5, 2^2). Coverage is Binomial(4000, 0.95)
    # around 0.95: std 0.0034, so +-0.012 is a 3.5-sigma band.
    rng = np.random.default_rng(0)
    draws = rng.normal(1.5, 2.0, size=(4000, 3))
    covered = [not intervals.t_interval(d).excludes(1.5) for d in draws]
    assert abs(np.mean(covered) - 0.95) < 0.012


def test_paired_difference_finds_a_known_difference_despite_seed_effects():
    # Each training seed moves both arms by a large shared amount (std 1); arm a is better
    # by exactly 0.3 up to small arm-specific noise (std 0.05). Paired, 3 seeds see it;
    # the unpaired intervals of the two arms overlap.
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 1.0, 3)
    b = 5.0 + seed_effect + rng.normal(0, 0.05, 3)
    a = b - 0.3 + rng.normal(0, 0.05, 3)
    cmp = intervals.paired_difference(a, b)
    assert cmp.significant and cmp.p_value < 0.05
    assert cmp.difference.low < -0.3 < cmp.difference.high
    ia, ib = intervals.t_interval(a), intervals.t_interval(b)
    assert ia.high > ib.low  # unpaired: not separable
    np.testing.assert_allclose(cmp.relative, np.mean(a - b) / np.mean(b))


def test_paired_difference_false_positive_rate_is_the_level():
    # Two arms with no difference: 4,000 comparisons of 3 pairs; about 5% are called
    # significant (Binomial std 0.0034; +-0.012 is 3.5 sigma).
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 4000, 3)) + rng.normal(size=(1, 4000, 3))
    rate = np.mean([intervals.paired_difference(x, y).significant for x, y in zip(a, b)])
    assert abs(rate - 0.05) < 0.012


def test_paired_difference_drops_incomplete_pairs():
    cmp = intervals.paired_difference([1.0, None, 3.0, 4.0], [0.0, 1.0, np.nan, 3.0])
    assert cmp.difference.n == 2 and cmp.difference.mean == 1.0 and cmp.p_value == 0.0
    assert intervals.paired_difference([1.0], [2.0]) is None


def test_bootstrap_interval_of_a_mean_matches_the_normal_interval():
    # n = 400 draws from N(0, 1): the mean's 95% half-width is 1.96 / 20 = 0.098. With
    # 1,000 resamples the bootstrap's half-width is within 10% of it (its Monte-Carlo and
    # sample-std error is ~4%).
    x = np.random.default_rng(3).normal(size=400)
    ci = intervals.bootstrap_interval(lambda rows: x[rows].mean(), len(x), num_resamples=1000)
    assert ci.mean == pytest.approx(x.mean())
    assert ci.half_width == pytest.approx(1.96 * x.std() / 20, rel=0.10)
    assert ci.low < x.mean() < ci.high


def test_bootstrap_matched_fid_predicts_the_spread_over_sampling_seeds():
    # Features: 1,200 "real" rows from N(0, I_8) and a generator N(0.15, 1.1^2 I_8). The
    # spread of matched FID over 100 independent draws of 300 samples (known to ~7%) is
    # what a bootstrap on any one draw must predict. Measured on this toy: the bootstrap
    # half-width is 1.0-1.5x the true one (mean ~1.25x: conservative, repeated rows add
    # spread); asserted in [0.8, 1.7]. A bootstrap that ignored the sample-side noise
    # (width ~0) or doubled it fails.
    rng = np.random.default_rng(4)
    d, n = 8, 300
    real = rng.normal(size=(1200, d)).astype(np.float32)

    def draw():
        return (0.15 + 1.1 * rng.normal(size=(n, d))).astype(np.float32)

    scores = [matched_fid(real, n, sample_feats=draw(), num_splits=4)["fid"] for _ in range(100)]
    true_half = 1.96 * np.std(scores, ddof=1)
    for _ in range(3):
        feats = draw()
        ci = intervals.bootstrap_matched_fid(feats, real, n, num_splits=4, num_resamples=200)
        assert ci.mean == pytest.approx(
            matched_fid(real, n, sample_feats=feats, num_splits=4)["fid"]
        )
        assert 0.8 < ci.half_width / true_half < 1.7
        assert ci.low < np.mean(scores) < ci.high  # centred on the draw, not shifted


def test_bootstrap_rejects_too_few_rows_or_resamples():
    with pytest.raises(ValueError, match="n >= 2"):
        intervals.bootstrap_interval(np.mean, 1)
    with pytest.raises(ValueError, match="num_resamples"):
        intervals.bootstrap_interval(np.mean, 5, num_resamples=3)
