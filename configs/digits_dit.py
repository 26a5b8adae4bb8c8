"""Class-conditional DiT (adaLN-Zero) on the bundled digits, upsampled to 16x16, patch 2.

Run:  python -m diffusion_jax.main --config=configs/digits_dit.py --workdir=runs/digits_dit
Expect: sample grids in class order (0..9 per row, guidance scale 2). Not yet measured
end to end on CPU: the class-conditional quality numbers in the README come from the
UNet with --config.model.num_classes=10.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.name = "dit"
    c.model.num_classes = 10
    c.model.dit.update(patch_size=2, hidden_size=192, depth=6, num_heads=3)
    c.data.image_size = 16
    c.optim.learning_rate = 3e-4
    c.sampler.guidance_scale = 2.0
    c.train.num_steps = 4000
    c.train.batch_size = 128
    c.eval.num_samples = 100
    return c
