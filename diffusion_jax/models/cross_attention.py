"""Cross-attention on a token sequence (text), for both backbones.

``CrossAttention``: queries from the image tokens, keys and values from the context
tokens [B, M, D_ctx] with their padding mask [B, M]. An example whose context has no real
token (the empty caption of classifier-free guidance) gets exactly zero from the layer,
output bias included, so a text-conditioned network given the empty caption *is* its own
unconditional path: the same weights with every cross-attention removed (a test checks
this to float precision). Without that rule an all-padding context would attend uniformly
to padding embeddings, which carry nothing.

``SpatialTransformer``: the transformer block Stable Diffusion puts at its UNet's attention
resolutions (Rombach et al. 2022, their ``SpatialTransformer``): GroupNorm, a linear
projection in, [self-attention, cross-attention, GEGLU feed-forward] each pre-LayerNorm
and residual, a zero-initialized projection out, plus the block's input. The DiT variant
(PixArt-alpha, Chen et al. 2023) uses ``CrossAttention`` directly between its self-attention
and its MLP (models/dit.py).
"""

from __future__ import annotations

from typing import Any, Optional

import einops
import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.layers import MultiHeadSelfAttention, attend, xavier_uniform, zeros

Dtype = Any


def has_tokens(mask: jnp.ndarray) -> jnp.ndarray:
    """[B] bool: whether each example's context has at least one real token."""
    return jnp.any(mask, axis=-1)


class CrossAttention(nn.Module):
    """Multi-head attention from x [B, N, C] to a context [B, M, D] with key mask [B, M]
    (True = a real token); output [B, N, C], zero for examples with no real token.

    ``zero_init_out``: the output projection starts at zero (PixArt-alpha zero-initializes
    its cross-attention output, so a fresh block is the identity like adaLN-Zero)."""

    num_heads: int
    zero_init_out: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        if c % self.num_heads:
            raise ValueError(
                f"cross-attention width {c} is not divisible by num_heads={self.num_heads}"
            )
        kw = dict(kernel_init=xavier_uniform(), dtype=self.dtype, param_dtype=self.param_dtype)
        q = nn.Dense(c, name="q", **kw)(x)
        kv = nn.Dense(2 * c, name="kv", **kw)(context.astype(self.dtype))
        q = einops.rearrange(q, "b n (h d) -> b h n d", h=self.num_heads)
        k, v = einops.rearrange(kv, "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        out = einops.rearrange(attend(q, k, v, mask), "b h n d -> b n (h d)")
        out = nn.Dense(
            c,
            kernel_init=zeros if self.zero_init_out else xavier_uniform(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(out)
        return out * has_tokens(mask)[:, None, None].astype(out.dtype)


class PooledEmbedding(nn.Module):
    """A pooled caption vector [B, D] -> [B, features] added where a class embedding goes:
    a Dense without bias, so the zero vector of an empty caption adds exactly nothing."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled: jnp.ndarray) -> jnp.ndarray:
        return nn.Dense(
            self.features,
            use_bias=False,
            kernel_init=xavier_uniform(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="dense",
        )(pooled.astype(self.dtype))


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020), as in Stable Diffusion's
    transformer blocks: Dense(C -> 2 * mult * C), value * gelu(gate), Dense(-> C)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(kernel_init=xavier_uniform(), dtype=self.dtype, param_dtype=self.param_dtype)
        value, gate = jnp.split(nn.Dense(2 * self.mult * x.shape[-1], name="proj", **kw)(x), 2, -1)
        return nn.Dense(x.shape[-1], name="out", **kw)(value * nn.gelu(gate, approximate=False))


class SpatialTransformer(nn.Module):
    """Stable-Diffusion transformer block on a feature map [B, H, W, C].

    With ``context=None`` the cross-attention sub-layer is skipped (its weights, if any,
    unused): the unconditional path, which equals an empty caption exactly."""

    num_heads: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        context: Optional[jnp.ndarray] = None,
        mask: Optional[jnp.ndarray] = None,
    ) -> jnp.ndarray:
        _, height, width, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def layer_norm(name):
            return nn.LayerNorm(epsilon=1e-5, name=name, **kw)

        h = nn.GroupNorm(self.norm_groups, epsilon=1e-6, name="norm", **kw)(x)
        h = einops.rearrange(h, "b h w c -> b (h w) c")
        h = nn.Dense(c, kernel_init=xavier_uniform(), name="proj_in", **kw)(h)
        h = h + MultiHeadSelfAttention(self.num_heads, name="attn1", **kw)(layer_norm("norm1")(h))
        if context is not None:
            h = h + CrossAttention(self.num_heads, zero_init_out=False, name="attn2", **kw)(
                layer_norm("norm2")(h), context, mask
            )
        h = h + GEGLU(name="ff", **kw)(layer_norm("norm3")(h))
        h = nn.Dense(c, kernel_init=zeros, name="proj_out", **kw)(h)
        return x + einops.rearrange(h, "b (h w) c -> b h w c", h=height, w=width)


__all__ = ("CrossAttention", "GEGLU", "PooledEmbedding", "SpatialTransformer", "has_tokens")
