"""Import published PyTorch weights: diffusers ``UNet2DModel`` / ``AutoencoderKL`` and the
official DiT checkpoints, as (model, params) or as a workdir (``python -m
diffusion_jax.convert``, see ``__main__.py``) that sample, evaluate, encode and training
take like any other.

  from diffusion_jax.convert import load_diffusers, load_dit
  model, params = load_diffusers("ddpm-cifar10-32")     # save_pretrained's directory
  eps = model.apply({"params": params}, x_nhwc, t)

One module per job: ``weight_files`` reads safetensors / torch zip archives without
running code, ``mapping`` fills a parameter tree key by key with checked shapes,
``diffusers`` and ``dit`` translate each family's config and names.
"""

from diffusion_jax.convert.diffusers import convert_diffusers, load_diffusers
from diffusion_jax.convert.dit import convert_dit, load_dit
from diffusion_jax.convert.weight_files import ConversionError, read_weights

__all__ = (
    "ConversionError",
    "convert_diffusers",
    "convert_dit",
    "load_diffusers",
    "load_dit",
    "read_weights",
)
