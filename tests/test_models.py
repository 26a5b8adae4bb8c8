"""Tests for diffusion_jax.models: published sizes, shapes, conditioning, init, jit.

Anything that runs uses tiny configs; the paper-sized presets are only counted /
lowered with abstract shapes (jax.eval_shape, .lower().cost_analysis()), which costs no
memory and no compile. Real initializations use an 'rbg' PRNG key: same distributions,
but XLA compiles it several times faster than threefry on CPU.
"""

from __future__ import annotations

import dataclasses

import chex
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
    count_params,
    layers,
    xla_forward_flops,
)
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.unet import UNet

NUM_CLASSES = 3
UNET_TINY = dict(
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    num_heads=2,
    dropout=0.5,
    norm_groups=4,
)
DIT_TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2)
SHAPES = {"unet": (8, 8, 1), "dit": (8, 8, 4)}


def _cfg(name, num_classes=NUM_CLASSES, compute_dtype="float32", **arch):
    base = {"unet": UNET_TINY, "dit": DIT_TINY}[name]
    return {
        "name": name,
        "num_classes": num_classes,
        "compute_dtype": compute_dtype,
        name: dict(base, **arch),
    }


def _inputs(shape, batch=4, seed=0):
    x = jax.random.normal(jax.random.key(seed), (batch, *shape), jnp.float32)
    t = jnp.arange(batch, dtype=jnp.int32) * 250  # distinct timesteps 0, 250, 500, 750
    y = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
    return x, t, y


