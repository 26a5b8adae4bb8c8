"""Guidance as ``model_fn`` transforms: classifier-free guidance (Ho & Salimans 2022) and
gradient guidance, the common form of classifier guidance (Dhariwal & Nichol 2021) and
CLIP guidance (GLIDE, Nichol et al. 2022); their gradients come from guides.py.

``guided_model_fn`` wraps a conditional network ``apply_fn(params, x_t, t, cond)`` into a
``model_fn(x_t, t)`` that every sampler and editing function takes like any other model:
the samplers never need to know about guidance. It returns a ``jax.tree_util.Partial``
whose bound arguments (params, conditions, scale, interval, rescale) are traced pytree
leaves, so a new guidance scale or label batch never recompiles the sampler's scan.
A learned-variance network's 2C-channel output (variance.py) is guided in its prediction
channels only and keeps the conditional model's variance channels, as DiT samples
(Peebles & Xie 2023, their ``forward_with_cfg``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax.objectives import PREDICTIONS, check_choice, target, x0_eps_from_prediction
from diffusion_jax.schedules import NoiseSchedule
from diffusion_jax.step_rules import sqrt_alpha_bar
from diffusion_jax.variance import join_output, split_output


def _per_example(v, ndim):
    """A scalar, or a [B] vector reshaped to broadcast against rank-ndim arrays."""
    v = jnp.asarray(v, jnp.float32)
    return v if v.ndim == 0 else v.reshape(v.shape + (1,) * (ndim - v.ndim))


@dataclasses.dataclass(frozen=True)
class _Guided:
    """The guided model_fn's function (static: equal instances share jit caches)."""

    apply_fn: Callable
    prediction: str

    def __call__(self, params, cond, null_cond, scale, interval, rescale, schedule, x_t, t):
        both = self.apply_fn(
            params,
            jnp.concatenate([x_t, x_t]),
            jnp.concatenate([t, t]),
            jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, null_cond),
        )
        out_cond, out_uncond = jnp.split(both.astype(x_t.dtype), 2)
        out_cond, values = split_output(x_t, out_cond)  # values: the conditional model's
        out_uncond, _ = split_output(x_t, out_uncond)
        w = _per_example(scale, x_t.ndim)
        if interval is not None:
            inside = (t >= interval[0]) & (t <= interval[1])
            w = jnp.where(inside.reshape(t.shape + (1,) * (x_t.ndim - 1)), w, 1.0)
        # w c + (1 - w) u, not u + w (c - u): exact at w = 0 (u) and w = 1 (c).
        out = w * out_cond + (1.0 - w) * out_uncond
        if rescale is None:
            return join_output(out, values)
        # Lin et al. 2024, sec. 3.4: rescale the guided x0 to the conditional one's std
        # (per example), then mix with the plain guided x0 by the factor ``rescale``.
        x0_cond, _ = x0_eps_from_prediction(schedule, self.prediction, x_t, t, out_cond)
        x0, _ = x0_eps_from_prediction(schedule, self.prediction, x_t, t, out)
        axes = tuple(range(1, x_t.ndim))
        ratio = jnp.std(x0_cond, axis=axes, keepdims=True) / jnp.maximum(
            jnp.std(x0, axis=axes, keepdims=True), 1e-12
        )
        phi = _per_example(rescale, x_t.ndim)
        x0 = x0 * (phi * ratio + 1.0 - phi)
        _, eps = x0_eps_from_prediction(schedule, "x0", x_t, t, x0)
        return join_output(target(schedule, self.prediction, x0, eps, t), values)


