"""Ho et al. 2020's CIFAR-10 recipe (unconditional, 35.7M-parameter UNet).

Needs the cifar10 tfds dataset prepared once on a machine with internet
(`tfds build cifar10 --data_dir=DIR --file_format=array_record`), then:

  python -m diffusion_jax.main --config=configs/cifar10_ddpm.py --workdir=runs/cifar10 \
      --config.data.data_dir=DIR

Expect (paper, 800k steps at batch 128 on TPU v3-8): FID 3.17, IS 9.46 with DDPM-1000
sampling. On a CPU this config is only for benchmarking one step.
"""

from configs import base
from diffusion_jax.models.unet import UNET_PRESETS


def get_config():
    c = base.get_config()
    c.model.name = "unet"
    c.model.unet.update(UNET_PRESETS["ddpm_cifar10"])  # ch 128, (1,2,2,2), attn 16, dropout 0.1
    c.schedule.name = "linear"  # beta 1e-4 .. 0.02
    c.schedule.num_timesteps = 1000
    c.objective.prediction = "eps"  # L_simple
    c.sampler.name = "ddpm"
    c.sampler.variance = "fixedlarge"  # sigma_t^2 = beta_t
    c.data.name = "cifar10"
    c.data.image_size = 32
    c.data.random_flip = True
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.grad_clip_norm = 1.0
    c.optim.ema_decay = 0.9999
    c.optim.ema_warmup = False
    c.train.num_steps = 800_000
    c.train.batch_size = 128
    c.train.log_every_steps = 1000
    c.eval.every_steps = 50_000
    c.ckpt.every_steps = 10_000
    return c
