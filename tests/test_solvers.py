"""Euler / Heun (EDM) and DPM-Solver++ (2M, 2M SDE) against the Gaussian oracle.

Three independent references (tests/oracles.py): the closed-form probability-flow ODE map
of Gaussian data (the limit every ODE solver must converge to), a float64 re-implementation
of each solver from its paper (the exact output law for a given step sequence, noise
included) and Monte Carlo moments. Errors are measured on a grid of x_T values: every
deterministic sampler is affine in x_T here, so two points give its exact output law.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import samplers, timesteps
from diffusion_jax.schedules import make_schedule

import oracles
from helpers import lower_sampler_scan
from oracles import (
    SCHED,
    T,
    check_moments,
    exact_ode_sample,
    gaussian_eps,
    moments,
    reference_sample,
)

MU, S = 0.3, 0.5
X_T = np.linspace(-2.0, 2.0, 5)  # where deterministic samplers are compared
ODE_SOLVERS = ("ddim", "euler", "heun", "dpmpp_2m")


def sci(values):
    return "[" + " ".join(f"{v:.2e}" for v in values) + "]"


def run(sampler, n, spacing, x_T=X_T, model_fn=None, schedule=SCHED, **kw):
    model_fn = model_fn or gaussian_eps(MU, S)
    x_T = jnp.asarray(x_T, jnp.float32)
    return np.asarray(
        samplers.sample(
            model_fn,
            schedule,
            jax.random.key(0),
            x_T.shape,
            sampler=sampler,
            num_steps=n,
            spacing=spacing,
            x_T=x_T,
            **kw,
        ),
        np.float64,
    )


def affine_law(sampler, n, spacing):
    """(mean, std) of a deterministic sampler's output for x_T ~ N(0, 1): out = g x_T + o."""
    out0, out1 = run(sampler, n, spacing, x_T=[0.0, 1.0])
    return out0, abs(out1 - out0)


# --------------------------------------------------------------------------- 1. orders


@pytest.mark.parametrize("sampler", ODE_SOLVERS)
def test_ode_solvers_converge_at_their_order(sampler):
    """Error vs the exact ODE solution on "linspace" grids (start T-1, end 0 for every n):
    DDIM = Euler first order (error / 2 per doubling), Heun and DPM-Solver++(2M) second
    order (/ 4). Each run also equals the float64 re-implementation of the solver."""
    steps = (20, 40, 80, 160)
    errs = []
    for n in steps:
        ts = timesteps.ddim_timesteps(T, n, "linspace")
        x = run(sampler, n, "linspace")
        c = reference_sample(sampler, ts, MU, S)  # deterministic: c[0] + c[1] x_T
        # float32 rounding, ~1e-7 relative per operation over <= 319 model calls
        # (measured max 4e-7); a coefficient 1e-4 off in a single step gives > 1e-5.
        np.testing.assert_allclose(
            x, c[0] + c[1] * X_T, atol=5e-6, rtol=0, err_msg=f"{sampler} {n}"
        )
        errs.append(np.max(np.abs(x - exact_ode_sample(X_T, ts, MU, S))))
    orders = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    print(
        f"{sampler}: max error at {steps} steps: {sci(errs)}"
        f"; empirical orders {np.round(orders, 2)}"
    )
    # Tolerances: the measured orders are 0.99 (ddim/euler), 2.00-2.05 (heun), 1.53 / 1.92
    # / 2.00 (dpmpp_2m; the first doubling is pre-asymptotic, see ddim_timesteps on the
    # last long step in lambda); the smallest errors (3e-4 heun, 5e-3 dpmpp_2m at 160
    # steps) are >= 300x the float32 noise above, so orders are clean to +-0.1.
    if sampler in ("ddim", "euler"):
        assert np.all((orders > 0.85) & (orders < 1.15)), orders
    elif sampler == "heun":
        assert np.all((orders > 1.8) & (orders < 2.2)), orders
    else:
        assert np.all((orders[1:] > 1.8) & (orders[1:] < 2.2)), orders


def test_euler_is_ddim():
    # Karras et al. 2022, eq. 4 / app. B: DDIM's deterministic update is Euler on the ODE
    # in (x / alpha, sigma / alpha). Different float32 arithmetic, same map: 1e-5.
    for spacing in ("leading", "trailing"):
        np.testing.assert_allclose(
            run("euler", 10, spacing), run("ddim", 10, spacing), atol=1e-5, rtol=0
        )


