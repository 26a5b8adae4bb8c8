"""ControlNet on the class-conditional digits UNet (configs/digits_unet_cond.py, trained in
runs/digits_cond): a trainable copy of its encoder reads the edge map (Sobel, controls.py)
of each training digit; the base stays frozen.

  python -m diffusion_jax.main --config=configs/digits_controlnet.py --workdir=runs/digits_controlnet
  python -m diffusion_jax.sample --workdir=runs/digits_controlnet --num_samples=64 \
      [--control=digits.npz --control_scale=0.5 --labels=3]

The sample CLI prints the mean IoU between each sample's edge map and the control it was
given; --control_scale=0 samples the base exactly (README, docs/adapters.md).
"""

from configs import digits_unet_cond


def get_config():
    c = digits_unet_cond.get_config()
    c.adapter.kind = "controlnet"
    c.adapter.base = "runs/digits_cond"
    c.adapter.control = "edges"
    c.optim.learning_rate = 2e-4
    c.optim.decay = "constant"
    c.train.num_steps = 800
    c.eval.every_steps = 400
    c.ckpt.every_steps = 400
    return c
