"""The guidance scale as a network input (latent consistency models, Luo et al. 2023):
a student distilled from a classifier-free-guided teacher over a range of scales learns
the guided output for any w in one forward pass, so sampling needs no unconditional
branch.

A model built with ``guidance_input=True`` takes its condition as ``{"y": condition,
"w": scales [B]}`` (``split``) and adds ``GuidanceEmbedding(w)`` to its conditioning
vector, where the timestep and class embeddings go. The embedding's last layer starts at
zero, so a student that starts from its teacher's weights computes exactly the teacher's
output at every w until it trains.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.layers import timestep_embedding

Dtype = Any
# w enters the sinusoid as (w - 1) * W_SCALE: the timestep embedding's frequencies are
# tuned for inputs spread over 0..1000, scales over ~0..10 (LCM's choice).
W_SCALE = 1000.0
FREQ_DIM = 256


def split(y, guidance_input: bool) -> tuple[Any, Optional[jnp.ndarray]]:
    """(condition, w) of a model's ``y``. With ``guidance_input`` y must be
    ``{"y": condition, "w": [B]}``; without, a plain condition (a dict is refused)."""
    if not guidance_input:
        if isinstance(y, dict):
            raise ValueError(
                "a condition with a guidance scale ('w') was given to a model built without "
                "model.guidance_input; pass the plain condition"
            )
        return y, None
    if not isinstance(y, dict) or "w" not in y:
        raise ValueError(
            "this model takes the guidance scale as an input (model.guidance_input=True): "
            "its condition must be {'y': labels or tokens, 'w': scales [B]}"
        )
    return y.get("y"), y["w"]


class GuidanceEmbedding(nn.Module):
    """w [B] -> [B, features]: sinusoid of (w - 1) * W_SCALE, Dense -> SiLU -> Dense with
    the last Dense zero-initialised (kernel and bias): exactly 0 until trained."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, w: jnp.ndarray, batch_size: int) -> jnp.ndarray:
        w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (batch_size,))
        emb = timestep_embedding((w - 1.0) * W_SCALE, FREQ_DIM)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(nn.Dense(self.features, name="dense0", **kw)(emb))
        zeros = nn.initializers.zeros
        return nn.Dense(self.features, kernel_init=zeros, bias_init=zeros, name="dense1", **kw)(h)


__all__ = ("GuidanceEmbedding", "split", "W_SCALE")
