"""Guidance-conditioned consistency distillation (LCM, Luo et al. 2023) of the
class-conditional digits UNet: configs/digits_consistency.py, but each example's teacher
scale w is drawn from [1, 3] and the student takes w as an input
(model.guidance_input; diffusion_jax/models/guidance_input.py), so one student samples at
any scale in the range with one forward per step.

  python -m diffusion_jax.main --config=configs/digits_consistency_guided.py:runs/digits_cond \
      --workdir=runs/digits_cd_guided
  python -m diffusion_jax.evaluate --workdir=runs/digits_cd_guided --num_samples=500 \
      --config.sampler.num_steps=2 --config.sampler.guidance_scale=2

Measured: docs/consistency.md.
"""

from configs import digits_consistency


def get_config(teacher: str = "runs/digits_cond"):
    c = digits_consistency.get_config(teacher)
    c.model.guidance_input = True
    c.consistency.teacher_guidance = 1.0  # the range's low end: the plain conditional model
    c.consistency.teacher_guidance_max = 3.0
    c.sampler.guidance_scale = 2.0  # grids and in-loop metrics: the fixed-scale student's w
    return c
