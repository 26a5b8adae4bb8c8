"""The step grids of diffusion_jax.timesteps: which schedule indices each spacing visits,
checked on small cases by hand, on every step count for the invariants (descending, in
range, where it starts), and for spacing "logsnr" against a brute-force nearest-index
search; bad step counts and spacings raise."""

import numpy as np
import pytest

from diffusion_jax import timesteps
from diffusion_jax.schedules import make_schedule

from oracles import SCHED, T


@pytest.mark.parametrize(
    "spacing,n,expected",
    [
        ("leading", 3, [6, 3, 0]),
        ("leading", 5, [8, 6, 4, 2, 0]),
        ("trailing", 3, [9, 6, 2]),
        ("trailing", 5, [9, 7, 5, 3, 1]),
        ("linspace", 3, [9, 4, 0]),
        ("linspace", 5, [9, 7, 4, 2, 0]),
        ("leading", 10, list(range(9, -1, -1))),
        ("trailing", 10, list(range(9, -1, -1))),
        ("linspace", 10, list(range(9, -1, -1))),
        ("trailing", 1, [9]),
    ],
)
def test_ddim_timesteps_small_cases(spacing, n, expected):
    ts = timesteps.ddim_timesteps(10, n, spacing)
    assert ts.dtype == np.int32
    np.testing.assert_array_equal(ts, expected)


@pytest.mark.parametrize("spacing", timesteps.SPACINGS)
def test_ddim_timesteps_all_step_counts(spacing):
    for n in range(1, T + 1):
        ts = timesteps.ddim_timesteps(T, n, spacing, SCHED.log_snr)
        assert len(ts) == n and ts[-1] >= 0 and ts[0] <= T - 1, (spacing, n)
        assert np.all(np.diff(ts) < 0), (spacing, n)
        if spacing in ("trailing", "logsnr"):
            assert ts[0] == T - 1  # starts at the last timestep, unlike "leading"
    # The known "leading" flaw: with T % n == 0 it never reaches T - 1.
    assert timesteps.ddim_timesteps(T, 10, "leading")[0] == 900


@pytest.mark.parametrize(
    "name,zero_terminal_snr,lambda_min,steps",
    [
        ("linear", False, -np.inf, (2, 10, 25, 38)),
        ("cosine", False, -np.inf, (3, 8)),
        ("cosine", False, timesteps.LAMBDA_MIN, (3, 10, 19)),
        ("sigmoid", False, timesteps.LAMBDA_MIN, (3, 20)),
        ("linear", True, -np.inf, (10, 30)),
        ("linear", True, timesteps.LAMBDA_MIN, (10, 30)),
    ],
)
def test_logsnr_timesteps_are_uniform_in_lambda(name, zero_terminal_snr, lambda_min, steps):
    """Spacing "logsnr" visits the indices whose lambda = log(alpha_bar / (1 - alpha_bar)) / 2
    is nearest to n values uniform from lambda(start) to lambda(0) (Lu et al. 2022), where
    start is the largest index with lambda >= lambda_min.

    Tolerance: the integer grid itself. Each chosen index must be the nearest grid point to
    its target (found here by brute force over all T indices), i.e. within half the local
    lambda gap, the best any integer index can do; a time-uniform grid ("linspace",
    "trailing") misses by 2.5-3.5 in lambda (linear, 10 steps). The step counts are those
    where no two targets share a nearest index (asserted): above them (linear: n >= 39;
    unclipped cosine: n >= 9, as its clipped last beta leaves a gap of 3.5 in lambda
    between indices 998 and 999) targets collide and are pushed apart by one index, which
    is not a nearest-point property. With zero terminal SNR lambda(T-1) = -inf: the targets
    span the finite lambdas >= lambda_min and index T-1 is visited first instead.
    """
    sched = make_schedule(name, T, zero_terminal_snr=zero_terminal_snr)
    lam = 0.5 * np.asarray(sched.log_snr, np.float64)  # the table it spaces by, float64
    assert np.isfinite(lam[-1]) != zero_terminal_snr
    kept = np.flatnonzero(np.isfinite(lam) & (lam >= lambda_min))
    lo, start = lam[kept[-1]], kept[-1]
    # The clip matters exactly where the schedule reaches below it (linear: -5.06 > -5.1).
    assert (start < T - 1 - zero_terminal_snr) == (lam[-1 - zero_terminal_snr] < lambda_min)
    for n in steps:
        ts = timesteps.ddim_timesteps(T, n, "logsnr", sched.log_snr, lambda_min)
        targets = lo + (lam[0] - lo) * np.arange(n) / (n - 1)  # for ts[0], ts[1], ..
        gaps = np.abs(lam[None, :] - targets[:, None])  # [n, T]; -inf gives inf
        nearest = np.argmin(gaps, axis=1)
        assert nearest[0] == start
        if zero_terminal_snr:
            nearest[0] = T - 1
        assert len(set(nearest)) == n, (n, nearest)  # no collisions: see docstring
        # No near-ties (float32 table rounding ~1e-6 could flip one): the margin to the
        # second-nearest index is > 1e-4 here, so the expectation is unambiguous.
        second = np.sort(gaps, axis=1)[:, 1]
        assert np.all(second - gaps[np.arange(n), np.argmin(gaps, axis=1)] > 1e-4), n
        miss = np.abs(lam[ts] - targets)[int(zero_terminal_snr) :]  # ZT: ts[0] is T-1
        print(
            f"{name} zt={zero_terminal_snr} lambda_min={lambda_min} n={n}: ts {ts}; "
            f"max |lambda - target| {miss.max():.3f}"
        )
        np.testing.assert_array_equal(ts, nearest, err_msg=f"{name} n={n}")


