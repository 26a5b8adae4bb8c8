"""Text-to-image latent diffusion on glyphs: a DiT with PixArt-alpha cross-attention on the
8x8x4 latents of configs/glyphs_autoencoder.py, conditioned on captions through a 2-layer
transformer text encoder trained with it; caption dropout 0.1 for classifier-free
guidance. (Pixel space at 32x32 measured 1.6 s per step of 64 on the 2-core CPU, with
another job on the cores, for the smallest UNet that attends at 8x8: too slow for a
20-minute budget; this is the latent path.)

Measured (README, docs/text.md): 2,400 steps, ~23 min at the 1.75 steps/s of an unloaded
stretch; the model follows colour and size words (fg 61-66%, bg 85%, size 78-93% over
CFG 1-4) but not yet glyph shapes (character, family, weight, slant at chance).

  python -m diffusion_jax.main --config=configs/glyphs_autoencoder.py --workdir=runs/glyphs_ae
  python -m diffusion_jax.encode --autoencoder=runs/glyphs_ae --out=runs/glyphs_latents
  python -m diffusion_jax.main --config=configs/glyphs_ldm_text.py --workdir=runs/glyphs_text
  python -m diffusion_jax.sample --workdir=runs/glyphs_text --num_samples=16 \
      --prompt="a large bold upright red serif letter A on the blue background"

Ablation: --config.model.text.conditioning=pooled (the mean caption embedding added to the
timestep embedding, the class-label path, instead of cross-attention).
"""

from configs import fashion_ldm
from diffusion_jax.datasets import glyph_render
from diffusion_jax.tokenizer import SPECIAL_TOKENS


def get_config():
    c = fashion_ldm.get_config()
    c.latent.autoencoder = "runs/glyphs_ae"
    c.data.data_dir = "runs/glyphs_latents"
    c.model.num_classes = 0
    c.model.text.update(
        vocab_size=len(glyph_render.VOCABULARY) + len(SPECIAL_TOKENS),
        max_length=16,
        width=128,
        depth=2,
        num_heads=4,
        conditioning="cross",
    )
    c.objective.label_dropout = 0.1
    c.train.num_steps = 2400
    c.eval.every_steps = 1200
    c.eval.num_samples = 64
    c.eval.metrics_every_steps = 0  # caption following is measured after training
    c.ckpt.every_steps = 600
    return c
