"""Samplers: DDPM ancestral sampling, DDIM and DDIM inversion, each one ``lax.scan``.

The model is any callable ``model_fn(x_t, t) -> output`` with ``t`` int32 [B] schedule
indices and ``output`` of kind ``prediction`` (eps, x0 or v; see objectives.py), so a
network, a guided wrapper or an analytic oracle plug in the same way. Shapes are [B, ...]
(NHWC images in practice).

Compiling once. The visited timesteps are arrays passed to one jitted scan as traced
arguments, like the schedule, x_T, the RNG and eta. A new ``num_steps`` changes only the
scan length: the body is traced and compiled once whatever the length, so compile time
does not grow with the number of steps, and a new eta, rng or x_T never recompiles.
``model_fn`` is part of the jit cache key: a plain function counts by identity (reuse the
same object), and anything it closes over is baked into the program as a constant. To
pass network parameters as traced arrays (no recompile when they change), give
``jax.tree_util.Partial(apply_fn, params)``; its arguments are pytree leaves.

RNG. ``rng`` splits into (rng_xT, rng_steps); x_T ~ N(0, I) is drawn from rng_xT unless
given, and step i (in visiting order) draws its noise from ``split(rng_steps, n)[i]``.
DDPM and DDIM draw identically, so DDIM with eta=1 over all T steps reproduces DDPM with
the posterior variance ("fixedsmall") sample by sample (Song et al. 2021, sec. 4.1).

Schedule indexing follows schedules.py: index ``t`` in 0..T-1 is the paper's step t+1,
and index -1 stands for the clean end of the chain, alpha_bar = 1.
"""
from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.objectives import PREDICTIONS, check_choice, q_posterior, x0_eps_from_prediction
from diffusion_jax.schedules import NoiseSchedule, at

SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("fixedlarge", "fixedsmall")

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


# --------------------------------------------------------------------------- timesteps


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading") -> np.ndarray:
    """The schedule indices a ``num_steps`` DDIM sampler visits, strictly descending, int32.

    With T = num_timesteps and n = num_steps:
      leading:  arange(0, T, T // n)[:n], reversed          (DDIM paper code, diffusers)
      trailing: round(T - arange(n) * T / n) - 1            (Lin et al. 2024)
      linspace: round(linspace(0, T - 1, n)), reversed
    (round is numpy's, half to even). After the last (smallest) index the sampler steps to
    alpha_bar = 1, i.e. clean x0, for every spacing.

    Pitfalls: for n < T "leading" never visits T-1 (its largest index is
    (n-1) * (T // n) <= T - T/n; 900 for T=1000, n=10), so it treats x_T ~ N(0, I) as a
    less noisy x_t than it is; "trailing" always starts at T-1 and fixes that. Trailing is often written
    round(arange(T, 0, -T/n)) - 1, but float arange can return n+1 points, the last one
    mapping to index -1 (T=1000: n = 61, 103, 121, ...); the closed form above always has n.
    """
    check_choice("spacing", spacing, SPACINGS)
    try:
        T, n = operator.index(num_timesteps), operator.index(num_steps)
    except TypeError:
        raise ValueError(f"num_timesteps and num_steps must be integers, got "
                         f"{num_timesteps!r} and {num_steps!r}") from None
    if not 1 <= n <= T:
        raise ValueError(f"num_steps must be in 1..{T} (the schedule's steps), got {n}")
    if spacing == "leading":
        ts = np.arange(0, T, T // n)[:n][::-1]
    elif spacing == "trailing":
        ts = np.round(T - np.arange(n) * (T / n)) - 1
    else:
        ts = np.round(np.linspace(0, T - 1, n))[::-1]
    return np.ascontiguousarray(ts, dtype=np.int32)


# --------------------------------------------------------------------------- step rules


def _normal(key, shape, dtype=jnp.float32) -> jnp.ndarray:
    """jax.random.normal(key, shape), drawn flat: the same numbers, but XLA:CPU compiles
    the partitionable threefry for a 4-D shape ~4x slower (2 s vs 0.5 s, jax 0.10.2)."""
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def _sqrt_alpha_bar(schedule: NoiseSchedule, t: jnp.ndarray, ndim: int):
    """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) at indices t [B], broadcast to rank ndim,
    with alpha_bar(-1) = 1. 1 - alpha_bar is taken from the float64-derived table, not
    computed as 1 - alpha_bar in float32, which loses ~4 digits near t = 0."""
    i = jnp.maximum(t, 0)
    clean = (t < 0).reshape(t.shape + (1,) * (ndim - t.ndim))
    return (jnp.where(clean, 1.0, at(schedule.sqrt_alphas_cumprod, i, ndim)),
            jnp.where(clean, 0.0, at(schedule.sqrt_one_minus_alphas_cumprod, i, ndim)))


def _predict(model_fn, schedule, prediction, clip_x0, x_t, t):
    """(x0, eps) implied by the model at (x_t, t). With clip_x0, x0 is clipped to [-1, 1]
    and eps recomputed from it, so both samplers see the same consistent pair."""
    out = model_fn(x_t, t).astype(x_t.dtype)
    x0, eps = x0_eps_from_prediction(schedule, prediction, x_t, t, out)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        _, eps = x0_eps_from_prediction(schedule, "x0", x_t, t, x0)
    return x0, eps


def _ddpm_update(schedule, x_t, t, t_prev, x0, eps, noise, eta, variance):
    """x_{t-1} ~ N(posterior mean(x0, x_t), sigma_t^2) (Ho et al. 2020, Alg. 2), no noise
    at index 0. fixedsmall: sigma^2 = beta_tilde_t; fixedlarge: sigma^2 = beta_t, with
    beta_tilde at index 1 in the log for index 0 (as Ho et al.'s code; unused there since
    index 0 adds no noise). t_prev and eta are unused: DDPM always steps t -> t-1."""
    del t_prev, eps, eta
    mean, _, log_var = q_posterior(schedule, x0, x_t, t)
    if variance == "fixedlarge":
        large = jnp.log(jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]]))
        log_var = at(large, t, x_t.ndim)
    noisy = (t > 0).reshape(log_var.shape)
    return mean + jnp.where(noisy, jnp.exp(0.5 * log_var), 0.0) * noise


