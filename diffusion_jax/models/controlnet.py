"""ControlNet (Zhang et al. 2023) for the UNet: a trainable copy of the UNet's encoder,
fed a control image, whose outputs become residuals of the frozen UNet.

``ControlNet`` has every field of the UNet it controls and builds the same embedding,
``conv_in``, down path and middle block under the same parameter names (UNet._embedding
and UNet._encode), so the copy is initialised by taking the base's parameters at those
names. Two things are its own:

* ``hint``: the control image [B, Hc, Wc, Cc] (pixels; Hc may be a power-of-two multiple
  of the UNet's input size, e.g. a 32x32 mask for 8x8 latents) goes through a small conv
  stack (``hint_channels``, SiLU, one stride-2 conv per halving) ending in a
  zero-initialised 3x3 conv to the first level's width, added after ``conv_in``;
* one zero-initialised 1x1 conv per skip activation and one for the middle block.

Its output is the list of residuals ``UNet(..., control=...)`` adds. Every residual is
exactly zero at initialisation, so the controlled UNet starts as the base UNet.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.layers import Conv, zeros
from diffusion_jax.models.unet import UNet


class ControlNet(UNet):
    """The UNet's encoder copy with a hint stem and zero convolutions (see module doc)."""

    hint_channels: Sequence[int] = (16, 32)

    @classmethod
    def of(cls, unet: UNet, hint_channels: Sequence[int] = (16, 32)) -> "ControlNet":
        """The ControlNet of ``unet``: its fields, plus the hint stem's widths."""
        fields = {
            f.name: getattr(unet, f.name)
            for f in dataclasses.fields(UNet)
            if f.init and f.name not in ("parent", "name")
        }
        return cls(**fields, hint_channels=tuple(hint_channels))

    @nn.nowrap
    def hint_factor(self, hint_size: int, size: int) -> int:
        """How many times the hint is halved to the input size (a ValueError if it is not
        the input size times a power of two)."""
        ratio = hint_size // size if size else 0
        if ratio < 1 or ratio * size != hint_size or ratio & (ratio - 1):
            raise ValueError(
                f"the control image is {hint_size} pixels high and the model's input {size}: "
                "it must be the input size times a power of two (1, 2, 4, ...)"
            )
        return int(math.log2(ratio))

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        t: jnp.ndarray,
        y: Optional[jnp.ndarray] = None,
        train: bool = False,
        *,
        hint: jnp.ndarray,
        context: Optional[jnp.ndarray] = None,
        context_mask: Optional[jnp.ndarray] = None,
        pooled: Optional[jnp.ndarray] = None,
    ) -> list:
        batch, height, width, channels = x.shape
        self.check_input_shape(height, width, channels)
        halvings = self.hint_factor(hint.shape[1], height)
        ckw = dict(dtype=self.dtype, param_dtype=self.param_dtype, conv_impl=self.conv_impl)

        def stem(h):
            g = hint.astype(self.dtype)
            for i, c in enumerate(self.hint_channels):
                g = nn.silu(Conv(c, (3, 3), padding="SAME", name=f"control_hint{i}", **ckw)(g))
            for i in range(halvings):
                g = Conv(
                    self.hint_channels[-1],
                    (3, 3),
                    strides=(2, 2),
                    padding="SAME",
                    name=f"control_hint_down{i}",
                    **ckw,
                )(g)
                g = nn.silu(g)
            return h + Conv(
                h.shape[-1],
                (3, 3),
                padding="SAME",
                kernel_init=zeros,
                name="control_hint_out",
                **ckw,
            )(g)

        emb = self._embedding(t, y, pooled, batch)
        h, skips = self._encode(x, emb, train, context, context_mask, stem=stem)
        outs = [
            Conv(s.shape[-1], (1, 1), kernel_init=zeros, name=f"control_zero{i}", **ckw)(s)
            for i, s in enumerate(skips)
        ]
        outs.append(Conv(h.shape[-1], (1, 1), kernel_init=zeros, name="control_mid", **ckw)(h))
        return outs


def own_parameter(name: str) -> bool:
    """Whether a top-level parameter of a ControlNet is its own (hint stem, zero convs)
    rather than a copy of the UNet's."""
    return name.startswith("control_")


def copy_encoder(fresh: dict, unet_params: dict) -> dict:
    """A fresh ControlNet's parameters with every copied module taken from the UNet's
    (ControlNet's initialisation: the trainable copy starts as the encoder it copies)."""
    return {k: v if own_parameter(k) else unet_params[k] for k, v in fresh.items()}


__all__ = ("ControlNet", "copy_encoder", "own_parameter")