def test_logsnr_lambda_min_errors_name_the_fix():
    cosine = make_schedule("cosine", T).log_snr  # 996 indices have lambda >= -5.1
    assert len(timesteps.ddim_timesteps(T, 996, "logsnr", cosine)) == 996
    with pytest.raises(ValueError, match="only 996 have lambda >= sampler.lambda_min"):
        timesteps.ddim_timesteps(T, 997, "logsnr", cosine)
    for bad in (5.1, np.nan):
        with pytest.raises(ValueError, match="leaves no step.*lower it"):
            timesteps.ddim_timesteps(T, 10, "logsnr", cosine, bad)


def test_bad_spacing_and_num_steps_raise():
    for bad in (0, T + 1, -3, 2.5):
        with pytest.raises(ValueError, match="num_steps|integers"):
            timesteps.ddim_timesteps(T, bad, "leading")
    with pytest.raises(ValueError, match="spacing"):
        timesteps.ddim_timesteps(T, 10, "uniform")


def test_low_start_warning_flags_exactly_the_grids_that_start_below_lambda_min():
    """The warning fires iff the grid's first index has a finite lambda < lambda_min:
    checked for every leading step count on cosine at T = 1000 (index 995 is the last with
    lambda >= -5.1: leading grids warn from first index 996 on, i.e. n > 200 here, the
    Fashion sweep's failed DDIM-1000), never on the linear schedule (lambda(999) = -5.06)
    or at a zero-terminal-SNR step (lambda = -inf, exact with v-prediction). No tolerance:
    the rule is a comparison of the float64 table with lambda_min."""
    T = 1000
    cosine = make_schedule("cosine", T).log_snr
    lam = 0.5 * np.asarray(cosine, np.float64)
    assert np.flatnonzero(lam >= timesteps.LAMBDA_MIN)[-1] == 995
    for n in range(1, T + 1):
        ts = timesteps.ddim_timesteps(T, n, "leading")
        assert bool(timesteps.low_start_warning(ts, cosine)) == (ts[0] > 995), n
    message = timesteps.low_start_warning(timesteps.ddim_timesteps(T, T, "leading"), cosine)
    assert "index 999" in message and "-9.92" in message and "index <= 995" in message
    for name, zt in (("linear", False), ("linear", True), ("cosine", True)):
        log_snr = make_schedule(name, T, zero_terminal_snr=zt).log_snr
        # leading never visits T-1, so on a zero-terminal-SNR schedule its first index is
        # an ordinary low-lambda one (linear ZT, 50 steps: 980, lambda -6.6): it warns.
        for spacing in ("trailing", "linspace", "logsnr") + ("leading",) * (not zt):
            for n in (10, 50, 1000):
                ts = timesteps.ddim_timesteps(T, n, spacing, log_snr)
                assert timesteps.low_start_warning(ts, log_snr) == "", (name, zt, spacing, n)
    sigmoid = make_schedule("sigmoid", T).log_snr
    for spacing, expect in (("trailing", True), ("linspace", True), ("logsnr", False)):
        ts = timesteps.ddim_timesteps(T, 10, spacing, sigmoid)
        assert bool(timesteps.low_start_warning(ts, sigmoid)) == expect, spacing
    assert timesteps.low_start_warning(ts, sigmoid, -np.inf) == ""
