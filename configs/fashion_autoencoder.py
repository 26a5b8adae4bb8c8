"""The KL autoencoder of latent diffusion on Fashion-MNIST (28x28 padded to 32x32), f = 4:
8x8x4 latents for configs/fashion_ldm.py. (0.95M parameters; the SD VAE is the
"sd-vae" preset.)

  apt-get install dataset-fashion-mnist   # the IDX files, offline (Debian/Ubuntu)
  python -m diffusion_jax.main --config=configs/fashion_autoencoder.py --workdir=runs/fashion_ae
  python -m diffusion_jax.encode --autoencoder=runs/fashion_ae --out=runs/fashion_latents

Loss: L2 reconstruction + 1e-6 x KL (LDM's weight; see diffusion_jax/autoencoding.py), no
perceptual or adversarial term (they need pretrained networks). PSNR is an L2 measure, and
the L2 loss reaches it sooner than LDM's usual L1 (--config.objective.recon_l1_weight=1
--config.objective.recon_l2_weight=0 trains that one). Evaluated in the loop on 1,000 test
images: PSNR, SSIM, reconstruction FID with the Fashion classifier's features.

Expect (measured on a 2-core AMD EPYC guest, seed 0, alone): 1,400 steps at batch 32, 568 s
(9.5 min) of training at 2.4-2.8 steps/s, 9.96 min wall, 1.39 GB peak RSS (the Fashion
classifier, 44 s, is trained once before the first step). Held-out (first 1,000 test
images, EMA): PSNR 28.3 dB, SSIM 0.906-0.907 (two runs),
reconstruction FID 0.348 (matched 0.621 = 1.07x the real-vs-real floor 0.579 at N =
1,000), classifier accuracy on reconstructions 89.6% (90.9% on real test images). The L1
loss gave 26.0 dB (SSIM 0.873, 1.19x) at 1,100 steps (README, "latent diffusion on
Fashion-MNIST").
"""

from configs import base
from diffusion_jax.models.autoencoder import AUTOENCODER_PRESETS


def get_config():
    c = base.get_config()
    c.model.name = "autoencoder"
    c.model.autoencoder.update(AUTOENCODER_PRESETS["fashion-f4"])
    c.data.name = "fashion_mnist"
    c.data.image_size = 32
    c.data.resize_method = "pad"
    c.objective.recon_l1_weight = 0.0
    c.objective.recon_l2_weight = 1.0
    c.objective.kl_weight = 1e-6
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 100
    c.optim.decay = "cosine"
    c.optim.final_lr_fraction = 0.1
    c.optim.ema_decay = 0.999
    c.train.num_steps = 1400
    c.train.batch_size = 32
    c.train.log_every_steps = 50
    c.eval.every_steps = 700
    c.eval.num_samples = 64
    c.eval.metrics_every_steps = 700
    c.eval.metrics_num_samples = 1000
    c.ckpt.every_steps = 700
    return c
