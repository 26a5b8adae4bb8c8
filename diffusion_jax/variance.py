"""Learned reverse-process variance (Nichol & Dhariwal 2021, "Improved Denoising Diffusion
Probabilistic Models"; DiT uses it, Peebles & Xie 2023): the model's variance channels,
the log-variance they stand for, the Gaussian terms of the variational bound (VLB) that
train them, and the config check that keeps model, objective and sampler consistent.

Output layout. With ``objective.learn_sigma`` a network given C-channel x_t outputs 2C
channels: the first C are its usual prediction (eps, x0 or v; objectives.py), the last C
raw values v, read as the fraction frac = (v + 1) / 2 of

  log sigma_t^2 = frac log beta_t + (1 - frac) log beta_tilde_t     (improved DDPM eq. 15)

between DDPM's two fixed choices, beta_tilde from schedules.py's clipped table (index 0,
whose beta_tilde is 0, uses index 1's). v is not clipped: the paper parameterises, it
does not bound. ``split_output`` is the one place an output is split:
objectives.x0_eps_from_prediction (so every sampler, guidance and editing) uses only the
prediction half, the DDPM rule "learned" (step_rules.py) reads the variance half, and
guidance.py takes it from the conditional model.

VLB terms, per element, in nats (Ho et al. 2020 eq. 5; improved DDPM sec. 2):
  L_{t-1} = KL(q(x_{t-1} | x_t, x0) || N(mu_theta(x_t), sigma_t^2))   for index t > 0;
  L_0     = -log p(x0 | x_1): the Gaussian N(mu_theta, sigma^2) integrated over x0's bin,
            one of 256 of width 2/255 centred on -1, .., 1, the end bins reaching to
            -inf / +inf (Ho et al. sec. 3.3, eq. 13).
objectives.vlb_term averages them over dimensions and converts them to bits.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from diffusion_jax.schedules import NoiseSchedule, at

FIXED = ("fixedlarge", "fixedsmall")  # Ho et al. 2020: sigma_t^2 = beta_t | beta_tilde_t
LEARNED = "learned"  # sampler.variance for a learn_sigma model
HALF_BIN = 1.0 / 255.0  # half the width of one of 256 bins spanning [-1, 1]


# --------------------------------------------------------------------------- the output


def split_output(x_t, out):
    """(prediction, variance values or None) of a model output for C-channel x_t: C output
    channels are all prediction; 2C are prediction then variance values (learn_sigma)."""
    c, n = x_t.shape[-1], out.shape[-1]
    if n == c:
        return out, None
    if n == 2 * c:
        return out[..., :c], out[..., c:]
    raise ValueError(
        f"model output has {n} channels for {c}-channel inputs; expected {c}, or {2 * c} "
        "with a learned variance (objective.learn_sigma)"
    )


def join_output(prediction, values):
    """The inverse of split_output."""
    return prediction if values is None else jnp.concatenate([prediction, values], axis=-1)


def require_values(values, what: str):
    """``values``, or a ValueError saying that ``what`` needs a learned-variance model."""
    if values is None:
        raise ValueError(
            f"{what} needs the model's variance channels: its output has the data's C "
            "channels, not 2C (train with objective.learn_sigma=True)"
        )
    return values


def interpolate_log_variance(values, log_large, log_small):
    """frac log_large + (1 - frac) log_small with frac = (v + 1) / 2 (improved DDPM eq. 15)."""
    frac = (values + 1.0) / 2.0
    return frac * log_large + (1.0 - frac) * log_small


def learned_log_variance(schedule: NoiseSchedule, t, values):
    """log sigma_t^2 between log beta_t and log beta_tilde_t for the variance values v
    [B, ...] at indices t [B] (``interpolate_log_variance``)."""
    log_large = jnp.log(at(schedule.betas, t, values.ndim))
    log_small = at(schedule.posterior_log_variance_clipped, t, values.ndim)
    return interpolate_log_variance(values, log_large, log_small)


# --------------------------------------------------------------------------- VLB terms


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats:
    (e^d - 1 - d + (mean1 - mean2)^2 e^-log_var2) / 2 with d = log_var1 - log_var2, the
    variance part as expm1(d) - d: summing log_var2 - log_var1 + e^d - 1 term by term
    loses all float32 digits of a small KL (e.g. 1e-6 at late t) to cancellation."""
    d = log_var1 - log_var2
    return 0.5 * (jnp.expm1(d) - d + jnp.square(mean1 - mean2) * jnp.exp(-log_var2))


