"""Class-conditional pixel-space diffusion on Fashion-MNIST: the latent DiT of
configs/fashion_ldm.py (same width, depth, recipe and steps) on the 32x32x1 padded pixels,
with 4x4 patches (64 tokens, vs 16 tokens of 2x2 patches on the 8x8x4 latents). It is the
pixel-space baseline of the latent pipeline (docs/latent.md: step time, memory and
quality side by side).

  python -m diffusion_jax.main --config=configs/fashion_pixel_dit.py --workdir=runs/fashion_pixel
"""

from configs import fashion_ldm


def get_config():
    c = fashion_ldm.get_config()
    c.latent.autoencoder = ""
    c.data.name = "fashion_mnist"
    c.data.data_dir = ""
    c.data.image_size = 32
    c.data.resize_method = "pad"
    c.model.dit.patch_size = 4
    c.sampler.clip_x0 = True  # pixels live in [-1, 1]
    return c
