"""The 2.8M-parameter unconditional UNet on the bundled 8x8 handwritten digits: the main job
until issue 20 (now configs/digits_unet_small.py), and the model of the schedule ablations
(experiments/sweeps.py), so its values stay as they are.

Run:  python -m diffusion_jax.main --config=configs/digits_unet.py --workdir=runs/digits
Expect: ~10 min on a 2-core Intel Xeon, ~20 min on a 2-core AMD EPYC guest (README); loss
falls from ~0.6 at step 100 to ~0.08; the final grid runs/digits/samples/step_*.png (DDIM-50
from EMA params) shows legible digits.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.name = "unet"
    c.train.num_steps = 1200
    c.train.batch_size = 128
    c.optim.decay = "cosine"
    c.optim.final_lr_fraction = 0.1
    c.train.log_every_steps = 100
    c.eval.every_steps = 400
    c.ckpt.every_steps = 400
    return c
