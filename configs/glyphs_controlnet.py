"""ControlNet on the caption-conditioned glyph UNet (configs/glyphs_unet_text.py, trained in
runs/glyphs_unet): a trainable copy of its encoder reads the shape mask of each training
glyph (controls.mask: the pixels away from the background colour) and the caption
through the base's frozen text encoder; the base stays frozen.

  python -m diffusion_jax.main --config=configs/glyphs_unet_text.py --workdir=runs/glyphs_unet
  python -m diffusion_jax.main --config=configs/glyphs_controlnet.py --workdir=runs/glyphs_controlnet
  python -m diffusion_jax.sample --workdir=runs/glyphs_controlnet --num_samples=300 \
      [--control_scale=0 / 0.5 / 1 / 2] [--prompt="..." --control=glyphs.npz]

The sample CLI prints the mean IoU between each sample's mask and the control it was
given (the first test glyphs' masks, under their own captions); --control_scale=0 is the
base exactly (README, docs/adapters.md).
"""

from configs import glyphs_unet_text


def get_config():
    c = glyphs_unet_text.get_config()
    c.adapter.kind = "controlnet"
    c.adapter.base = "runs/glyphs_unet"
    c.adapter.control = "mask"
    c.optim.learning_rate = 2e-4
    c.optim.decay = "constant"
    c.train.num_steps = 400
    c.eval.every_steps = 200
    c.ckpt.every_steps = 200
    return c