def _ddim_update(schedule, x_t, t, t_prev, x0, eps, noise, eta, variance):
    """Song et al. 2021, eq. 12 and 16, from index t to t_prev (alpha_bar = 1 at -1):
    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
    sigma^2 = eta^2 (1 - ab_prev) / (1 - ab) (1 - ab / ab_prev)."""
    del variance
    a, s = _sqrt_alpha_bar(schedule, t, x_t.ndim)
    a_prev, s_prev = _sqrt_alpha_bar(schedule, t_prev, x_t.ndim)
    # 1 - ab / ab_prev = (ab_prev - ab) / ab_prev. In float32 the difference is taken
    # between the smaller pair, (1 - ab) - (1 - ab_prev) while ab_prev > 1/2, else
    # ab_prev - ab: a plain 1 - ab / ab_prev loses ~4 digits at both ends of the chain.
    diff = jnp.where(a_prev > s_prev, s**2 - s_prev**2, a_prev**2 - a**2)
    var = eta**2 * (s_prev / s) ** 2 * diff / a_prev**2
    # max(.., 0): float32 rounding can make 1 - ab_prev - sigma^2 = -1e-9 when eta = 1.
    dir_coef = jnp.sqrt(jnp.maximum(s_prev**2 - var, 0.0))
    return a_prev * x0 + dir_coef * eps + jnp.sqrt(var) * noise


_UPDATES = {"ddim": _ddim_update, "fixedlarge": _ddpm_update, "fixedsmall": _ddpm_update}


# --------------------------------------------------------------------------- scans


@functools.partial(jax.jit, static_argnames=("update", "prediction", "clip_x0", "return_every"))
def _scan_sample(model_fn, schedule, x_T, ts, ts_prev, rng, eta, *, update, prediction,
                 clip_x0, return_every):
    """Run ``update`` over the steps ts[i] -> ts_prev[i] (int32 [n], traced) from x_T.

    model_fn is a jax.tree_util.Partial (a pytree: its function is static, its bound
    arguments traced). With return_every = k > 0 a nested scan (n // k chunks of k steps,
    each emitting its last x, then the n % k remaining steps) returns the trajectory
    [n // k, *x.shape] without storing every step.
    """
    batch = x_T.shape[0]
    step_rule = functools.partial(_UPDATES[update], variance=update)

    def step(x, inputs):
        t, t_prev, key = inputs
        t = jnp.full((batch,), t, jnp.int32)
        t_prev = jnp.full((batch,), t_prev, jnp.int32)
        x0, eps = _predict(model_fn, schedule, prediction, clip_x0, x, t)
        noise = _normal(key, x.shape, x.dtype)
        x = step_rule(schedule, x, t, t_prev, x0, eps, noise, eta)
        return x.astype(x_T.dtype), None

    n = ts.shape[0]
    steps = (ts, ts_prev, jax.random.split(rng, n))
    if not return_every:
        return jax.lax.scan(step, x_T, steps)[0]

    def chunk(x, inputs):
        x = jax.lax.scan(step, x, inputs)[0]
        return x, x

    m = n // return_every
    head = jax.tree.map(lambda a: a[:m * return_every].reshape((m, return_every) + a.shape[1:]),
                        steps)
    tail = jax.tree.map(lambda a: a[m * return_every:], steps)
    x, traj = jax.lax.scan(chunk, x_T, head)
    return jax.lax.scan(step, x, tail)[0], traj


