"""LoRA (Hu et al. 2021) as a functional delta over frozen parameters.

A LoRA tree mirrors the base parameters, but only at the selected kernels, and holds two
factors there: ``{"lora_a": [m, r], "lora_b": [r, n]}``. A kernel of any rank is seen as
the matrix [m, n] = [prod(shape[:-1]), shape[-1]]: a Dense kernel [in, out] is itself, a
convolution [kh, kw, in, out] becomes [kh * kw * in, out] (so A is an r-channel kh x kw
convolution and B a 1x1 one), and an embedding table [rows, D] is itself too (a class-label
or token table: what subject tuning adapts, subject.py). The adapted kernel is

  W' = W + scale * (alpha / r) * reshape(A @ B, W.shape)

with B initialised to zero, so a fresh LoRA changes nothing (exactly: W + 0 = W) and the
first gradient reaches B only. ``scale`` is the sampling-time strength (``--lora_scale``),
an ordinary traced argument: a new scale never recompiles.

Kernels are chosen by regular expressions searched in the kernel's path, "/"-joined
(e.g. ``backbone/block3/attn/qkv/kernel``). The model modules know nothing of this.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

A, B = "lora_a", "lora_b"
# Every attention projection and feed-forward layer of the UNet, DiT and text encoder
# (self- and cross-attention; Stable Diffusion LoRA's usual choice plus the MLPs). One
# pattern, so that a model without feed-forward layers (the plain UNet) matches it too.
DEFAULT_TARGETS = (r"(attn\d*/(qkv|q|kv|proj)|(mlp|ff)/\w+)/kernel$",)


def _kernels(params) -> dict:
    """{"a/b/kernel": array} of every leaf named ``kernel`` or ``embedding`` (a table)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return {path: leaf for path, leaf in flat.items() if path.endswith(("kernel", "embedding"))}


def select(params, targets: Sequence[str]) -> list[str]:
    """The kernel paths (sorted) matched by any pattern of ``targets``. A ValueError names a
    pattern that matches nothing, with examples of the kernel paths there are."""
    kernels = sorted(_kernels(params))
    chosen = set()
    for pattern in targets:
        try:
            hits = [p for p in kernels if re.search(pattern, p)]
        except re.error as e:
            raise ValueError(f"adapter.targets: bad regular expression {pattern!r}: {e}") from None
        if not hits:
            examples = ", ".join(kernels[:: max(1, len(kernels) // 6)][:6])
            raise ValueError(
                f"adapter.targets pattern {pattern!r} matches no kernel of the base model "
                f"({len(kernels)} kernels, e.g. {examples})"
            )
        chosen.update(hits)
    return sorted(chosen)


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The [m, n] a kernel of ``shape`` is adapted as."""
    return math.prod(shape[:-1]), shape[-1]


def init(params, targets: Sequence[str], rank: int, key: jax.Array):
    """A fresh LoRA tree: A ~ N(0, 1/m) (a variance-preserving down-projection, like
    Kaiming-normal with gain 1), B = 0. Each kernel's A is drawn from ``key`` folded with
    its index in sorted path order, so the tree does not depend on dict ordering."""
    if rank < 1:
        raise ValueError(f"adapter.rank must be >= 1, got {rank}")
    kernels = _kernels(params)
    flat = {}
    for i, path in enumerate(select(params, targets)):
        m, n = matrix_shape(kernels[path].shape)
        if rank > min(m, n):
            raise ValueError(
                f"adapter.rank={rank} exceeds min(m, n) = {min(m, n)} of {path} "
                f"({m}x{n} as a matrix); lower adapter.rank or drop that target"
            )
        a = jax.random.normal(jax.random.fold_in(key, i), (m, rank)) / math.sqrt(m)
        flat[tuple(path.split("/")) + (A,)] = a.astype(jnp.float32)
        flat[tuple(path.split("/")) + (B,)] = jnp.zeros((rank, n), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def _factors(lora) -> dict:
    """{path tuple of the kernel: (A, B)}."""
    flat = traverse_util.flatten_dict(lora)
    return {
        path[:-1]: (flat[path[:-1] + (A,)], leaf) for path, leaf in flat.items() if path[-1] == B
    }


def _apply(params, lora, alpha: float, scale, sign: float):
    flat = traverse_util.flatten_dict(params)
    for path, (a, b) in _factors(lora).items():
        if path not in flat:
            raise ValueError(
                f"the LoRA adapts {'/'.join(path)}, which the base parameters lack: "
                "this LoRA was trained on another model"
            )
        w = flat[path]
        delta = (a @ b).reshape(w.shape) * (sign * scale * alpha / a.shape[1])
        flat[path] = w + delta.astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def merge(params, lora, alpha: float, scale=1.0):
    """The base parameters with the LoRA's delta added (``scale`` may be traced)."""
    return _apply(params, lora, alpha, scale, 1.0)


def unmerge(merged, lora, alpha: float, scale=1.0):
    """``merge``'s inverse, up to float rounding: the merged parameters minus the delta."""
    return _apply(merged, lora, alpha, scale, -1.0)


def num_params(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


__all__ = ("DEFAULT_TARGETS", "init", "matrix_shape", "merge", "num_params", "select", "unmerge")
