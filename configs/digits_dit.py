"""Class-conditional DiT (adaLN-Zero) on the bundled 8x8 digits, patch 2 (16 tokens),
classifier-free guidance 2. The DiT counterpart of configs/digits_unet_cond.py.

Run:  python -m diffusion_jax.main --config=configs/digits_dit.py --workdir=runs/digits_dit
Expect (measured on a 2-core AMD EPYC guest, seed 0; experiments sweep dit_vs_unet):
  2,400 steps at 2.74 steps/s, 14.9 min of training including compilation (the sample
  grids every 800 steps are not counted); loss 0.07. 500 samples, DDIM-50, EMA parameters,
  real-vs-real floor 0.439 at N = 500:
    guidance 2: class accuracy 99.8-100% (5 sampling seeds), classifier-FID 2.05 +- 0.26x the
      floor over sampling seeds 0-4 (1.78-2.45x): the <= 2x target is missed on average;
    guidance 1.5: accuracy 100%, FID 1.46x (seed 0); guidance 1: 98.2%, 0.70x.
  Class accuracy passes 95% after 3.7 min of training (step 600).

Why these choices (docs/dit.md has the measurements):
  * native 8x8 with patch 2: 16 tokens. The old 16x16 upsampled setup had 64 tokens for
    the same information and ran at 0.46-0.49 steps/s; this one runs ~5.7x faster.
  * width 192, depth 6, 3 heads (DiT-S's head width 64 at half its width and depth):
    4.2M parameters (the UNet: 2.8M), 2.74 steps/s against the UNet's 1.94.
  * label table N(0, 1) and timestep-MLP kernels N(0, 0.07) instead of DiT's N(0, 0.02):
    with the paper's init the conditioning vector c is ~0.03 per channel, so SiLU(c) is
    ~c/2 and the zero-initialized adaLN projections learn the label very slowly (class
    accuracy 9-12%, chance, through 600 steps at lr 3e-4; 9.8% at step 200 at lr 1e-3).
    Unit-scale label embeddings reach 40% at step 200. The published DiT configs keep the paper's init.
  * lr 1e-3 (DiT: 1e-4 at batch 256 for 400k+ steps), warmup 100, cosine decay to 10%:
    a short run needs large steps and benefits from annealing, as the UNet configs do.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.name = "dit"
    c.model.num_classes = 10
    c.model.dit.update(
        patch_size=2, hidden_size=192, depth=6, num_heads=3, label_init_std=1.0, time_init_std=0.07
    )
    c.data.image_size = 8
    c.optim.learning_rate = 1e-3
    c.optim.decay = "cosine"
    c.optim.final_lr_fraction = 0.1
    c.sampler.guidance_scale = 2.0
    c.train.num_steps = 2400
    c.train.batch_size = 128
    c.train.log_every_steps = 100
    c.eval.every_steps = 800
    c.ckpt.every_steps = 800
    c.eval.num_samples = 100
    return c
