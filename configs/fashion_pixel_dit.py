"""Class-conditional pixel-space diffusion on Fashion-MNIST: the latent DiT of
configs/fashion_ldm.py (same width, depth, recipe and steps) on the 32x32x1 padded pixels,
with 4x4 patches (64 tokens, vs 16 tokens of 2x2 patches on the 8x8x4 latents). It is the
pixel-space baseline of the latent pipeline (README: step time, memory and quality side
by side).

Measured (2-core AMD EPYC guest, alone, seed 0, in-loop metrics every 500 steps: 1,000
samples, DDIM-50, guidance 2): 1.50 s per step (latent: 0.37), 49.9 min of training clock,
76.8 min wall, 2.84 GB peak RSS; class accuracy 80.5 / 88.4 / 88.8 / 91.1% and FID 14.8 /
6.72 / 5.56 / 5.01x the floor at steps 500 / 1,000 / 1,500 / 2,000. The latent model:
93.1% at step 1,000 and 96.5%, 4.65x at 2,000 (12.4 min).

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
