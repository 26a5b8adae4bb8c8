"""Consistency training without a teacher (iCT, Song & Dhariwal 2023; consistency.mode=
train) of the class-conditional digits UNet from scratch: the baseline that consistency
distillation (configs/digits_consistency.py) is measured against. The discretisation
curriculum doubles the grid from 10 to 1,280 indices (capped at T = 1000) in equal stages
of train.num_steps; the run's EMA is only for sampling and metrics.

  python -m diffusion_jax.main --config=configs/digits_consistency_train.py \
      --workdir=runs/digits_ct
  python -m diffusion_jax.evaluate --workdir=runs/digits_ct --num_samples=500 \
      --config.sampler.num_steps=2

2,000 updates = the teacher's 1,200 plus distillation's 800: the same number of updates as
teacher + distillation together. Measured: docs/consistency.md.
"""

from configs import digits_unet_cond


def get_config():
    c = digits_unet_cond.get_config()
    c.consistency.mode = "train"
    c.consistency.distance = "pseudo_huber"
    c.sampler.name = "consistency"
    c.sampler.num_steps = 2
    c.sampler.spacing = "trailing"
    c.sampler.guidance_scale = 1.0  # a consistency model samples unguided
    c.train.num_steps = 2000
    c.eval.every_steps = 400
    c.eval.metrics_every_steps = 400
    c.eval.metrics_num_samples = 500
    c.ckpt.every_steps = 400
    return c
