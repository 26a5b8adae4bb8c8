"""Forward process, posterior, target conversions, loss weights and diffusion_loss against
closed forms recomputed here in float64 (Ho et al. 2020 eq. 4, 6-7; Salimans & Ho 2022 for
v; Hang et al. 2023 for min-SNR), never against numbers the code printed.

Tolerances (each assertion repeats the reason that applies):
- float32 arithmetic on O(1) values: a few roundings of 2^-24 relative, so ~1e-6 absolute
  for |x| <= ~5; divisions by sqrt(alpha_bar) or sqrt(1 - alpha_bar) amplify that by the
  divisor's inverse.
- Monte Carlo: |estimate - expectation| <= 5 standard errors (two-sided p ~ 6e-7 per check,
  with fixed seeds so the tests are deterministic anyway).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import objectives as obj
from diffusion_jax.schedules import make_schedule

MC_K = 5  # Monte Carlo tolerance in standard errors.
F32 = 2.0**-24  # float32 unit roundoff.


def f64(x):
    return np.asarray(x, dtype=np.float64)


def ref_alpha_bar(name, T, zero_terminal_snr=False):
    """alpha_bar in float64 from the paper formulas (independent of diffusion_jax)."""
    if name == "linear":
        betas = (1000 / T) * np.linspace(1e-4, 0.02, T)
    elif name == "cosine":
        f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
        ab = f(np.arange(T + 1) / T) / f(0.0)
        betas = np.minimum(1 - ab[1:] / ab[:-1], 0.999)
    else:
        raise AssertionError(name)
    ab = np.cumprod(1 - betas)
    if zero_terminal_snr:  # Lin et al. 2024, Alg. 1
        sq = np.sqrt(ab)
        ab = ((sq - sq[-1]) * sq[0] / (sq[0] - sq[-1])) ** 2
    return ab


@functools.lru_cache(maxsize=None)
def sched(name="linear", T=1000, zero_terminal_snr=False):
    return make_schedule(name, T, zero_terminal_snr=zero_terminal_snr)


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


# ------------------------------------------------------------------ diffusion_loss
# Compiles dominate the runtime on a small CPU box, so each test below jits one function
# (several losses at once where useful) and the shared ones are module-level so the jit
# cache is reused across tests.

LOSS = jax.jit(
    obj.diffusion_loss,
    static_argnums=0,
    static_argnames=("prediction", "weighting", "min_snr_gamma"),
)
B, SHAPE = 4096, (2, 2, 3)  # shared batch shape for the zero-model tests


def zeros_fn(params, x_t, t, y, rng):
    return jnp.zeros_like(x_t)


def _gaussian_batch(b, shape, seed):
    return {"image": jax.random.normal(jax.random.key(seed), (b,) + shape)}


def test_zero_model_eps_loss_aux_and_t_distribution():
    T = 1000
    batch = {"image": jax.random.uniform(jax.random.key(5), (B,) + SHAPE, minval=-1, maxval=1)}
    loss, aux = LOSS(zeros_fn, None, sched(), batch, jax.random.key(6))
    n = B * int(np.prod(SHAPE))
    # Zero model, eps target: loss = mean of n chi^2_1 draws, expectation 1, SE sqrt(2/n).
    assert abs(float(loss) - 1.0) < MC_K * np.sqrt(2 / n)
    # loss is the mean of the per-example losses (float32 mean of 4096 values ~1: ~1e-6).
    per_ex = f64(aux["loss_per_example"])
    np.testing.assert_allclose(float(loss), per_ex.mean(), rtol=1e-6)
    # The noise is Gaussian, not merely unit-variance: each per-example loss is chi^2_k / k
    # (k = pixels per example), variance 2/k (uniform noise of variance 1 would give 0.8/k).
    # SE of a sample variance = sqrt((mu4 - sigma^4)/n), with chi^2_k's central
    # mu4 = 12k^2 + 48k, i.e. mu4 - sigma^4 = (8/k^2 + 48/k^3) after scaling by 1/k.
    k = int(np.prod(SHAPE))
    se_var = np.sqrt((8 / k**2 + 48 / k**3) / B)
    assert abs(per_ex.var(ddof=1) - 2 / k) < MC_K * se_var

    t = f64(aux["t"])
    assert aux["t"].shape == (B,) and aux["t"].dtype == jnp.int32
    assert aux["loss_per_example"].shape == (B,) and aux["loss_per_example"].dtype == jnp.float32
    assert t.min() >= 0 and t.max() <= T - 1
    # t ~ U{0..T-1}: mean (T-1)/2, SD sqrt((T^2-1)/12); 5 SE on the sample mean. Both ends
    # are reached: P(no t >= 990 in 4096 draws) = 0.99^4096 ~ 1e-18.
    assert abs(t.mean() - (T - 1) / 2) < MC_K * np.sqrt((T**2 - 1) / 12 / B)
    assert t.max() >= 990 and t.min() <= 9

    # Same rng -> the same draw; another rng -> other timesteps (P(equal) = 1000^-4096).
    loss2, aux2 = LOSS(zeros_fn, None, sched(), batch, jax.random.key(6))
    assert float(loss2) == float(loss)
    np.testing.assert_array_equal(aux2["t"], aux["t"])
    _, aux3 = LOSS(zeros_fn, None, sched(), batch, jax.random.key(7))
    assert not np.array_equal(f64(aux3["t"]), t)


def test_t_covers_every_timestep_uniformly():
    """With T = 10 and 4096 draws every t in 0..T-1 must appear (P(some value missing) <=
    10 * 0.9^4096 ~ 1e-186), which catches an off-by-one range such as 1..T-1."""
    T = 10
    batch = {"image": jnp.zeros((B,) + SHAPE)}
    _, aux = LOSS(zeros_fn, None, sched("cosine", T), batch, jax.random.key(24))
    counts = np.bincount(f64(aux["t"]).astype(int), minlength=T)
    assert counts.shape == (T,) and np.all(counts > 0)
    # Each count ~ Binomial(B, 1/T): within 5 SD sqrt(B p (1-p)) ~ 19 of B/T ~ 410.
    assert np.all(np.abs(counts - B / T) < MC_K * np.sqrt(B * (1 / T) * (1 - 1 / T)))


@jax.jit
def _point_mass_losses(s, rng):
    """diffusion_loss of the exact predictor for data = the constant C, per prediction kind."""
    c = 0.3

    def oracle(kind):
        def apply_fn(params, x_t, t, y, rng):
            a = jnp.take(s.sqrt_alphas_cumprod, t)[:, None, None, None]
            sg = jnp.take(s.sqrt_one_minus_alphas_cumprod, t)[:, None, None, None]
            if kind == "x0":
                return jnp.full_like(x_t, c)
            if kind == "eps":
                return (x_t - a * c) / sg
            return (a * x_t - c) / sg  # v = a eps - s x0 = (a x_t - x0)/s using a^2 + s^2 = 1

        return apply_fn

    batch = {"image": jnp.full((256, 4, 4, 3), c, jnp.float32)}
    return {
        k: obj.diffusion_loss(oracle(k), None, s, batch, rng, prediction=k) for k in obj.PREDICTIONS
    }


@pytest.mark.parametrize("zt", [False, True])
def test_point_mass_oracle_has_zero_loss(zt):
    """Data = a constant c. The exact predictor, computed from (x_t, t) alone, must reach
    loss ~0: this ties the t the model receives to the t used for noising and the target."""
    out = _point_mass_losses(sched("linear", 1000, zt), jax.random.key(9))
    for kind, (loss, aux) in out.items():
        # Per element the oracle differs from the target by float32 rounding of x_t (~1e-7)
        # divided by sqrt(1 - ab) >= 0.01: <= ~1e-5, squared <= 1e-10. An off-by-one t or a
        # wrong target formula gives errors of order 1e-3..1 instead.
        assert float(loss) < 1e-8, kind
        assert np.all(np.isfinite(f64(aux["loss_per_example"]))), kind


GAUSS_CASES = (
    ("eps", "uniform"),
    ("x0", "uniform"),
    ("v", "uniform"),
    ("eps", "min_snr"),
    ("v", "min_snr"),
)


@jax.jit
def _gaussian_optimal_losses(s, batch, rng):
    def optimal(kind):
        def apply_fn(params, x_t, t, y, rng):
            a = jnp.take(s.sqrt_alphas_cumprod, t)[:, None, None, None]
            sg = jnp.take(s.sqrt_one_minus_alphas_cumprod, t)[:, None, None, None]
            return {"eps": sg * x_t, "x0": a * x_t, "v": jnp.zeros_like(x_t)}[kind]

        return apply_fn

    return {
        (k, w): obj.diffusion_loss(optimal(k), None, s, batch, rng, prediction=k, weighting=w)
        for k, w in GAUSS_CASES
    }


def test_gaussian_data_optimal_predictor_loss():
    """x0 ~ N(0, 1) per pixel makes x_t ~ N(0, 1) at every t, and the MMSE predictors are
    linear in x_t: E[eps|x_t] = s x_t, E[x0|x_t] = a x_t, E[v|x_t] = (a s - s a) x_t = 0.
    Their expected per-pixel losses are 1 - s^2 = ab, 1 - a^2 = 1 - ab and a^2 + s^2 = 1;
    averaged over t ~ U{0..T-1} with the weights w(t): mean_t(w * loss(t))."""
    T, b = 1000, 8192
    # Linear, not cosine: cosine's alpha_bar is nearly symmetric, mean(ab) ~ mean(1 - ab),
    # which would let a swapped eps/x0 target pass.
    s = sched("linear", T)
    ab = ref_alpha_bar("linear", T)
    snr = ab / (1 - ab)
    weights = {
        "uniform": {k: np.ones(T) for k in obj.PREDICTIONS},
        "min_snr": {"eps": np.minimum(snr, 5) / snr, "v": np.minimum(snr, 5) / (snr + 1)},
    }
    per_t = {"eps": ab, "x0": 1 - ab, "v": np.ones(T)}
    out = _gaussian_optimal_losses(s, _gaussian_batch(b, (4, 4, 2), 10), jax.random.key(11))
    se = {}
    for (kind, weighting), (loss, aux) in out.items():
        expected = np.mean(weights[weighting][kind] * per_t[kind])
        per_ex = f64(aux["loss_per_example"])
        # Per-example losses are i.i.d. (t, x0, eps drawn independently per example): 5 SE
        # of their mean, SE estimated from the sample (b = 8192 makes that estimate tight).
        se[kind, weighting] = per_ex.std(ddof=1) / np.sqrt(b)
        assert abs(float(loss) - expected) < MC_K * se[kind, weighting], (
            kind,
            weighting,
            float(loss),
            expected,
        )
    # The checks discriminate: eps, x0 and v expectations differ by many SE.
    assert abs(np.mean(ab) - np.mean(1 - ab)) > 20 * max(se.values())
    assert abs(np.mean(ab) - 1) > 20 * max(se.values())


@jax.jit
def _uniform_and_min_snr(s, batch, rng):
    return (
        obj.diffusion_loss(zeros_fn, None, s, batch, rng, prediction="v")[1],
        obj.diffusion_loss(zeros_fn, None, s, batch, rng, prediction="v", weighting="min_snr")[1],
    )


def test_weighting_is_applied_per_example_with_its_t():
    uni, msnr = _uniform_and_min_snr(
        sched("linear"), _gaussian_batch(256, (4, 4, 1), 12), jax.random.key(13)
    )
    np.testing.assert_array_equal(uni["t"], msnr["t"])  # same rng -> same t
    ab = ref_alpha_bar("linear", 1000)[f64(uni["t"]).astype(int)]
    snr = ab / (1 - ab)
    w = np.minimum(snr, 5) / (snr + 1)
    # Weight rel error ~2e-6 (see test_min_snr_weights) times one float32 product.
    np.testing.assert_allclose(
        f64(msnr["loss_per_example"]), w * f64(uni["loss_per_example"]), rtol=1e-5
    )


def test_label_and_t_reach_apply_fn():
    """Eager (not jitted) so the spy sees the very objects diffusion_loss passes on."""
    seen = {}
    label = jnp.arange(8, dtype=jnp.int32)

    def spy(params, x_t, t, y, rng):
        seen.update(y=y, t=t, x_t=x_t, rng=rng)
        return jnp.zeros_like(x_t) + y.astype(x_t.dtype)[:, None, None, None]

    batch = {"image": jnp.zeros((8, 2, 2, 1)), "label": label}
    loss, aux = obj.diffusion_loss(spy, None, sched(), batch, jax.random.key(15), prediction="x0")
    assert seen["y"] is label
    np.testing.assert_array_equal(seen["t"], aux["t"])
    assert seen["x_t"].shape == batch["image"].shape
    assert isinstance(seen["rng"], jax.Array)
    # x0 = 0 and output = label: per-example loss is label^2, exactly (small integers).
    np.testing.assert_array_equal(aux["loss_per_example"], f64(label) ** 2)

    # No label in the batch -> the model gets None (unconditional).
    seen.clear()
    obj.diffusion_loss(
        lambda p, x, t, y, r: seen.update(y=y) or jnp.zeros_like(x),
        None,
        sched(),
        {"image": batch["image"]},
        jax.random.key(15),
    )
    assert "y" in seen and seen["y"] is None


def test_diffusion_loss_bad_choices():
    batch = _gaussian_batch(4, (2, 2, 1), 19)
    with pytest.raises(ValueError) as e:
        LOSS(zeros_fn, None, sched(), batch, jax.random.key(0), prediction="score")
    assert all(p in str(e.value) for p in ("eps", "x0", "v"))
    with pytest.raises(ValueError) as e:
        LOSS(zeros_fn, None, sched(), batch, jax.random.key(0), weighting="p2")
    assert all(w in str(e.value) for w in ("uniform", "min_snr"))


def _scaled(params, x_t, t, y, rng):
    return params["w"] * x_t


@jax.jit
def _grad_and_fd(w0, h, s, batch, rng):
    def loss_fn(w):
        return obj.diffusion_loss(
            _scaled, {"w": w}, s, batch, rng, prediction="v", weighting="min_snr"
        )[0]

    return jax.grad(loss_fn)(w0), jax.vmap(loss_fn)(jnp.stack([w0 + h, w0 - h]))


def test_gradient_flows_and_matches_finite_difference():
    h = 0.05
    g, (lp, lm) = _grad_and_fd(
        jnp.float32(0.5),
        jnp.float32(h),
        sched("cosine"),
        _gaussian_batch(64, (4, 4, 1), 20),
        jax.random.key(21),
    )
    g = float(g)
    assert np.isfinite(g) and g != 0.0
    # Same rng => the loss is an exact quadratic in w, so the central difference is exact up
    # to float32 rounding of L (~1e-7 * L) / h: ~1e-5 relative here; assert 1e-3.
    np.testing.assert_allclose(g, (float(lp) - float(lm)) / (2 * h), rtol=1e-3)


@jax.jit
def _full_and_halves(s, batch, rng):
    half = batch["image"].shape[0] // 2
    ids = jnp.arange(2 * half)
    full = obj.diffusion_loss(zeros_fn, None, s, batch, rng)[1]
    full_ids = obj.diffusion_loss(zeros_fn, None, s, batch, rng, example_ids=ids)[1]
    parts = [
        obj.diffusion_loss(
            zeros_fn, None, s, {"image": batch["image"][sl]}, rng, example_ids=ids[sl]
        )[1]
        for sl in (slice(0, half), slice(half, None))
    ]
    return full, full_ids, parts


def test_draws_depend_only_on_global_example_id():
    """A batch split over two 'devices' that pass their global example ids draws the same
    t and eps per example as the whole batch (design: same numbers on 1 or N devices)."""
    batch = _gaussian_batch(64, (2, 2, 3), 22)
    full, full_ids, parts = _full_and_halves(sched(), batch, jax.random.key(23))
    np.testing.assert_array_equal(full["t"], full_ids["t"])  # default ids are 0..B-1
    np.testing.assert_array_equal(full["t"], np.concatenate([p["t"] for p in parts]))
    # Same eps per example => same per-example loss; a mean over the same 12 float32 values
    # may be reassociated differently for another batch size: ~1e-7 relative, assert 1e-6.
    np.testing.assert_allclose(
        f64(full["loss_per_example"]),
        np.concatenate([f64(p["loss_per_example"]) for p in parts]),
        rtol=1e-6,
    )
    # And the ids matter: shifted ids give other draws (P(all 64 t equal) = 1000^-64).
    assert not np.array_equal(f64(parts[0]["t"]), f64(parts[1]["t"]))
