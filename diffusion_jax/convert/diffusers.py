"""diffusers ``UNet2DModel`` and ``AutoencoderKL`` -> our UNet / Autoencoder.

Input: what diffusers' ``save_pretrained`` writes, ``config.json`` +
``diffusion_pytorch_model.safetensors`` (or the ``.bin`` torch pickle, read by the
restricted unpickler). The config is translated to our model config, refusing in one
line what our models cannot express (fourier/learned time embeddings, class embeddings
of diffusers' kinds, norm eps other than 1e-6, symmetric downsample padding, attention
at different resolutions on the way down and up...). Keys are mapped:

  UNet2DModel                          ours
  conv_in / conv_out / conv_norm_out   conv_in / conv_out / norm_out
  time_embedding.linear_1, linear_2    time_embed/dense0, dense1
  down_blocks.L.resnets.i.X            downL_resi/X (time_emb_proj = emb_proj,
                                       conv_shortcut = skip)
  down_blocks.L.attentions.i           downL_attni: group_norm = norm, to_q/k/v = attn/qkv,
                                       to_out.0 = attn/proj
  down_blocks.L.downsamplers.0.conv    downL_resample/conv
  mid_block.resnets.0/1, attentions.0  mid_res0/1, mid_attn
  up_blocks.j.*                        up{levels-1-j}_*: diffusers numbers the up path
                                       deepest first

The autoencoder's names are diffusers' already (``_i`` for ``.i``). Old diffusers files
name attention weights query/key/value/proj_attn; they are renamed to to_q/to_k/to_v/
to_out.0 first, as diffusers does when it loads them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Tuple

import numpy as np

from diffusion_jax.convert.mapping import Source, fill_params
from diffusion_jax.convert.weight_files import ConversionError, read_weights
from diffusion_jax.models import abstract_params, build_model

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# diffusers' defaults for keys an older config.json may leave out.
UNET2D_DEFAULTS: Dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    time_embedding_dim=None,
    freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=1,
    downsample_type="conv",
    upsample_type="conv",
    dropout=0.0,
    act_fn="silu",
    attention_head_dim=8,
    norm_num_groups=32,
    attn_norm_num_groups=None,
    norm_eps=1e-5,
    resnet_time_scale_shift="default",
    add_attention=True,
    class_embed_type=None,
    num_class_embeds=None,
)
AUTOENCODER_KL_DEFAULTS: Dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
    shift_factor=None,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_config(weights_dir: str) -> Dict[str, Any]:
    path = os.path.join(weights_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(
            f"{weights_dir!r} has no config.json: pass the directory diffusers' "
            "save_pretrained wrote (config.json + diffusion_pytorch_model.safetensors)"
        )
    with open(path) as f:
        return json.load(f)


def _require(cfg: Dict[str, Any], key: str, allowed, what: str) -> None:
    if cfg[key] not in allowed:
        raise ConversionError(
            f"{what} config {key}={cfg[key]!r} is not supported (our model expresses "
            f"{key} in {list(allowed)})"
        )


def unet_model_config(raw: Dict[str, Any]) -> Tuple[Dict[str, Any], int]:
    """(our config.model, sample size) of a diffusers UNet2DModel config."""
    cfg = {**UNET2D_DEFAULTS, **raw}
    what = "UNet2DModel"
    _require(cfg, "time_embedding_type", ("positional",), what)
    _require(cfg, "act_fn", ("silu", "swish"), what)
    _require(cfg, "center_input_sample", (False,), what)
    _require(cfg, "mid_block_type", ("UNetMidBlock2D",), what)
    _require(cfg, "mid_block_scale_factor", (1, 1.0), what)
    _require(cfg, "downsample_padding", (0,), what)  # ours pads like TF "SAME": (0, 1)
    _require(cfg, "downsample_type", ("conv",), what)
    _require(cfg, "upsample_type", ("conv",), what)
    _require(cfg, "norm_eps", (1e-6,), what)
    _require(cfg, "resnet_time_scale_shift", ("default", "scale_shift"), what)
    _require(cfg, "add_attention", (True,), what)
    _require(cfg, "class_embed_type", (None,), what)
    _require(cfg, "num_class_embeds", (None,), what)
    channels = [int(c) for c in cfg["block_out_channels"]]
    base = channels[0]
    if any(c % base for c in channels):
        raise ConversionError(
            f"{what} block_out_channels={channels} are not multiples of the first "
            "(our UNet's widths are base_channels * channel_mult)"
        )
    _require(cfg, "attn_norm_num_groups", (None, cfg["norm_num_groups"]), what)
    _require(cfg, "time_embedding_dim", (None, 4 * base), what)
    if cfg["resnet_time_scale_shift"] == "scale_shift" and cfg["attn_norm_num_groups"] is None:
        raise ConversionError(
            f"{what} with resnet_time_scale_shift='scale_shift' and no attn_norm_num_groups "
            "has a mid-block attention without GroupNorm, which our UNet always has"
        )
    size = cfg.get("sample_size")
    size = int(size[0] if isinstance(size, (list, tuple)) else size or 0)
    if not size:
        raise ConversionError(f"{what} config has no sample_size: the image size is needed")
    down = [t.startswith("Attn") for t in cfg["down_block_types"]]
    up = [t.startswith("Attn") for t in reversed(cfg["up_block_types"])]
    for types in (cfg["down_block_types"], cfg["up_block_types"]):
        for t in types:
            if t not in ("DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"):
                raise ConversionError(f"{what} block type {t!r} is not supported")
    if down != up or len(down) != len(channels):
        raise ConversionError(
            f"{what} has attention at levels {down} on the way down but {up} on the way up "
            "(our UNet puts attention at the same resolutions on both paths)"
        )
    head_dim = cfg["attention_head_dim"]
    unet = dict(
        base_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=int(cfg["layers_per_block"]),
        attn_resolutions=tuple(size // 2**level for level, a in enumerate(down) if a),
        num_heads=1,
        num_head_channels=int(head_dim) if head_dim else None,
        dropout=float(cfg["dropout"]),
        use_scale_shift_norm=cfg["resnet_time_scale_shift"] == "scale_shift",
        resblock_updown=False,
        conv_resample=True,
        norm_groups=int(cfg["norm_num_groups"]),
        time_cos_first=bool(cfg["flip_sin_to_cos"]),
        time_freq_shift=float(cfg["freq_shift"]),
        out_channels=int(cfg["out_channels"]),
    )
    return dict(name="unet", num_classes=0, unet=unet), size


def autoencoder_model_config(raw: Dict[str, Any]) -> Tuple[Dict[str, Any], int]:
    """(our config.model, sample size) of a diffusers AutoencoderKL config."""
    cfg = {**AUTOENCODER_KL_DEFAULTS, **raw}
    what = "AutoencoderKL"
    _require(cfg, "act_fn", ("silu", "swish"), what)
    _require(cfg, "use_quant_conv", (True,), what)
    _require(cfg, "use_post_quant_conv", (True,), what)
    _require(cfg, "shift_factor", (None, 0, 0.0), what)
    _require(cfg, "out_channels", (cfg["in_channels"],), what)
    levels = len(cfg["block_out_channels"])
    if (
        list(cfg["down_block_types"]) != ["DownEncoderBlock2D"] * levels
        or list(cfg["up_block_types"]) != ["UpDecoderBlock2D"] * levels
    ):
        raise ConversionError(
            f"{what} block types {cfg['down_block_types']} / {cfg['up_block_types']} are not "
            "supported (DownEncoderBlock2D / UpDecoderBlock2D, one per level)"
        )
    autoencoder = dict(
        block_channels=tuple(int(c) for c in cfg["block_out_channels"]),
        layers_per_block=int(cfg["layers_per_block"]),
        latent_channels=int(cfg["latent_channels"]),
        image_channels=int(cfg["in_channels"]),
        norm_groups=int(cfg["norm_num_groups"]),
        mid_attention=bool(cfg["mid_block_add_attention"]),
    )
    size = cfg["sample_size"]
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return dict(name="autoencoder", num_classes=0, autoencoder=autoencoder), size


def _unet_source(levels: int):
    renames = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut", "norm": "group_norm"}

    def source_of(module: Tuple[str, ...]) -> Source:
        head, rest = module[0], module[1:]
        if head in ("conv_in", "conv_out"):
            return head
        if head == "norm_out":
            return "conv_norm_out"
        if head == "time_embed":
            return {"dense0": "time_embedding.linear_1", "dense1": "time_embedding.linear_2"}[
                rest[0]
            ]
        m = re.fullmatch(r"(down|up|mid)(\d*)_(res|attn|resample)(\d*)", head)
        if m is None:
            raise ConversionError(f"UNet2DModel: no diffusers weights for our {module}")
        side, level, kind, index = m.groups()
        if side == "mid":
            prefix = f"mid_block.{'resnets' if kind == 'res' else 'attentions'}.{index or 0}"
        else:
            block = int(level) if side == "down" else levels - 1 - int(level)
            sampler = "downsamplers" if side == "down" else "upsamplers"
            kind_name = {"res": "resnets", "attn": "attentions", "resample": sampler}[kind]
            prefix = f"{side}_blocks.{block}.{kind_name}.{index or 0}"
        if rest == ("attn", "qkv"):
            return tuple(f"{prefix}.{n}" for n in ("to_q", "to_k", "to_v"))
        if rest == ("attn", "proj"):
            return f"{prefix}.to_out.0"
        return ".".join([prefix, *(renames.get(r, r) for r in rest)])

    return source_of


def _autoencoder_source(module: Tuple[str, ...]) -> Source:
    return re.sub(r"_(\d+)(?=/|$)", r".\1", "/".join(module)).replace("/", ".")


def _renamed_old_attention(tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in _OLD_ATTENTION_NAMES and "attentions" in parts:
            parts[-2] = _OLD_ATTENTION_NAMES[parts[-2]]
            key = ".".join(parts)
        out[key] = value
    return out


def from_state_dict(
    raw: Dict[str, Any], tensors: Dict[str, Any], what: str
) -> Tuple[Dict[str, Any], Any, dict, Dict[str, Any]]:
    """(our config.model, model, params, facts) of a diffusers config dict and its state
    dict (``jax.ShapeDtypeStruct`` values: a key/shape coverage check, see mapping.py);
    facts holds the class name, the image size and (AutoencoderKL) the published
    scaling_factor."""
    cls = raw.get("_class_name")
    if cls == "UNet2DModel":
        model_cfg, size = unet_model_config(raw)
        channels = int({**UNET2D_DEFAULTS, **raw}["in_channels"])
        source_of = _unet_source(len(model_cfg["unet"]["channel_mult"]))
    elif cls == "AutoencoderKL":
        model_cfg, size = autoencoder_model_config(raw)
        channels = model_cfg["autoencoder"]["image_channels"]
        source_of = _autoencoder_source
    else:
        raise ConversionError(
            f"{what}: config.json is a {cls!r}; the converter reads UNet2DModel and "
            "AutoencoderKL (for the official DiT checkpoints use --from=dit)"
        )
    model = build_model(model_cfg)
    try:
        model.check_input_shape(size, size, channels)
    except ValueError as e:
        raise ConversionError(f"{what}: {cls} at sample_size {size}: {e}") from None
    abstract = abstract_params(model, (size, size, channels))["params"]
    params = fill_params(abstract, _renamed_old_attention(tensors), source_of, what=what)
    facts = dict(class_name=cls, image_size=size, image_channels=channels)
    if cls == "AutoencoderKL":
        facts["scaling_factor"] = float(raw.get("scaling_factor", 0.18215))
    return model_cfg, model, params, facts


def convert_diffusers(weights_dir: str) -> Tuple[Dict[str, Any], Any, dict, Dict[str, Any]]:
    """``from_state_dict`` of a directory written by diffusers' ``save_pretrained``."""
    raw = read_config(weights_dir)
    files = [os.path.join(weights_dir, n) for n in WEIGHT_FILES]
    present = [f for f in files if os.path.isfile(f)]
    if not present:
        raise ConversionError(f"{weights_dir!r} has none of {list(WEIGHT_FILES)}")
    return from_state_dict(raw, read_weights(present[0]), present[0])


def load_diffusers(weights_dir: str):
    """``(model, params)`` of a diffusers UNet2DModel / AutoencoderKL directory, such that
    ``model.apply({"params": params}, x_nhwc, t)`` (UNet) or ``model.apply({"params":
    params}, x, method="encode" / "decode")`` equals the PyTorch model, NHWC."""
    _, model, params, _ = convert_diffusers(weights_dir)
    return model, params


__all__ = (
    "convert_diffusers",
    "from_state_dict",
    "load_diffusers",
    "unet_model_config",
    "autoencoder_model_config",
)
