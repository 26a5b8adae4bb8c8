"""Training state: one pytree holding everything a resume needs, and its creation.

The state holds only arrays (no functions), so orbax can save it and restore it onto any
sharding; the model and optimizer definitions live outside it and are rebuilt from the
config.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util

from diffusion_jax.models import abstract_inputs


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 PRNG key; per-step keys are fold_in(rng, step)


def make_lr_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant or cosine decay to ``final_lr_fraction``."""
    lr, warmup = optim_cfg.learning_rate, int(optim_cfg.warmup_steps)
    if optim_cfg.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(num_steps, warmup + 1), end_value=lr * optim_cfg.final_lr_fraction
        )
    if optim_cfg.decay == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    raise ValueError(f"unknown optim.decay {optim_cfg.decay!r}; valid: ['constant', 'cosine']")


def make_optimizer(optim_cfg, num_steps: int) -> optax.GradientTransformation:
    """AdamW on the learning-rate schedule, after optional global-norm clipping."""
    chain = []
    if optim_cfg.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
    chain.append(
        optax.adamw(
            make_lr_schedule(optim_cfg, num_steps),
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
        )
    )
    return optax.chain(*chain)


def ema_decay_at(decay: float, warmup: bool, step):
    """EMA decay at ``step``: the configured one, ramped as (1 + step)/(10 + step) when
    ``warmup`` so the EMA of a short run is not dominated by the random init."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)


def create_train_state(
    model, tx: optax.GradientTransformation, image_shape, seed: int, *, out_sharding=None
) -> TrainState:
    """Initialize the state directly onto ``out_sharding`` (e.g. replicated over a mesh),
    so no device ever holds an unsharded copy it doesn't need. The model is initialised on
    zeros of its own inputs (``models.abstract_inputs``: (x, t, y) for a denoiser, (x,)
    for an autoencoder)."""

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        args = jax.tree.map(
            lambda a: jnp.zeros(a.shape, a.dtype), abstract_inputs(model, 1, image_shape)
        )
        params = model.init({"params": init_rng}, *args, train=False)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=params,
            opt_state=tx.init(params),
            rng=state_rng,
        )

    return jax.jit(init, out_shardings=out_sharding)(jax.random.PRNGKey(seed))


def state_from_params(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A step-0 state whose parameters and EMA are ``params`` (imported or teacher
    weights), with a fresh optimizer state and the rng ``create_train_state`` would draw.
    Parameters and EMA are fresh copies: a train step donates the state, and a buffer
    donated twice (as params and as EMA), or still held by the caller (a cached teacher),
    must not be."""
    params = jax.tree.map(jnp.array, params)
    _, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=state_rng,
    )


def complete_params(model, start, image_shape, seed: int):
    """``start`` (e.g. a teacher's weights) completed with a fresh init of the parameters
    ``model`` has and ``start`` lacks (e.g. a guidance-scale embedding a student adds).
    Every parameter of ``start`` must exist in ``model`` with the same shape: a ValueError
    names the first that does not. With nothing missing, ``start`` itself."""
    flat_start = traverse_util.flatten_dict(start, sep="/")
    tx = optax.identity()
    shapes = traverse_util.flatten_dict(
        abstract_train_state(model, tx, image_shape, seed).params, sep="/"
    )
    for path, leaf in flat_start.items():
        if path not in shapes or shapes[path].shape != jnp.shape(leaf):
            got = shapes[path].shape if path in shapes else "no such parameter"
            raise ValueError(
                f"initial parameter {path} {jnp.shape(leaf)} does not fit the model ({got})"
            )
    if set(shapes) == set(flat_start):
        return start
    fresh = create_train_state(model, tx, image_shape, seed).params
    fresh = traverse_util.flatten_dict(jax.device_get(fresh), sep="/")
    return traverse_util.unflatten_dict({**fresh, **flat_start}, sep="/")


def abstract_train_state(model, tx, image_shape, seed: int):
    """Shapes/dtypes of the state without allocating it (for restores and param counts)."""
    return jax.eval_shape(lambda: create_train_state(model, tx, image_shape, seed))
