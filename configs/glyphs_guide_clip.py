"""The noise-aware CLIP for CLIP guidance of the glyphs text model (configs/glyphs_ldm_text.py):
an image tower on 8x8x4 latents z_t (with t) and a text tower on the captions, trained
contrastively on noised latents (GLIDE, Nichol et al. 2022, sec. 3.3: a noised CLIP).

  python -m diffusion_jax.main --config=configs/glyphs_guide_clip.py --workdir=runs/glyphs_guide_clip
  python -m diffusion_jax.evaluate_text --workdir=runs/glyphs_text --guidance=clip \
      --guide=runs/glyphs_guide_clip --scales=0,1,2,4
"""

from configs import glyphs_ldm_text


def get_config():
    c = glyphs_ldm_text.get_config()
    c.model.name = "clip"
    c.model.clip.update(channels=(64, 128), num_res_blocks=2, features=128, embed_dim=128)
    c.optim.learning_rate = 1e-3
    c.train.num_steps = 1500
    c.train.batch_size = 256  # more negatives per contrastive batch
    c.eval.every_steps = 1500
    c.eval.metrics_every_steps = 500
    c.ckpt.every_steps = 500
    return c
