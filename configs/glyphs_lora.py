"""LoRA on the glyphs text-to-image model (configs/glyphs_ldm_text.py, trained in
runs/glyphs_text): rank-4 factors on every attention projection (self- and cross-attention,
the text encoder's too) and feed-forward layer; the base stays frozen.

  python -m diffusion_jax.main --config=configs/glyphs_lora.py --workdir=runs/glyphs_lora
  python -m diffusion_jax.sample --workdir=runs/glyphs_text --lora=runs/glyphs_lora \
      --lora_scale=0.8 --prompt="a large bold upright red serif letter A on the blue background"

Full fine-tuning of the same base: --config.adapter.kind=full (and a lower learning rate,
e.g. --config.optim.learning_rate=1e-4). The data is the base's; point data.* elsewhere to
adapt it to new images.
"""

from configs import glyphs_ldm_text


def get_config():
    c = glyphs_ldm_text.get_config()
    c.adapter.kind = "lora"
    c.adapter.base = "runs/glyphs_text"
    c.adapter.rank = 4
    c.adapter.alpha = 4.0
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.optim.decay = "constant"
    c.train.num_steps = 500
    c.eval.every_steps = 500
    c.ckpt.every_steps = 250
    return c
