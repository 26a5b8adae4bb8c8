"""Convolutions whose gradients can be computed explicitly.

``Conv`` is ``nn.Conv`` with a ``conv_impl`` choice: "xla" (JAX autodiff of
``lax.conv_general_dilated``) or "explicit_grad" (``conv_general_dilated_explicit_grad``, a
``jax.custom_vjp`` whose input and weight gradients are written as forward convolutions).
Same parameters either way. Why: XLA:CPU runs autodiff convolution gradients inside
``lax.scan`` as naive loops (16 s vs 0.43 s per digits train step), so scanned training
steps (``train.steps_per_dispatch > 1``) need the explicit form; see docs/jax-stack.md.
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")
Padding2D = Tuple[Tuple[int, int], Tuple[int, int]]


def _conv_nhwc(x, w, strides, padding, precision, lhs_dilation=(1, 1)):
    return jax.lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        lhs_dilation=lhs_dilation,
        dimension_numbers=_NHWC,
        precision=precision,
    )


def _conv_input_grad(dy, w, x_shape, strides, padding: Padding2D, precision):
    """dL/dx of y = conv(x, w) as an ordinary NHWC/HWIO conv: dy dilated by the strides,
    against the spatially flipped kernel with in/out swapped ([kh, kw, O, C])."""
    pads = []
    for d in range(2):
        k, s, lo = w.shape[d], strides[d], padding[d][0]
        n, n_out = x_shape[1 + d], dy.shape[1 + d]
        pads.append((k - 1 - lo, n - s * (n_out - 1) - 1 + lo))
    w_t = einops.rearrange(jnp.flip(w, (0, 1)), "kh kw c o -> kh kw o c")
    return _conv_nhwc(dy, w_t, (1, 1), pads, precision, lhs_dilation=strides)


def _conv_weight_grad(x, dy, kernel_hw, strides, padding: Padding2D, precision):
    """dL/dw of y = conv(x, w) as an ordinary NHWC/HWIO conv over the batch: x as [C, H, W, B]
    (images = channels, features = batch) against dy as a [Ho, Wo, B, O] "kernel" dilated
    by the strides; the output [C, >=kh, >=kw, O] is cropped to the kernel size."""
    kh, kw = kernel_hw
    x_t = einops.rearrange(x, "b h w c -> c h w b")
    dy_t = einops.rearrange(dy, "b h w o -> h w b o")
    dw = jax.lax.conv_general_dilated(
        x_t,
        dy_t,
        (1, 1),
        padding,
        rhs_dilation=strides,
        dimension_numbers=_NHWC,
        precision=precision,
    )
    return einops.rearrange(dw[:, :kh, :kw, :], "c kh kw o -> kh kw c o")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_explicit_grad(x, w, strides, padding: Padding2D, precision):
    return _conv_nhwc(x, w, strides, padding, precision)


def _conv_explicit_grad_fwd(x, w, strides, padding, precision):
    return _conv_nhwc(x, w, strides, padding, precision), (x, w)


def _conv_explicit_grad_bwd(strides, padding, precision, res, dy):
    x, w = res
    dx = _conv_input_grad(dy, w, x.shape, strides, padding, precision)
    dw = _conv_weight_grad(x, dy, w.shape[:2], strides, padding, precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv_explicit_grad.defvjp(_conv_explicit_grad_fwd, _conv_explicit_grad_bwd)


def conv_general_dilated_explicit_grad(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """``jax.lax.conv_general_dilated`` whose gradients are spelled out as two ordinary
    NHWC/HWIO convolutions (custom VJP) instead of JAX's transposed-dimension convs.

    Same values and gradients (to float rounding). Why: XLA:CPU (jaxlib 0.10.2) rewrites
    JAX's gradient convs into library calls only outside loops; inside a ``lax.scan``
    body (``train.steps_per_dispatch > 1``) they stay non-canonical and run as naive
    loops, ~40x slower (digits UNet: 16.1 s vs 0.42 s per step; benchmarks/README.md).
    Outside loops it compiles to the same work as autodiff. Handles 2-D NHWC/HWIO convs
    without dilation or groups (every UNet conv); anything else falls back to lax.
    Reverse mode only (a custom VJP: no jax.jvp / forward-over-reverse through it).
    """
    simple = (
        lhs.ndim == 4
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and all(d == 1 for d in (lhs_dilation or (1,)))
        and all(d == 1 for d in (rhs_dilation or (1,)))
    )
    if simple:
        simple = jax.lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, dimension_numbers
        ) == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    if not simple:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_explicit_grad(lhs, rhs, strides, padding, precision)


# conv_impl -> the conv_general_dilated an nn.Conv uses (None = lax's, autodiff gradients).
CONV_IMPLS = {"xla": None, "explicit_grad": conv_general_dilated_explicit_grad}


def Conv(features: int, kernel_size: Sequence[int], *, conv_impl: str = "xla", **kwargs) -> nn.Conv:
    """``nn.Conv(features, kernel_size, **kwargs)`` computing its gradients the
    ``conv_impl`` way ("xla": JAX autodiff; "explicit_grad": see
    ``conv_general_dilated_explicit_grad``). Same parameters (names, shapes, init)."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {conv_impl!r}; valid: {list(CONV_IMPLS)}")
    return nn.Conv(features, kernel_size, conv_general_dilated=CONV_IMPLS[conv_impl], **kwargs)
