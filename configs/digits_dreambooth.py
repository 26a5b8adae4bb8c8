"""Subject tuning (DreamBooth) of the class-conditional digits UNet
(configs/digits_unet_cond.py): a new label, the identifier 10, learns digits typeset in
Computer Modern from 100 renders, while the base's own samples of labels 0-9 preserve
what it knew (prior weight 1). Full fine-tuning; the LoRA variant is one override.

  python -m diffusion_jax.subject --base=runs/digits_cond --out=runs/digits_subject
  python -m diffusion_jax.main --config=configs/digits_dreambooth.py --workdir=runs/digits_db
  python -m diffusion_jax.evaluate_subject --workdir=runs/digits_db
  python -m diffusion_jax.sample --workdir=runs/digits_db --labels=10 --num_samples=64

LoRA (rank 4 on the attention projections, the residual convolutions and the label
table, so the identifier's row can move): --config.adapter.kind=lora. Measured in the
README and docs/adapters.md.
"""

from configs import digits_unet_cond
from diffusion_jax import lora


def get_config():
    c = digits_unet_cond.get_config()
    c.model.num_classes = 11  # the base's 10 and the identifier
    c.data.name = "subject"
    c.data.data_dir = "runs/digits_subject"
    c.adapter.kind = "full"
    c.adapter.base = "runs/digits_subject/base"
    c.adapter.rank = 4
    c.adapter.alpha = 4.0
    c.adapter.targets = (*lora.DEFAULT_TARGETS, r"conv\d/kernel$", r"label_embed/table/embedding$")
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 20
    c.optim.decay = "constant"
    c.train.num_steps = 400
    c.eval.every_steps = 200
    c.eval.metrics_every_steps = 0  # the subject's own judge: evaluate_subject
    c.ckpt.every_steps = 200
    return c
