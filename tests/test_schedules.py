"""Noise schedules against their closed forms.

Every expected value is recomputed here in float64 numpy straight from the paper formulas
(Ho et al. 2020; Nichol & Dhariwal 2021; Chen 2023; Lin et al. 2024), never from
diffusion_jax itself, so a changed registered schedule fails these tests.

Tolerances: the schedule is computed in float64 and stored in float32, so a stored value
differs from the float64 closed form by the cast alone, <= 2^-24 ~ 6e-8 relative (plus
float64 reassociation noise ~1e-13). We assert rtol = 1e-6, i.e. ~16 float32 half-ulps:
loose enough for any correct implementation, tight enough that a wrong formula, an
off-by-one in t or a float32 (instead of float64) cumprod over 1000 steps (error ~1e-5
relative) fails.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.schedules import NoiseSchedule, make_schedule

F32_RTOL = 1e-6  # float32 storage of a float64 value: see module docstring.

NAMES = ("linear", "cosine", "scaled_linear", "sigmoid")
FIELDS = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_snr",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

# (name, T) for the generic invariants. The brief asks for T in {10, 1000}; linear at T=10 is
# invalid by construction (the 1000/T scaling puts beta_T = 2.0 > 1, tested separately
# below), so linear's short schedule is T=50 (beta_T = 0.4).
CASES = [(n, T) for n in NAMES for T in (10, 1000) if (n, T) != ("linear", 10)] + [("linear", 50)]


def f64(x):
    return np.asarray(x, dtype=np.float64)


def assert_f32_close(actual, expected, rtol=F32_RTOL, atol=0.0):
    """float32-stored `actual` vs float64 `expected` (rtol: see module docstring)."""
    np.testing.assert_allclose(f64(actual), f64(expected), rtol=rtol, atol=atol)


# --------------------------------------------------------------- closed forms (float64)


def cosine_alpha_bar(u, s=0.008):
    """Nichol & Dhariwal 2021 eq. 17: f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""
    f = lambda v: np.cos((v + s) / (1 + s) * np.pi / 2) ** 2
    return f(np.asarray(u, np.float64)) / f(0.0)


