"""The README main job: a 0.70M-parameter UNet on the bundled 8x8 handwritten digits, sized
to finish in under 10 minutes on a 2-core CPU, install included.

Run:  python -m diffusion_jax.main --config=configs/digits_unet_small.py --workdir=runs/digits

It is configs/digits_unet.py (2.8M parameters, 1,200 steps, the main job until issue 20 and
the schedule ablations' model) at 32 base channels instead of 64 (8 norm groups), on the
cosine schedule, at learning rate 5e-4 instead of 2e-4, for 2,000 steps. Its step costs
~0.4x the 2.8M model's, and it reaches the 2.8M model's classifier-FID in the same wall
time (experiments/results/main_job_budget/report.md; README "What the main job produces").
"""

from configs import digits_unet


def get_config():
    c = digits_unet.get_config()
    c.model.unet.update(base_channels=32, norm_groups=8)
    c.schedule.name = "cosine"
    c.optim.learning_rate = 5e-4
    c.train.num_steps = 2000
    c.eval.every_steps = 500
    c.ckpt.every_steps = 500
    return c
