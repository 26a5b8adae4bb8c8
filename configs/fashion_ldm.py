"""Class-conditional latent diffusion on Fashion-MNIST: the digits DiT recipe
(configs/digits_dit.py) on the 8x8x4 latents of configs/fashion_autoencoder.py.

  python -m diffusion_jax.main --config=configs/fashion_autoencoder.py --workdir=runs/fashion_ae
  python -m diffusion_jax.encode --autoencoder=runs/fashion_ae --out=runs/fashion_latents
  python -m diffusion_jax.main --config=configs/fashion_ldm.py --workdir=runs/fashion_ldm

Samples, grids and metrics are decoded by the autoencoder and scored with the Fashion
classifier against the real 32x32 (padded) train images.

Expect (measured on a 2-core AMD EPYC guest, alone, seed 0, after the L2 autoencoder of
configs/fashion_autoencoder.py and a 95 s encode of 70k images; scale_factor measured
0.362): 2,000 steps at 2.2-2.6 steps/s, 12.4 min of training, 16.0 min wall with the
classifier and two in-loop evaluations, peak RSS 1.46 GB. 1,000 samples, DDIM-50,
guidance 2, seed 1234, EMA: class accuracy 93.1% at step 1,000 and 96.5% at step 2,000
(target >= 85%); classifier-FID matched 2.70 = 4.65x the real-vs-real floor (0.579 at
N = 1,000; the autoencoder's own reconstructions are at 1.07x). On the earlier L1
autoencoder's latents: 96.6%, 4.56x.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.latent.autoencoder = "runs/fashion_ae"
    c.data.name = "latents"
    c.data.data_dir = "runs/fashion_latents"
    c.data.image_size = 8  # the latent grid
    c.model.name = "dit"
    c.model.num_classes = 10
    c.model.dit.update(
        patch_size=2, hidden_size=192, depth=6, num_heads=3, label_init_std=1.0, time_init_std=0.07
    )
    c.optim.learning_rate = 1e-3
    c.optim.decay = "cosine"
    c.optim.final_lr_fraction = 0.1
    c.sampler.guidance_scale = 2.0
    c.sampler.clip_x0 = False  # latents are not bounded to [-1, 1]
    c.train.num_steps = 2000
    c.train.batch_size = 128
    c.train.log_every_steps = 100
    c.eval.every_steps = 1000
    c.eval.num_samples = 100
    c.eval.metrics_every_steps = 1000
    c.eval.metrics_num_samples = 1000
    c.ckpt.every_steps = 1000
    return c