def guided_model_fn(
    apply_fn: Callable,
    params,
    cond,
    null_cond,
    guidance_scale,
    *,
    interval: Optional[Sequence[int]] = None,
    rescale=None,
    schedule: Optional[NoiseSchedule] = None,
    prediction: str = "eps",
) -> jax.tree_util.Partial:
    """Classifier-free guidance (Ho & Salimans 2022) as a sampler model_fn.

    ``apply_fn(params, x_t, t, cond) -> output`` is evaluated once on the doubled batch
    [x_t; x_t] with conditions [cond; null_cond] (pytrees of [B, ...] arrays, e.g. labels
    and the null label), and the output is w * cond_out + (1 - w) * uncond_out: w = 0 is
    exactly the unconditional model, w = 1 exactly the conditional one, w > 1 guides.
    Combining outputs is the same as combining eps (or x0) for any ``prediction``: the
    conversions are affine in the output at fixed (x_t, t). A 2C-channel output (learned
    variance) is combined in its first C channels; its last C are the conditional one's.

    guidance_scale: scalar or per-example [B]; like params and cond it is a traced leaf,
    so changing it never recompiles. interval = (t_lo, t_hi): guide only at schedule
    indices t_lo <= t <= t_hi and use the conditional model (w = 1) elsewhere
    (Kynkaanniemi et al. 2024, guidance in a limited interval); traced too. rescale = phi
    in [0, 1] (needs ``schedule``): guidance rescale of Lin et al. 2024 (sec. 3.4) on the
    x0 prediction. ``apply_fn`` is the static part of the jit key: pass the same object
    each time (a new lambda per call recompiles).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    if rescale is not None and schedule is None:
        raise ValueError("guidance rescale needs the schedule (to form x0 predictions)")
    if interval is not None:
        interval = jnp.asarray(interval, jnp.int32)
        if interval.shape != (2,):
            raise ValueError(f"interval must be (t_lo, t_hi), got shape {interval.shape}")
    return jax.tree_util.Partial(
        _Guided(apply_fn, prediction),
        params,
        cond,
        null_cond,
        jnp.asarray(guidance_scale, jnp.float32),
        interval,
        None if rescale is None else jnp.asarray(rescale, jnp.float32),
        schedule if rescale is not None else None,
    )


@dataclasses.dataclass(frozen=True)
class _GradientGuided:
    """The gradient-guided model_fn's function (static)."""

    prediction: str

    def __call__(self, model_fn, grad_fn, scale, schedule, x_t, t):
        out, values = split_output(x_t, model_fn(x_t, t).astype(x_t.dtype))
        x0, eps = x0_eps_from_prediction(schedule, self.prediction, x_t, t, out)
        alpha, sigma = sqrt_alpha_bar(schedule, t, x_t.ndim)
        eps = eps - _per_example(scale, x_t.ndim) * sigma * grad_fn(x_t, t).astype(x_t.dtype)
        x0 = (x_t - sigma * eps) / alpha
        return join_output(target(schedule, self.prediction, x0, eps, t), values)


def gradient_guided_model_fn(
    model_fn, grad_fn, scale, schedule: NoiseSchedule, prediction: str = "eps"
) -> jax.tree_util.Partial:
    """Classifier / CLIP guidance as a sampler model_fn: the score is shifted by
    ``scale`` times the gradient ``grad_fn(x_t, t)`` of a log-probability (or of a
    similarity) with respect to x_t, i.e. eps' = eps - scale * sqrt(1 - a_bar_t) * grad
    (Dhariwal & Nichol 2021, Algorithm 2 with eps; GLIDE eq. 3 for CLIP), and the output
    is re-expressed in ``prediction``. scale = 0 gives ``model_fn`` (exactly for eps
    prediction, to float rounding for x0 and v, which go through eps); scale is
    traced (scalar or per-example [B]), so a new scale never recompiles. ``model_fn``
    (e.g. a classifier-free-guided model) and ``grad_fn`` should be
    ``jax.tree_util.Partial``s so their parameters are traced too."""
    check_choice("prediction", prediction, PREDICTIONS)
    return jax.tree_util.Partial(
        _GradientGuided(prediction), model_fn, grad_fn, jnp.asarray(scale, jnp.float32), schedule
    )