# --------------------------------------------------------------------------- 2. few steps


@pytest.mark.parametrize(
    "sampler,n,tol", [("dpmpp_2m", 10, 0.05), ("dpmpp_2m", 20, 0.025), ("heun", 20, 0.05)]
)
def test_few_steps_reproduce_data_moments(sampler, n, tol):
    """With steps uniform in log-SNR (DPM-Solver's choice) DPM-Solver++(2M) gets the data
    std within 3.2% at 10 steps and 1.5% at 20 (Heun: 3.7% at 20 steps = 39 NFE), where
    DDIM is 24% / 12% low. The output law is exact here (affine in x_T), so the tolerances
    only cover the discretization error; the mean is off by 1e-3 at most, mostly because
    x_T ~ N(0, 1) is not exactly the marginal at index T-1 (mean sqrt(ab) mu = 2e-3)."""
    mean, std = affine_law(sampler, n, "logsnr")
    ddim_mean, ddim_std = affine_law("ddim", n, "logsnr")
    print(
        f"{sampler} {n} logsnr steps: mean {mean:.4f} std {std:.4f} (data {MU}, {S}); "
        f"ddim: mean {ddim_mean:.4f} std {ddim_std:.4f}"
    )
    assert abs(mean - MU) < 3e-3
    assert abs(std - S) < tol * S
    assert abs(ddim_std - S) > 0.1 * S  # the test has power: DDIM fails it


# --------------------------------------------------------------------------- 3. SDE


def test_dpmpp_2m_sde_pathwise_equals_reference():
    """With the noises it draws (step i: split(rng_steps, n)[i], as documented in
    samplers), the SDE sampler's output equals the float64 solver sample by sample."""
    n, shape = 10, (64,)
    rng = jax.random.key(3)
    x = np.asarray(
        samplers.sample(
            gaussian_eps(MU, S),
            SCHED,
            rng,
            shape,
            sampler="dpmpp_2m_sde",
            num_steps=n,
            spacing="logsnr",
        )
    )
    rng_xT, rng_steps = jax.random.split(rng)
    basis = [np.ones(shape), np.asarray(jax.random.normal(rng_xT, shape))]
    basis += [np.asarray(jax.random.normal(k, shape)) for k in jax.random.split(rng_steps, n)]
    c = reference_sample(
        "dpmpp_2m_sde", timesteps.ddim_timesteps(T, n, "logsnr", SCHED.log_snr), MU, S
    )
    # float32 rounding as above, over 10 steps with noise: measured max 3e-7.
    np.testing.assert_allclose(x, np.tensordot(c, np.stack(basis), 1), atol=5e-6, rtol=0)


def test_dpmpp_2m_sde_moments_and_order():
    """Monte Carlo moments of 50k samples match the exact law at 10 and 20 logsnr steps
    and the data within 5%; the exact law's std error vs the exact ODE solution shrinks
    at second order (the SDE forgets x_T's small mismatch with the true marginal
    differently from the ODE, which bounds the comparison at ~1e-4)."""
    for n in (10, 20):
        ts = timesteps.ddim_timesteps(T, n, "logsnr", SCHED.log_snr)
        m, v = moments(reference_sample("dpmpp_2m_sde", ts, MU, S))
        x = samplers.sample(
            gaussian_eps(MU, S),
            SCHED,
            jax.random.key(n),
            (12_500, 2, 2, 1),
            sampler="dpmpp_2m_sde",
            num_steps=n,
            spacing="logsnr",
        )
        check_moments(x, m, v, f"dpmpp_2m_sde {n} steps")
        assert abs(m - MU) < 3e-3 and abs(np.sqrt(v) - S) < 0.05 * S, (m, np.sqrt(v))
    errs = []
    for n in (20, 40, 80, 160):
        ts = timesteps.ddim_timesteps(T, n, "logsnr", SCHED.log_snr)
        exact_std = exact_ode_sample(1.0, ts, MU, S) - exact_ode_sample(0.0, ts, MU, S)
        errs.append(
            abs(np.sqrt(moments(reference_sample("dpmpp_2m_sde", ts, MU, S))[1]) - exact_std)
        )
    orders = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    print(
        f"dpmpp_2m_sde std error at 20/40/80/160 logsnr steps: "
        f"{sci(errs)}; orders {np.round(orders, 2)}"
    )
    assert np.all((orders > 1.6) & (orders < 2.4)), orders  # measured 1.8, 1.98, 1.99


