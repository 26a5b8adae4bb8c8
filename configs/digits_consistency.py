"""Consistency distillation (diffusion_jax/consistency.py) of the class-conditional digits
UNet (configs/digits_unet_cond.py) into a 1-4 step sampler.

  python -m diffusion_jax.main --config=configs/digits_unet_cond.py --workdir=runs/digits_cond
  python -m diffusion_jax.main --config=configs/digits_consistency.py:runs/digits_cond \
      --workdir=runs/digits_cd
  python -m diffusion_jax.evaluate --workdir=runs/digits_cd --num_samples=500 \
      --config.sampler.num_steps=1

The argument after ":" is the teacher workdir (default runs/digits_cond). The student has
the teacher's UNet and starts from its EMA weights; the teacher's DDIM steps of 25 indices
(40-step grid) are guided at scale 2 (the teacher's best class accuracy), so the student
learns the guided trajectories and samples with guidance_scale 1 (no second forward).
Target network: the EMA at 0.95 (LCM), which is also what samples and metrics use.

Measured (2-core AMD EPYC guest, seed 0, teacher = the dit_vs_unet sweep's digits_unet_cond
run, 1,200 steps): 800 updates in 10.6 min wall (623 s of training, 1.47 GB peak RSS);
500 samples, classifier-FID matched / real-vs-real floor (0.439): consistency 1 / 2 / 4
steps 23.0x / 2.69x / 2.32x, class accuracy 18.8% / 95.2% / 98.8%, next to the teacher's
DDIM (guidance 2, trailing) 1 / 2 / 4 / 10 / 50 steps 12.1x / 5.15x / 2.91x / 2.13x / 1.85x
(docs/consistency.md). A 20-step grid gave 21.6x / 3.13x / 2.54x.
"""

from configs import digits_unet_cond


def get_config(teacher: str = "runs/digits_cond"):
    c = digits_unet_cond.get_config()
    c.consistency.mode = "distill"
    c.consistency.teacher = teacher
    c.consistency.num_grid_steps = 40
    c.consistency.teacher_guidance = 2.0
    c.consistency.distance = "pseudo_huber"
    c.sampler.name = "consistency"
    c.sampler.num_steps = 2
    c.sampler.spacing = "trailing"  # 999 | 999, 499 | 999, 749, 499, 249: on the grid
    c.sampler.guidance_scale = 1.0  # the guidance is distilled in
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    c.optim.ema_decay = 0.95
    c.optim.ema_warmup = False
    c.train.num_steps = 800
    c.eval.every_steps = 400
    c.eval.metrics_every_steps = 400
    c.ckpt.every_steps = 400
    return c
