"""The samplers' step rules: one function per sampler that moves x from schedule index t
to t_prev, and the registry ``RULES`` that samplers.py's one ``lax.scan`` looks them up in.

A rule is ``rule(predict, schedule, x, t, t_prev, key, aux, eta) -> (x, aux)``: ``predict``
gives (x0, eps) of the model at (x, t) (``predict(x, t, with_variance=True)`` adds the
model's variance values, for DDPM's learned variance), ``aux`` carries a multistep
solver's history (DPM-Solver++ keeps its previous x0 prediction) and is () for one-step
rules. DDPM (Ho et al. 2020; learned variance and respacing: Nichol & Dhariwal 2021), DDIM (Song et al.
2021), Euler/Heun on the probability-flow ODE in EDM's parameterisation (Karras et al.
2022), DPM-Solver++(2M) with its SDE variant (Lu et al. 2022) and multistep consistency
sampling (Song et al. 2023). Index -1 is the clean
end of the chain (alpha_bar = 1), as in schedules.py.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.objectives import x0_eps_from_prediction
from diffusion_jax.schedules import NoiseSchedule, at
from diffusion_jax.variance import interpolate_log_variance, require_values, split_output


def normal(key, shape, dtype=jnp.float32) -> jnp.ndarray:
    """jax.random.normal(key, shape), drawn flat: the same numbers, but XLA:CPU compiles
    the partitionable threefry for a 4-D shape ~4x slower (2 s vs 0.5 s, jax 0.10.2)."""
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def sqrt_alpha_bar(schedule: NoiseSchedule, t: jnp.ndarray, ndim: int):
    """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) at indices t [B], broadcast to rank ndim,
    with alpha_bar(-1) = 1. 1 - alpha_bar is taken from the float64-derived table, not
    computed as 1 - alpha_bar in float32, which loses ~4 digits near t = 0."""
    i = jnp.maximum(t, 0)
    clean = (t < 0).reshape(t.shape + (1,) * (ndim - t.ndim))
    return (
        jnp.where(clean, 1.0, at(schedule.sqrt_alphas_cumprod, i, ndim)),
        jnp.where(clean, 0.0, at(schedule.sqrt_one_minus_alphas_cumprod, i, ndim)),
    )


def _lambda(schedule: NoiseSchedule, t: jnp.ndarray, ndim: int):
    """DPM-Solver's lambda = log(alpha / sigma) = log_snr / 2 at indices t [B], broadcast
    to rank ndim; +inf at the clean end (t = -1), -inf at a zero-terminal-SNR step."""
    lam = 0.5 * at(schedule.log_snr, jnp.maximum(t, 0), ndim)
    return jnp.where((t < 0).reshape(lam.shape), jnp.inf, lam)


def ratio_var(a, s, a_to, s_to):
    """1 - ab_to / ab = (ab - ab_to) / ab for a step to a noisier level (ab_to < ab). In
    float32 the difference is taken between the smaller pair, (1 - ab_to) - (1 - ab) while
    ab > 1/2, else ab - ab_to: a plain 1 - ab_to / ab loses ~4 digits at both ends."""
    return jnp.where(a > s, s_to**2 - s**2, a**2 - a_to**2) / a**2


def predict_x0_eps(model_fn, schedule, prediction, clip_x0, x_t, t, with_variance=False):
    """(x0, eps) implied by the model at (x_t, t). With clip_x0, x0 is clipped to [-1, 1]
    and eps recomputed from it, so every rule sees the same consistent pair. with_variance:
    (x0, eps, the output's variance values or None), see variance.split_output."""
    out, values = split_output(x_t, model_fn(x_t, t).astype(x_t.dtype))
    x0, eps = x0_eps_from_prediction(schedule, prediction, x_t, t, out)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        _, eps = x0_eps_from_prediction(schedule, "x0", x_t, t, x0)
    return (x0, eps, values) if with_variance else (x0, eps)


# --------------------------------------------------------------------------- step rules
# rule(predict, schedule, x, t, t_prev, key, aux, eta) -> (x_prev, aux); t, t_prev int32
# [B]; predict(x, t) -> (x0, eps). Step noise is normal(key, ...) so that DDPM and DDIM
# draw identically (see samplers.py, RNG).


def _ddpm_step(predict, schedule, x_t, t, t_prev, key, aux, eta, *, variance):
    """x_prev ~ N(posterior mean(x0, x_t), sigma^2) (Ho et al. 2020, Alg. 2) from index t
    to t_prev < t, no noise on the step to the clean end (t_prev = -1). Between any two
    indices this is the DDPM of the respaced chain (Nichol & Dhariwal 2021, sec. 4), with
    beta' = 1 - ab_t / ab_prev and beta_tilde' = (1 - ab_prev) / (1 - ab_t) beta';
    adjacent indices give the schedule's own beta_t and beta_tilde_t. fixedsmall:
    sigma^2 = beta_tilde'; fixedlarge: sigma^2 = beta'; learned: the model's values
    interpolate between log beta' and log beta_tilde' (variance.py; improved DDPM's
    respacing does the same). eta unused."""
    del eta
    x0, _, values = predict(x_t, t, with_variance=True)
    noise = normal(key, x_t.shape, x_t.dtype)
    a, s = sqrt_alpha_bar(schedule, t, x_t.ndim)
    a_prev, s_prev = sqrt_alpha_bar(schedule, t_prev, x_t.ndim)
    beta = ratio_var(a_prev, s_prev, a, s)  # 1 - ab / ab_prev, seen from t_prev
    shrink = (s_prev / s) ** 2  # (1 - ab_prev) / (1 - ab)
    mean = (a_prev * beta / s**2) * x0 + (a / a_prev) * shrink * x_t
    noisy = (t_prev >= 0).reshape(t.shape + (1,) * (x_t.ndim - 1))
    log_large = jnp.log(beta)
    # beta_tilde' = 0 on the last step, which adds no noise: keep the log finite there.
    log_small = jnp.log(jnp.where(noisy, shrink * beta, beta))
    if variance == "fixedlarge":
        log_var = log_large
    elif variance == "fixedsmall":
        log_var = log_small
    else:
        values = require_values(values, "DDPM with variance 'learned'")
        log_var = interpolate_log_variance(values.astype(x_t.dtype), log_large, log_small)
    return mean + jnp.where(noisy, jnp.exp(0.5 * log_var), 0.0) * noise, aux


def _ddim_step(predict, schedule, x_t, t, t_prev, key, aux, eta):
    """Song et al. 2021, eq. 12 and 16, from index t to t_prev (alpha_bar = 1 at -1):
    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
    sigma^2 = eta^2 (1 - ab_prev) / (1 - ab) (1 - ab / ab_prev)."""
    x0, eps = predict(x_t, t)
    noise = normal(key, x_t.shape, x_t.dtype)
    a, s = sqrt_alpha_bar(schedule, t, x_t.ndim)
    a_prev, s_prev = sqrt_alpha_bar(schedule, t_prev, x_t.ndim)
    # 1 - ab / ab_prev: the noisier-step variance of ratio_var, seen from t_prev.
    var = eta**2 * (s_prev / s) ** 2 * ratio_var(a_prev, s_prev, a, s)
    # max(.., 0): float32 rounding can make 1 - ab_prev - sigma^2 = -1e-9 when eta = 1.
    dir_coef = jnp.sqrt(jnp.maximum(s_prev**2 - var, 0.0))
    return a_prev * x0 + dir_coef * eps + jnp.sqrt(var) * noise, aux


def _edm_step(predict, schedule, x_t, t, t_prev, key, aux, eta, *, heun):
    """Euler / Heun on the probability-flow ODE in EDM's variables (Karras et al. 2022,
    Alg. 1 without churn): with x~ = x / alpha and sigma~ = sigma / alpha the ODE is
    dx~/dsigma~ = (x~ - D(x~)) / sigma~ = eps(x, t), so

      Euler: x~' = x~ + (sigma~' - sigma~) eps(x, t)
      Heun:  x~' = x~ + (sigma~' - sigma~) (eps(x, t) + eps(alpha' x~'_Euler, t')) / 2,

    and x' = alpha' x~'. The last step (to sigma~' = 0) is Euler, as in EDM. Euler is
    algebraically DDIM with eta = 0 (tests check it). Needs alpha > 0 at every visited
    index: not for zero-terminal-SNR schedules (use dpmpp_2m or ddim there)."""
    del key, eta
    a, s = sqrt_alpha_bar(schedule, t, x_t.ndim)
    a_prev, s_prev = sqrt_alpha_bar(schedule, t_prev, x_t.ndim)
    dsigma = s_prev / a_prev - s / a
    _, d = predict(x_t, t)
    x_tilde = x_t / a
    x_next = x_tilde + dsigma * d
    if heun:
        # t_prev = -1 has no model evaluation: evaluate at index 0 and keep Euler there.
        _, d_prev = predict(a_prev * x_next, jnp.maximum(t_prev, 0))
        x_heun = x_tilde + dsigma * 0.5 * (d + d_prev)
        x_next = jnp.where((t_prev >= 0).reshape(dsigma.shape), x_heun, x_next)
    return a_prev * x_next, aux


def _dpmpp_init(x):
    """DPM-Solver++ history: (previous x0 prediction, previous step's h, have one)."""
    return (
        jnp.zeros_like(x),
        jnp.zeros((x.shape[0],) + (1,) * (x.ndim - 1), x.dtype),
        jnp.zeros((), bool),
    )


def _dpmpp_2m_step(predict, schedule, x_t, t, t_prev, key, aux, eta, *, sde):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) and its SDE variant, in lambda =
    log(alpha / sigma) with the data (x0) prediction. With h = lambda' - lambda and
    D = x0 + (x0 - x0_last) / (2 r), r = h_last / h (the multistep linear extrapolation of
    x0 in lambda; D = x0 on the first and last step):

      ODE: x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) D
      SDE: x' = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) D + sigma' sqrt(1 - e^{-2h}) z

    The SDE line is the exact solution of the reverse SDE (in data-prediction form) over
    the step with x0 held at D; with D = x0 both lines are first order (the ODE one is
    DDIM). The step to alpha_bar = 1 (h = inf) is first order and returns x0. eta unused.
    """
    del eta
    x0_last, h_last, have_last = aux
    x0, _ = predict(x_t, t)
    _, s = sqrt_alpha_bar(schedule, t, x_t.ndim)
    a_prev, s_prev = sqrt_alpha_bar(schedule, t_prev, x_t.ndim)
    h = _lambda(schedule, t_prev, x_t.ndim) - _lambda(schedule, t, x_t.ndim)
    second = have_last & (t_prev >= 0).reshape(h.shape)
    r = jnp.where(second, h_last / h, 1.0)
    d = x0 + jnp.where(second, 0.5 / r, 0.0) * (x0 - x0_last)
    if sde:
        noise = normal(key, x_t.shape, x_t.dtype)
        x = (
            (s_prev / s) * jnp.exp(-h) * x_t
            - a_prev * jnp.expm1(-2.0 * h) * d
            + s_prev * jnp.sqrt(-jnp.expm1(-2.0 * h)) * noise
        )
    else:
        x = (s_prev / s) * x_t - a_prev * jnp.expm1(-h) * d
    return x, (x0, h, jnp.ones((), bool))


# Consistency models (Song et al. 2023) on the discrete schedule, LCM's parameterisation
# (Luo et al. 2023): f(x, t) = c_skip(t) x + c_out(t) x0(x, t); consistency.py trains it.
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(t, ndim: int):
    """(c_skip, c_out) = (s_d^2 / ((k t)^2 + s_d^2), k t / sqrt((k t)^2 + s_d^2)) at indices
    t [B] (s_d = 0.5, k = 10), broadcast to rank ndim: exactly (1, 0) at t = 0, so f(x, 0)
    = x for any network (the boundary condition)."""
    st = TIMESTEP_SCALING * jnp.asarray(t, jnp.float32)
    c_skip = SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2)
    c_out = st / jnp.sqrt(st**2 + SIGMA_DATA**2)
    shape = jnp.shape(t) + (1,) * (ndim - jnp.ndim(t))
    return c_skip.reshape(shape), c_out.reshape(shape)


def consistency_output(x_t, t, x0):
    """The consistency function f(x_t, t) from the network's x0 at (x_t, t)."""
    c_skip, c_out = boundary_scalings(t, x_t.ndim)
    return c_skip * x_t + c_out * x0


