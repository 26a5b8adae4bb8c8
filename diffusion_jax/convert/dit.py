"""Official DiT checkpoints (facebookresearch/DiT, e.g. DiT-XL-2-256x256.pt) -> our DiT.

The file is a state dict with the keys of the official ``models.py``; the architecture is
read from the shapes (hidden size, patch size, channels, depth, classes, MLP ratio, image
size from the position embedding), except the number of heads, which no shape holds: it
comes from the paper's table (Peebles & Xie 2023, Table 1) for the published sizes, or
from ``num_heads``. Keys:

  official                                   ours
  x_embedder.proj (Conv2d p x p, stride p)   patch_embed (dense over (p, p, C) patches)
  t_embedder.mlp.0 / mlp.2                   t_embed/dense0 / dense1
  y_embedder.embedding_table                 y_embed/table (last row = the CFG null class)
  blocks.i.attn.qkv / attn.proj              block{i}/attn/qkv / attn/proj
  blocks.i.mlp.fc1 / fc2                     block{i}/mlp/fc1 / fc2
  blocks.i.adaLN_modulation.1                block{i}/adaLN/dense
  final_layer.linear / adaLN_modulation.1    final/linear / final/adaLN/dense
  pos_embed                                  not a parameter: checked against ours

The layouts agree beyond the names (checked by the golden test): the sinusoid of t is
[cos, sin] over 256 channels, qkv is split (3, heads, head_dim), the adaLN chunks are
(shift, scale, gate) x (attention, MLP), the final projection is ordered (p, p, C).
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from diffusion_jax.convert.mapping import Source, fill_params
from diffusion_jax.convert.weight_files import ConversionError, read_weights
from diffusion_jax.models import abstract_params, build_model
from diffusion_jax.models.dit import DIT_SIZES
from diffusion_jax.models.layers import sincos_pos_embed_2d

# float32 sin/cos of positions up to ~16 differ from float64 by ~1e-6.
POS_EMBED_ATOL = 1e-5
_BLOCK_LEAVES = {
    ("adaLN", "dense"): "adaLN_modulation.1",
    ("attn", "qkv"): "attn.qkv",
    ("attn", "proj"): "attn.proj",
    ("mlp", "fc1"): "mlp.fc1",
    ("mlp", "fc2"): "mlp.fc2",
}
_TOP = {
    ("patch_embed",): "x_embedder.proj",
    ("t_embed", "dense0"): "t_embedder.mlp.0",
    ("t_embed", "dense1"): "t_embedder.mlp.2",
    ("y_embed", "table"): "y_embedder.embedding_table",
    ("final", "linear"): "final_layer.linear",
    ("final", "adaLN", "dense"): "final_layer.adaLN_modulation.1",
}


def _shape(tensors: Dict[str, np.ndarray], key: str) -> Tuple[int, ...]:
    if key not in tensors:
        raise ConversionError(
            f"DiT state dict has no {key!r}: is this an official DiT checkpoint "
            "(facebookresearch/DiT models.py keys)?"
        )
    return tuple(tensors[key].shape)


def dit_model_config(
    tensors: Dict[str, np.ndarray], num_heads: Optional[int] = None
) -> Tuple[Dict[str, Any], int]:
    """(our config.model, latent image size) read from the state dict's shapes."""
    hidden, channels, p, _ = _shape(tensors, "x_embedder.proj.weight")
    tokens = _shape(tensors, "pos_embed")[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ConversionError(f"DiT pos_embed has {tokens} tokens, not a square grid")
    depth = len({m.group(1) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))})
    out_features = _shape(tensors, "final_layer.linear.weight")[0]
    mlp_hidden = _shape(tensors, "blocks.0.mlp.fc1.weight")[0]
    freq_dim = _shape(tensors, "t_embedder.mlp.0.weight")[1]
    num_classes = (
        _shape(tensors, "y_embedder.embedding_table.weight")[0] - 1
        if "y_embedder.embedding_table.weight" in tensors
        else 0
    )
    if num_heads is None:
        sizes = [s for s in DIT_SIZES.values() if (s["hidden_size"], s["depth"]) == (hidden, depth)]
        if not sizes:
            raise ConversionError(
                f"DiT with hidden size {hidden} and depth {depth} is not a published size "
                "(Table 1 of the paper), so its number of heads is unknown: pass --num_heads"
            )
        num_heads = sizes[0]["num_heads"]
    dit = dict(
        patch_size=p,
        hidden_size=hidden,
        depth=depth,
        num_heads=int(num_heads),
        mlp_ratio=mlp_hidden / hidden,
        freq_embed_dim=freq_dim,
        out_channels=out_features // (p * p),
    )
    return dict(name="dit", num_classes=num_classes, dit=dit), grid * p


def _source_of(module: Tuple[str, ...]) -> Source:
    if module in _TOP:
        return _TOP[module]
    m = re.fullmatch(r"block(\d+)", module[0])
    if m and module[1:] in _BLOCK_LEAVES:
        return f"blocks.{m.group(1)}.{_BLOCK_LEAVES[module[1:]]}"
    raise ConversionError(f"DiT: no official weights for our {module}")


def from_state_dict(
    tensors: Dict[str, Any], what: str, num_heads: Optional[int] = None
) -> Tuple[Dict[str, Any], Any, dict, Dict[str, Any]]:
    """(our config.model, model, params, facts) of an official DiT state dict
    (``jax.ShapeDtypeStruct`` values: a key/shape coverage check, see mapping.py)."""
    model_cfg, size = dit_model_config(tensors, num_heads)
    channels = _shape(tensors, "x_embedder.proj.weight")[1]
    model = build_model(model_cfg)
    try:
        model.check_input_shape(size, size, channels)
    except ValueError as e:
        raise ConversionError(f"{what}: {e}") from None
    facts = dict(class_name="DiT", image_size=size, image_channels=channels)
    if not isinstance(tensors["pos_embed"], jax.ShapeDtypeStruct):
        p, hidden = model_cfg["dit"]["patch_size"], model_cfg["dit"]["hidden_size"]
        ours = sincos_pos_embed_2d(size // p, size // p, hidden)
        theirs = np.asarray(tensors["pos_embed"], np.float32).reshape(ours.shape)
        facts["pos_embed_err"] = err = float(np.max(np.abs(ours - theirs)))
        if err > POS_EMBED_ATOL:
            raise ConversionError(
                f"{what}: pos_embed differs from the 2D sin-cos embedding by {err:.2e} "
                f"(> {POS_EMBED_ATOL}): a learned or differently laid-out position embedding"
            )
    abstract = abstract_params(model, (size, size, channels))["params"]
    params = fill_params(abstract, tensors, _source_of, what=what, checked_elsewhere=("pos_embed",))
    return model_cfg, model, params, facts


def convert_dit(
    weights: str, num_heads: Optional[int] = None
) -> Tuple[Dict[str, Any], Any, dict, Dict[str, Any]]:
    """``from_state_dict`` of an official DiT checkpoint file (.pt or .safetensors)."""
    return from_state_dict(read_weights(weights), f"DiT {weights}", num_heads)


def load_dit(weights: str, num_heads: Optional[int] = None):
    """``(model, params)`` of an official DiT checkpoint: ``model.apply({"params":
    params}, x_nhwc, t, y)`` equals the PyTorch model's output, NHWC."""
    _, model, params, _ = convert_dit(weights, num_heads)
    return model, params


__all__ = ("convert_dit", "from_state_dict", "load_dit", "dit_model_config")
