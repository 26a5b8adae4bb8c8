"""Text-to-image on glyphs in pixel space with a small UNet: convolutions at 32x32, 16x16
and 8x8 (32, 64, 64 channels, one ResBlock per level), Stable-Diffusion transformer blocks
(self-attention, cross-attention on the caption tokens, feed-forward) at 8x8 and in the
middle, and the caption encoder of configs/glyphs_ldm_text.py trained with it.

Why: both DiTs (on the f = 4 latents with 2x2 patches, and on pixels with 8x8 patches)
follow colour and size words but draw no glyph shapes at 2,400 steps, and a noise-aware
classifier on the latents never reads the character even at t = 0 (docs/text.md). A
glyph's strokes are 2-3 px wide: finer than any of those models' 16 tokens. This model
sees every pixel through 3x3 convolutions, as the judge that reads the characters does.
It costs ~4x the DiT per image on the 2-core CPU, so it trains on batches of 64.

Measured (docs/text.md): 1,200 steps of 64 (~0.93 steps/s alone, ~22 min; 52 min shared),
1.92 GB peak RSS. No shapes either: character, family, weight and slant at chance, colour
and size words followed, and the still-grainy backgrounds put the background colour at
chance too (12-15%).

  python -m diffusion_jax.main --config=configs/glyphs_unet_text.py --workdir=runs/glyphs_unet
  python -m diffusion_jax.evaluate_text --workdir=runs/glyphs_unet --num_samples=500
"""

from configs import glyphs_pixel_text


def get_config():
    c = glyphs_pixel_text.get_config()
    c.model.name = "unet"
    c.model.unet.update(
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        num_heads=4,
        dropout=0.0,
        norm_groups=8,
    )
    c.objective.prediction = "eps"
    c.objective.weighting = "uniform"
    c.optim.learning_rate = 5e-4
    c.train.batch_size = 64
    c.train.num_steps = 1200
    c.eval.every_steps = 600
    c.ckpt.every_steps = 300
    return c
