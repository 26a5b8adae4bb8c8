"""Pure step functions: the training update and the sampling call. Parallel wrappers
(jit over a mesh, pmap) live in parallel.py; nothing here knows about devices except the
optional ``axis_name`` collective of the pmap path.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import conditioning, editing, guidance, objectives, samplers
from diffusion_jax.schedules import NoiseSchedule
from diffusion_jax.state import TrainState, ema_decay_at

# per-timestep loss is logged in this many equal-width buckets of t
NUM_LOSS_BUCKETS = 10
SAMPLERS = samplers.SAMPLERS  # valid config.sampler.name values


def global_example_ids(local_batch: int, axis_name: Optional[str] = None):
    """Ids [b] of this device's examples in the global batch: 0..B-1 under jit (one
    program sees the whole batch), offset by the device index under pmap. Every random
    draw of an example is keyed by its id, so it is the same on any layout."""
    device = jax.lax.axis_index(axis_name) if axis_name else 0
    return device * local_batch + jnp.arange(local_batch)


def loss_buckets(t, loss_per_example, num_timesteps: int):
    """(sum, count) [NUM_LOSS_BUCKETS] of the per-example losses in equal-width buckets of
    t: bucket b holds b·T/N <= t < (b+1)·T/N."""
    bucket = t * NUM_LOSS_BUCKETS // num_timesteps
    ones = jnp.ones_like(loss_per_example, jnp.float32)
    return (
        jax.ops.segment_sum(loss_per_example, bucket, NUM_LOSS_BUCKETS),
        jax.ops.segment_sum(ones, bucket, NUM_LOSS_BUCKETS),
    )


def apply_per_example(model, params, x, t, y, rng, example_ids):
    """``model.apply(..., train=True)`` with the model's randomness (dropout) drawn from
    ``fold_in(rng, example_id)`` per example, like the noise and timesteps: the masks of
    example i are the same on 1 or N devices, under jit or pmap, so a run gives the same
    numbers on any layout. The model is vmapped over single examples (it has no
    cross-example layer such as batch norm), which XLA folds back into batched
    convolutions and matmuls; measured cost on the digits UNet train step: ~6%."""
    keys = objectives.per_example_keys(rng, example_ids)

    def one(x1, t1, y1, key):
        y1 = jax.tree.map(lambda a: a[None], y1)  # labels, tokens or a controlled dict
        out = model.apply(
            {"params": params}, x1[None], t1[None], y1, train=True, rngs={"dropout": key}
        )
        return out[0]

    return jax.vmap(one)(x, t, y, keys)


def apply_gradients(
    state: TrainState, grads, tx: optax.GradientTransformation, optim_cfg
) -> TrainState:
    """One optimizer update of ``state.params`` and the EMA after it (``step`` unchanged)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(optim_cfg.ema_decay, optim_cfg.ema_warmup, state.step)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return state.replace(params=params, ema_params=ema_params, opt_state=opt_state)


def skip_if_not_finite(finite, update: Callable, state: TrainState) -> TrainState:
    """``update(state)`` if ``finite`` else ``state``, untouched.

    A branch, not a ``jnp.where`` per leaf: selecting between the old and the new state
    costs a pass over all of params, EMA and optimizer state (benchmarks/bench_update.py,
    DDPM CIFAR-10 on a 2-core CPU: a 190 ms update becomes 350 ms, vs 205 ms with the
    branch). Under pmap ``finite`` is computed from the averaged loss and gradients, so
    every device takes the same branch.
    """
    return jax.lax.cond(finite, update, lambda s: s, state)


