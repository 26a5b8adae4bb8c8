"""Noise-aware guide networks: what classifier guidance and CLIP guidance differentiate.

Both read a noisy input x_t [B, H, W, C] and its timestep t, because their gradient is
taken at every step of sampling, on noisy images (Dhariwal & Nichol 2021, sec. 4; GLIDE,
Nichol et al. 2022, sec. 3.3, trains its CLIP on noised images for the same reason).

``NoisyEncoder``: the shared image tower. A conv in, then per level ``num_res_blocks``
ResBlocks conditioned on the timestep embedding (additive, DDPM style), average pooling
between levels, GroupNorm/SiLU, a spatial mean and a Dense to ``features`` (the encoder
half of ADM's classifier, shrunk to the 8x8 latents).

``NoisyClassifier``: the encoder and one linear head per attribute, concatenated:
logits [B, sum(head_sizes)]. ``split_logits`` cuts them back per head.

``NoisyCLIP``: the encoder and a text tower (``TextEncoder``, masked mean, Dense), both
L2-normalized to ``embed_dim``, and a learned temperature (CLIP: log scale initialized to
log(1 / 0.07)). Returns (image embeddings, text embeddings, logit scale).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.layers import Conv, ResBlock, TimestepEmbedding, xavier_uniform
from diffusion_jax.models.text import TextEncoder, pooled_embedding

Dtype = Any


def _normalize(v: jnp.ndarray) -> jnp.ndarray:
    v = v.astype(jnp.float32)
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class _Tower(nn.Module):
    """The image-tower settings every guide network shares."""

    channels: Sequence[int] = (64, 128)
    num_res_blocks: int = 1
    features: int = 128
    norm_groups: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.nowrap
    def check_input_shape(self, height: int, width: int, channels: int) -> None:
        factor = 2 ** (len(self.channels) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"a guide encoder with {len(self.channels)} levels needs height and width "
                f"divisible by {factor}; got {height}x{width}"
            )

    @nn.nowrap
    def encoder(self, name: str) -> "NoisyEncoder":
        """The image tower with these settings."""
        fields = ("channels", "num_res_blocks", "features", "norm_groups", "dtype", "param_dtype")
        return NoisyEncoder(**{f: getattr(self, f) for f in fields}, name=name)


class NoisyEncoder(_Tower):
    """(x_t, t) -> features [B, features]."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = self.channels[0]
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        emb = TimestepEmbedding(ch, 4 * ch, name="time_embed", **kw)(t)
        h = Conv(ch, (3, 3), padding="SAME", kernel_init=xavier_uniform(), name="conv_in", **kw)(
            x.astype(self.dtype)
        )
        for level, width in enumerate(self.channels):
            if level:
                h = nn.avg_pool(h, (2, 2), (2, 2))
            for i in range(self.num_res_blocks):
                h = ResBlock(width, norm_groups=self.norm_groups, name=f"res{level}_{i}", **kw)(
                    h, emb
                )
        h = nn.silu(nn.GroupNorm(self.norm_groups, name="norm_out", **kw)(h))
        return nn.Dense(self.features, name="features", **kw)(h.mean(axis=(1, 2)))


class NoisyClassifier(_Tower):
    """p(attributes | x_t, t): logits [B, sum(head_sizes)], one head per attribute."""

    head_sizes: Sequence[int] = (10,)

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # no dropout
        h = nn.silu(self.encoder("encoder")(x, t))
        logits = nn.Dense(sum(self.head_sizes), name="heads", dtype=self.dtype)(h)
        return logits.astype(jnp.float32)


def split_logits(logits: jnp.ndarray, head_sizes: Sequence[int]) -> Tuple[jnp.ndarray, ...]:
    """[B, sum K] -> one [B, K_i] per head."""
    return tuple(jnp.split(logits, np.cumsum(head_sizes)[:-1].tolist(), axis=-1))


class NoisyCLIP(_Tower):
    """(x_t, t, tokens) -> (image embeddings [B, D], text embeddings [B, D], scale)."""

    text: Optional[TextEncoder] = None  # required; the registry builds it from model.text
    embed_dim: int = 128

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, tokens: jnp.ndarray, train: bool = False):
        del train  # no dropout
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        image = self.encoder("image_encoder")(x, t)
        image = nn.Dense(self.embed_dim, name="image_proj", **kw)(nn.silu(image))
        context, mask = self.text(tokens)
        text = nn.Dense(self.embed_dim, name="text_proj", **kw)(pooled_embedding(context, mask))
        log_scale = self.param("log_scale", nn.initializers.constant(np.log(1 / 0.07)), ())
        return _normalize(image), _normalize(text), jnp.exp(log_scale)


__all__ = ("NoisyEncoder", "NoisyClassifier", "NoisyCLIP", "split_logits")
