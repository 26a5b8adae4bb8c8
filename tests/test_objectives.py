"""Forward process, posterior, target conversions and loss weights against closed forms
recomputed here in float64 (Ho et al. 2020 eq. 4, 6-7; Salimans & Ho 2022 for v; Hang et
al. 2023 for min-SNR), never against numbers the code printed. diffusion_loss itself is
tested in test_diffusion_loss.py.

Tolerances (each assertion repeats the reason that applies):
- float32 arithmetic on O(1) values: a few roundings of 2^-24 relative, so ~1e-6 absolute
  for |x| <= ~5; divisions by sqrt(alpha_bar) or sqrt(1 - alpha_bar) amplify that by the
  divisor's inverse.
- Monte Carlo: |estimate - expectation| <= 5 standard errors (two-sided p ~ 6e-7 per check,
  with fixed seeds so the tests are deterministic anyway).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import objectives as obj

from helpers import MC_K, cached_schedule as sched, f64, ref_alpha_bar

F32 = 2.0**-24  # float32 unit roundoff.


# ------------------------------------------------------------------------ q_sample


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_matches_formula_per_example_t(name):
    s = sched(name)
    ab = ref_alpha_bar(name, 1000)
    k1, k2 = jax.random.split(jax.random.key(0))
    t = jnp.array([0, 1, 250, 500, 998, 999], jnp.int32)
    x0 = jax.random.uniform(k1, (6, 4, 4, 3), minval=-1, maxval=1)  # NHWC
    eps = jax.random.normal(k2, x0.shape)
    got = obj.q_sample(s, x0, t, eps)
    assert got.shape == x0.shape and got.dtype == jnp.float32
    a = np.sqrt(ab[np.asarray(t)])[:, None, None, None]
    expected = a * f64(x0) + np.sqrt(1 - a**2) * f64(eps)
    # Two float32 products + a sum of values |.| <= ~5: a few roundings of 2^-24 * 5 ~ 3e-7.
    np.testing.assert_allclose(f64(got), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "name,t", [("linear", 0), ("linear", 499), ("linear", 999), ("cosine", 100), ("cosine", 900)]
)
def test_q_sample_monte_carlo_moments(name, t):
    n = 200_000
    s = sched(name)
    ab = ref_alpha_bar(name, 1000)[t]
    x0 = jnp.full((n,), 0.7, jnp.float32)
    noise = jax.random.normal(jax.random.key(t + 1), (n,))
    x_t = f64(obj.q_sample(s, x0, jnp.full((n,), t, jnp.int32), noise))
    var = 1 - ab
    se_mean = np.sqrt(var / n)  # SE of a sample mean of N(., var)
    se_var = var * np.sqrt(2 / (n - 1))  # SE of a Gaussian sample variance
    assert abs(x_t.mean() - np.sqrt(ab) * 0.7) < MC_K * se_mean
    assert abs(x_t.var(ddof=1) - var) < MC_K * se_var


# ------------------------------------------------------------------ q_posterior


@pytest.mark.parametrize("name,zt", [("linear", False), ("cosine", False), ("linear", True)])
def test_q_posterior_matches_ho_eq7_and_gaussian_conditioning(name, zt):
    T = 1000
    s = sched(name, T, zt)
    ab = ref_alpha_bar(name, T, zt)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    alpha = ab / ab_prev
    beta = 1 - alpha
    t = jnp.arange(T, dtype=jnp.int32)
    k1, k2 = jax.random.split(jax.random.key(1))
    x0 = jax.random.uniform(k1, (T, 5), minval=-1, maxval=1)
    x_t = jax.random.uniform(k2, (T, 5), minval=-3, maxval=3)  # any x_t: formula is pointwise
    mean, var, log_var = obj.q_posterior(s, x0, x_t, t)
    assert mean.shape == (T, 5) and var.shape == (T, 1) and log_var.shape == (T, 1)
    X0, XT = f64(x0), f64(x_t)

    # Ho et al. eq. 7.
    mu = (np.sqrt(ab_prev) * beta / (1 - ab))[:, None] * X0 + (
        np.sqrt(alpha) * (1 - ab_prev) / (1 - ab)
    )[:, None] * XT
    beta_tilde = beta * (1 - ab_prev) / (1 - ab)
    # Coefficients are float32 (rel ~6e-8), |x| <= 3, two products and a sum: ~1e-6 abs.
    np.testing.assert_allclose(f64(mean), mu, rtol=0, atol=2e-6)
    np.testing.assert_allclose(f64(var)[:, 0], beta_tilde, rtol=1e-6, atol=0)  # float32 cast
    np.testing.assert_allclose(f64(log_var)[1:, 0], np.log(beta_tilde[1:]), rtol=1e-6)
    assert log_var[0, 0] == log_var[1, 0]  # t=1's value reused where beta_tilde_1 = 0

    # Independently: (x_{t-1}, x_t) | x0 is bivariate Gaussian with
    #   x_{t-1} = sqrt(ab_prev) x0 + sqrt(1-ab_prev) e1,  x_t = sqrt(alpha) x_{t-1} + sqrt(beta) e2;
    # condition x_{t-1} on x_t by the standard formula.
    m1, m2 = np.sqrt(ab_prev)[:, None] * X0, np.sqrt(ab)[:, None] * X0
    v1 = 1 - ab_prev
    c12 = np.sqrt(alpha) * v1
    v2 = alpha * v1 + beta  # == 1 - ab
    cond_mean = m1 + (c12 / v2)[:, None] * (XT - m2)
    cond_var = v1 - c12**2 / v2
    np.testing.assert_allclose(f64(mean), cond_mean, rtol=0, atol=2e-6)  # as above
    # cond_var = v1 - c12^2/v2 cancels (both terms ~1 at large t, result ~beta_tilde ~1e-2):
    # float64 cancellation error ~1e-16/1e-2, far inside the float32 tolerance, which is
    # absolute 1e-6 * max(var) here because small variances are relative to O(1) terms.
    np.testing.assert_allclose(f64(var)[:, 0], cond_var, rtol=1e-6, atol=1e-12)
    # First step: x_0 is x0 itself, with zero variance.
    np.testing.assert_allclose(f64(mean)[0], X0[0], rtol=0, atol=1e-6)
    assert var[0, 0] == 0.0


def test_q_posterior_monte_carlo_forward_chain():
    """Simulate x0 -> x_{t-1} -> x_t one step at a time in float64 and check that
    x_{t-1} - posterior_mean(x0, x_t) has mean 0, is uncorrelated with x_t and has variance
    beta_tilde: this ties the posterior to the per-step alphas, not only to alpha_bar."""
    n, t = 200_000, 300
    T, x0v = 1000, -0.4
    ab = ref_alpha_bar("linear", T)
    alpha = ab[t] / ab[t - 1]
    rng = np.random.default_rng(0)
    x_prev = np.sqrt(ab[t - 1]) * x0v + np.sqrt(1 - ab[t - 1]) * rng.standard_normal(n)
    x_t = np.sqrt(alpha) * x_prev + np.sqrt(1 - alpha) * rng.standard_normal(n)
    mean, var, _ = obj.q_posterior(
        sched("linear", T),
        jnp.full((n,), x0v, jnp.float32),
        jnp.asarray(x_t, jnp.float32),
        jnp.full((n,), t, jnp.int32),
    )
    pv = float(var[0])
    r = x_prev - f64(mean)
    xc = x_t - np.sqrt(ab[t]) * x0v  # centred x_t, variance 1 - ab[t]
    # 5 SE each: mean of r ~ N(0, pv/n); mean(r*xc) has variance pv*(1-ab)/n (r indep. of x_t);
    # Gaussian sample variance has SE pv*sqrt(2/n). float32 rounding of x_t (~1e-7) is
    # negligible next to sqrt(pv) ~ 0.1.
    assert abs(r.mean()) < MC_K * np.sqrt(pv / n)
    assert abs((r * xc).mean()) < MC_K * np.sqrt(pv * (1 - ab[t]) / n)
    assert abs(r.var() - pv) < MC_K * pv * np.sqrt(2 / n)


# ---------------------------------------------------------- targets and conversions


def _x0_eps(shape, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.uniform(k1, shape, minval=-1, maxval=1), jax.random.normal(k2, shape)


def test_v_target_matches_salimans_ho_definition():
    s = sched("cosine")
    ab = ref_alpha_bar("cosine", 1000)
    t = jnp.arange(1000, dtype=jnp.int32)
    x0, eps = _x0_eps((1000, 8), 2)
    a, sg = np.sqrt(ab)[:, None], np.sqrt(1 - ab)[:, None]
    # v = sqrt(ab) eps - sqrt(1-ab) x0; float32 ops on |.| <= ~5: ~1e-6 absolute.
    np.testing.assert_allclose(
        f64(obj.target(s, "v", x0, eps, t)), a * f64(eps) - sg * f64(x0), rtol=0, atol=2e-6
    )
    np.testing.assert_array_equal(obj.target(s, "eps", x0, eps, t), eps)
    np.testing.assert_array_equal(obj.target(s, "x0", x0, eps, t), x0)


def test_conversions_from_arbitrary_outputs_match_closed_forms():
    """Not only a round trip (which a consistent sign error would survive): an arbitrary
    model output m maps to the (x0, eps) the paper formulas give."""
    s = sched("linear")
    ab = ref_alpha_bar("linear", 1000)
    t = jnp.array([100, 400, 700], jnp.int32)
    x_t, m = _x0_eps((3, 6), 3)
    a, sg = np.sqrt(ab[np.asarray(t)])[:, None], np.sqrt(1 - ab[np.asarray(t)])[:, None]
    X, M = f64(x_t), f64(m)
    expected = {
        "eps": ((X - sg * M) / a, M),
        "x0": (M, (X - a * M) / sg),
        "v": (a * X - sg * M, sg * X + a * M),  # from x_t = a x0 + s eps, v = a eps - s x0
    }
    for kind, (ex0, eeps) in expected.items():
        gx0, geps = obj.x0_eps_from_prediction(s, kind, x_t, t, m)
        # At these t, 1/sqrt(ab) <= ~16 and 1/sqrt(1-ab) <= ~3.2 amplify ~5e-7 float32
        # rounding of x_t to <= ~8e-6 worst case.
        np.testing.assert_allclose(f64(gx0), ex0, rtol=0, atol=1e-5, err_msg=kind)
        np.testing.assert_allclose(f64(geps), eeps, rtol=0, atol=1e-5, err_msg=kind)


@pytest.mark.parametrize(
    "name,zt", [("linear", False), ("cosine", False), ("linear", True), ("cosine", True)]
)
@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_prediction_round_trip(name, zt, kind):
    """x0, eps -> x_t, target(kind) -> (x0, eps) again, at every t."""
    T = 1000
    s = sched(name, T, zt)
    ab = ref_alpha_bar(name, T, zt)
    t = jnp.arange(T, dtype=jnp.int32)
    x0, eps = _x0_eps((T, 64), 4)
    x_t = obj.q_sample(s, x0, t, eps)
    rx0, reps = obj.x0_eps_from_prediction(s, kind, x_t, t, obj.target(s, kind, x0, eps, t))
    err_x0 = np.abs(f64(rx0) - f64(x0)).max(axis=1)
    err_eps = np.abs(f64(reps) - f64(eps)).max(axis=1)
    a, sg = np.sqrt(ab), np.sqrt(1 - ab)
    # The model's own output comes back bit-exactly.
    if kind == "eps":
        np.testing.assert_array_equal(reps, eps)
    if kind == "x0":
        np.testing.assert_array_equal(rx0, x0)
    # Recovering the other quantity: x_t carries float32 rounding, a few times 2^-24 * |x_t|
    # (|x_t| < 8 here, so <= ~5e-7 absolute), which eps-kind divides by sqrt(ab) and x0-kind
    # by sqrt(1 - ab). So we assert (i) 1e-5 absolute where the divisor is not small
    # (eps-kind: ab > 1e-3, amplification <= ~32, observed <= ~4e-6; x0-kind: 1 - ab > 1e-2)
    # and (ii) everywhere else the amplified bound 2e-6 / divisor (~4x the largest rounding
    # error times the amplification). v-kind uses a^2 + s^2 = 1 and never divides: 1e-5 at
    # every t, including the zero-terminal-SNR step where sqrt(ab) = 0.
    if kind == "eps":
        pos = ab > 0  # excludes the ZT-SNR last step, where x0 = (x_t - s eps)/0 is undefined
        assert np.all(err_x0[ab > 1e-3] <= 1e-5)
        assert np.all(err_x0[pos] <= 2e-6 / a[pos])
        if zt:  # documented: eps prediction cannot give x0 at zero terminal SNR
            assert not np.all(np.isfinite(f64(rx0)[-1]))
    elif kind == "x0":
        assert np.all(err_eps[(1 - ab) > 1e-2] <= 1e-5)
        assert np.all(err_eps <= 2e-6 / sg)
    else:
        assert np.all(err_x0 <= 1e-5) and np.all(err_eps <= 1e-5)


# --------------------------------------------------------------------- loss weights


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_weights(name, gamma):
    s = sched(name)
    ab = ref_alpha_bar(name, 1000)
    snr = ab / (1 - ab)
    t = jnp.arange(1000, dtype=jnp.int32)
    clipped = np.minimum(snr, gamma)
    expected = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}
    assert snr.min() < gamma < snr.max()  # both branches of the min are exercised
    for kind, e in expected.items():
        w = obj.loss_weight(s, t, kind, "min_snr", min_snr_gamma=gamma)
        assert w.shape == (1000,) and w.dtype == jnp.float32
        # SNR = exp(float32 log_snr), |log_snr| <= ~20: abs error in the log <= ~1.2e-6, so
        # relative error in SNR (and the weights) <= ~2e-6; 5e-6 allows for exp's own rounding.
        np.testing.assert_allclose(f64(w), e, rtol=5e-6, err_msg=kind)


def test_uniform_weights_are_one():
    t = jnp.array([0, 3, 999], jnp.int32)
    for kind in obj.PREDICTIONS:
        w = obj.loss_weight(sched(), t, kind, "uniform")
        np.testing.assert_array_equal(w, np.ones(3))
        assert w.shape == (3,)


def test_min_snr_weights_at_zero_terminal_snr():
    s = sched("linear", 1000, True)
    t = jnp.array([998, 999], jnp.int32)
    w = {k: f64(obj.loss_weight(s, t, k, "min_snr")) for k in obj.PREDICTIONS}
    assert all(np.all(np.isfinite(v)) for v in w.values()), w
    # snr = 0: min(0, 5)/0 -> limit 1 for eps; min(0,5)/(0+1) = 0 for v; min(0, 5) = 0 for x0.
    assert w["eps"][-1] == 1.0 and w["v"][-1] == 0.0 and w["x0"][-1] == 0.0


def test_bad_choices_raise_with_valid_list():
    t = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError) as e:
        obj.loss_weight(sched(), t, "eps", "snr_plus_one")
    assert all(w in str(e.value) for w in ("uniform", "min_snr"))
    with pytest.raises(ValueError) as e:
        obj.loss_weight(sched(), t, "score", "uniform")
    assert all(p in str(e.value) for p in ("eps", "x0", "v"))
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError):
        obj.target(sched(), "epsilon", x, x, t)
    with pytest.raises(ValueError):
        obj.x0_eps_from_prediction(sched(), "velocity", x, t, x)
