"""Text-to-image on glyphs in pixel space: the DiT of configs/glyphs_ldm_text.py (same
width, depth, text encoder, recipe and steps) on the 32x32x3 pixels themselves, with 8x8
patches, so it has the latent model's 16 tokens and about its cost per step.

Why: a glyph is a background colour, a foreground colour and a shape mask. In pixels that
is a product the denoiser can learn shape by shape; the f = 4 autoencoder squeezes every
4x4x3 patch into 4 numbers, so a patch on a stroke edge must carry two colours and a
partial mask at once, and shapes come out entangled with colours (docs/text.md).

It predicts x0, with min-SNR weighting (Hang et al. 2023: the x0 error weighted by
min(SNR, 5)). With 8x8x3 = 192 numbers per token and a 192-wide model, an eps (or v) target
asks the network to carry each token's noise through its residual stream; the clean patch
(two colours and a mask) is far simpler. Li & He 2025 ("Back to Basics: Let Denoising
Generative Models Denoise") found large-patch pixel transformers work with x prediction
and fail with eps or v.

Measured (docs/text.md): 2,400 steps in 22.5 min wall alone, 1.41 GB; like the latent model
it follows colour and size words (fg 59-73%, bg 82-85%, size 71-77% over CFG 1-4) and
draws no shapes (character, family, weight, slant at chance): the autoencoder is not what
keeps shapes out.

  python -m diffusion_jax.main --config=configs/glyphs_pixel_text.py --workdir=runs/glyphs_pixel
  python -m diffusion_jax.evaluate_text --workdir=runs/glyphs_pixel --num_samples=500
"""

from configs import glyphs_ldm_text


def get_config():
    c = glyphs_ldm_text.get_config()
    c.latent.autoencoder = ""
    c.data.name = "glyphs"
    c.data.data_dir = ""
    c.data.image_size = 32
    c.model.dit.patch_size = 8
    c.sampler.clip_x0 = True  # pixels live in [-1, 1]
    c.objective.prediction = "x0"
    c.objective.weighting = "min_snr"
    return c