def _perturb(params, seed=1, scale=0.3):
    """Random non-zero parameters: a fresh model's zero-initialized output layers would
    make every output 0 and hide the effect of t, y and dropout. Drawn with numpy on the
    host: eager jax.random per leaf shape would compile once per shape."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


class Tiny:
    """A tiny class-conditional model with real init and one jitted eval / train apply
    each, shared by all tests of a module (few compiles)."""

    def __init__(self, name):
        self.model = build_model(_cfg(name))
        self.x, self.t, self.y = _inputs(SHAPES[name])
        self.params = jax.jit(self.model.init)(
            jax.random.key(0, impl="rbg"), self.x, self.t, self.y
        )
        self.perturbed = _perturb(self.params)

        # Wrapped in a trace counter: every test that calls it also checks that nothing
        # retraces (all calls share shapes and dtypes).
        def forward(params, x, t, y):
            return self.model.apply(params, x, t, y)  # train=False

        self.eval_fn = jax.jit(chex.assert_max_traces(forward, n=1))
        self.train_fn = jax.jit(
            lambda p, x, t, y, rng: self.model.apply(p, x, t, y, train=True, rngs={"dropout": rng})
        )


@pytest.fixture(scope="module")
def tiny_unet():
    return Tiny("unet")


@pytest.fixture(scope="module")
def tiny_dit():
    return Tiny("dit")


@pytest.fixture(params=["unet", "dit"])
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")


# --------------------------------------------------------------------------- paper sizes


def test_ddpm_cifar10_param_count():
    model = build_model({"name": "unet", "num_classes": 0, "unet": UNET_PRESETS["ddpm_cifar10"]})
    n = count_params(abstract_params(model, (32, 32, 3)))
    print(f"ddpm_cifar10 params: {n:,}")
    # Ho et al. 2020 report 35.7M; their official diffusion_tf code counts 35,746,307.
    assert n == 35_746_307


# Peebles & Xie 2023, Table 4 (params, Gflops) at 256x256 -> 32x32x4 latent, learned sigma
# (8 output channels), 1000 classes.
DIT_PAPER = {
    "DiT-S/2": (33, 6.06),
    "DiT-B/2": (130, 23.0),
    "DiT-L/2": (458, 80.7),
    "DiT-XL/2": (675, 118.6),
}
# Exact trainable counts of this implementation. The official code stores the fixed
# position embedding (tokens x width) as a frozen nn.Parameter and includes it in the
# count its train.py prints (675,129,632 for DiT-XL/2); it is a constant here.
DIT_EXACT = {
    "DiT-S/2": 32_865_056,
    "DiT-B/2": 130_315_808,
    "DiT-L/2": 457_840_672,
    "DiT-XL/2": 674_834_720,
}


def _paper_dit(preset):
    return build_model(
        {"name": "dit", "num_classes": 1000, "dit": dict(DIT_PRESETS[preset], out_channels=8)}
    )


@pytest.mark.parametrize("preset", list(DIT_PAPER))
def test_dit_param_count_and_gflops_match_paper(preset):
    model = _paper_dit(preset)
    params = abstract_params(model, (32, 32, 4))
    n = count_params(params)
    n_with_pos = n + 256 * model.hidden_size
    # XLA counts a multiply-add as 2 flops, the paper (Gflops) as 1: divide by 2.
    # Batch 1 with class labels, as the paper.
    gflops = xla_forward_flops(model, (32, 32, 4), params=params) / 2 / 1e9
    paper_m, paper_gflops = DIT_PAPER[preset]
    print(
        f"{preset}: params {n:,} (+pos-embed {n_with_pos:,}; paper {paper_m}M), "
        f"GFLOPs {gflops:.3f} (paper {paper_gflops})"
    )
    assert n == DIT_EXACT[preset]
    # The paper's rounded counts are of the trainable parameters: with the position
    # embedding DiT-B/2 would round to 131M.
    assert round(n / 1e6) == paper_m
    if preset == "DiT-XL/2":
        assert n_with_pos == 675_129_632
    # The excess (+0.3..0.7%) is elementwise work (bias, LayerNorm, GELU, residual adds),
    # which XLA counts and a multiply-add count does not.
    assert abs(gflops / paper_gflops - 1) < 0.02


def test_dit_patch_size_changes_only_embed_and_final_layer():
    """Patch p: the patch embedding has p*p*C*h weights, the final linear h*p*p*out + p*p*out."""
    for size in ("S", "XL"):
        counts = {
            p: count_params(abstract_params(_paper_dit(f"DiT-{size}/{p}"), (32, 32, 4)))
            for p in (2, 4, 8)
        }
        h = DIT_PRESETS[f"DiT-{size}/2"]["hidden_size"]
        for p in (4, 8):
            d = p * p - 4
            assert counts[p] - counts[2] == d * 4 * h + d * h * 8 + d * 8


def test_dit_presets_cover_all_sizes_and_patches():
    assert len(DIT_PRESETS) == 12
    assert DIT_PRESETS["DiT-XL/8"] == dict(
        depth=28, hidden_size=1152, num_heads=16, patch_size=8, mlp_ratio=4.0
    )


def test_digits_preset_is_small():
    model = build_model({"name": "unet", "num_classes": 10, "unet": UNET_PRESETS["digits"]})
    n = count_params(abstract_params(model, (8, 8, 1)))
    assert 1e6 < n < 3e6, n


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
    assert set(MODELS) == {"unet", "dit"}
    model = build_model(_cfg("dit", compute_dtype="bfloat16"))
    assert isinstance(model, DiT) and model.dtype == jnp.bfloat16
    assert model.num_classes == NUM_CLASSES and model.hidden_size == 32
    with pytest.raises(ValueError, match=r"valid names: \['dit', 'unet'\]"):
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


def test_fresh_model_outputs_exact_zero(tiny):
    """DDPM zero-initializes the output conv; DiT's final layer is zero (adaLN-Zero)."""
    out = tiny.eval_fn(tiny.params, tiny.x, tiny.t, tiny.y)
    assert out.shape == tiny.x.shape and out.dtype == jnp.float32
    assert jnp.all(out == 0)