def finish_update(
    state: TrainState,
    loss,
    grads,
    metrics: dict,
    tx: optax.GradientTransformation,
    optim_cfg,
    axis_name: Optional[str] = None,
    sums: Optional[dict] = None,
):
    """The end of every train step (diffusion, autoencoder): under pmap average loss,
    gradients and ``metrics`` and sum ``sums`` over ``axis_name``; then the gradient norm,
    the update unless the loss or gradient is not finite, and step + 1. Returns
    ``(state, metrics + sums + loss, grad_norm, finite)``."""
    sums = sums or {}
    if axis_name:
        grads, loss, metrics = jax.lax.pmean((grads, loss, metrics), axis_name)
        sums = jax.lax.psum(sums, axis_name)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    update = lambda s: apply_gradients(s, grads, tx, optim_cfg)
    new_state = skip_if_not_finite(finite, update, state).replace(step=state.step + 1)
    out = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    return new_state, {**metrics, **sums, **out}


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    schedule: NoiseSchedule,
    config,
    *,
    axis_name: Optional[str] = None,
) -> Callable:
    """``train_step(state, batch) -> (state, metrics)`` for one global batch.

    With ``axis_name`` (pmap) the batch is this device's slice, gradients and metrics are
    averaged over the axis and example ids are offset by the device index, so the update
    equals the single-program (jit) one. A step whose loss or gradient is not finite
    leaves params, EMA and optimizer state untouched (``metrics["finite"]`` is 0).
    """
    obj, model_cfg = config.objective, config.model
    null = conditioning.null_id(model_cfg)
    # Only a model with dropout draws randomness; without it the per-example vmap would
    # cost time for nothing (digits UNet step at dropout 0: 0.498 vs 0.443 s, ~12%).
    random_model = model_cfg.get(model_cfg.name, {}).get("dropout", 0.0) > 0
    # Learned variance and the hybrid loss (objectives.diffusion_loss); a config from
    # before these keys trains as it did.
    learn_sigma = bool(obj.get("learn_sigma", False))
    vlb_weight = float(obj.get("vlb_weight", 0.001))

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        rng_loss, rng_labels = jax.random.split(rng)
        ids = global_example_ids(batch["image"].shape[0], axis_name)
        y = conditioning.from_batch(model_cfg, batch)
        if y is not None:  # labels or captions, dropped for classifier-free guidance
            y = conditioning.drop(rng_labels, y, ids, obj.label_dropout, null)
        batch = {"image": batch["image"], "condition": y}

        def apply_fn(params, x_t, t, y, rng_model):
            if not random_model:
                return model.apply({"params": params}, x_t, t, y, train=True)
            return apply_per_example(model, params, x_t, t, y, rng_model, ids)

        def loss_fn(params):
            return objectives.diffusion_loss(
                apply_fn,
                params,
                schedule,
                batch,
                rng_loss,
                prediction=obj.prediction,
                weighting=obj.weighting,
                min_snr_gamma=obj.min_snr_gamma,
                example_ids=ids,
                learn_sigma=learn_sigma,
                vlb_weight=vlb_weight,
            )

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        bucket_sum, bucket_count = loss_buckets(
            aux["t"], aux["loss_per_example"], schedule.num_timesteps
        )
        sums = {"loss_bucket_sum": bucket_sum, "loss_bucket_count": bucket_count}
        means = {}
        if "vlb_per_example" in aux:  # learned sigma: the VLB term (bits/dim) on its own
            means["vlb"] = jnp.mean(aux["vlb_per_example"])
        return finish_update(state, loss, grads, means, tx, config.optim, axis_name, sums)

    return train_step


def sampler_options(config) -> dict:
    """The keyword arguments of ``samplers.sample`` that ``config.sampler`` sets."""
    s_cfg = config.sampler
    return dict(
        sampler=s_cfg.name,
        num_steps=s_cfg.num_steps,
        eta=s_cfg.eta,
        spacing=s_cfg.spacing,
        variance=s_cfg.variance,
        respacing=s_cfg.respacing,
        lambda_min=s_cfg.lambda_min,
        prediction=config.objective.prediction,
        clip_x0=s_cfg.clip_x0,
    )


