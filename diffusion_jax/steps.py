"""Pure step functions: the training update and the sampling call. Parallel wrappers
(jit over a mesh, pmap) live in parallel.py; nothing here knows about devices except the
optional ``axis_name`` collective of the pmap path.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import objectives, samplers
from diffusion_jax.schedules import NoiseSchedule
from diffusion_jax.state import TrainState, ema_decay_at

# per-timestep loss is logged in this many equal-width buckets of t
NUM_LOSS_BUCKETS = 10
SAMPLERS = ("ddpm", "ddim")


def drop_labels(rng, labels, example_ids, p: float, null_label: int):
    """Classifier-free guidance training: replace each label by the null class with
    probability ``p``, drawn per example id (layout-independent like the noise)."""
    keys = objectives.per_example_keys(rng, example_ids)
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, p))(keys)
    return jnp.where(drop, null_label, labels)


def make_train_step(model, tx: optax.GradientTransformation, schedule: NoiseSchedule, config,
                    *, axis_name: Optional[str] = None) -> Callable:
    """``train_step(state, batch) -> (state, metrics)`` for one global batch.

    With ``axis_name`` (pmap) the batch is this device's slice, gradients and metrics are
    averaged over the axis and example ids are offset by the device index, so the update
    equals the single-program (jit) one. A step whose loss or gradient is not finite
    leaves params, EMA and optimizer state untouched (``metrics["finite"]`` is 0).
    """
    obj, model_cfg = config.objective, config.model
    conditional = model_cfg.num_classes > 0

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        rng_loss, rng_labels = jax.random.split(rng)
        local_b = batch["image"].shape[0]
        device = jax.lax.axis_index(axis_name) if axis_name else 0
        ids = device * local_b + jnp.arange(local_b)
        batch = dict(batch)
        if conditional:
            batch["label"] = drop_labels(rng_labels, batch["label"], ids, obj.label_dropout,
                                         model_cfg.num_classes)
        else:
            batch.pop("label", None)

        def apply_fn(params, x_t, t, y, rng_model):
            # dropout masks: decorrelated across pmap devices
            rng_model = jax.random.fold_in(rng_model, device)
            return model.apply({"params": params}, x_t, t, y, train=True,
                               rngs={"dropout": rng_model})

        def loss_fn(params):
            return objectives.diffusion_loss(
                apply_fn, params, schedule, batch, rng_loss, prediction=obj.prediction,
                weighting=obj.weighting, min_snr_gamma=obj.min_snr_gamma, example_ids=ids)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        bucket = aux["t"] * NUM_LOSS_BUCKETS // schedule.num_timesteps
        bucket_sum = jax.ops.segment_sum(aux["loss_per_example"], bucket, NUM_LOSS_BUCKETS)
        bucket_count = jax.ops.segment_sum(jnp.ones_like(bucket, jnp.float32), bucket,
                                           NUM_LOSS_BUCKETS)
        if axis_name:
            grads, loss = jax.lax.pmean((grads, loss), axis_name)
            bucket_sum, bucket_count = jax.lax.psum((bucket_sum, bucket_count), axis_name)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(config.optim.ema_decay, config.optim.ema_warmup, state.step)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                  state.ema_params, params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            ema_params=keep(ema_params, state.ema_params),
            opt_state=keep(opt_state, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
                   "loss_bucket_sum": bucket_sum, "loss_bucket_count": bucket_count}
        return new_state, metrics

    return train_step


def scan_steps(train_step: Callable) -> Callable:
    """Several updates per dispatch: ``(state, batches[k, ...]) -> (state, metrics[k, ...])``.
    Cuts Python dispatch overhead for small models; identical math to k single steps."""

    def multi_step(state, batches):
        return jax.lax.scan(train_step, state, batches)

    return multi_step


def make_sample_fn(model, schedule: NoiseSchedule, config, shape) -> Callable:
    """``sample(params, rng, labels) -> images [B, H, W, C]`` with the configured sampler.

    ``labels`` [B] (ignored by unconditional models); with ``sampler.guidance_scale`` w
    the prediction is uncond + w * (cond - uncond) from one batched forward pass
    (classifier-free guidance, Ho & Salimans 2022); w = 1 is the plain conditional model.
    """
    s_cfg, model_cfg = config.sampler, config.model
    conditional = model_cfg.num_classes > 0
    prediction = config.objective.prediction

    def sample(params, rng, labels, guidance_scale):
        def model_fn(x_t, t):
            if not conditional:
                return model.apply({"params": params}, x_t, t, None, train=False)
            null = jnp.full_like(labels, model_cfg.num_classes)
            both = model.apply({"params": params}, jnp.concatenate([x_t, x_t]),
                               jnp.concatenate([t, t]), jnp.concatenate([labels, null]),
                               train=False)
            cond, uncond = jnp.split(both, 2)
            return uncond + guidance_scale * (cond - uncond)

        if s_cfg.name == "ddpm":
            return samplers.ddpm_sample(model_fn, schedule, rng, shape, prediction=prediction,
                                        variance=s_cfg.variance, clip_x0=s_cfg.clip_x0)
        return samplers.ddim_sample(model_fn, schedule, rng, shape, num_steps=s_cfg.num_steps,
                                    eta=s_cfg.eta, prediction=prediction,
                                    spacing=s_cfg.spacing, clip_x0=s_cfg.clip_x0)

    objectives.check_choice("sampler.name", s_cfg.name, SAMPLERS)
    return sample