def _consistency_step(predict, schedule, x_t, t, t_prev, key, aux, eta):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): x0 = f(x_t, t), then x0
    noised afresh to t_prev, x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) z; the step to
    the clean end returns x0. One step from T-1 is one network evaluation. eta unused."""
    del eta
    x0, _ = predict(x_t, t)
    x0 = consistency_output(x_t, t, x0)
    a_prev, s_prev = sqrt_alpha_bar(schedule, t_prev, x_t.ndim)
    return a_prev * x0 + s_prev * normal(key, x_t.shape, x_t.dtype), aux


class Rule(NamedTuple):
    step: Callable  # rule(predict, schedule, x, t, t_prev, key, aux, eta) -> (x, aux)
    init: Callable  # x_T -> aux (multistep history; () for one-step rules)


def _no_history(x):
    del x
    return ()


# Keys: the sampler names, plus DDPM's three variances (``update`` in _scan_sample).
RULES = {
    "fixedlarge": Rule(functools.partial(_ddpm_step, variance="fixedlarge"), _no_history),
    "fixedsmall": Rule(functools.partial(_ddpm_step, variance="fixedsmall"), _no_history),
    "learned": Rule(functools.partial(_ddpm_step, variance="learned"), _no_history),
    "ddim": Rule(_ddim_step, _no_history),
    "consistency": Rule(_consistency_step, _no_history),
    "euler": Rule(functools.partial(_edm_step, heun=False), _no_history),
    "heun": Rule(functools.partial(_edm_step, heun=True), _no_history),
    "dpmpp_2m": Rule(functools.partial(_dpmpp_2m_step, sde=False), _dpmpp_init),
    "dpmpp_2m_sde": Rule(functools.partial(_dpmpp_2m_step, sde=True), _dpmpp_init),
}
