"""Text conditioning: a small transformer text encoder and the text-conditioned denoiser.

``TextEncoder`` maps token ids [B, L] (0 = padding, see tokenizer.py) to per-token
embeddings [B, L, width] and the padding mask [B, L]: token + learned position embeddings
(N(0, 0.02)), ``depth`` pre-LayerNorm transformer blocks whose self-attention never looks
at padding, a final LayerNorm. It is trained jointly with the denoiser, as the text-to-image
model of the latent diffusion paper trains its transformer encoder (Rombach et al. 2022,
sec. 4.3.1). The position table has ``max_length`` rows and a batch of L <= max_length
tokens uses the first L, so a caption padded to any length gives the same embeddings for
its real tokens.

``TextConditional`` wraps a backbone (UNet or DiT, built with ``cross_attention`` when
``conditioning == "cross"``) and the encoder into one model with the (x, t, y) signature of
every denoiser, y being the token ids:
  cross:  the backbone cross-attends to the token embeddings (Stable Diffusion / PixArt-alpha);
  pooled: the masked mean of the token embeddings goes through the backbone's class
          embedding path (one vector added to the timestep embedding), the baseline that
          cross-attention is measured against.
An empty caption (all padding) contributes exactly nothing in either mode: it is the
unconditional model that classifier-free guidance subtracts.
"""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import guidance_input
from diffusion_jax.models.layers import MlpBlock, MultiHeadSelfAttention

Dtype = Any
CONDITIONINGS = ("cross", "pooled")
PAD_ID = 0  # the tokenizer's padding id (tokenizer.PAD_ID; models import nothing outside)


class TextEncoder(nn.Module):
    """Transformer encoder over token ids; returns (embeddings [B, L, width], mask [B, L])."""

    vocab_size: int
    max_length: int = 16
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
        batch, length = tokens.shape
        if length > self.max_length:
            raise ValueError(
                f"{length} tokens but the text encoder's max_length is {self.max_length}; "
                f"shorten the captions or raise model.text.max_length"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(0.02)
        mask = tokens != PAD_ID
        h = nn.Embed(self.vocab_size, self.width, embedding_init=init, name="token_embed", **kw)(
            tokens
        )
        pos = self.param("pos_embed", init, (self.max_length, self.width), self.param_dtype)
        h = h + pos[:length].astype(self.dtype)[None]
        for i in range(self.depth):
            a = nn.LayerNorm(name=f"block{i}_norm1", **kw)(h)
            h = h + MultiHeadSelfAttention(self.num_heads, name=f"block{i}_attn", **kw)(a, mask)
            a = nn.LayerNorm(name=f"block{i}_norm2", **kw)(h)
            h = h + MlpBlock(4 * self.width, name=f"block{i}_mlp", **kw)(a)
        return nn.LayerNorm(name="norm_out", **kw)(h), mask


def pooled_embedding(context: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean of the real tokens' embeddings [B, D]; exactly zero for an empty caption, and
    the backbones project it without a bias (``PooledEmbedding``), so the empty caption
    adds nothing."""
    weights = mask.astype(context.dtype)[..., None]
    return (context * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


class TextConditional(nn.Module):
    """A denoiser conditioned on token ids: ``(x, t, tokens, train) -> output``."""

    backbone: nn.Module
    encoder: TextEncoder
    conditioning: str = "cross"

    @nn.nowrap
    def check_input_shape(self, height: int, width: int, channels: int) -> None:
        self.backbone.check_input_shape(height, width, channels)

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    def __call__(
        self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray, train: bool = False, **kwargs
    ):
        """``y``: token ids [B, L]; for a backbone with ``guidance_input``
        {"y": tokens, "w": scales [B]}, w passed on to the backbone. ``kwargs`` go to the
        backbone too (a ControlNet's ``control`` residuals for a UNet)."""
        tokens, w = guidance_input.split(y, getattr(self.backbone, "guidance_input", False))
        inner = None if w is None else {"y": None, "w": w}
        return self.backbone(x, t, inner, train, **self.text_inputs(tokens), **kwargs)

    def text_inputs(self, tokens: jnp.ndarray) -> dict:
        """What the backbone reads of a caption, as keyword arguments: ``context`` and
        ``context_mask`` (cross) or ``pooled``. A ControlNet over this model gets the same
        (``apply(..., method="text_inputs")``)."""
        if tokens is None or jnp.ndim(tokens) != 2:
            raise ValueError(
                "a text-conditioned model takes token ids [B, L] as y (tokenizer.py); got "
                f"{None if tokens is None else jnp.shape(tokens)}"
            )
        context, mask = self.encoder(tokens)
        if self.conditioning == "cross":
            return {"context": context, "context_mask": mask}
        return {"pooled": pooled_embedding(context, mask)}


__all__ = ("TextEncoder", "TextConditional", "CONDITIONINGS", "pooled_embedding")