def sigmoid_alpha_bar(u, start=-3.0, end=3.0, tau=1.0):
    """Chen 2023 (Alg. 1, sigmoid_schedule): (sig(end/tau) - sig((u(end-start)+start)/tau))
    / (sig(end/tau) - sig(start/tau))."""
    sig = lambda z: 1 / (1 + np.exp(-z))
    u = np.asarray(u, np.float64)
    return (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (
        sig(end / tau) - sig(start / tau)
    )


def betas_from_alpha_bar(alpha_bar, T):
    """beta_t = min(1 - abar(t/T)/abar((t-1)/T), 0.999), t = 1..T (Nichol & Dhariwal eq. 17)."""
    ab = alpha_bar(np.arange(T + 1) / T)
    return np.minimum(1 - ab[1:] / ab[:-1], 0.999)


def reference_betas(name, T):
    if name == "linear":  # Ho et al.; scaled by 1000/T (Nichol & Dhariwal).
        return (1000 / T) * np.linspace(1e-4, 0.02, T, dtype=np.float64)
    if name == "cosine":
        return betas_from_alpha_bar(cosine_alpha_bar, T)
    if name == "scaled_linear":  # Stable Diffusion: linspace in sqrt(beta).
        return np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    if name == "sigmoid":
        return betas_from_alpha_bar(sigmoid_alpha_bar, T)
    raise AssertionError(name)


# ------------------------------------------------------------------------ linear


def test_linear_t1000_betas_endpoints_and_alpha_bar():
    sched = make_schedule("linear", 1000)
    betas = f64(sched.betas)
    assert_f32_close(betas[[0, -1]], [1e-4, 0.02])
    assert_f32_close(betas, np.linspace(1e-4, 0.02, 1000))
    ref = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    for t in (0, 1, 499, 999):
        # alpha_bar after t+1 steps (index t == paper timestep t+1), as an explicit product.
        expected = np.prod(1.0 - ref[: t + 1])
        assert_f32_close(sched.alphas_cumprod[t], expected)


def test_linear_scales_with_num_timesteps():
    # Nichol & Dhariwal 2021: beta range (1000/T)*(1e-4, 0.02) for T != 1000.
    sched = make_schedule("linear", 250)
    assert sched.betas.shape == (250,)
    assert_f32_close(sched.betas, (1000 / 250) * np.linspace(1e-4, 0.02, 250))
    assert_f32_close(f64(sched.betas)[[0, -1]], [4e-4, 0.08])


def test_linear_too_few_steps_is_rejected():
    # 1000/T scaling gives beta_T = 20/T > 1 for T < 20: not a valid diffusion.
    with pytest.raises(ValueError):
        make_schedule("linear", 10)


# ------------------------------------------------------------------------ cosine


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_alpha_bar_matches_closed_form_until_clip(T):
    sched = make_schedule("cosine", T)
    u = np.arange(1, T + 1) / T  # index i is paper timestep i+1, i.e. u = (i+1)/T
    raw_betas = 1 - cosine_alpha_bar(u) / cosine_alpha_bar(u - 1 / T)
    clipped = raw_betas > 0.999
    first_clip = int(np.argmax(clipped)) if clipped.any() else T
    assert first_clip > T // 2  # the clip only touches the last steps; else this test is vacuous
    # Before the clip engages, cumprod(1 - beta) telescopes to f(t)/f(0) exactly.
    assert_f32_close(sched.alphas_cumprod[:first_clip], cosine_alpha_bar(u[:first_clip]))
    # Several explicit timesteps, to make the indexing convention visible.
    for i in {0, 1, T // 2, first_clip - 1}:
        assert_f32_close(sched.alphas_cumprod[i], cosine_alpha_bar((i + 1) / T))
    # From the clip on, alpha_bar follows the clipped betas instead.
    assert_f32_close(sched.alphas_cumprod, np.cumprod(1 - np.minimum(raw_betas, 0.999)))


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_last_beta_is_clipped(T):
    sched = make_schedule("cosine", T)
    betas = f64(sched.betas)
    # f(1) = cos^2(pi/2) = 0, so the unclipped last beta is 1 - 0/f(1 - 1/T) = 1 (up to
    # float64 rounding of cos(pi/2) ~ 6e-17) and the 0.999 clip must engage.
    raw_last = 1 - cosine_alpha_bar(1.0) / cosine_alpha_bar(1 - 1 / T)
    assert raw_last > 0.999
    assert sched.betas[-1] == np.float32(0.999)  # exact: the clip value cast to float32
    assert np.all(betas <= np.float32(0.999))
    # Only the last step is clipped at these T (the second-to-last raw beta is ~0.75 at T=1000).
    assert_f32_close(betas[:-1], reference_betas("cosine", T)[:-1])
    assert np.all(betas[:-1] < 0.999)


def test_cosine_s_option_is_used():
    sched = make_schedule("cosine", 1000, s=0.02)
    assert_f32_close(sched.alphas_cumprod[499], cosine_alpha_bar(0.5, s=0.02))
    assert not np.isclose(cosine_alpha_bar(0.5, s=0.02), cosine_alpha_bar(0.5), rtol=1e-4)


# ---------------------------------------------------------- scaled_linear / sigmoid


@pytest.mark.parametrize("T", [10, 1000])
def test_scaled_linear_is_linear_in_sqrt_beta(T):
    sched = make_schedule("scaled_linear", T)
    expected = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T) ** 2
    assert_f32_close(sched.betas, expected)
    assert_f32_close(f64(sched.betas)[[0, -1]], [0.00085, 0.012])
    # sqrt(beta) has constant increments: second differences vanish up to float32 storage
    # (|sqrt(beta)| <= 0.11, float32 half-ulp there ~4e-9; 1e-7 allows several).
    sqrt_b = np.sqrt(f64(sched.betas))
    np.testing.assert_allclose(np.diff(sqrt_b, 2), 0.0, atol=1e-7)
    assert_f32_close(sched.alphas_cumprod, np.cumprod(1 - expected))


@pytest.mark.parametrize("T", [10, 1000])
def test_sigmoid_schedule(T):
    sched = make_schedule("sigmoid", T)
    ab = f64(sched.alphas_cumprod)
    betas = f64(sched.betas)
    assert np.all(np.diff(ab) < 0)
    # "~1 to ~0": first step removes only beta_1 of the signal, the last leaves ~nothing.
    # Bounds from the closed form: 1 - ab[0] = 1 - sigmoid_alpha_bar(1/T) <= 0.04 for T >= 10.
    assert ab[0] > 0.95 and ab[-1] < 1e-4
    assert np.all(betas > 0) and np.all(betas <= np.float32(0.999))
    assert_f32_close(betas, reference_betas("sigmoid", T))
    u = np.arange(1, T + 1) / T
    # The last beta is clipped (alpha_bar(1) = 0), so the closed form holds before it.
    assert_f32_close(ab[:-1], sigmoid_alpha_bar(u[:-1]))


# ------------------------------------------------------ invariants of every schedule


@pytest.mark.parametrize("name,T", CASES)
def test_schedule_invariants(name, T):
    sched = make_schedule(name, T)
    for field in FIELDS:
        arr = getattr(sched, field)
        assert arr.shape == (T,), field
        assert arr.dtype == jnp.float32, field
    assert sched.num_timesteps == T

    betas = reference_betas(name, T)
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    assert_f32_close(sched.betas, betas)
    assert_f32_close(sched.alphas, alphas)
    assert_f32_close(sched.alphas_cumprod, ab)

    got_ab = f64(sched.alphas_cumprod)
    assert np.all(np.diff(got_ab) < 0), "alpha_bar must be strictly decreasing (in float32)"
    assert np.all(got_ab > 0) and np.all(got_ab <= 1)

    # Shifted by one with a leading 1 (exactly: both are the same float32 values).
    assert sched.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(sched.alphas_cumprod_prev[1:], sched.alphas_cumprod[:-1])

    log_snr = np.log(ab / (1 - ab))
    # |log_snr| crosses 0 mid-schedule, where relative error is meaningless; float64 noise
    # there is < 1e-12 absolute, so a tiny atol suffices next to the float32 rtol.
    assert_f32_close(sched.log_snr, log_snr, atol=1e-9)
    assert np.all(np.diff(f64(sched.log_snr)) < 0)

    # sqrt(ab)^2 + sqrt(1-ab)^2 = 1: each square carries ~2 float32 roundings (~1.2e-7).
    a, s = f64(sched.sqrt_alphas_cumprod), f64(sched.sqrt_one_minus_alphas_cumprod)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=0, atol=1e-6)
    assert_f32_close(a, np.sqrt(ab))
    assert_f32_close(s, np.sqrt(1 - ab))

    # Ho et al. eq. 7: beta_tilde = beta (1 - ab_prev)/(1 - ab); beta_tilde_1 = 0 exactly.
    post_var = betas * (1 - ab_prev) / (1 - ab)
    assert sched.posterior_variance[0] == 0.0
    assert_f32_close(sched.posterior_variance, post_var)
    assert_f32_close(sched.posterior_log_variance_clipped[1:], np.log(post_var[1:]), atol=1e-9)
    assert_f32_close(sched.posterior_log_variance_clipped[0], np.log(post_var[1]))
    assert sched.posterior_log_variance_clipped[0] == sched.posterior_log_variance_clipped[1]
    assert_f32_close(sched.posterior_mean_coef1, betas * np.sqrt(ab_prev) / (1 - ab))
    assert_f32_close(sched.posterior_mean_coef2, (1 - ab_prev) * np.sqrt(alphas) / (1 - ab))