@functools.partial(jax.jit, static_argnames=("prediction",))
def _scan_invert(model_fn, schedule, x0, ts_from, ts_to, *, prediction):
    """Deterministic DDIM run backwards: ts_from[i] -> ts_to[i] (ascending, from -1)."""
    batch = x0.shape[0]

    def step(x, inputs):
        t_from = jnp.full((batch,), inputs[0], jnp.int32)
        t_to = jnp.full((batch,), inputs[1], jnp.int32)
        # eps at the current x, with the timestep of the step being inverted (the only one
        # available for the first step, which starts at alpha_bar = 1).
        out = model_fn(x, t_to).astype(x.dtype)
        _, eps = x0_eps_from_prediction(schedule, prediction, x, t_to, out)
        a_from, s_from = _sqrt_alpha_bar(schedule, t_from, x.ndim)
        a_to, s_to = _sqrt_alpha_bar(schedule, t_to, x.ndim)
        x = a_to * (x - s_from * eps) / a_from + s_to * eps
        return x.astype(x0.dtype), None

    return jax.lax.scan(step, x0, (ts_from, ts_to))[0]


# --------------------------------------------------------------------------- public API


def _as_pytree_fn(model_fn) -> jax.tree_util.Partial:
    return model_fn if isinstance(model_fn, jax.tree_util.Partial) else jax.tree_util.Partial(model_fn)


def _sample(model_fn, schedule, rng, shape, ts, x_T, eta, *, update, prediction, clip_x0,
            return_every):
    check_choice("prediction", prediction, PREDICTIONS)
    if operator.index(return_every) < 0:
        raise ValueError(f"return_every must be >= 0, got {return_every}")
    rng_xT, rng_steps = jax.random.split(rng)
    if x_T is None:
        x_T = _normal(rng_xT, tuple(shape))
    else:
        x_T = jnp.asarray(x_T)
        if x_T.shape != tuple(shape):
            raise ValueError(f"x_T has shape {x_T.shape}, expected {tuple(shape)}")
    ts_prev = np.append(ts[1:], -1).astype(np.int32)
    return _scan_sample(_as_pytree_fn(model_fn), schedule, x_T, jnp.asarray(ts),
                        jnp.asarray(ts_prev), rng_steps, jnp.asarray(eta, jnp.float32),
                        update=update, prediction=prediction, clip_x0=bool(clip_x0),
                        return_every=int(return_every))


def ddpm_sample(model_fn: ModelFn, schedule: NoiseSchedule, rng, shape: Sequence[int], *,
                prediction: str = "eps", variance: str = "fixedlarge", clip_x0: bool = False,
                x_T: Optional[jnp.ndarray] = None, return_every: int = 0):
    """Ancestral sampling over all T steps (Ho et al. 2020, Alg. 2) -> x0 [*shape].

    variance: "fixedlarge" (sigma^2 = beta_t, Ho et al.'s CIFAR-10 choice) or "fixedsmall"
    (sigma^2 = beta_tilde_t, the true posterior variance). The mean is q_posterior's with
    the x0 implied by the model (clipped to [-1, 1] if clip_x0). With return_every = k > 0
    returns (x0, traj), traj[i] = x after (i + 1) * k steps.
    """
    check_choice("variance", variance, VARIANCES)
    ts = np.arange(schedule.num_timesteps - 1, -1, -1, dtype=np.int32)
    return _sample(model_fn, schedule, rng, shape, ts, x_T, 0.0, update=variance,
                   prediction=prediction, clip_x0=clip_x0, return_every=return_every)


def ddim_sample(model_fn: ModelFn, schedule: NoiseSchedule, rng, shape: Sequence[int], *,
                num_steps: int, eta=0.0, prediction: str = "eps", spacing: str = "leading",
                clip_x0: bool = False, x_T: Optional[jnp.ndarray] = None,
                return_every: int = 0):
    """DDIM (Song et al. 2021, eq. 12) over ``ddim_timesteps(T, num_steps, spacing)`` -> x0.

    eta in [0, 1] scales the per-step noise: 0 is the deterministic sampler, 1 over all T
    steps is DDPM with beta_tilde. eta may be a traced array (changing it never
    recompiles). return_every as in ddpm_sample.
    """
    if isinstance(eta, numbers.Real) and not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    ts = ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
    return _sample(model_fn, schedule, rng, shape, ts, x_T, eta, update="ddim",
                   prediction=prediction, clip_x0=clip_x0, return_every=return_every)


def ddim_invert(model_fn: ModelFn, schedule: NoiseSchedule, x0: jnp.ndarray, *,
                num_steps: int, prediction: str = "eps", spacing: str = "leading") -> jnp.ndarray:
    """x_T that deterministic DDIM (same num_steps and spacing) maps back to about x0.

    Walks the sampler's timesteps in ascending order, from alpha_bar = 1 to the largest
    index, each step the eta = 0 DDIM update solved for the noisier point. The exact
    inverse would need eps at the (unknown) noisier point; as is standard we use the
    model at the current x (with the noisier step's timestep), so the round trip error
    is first order in the step size and vanishes as num_steps grows.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    ts_to = ddim_timesteps(schedule.num_timesteps, num_steps, spacing)[::-1]
    ts_from = np.append(-1, ts_to[:-1]).astype(np.int32)
    return _scan_invert(_as_pytree_fn(model_fn), schedule, jnp.asarray(x0),
                        jnp.asarray(np.ascontiguousarray(ts_from)),
                        jnp.asarray(np.ascontiguousarray(ts_to)), prediction=prediction)
