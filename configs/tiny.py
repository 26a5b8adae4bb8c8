"""A tiny, fast configuration for tests and smoke runs (seconds on a CPU).

Run:  python -m diffusion_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
Expect: 8 steps in a few seconds after compilation; samples are noise (too few steps).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.unet.update(
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
        norm_groups=8,
    )
    c.schedule.num_timesteps = 100
    c.sampler.num_steps = 5
    c.optim.warmup_steps = 2
    c.train.num_steps = 8
    c.train.batch_size = 16
    c.train.log_every_steps = 4
    c.train.quiet = True
    c.eval.every_steps = 0
    c.eval.num_samples = 8
    c.ckpt.every_steps = 4
    c.ckpt.async_save = False
    return c
