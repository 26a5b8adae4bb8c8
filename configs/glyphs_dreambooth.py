"""Subject tuning (DreamBooth) of the caption-conditioned glyph UNet
(configs/glyphs_unet_text.py, trained in runs/glyphs_unet): a new word, "zxq", learns
Computer Modern Roman (never in the glyphs dataset) from 100 renders captioned with it in
the family slot, while the base's own samples under training captions preserve what it
knew (prior weight 1). Full fine-tuning; the LoRA variant is one override.

  python -m diffusion_jax.glyph_subject --base=runs/glyphs_unet --out=runs/glyphs_subject \
      --num_prior=200
  python -m diffusion_jax.main --config=configs/glyphs_dreambooth.py --workdir=runs/glyphs_db
  python -m diffusion_jax.evaluate_glyph_subject --workdir=runs/glyphs_db
  python -m diffusion_jax.sample --workdir=runs/glyphs_db \
      --prompt="a large regular upright red zxq letter A on the blue background"

LoRA (rank 4 on the attention projections, the residual convolutions and the token
table, so the identifier's row can move): --config.adapter.kind=lora
--config.optim.learning_rate=1e-3.

Measured (README, "Subject tuning on the glyphs"; 2-core Intel Xeon, alone): 7.4 min full,
6.9 min LoRA; Computer Modern is recognised in 11.5% / 9.0% of identifier samples (target
80% missed: the base draws no glyph shapes from captions), drift -1.4 / -1.6 points.
"""

from configs import glyphs_unet_text
from diffusion_jax import lora


def get_config():
    c = glyphs_unet_text.get_config()
    c.model.text.vocab_size += 1  # the identifier
    c.data.name = "subject"
    c.data.data_dir = "runs/glyphs_subject"
    c.adapter.kind = "full"
    c.adapter.base = "runs/glyphs_subject/base"
    c.adapter.rank = 4
    c.adapter.alpha = 4.0
    c.adapter.targets = (*lora.DEFAULT_TARGETS, r"conv\d/kernel$", r"token_embed/embedding$")
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 20
    c.optim.decay = "constant"
    c.train.num_steps = 400
    c.eval.every_steps = 200
    c.eval.metrics_every_steps = 0  # the subject's own judge: evaluate_glyph_subject
    c.ckpt.every_steps = 200
    return c