# ------------------------------------------------------------ zero terminal SNR


@pytest.mark.parametrize("name,T", CASES)
def test_zero_terminal_snr(name, T):
    orig = make_schedule(name, T)
    zt = make_schedule(name, T, zero_terminal_snr=True)
    assert zt.alphas_cumprod[-1] == 0.0  # exactly, not merely small
    assert zt.sqrt_alphas_cumprod[-1] == 0.0
    assert zt.log_snr[-1] == -np.inf
    assert np.all(np.isfinite(f64(zt.log_snr)[:-1]))
    # Lin et al. 2024 Alg. 1 keeps sqrt(alpha_bar_1) (and shifts/scales the rest).
    assert_f32_close(zt.sqrt_alphas_cumprod[0], orig.sqrt_alphas_cumprod[0])
    assert np.all(np.diff(f64(zt.alphas_cumprod)) < 0)
    assert np.all(np.diff(f64(zt.log_snr)) < 0)

    # Closed form of Alg. 1 from the float64 reference schedule.
    sq = np.sqrt(np.cumprod(1 - reference_betas(name, T)))
    sq_new = (sq - sq[-1]) * sq[0] / (sq[0] - sq[-1])
    ab = sq_new**2
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    betas = 1 - ab / ab_prev
    # alpha_bar spans ~1..0 here; near 0 the relative error of (1 - ab/ab_prev) recomputed two
    # ways is float64 noise, so atol 1e-12 only matters for the exact 0.
    assert_f32_close(zt.alphas_cumprod, ab, atol=1e-12)
    assert_f32_close(zt.betas, betas)
    assert zt.betas[-1] == 1.0
    # Everything the samplers use stays finite at the terminal step.
    for field in FIELDS:
        if field != "log_snr":
            assert np.all(np.isfinite(f64(getattr(zt, field)))), field
    assert_f32_close(zt.posterior_variance, betas * (1 - ab_prev) / (1 - ab))


