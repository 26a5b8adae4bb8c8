"""Model registry: ``build_model(config.model)`` and helpers around it.

``config.model`` is a mapping (ConfigDict or dict) with keys
  name           "unet" | "dit" | "autoencoder"
  num_classes    0 = unconditional; else a label table with one extra "null" row
                 (diffusion models only: must be 0 for the autoencoder)
  compute_dtype  "float32" | "bfloat16" (parameters stay float32)
  text           vocab_size 0 = no text; else the denoiser is a ``TextConditional``
                 (models/text.py): a TextEncoder(vocab_size, max_length, width, depth,
                 num_heads) and the backbone, conditioned by "cross"-attention (the backbone
                 is built with cross_attention=True) or a "pooled" caption vector
                 (``conditioning``). Captions and class labels are exclusive.
  guidance_input the condition carries a guidance scale w per example and the model
                 embeds it (models/guidance_input.py; UNet and DiT only): a consistency
                 student distilled over a range of scales.
  unet, dit, autoencoder
                 one sub-mapping per architecture with that constructor's kwargs only
                 (see UNET_PRESETS / DIT_PRESETS / AUTOENCODER_PRESETS for values).
The model receives only its own block: it never sees the schedule or the objective.
``abstract_inputs`` gives the positional arguments of a model's ``__call__``: (x, t, y)
for the diffusion models (y: labels [B], token ids [B, max_length] or None; with
guidance_input {"y": that, "w": [B]}), (x,) for the autoencoder.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from diffusion_jax.models.autoencoder import AUTOENCODER_PRESETS, Autoencoder
from diffusion_jax.models.dit import DIT_PRESETS, DiT
from diffusion_jax.models.guide import NoisyClassifier, NoisyCLIP
from diffusion_jax.models.text import CONDITIONINGS, TextConditional, TextEncoder
from diffusion_jax.models.unet import UNET_PRESETS, UNet

MODELS = {
    "unet": UNet,
    "dit": DiT,
    "autoencoder": Autoencoder,
    "classifier": NoisyClassifier,
    "clip": NoisyCLIP,
}
GUIDES = (NoisyClassifier, NoisyCLIP)  # noise-aware guide networks (models/guide.py)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TOP_LEVEL_KEYS = ("name", "num_classes", "compute_dtype", "text", "guidance_input") + tuple(MODELS)
# Set at the top level of config.model (or fixed), never in the architecture block.
_RESERVED = ("num_classes", "cross_attention", "text", "dtype", "param_dtype", "parent", "name")
TEXT_KEYS = ("vocab_size", "max_length", "width", "depth", "num_heads", "conditioning")


def _to_dict(cfg: Any) -> Dict[str, Any]:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
        return cfg.to_dict()
    return dict(cfg)


def constructor_kwargs(cls: type) -> Tuple[str, ...]:
    """The kwargs an architecture block may set for ``cls`` (its dataclass fields minus
    the ones build_model fills in)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name not in _RESERVED)


def is_autoencoder(model_cfg: Mapping[str, Any]) -> bool:
    """Whether ``config.model`` names the autoencoder (trained as one, never sampled)."""
    return MODELS.get(_to_dict(model_cfg).get("name")) is Autoencoder


