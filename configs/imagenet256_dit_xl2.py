"""DiT-XL/2 on ImageNet 256x256 latents (Peebles & Xie 2023), class-conditional with
classifier-free guidance, for a GPU/TPU user.

The model works in the Stable Diffusion VAE's latent space (32x32x4), through the latent
pipeline of docs/latent.md:

  # 1. ImageNet as a prepared TFDS dataset (manual download; see tfds's imagenet2012)
  tfds build imagenet2012 --data_dir=DATA --file_format=array_record
  # 2. the SD VAE (stabilityai/sd-vae-ft-ema) imported from diffusers' weights
  #    (docs/weights.md), its data config imagenet2012 at 256 (center crop + resize)
  python -m diffusion_jax.convert --from=diffusers --weights=weights/sd-vae-ft-ema \
      --workdir=runs/sd_vae --dataset=imagenet2012
  # 3. encode once (sharded over every device and process, resumable)
  python -m diffusion_jax.encode --autoencoder=runs/sd_vae --out=runs/imagenet256_latents
  # 4. train, then sample / evaluate (decoded by the autoencoder)
  python -m diffusion_jax.main --config=configs/imagenet256_dit_xl2.py \
      --workdir=gs://BUCKET/dit_xl2

The paper's model: 8 output channels, the eps prediction and the learned variance of
each latent channel (Nichol & Dhariwal 2021, improved DDPM), trained with their hybrid
loss L_simple + 0.001 L_vlb (objectives.diffusion_loss, variance.py): 675,129,632
parameters as the official code counts them (674,834,720 trainable plus the fixed
256 x 1152 position embedding, a constant here). It samples with DDPM and the learned
variance, over 250 steps of the respaced chain (improved DDPM sec. 4; their "250" is
our spacing "linspace"), as the paper does.

Expect (paper): FID-50K 19.5 at 400k steps without guidance; 9.62 at 7M steps, 2.27 with
CFG scale 1.5.
"""

from configs import base
from diffusion_jax.models.dit import DIT_PRESETS


def get_config():
    c = base.get_config()
    c.model.name = "dit"
    c.model.num_classes = 1000
    c.model.compute_dtype = "bfloat16"
    c.model.dit.update(DIT_PRESETS["DiT-XL/2"])
    c.model.dit.out_channels = 8  # 2 x the latent's 4: eps, then the variance values
    c.schedule.name = "linear"
    c.schedule.num_timesteps = 1000
    c.objective.label_dropout = 0.1
    c.objective.learn_sigma = True
    c.objective.vlb_weight = 0.001
    c.sampler.name = "ddpm"
    c.sampler.respacing = 250  # the paper's 250 respaced DDPM steps
    c.sampler.spacing = "linspace"
    c.sampler.variance = "learned"
    c.sampler.guidance_scale = 1.5
    c.sampler.clip_x0 = False  # latents are not bounded to [-1, 1]
    c.latent.autoencoder = "runs/sd_vae"
    c.data.name = "latents"
    c.data.data_dir = "runs/imagenet256_latents"
    c.data.image_size = 32
    c.data.random_flip = True
    c.optim.learning_rate = 1e-4  # AdamW, constant, no weight decay (paper)
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.grad_clip_norm = 0.0
    c.optim.ema_decay = 0.9999
    c.optim.ema_warmup = False
    c.train.num_steps = 400_000
    c.train.batch_size = 256
    c.train.log_every_steps = 100
    c.eval.every_steps = 50_000
    c.ckpt.every_steps = 10_000
    return c
