"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), NHWC in and out.

patchify -> linear patch embedding + fixed 2D sin-cos positions -> N adaLN-Zero blocks
conditioned on c = t_embed + label_embed -> adaLN final layer -> unpatchify. Every
modulation and the final projection are zero-initialized, so a fresh DiT outputs exactly
zero and every block starts as the identity. Classifier-free-guidance label dropout is
done by the training step (replace labels by ``num_classes``), not hidden in the model.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import guidance_input
from diffusion_jax.models.cross_attention import CrossAttention, PooledEmbedding
from diffusion_jax.models.guidance_input import GuidanceEmbedding
from diffusion_jax.models.layers import (
    AdaLNModulation,
    LabelEmbedding,
    MlpBlock,
    MultiHeadSelfAttention,
    TimestepEmbedding,
    modulate,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
    xavier_uniform,
    zeros,
)

Dtype = Any


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    # DiT's LayerNorms have no affine parameters (adaLN supplies scale and shift), eps 1e-6.
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, name=name)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: shift/scale/gate for attention and MLP from c.

    With ``cross_attention`` (PixArt-alpha, Chen et al. 2023, sec. 2.3) a cross-attention
    layer on the context tokens sits between the two, residual, unmodulated, its output
    projection zero-initialized; skipped when ``context`` is None (the unconditional path).
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    cross_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, c: jnp.ndarray, context=None, context_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLNModulation(
            6, self.hidden_size, name="adaLN", **kw
        )(c)
        h = modulate(_layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
        x = x + gate_msa * MultiHeadSelfAttention(self.num_heads, name="attn", **kw)(h)
        if self.cross_attention and context is not None:
            x = x + CrossAttention(self.num_heads, name="cross_attn", **kw)(
                x, context, context_mask
            )
        h = modulate(_layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        x = x + gate_mlp * MlpBlock(int(self.hidden_size * self.mlp_ratio), name="mlp", **kw)(h)
        return x


class DiTFinalLayer(nn.Module):
    """adaLN (shift, scale) + zero-initialized linear to p*p*out_channels per token."""

    hidden_size: int
    out_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift, scale = AdaLNModulation(2, self.hidden_size, name="adaLN", **kw)(c)
        x = modulate(_layer_norm(self.dtype, "norm")(x), shift, scale)
        return nn.Dense(self.out_features, kernel_init=zeros, name="linear", **kw)(x)


class DiT(nn.Module):
    """Diffusion Transformer.

    Attributes:
      patch_size: side p of the square patches; H and W must be divisible by p.
      hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP ratio.
      freq_embed_dim: width of the timestep sinusoid before its MLP (256 in DiT).
      time_init_std, label_init_std: std of the normal init of the timestep MLP kernels
        and of the label table (0.02 in DiT, both). At 0.02 the conditioning c is ~0.03
        per channel and a short run barely learns the label; docs/dit.md measures it.
      num_classes: 0 = unconditional; else num_classes + 1 label rows, the last = null.
      cross_attention: every block cross-attends to ``context`` [B, M, D] (with
        ``context_mask``) when one is given (PixArt-alpha); set by the model registry for
        text models. A ``pooled`` caption vector [B, D] is added to c like a label.
      guidance_input: the condition is {"y": labels or None, "w": guidance scales [B]}
        and w's embedding is added to c (models/guidance_input.py).
      out_channels: output channels; None = input channels (DiT's learned-sigma models use
        2x the input channels).
      dtype / param_dtype: compute / parameter dtypes. The output is float32.
    """

    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    freq_embed_dim: int = 256
    time_init_std: float = 0.02
    label_init_std: float = 0.02
    num_classes: int = 0
    cross_attention: bool = False
    guidance_input: bool = False
    out_channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.nowrap
    def check_input_shape(self, height: int, width: int, channels: int) -> None:
        """Raise a ValueError naming the fix if an input of this size cannot be used."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"DiT with patch_size={p} needs height and width divisible by {p}; got "
                f"{height}x{width}. Resize/pad the images (e.g. to "
                f"{max(p, round(height / p) * p)}x{max(p, round(width / p) * p)}) or use a "
                f"patch size that divides the image size."
            )
        if channels < 1:
            raise ValueError(f"DiT input needs at least one channel, got {channels}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiT hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}."
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"DiT hidden_size={self.hidden_size} must be divisible by 4 "
                f"for the 2D sin-cos position embedding."
            )

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        t: jnp.ndarray,
        y: Optional[jnp.ndarray] = None,
        train: bool = False,
        *,
        context: Optional[jnp.ndarray] = None,
        context_mask: Optional[jnp.ndarray] = None,
        pooled: Optional[jnp.ndarray] = None,
    ) -> jnp.ndarray:
        del train  # DiT has no dropout; label dropout lives in the training step.
        batch, height, width, channels = x.shape
        self.check_input_shape(height, width, channels)
        p, hidden = self.patch_size, self.hidden_size
        out_channels = self.out_channels or channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        # Patch embedding: a linear map of flattened p x p x C patches (= a stride-p conv),
        # Xavier-initialized on the flattened view as in DiT.
        tokens = patchify(x.astype(self.dtype), p)  # [B, N, p*p*C]
        tokens = nn.Dense(hidden, kernel_init=xavier_uniform(), name="patch_embed", **kw)(tokens)
        pos = sincos_pos_embed_2d(height // p, width // p, hidden)  # [N, hidden], fixed
        tokens = tokens + jnp.asarray(pos, self.dtype)[None]

        # Conditioning c [B, hidden]; DiT initializes the timestep MLP and the label table
        # with N(0, 0.02).
        y, w = guidance_input.split(y, self.guidance_input)
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        time_init = nn.initializers.normal(self.time_init_std)
        c = TimestepEmbedding(
            self.freq_embed_dim, hidden, kernel_init=time_init, name="t_embed", **kw
        )(t)
        if self.num_classes > 0:
            label_init = nn.initializers.normal(self.label_init_std)
            c = c + LabelEmbedding(
                self.num_classes, hidden, embedding_init=label_init, name="y_embed", **kw
            )(y, batch)
        elif y is not None:
            raise ValueError(
                "this DiT is unconditional (num_classes=0) but labels y were "
                "given; pass y=None or set model.num_classes."
            )
        if pooled is not None:
            c = c + PooledEmbedding(hidden, name="caption_embed", **kw)(pooled)
        if w is not None:
            c = c + GuidanceEmbedding(hidden, name="guidance_embed", **kw)(w, batch)
        if context is not None and not self.cross_attention:
            raise ValueError("a context was given to a DiT built without cross_attention")

        for i in range(self.depth):
            block = DiTBlock(
                hidden, self.num_heads, self.mlp_ratio, self.cross_attention, name=f"block{i}", **kw
            )
            tokens = block(tokens, c, context, context_mask)
        tokens = DiTFinalLayer(hidden, p * p * out_channels, name="final", **kw)(tokens, c)
        return unpatchify(tokens, p, height, width).astype(jnp.float32)


# Table 1 of Peebles & Xie 2023: (depth, hidden size, heads) per size; patch sizes 2/4/8.
DIT_SIZES: Dict[str, Dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIT_PATCH_SIZES: Tuple[int, ...] = (2, 4, 8)

DIT_PRESETS: Dict[str, Dict[str, Any]] = {
    f"DiT-{size}/{p}": dict(DIT_SIZES[size], patch_size=p, mlp_ratio=4.0)
    for size, p in itertools.product(DIT_SIZES, DIT_PATCH_SIZES)
}

__all__: Tuple[str, ...] = ("DiT", "DiTBlock", "DiTFinalLayer", "DIT_PRESETS", "DIT_SIZES")