def text_config(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """``config.model.text`` as a dict ({} when absent); vocab_size 0 = no text."""
    return _to_dict(_to_dict(model_cfg).get("text"))


def is_guide(model_cfg: Mapping[str, Any]) -> bool:
    """Whether ``config.model`` names a noise-aware guide (classifier or CLIP)."""
    return MODELS.get(_to_dict(model_cfg).get("name")) in GUIDES


def is_text_conditional(model_cfg: Mapping[str, Any]) -> bool:
    """Whether ``config.model`` is a denoiser conditioned on captions (token ids)."""
    name = _to_dict(model_cfg).get("name")
    return MODELS.get(name) in (UNet, DiT) and int(text_config(model_cfg).get("vocab_size", 0)) > 0


def _text_encoder(text: Dict[str, Any], num_classes: int, name: str, dtype) -> TextEncoder:
    unknown = sorted(set(text) - set(TEXT_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config.model.text; valid: {TEXT_KEYS}")
    if num_classes:
        raise ValueError(
            f"model.num_classes={num_classes} with model.text.vocab_size="
            f"{text['vocab_size']}: a model is conditioned on labels or on captions, not "
            "both; set one of them to 0"
        )
    if MODELS[name] not in (UNet, DiT, NoisyCLIP):
        raise ValueError(f"model {name!r} takes no captions; set model.text.vocab_size=0")
    if text.get("conditioning", "cross") not in CONDITIONINGS:
        raise ValueError(
            f"model.text.conditioning={text['conditioning']!r}; valid: {list(CONDITIONINGS)}"
        )
    kwargs = {k: v for k, v in text.items() if k != "conditioning"}
    return TextEncoder(dtype=dtype, **kwargs)


def has_num_classes(cls: type) -> bool:
    """Whether an architecture takes ``num_classes`` (the diffusion models do)."""
    return any(f.name == "num_classes" for f in dataclasses.fields(cls))


def build_model(model_cfg: Mapping[str, Any]):
    """``MODELS[name](num_classes=..., dtype=..., **model_cfg[name])`` with every key checked
    (``num_classes`` only for architectures that have it).

    Raises ValueError (never a raw TypeError) for an unknown name, top-level key,
    compute dtype or architecture kwarg, or class labels for a model without any, naming
    the valid choices.
    """
    cfg = _to_dict(model_cfg)
    unknown_top = sorted(set(cfg) - set(TOP_LEVEL_KEYS))
    if unknown_top:
        raise ValueError(
            f"unknown key(s) {unknown_top} in config.model; valid keys: {list(TOP_LEVEL_KEYS)}"
        )
    name = cfg.get("name")
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; valid names: {sorted(MODELS)}")
    cls = MODELS[name]
    dtype_name = cfg.get("compute_dtype", "float32")
    if dtype_name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute_dtype {dtype_name!r}; valid: {list(COMPUTE_DTYPES)}")
    num_classes = int(cfg.get("num_classes", 0))
    if num_classes < 0:
        raise ValueError(f"model.num_classes must be >= 0, got {num_classes}")
    if num_classes and not has_num_classes(cls):
        raise ValueError(
            f"model.num_classes={num_classes} but {cls.__name__} ({name!r}) takes no class "
            f"labels; set model.num_classes=0."
        )

    kwargs = _to_dict(cfg.get(name))
    valid = constructor_kwargs(cls)
    for key in kwargs:
        if key not in valid:
            hint = (
                " (set it at the top level of config.model)"
                if key == "num_classes" and has_num_classes(cls)
                else " (use model.compute_dtype)"
                if key in ("dtype", "param_dtype")
                else ""
            )
            raise ValueError(
                f"config.model.{name}.{key} is not a {cls.__name__} argument"
                f"{hint}; valid keys: {list(valid)}"
            )
    # ConfigDicts may hold lists; module attributes should be hashable tuples.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if has_num_classes(cls):
        kwargs["num_classes"] = num_classes
    if cfg.get("guidance_input"):
        if cls not in (UNet, DiT):
            raise ValueError(
                f"model.guidance_input=True but {cls.__name__} ({name!r}) takes no guidance "
                "scale (UNet and DiT do); set model.guidance_input=False"
            )
        kwargs["guidance_input"] = True
    dtype = COMPUTE_DTYPES[dtype_name]
    if cls is NoisyCLIP:
        if not int(text_config(cfg).get("vocab_size", 0)):
            raise ValueError("a clip model needs a text encoder: set model.text.vocab_size")
        return cls(text=_text_encoder(text_config(cfg), 0, name, dtype), dtype=dtype, **kwargs)
    if not is_text_conditional(cfg):
        return cls(dtype=dtype, **kwargs)
    text = text_config(cfg)
    encoder = _text_encoder(text, num_classes, name, dtype)
    conditioning = text.get("conditioning", "cross")
    backbone = cls(dtype=dtype, cross_attention=conditioning == "cross", **kwargs)
    return TextConditional(backbone, encoder, conditioning)


def check_input_shape(
    model_cfg: Mapping[str, Any], image_size: Union[int, Sequence[int]], channels: int
) -> None:
    """Validate an image size / channel count for a model config before anything compiles.

    ``image_size`` is an int (square) or (height, width). Raises ValueError naming the fix
    (UNet: size divisible by 2**(levels-1); DiT: divisible by the patch size;
    Autoencoder: divisible by its downsampling factor, channels = its image_channels).
    """
    if isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = (int(s) for s in image_size)
    build_model(model_cfg).check_input_shape(height, width, int(channels))


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (works on jax.ShapeDtypeStruct leaves)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def abstract_inputs(model, batch_size: int, image_shape: Sequence[int]) -> Tuple[Any, ...]:
    """The positional arguments of ``model.__call__`` as ShapeDtypeStructs: (x,) for the
    autoencoder; (x, t, y) for the diffusion models, y None unless class-conditional."""
    hook = getattr(type(model), "abstract_inputs", None)
    if hook is not None:  # a model seen through an adapter (adapted.py) says itself
        return hook(model, batch_size, image_shape)
    x = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
    if isinstance(model, Autoencoder):
        return (x,)
    t = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    if isinstance(model, TextConditional):
        y = jax.ShapeDtypeStruct((batch_size, model.max_length), jnp.int32)
        return x, t, _with_guidance(model.backbone, y, batch_size)
    if isinstance(model, NoisyCLIP):
        return x, t, jax.ShapeDtypeStruct((batch_size, model.text.max_length), jnp.int32)
    if isinstance(model, NoisyClassifier):
        return x, t
    conditional = getattr(model, "num_classes", 0) > 0
    y = jax.ShapeDtypeStruct((batch_size,), jnp.int32) if conditional else None
    return x, t, _with_guidance(model, y, batch_size)


def _with_guidance(model, y, batch_size: int):
    """A guidance-input model's condition {"y": y, "w": [B] float32}; else y."""
    if not getattr(model, "guidance_input", False):
        return y
    return {"y": y, "w": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}


def abstract_params(model, image_shape: Sequence[int]):
    """Parameter shapes via ``jax.eval_shape`` — no memory, no compile."""
    args = abstract_inputs(model, 1, image_shape)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), *args)


def xla_forward_flops(
    model, image_shape: Sequence[int], batch_size: int = 1, params: Any = None
) -> float:
    """XLA's cost-analysis FLOP count of one forward pass (eval mode) at ``batch_size``.

    Lowers with abstract parameters, so even DiT-XL costs no memory and no compile.
    XLA counts a multiply-add as 2 FLOPs (and elementwise ops as 1 per element;
    transcendentals separately): divide by 2 to compare with papers that count
    multiply-accumulates (e.g. DiT's "Gflops").
    """
    if params is None:
        params = abstract_params(model, image_shape)
    args = abstract_inputs(model, batch_size, image_shape)
    cost = jax.jit(model.apply).lower(params, *args).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
        cost = cost[0]
    return float(cost["flops"])


__all__ = (
    "MODELS",
    "UNet",
    "DiT",
    "Autoencoder",
    "UNET_PRESETS",
    "DIT_PRESETS",
    "AUTOENCODER_PRESETS",
    "build_model",
    "is_autoencoder",
    "is_guide",
    "is_text_conditional",
    "text_config",
    "TextConditional",
    "TextEncoder",
    "has_num_classes",
    "check_input_shape",
    "constructor_kwargs",
    "count_params",
    "abstract_params",
    "abstract_inputs",
    "xla_forward_flops",
    "COMPUTE_DTYPES",
)