def make_sample_fn(
    model,
    schedule: NoiseSchedule,
    config,
    shape,
    *,
    mode: str = "sample",
    strength: float = 0.5,
    jump_length: int = 10,
    jump_n_sample: int = 1,
    guidance_interval=None,
    guidance_rescale=None,
) -> Callable:
    """``sample(params, rng, labels, guidance_scale, images=None, mask=None,
    source_labels=None, negative=None) -> images [B, H, W, C]`` with the configured sampler.

    ``labels``: the condition (conditioning.py): labels [B] or caption tokens [B, L];
    ignored by unconditional models. guidance_scale w gives the prediction
    w * cond + (1 - w) * uncond from one batched forward pass (classifier-free guidance,
    Ho & Salimans 2022; guidance.guided_model_fn): w = 1 is the plain conditional model,
    w = 0 the unconditional one; a model with ``model.guidance_input`` gets w as an input
    instead (one forward per step; ``negative`` unused). ``negative`` (same shape as
    labels; default the null condition) replaces the unconditional branch: a negative
    prompt. params, rng, labels,
    negative, w, images and mask are traced: new values never recompile. guidance_interval = (t_lo, t_hi) and
    guidance_rescale = phi are passed to guided_model_fn.

    mode (samplers.MODES) picks what ``images`` [B, H, W, C] in [-1, 1] are for:
      sample:  ignored; sample from noise with config.sampler.
      img2img: SDEdit with ``strength`` in [0, 1] (editing.img2img).
      inpaint: keep ``images`` where ``mask`` (broadcastable, 1 = known) is 1 and fill in
               the rest (editing.inpaint; jump_n_sample > 1 adds RePaint resampling).
      invert:  DDIM-invert ``images`` under ``source_labels`` (default: labels) without
               guidance, regenerate under ``labels`` with guidance w (editing.ddim_edit;
               always DDIM with config.sampler.num_steps/spacing, no x0 clipping, rng
               unused). source_labels == labels is the reconstruction round trip.
    """
    s_cfg, model_cfg = config.sampler, config.model
    # a ControlNet's condition carries its control even over an unconditional base
    conditional = conditioning.kind(model_cfg) != "none" or getattr(model, "controlled", False)
    prediction = config.objective.prediction
    objectives.check_choice("sampler.name", s_cfg.name, SAMPLERS)
    objectives.check_choice("mode", mode, samplers.MODES)
    options = sampler_options(config)

    # One function object per make_sample_fn call: the samplers' jit caches key on it.
    def apply_fn(params, x_t, t, y):
        return model.apply({"params": params}, x_t, t, y, train=False)

    def apply_uncond(params, x_t, t):
        return apply_fn(params, x_t, t, None)

    def apply_scale_input(params, labels, guidance_scale, x_t, t):
        w = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (x_t.shape[0],))
        return apply_fn(params, x_t, t, {"y": labels, "w": w})

    def model_fn(params, labels, guidance_scale, negative=None):
        if not conditional:
            return jax.tree_util.Partial(apply_uncond, params)
        if model_cfg.get("guidance_input", False):  # w is an input: one forward, no CFG
            return jax.tree_util.Partial(apply_scale_input, params, labels, guidance_scale)
        if negative is None:
            negative = conditioning.null_like(model_cfg, labels)
        return guidance.guided_model_fn(
            apply_fn,
            params,
            labels,
            negative,
            guidance_scale,
            interval=guidance_interval,
            rescale=guidance_rescale,
            schedule=schedule,
            prediction=prediction,
        )

    def sample(
        params,
        rng,
        labels,
        guidance_scale,
        images=None,
        mask=None,
        source_labels=None,
        negative=None,
    ):
        fn = model_fn(params, labels, guidance_scale, negative)
        if mode == "sample":
            return samplers.sample(fn, schedule, rng, shape, **options)
        if images is None:
            raise ValueError(f"mode {mode!r} needs input images")
        if mode == "img2img":
            return editing.img2img(fn, schedule, rng, images, strength=strength, **options)
        if mode == "inpaint":
            if mask is None:
                raise ValueError("mode 'inpaint' needs a mask (1 = known)")
            return editing.inpaint(
                fn,
                schedule,
                rng,
                images,
                mask,
                jump_length=jump_length,
                jump_n_sample=jump_n_sample,
                **options,
            )
        source = model_fn(params, labels if source_labels is None else source_labels, 1.0)
        return editing.ddim_edit(
            source,
            fn,
            schedule,
            images,
            num_steps=s_cfg.num_steps,
            prediction=prediction,
            spacing=s_cfg.spacing,
            lambda_min=s_cfg.lambda_min,
        )[0]

    return sample
