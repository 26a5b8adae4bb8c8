"""The noise-aware attribute classifier for classifier guidance of the glyphs text model
(configs/glyphs_ldm_text.py): p(attribute | z_t, t) on the same 8x8x4 latents, one head
per attribute, trained on noised latents with the diffusion model's schedule (Dhariwal &
Nichol 2021, sec. 4). Targets are the attributes each caption names.

  python -m diffusion_jax.main --config=configs/glyphs_guide_classifier.py \
      --workdir=runs/glyphs_guide_classifier
  python -m diffusion_jax.evaluate_text --workdir=runs/glyphs_text --guidance=classifier \
      --guide=runs/glyphs_guide_classifier --scales=0,1,2,4
"""

from configs import glyphs_ldm_text
from diffusion_jax.datasets import glyph_render


def get_config():
    c = glyphs_ldm_text.get_config()
    c.model.name = "classifier"
    c.model.text.vocab_size = 0
    c.model.classifier.update(
        head_sizes=tuple(len(v) for v in glyph_render.ATTRIBUTES.values()),
        channels=(64, 128),
        num_res_blocks=2,
        features=128,
    )
    c.optim.learning_rate = 1e-3
    c.train.num_steps = 1500
    c.eval.every_steps = 1500
    c.eval.metrics_every_steps = 500
    c.ckpt.every_steps = 500
    return c
