"""Forward process q(x_t | x0), prediction-target conversions, the posterior
q(x_{t-1} | x_t, x0) and the training loss.

Notation (Ho et al. 2020; Salimans & Ho 2022 for v):
  x_t = sqrt(a_bar) x0 + sqrt(1 - a_bar) eps
  v   = sqrt(a_bar) eps - sqrt(1 - a_bar) x0
Timesteps ``t`` are int32 arrays of shape [B] indexing the schedule (see schedules.py).
With a learned variance (variance.py) model outputs carry 2C channels; the prediction is
their first C.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import NoiseSchedule, at
from diffusion_jax.variance import (
    discretized_gaussian_log_likelihood,
    learned_log_variance,
    normal_kl,
    split_output,
)

PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("uniform", "min_snr")


def check_choice(kind: str, value: str, valid) -> None:
    """Raise a ValueError naming the valid choices (used for every string option)."""
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {list(valid)}")


def q_sample(
    schedule: NoiseSchedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
    """Sample x_t ~ q(x_t | x0) using the given standard-normal ``noise``."""
    return (
        at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def v_from_x0_eps(schedule: NoiseSchedule, x0, eps, t):
    """The v-prediction target."""
    return (
        at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps
        - at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
    )


def target(schedule: NoiseSchedule, prediction: str, x0, eps, t):
    """What a model trained with ``prediction`` should output for (x0, eps, t)."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return v_from_x0_eps(schedule, x0, eps, t)


def x0_eps_from_prediction(schedule: NoiseSchedule, prediction: str, x_t, t, model_output):
    """(x0, eps) implied by a model output of kind ``prediction`` at (x_t, t).

    The eps -> x0 conversion divides by sqrt(a_bar_t), which is 0 at a zero-terminal-SNR
    step; use v or x0 prediction with such schedules (Lin et al. 2024). A 2C-channel
    output (learned variance) contributes its first C channels, the prediction.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    model_output, _ = split_output(x_t, model_output)
    a = at(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    s = at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    if prediction == "eps":
        eps = model_output
        x0 = (x_t - s * eps) / a
    elif prediction == "x0":
        x0 = model_output
        eps = (x_t - a * x0) / s
    else:  # v; uses a^2 + s^2 = 1
        x0 = a * x_t - s * model_output
        eps = s * x_t + a * model_output
    return x0, eps


def q_posterior(schedule: NoiseSchedule, x0, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7)."""
    mean = (
        at(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
        + at(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t
    )
    return (
        mean,
        at(schedule.posterior_variance, t, x_t.ndim),
        at(schedule.posterior_log_variance_clipped, t, x_t.ndim),
    )


def loss_weight(
    schedule: NoiseSchedule, t, prediction: str, weighting: str, min_snr_gamma: float = 5.0
):
    """Per-example weight [B] of the MSE in ``prediction`` space.

    min_snr (Hang et al. 2023) weights the x0-space error by min(SNR, gamma); since
    eps-MSE = SNR * x0-MSE and v-MSE = (SNR + 1) * x0-MSE this is min(SNR, gamma)/SNR for
    eps, min(SNR, gamma) for x0 and min(SNR, gamma)/(SNR + 1) for v.
    """
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("prediction", prediction, PREDICTIONS)
    if weighting == "uniform":
        return jnp.ones(t.shape, jnp.float32)
    snr = jnp.exp(jnp.take(schedule.log_snr, t))
    clipped = jnp.minimum(snr, min_snr_gamma)
    if prediction == "eps":  # min(snr, g)/snr, written to stay finite at snr = 0
        return jnp.where(snr <= min_snr_gamma, 1.0, min_snr_gamma / snr)
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1.0)


def vlb_term(schedule: NoiseSchedule, x0, x_t, t, x0_pred, values):
    """Per-example term of the variational bound at index t, in bits per dimension [B]:
    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and -log p(x0 | x_1) (256
    bins) at t = 0 (variance.py), where p is Gaussian with the posterior mean at the
    predicted ``x0_pred`` and the log-variance the variance ``values`` stand for
    (variance.learned_log_variance). Means over all but the batch axis, / log 2
    (improved DDPM, Nichol & Dhariwal 2021, sec. 2 and 3.1)."""
    true_mean, _, true_log_var = q_posterior(schedule, x0, x_t, t)
    mean, _, _ = q_posterior(schedule, x0_pred, x_t, t)
    log_var = learned_log_variance(schedule, t, values)
    kl = normal_kl(true_mean, true_log_var, mean, log_var)
    nll = -discretized_gaussian_log_likelihood(x0, mean, log_var)
    per_dim = jnp.where((t == 0).reshape(t.shape + (1,) * (x0.ndim - 1)), nll, kl)
    return jnp.mean(per_dim.reshape(per_dim.shape[0], -1), axis=1) / math.log(2.0)


# apply_fn(params, x_t, t, y, rng) -> model output with the shape of x_t (2C channels
# with learn_sigma).
ApplyFn = Callable[[Any, jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray], jax.Array], jnp.ndarray]