# ------------------------------------------------------------------------ errors


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        make_schedule("cosinus", 1000)
    for name in NAMES:
        assert name in str(e.value)


@pytest.mark.parametrize("T", [0, 1, -5, 2.5])
def test_bad_num_timesteps(T):
    with pytest.raises(ValueError):
        make_schedule("cosine", T)


@pytest.mark.parametrize(
    "name,options",
    [
        ("linear", {"s": 0.008}),  # option of another schedule
        ("cosine", {"beta_end": 0.02}),
        ("linear", {"beta_end": 2.0}),  # betas > 1
        ("linear", {"beta_start": -1e-4}),  # betas <= 0
    ],
)
def test_bad_options(name, options):
    with pytest.raises(ValueError):
        make_schedule(name, 1000, **options)


# ------------------------------------------------------------------------ pytree


def test_schedule_is_a_pytree_and_jit_argument():
    sched = make_schedule("cosine", 1000)
    leaves = jax.tree.leaves(sched)
    assert len(leaves) == 11
    assert all(isinstance(x, jax.Array) and x.shape == (1000,) for x in leaves)
    doubled = jax.tree.map(lambda x: 2 * x, sched)
    assert isinstance(doubled, NoiseSchedule)

    @jax.jit
    def f(s: NoiseSchedule, t):
        # num_timesteps is static (a shape) even under jit.
        return s.alphas_cumprod[t] * s.num_timesteps

    got = f(sched, jnp.int32(499))
    assert_f32_close(got, 1000 * cosine_alpha_bar(0.5))
    # A different schedule of the same shape goes through the same compiled function.
    got2 = f(make_schedule("sigmoid", 1000), jnp.int32(499))
    assert_f32_close(got2, 1000 * sigmoid_alpha_bar(0.5), rtol=1e-5)  # x1000 in float32
