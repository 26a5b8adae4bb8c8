"""Building blocks shared by the UNet and the DiT — one copy of each.

Conventions: images are NHWC, token sequences are [B, N, C]. Every module takes
``dtype`` (compute dtype, e.g. bfloat16 on accelerators) and ``param_dtype``
(storage dtype of the parameters, float32). Softmax and normalization statistics are
computed in float32 whatever the compute dtype. Every rearrangement uses einops.

Initialization follows the papers: DDPM (Ho et al. 2020) initializes every conv/dense
with fan-avg uniform variance scaling (= Glorot/Xavier uniform) and zero-initializes the
last layer of each residual branch and the output conv; DiT (Peebles & Xie 2023) uses
Xavier uniform for linears and zero-initializes the adaLN modulation and final layer.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.conv import Conv

Dtype = Any
Initializer = Callable[..., jnp.ndarray]

xavier_uniform = nn.initializers.xavier_uniform
zeros = nn.initializers.zeros


# --------------------------------------------------------------------------- embeddings


def timestep_embedding(
    t: jnp.ndarray,
    dim: int,
    max_period: float = 10000.0,
    cos_first: bool = True,
    freq_shift: float = 0.0,
) -> jnp.ndarray:
    """Sinusoidal embedding [B, dim] of (integer or real) timesteps ``t`` [B].

    Frequencies ``max_period ** (-i / (dim // 2 - freq_shift))``, cosines then sines when
    ``cos_first`` (the ADM / DiT layout, the default; Vaswani et al. 2017 for the idea).
    The DDPM code (and diffusers' ``flip_sin_to_cos=False, freq_shift=1``) puts sines
    first and divides by ``dim // 2 - 1``; ported weights need the layout they were
    trained with. Always computed in float32: timesteps up to 1000 times high
    frequencies need the mantissa.
    """
    t = jnp.asarray(t, jnp.float32)
    half = dim // 2
    exponent = jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t[:, None] * jnp.exp(-math.log(max_period) * exponent)[None, :]  # [B, half]
    parts = [jnp.cos(args), jnp.sin(args)]
    emb = jnp.concatenate(parts if cos_first else parts[::-1], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of t followed by Dense -> SiLU -> Dense (DDPM, ADM, DiT).

    ``freq_dim`` is the sinusoid width (DDPM: base channels; DiT: 256), ``features`` the
    output width (DDPM: 4 x base channels; DiT: hidden size); ``cos_first`` and
    ``freq_shift`` choose the sinusoid's layout (``timestep_embedding``).
    """

    freq_dim: int
    features: int
    kernel_init: Initializer = xavier_uniform()
    cos_first: bool = True
    freq_shift: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
        emb = timestep_embedding(
            t, self.freq_dim, cos_first=self.cos_first, freq_shift=self.freq_shift
        )

        def dense(name):
            return nn.Dense(
                self.features,
                kernel_init=self.kernel_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        return dense("dense1")(nn.silu(dense("dense0")(emb)))


class LabelEmbedding(nn.Module):
    """Class-label table with ``num_classes + 1`` rows; row ``num_classes`` is the "null"
    label used for classifier-free guidance (Ho & Salimans 2022). ``y=None`` means every
    example is unconditional. Label dropout belongs to the training step, not here."""

    num_classes: int
    features: int
    embedding_init: Initializer = nn.initializers.normal(stddev=0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: Optional[jnp.ndarray], batch_size: int) -> jnp.ndarray:
        if y is None:
            y = jnp.full((batch_size,), self.num_classes, jnp.int32)
        table = nn.Embed(
            self.num_classes + 1,
            self.features,
            embedding_init=self.embedding_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="table",
        )
        return table(y)


def sincos_pos_embed_2d(
    height: int, width: int, dim: int, max_period: float = 10000.0
) -> np.ndarray:
    """Fixed 2D sin-cos position embedding [height * width, dim] (row-major tokens).

    The first dim/2 channels encode the column (x) coordinate, the rest the row (y), each
    as [sin, cos] of ``pos * max_period ** (-i / (dim / 4))`` — the layout of the DiT /
    MAE code, so ported weights see the embedding they were trained with. A numpy
    constant, not a parameter.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")

    def embed_1d(pos: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / max_period ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None].astype(np.float64) * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_y, grid_x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    emb = np.concatenate([embed_1d(grid_x, dim // 2), embed_1d(grid_y, dim // 2)], axis=1)
    return emb.astype(np.float32)


# --------------------------------------------------------------------------- patches


def patchify(x: jnp.ndarray, patch_size: int) -> jnp.ndarray:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C] non-overlapping patches, row-major."""
    p = patch_size
    return einops.rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)


def unpatchify(x: jnp.ndarray, patch_size: int, height: int, width: int) -> jnp.ndarray:
    """Inverse of ``patchify``: [B, (H/p)(W/p), p*p*C] -> [B, H, W, C] (H, W: image size)."""
    p = patch_size
    return einops.rearrange(
        x, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c", h=height // p, w=width // p, p1=p, p2=p
    )


# --------------------------------------------------------------------------- resampling


class _Resample(nn.Module):
    """What Downsample and Upsample share: an optional 3x3 conv (DDPM) and its dtypes."""

    use_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"  # see Conv

    def conv(self, x: jnp.ndarray, strides=(1, 1)) -> jnp.ndarray:
        """The 3x3 "SAME" conv keeping the channel count (parameters under "conv")."""
        return Conv(
            x.shape[-1],
            (3, 3),
            strides=strides,
            padding="SAME",
            kernel_init=xavier_uniform(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            conv_impl=self.conv_impl,
            name="conv",
        )(x)


class Downsample(_Resample):
    """Halve H and W: 3x3 stride-2 conv (DDPM, ``use_conv``) or 2x2 average pooling."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.use_conv:
            # padding 'SAME' with stride 2 = TF's convention, as in the DDPM code.
            return self.conv(x, strides=(2, 2))
        return einops.reduce(x, "b (h 2) (w 2) c -> b h w c", "mean")


class Upsample(_Resample):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv if ``use_conv`` (DDPM)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = einops.repeat(x, "b h w c -> b (h 2) (w 2) c")
        if self.use_conv:
            x = self.conv(x)
        return x


# --------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """GroupNorm/SiLU residual block conditioned on an embedding ``emb`` [B, D]
    (timestep, plus class when conditional).

    - additive (DDPM): h = conv1(silu(norm1(x))) + dense(silu(emb)); h = silu(norm2(h))
    - scale-shift / FiLM (ADM, ``use_scale_shift_norm``): dense gives (scale, shift) and
      h = silu(norm2(h) * (1 + scale) + shift)
    then dropout and a zero-initialized conv2, so the block starts as the identity (or
    the skip projection). ``resample="up"|"down"`` makes it ADM's resampling ResBlock:
    both branches are resampled (nearest / average pool) before conv1.
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    resample: Optional[str] = None  # None | "up" | "down"
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"  # see Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def norm(name):
            return nn.GroupNorm(self.norm_groups, name=name, **kw)

        def conv(name, init):
            return Conv(
                self.out_channels,
                (3, 3),
                padding="SAME",
                kernel_init=init,
                conv_impl=self.conv_impl,
                name=name,
                **kw,
            )

        h = nn.silu(norm("norm1")(x))
        if self.resample == "down":
            h, x = Downsample(False)(h), Downsample(False)(x)
        elif self.resample == "up":
            h, x = Upsample(False)(h), Upsample(False)(x)
        elif self.resample is not None:
            raise ValueError(f"resample must be None, 'up' or 'down', got {self.resample!r}")
        h = conv("conv1", xavier_uniform())(h)

        n_emb = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = nn.Dense(n_emb, kernel_init=xavier_uniform(), name="emb_proj", **kw)(nn.silu(emb))
        emb_out = einops.rearrange(emb_out, "b c -> b 1 1 c")
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm("norm2")(h) * (1 + scale) + shift
        else:
            h = norm("norm2")(h + emb_out)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv("conv2", zeros)(h)

        if x.shape[-1] != self.out_channels:  # 1x1 projection (DDPM's "nin_shortcut")
            x = nn.Dense(self.out_channels, kernel_init=xavier_uniform(), name="skip", **kw)(x)
        return x + h


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, key_mask=None) -> jnp.ndarray:
    """Multi-head scaled dot-product attention: q [B, H, N, D], k and v [B, H, M, D] ->
    [B, H, N, D], softmax in float32. ``key_mask`` [B, M] (True = attend) hides padding
    keys; a query whose keys are all hidden gets uniform weights here, so callers that
    allow an empty key set zero that output themselves (cross_attention.py does)."""
    q = q * (q.shape[-1] ** -0.5)
    logits = jnp.einsum("bhnd,bhmd->bhnm", q, k).astype(jnp.float32)
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, -1e9)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhnm,bhmd->bhnd", weights, v)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention over tokens [B, N, C].

    One fused qkv projection C -> 3C (same parameters as separate q, k, v), softmax in
    float32, output projection C -> C (zero-initialized when ``zero_init_out``, as in
    DDPM's attention block so that it starts as the identity). ``key_mask`` [B, N]
    (True = a real token) keeps padding tokens from being attended to (the text encoder).
    """

    num_heads: int
    zero_init_out: bool = False
    kernel_init: Initializer = xavier_uniform()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, key_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        c = x.shape[-1]
        if c % self.num_heads:
            raise ValueError(f"attention width {c} is not divisible by num_heads={self.num_heads}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = nn.Dense(3 * c, kernel_init=self.kernel_init, name="qkv", **kw)(x)
        q, k, v = einops.rearrange(
            qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads
        )
        out = einops.rearrange(attend(q, k, v, key_mask), "b h n d -> b n (h d)")
        out_init = zeros if self.zero_init_out else self.kernel_init
        return nn.Dense(c, kernel_init=out_init, name="proj", **kw)(out)


class AttentionBlock(nn.Module):
    """Spatial self-attention for feature maps: x + attn(GroupNorm(x)) over the H*W
    positions (DDPM / ADM). The output projection is zero-initialized."""

    num_heads: int = 1
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        _, height, width, _ = x.shape
        h = nn.GroupNorm(
            self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )(x)
        h = einops.rearrange(h, "b h w c -> b (h w) c")
        h = MultiHeadSelfAttention(
            self.num_heads,
            zero_init_out=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )(h)
        h = einops.rearrange(h, "b (h w) c -> b h w c", h=height, w=width)
        return x + h


class MlpBlock(nn.Module):
    """Transformer MLP: Dense(hidden) -> GELU (tanh approximation, as DiT) -> Dense(out)."""

    hidden_features: int
    kernel_init: Initializer = xavier_uniform()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        out_features = x.shape[-1]
        x = nn.Dense(self.hidden_features, name="fc1", **kw)(x)
        x = nn.gelu(x, approximate=True)
        return nn.Dense(out_features, name="fc2", **kw)(x)


# --------------------------------------------------------------------------- adaLN


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """Adaptive layer-norm modulation x * (1 + scale) + shift (DiT)."""
    return x * (1 + scale) + shift


class AdaLNModulation(nn.Module):
    """SiLU -> zero-initialized Dense producing ``num_chunks`` vectors of width
    ``features`` from the conditioning c [B, D]; each returned as [B, 1, features] to
    broadcast over tokens. Zero init = adaLN-Zero (DiT): every gate starts at 0."""

    num_chunks: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: jnp.ndarray) -> Tuple[jnp.ndarray, ...]:
        out = nn.Dense(
            self.num_chunks * self.features,
            kernel_init=zeros,
            bias_init=zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="dense",
        )(nn.silu(c))
        out = einops.rearrange(out, "b (k c) -> k b 1 c", k=self.num_chunks)
        return tuple(out[i] for i in range(self.num_chunks))


__all__: Sequence[str] = (
    "timestep_embedding",
    "TimestepEmbedding",
    "LabelEmbedding",
    "sincos_pos_embed_2d",
    "patchify",
    "unpatchify",
    "Downsample",
    "Upsample",
    "ResBlock",
    "attend",
    "MultiHeadSelfAttention",
    "AttentionBlock",
    "MlpBlock",
    "modulate",
    "AdaLNModulation",
)