# --------------------------------------------------------------------------- 4. edge cases


def zero_terminal_snr_setup(monkeypatch):
    """The zero-terminal-SNR linear schedule, its exact v-predictor for N(MU, S^2) data, and
    ``oracles.reference_sample`` switched to that schedule: oracles.AB (read at call time)
    becomes Lin et al. 2024's Alg. 1 applied in float64 to the linear betas, so the
    reference stays independent of schedules.py."""
    sched = make_schedule("linear", T, zero_terminal_snr=True)
    sq = np.sqrt(np.cumprod(1.0 - oracles.BETAS))
    monkeypatch.setattr(oracles, "AB", ((sq - sq[-1]) * sq[0] / (sq[0] - sq[-1])) ** 2)

    def v_oracle(x, t):
        a = jnp.take(sched.sqrt_alphas_cumprod, t).reshape(t.shape + (1,) * (x.ndim - 1))
        sig = jnp.take(sched.sqrt_one_minus_alphas_cumprod, t).reshape(a.shape)
        x0 = MU + a * S * S * (x - a * MU) / (a**2 * S * S + sig**2)
        eps = (x - a * x0) / sig
        return a * eps - sig * x0

    def reference(sampler, n):
        ts = timesteps.ddim_timesteps(T, n, "logsnr", sched.log_snr)
        assert ts[0] == T - 1 and oracles.AB[ts[0]] == 0.0  # really starts at alpha_bar = 0
        with np.errstate(divide="ignore"):  # lambda = log(0) = -inf at the first step
            return reference_sample(sampler, ts, MU, S)

    return sched, v_oracle, reference


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_zero_terminal_snr_v_prediction(sampler, monkeypatch):
    """DDIM and DPM-Solver++(2M) start at alpha_bar = 0 (lambda = -inf) with v prediction
    (Lin et al. 2024's setting) and their output law is the exact one: on a grid of x_T
    the output equals the float64 re-implementation c[0] + c[1] x_T (finite included), so
    mean = c[0] and std = c[1] for x_T ~ N(0, 1). Closed forms: x_T ~ N(0, 1) is exactly
    the marginal at T-1 and every step maps a MU + k z to a' MU + k' z, so the mean is MU;
    the std is S up to the discretization error, second order for dpmpp_2m (1.5% at 20
    logsnr steps) and first order for DDIM (12% low at 20 steps, 3.0% at 80: ~4x less).
    The grids start at T-1 and go on from lambda = -5.1 (timesteps.LAMBDA_MIN; over the
    whole range, down to -9.6, the errors were 2.5%, 17% and 4.4%)."""
    sched, v_oracle, reference = zero_terminal_snr_setup(monkeypatch)
    x_T = np.linspace(-3, 3, 101)
    std_err = {}
    for n in (20, 80) if sampler == "ddim" else (20,):
        c = reference(sampler, n)
        x = run(sampler, n, "logsnr", x_T=x_T, model_fn=v_oracle, schedule=sched, prediction="v")
        # float32 rounding, ~1e-7 relative per operation over <= 80 steps (measured max
        # 7.5e-7). The first step, 999 -> 930 (lambda -inf -> -5.1), is where alpha_bar = 0
        # is handled: x0 = 0 instead of MU there moves the output by 1.4e-3 (20 steps).
        np.testing.assert_allclose(x, c[0] + c[1] * x_T, atol=5e-6, rtol=0, err_msg=f"{n}")
        # The reference's own moments against the closed forms (float64: 1e-12).
        assert abs(c[0] - MU) < 1e-12, c[0]
        std_err[n] = abs(c[1] - S) / S
    print(
        f"zero terminal SNR, {sampler}: relative std error",
        {k: round(v, 4) for k, v in std_err.items()},
    )
    if sampler == "dpmpp_2m":
        assert std_err[20] < 0.03  # measured 0.015
    else:  # first order: 4x the steps, ~4x less error (measured 3.95)
        assert 3.0 < std_err[20] / std_err[80] < 5.0 and std_err[80] < 0.05


