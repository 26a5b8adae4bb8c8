"""Filling a Flax parameter tree from a PyTorch state dict, one leaf at a time, checked.

A family's converter gives one function: our module path (e.g. ("down1_attn0", "attn",
"qkv")) -> the PyTorch module prefix that holds its weights ("down_blocks.1.attentions.0"
+ ".to_q"...), or a tuple of prefixes whose weights are concatenated along the output
dimension (our fused qkv = PyTorch's separate q, k and v). Leaves translate by name
(kernel/scale/embedding <- "weight", bias <- "bias") and by shape:

  conv kernel [kh, kw, in, out]  <- Conv2d weight [out, in, kh, kw]
  dense kernel [in, out]         <- Linear weight [out, in], or a 1x1 Conv2d weight, or a
                                    p x p stride-p Conv2d weight flattened in our patch
                                    order (p, p, in): a patch embedding is a dense layer

Every key of the state dict must be used (or be one the family declares as a constant it
checks itself), and every shape must match our abstract parameters: the first problem is
raised as a ConversionError naming the key.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple, Union

import jax
import numpy as np

from diffusion_jax.convert.weight_files import ConversionError

Source = Union[str, Tuple[str, ...]]
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def converted_shape(torch_shape: Tuple[int, ...], leaf: str, ndim: int) -> Tuple[int, ...]:
    """The shape a PyTorch tensor of ``torch_shape`` takes as our ``ndim``-dim ``leaf``."""
    if leaf == "kernel" and ndim == 4 and len(torch_shape) == 4:
        out, cin, kh, kw = torch_shape
        return (kh, kw, cin, out)
    if leaf == "kernel" and ndim == 2 and len(torch_shape) == 4:
        out, cin, kh, kw = torch_shape
        return (kh * kw * cin, out)
    if leaf == "kernel" and ndim == 2 and len(torch_shape) == 2:
        return tuple(torch_shape[::-1])
    return tuple(torch_shape)


def to_flax_leaf(weight: np.ndarray, leaf: str, ndim: int) -> np.ndarray:
    """A PyTorch tensor as our leaf (see the module docstring), float32."""
    w = np.asarray(weight)
    if leaf == "kernel" and w.ndim == 4:
        w = w.transpose(2, 3, 1, 0)
    elif leaf == "kernel" and w.ndim == 2:
        w = w.T
    return np.ascontiguousarray(w.reshape(converted_shape(weight.shape, leaf, ndim)), np.float32)


def fill_params(
    abstract: dict,
    tensors: Dict[str, np.ndarray],
    source_of: Callable[[Tuple[str, ...]], Source],
    *,
    what: str,
    checked_elsewhere: Iterable[str] = (),
) -> dict:
    """Our parameter tree (numpy float32, the structure of ``abstract``) from ``tensors``.

    ``source_of(module_path)`` names the PyTorch prefix(es); ``checked_elsewhere`` are
    keys the caller verifies itself (fixed buffers such as a position embedding). With
    ``jax.ShapeDtypeStruct`` tensors (a layout's key/shape list) it checks names and
    shapes and returns ShapeDtypeStructs: full-size coverage without the weights.
    """
    used = set()

    def leaf_value(path, leaf):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        module, name = names[:-1], names[-1]
        source = source_of(module)
        prefixes = (source,) if isinstance(source, str) else tuple(source)
        parts = []
        for prefix in prefixes:
            key = f"{prefix}.{_TORCH_LEAF[name]}"
            if key not in tensors:
                raise ConversionError(
                    f"{what}: missing weight {key!r} (for our parameter {'/'.join(names)} "
                    f"of shape {tuple(leaf.shape)}): the file's architecture differs from "
                    "the config"
                )
            used.add(key)
            parts.append(tensors[key])
        first = parts[0].shape
        torch_shape = (sum(p.shape[0] for p in parts), *first[1:])
        shape = converted_shape(torch_shape, name, len(leaf.shape))
        if shape != tuple(leaf.shape):
            raise ConversionError(
                f"{what}: weight {'+'.join(f'{p}.*' for p in prefixes)!r} has shape "
                f"{torch_shape}, which does not fit our parameter {'/'.join(names)} of shape "
                f"{tuple(leaf.shape)}: the file's architecture differs from the config"
            )
        if all(isinstance(p, jax.ShapeDtypeStruct) for p in parts):  # a coverage check
            return jax.ShapeDtypeStruct(shape, np.float32)
        weight = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return to_flax_leaf(weight, name, len(leaf.shape))

    params = jax.tree_util.tree_map_with_path(leaf_value, abstract)
    unexpected = sorted(set(tensors) - used - set(checked_elsewhere))
    if unexpected:
        raise ConversionError(
            f"{what}: unexpected weight {unexpected[0]!r} ({len(unexpected)} unused key(s)): "
            "the file has layers our model built from this config does not (check the "
            "config / flags, or the file is another architecture)"
        )
    return params


__all__ = ("Source", "converted_shape", "fill_params", "to_flax_leaf")