def test_dit_blocks_start_as_identity(tiny_dit):
    """adaLN-Zero: every gate is 0 at init, so each block returns its input exactly."""
    from diffusion_jax.models.dit import DiTBlock

    block = DiTBlock(hidden_size=32, num_heads=2)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 32)), jnp.float32)
    c = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32)), jnp.float32)
    params = {"params": tiny_dit.params["params"]["block1"]}
    np.testing.assert_array_equal(jax.jit(block.apply)(params, x, c), x)


def test_initialization_matches_papers(tiny):
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(tiny.params)[0]
    }
    if isinstance(tiny.model, UNet):
        # Last conv of every residual branch, every attention output projection, output conv.
        zero = [k.replace("conv1", "conv2") for k in flat if k.endswith("conv1/kernel")]
        zero += [k.replace("qkv", "proj") for k in flat if k.endswith("attn/qkv/kernel")]
        zero += ["params/conv_out/kernel", "params/conv_out/bias"]
        assert len(zero) == 8 + 4 + 2  # tiny UNet: 8 ResBlocks, 4 attention blocks
    else:
        zero = [k for k in flat if "adaLN" in k or k.startswith("params/final/linear")]
        assert len(zero) == 2 * 2 + 2 + 2  # (kernel, bias) x (2 blocks + final adaLN + linear)
        # Xavier uniform: Var = 2 / (fan_in + fan_out); qkv of a 32-wide block is 32 x 96.
        qkv = flat["params/block0/attn/qkv/kernel"]
        assert abs(float(jnp.std(qkv)) / np.sqrt(2 / (32 + 96)) - 1) < 0.1
        assert abs(float(jnp.std(flat["params/y_embed/table/embedding"])) / 0.02 - 1) < 0.2
        assert flat["params/y_embed/table/embedding"].shape == (NUM_CLASSES + 1, 32)
    for k in zero:
        assert jnp.all(flat[k] == 0), k


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
    ``eval_fn`` raises on a second trace (chex.assert_max_traces)."""
    outs = [
        tiny.eval_fn(params, tiny.x * s, tiny.t + s, (tiny.y + s) % NUM_CLASSES)
        for s in range(3)
        for params in (tiny.params, tiny.perturbed)
    ]
    assert not np.allclose(outs[1], outs[3])


def test_bfloat16_compute_smoke(tiny):
    """bf16 compute, f32 params and output; close to f32 at bf16 precision (8 mantissa
    bits, ~4e-3 relative per op, accumulated over a few layers -> a few 1e-2)."""
    name = "unet" if isinstance(tiny.model, UNet) else "dit"
    model16 = build_model(_cfg(name, compute_dtype="bfloat16"))
    p = _perturb(tiny.params, scale=0.1)
    out32 = tiny.eval_fn(p, tiny.x, tiny.t, tiny.y)
    out16 = jax.jit(model16.apply)(p, tiny.x, tiny.t, tiny.y)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    print(f"bf16 vs f32 relative error: {rel:.2e}")
    assert rel < 5e-2, rel


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


def test_resblock_variants_start_as_skip():
    """Zero-initialized conv2: a fresh ResBlock is the identity (or its 1x1 projection)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 8)), jnp.float32)
    emb = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16)), jnp.float32)
    # The additive variant is covered by the UNet's zero-output test.
    block = layers.ResBlock(8, norm_groups=4, use_scale_shift_norm=True)
    params = jax.jit(block.init)(jax.random.key(0, impl="rbg"), x, emb)
    np.testing.assert_array_equal(jax.jit(block.apply)(params, x, emb), x)


def test_module_fields_are_documented_defaults():
    # The configs mirror these names; changing one is an interface change.
    unet = {f.name for f in dataclasses.fields(UNet)}
    dit = {f.name for f in dataclasses.fields(DiT)}
    assert {
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
        "num_classes",
        "out_channels",
        "dtype",
        "param_dtype",
    } <= unet
    assert {
        "patch_size",
        "hidden_size",
        "depth",
        "num_heads",
        "mlp_ratio",
        "freq_embed_dim",
        "num_classes",
        "out_channels",
        "dtype",
        "param_dtype",
    } <= dit