def test_zero_terminal_snr_v_prediction_sde(monkeypatch):
    """DPM-Solver++(2M) SDE from alpha_bar = 0 with v prediction: sample by sample equal to
    the float64 solver with the noises it draws (as test_dpmpp_2m_sde_pathwise_equals_
    reference), so its output law is the reference's: mean MU exactly (closed form, as
    above; the first step's x0 is MU and x_T's coefficient is 0), std within 5% of S at
    20 logsnr steps (measured 3.5%, second order)."""
    sched, v_oracle, reference = zero_terminal_snr_setup(monkeypatch)
    n, shape, rng = 20, (256,), jax.random.key(3)
    c = reference("dpmpp_2m_sde", n)
    x = np.asarray(
        samplers.sample(
            v_oracle,
            sched,
            rng,
            shape,
            sampler="dpmpp_2m_sde",
            num_steps=n,
            spacing="logsnr",
            prediction="v",
        )
    )
    rng_xT, rng_steps = jax.random.split(rng)
    basis = [np.ones(shape), np.asarray(jax.random.normal(rng_xT, shape))]
    basis += [np.asarray(jax.random.normal(k, shape)) for k in jax.random.split(rng_steps, n)]
    # float32 rounding as above (measured max 7e-7).
    np.testing.assert_allclose(x, np.tensordot(c, np.stack(basis), 1), atol=5e-6, rtol=0)
    mean, var = moments(c)
    print(f"zero terminal SNR, dpmpp_2m_sde {n} steps: mean {mean:.4f} std {np.sqrt(var):.4f}")
    assert abs(mean - MU) < 1e-12 and abs(c[1]) < 1e-12
    assert abs(np.sqrt(var) - S) < 0.05 * S


def test_logsnr_lambda_min_bounds_eps_error_amplification():
    """An eps model off by 0.01 everywhere, DPM-Solver++(2M) at 20 logsnr steps, no x0
    clipping (latents): how far the output mean moves from the exact model's. The cosine
    and sigmoid schedules clip their last beta, so lambda(T-1) is -9.9 / -7.5 (linear:
    -5.06), where x0 = (x - sigma eps) / alpha multiplies the error by sigma / alpha ~ 2e4
    and the multistep update carries it on. Over the whole range (lambda_min = -inf) the
    shift is 5.9x / 6.0x linear's (measured 0.173, 0.177 vs 0.0295); from lambda >= -5.1
    (the default) it is 1.00x / 0.87x, and linear's grid is unchanged. Bounds: clipped
    <= 1.1x linear, whole range >= 4x (the test has power)."""

    def shift(name, lambda_min):
        sched = make_schedule(name, T)

        def model(delta):
            def fn(x, t):
                a = jnp.take(sched.sqrt_alphas_cumprod, t).reshape(t.shape + (1,) * (x.ndim - 1))
                sig = jnp.take(sched.sqrt_one_minus_alphas_cumprod, t).reshape(a.shape)
                return sig * (x - a * MU) / (a * a * S * S + sig * sig) + delta

            return fn

        kw = dict(x_T=[0.0], schedule=sched, lambda_min=lambda_min)
        return abs(
            run("dpmpp_2m", 20, "logsnr", model_fn=model(0.01), **kw)[0]
            - run("dpmpp_2m", 20, "logsnr", model_fn=model(0.0), **kw)[0]
        )

    linear = shift("linear", timesteps.LAMBDA_MIN)
    assert linear == shift("linear", -np.inf)  # the clip is above linear's range
    for name in ("cosine", "sigmoid"):
        clipped, whole = shift(name, timesteps.LAMBDA_MIN), shift(name, -np.inf)
        print(f"{name}: mean shift {clipped:.4f} clipped, {whole:.4f} whole; linear {linear:.4f}")
        assert clipped <= 1.1 * linear and whole >= 4 * linear, (name, clipped, whole, linear)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "dpmpp_2m_sde"])
def test_program_size_flat_in_num_steps(sampler):
    # One scan body whatever the length: the HLO differs only in the step arrays' shapes
    # (DDIM: test_ddim_program_size_flat_in_num_steps in test_samplers.py).
    hlo = {n: len(lower_sampler_scan(sampler, n).as_text()) for n in (10, 1000)}
    assert abs(hlo[1000] - hlo[10]) <= 0.05 * hlo[10], hlo


def test_bad_sampler_and_spacing_raise():
    with pytest.raises(ValueError, match="sampler"):
        run("dpm_fast", 10, "leading")
    with pytest.raises(ValueError, match="log_snr"):
        timesteps.ddim_timesteps(T, 10, "logsnr")
    assert samplers.num_function_evals("heun", 10, T) == 19
    assert samplers.num_function_evals("ddpm", 10, T) == T
    assert samplers.num_function_evals("dpmpp_2m", 10, T) == 10
