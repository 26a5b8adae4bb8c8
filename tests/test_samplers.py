"""DDPM / DDIM / inversion against analytic oracles (tests/oracles.py).

For Gaussian data x0 ~ N(mu, s^2) the exact (MMSE) eps-predictor is affine in x_t, so every
DDPM/DDIM step is affine in x_t plus independent Gaussian noise and the exact mean and
variance of a sampler's output follow by propagating them through the steps
(``oracles.propagate``, float64, independent of samplers.py): the sampled moments are
checked against exact numbers that already include the discretization error of a given
step sequence. The newer solvers, guidance and editing: test_solvers.py, test_editing.py;
the step grids themselves: test_timesteps.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import editing, samplers, timesteps

from helpers import lower_sampler_scan
from oracles import (
    SCHED,
    T,
    check_moments,
    coefs,
    gaussian_eps,
    gaussian_eps_at,
    leading,
    mixture_eps,
    pairs,
    propagate,
)

# --------------------------------------------------------------------------- 1. Gaussian oracle

SHAPE = (12_500, 2, 2, 1)  # 50k independent scalars, NHWC like images


def test_ddpm_matches_exact_moments():
    # s = 0.1: beta vs beta_tilde changes the output variance by 8.6% (> 13 se), so a
    # sampler using the wrong variance fails; asserted below so the test keeps that power.
    mu, s = 0.3, 0.1
    exact = {v: propagate(pairs(np.arange(T)[::-1]), mu, s, v) for v in samplers.VARIANCES}
    se_v = exact["fixedlarge"][1] * np.sqrt(2.0 / np.prod(SHAPE))
    assert abs(exact["fixedlarge"][1] - exact["fixedsmall"][1]) > 10 * se_v
    for variance in samplers.VARIANCES:
        x = samplers.ddpm_sample(
            gaussian_eps(mu, s), SCHED, jax.random.key(1), SHAPE, variance=variance
        )
        assert x.shape == SHAPE
        check_moments(x, *exact[variance][:2], f"ddpm {variance}")


def test_ddim_matches_exact_moments_and_converges():
    mu, s = 0.3, 0.5
    rng = jax.random.key(2)
    x_T = jax.random.normal(jax.random.key(3), SHAPE)
    var_err = []
    for n in (20, 50, 250, 1000):
        m, v, gain, offset = propagate(pairs(leading(n)), mu, s, "ddim")
        x = samplers.ddim_sample(gaussian_eps(mu, s), SCHED, rng, SHAPE, num_steps=n, x_T=x_T)
        check_moments(x, m, v, f"ddim {n} steps")
        # eta = 0 is deterministic: each output is exactly gain * x_T + offset. 3e-5:
        # float32 rounding (~1e-7 relative per op) summed over up to 1000 steps (measured
        # max 6e-6); a coefficient 0.1% off in any single step gives ~1e-3.
        np.testing.assert_allclose(x, gain * np.asarray(x_T) + offset, atol=3e-5)
        var_err.append(abs(v - s * s) / (s * s))
    print("ddim |var - s^2| / s^2 at 20, 50, 250, 1000 steps:", np.round(var_err, 5))
    assert all(a > b for a, b in zip(var_err, var_err[1:])), var_err
    assert var_err[-1] < 0.01


def test_respaced_ddpm_matches_exact_moments():
    """DDPM over 50 of the 1000 steps (improved DDPM's respacing, on DiT's "linspace" grid):
    the respaced chain's posterior with beta' = 1 - ab_t / ab_prev, against the exact
    propagation of those steps. s = 0.1 keeps the two variances > 10 se apart."""
    mu, s = 0.3, 0.1
    ts = timesteps.ddim_timesteps(T, 50, "linspace")
    exact = {v: propagate(pairs(ts), mu, s, v) for v in samplers.VARIANCES}
    se_v = exact["fixedlarge"][1] * np.sqrt(2.0 / np.prod(SHAPE))
    assert abs(exact["fixedlarge"][1] - exact["fixedsmall"][1]) > 10 * se_v
    np.testing.assert_array_equal(
        samplers.sampler_timesteps("ddpm", T, 7, "linspace", respacing=50), ts
    )
    for variance in samplers.VARIANCES:
        x = samplers.ddpm_sample(
            gaussian_eps(mu, s),
            SCHED,
            jax.random.key(5),
            SHAPE,
            variance=variance,
            respacing=50,
            spacing="linspace",
        )
        check_moments(x, *exact[variance][:2], f"ddpm-50 {variance}")


def test_respaced_ddpm_fixedsmall_is_ddim_eta1():
    """The respaced chain's true posterior variance beta_tilde' is DDIM's sigma^2 at eta = 1
    over the same steps (Song et al. 2021 eq. 16), and both draw their noise from the same
    keys: the two samplers agree sample by sample, up to float32 rounding of different
    algebra (1e-5 on values of order 1)."""
    mu, s = 0.3, 0.5
    shape = (256, 2, 2, 1)
    ddpm = samplers.ddpm_sample(
        gaussian_eps(mu, s), SCHED, jax.random.key(6), shape, variance="fixedsmall", respacing=25
    )
    ddim = samplers.ddim_sample(
        gaussian_eps(mu, s), SCHED, jax.random.key(6), shape, num_steps=25, eta=1.0
    )
    np.testing.assert_allclose(ddpm, ddim, atol=1e-5)
    assert float(jnp.std(ddpm)) > 0.1  # not a degenerate comparison


def test_respacing_choices_and_errors():
    assert samplers.num_function_evals("ddpm", 10, T, respacing=250) == 250
    assert samplers.num_function_evals("ddpm", 10, T) == T
    np.testing.assert_array_equal(
        samplers.sampler_timesteps("ddpm", T, 50, respacing=T), np.arange(T)[::-1]
    )
    for bad in (-1, T + 1):
        with pytest.raises(ValueError, match="respacing"):
            samplers.sampler_timesteps("ddpm", T, 50, respacing=bad)


# --------------------------------------------------------------------------- 2. mixture


@pytest.mark.parametrize("sampler", ["ddpm", "ddim250"])
def test_gaussian_mixture(sampler):
    weights, means, stds = (0.3, 0.7), (-0.6, 0.6), (0.1, 0.1)
    model_fn, rng, shape = mixture_eps(weights, means, stds), jax.random.key(4), (20_000,)
    if sampler == "ddpm":
        x = samplers.ddpm_sample(model_fn, SCHED, rng, shape, variance="fixedlarge")
    else:
        x = samplers.ddim_sample(model_fn, SCHED, rng, shape, num_steps=250)
    x = np.asarray(x, np.float64)
    n, frac = x.size, np.mean(x > 0)
    se = np.sqrt(0.7 * 0.3 / n)  # binomial standard error of the fraction
    pos, neg = x[x > 0], x[x <= 0]
    print(
        f"{sampler}: P(x>0) {frac:.4f} ({(frac - 0.7) / se:+.2f} se); "
        f"+ mean {pos.mean():.4f} std {pos.std():.4f}; - mean {neg.mean():.4f} std {neg.std():.4f}"
    )
    assert abs(frac - 0.7) < 5 * se
    # Per component (>= 6000 samples) the sampling se is <= 1.3e-3 for the mean and
    # <= 0.9% for the std. On a single Gaussian with s = 0.1 the exact std bias is +0.8%
    # for DDPM-fixedlarge and -5% for DDIM at 250 steps (DDIM shrinks narrow modes), so
    # mean within 0.01 and std within 10% hold for a correct sampler and fail for a
    # wrong mode location or width.
    for comp, m, sd in ((pos, 0.6, 0.1), (neg, -0.6, 0.1)):
        assert abs(comp.mean() - m) < 0.01
        assert abs(comp.std() - sd) < 0.1 * sd


# --------------------------------------------------------------------------- 3. bad arguments


def test_bad_sampler_arguments_raise():
    model_fn = gaussian_eps(0.0, 1.0)
    with pytest.raises(ValueError, match="spacing"):
        samplers.ddim_sample(model_fn, SCHED, jax.random.key(0), (2,), num_steps=5, spacing="x")
    with pytest.raises(ValueError, match="variance"):
        samplers.ddpm_sample(model_fn, SCHED, jax.random.key(0), (2,), variance="learned")
    with pytest.raises(ValueError, match="prediction"):
        samplers.ddim_sample(
            model_fn, SCHED, jax.random.key(0), (2,), num_steps=5, prediction="score"
        )
    with pytest.raises(ValueError, match="eta"):
        samplers.ddim_sample(model_fn, SCHED, jax.random.key(0), (2,), num_steps=5, eta=1.5)
    with pytest.raises(ValueError, match="x_T"):
        samplers.ddim_sample(
            model_fn, SCHED, jax.random.key(0), (2,), num_steps=5, x_T=jnp.zeros((3,))
        )


# --------------------------------------------------------------------------- 4. eta = 1 == DDPM


def test_ddim_eta1_all_steps_equals_ddpm_fixedsmall():
    model_fn, rng, shape = gaussian_eps(0.3, 0.5), jax.random.key(5), (1024, 2, 2, 1)
    x_ddpm = samplers.ddpm_sample(model_fn, SCHED, rng, shape, variance="fixedsmall")
    x_ddim = samplers.ddim_sample(model_fn, SCHED, rng, shape, num_steps=T, eta=1.0)
    # Same noise draws, same maps in exact arithmetic; the posterior coefficients come
    # from float64 tables while DDIM forms them from sqrt(alpha_bar) in float32, so
    # ~1e-7 relative rounding per step accumulates over 1000 steps (measured max 9e-6).
    np.testing.assert_allclose(x_ddim, x_ddpm, atol=2e-5, rtol=0)
    other = samplers.ddim_sample(model_fn, SCHED, jax.random.key(6), shape, num_steps=T, eta=1.0)
    assert np.max(np.abs(other - x_ddpm)) > 1e-2  # the comparison can fail


# --------------------------------------------------------------------------- 5. inversion


def test_ddim_inversion_round_trip_is_first_order():
    mu, s = 0.3, 0.5
    model_fn = gaussian_eps(mu, s)
    x0 = mu + s * jax.random.normal(jax.random.key(6), (4096,))
    rms = {}
    for n in (100, 200, 400, 1000):
        # trailing spacing: every n walks up to T - 1, so only the step size changes
        # ("leading" at 400 steps would stop at index 798 and skew the ratios).
        x_T = editing.ddim_invert(model_fn, SCHED, x0, num_steps=n, spacing="trailing")
        x0_back = samplers.ddim_sample(
            model_fn, SCHED, jax.random.key(7), x0.shape, num_steps=n, spacing="trailing", x_T=x_T
        )
        rms[n] = float(jnp.sqrt(jnp.mean((x0_back - x0) ** 2)))
    ratios = rms[100] / rms[200], rms[200] / rms[400]
    print("inversion round-trip RMS:", rms, "ratios:", ratios)
    # eps is taken at the current point instead of the unknown next one: first order, so
    # doubling the steps about halves the error.
    assert all(1.6 <= r <= 2.4 for r in ratios), ratios
    assert rms[1000] < 5e-3
    assert float(jnp.std(x_T)) > 0.9  # it really went to noise (Var x_T ~ 1)


# --------------------------------------------------------------------------- 6. compiling


def test_no_retrace_for_new_eta_rng_or_x_T():
    calls = []

    def counting_model(x, t):  # called once per trace of the scan body
        calls.append(1)
        return gaussian_eps(0.3, 0.5)(x, t)

    traced_once = chex.assert_max_traces(counting_model, n=1)
    shape = (4, 3, 3, 2)
    a = samplers.ddim_sample(traced_once, SCHED, jax.random.key(0), shape, num_steps=10)
    b = samplers.ddim_sample(
        traced_once, SCHED, jax.random.key(1), shape, num_steps=10, eta=0.7, x_T=jnp.ones(shape)
    )
    c = samplers.ddim_sample(
        traced_once, SCHED, jax.random.key(2), shape, num_steps=10, eta=jnp.float32(0.3)
    )
    assert len(calls) == 1
    assert not np.allclose(a, b) and not np.allclose(a, c)

    # Parameters as pytree leaves of a Partial: new values, no retrace.
    def param_model(params, x, t):
        calls.append(1)
        return gaussian_eps_at(x, t, params["mu"], params["s"])

    calls.clear()
    outs = [
        samplers.ddim_sample(
            jax.tree_util.Partial(param_model, {"mu": jnp.float32(mu), "s": jnp.float32(0.5)}),
            SCHED,
            jax.random.key(0),
            shape,
            num_steps=10,
        )
        for mu in (0.3, -0.3)
    ]
    assert len(calls) == 1 and not np.allclose(outs[0], outs[1])


def test_ddim_program_size_flat_in_num_steps():
    # One scan body whatever the length: the lowered program for 1000 steps differs from
    # the one for 10 only in the step arrays' shapes (tensor<10xi32> vs <1000xi32>), so
    # XLA compiles the same body; an unrolled or per-step-traced loop grows ~100x. Compile
    # time itself is not asserted: it is timing, and it follows from the program.
    hlo = {n: len(lower_sampler_scan("ddim", n).as_text()) for n in (10, 1000)}
    print(f"HLO chars {hlo}")
    assert abs(hlo[1000] - hlo[10]) <= 0.05 * hlo[10], hlo


# --------------------------------------------------------------------------- 7. predictions


def test_x0_and_v_predictions_match_eps():
    eps_fn = gaussian_eps(0.3, 0.5)

    def x0_fn(x, t):
        a, s = coefs(x, t)
        return (x - s * eps_fn(x, t)) / a

    def v_fn(x, t):
        a, s = coefs(x, t)
        return a * eps_fn(x, t) - s * x0_fn(x, t)

    # Both samplers share the prediction -> (x0, eps) conversion; DDIM with eta > 0 and
    # "trailing" spacing exercises it at t = T-1 and with noise, in 100 steps, not 1000.
    def sample(fn, p):
        return samplers.ddim_sample(
            fn,
            SCHED,
            jax.random.key(8),
            (512, 2, 2, 1),
            num_steps=100,
            eta=0.5,
            spacing="trailing",
            prediction=p,
        )

    ref = sample(eps_fn, "eps")
    for fn, p in ((x0_fn, "x0"), (v_fn, "v")):
        # eps -> x0 -> eps divides by sqrt(alpha_bar) ~ 6e-3 at t = T-1, amplifying
        # float32 rounding ~160x in x0 at the noisiest steps (measured max 2e-6): 2e-5.
        np.testing.assert_allclose(sample(fn, p), ref, atol=2e-5, rtol=0, err_msg=p)


# --------------------------------------------------------------------------- 8. trajectory


def test_return_every_trajectory():
    mu, s = 0.3, 0.5
    model_fn, rng, shape = gaussian_eps(mu, s), jax.random.key(9), (3, 2, 2, 1)
    x_T = jax.random.normal(jax.random.key(11), shape)
    x = samplers.ddim_sample(model_fn, SCHED, rng, shape, num_steps=10, x_T=x_T)
    x5, traj5 = samplers.ddim_sample(
        model_fn, SCHED, rng, shape, num_steps=10, x_T=x_T, return_every=5
    )
    assert traj5.shape == (2,) + shape
    np.testing.assert_allclose(x5, x, atol=1e-6)
    np.testing.assert_allclose(traj5[-1], x, atol=1e-6)  # the 10th step is the last
    x3, traj3 = samplers.ddim_sample(
        model_fn, SCHED, rng, shape, num_steps=10, x_T=x_T, return_every=3
    )
    assert traj3.shape == (3,) + shape  # after steps 3, 6, 9; step 10 runs after
    np.testing.assert_allclose(x3, x, atol=1e-6)
    steps = pairs(leading(10))
    for i in range(3):  # deterministic: x after k steps = gain_k * x_T + offset_k exactly
        _, _, gain, offset = propagate(steps[: 3 * (i + 1)], mu, s, "ddim")
        np.testing.assert_allclose(traj3[i], gain * np.asarray(x_T) + offset, atol=1e-5)
    x_d, traj_d = samplers.ddpm_sample(model_fn, SCHED, rng, shape, return_every=250)
    assert traj_d.shape == (4,) + shape
    np.testing.assert_array_equal(traj_d[-1], x_d)


# --------------------------------------------------------------------------- 9. given x_T


def test_given_x_T_is_used():
    model_fn, shape = gaussian_eps(0.3, 0.5), (16, 3)
    x_T = jax.random.normal(jax.random.key(10), shape)
    a = samplers.ddim_sample(model_fn, SCHED, jax.random.key(0), shape, num_steps=20, x_T=x_T)
    b = samplers.ddim_sample(model_fn, SCHED, jax.random.key(1), shape, num_steps=20, x_T=x_T)
    c = samplers.ddim_sample(model_fn, SCHED, jax.random.key(0), shape, num_steps=20)
    np.testing.assert_array_equal(a, b)  # eta = 0: rng is unused once x_T is given
    assert not np.allclose(a, c)
    d = samplers.ddim_sample(
        model_fn, SCHED, jax.random.key(1), shape, num_steps=20, x_T=x_T, eta=1.0
    )
    assert not np.allclose(a, d)  # with eta > 0 the rng still drives the step noise


# --------------------------------------------------------------------------- 10. clip_x0


def point_mass_eps(x, t):
    """Exact eps-predictor for data x0 = 2 (outside [-1, 1]): x_t = 2 sqrt(ab) + sqrt(1 - ab)
    eps, so eps = (x_t - 2 sqrt(ab)) / sqrt(1 - ab) at every x_t."""
    a, s = coefs(x, t)
    return (x - 2.0 * a) / s


def point_mass_x0(x, t):
    """Exact x0-predictor for the same data."""
    del t
    return jnp.full_like(x, 2.0)


def clip_sample(sampler, model_fn, prediction, clip_x0):
    return np.asarray(
        samplers.sample(
            model_fn,
            SCHED,
            jax.random.key(12),
            (256,),
            sampler=sampler,
            num_steps=10,
            spacing="trailing",  # starts at T-1, sqrt(ab) = 6e-3; ddpm runs all T steps
            prediction=prediction,
            clip_x0=clip_x0,
        ),
        np.float64,
    )


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_clip_x0_point_mass_outside_range(sampler):
    """clip_x0 (the configs' default) with data x0 = 2: every model call says x0 = 2,
    clipped to 1 with eps recomputed from it, so every sampler's x0 prediction is exactly 1
    at every step and its last step (to alpha_bar = 1) returns it: ddim and dpmpp_2m(_sde)
    return x0 itself, ddpm the posterior mean at index 0, coef1 * x0 + 0 * x_t with
    coef1 = beta_1 / (1 - alpha_bar_1) = 1, euler/heun x/a - (s/a)(x - a)/s = 1
    algebraically. So each sample is 1.0 whatever x_T and the noise. Tolerance 5e-7 (4
    float32 ulps of 1.0): Euler's last step forms 1 as a difference of O(1) terms (measured
    1.2e-7 for euler and heun); the others measured exactly 1.0. Unclipped they give 2."""
    for model_fn, prediction in ((point_mass_eps, "eps"), (point_mass_x0, "x0")):
        x = clip_sample(sampler, model_fn, prediction, True)
        np.testing.assert_allclose(x, 1.0, atol=5e-7, rtol=0, err_msg=prediction)
    # The clip is what makes it 1: without it the exact denoiser's 2 comes out. 1e-3: x0
    # from eps divides by sqrt(ab) = 6e-3 at T-1, amplifying float32 rounding (measured
    # max 1.2e-7 here); it only has to tell 2 from 1.
    x = clip_sample(sampler, point_mass_eps, "eps", False)
    np.testing.assert_allclose(x, 2.0, atol=1e-3, rtol=0)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_clip_x0_is_inactive_inside_range(sampler):
    """Data N(0.3, 0.05^2) lies well inside [-1, 1] and its exact denoiser's x0 stays there
    (x0 - 0.3 is at most ~0.05 z), so clipping never engages: with the same x_T and noise
    the clipped sampler equals the unclipped one. What differs is only that eps is
    recomputed from x0, eps -> x0 -> eps, exact in real arithmetic; in float32 ~1e-7
    relative per model call (measured max 1.2e-7 over 10 steps, 0 for ddpm's 1000): 1e-6.
    A wrong clip range moves samples by O(0.1); eps recomputed at t-1 instead of t moves
    ddim/euler/heun by 2e-4 to 1e-2 (ddpm and dpmpp_2m(_sde) use only x0)."""
    model_fn = gaussian_eps(0.3, 0.05)
    clipped = clip_sample(sampler, model_fn, "eps", True)
    plain = clip_sample(sampler, model_fn, "eps", False)
    assert np.all((plain > 0.0) & (plain < 0.6)), (plain.min(), plain.max())
    assert plain.std() > 0.005  # samples are spread (not all at the mean)
    np.testing.assert_allclose(clipped, plain, atol=1e-6, rtol=0)
