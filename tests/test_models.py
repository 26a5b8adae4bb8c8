"""Tests for diffusion_jax.models: shapes, conditioning, the registry, dropout, jit, bf16
compute, layers and the documented module fields. Parameter counts and Gflops of the
published presets are in test_model_sizes.py, initialization in test_model_init.py.

Anything that runs uses tiny configs; the paper-sized presets are only lowered with
abstract shapes (jax.eval_shape), which costs no memory and no compile.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import (
    DIT_PRESETS,
    MODELS,
    UNET_PRESETS,
    abstract_params,
    build_model,
    check_input_shape,
    constructor_kwargs,
    layers,
)
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.unet import UNet

from helpers import (
    TINY_MODEL_SHAPES as SHAPES,
    TINY_NUM_CLASSES as NUM_CLASSES,
    perturb_params as _perturb,
    tiny_model_cfg as _cfg,
)

# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "name,arch,shape,out_channels",
    [
        ("unet", {}, (8, 8, 1), None),
        ("unet", {}, (16, 24, 3), 6),  # non-square, learned-sigma style output
        (
            "unet",
            dict(
                channel_mult=(1, 2, 2),
                use_scale_shift_norm=True,
                resblock_updown=True,
                num_head_channels=8,
                attn_resolutions=(8, 4),
            ),
            (16, 16, 3),
            None,
        ),
        ("unet", dict(conv_resample=False, num_res_blocks=2), (8, 8, 2), None),
        ("dit", {}, (8, 8, 4), None),
        ("dit", dict(patch_size=4), (16, 8, 3), 6),
    ],
)
@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_output_shapes(name, arch, shape, out_channels, num_classes):
    model = build_model(_cfg(name, num_classes, out_channels=out_channels, **arch))
    params = abstract_params(model, shape)
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32) if num_classes else None
    out = jax.eval_shape(model.apply, params, x, t, y)
    assert out.shape == (2, *shape[:2], out_channels or shape[2])
    assert out.dtype == jnp.float32
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.float32


def test_ddpm_preset_runs_on_digits_resolution():
    """The CIFAR-10 preset also traces at 8x8 (levels 8, 4, 2, 1)."""
    model = build_model({"name": "unet", "num_classes": 0, "unet": UNET_PRESETS["ddpm_cifar10"]})
    check_input_shape({"name": "unet", "unet": UNET_PRESETS["ddpm_cifar10"]}, 8, 1)
    params = abstract_params(model, (8, 8, 1))
    out = jax.eval_shape(
        model.apply,
        params,
        jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    assert out.shape == (1, 8, 8, 1)


@pytest.mark.parametrize(
    "name,arch,size",
    [
        ("unet", dict(channel_mult=(1, 2, 2)), 10),  # needs a multiple of 4
        ("unet", dict(channel_mult=(1, 2)), (8, 9)),
        ("dit", dict(patch_size=4), 10),
    ],
)
def test_bad_image_size_raises_clear_error(name, arch, size):
    cfg = _cfg(name, **arch)
    with pytest.raises(ValueError, match="divisible by"):
        check_input_shape(cfg, size, 3)
    model = build_model(cfg)
    h, w = (size, size) if isinstance(size, int) else size
    x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    with pytest.raises(ValueError, match="divisible by"):
        jax.eval_shape(model.init, jax.random.key(0), x, t, None)


def test_check_input_shape_accepts_valid_sizes():
    check_input_shape({"name": "unet", "unet": UNET_PRESETS["ddpm_cifar10"]}, 32, 3)
    check_input_shape({"name": "unet", "unet": UNET_PRESETS["digits"]}, 8, 1)
    check_input_shape({"name": "dit", "dit": DIT_PRESETS["DiT-S/8"]}, (32, 64), 4)


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_labels_on_unconditional_model_raise(name):
    model = build_model(_cfg(name, num_classes=0))
    shape = SHAPES[name]
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(model.init, jax.random.key(0), x, t, t)


# --------------------------------------------------------------------------- registry


def test_build_model_registry_and_errors():
    assert set(MODELS) == {"unet", "dit", "autoencoder", "classifier", "clip"}
    model = build_model(_cfg("dit", compute_dtype="bfloat16"))
    assert isinstance(model, DiT) and model.dtype == jnp.bfloat16
    assert model.num_classes == NUM_CLASSES and model.hidden_size == 32
    with pytest.raises(
        ValueError, match=r"valid names: \['autoencoder', 'classifier', 'clip', 'dit', 'unet'\]"
    ):
        build_model({"name": "vit"})
    with pytest.raises(ValueError, match="model.unet.chanel_mult.*valid keys.*channel_mult"):
        build_model({"name": "unet", "unet": {"chanel_mult": (1, 2)}})
    with pytest.raises(ValueError, match="num_classes.*top level"):
        build_model({"name": "unet", "unet": {"num_classes": 10}})
    with pytest.raises(ValueError, match="compute_dtype"):
        build_model({"name": "unet", "compute_dtype": "float16"})
    with pytest.raises(ValueError, match="unknown key"):
        build_model({"name": "unet", "num_class": 10})
    # Every preset key is a constructor kwarg.
    for presets, cls in ((UNET_PRESETS, UNet), (DIT_PRESETS, DiT)):
        for preset in presets.values():
            assert set(preset) <= set(constructor_kwargs(cls))


def test_build_model_from_config_dict():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(
        {
            "name": "unet",
            "num_classes": 10,
            "compute_dtype": "float32",
            "unet": dict(UNET_PRESETS["digits"], channel_mult=[1, 2]),  # a list, as from a CLI
            "dit": dict(DIT_PRESETS["DiT-S/2"]),
        }
    )
    model = build_model(cfg)
    assert isinstance(model, UNet) and model.channel_mult == (1, 2) and model.num_classes == 10
    cfg.name = "dit"
    assert isinstance(build_model(cfg), DiT)


# --------------------------------------------------------------------------- behaviour


def test_conditioning_changes_output(tiny):
    p = tiny.perturbed
    x, t, y = tiny.x, tiny.t, tiny.y
    base = tiny.eval_fn(p, x, t, y)
    assert float(jnp.abs(base).mean()) > 1e-3
    other_t = tiny.eval_fn(p, x, t + 1, y)
    other_y = tiny.eval_fn(p, x, t, (y + 1) % (NUM_CLASSES + 1))
    null_y = tiny.eval_fn(p, x, t, jnp.full_like(y, NUM_CLASSES))
    for other in (other_t, other_y, null_y):
        per_example = jnp.abs(other - base).reshape(x.shape[0], -1).max(axis=1)
        assert jnp.all(per_example > 1e-4), per_example
    # Examples are processed independently: changing one label leaves the others alone.
    y1 = y.at[0].set(NUM_CLASSES)
    out1 = tiny.eval_fn(p, x, t, y1)
    np.testing.assert_allclose(out1[1:], base[1:], rtol=1e-5, atol=1e-5)


def test_label_embedding_none_means_null():
    emb = layers.LabelEmbedding(num_classes=5, features=8)
    params = emb.init(jax.random.key(0), None, 3)
    null = emb.apply(params, jnp.full((3,), 5, jnp.int32), 3)
    np.testing.assert_array_equal(emb.apply(params, None, 3), null)


def test_dropout_only_in_train_mode(tiny):
    args = (tiny.perturbed, tiny.x, tiny.t, tiny.y)
    eval_out = tiny.eval_fn(*args)
    np.testing.assert_array_equal(eval_out, tiny.eval_fn(*args))  # no rng needed, deterministic
    key = lambda seed: jax.random.key(seed, impl="rbg")  # fast to compile
    a = tiny.train_fn(*args, key(1))
    b = tiny.train_fn(*args, key(2))
    if isinstance(tiny.model, UNet):
        assert not np.allclose(a, b) and not np.allclose(a, eval_out)
        np.testing.assert_array_equal(a, tiny.train_fn(*args, key(1)))
    else:  # DiT has no dropout: train mode is identical
        np.testing.assert_array_equal(a, eval_out)
        np.testing.assert_array_equal(b, eval_out)


def test_jit_does_not_retrace(tiny):
    """New values of the same shapes (params, x, t, y) reuse the compiled forward;
    ``eval_fn`` raises on a second trace (its own trace counter)."""
    outs = [
        tiny.eval_fn(params, tiny.x * s, tiny.t + s, (tiny.y + s) % NUM_CLASSES)
        for s in range(3)
        for params in (tiny.params, tiny.perturbed)
    ]
    assert not np.allclose(outs[1], outs[3])


def _matmul_operand_types(model, params, x, t, y):
    """Element types (lhs, rhs, result) of every convolution and dot_general in the
    lowered StableHLO of ``model.apply`` (lowering only: nothing compiles)."""
    text = jax.jit(model.apply).lower(params, x, t, y).as_text()
    ty = r"tensor<(?:[^>]*x)?(\w+)>"  # element type after the last "x" of the shape
    sig = re.compile(rf":\s*\({ty}, {ty}\)\s*->\s*{ty}")
    found = []
    for line in text.splitlines():
        op = re.search(r"stablehlo\.(convolution|dot_general)\b", line)
        if op:
            found.append((op.group(1), sig.search(line).groups()))
    return found


def test_bfloat16_compute_smoke(tiny):
    """compute_dtype="bfloat16" really computes in bf16: every conv and matmul of the
    lowered program takes and returns bf16 (the f32 model's take f32), with f32 params and
    output; the result is close to f32 but not equal to it."""
    name = "unet" if isinstance(tiny.model, UNet) else "dit"
    model16 = build_model(_cfg(name, compute_dtype="bfloat16"))
    p = _perturb(tiny.params, scale=0.1)
    ops16 = _matmul_operand_types(model16, p, tiny.x, tiny.t, tiny.y)
    ops32 = _matmul_operand_types(tiny.model, p, tiny.x, tiny.t, tiny.y)
    # Tiny UNet: conv_in + 2 per ResBlock x 8 + conv down/upsample + conv_out = 20 convs.
    # Tiny DiT: patch embed, timestep MLP 2, per block (adaLN, qkv, QK^T, AV, out, fc1,
    # fc2) x 2, final adaLN + linear = 19 dot_generals.
    kinds = [kind for kind, _ in ops16]
    if name == "unet":
        assert kinds.count("convolution") == 20, kinds
    else:
        assert kinds.count("dot_general") == 19 and "convolution" not in kinds, kinds
    assert [kind for kind, _ in ops32] == kinds
    not_bf16 = [op for op in ops16 if op[1] != ("bf16", "bf16", "bf16")]
    not_f32 = [op for op in ops32 if op[1] != ("f32", "f32", "f32")]
    assert not not_bf16 and not not_f32, (not_bf16, not_f32)

    out32 = tiny.eval_fn(p, tiny.x, tiny.t, tiny.y)
    out16 = jax.jit(model16.apply)(p, tiny.x, tiny.t, tiny.y)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    print(f"bf16 vs f32 relative error: {rel:.2e}")
    # bf16 keeps 8 mantissa bits: unit roundoff 2^-9 ~ 2e-3 per op, accumulated over a few
    # layers -> a few 1e-2 at most (measured 6e-3 DiT, 1.6e-2 UNet). Below 1e-3 (~ one
    # bf16 rounding) the bf16 path cannot have been taken: f32 would give ~1e-7.
    assert 1e-3 < rel < 5e-2, rel


# --------------------------------------------------------------------------- layers


def test_patchify_roundtrip_and_layout():
    x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
    patches = layers.patchify(x, 4)
    assert patches.shape == (2, 6, 48)
    np.testing.assert_array_equal(patches[0, 1], x[0, 0:4, 4:8].reshape(-1))  # row-major
    np.testing.assert_array_equal(layers.unpatchify(patches, 4, 8, 12), x)


def test_sincos_and_timestep_embeddings():
    emb = layers.sincos_pos_embed_2d(4, 6, 16)
    assert emb.shape == (24, 16)
    # First half encodes the column x, second half the row y: position 0 is [0..,1..] twice.
    np.testing.assert_allclose(emb[0], np.tile(np.repeat([0.0, 1.0], 4), 2))
    np.testing.assert_allclose(emb[1, 8:], emb[0, 8:])  # same row
    np.testing.assert_allclose(emb[6, :8], emb[0, :8])  # same column
    te = layers.timestep_embedding(jnp.array([0, 10]), 7)
    assert te.shape == (2, 7)
    np.testing.assert_allclose(te[0], [1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(te[1, 0], np.cos(10.0), rtol=1e-6)  # frequency 1 first
    # The DDPM code's layout: sines first, frequencies 10000^(-i / (half - 1)), so the last
    # sine has frequency 1/10000 exactly.
    ddpm = layers.timestep_embedding(jnp.array([10.0]), 8, cos_first=False, freq_shift=1.0)
    np.testing.assert_allclose(ddpm[0, 0], np.sin(10.0), rtol=1e-6)
    np.testing.assert_allclose(ddpm[0, 3], np.sin(10.0 / 10000.0), rtol=1e-5)
    np.testing.assert_allclose(ddpm[0, 4], np.cos(10.0), rtol=1e-6)


def _documented_attributes(cls):
    """{field: its text} from the "Attributes:" section of ``cls``'s docstring (entries
    "  name: text" or "  a, b / c: text" with 4-space continuation lines)."""
    section = inspect.getdoc(cls).split("Attributes:\n", 1)[1]
    entries = {}
    for m in re.finditer(r"^  (\w[\w ,/]*):(.*?)(?=^  \w|\Z)", section, re.M | re.S):
        for field in re.split(r"\s*[,/]\s*", m.group(1)):
            entries[field] = " ".join(m.group(2).split())
    return entries


def _documented_default(text):
    """The default an attribute's text states, as source text, or None. Conventions in the
    docstrings: "(32 in DDPM and ADM)" / "(256 in DiT)" (the paper value, which is the
    default) and "0 = unconditional" / "None = input channels" (the default's meaning)."""
    m = re.search(r"\((\S+) in (?:DDPM|ADM|DiT)\b", text) or re.search(r"(?:^|; )(\S+) = ", text)
    return m.group(1) if m else None


@pytest.mark.parametrize(
    "cls,preset", [(UNet, UNET_PRESETS["ddpm_cifar10"]), (DiT, DIT_PRESETS["DiT-S/2"])]
)
def test_module_fields_are_documented_defaults(cls, preset):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
    # The configs mirror these names; changing one is an interface change.
    interface = {
        UNet: {
            "base_channels",
            "channel_mult",
            "num_res_blocks",
            "attn_resolutions",
            "num_heads",
            "num_head_channels",
            "dropout",
            "use_scale_shift_norm",
            "resblock_updown",
            "conv_resample",
            "norm_groups",
            "conv_impl",
        },
        DiT: {"patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "freq_embed_dim"},
    }[cls]
    interface |= {"num_classes", "out_channels", "dtype", "param_dtype"}
    assert interface <= set(fields)

    # Every field is documented (its own entry, or ``named`` in another's: UNet's
    # num_head_channels is explained under num_heads), and nothing documented is gone.
    docs = _documented_attributes(cls)
    assert set(docs) <= set(fields)
    mentioned = set(re.findall(r"``(\w+)``", " ".join(docs.values())))
    assert set(fields) <= set(docs) | mentioned, set(fields) - set(docs) - mentioned

    # Each default the docstring states is the field's default.
    stated = {k: _documented_default(text) for k, text in docs.items()}
    stated = {k: ast.literal_eval(v) for k, v in stated.items() if v is not None}
    expected = {
        UNet: {"norm_groups", "num_classes", "out_channels"},
        DiT: {"freq_embed_dim", "time_init_std", "label_init_std", "num_classes", "out_channels"},
    }[cls]
    assert set(stated) == expected, stated  # the parser found every stated default
    for k, value in stated.items():
        assert fields[k].default == value, (k, fields[k].default, value)

    # The other architecture defaults are the published base models (the docstrings cite
    # DDPM / DiT): UNet() is DDPM's CIFAR-10 model (35.7M), DiT() is DiT-S/2; float32
    # compute and storage.
    for k, value in preset.items():
        assert fields[k].default == value, (k, fields[k].default, value)
    assert fields["dtype"].default == fields["param_dtype"].default == jnp.float32
