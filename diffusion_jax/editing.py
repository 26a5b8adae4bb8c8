"""Editing real images with a trained model: each one sampler scan (see samplers.py).

``img2img`` (SDEdit): noise an image part way and denoise it. ``inpaint``: fill in the
unknown pixels of an image (replacement, optional RePaint resampling). ``ddim_invert``
and ``ddim_edit``: DDIM inversion of an image to its x_T under one condition, and
regeneration under another. All take any sampler ``model_fn`` (a network, a guided
wrapper from guidance.py, an analytic oracle) and draw their noise like ``sample`` does,
so the same rng gives the same x_T and step noise (see samplers.py for the scan, the
compile-once rules and the RNG).
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers
from diffusion_jax.objectives import PREDICTIONS, check_choice, q_sample, x0_eps_from_prediction
from diffusion_jax.samplers import ModelFn
from diffusion_jax.schedules import NoiseSchedule
from diffusion_jax.timesteps import LAMBDA_MIN, ddim_timesteps, repaint_timesteps


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
        a_from, s_from = samplers.sqrt_alpha_bar(schedule, t_from, x.ndim)
        a_to, s_to = samplers.sqrt_alpha_bar(schedule, t_to, x.ndim)
        x = a_to * (x - s_from * eps) / a_from + s_to * eps
        return x.astype(x0.dtype), None

    return jax.lax.scan(step, x0, (ts_from, ts_to))[0]


def ddim_invert(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: jnp.ndarray,
    *,
    num_steps: int,
    prediction: str = "eps",
    spacing: str = "leading",
    lambda_min: float = LAMBDA_MIN,
) -> jnp.ndarray:
    """x_T that deterministic DDIM (same num_steps and spacing) maps back to about x0.

    Walks the sampler's timesteps in ascending order, from alpha_bar = 1 to the largest
    index, each step the eta = 0 DDIM update solved for the noisier point. The exact
    inverse would need eps at the (unknown) noisier point; as is standard we use the
    model at the current x (with the noisier step's timestep), so the round trip error
    is first order in the step size and vanishes as num_steps grows.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    T = schedule.num_timesteps
    ts_to = ddim_timesteps(T, num_steps, spacing, schedule.log_snr, lambda_min)[::-1]
    ts_from = np.append(-1, ts_to[:-1]).astype(np.int32)
    return _scan_invert(
        samplers.as_pytree_fn(model_fn),
        schedule,
        jnp.asarray(x0),
        jnp.asarray(np.ascontiguousarray(ts_from)),
        jnp.asarray(np.ascontiguousarray(ts_to)),
        prediction=prediction,
    )


def ddim_edit(
    source_model_fn: ModelFn,
    target_model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: jnp.ndarray,
    *,
    num_steps: int,
    prediction: str = "eps",
    spacing: str = "leading",
    lambda_min: float = LAMBDA_MIN,
    clip_x0: bool = False,
):
    """DDIM-inversion editing -> (edited x0, x_T).

    Inverts the real image x0 to x_T with ``source_model_fn`` (e.g. the model conditioned
    on the image's class, unguided) and regenerates it with deterministic DDIM under
    ``target_model_fn`` (another class, any guidance): structure that x_T encodes is kept,
    the condition changes. With target = source it is the round trip, whose error is
    first order in the step size (see ddim_invert). clip_x0 is off by default: the
    inversion does not clip, so clipping would break the round trip.
    """
    x0 = jnp.asarray(x0)
    grid = dict(num_steps=num_steps, spacing=spacing, lambda_min=lambda_min)
    x_T = ddim_invert(source_model_fn, schedule, x0, prediction=prediction, **grid)
    # eta = 0 and x_T given: the rng is not used.
    x = samplers.sample(
        target_model_fn,
        schedule,
        jax.random.PRNGKey(0),
        x0.shape,
        sampler="ddim",
        prediction=prediction,
        clip_x0=clip_x0,
        x_T=x_T,
        **grid,
    )
    return x, x_T


def img2img(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    rng,
    x0: jnp.ndarray,
    *,
    strength: float,
    sampler: str = "ddim",
    num_steps: int = 50,
    eta=0.0,
    spacing: str = "leading",
    variance: str = "fixedlarge",
    respacing: int = 0,
    lambda_min: float = LAMBDA_MIN,
    prediction: str = "eps",
    clip_x0: bool = False,
):
    """SDEdit (Meng et al. 2022): noise x0 to an intermediate level and denoise it.

    Of the n timesteps ``sampler`` would visit, the last k = round(strength * n) are run,
    starting from x0 noised to the first of them, q(x_t | x0). strength = 0 returns x0
    unchanged; strength = 1 (k = n) starts from pure noise and equals ``sample`` with the
    same rng and options exactly (it draws the same x_T and step noise; step i of the k
    uses split(rng_steps, n)[n - k + i]). strength is a Python float: it sets the scan
    length, so each distinct k compiles once.
    """
    if not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    ts, update = samplers.plan(
        sampler, schedule, num_steps, spacing, variance, eta, respacing, lambda_min
    )
    x0 = jnp.asarray(x0)
    n = len(ts)
    k = int(round(strength * n))
    if k == 0:
        return x0
    x_T, keys = samplers.start(rng, x0.shape, None, n)
    ts = ts[n - k :]
    if k < n:
        x_T = q_sample(schedule, x0, jnp.full((x0.shape[0],), ts[0], jnp.int32), x_T)
    return samplers.run(
        model_fn,
        schedule,
        x_T.astype(x0.dtype),
        ts,
        None,
        keys[n - k :],
        eta,
        update=update,
        prediction=prediction,
        clip_x0=clip_x0,
    )


def inpaint(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    rng,
    x_known: jnp.ndarray,
    mask,
    *,
    sampler: str = "ddim",
    num_steps: int = 50,
    eta=0.0,
    spacing: str = "leading",
    variance: str = "fixedlarge",
    respacing: int = 0,
    lambda_min: float = LAMBDA_MIN,
    prediction: str = "eps",
    clip_x0: bool = False,
    jump_length: int = 10,
    jump_n_sample: int = 1,
    x_T: Optional[jnp.ndarray] = None,
):
    """Fill in the pixels where mask = 0, keeping those where mask = 1 (``x_known``'s).

    Replacement method (Song et al. 2021 score SDE, app. I; RePaint eq. 8): after each
    denoising step to index t the known pixels are set to a fresh draw of q(x_t |
    x_known), so at the end (alpha_bar = 1) they equal x_known exactly; x_T's known pixels
    are drawn the same way. Works with every sampler. jump_n_sample > 1 adds RePaint's
    resampling (Lugmayr et al. 2022; see repaint_timesteps): jumping back up re-noises
    the whole image with q(x_t' | x_t), so the generated region can harmonize with the
    known one; multistep solvers restart their history after a jump. mask broadcasts to
    x_known's shape ([H, W, 1] or [B, H, W, C], ...); values in between 0 and 1 blend.
    """
    x_known = jnp.asarray(x_known)
    try:
        mask = jnp.broadcast_to(jnp.asarray(mask, x_known.dtype), x_known.shape)
    except ValueError:
        raise ValueError(
            f"mask of shape {jnp.shape(mask)} does not broadcast to the "
            f"images' shape {x_known.shape}"
        ) from None
    ts, update = samplers.plan(
        sampler, schedule, num_steps, spacing, variance, eta, respacing, lambda_min
    )
    ts_prev, renoise = None, jump_n_sample != 1
    if renoise:
        ts, ts_prev = repaint_timesteps(ts, jump_length, jump_n_sample)
    # Same x_T and step keys as ``sample`` (an all-zero mask reproduces it exactly); the
    # known pixels' noise comes from fold_in(key, 1) of the same keys.
    x_T, keys = samplers.start(rng, x_known.shape, x_T, len(ts))
    x_T = samplers.replace_known(
        schedule,
        x_T,
        x_known,
        mask,
        jnp.full((x_known.shape[0],), ts[0], jnp.int32),
        jax.random.fold_in(rng, 1),
    )
    return samplers.run(
        model_fn,
        schedule,
        x_T,
        ts,
        ts_prev,
        keys,
        eta,
        update=update,
        prediction=prediction,
        clip_x0=clip_x0,
        known=x_known,
        mask=mask,
        renoise=renoise,
    )
