"""Training objective of the KL-regularised autoencoder of latent diffusion (Rombach et al.
2022, sec. 3 and appendix G) and its train step; the model (``models.autoencoder``) knows
nothing of this.

Loss per image, with z = mean + exp(logvar / 2) * noise drawn from q(z | x):

  l1_weight * mean|x - x'| + l2_weight * mean (x - x')^2 + kl_weight * KL(q(z|x) || N(0, I)) / P

where the means run over the P = H * W * C pixels of x and the KL is summed over the latent
elements. LDM sums the reconstruction error over pixels and adds ``kl_weight`` times the
summed KL; dividing both by P gives the same optimum and the same meaning to ``kl_weight``
(LDM uses ~1e-6) while keeping the loss, and so the gradient norm that ``optim.grad_clip_norm``
clips, independent of the image size. The perceptual (LPIPS) and adversarial terms of LDM
need a pretrained network that cannot be downloaded here; they are left out.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import objectives, steps


def kl_to_standard_normal(mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example [B], summed over all other axes."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=1)


def encode(model, params, x):
    """(mean, logvar) of q(z | x) for images x [B, H, W, C] in [-1, 1]."""
    return model.apply({"params": params}, x, method="encode")


def decode(model, params, z):
    """Images [B, H, W, C] (about [-1, 1]) for latents z."""
    return model.apply({"params": params}, z, method="decode")


def reconstruct(model, params, x):
    """decode(mean of q(z | x)): the deterministic reconstruction used for evaluation."""
    mean, _ = encode(model, params, x)
    return decode(model, params, mean)


def autoencoder_loss(
    model,
    params,
    batch: dict,
    rng,
    *,
    l1_weight: float,
    l2_weight: float,
    kl_weight: float,
    example_ids: Optional[jnp.ndarray] = None,
):
    """The loss of the module docstring, averaged over the batch, and per-batch metrics
    (recon_l1, recon_mse, kl: means over the batch; kl summed over latent elements).

    The posterior noise of example i is drawn from ``fold_in(rng, example_ids[i])``, so a
    data-parallel caller passing global ids gets the same draws on any device layout.
    """
    x = batch["image"]
    if example_ids is None:
        example_ids = jnp.arange(x.shape[0])
    mean, logvar = encode(model, params, x)
    keys = objectives.per_example_keys(rng, example_ids)
    noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
    z = mean + jnp.exp(0.5 * logvar) * noise.astype(mean.dtype)
    err = (decode(model, params, z).astype(jnp.float32) - x).reshape(x.shape[0], -1)
    l1 = jnp.mean(jnp.abs(err), axis=1)
    mse = jnp.mean(jnp.square(err), axis=1)
    kl = kl_to_standard_normal(mean.astype(jnp.float32), logvar.astype(jnp.float32))
    per_example = l1_weight * l1 + l2_weight * mse + kl_weight * kl / err.shape[1]
    aux = {"recon_l1": jnp.mean(l1), "recon_mse": jnp.mean(mse), "kl": jnp.mean(kl)}
    return jnp.mean(per_example), aux


def make_train_step(model, tx: optax.GradientTransformation, config, *, axis_name=None):
    """``train_step(state, batch) -> (state, metrics)`` for an autoencoder; the same
    contract as ``steps.make_train_step`` (pmap: ``axis_name`` averages gradients and
    metrics; a non-finite loss or gradient skips the update, ``metrics["finite"]`` 0)."""
    obj = config.objective

    def train_step(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        ids = steps.global_example_ids(batch["image"].shape[0], axis_name)

        def loss_fn(params):
            return autoencoder_loss(
                model,
                params,
                batch,
                rng,
                l1_weight=obj.recon_l1_weight,
                l2_weight=obj.recon_l2_weight,
                kl_weight=obj.kl_weight,
                example_ids=ids,
            )

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return steps.finish_update(state, loss, grads, aux, tx, config.optim, axis_name)

    return train_step
