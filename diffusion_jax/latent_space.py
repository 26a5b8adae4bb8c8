"""Diffusion in an autoencoder's latent space (Rombach et al. 2022): the denoiser trains on a
latent dataset (``datasets/latents.py``, written by ``diffusion_jax.encode``) and everything
that shows or scores images decodes first.

``config.latent.autoencoder`` names the autoencoder workdir ("" = pixel space) and
``config.data`` the latent dataset (``data.name = "latents"``, ``data.data_dir = DIR``). The
dataset's latents.json says which autoencoder (and checkpoint step) encoded it, its
measured ``scale_factor`` and the source pixel dataset; a mismatch is refused in one line.

``wrap_sample_fn`` turns a latent sample function (``steps.make_sample_fn`` on the latent
shape) into one that takes ``(denoiser params, autoencoder params)`` and returns decoded
images: input images of img2img/inpaint/invert are encoded (posterior mean, scaled), an
inpainting mask is brought to the latent grid (a latent pixel is known only when all the
image pixels it covers are known: min-pooling, so the generated region never shrinks) and
the result is decoded. Callers (training's grid and metrics, sample, evaluate) stay as
they are, except for passing the parameter pair.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional

import jax.numpy as jnp

from diffusion_jax import autoencoding
from diffusion_jax.datasets import latents
from diffusion_jax.models import build_model, is_autoencoder


class LatentConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class LatentSpace:
    model: Any  # models.Autoencoder
    params: Any  # its EMA parameters
    scale_factor: float
    metadata: dict  # the latent dataset's latents.json

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factor

    def encode(self, params, images):
        """Scaled latents (posterior mean x scale_factor) of images in [-1, 1]."""
        mean, _ = autoencoding.encode(self.model, params, images)
        return mean * self.scale_factor

    def decode(self, params, z):
        """Images of scaled latents."""
        return autoencoding.decode(self.model, params, z / self.scale_factor)


def metadata_of(config) -> Optional[dict]:
    """The latent dataset's metadata when ``config`` trains on latents, else None; errors
    name the fix when only one of latent.autoencoder / data.name == "latents" is set or
    the dataset was encoded by another autoencoder."""
    autoencoder = config.latent.autoencoder
    on_latents = config.data.name == latents.NAME
    if not autoencoder and not on_latents:
        return None
    if not on_latents:
        raise LatentConfigError(
            f"latent.autoencoder={autoencoder!r} needs a latent dataset: set "
            "--config.data.name=latents --config.data.data_dir=DIR (DIR written by "
            "`python -m diffusion_jax.encode`)"
        )
    data_dir = os.path.expanduser(config.data.data_dir)
    if not data_dir:
        raise LatentConfigError("data.name=latents needs data.data_dir: the encoded dataset")
    metadata = latents.read_metadata(data_dir)
    if not autoencoder:
        raise LatentConfigError(
            f"data.name=latents needs latent.autoencoder to decode samples: set "
            f"--config.latent.autoencoder={metadata['autoencoder']} (the workdir that "
            f"encoded {data_dir})"
        )
    if not metadata.get("scale_factor"):
        raise LatentConfigError(
            f"the latent dataset in {data_dir} has no measured scale_factor (its encoding "
            "did not finish); run the same `python -m diffusion_jax.encode` command again"
        )
    if os.path.abspath(autoencoder) != metadata["autoencoder"]:
        raise LatentConfigError(
            f"latent.autoencoder={autoencoder!r} did not encode {data_dir} (that was "
            f"{metadata['autoencoder']}); set --config.latent.autoencoder to it or "
            "re-encode the dataset with this autoencoder"
        )
    return metadata


def load(config) -> Optional[LatentSpace]:
    """The run's latent space (the autoencoder's checkpoint the dataset was encoded with),
    or None for a pixel-space run."""
    metadata = metadata_of(config)
    if metadata is None:
        return None

    model, params = _autoencoder(
        os.path.abspath(config.latent.autoencoder), metadata["autoencoder_step"]
    )
    return LatentSpace(model, params, float(metadata["scale_factor"]), metadata)


@functools.lru_cache(maxsize=2)
def _autoencoder(path: str, step: int):
    """(model, EMA params) of an autoencoder workdir's checkpoint ``step``, read once per
    process (a run's sample grid and its metrics both decode with it)."""
    from diffusion_jax import workdir

    ae_config = workdir.load_config(path)
    if not is_autoencoder(ae_config.model):
        raise LatentConfigError(
            f"latent.autoencoder={path!r} holds a {ae_config.model.name!r} model, not an "
            "autoencoder"
        )
    model, _, state = workdir.load_state(path, ae_config, step=step)
    return model, state.ema_params


def pixel_data_config(config) -> dict:
    """The data config of the images a run's samples are compared with: the source dataset
    of a latent run (for its feature net and reference statistics), else ``config.data``."""
    metadata = metadata_of(config)
    if metadata is None:
        return config.data.to_dict()
    return {**config.data.to_dict(), "data_dir": "", **metadata["source"], "split": "train"}


def pixel_shape(config, spec) -> tuple:
    """The shape (H, W, C) of the images a run shows: ``spec``'s in pixel space; for a
    latent run, the latent grid times the autoencoder's factor with its image channels
    (from the autoencoder's config: the source dataset need not be on this machine)."""
    if metadata_of(config) is None:
        return tuple(spec.image_shape)
    from diffusion_jax import workdir

    autoencoder = build_model(workdir.load_config(config.latent.autoencoder).model)
    height, width, _ = spec.image_shape
    f = autoencoder.downsample_factor
    return height * f, width * f, autoencoder.image_channels


def downsample_mask(mask, factor: int):
    """A mask [..., H, W, C] (1 = known) on the latent grid [..., H/f, W/f, 1]: min-pooled
    over each f x f block and the channels."""
    *lead, h, w, c = mask.shape
    blocks = mask.reshape(*lead, h // factor, factor, w // factor, factor, c)
    return jnp.min(blocks, axis=(-4, -2, -1))[..., None]


def wrap_sample_fn(sample_fn: Callable, space: LatentSpace) -> Callable:
    """``sample((denoiser_params, autoencoder_params), rng, labels, w, images, mask,
    source_labels, negative) -> decoded images`` around a latent ``sample_fn``."""

    def sample(params, rng, labels, guidance_scale, images=None, mask=None, *conditions):
        denoiser, autoencoder = params  # conditions: source labels, negative condition
        if images is not None:
            images = space.encode(autoencoder, images)
        if mask is not None:
            mask = downsample_mask(mask, space.downsample_factor)
        z = sample_fn(denoiser, rng, labels, guidance_scale, images, mask, *conditions)
        return space.decode(autoencoder, z)

    return sample
