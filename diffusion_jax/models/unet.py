"""Convolutional UNet noise-prediction network (NHWC), DDPM and ADM style.

DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", App. B): ResBlocks with
additive timestep conditioning, conv down/up-sampling, single-head attention at chosen
resolutions. ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs") options:
scale-shift (FiLM) norm, several heads / fixed head width, ResBlock up/down-sampling,
class conditioning. The model knows nothing of diffusion: it maps (x_t, t, y) to an
output with the shape of x_t (or ``out_channels`` channels).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import guidance_input
from diffusion_jax.models.cross_attention import PooledEmbedding, SpatialTransformer
from diffusion_jax.models.guidance_input import GuidanceEmbedding
from diffusion_jax.models.layers import (
    AttentionBlock,
    Conv,
    Downsample,
    LabelEmbedding,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    xavier_uniform,
    zeros,
)

Dtype = Any


class UNet(nn.Module):
    """UNet over NHWC images.

    Attributes:
      base_channels: channels of the first level (DDPM "ch"); the timestep sinusoid has
        this width and the embedding MLP 4x it.
      channel_mult: per-level channel multipliers; ``len(channel_mult)`` levels, so the
        input side must be divisible by ``2 ** (len(channel_mult) - 1)``.
      num_res_blocks: ResBlocks per level on the way down (one more on the way up).
      attn_resolutions: feature-map sizes (height, in pixels) where self-attention follows
        each ResBlock, as in DDPM (e.g. (16,) for CIFAR-10). The middle block always has
        attention.
      num_heads: attention heads, unless ``num_head_channels`` is set, in which case
        heads = channels // num_head_channels (ADM).
      dropout: dropout rate inside ResBlocks (active only with ``train=True``; uses the
        'dropout' rng collection).
      use_scale_shift_norm: FiLM conditioning (ADM) instead of additive (DDPM).
      resblock_updown: resample with ResBlocks (ADM) instead of Down/Upsample layers.
      conv_resample: Down/Upsample layers use a 3x3 conv (DDPM) rather than avg-pool /
        nearest only. Ignored when ``resblock_updown``.
      norm_groups: GroupNorm groups (32 in DDPM and ADM).
      conv_impl: how convolutions compute their gradients: "xla" (JAX autodiff) or
        "explicit_grad" (models/conv.py; same parameters and numbers, and XLA:CPU keeps them
        fast inside lax.scan, i.e. with train.steps_per_dispatch > 1).
      time_cos_first, time_freq_shift: layout of the timestep sinusoid
        (``layers.timestep_embedding``): cosines first and frequencies over dim/2 (ADM,
        the default), or sines first over dim/2 - 1 (the DDPM code: False and 1.0; the
        weight importer sets them from a diffusers config).
      num_classes: 0 = unconditional; else a label table of num_classes + 1 rows, the
        last being the null label for classifier-free guidance.
      cross_attention: every attention site (attn_resolutions and the middle) is a
        Stable-Diffusion transformer block (models/cross_attention.py) that cross-attends
        to ``context`` when one is given. Set by the model registry for text models.
      Text conditioning (models/text.py) passes ``context`` [B, M, D] with
      ``context_mask`` [B, M], or a ``pooled`` caption vector [B, D] that is added to the
        timestep embedding like a class embedding.
      guidance_input: the condition is {"y": labels or None, "w": guidance scales [B]}
        and w is embedded into the timestep embedding (models/guidance_input.py; a
        consistency student distilled over a range of guidance scales).
      out_channels: output channels; None = input channels.
      dtype / param_dtype: compute / parameter dtypes. The output is float32.
    """

    base_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    num_head_channels: Optional[int] = None
    dropout: float = 0.1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    norm_groups: int = 32
    conv_impl: str = "xla"
    time_cos_first: bool = True
    time_freq_shift: float = 0.0
    num_classes: int = 0
    cross_attention: bool = False
    guidance_input: bool = False
    out_channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.nowrap
    def check_input_shape(self, height: int, width: int, channels: int) -> None:
        """Raise a ValueError naming the fix if an input of this size cannot be used."""
        factor = 2 ** (len(self.channel_mult) - 1)
        if height % factor or width % factor:
            fix_h = max(factor, round(height / factor) * factor)
            fix_w = max(factor, round(width / factor) * factor)
            raise ValueError(
                f"UNet with channel_mult={tuple(self.channel_mult)} ({len(self.channel_mult)} "
                f"levels) halves the image {len(self.channel_mult) - 1} times, so height and "
                f"width must be divisible by {factor}; got {height}x{width}. Resize/pad the "
                f"images (e.g. to {fix_h}x{fix_w}) or use fewer channel_mult levels."
            )
        if channels < 1:
            raise ValueError(f"UNet input needs at least one channel, got {channels}")
        for level, mult in enumerate(self.channel_mult):
            width_ch = self.base_channels * mult
            if width_ch % self.norm_groups:
                raise ValueError(
                    f"UNet level width base_channels*mult = {self.base_channels}*{mult} = "
                    f"{width_ch} is not divisible by norm_groups={self.norm_groups}; change "
                    f"base_channels or norm_groups."
                )
            has_attn = (
                level == len(self.channel_mult) - 1  # the middle block
                or height // 2** level in tuple(self.attn_resolutions)
            )
            heads = self._heads(width_ch)
            if has_attn and (heads < 1 or width_ch % heads):
                raise ValueError(
                    f"UNet attention width {width_ch} is not divisible into heads (num_heads="
                    f"{self.num_heads}, num_head_channels={self.num_head_channels})."
                )

    @nn.nowrap
    def _heads(self, channels: int) -> int:
        if self.num_head_channels:
            return channels // self.num_head_channels
        return self.num_heads

    @nn.nowrap
    def _res_block(self, name, out_ch, resample=None):
        return ResBlock(
            out_ch,
            dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resample=resample,
            norm_groups=self.norm_groups,
            name=name,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    @nn.nowrap
    def _attention(self, name, h, context, context_mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads = self._heads(h.shape[-1])
        if self.cross_attention:
            block = SpatialTransformer(heads, self.norm_groups, name=name, **kw)
            return block(h, context, context_mask)
        return AttentionBlock(heads, self.norm_groups, name=name, **kw)(h)

    @nn.nowrap
    def _embedding(self, t, y, pooled, batch: int):
        """The conditioning vector emb [B, 4ch]: timestep MLP (+ class or caption vector,
        + the guidance scale's embedding for a ``guidance_input`` model)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = self.base_channels
        y, w = guidance_input.split(y, self.guidance_input)
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        emb = TimestepEmbedding(
            ch,
            4 * ch,
            cos_first=self.time_cos_first,
            freq_shift=self.time_freq_shift,
            name="time_embed",
            **kw,
        )(t)
        if self.num_classes > 0:
            # ADM's label table uses PyTorch's nn.Embedding default init, N(0, 1).
            emb = emb + LabelEmbedding(
                self.num_classes,
                4 * ch,
                embedding_init=nn.initializers.normal(1.0),
                name="label_embed",
                **kw,
            )(y, batch)
        elif y is not None:
            raise ValueError(
                "this UNet is unconditional (num_classes=0) but labels y were "
                "given; pass y=None or set model.num_classes."
            )
        if pooled is not None:
            emb = emb + PooledEmbedding(4 * ch, name="caption_embed", **kw)(pooled)
        if w is not None:
            emb = emb + GuidanceEmbedding(4 * ch, name="guidance_embed", **kw)(w, batch)
        return emb

    @nn.nowrap
    def _encode(self, x, emb, train, context, context_mask, stem=None):
        """conv_in, the down path and the middle block: (h, skips), skips being every
        activation the up path concatenates. ``stem(h)`` (ControlNet's hint) is applied
        after conv_in."""
        ckw = dict(dtype=self.dtype, param_dtype=self.param_dtype, conv_impl=self.conv_impl)
        ch = self.base_channels
        levels = len(self.channel_mult)
        h = Conv(ch, (3, 3), padding="SAME", kernel_init=xavier_uniform(), name="conv_in", **ckw)(
            x.astype(self.dtype)
        )
        if stem is not None:
            h = stem(h)
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = self._res_block(f"down{level}_res{i}", mult * ch)(h, emb, train)
                if h.shape[1] in tuple(self.attn_resolutions):
                    h = self._attention(f"down{level}_attn{i}", h, context, context_mask)
                skips.append(h)
            if level != levels - 1:
                if self.resblock_updown:
                    h = self._res_block(f"down{level}_resample", h.shape[-1], "down")(h, emb, train)
                else:
                    h = Downsample(self.conv_resample, name=f"down{level}_resample", **ckw)(h)
                skips.append(h)
        h = self._res_block("mid_res0", h.shape[-1])(h, emb, train)
        h = self._attention("mid_attn", h, context, context_mask)
        h = self._res_block("mid_res1", h.shape[-1])(h, emb, train)
        return h, skips

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
        control: Optional[Sequence[jnp.ndarray]] = None,
    ) -> jnp.ndarray:
        """``control``: residuals added to every skip activation and to the middle
        block's output, in ``_encode``'s order with the middle last (a ControlNet's
        output, models/controlnet.py)."""
        batch, height, width, channels = x.shape
        self.check_input_shape(height, width, channels)
        out_channels = self.out_channels or channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(kw, conv_impl=self.conv_impl)
        ch = self.base_channels
        levels = len(self.channel_mult)
        if context is not None and not self.cross_attention:
            raise ValueError("a context was given to a UNet built without cross_attention")
        emb = self._embedding(t, y, pooled, batch)
        h, skips = self._encode(x, emb, train, context, context_mask)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(
                    f"control has {len(control)} residuals; this UNet takes {len(skips) + 1} "
                    "(one per skip activation and the middle block)"
                )
            skips = [s + c.astype(s.dtype) for s, c in zip(skips, control)]
            h = h + control[-1].astype(h.dtype)

        # Up path: one more ResBlock per level, each eating one skip.
        for level in reversed(range(levels)):
            mult = self.channel_mult[level]
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = self._res_block(f"up{level}_res{i}", mult * ch)(h, emb, train)
                if h.shape[1] in tuple(self.attn_resolutions):
                    h = self._attention(f"up{level}_attn{i}", h, context, context_mask)
            if level != 0:
                if self.resblock_updown:
                    h = self._res_block(f"up{level}_resample", h.shape[-1], "up")(h, emb, train)
                else:
                    h = Upsample(self.conv_resample, name=f"up{level}_resample", **ckw)(h)
        assert not skips

        h = nn.silu(nn.GroupNorm(self.norm_groups, name="norm_out", **kw)(h))
        h = Conv(out_channels, (3, 3), padding="SAME", kernel_init=zeros, name="conv_out", **ckw)(h)
        return h.astype(jnp.float32)


_DDPM_CIFAR10 = dict(
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    num_heads=1,
    num_head_channels=None,
    dropout=0.1,
    use_scale_shift_norm=False,
    resblock_updown=False,
    conv_resample=True,
    norm_groups=32,
)
UNET_PRESETS: Dict[str, Dict[str, Any]] = {
    # Ho et al. 2020, CIFAR-10 32x32 (App. B; the official diffusion_tf code): 35.7M params.
    "ddpm_cifar10": _DDPM_CIFAR10,
    # Small model for the bundled 8x8x1 digits (sklearn load_digits): levels 8x8 and 4x4,
    # attention at 4x4; 2.80M parameters with 10 classes, ~0.05 GFLOPs per image.
    "digits": dict(
        _DDPM_CIFAR10,
        base_channels=64,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
    ),
    # ADM-flavoured small model (scale-shift norm, ResBlock resampling, 64-ch heads), e.g.
    # for class-conditional 32x32 experiments. Not a published size.
    "adm_small": dict(
        _DDPM_CIFAR10,
        channel_mult=(1, 2, 2),
        attn_resolutions=(16, 8),
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),
}
__all__: Tuple[str, ...] = ("UNet", "UNET_PRESETS")