def per_example_keys(rng, example_ids: jnp.ndarray):
    """One key per example, ``fold_in(rng, id)``: what an example draws depends only on its
    global id, never on how the batch is split over devices or processes."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_ids)


def diffusion_loss(
    apply_fn: ApplyFn,
    params,
    schedule: NoiseSchedule,
    batch: dict,
    rng,
    *,
    prediction: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    example_ids: Optional[jnp.ndarray] = None,
    learn_sigma: bool = False,
    vlb_weight: float = 0.001,
):
    """Weighted MSE between the model output and its ``prediction`` target; with
    ``learn_sigma`` the hybrid loss L_simple + vlb_weight * L_vlb.

    ``batch["image"]`` holds x0 [B, ...] in [-1, 1]; ``batch.get("condition")`` (labels,
    caption tokens or None: conditioning.py) is passed to the model as its y. t ~ U{0..T-1} per example. With eps prediction and
    uniform weighting this is Ho et al.'s L_simple.

    t and eps of example i are drawn from ``fold_in(rng, example_ids[i])`` (default ids
    0..B-1), so a data-parallel caller that passes global example ids gets the same draws
    on 1 or N devices; the model's own randomness (dropout) uses a separate key.

    learn_sigma (improved DDPM, Nichol & Dhariwal 2021, sec. 3.1; DiT): the model outputs
    2C channels, prediction then variance values (variance.py). The MSE (weighted as
    above) takes the prediction; L_vlb = L_0 + .. + L_{T-1} (Ho et al. eq. 5, without
    the parameter-free L_T) is estimated at the drawn t by T * vlb_term, whose mean uses
    a stop-gradient copy of the prediction, so L_vlb trains only the variance. With the
    paper's vlb_weight = 0.001 and T = 1000 that adds vlb_term once, as the authors'
    code (its vb term times T / 1000) and DiT's (T = 1000, unscaled) do.

    Returns ``(loss, aux)`` with aux = {"t": [B], "loss_per_example": [B] (weighted, with
    the VLB part)}, plus "vlb_per_example" [B] (vlb_term, bits per dim) with learn_sigma.
    """
    x0 = batch["image"]
    if example_ids is None:
        example_ids = jnp.arange(x0.shape[0])
    rng_examples, rng_model = jax.random.split(rng)
    keys = per_example_keys(rng_examples, example_ids)
    t = jax.vmap(
        lambda k: jax.random.randint(
            jax.random.fold_in(k, 0), (), 0, schedule.num_timesteps, dtype=jnp.int32
        )
    )(keys)
    eps = jax.vmap(
        lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:], jnp.float32)
    )(keys).astype(x0.dtype)
    x_t = q_sample(schedule, x0, t, eps)
    out = apply_fn(params, x_t, t, batch.get("condition"), rng_model)
    if learn_sigma:
        out, values = split_output(x_t, out)
        if values is None:
            raise ValueError(
                f"learn_sigma needs a model output of 2C = {2 * x0.shape[-1]} channels, "
                f"got {out.shape[-1]} (set the model's out_channels)"
            )
    elif out.shape != x0.shape:  # a 2-channel output would broadcast against C = 1
        raise ValueError(
            f"model output shape {out.shape} != image shape {x0.shape} (an output with "
            "2C channels needs learn_sigma=True)"
        )
    err = jnp.square(out.astype(jnp.float32) - target(schedule, prediction, x0, eps, t))
    per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    per_example = per_example * loss_weight(schedule, t, prediction, weighting, min_snr_gamma)
    aux = {"t": t, "loss_per_example": per_example}
    if learn_sigma:
        frozen = jax.lax.stop_gradient(out).astype(jnp.float32)
        x0_pred, _ = x0_eps_from_prediction(schedule, prediction, x_t, t, frozen)
        vlb = vlb_term(schedule, x0, x_t, t, x0_pred, values.astype(jnp.float32))
        per_example = per_example + vlb_weight * schedule.num_timesteps * vlb
        aux.update(loss_per_example=per_example, vlb_per_example=vlb)
    return jnp.mean(per_example), aux