def discretized_gaussian_log_likelihood(x, mean, log_var):
    """log P(bin of x) per element under N(mean, e^log_var), for x on the 256-level grid
    of [-1, 1] (bin [x - 1/255, x + 1/255]; the end bins open to -inf / +inf).

    Exact normal CDF in log space (the authors' code uses a tanh approximation of it and
    clamps probabilities at 1e-12): log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - e^(log
    Phi(a) - log Phi(b))). log Phi keeps its relative precision in both tails (above the
    mean it is ~ -Phi(-z), not the log of a float32 number near 1), so a bin ~7 sigma out
    on either side still gets its probability (~1e-11 in the tests), where Phi(b) -
    Phi(a) in float32 would be 0."""
    inv_std = jnp.exp(-0.5 * log_var)
    centred = x - mean
    z_hi, z_lo = (centred + HALF_BIN) * inv_std, (centred - HALF_BIN) * inv_std
    log_hi = log_ndtr(z_hi)
    gap = -jnp.expm1(log_ndtr(z_lo) - log_hi)  # 0 only if the bin is ~1e-7 of sigma wide
    inner = log_hi + jnp.log(jnp.maximum(gap, jnp.finfo(gap.dtype).tiny))
    # the end bins' test sits between grid points (-1 + 2/255 = -0.992 is the next one)
    return jnp.where(x < -0.999, log_hi, jnp.where(x > 0.999, log_ndtr(-z_lo), inner))


# --------------------------------------------------------------------------- config


def check_learned_sigma(config, image_channels: int) -> None:
    """Raise ValueError (one line, naming the fix) unless the model's output channels, the
    objective and the sampler agree: ``objective.learn_sigma`` needs the model's
    ``out_channels`` = 2 C (C = ``image_channels``, the data's), and without it the
    output must have C channels; ``sampler.variance`` must be one of FIXED or "learned",
    and "learned" needs learn_sigma; ``objective.vlb_weight`` >= 0. Configs older than
    the keys read as learn_sigma off."""
    obj, model = config.objective, config.model
    learn = bool(obj.get("learn_sigma", False))
    variance = config.sampler.get("variance", FIXED[0])
    if variance not in FIXED + (LEARNED,):
        raise ValueError(
            f"unknown sampler.variance {variance!r}; valid: {list(FIXED + (LEARNED,))}"
        )
    if variance == LEARNED and not learn:
        raise ValueError(
            "sampler.variance='learned' needs objective.learn_sigma=True (a model that "
            "outputs its variance); otherwise use 'fixedlarge' or 'fixedsmall'"
        )
    if obj.get("vlb_weight", 0.0) < 0:
        raise ValueError(f"objective.vlb_weight={obj.vlb_weight} must be >= 0")
    c, key = image_channels, f"model.{model.name}.out_channels"
    arch = model.get(model.name, None) or {}
    if "out_channels" not in arch:
        if learn:
            raise ValueError(
                f"objective.learn_sigma=True needs a model with out_channels; model "
                f"{model.name!r} has none: set objective.learn_sigma=False"
            )
        return
    out = arch["out_channels"] or c
    if learn and out != 2 * c:
        raise ValueError(
            f"objective.learn_sigma=True needs {key}={2 * c} (prediction + variance for "
            f"{c}-channel data), got {arch['out_channels']}: set {key}={2 * c}"
        )
    if not learn and out == 2 * c:
        raise ValueError(
            f"{key}={out} is a learned-variance output ({c}-channel data) but "
            f"objective.learn_sigma=False: set objective.learn_sigma=True or {key}=None"
        )
    if not learn and out != c:
        raise ValueError(
            f"{key}={out} must be None or {c} (the data's channels; {2 * c} with "
            "objective.learn_sigma=True)"
        )
