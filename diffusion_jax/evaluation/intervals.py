"""How sure a number is: Student-t intervals over independent runs (training seeds),
paired comparisons between two arms run on the same seeds, and bootstrap intervals over
the samples of one evaluation.

The two sources of noise are kept apart on purpose. A bootstrap interval over samples says
how much a score would move with another draw of N samples from the *same* trained model
(the sampling seed); a t-interval over training seeds also holds how much training itself
varies, and is what a claim about a *recipe* (e.g. a schedule) must rest on.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from scipy import stats as scipy_stats

from diffusion_jax.evaluation.stats import matched_fid

LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """``mean`` and a two-sided ``level`` interval [low, high] from ``n`` values."""

    mean: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float) -> bool:
        return value < self.low or value > self.high


def _finite(values) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], np.float64)
    return arr[np.isfinite(arr)]


def t_interval(values, level: float = LEVEL) -> Interval | None:
    """The Student-t interval for the mean of independent values (e.g. one per training
    seed): mean +- t_{(1+level)/2, n-1} s / sqrt(n). None without values; with one value
    the interval is unbounded (one run says nothing about run-to-run spread)."""
    v = _finite(values)
    if len(v) == 0:
        return None
    mean = float(v.mean())
    if len(v) == 1:
        return Interval(mean, -np.inf, np.inf, 1, level)
    half = scipy_stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return Interval(mean, mean - half, mean + half, len(v), level)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A paired comparison of arm ``a`` against arm ``b``: the t-interval of the mean
    per-pair difference a - b, its two-sided p-value, and the relative difference
    mean(a - b) / mean(b)."""

    difference: Interval
    p_value: float
    relative: float

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0 (p < 1 - level)."""
        return self.difference.excludes(0.0)


def paired_difference(a, b, level: float = LEVEL) -> Comparison | None:
    """Compare two arms measured on the same units (pairs (a[i], b[i]) share the training
    seed, the sampling seed and the reference subsets): a paired t-test on a - b. Pairs
    with a missing side are dropped; None with fewer than two complete pairs."""
    pairs = [
        (x, y)
        for x, y in zip(a, b)
        if x is not None and y is not None and np.isfinite(x) and np.isfinite(y)
    ]
    if len(pairs) < 2:
        return None
    x, y = (np.asarray(p, np.float64) for p in zip(*pairs))
    d = x - y
    diff = t_interval(d, level)
    if np.std(d) == 0:  # identical differences: the t statistic is 0/0 or inf
        p = 1.0 if d[0] == 0 else 0.0
    else:
        p = float(scipy_stats.ttest_1samp(d, 0.0).pvalue)
    return Comparison(diff, p, float(d.mean() / y.mean()) if y.mean() else np.nan)


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    num_resamples: int = 200,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """The normal bootstrap interval of ``statistic(rows)`` over ``n`` independent rows:
    estimate +- z_{(1+level)/2} * std of the statistic over resamples. ``statistic`` gets
    an index array (``arange(n)`` for the estimate, resamples with replacement for the
    spread). Normal, not percentile or basic: for FID, resampling with replacement repeats
    rows, which adds finite-N bias to every resampled value, so the resampled values sit
    above the estimate; their percentiles (or their reflection, the basic interval) would
    shift the interval by that bias, while their spread is what another draw of N rows
    would give (tested against independent draws). Monte-Carlo error: with 200 resamples
    the standard deviation is known to ~5%."""
    if n < 2:
        raise ValueError(f"a bootstrap needs n >= 2 rows, got {n}")
    if num_resamples < 10:
        raise ValueError(f"num_resamples must be >= 10, got {num_resamples}")
    estimate = float(statistic(np.arange(n)))
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(num_resamples)])
    half = scipy_stats.norm.ppf((1 + level) / 2) * values.std(ddof=1)
    return Interval(estimate, estimate - half, estimate + half, n, level)


def bootstrap_matched_fid(
    sample_feats,
    real_feats,
    num_samples: int,
    *,
    num_splits: int = 10,
    seed: int = 0,
    num_resamples: int = 200,
    level: float = LEVEL,
) -> Interval:
    """Bootstrap interval of ``matched_fid`` over the sample rows (the reference draws
    stay fixed: they are shared by every arm scored with the same ``seed``, so they are
    not a source of difference between arms). The estimate is the matched FID itself."""
    feats = np.asarray(sample_feats, np.float32)

    def statistic(rows):
        return matched_fid(
            real_feats, num_samples, sample_feats=feats[rows], num_splits=num_splits, seed=seed
        )["fid"]

    return bootstrap_interval(
        statistic, len(feats), num_resamples=num_resamples, level=level, seed=seed
    )
