"""The KL autoencoder (models/autoencoder.py): Stable Diffusion VAE size against diffusers'
count and a closed form, diffusers-mappable parameter names, shapes, the posterior sample
and log-variance clamp, the asymmetric downsampling and the attention against numpy
references, the registry (build_model / abstract_inputs / check_input_shape), bf16 compute
and the two conv implementations.

Anything that runs uses the "tiny" preset on 8x8 images; SD-sized models are only
counted with abstract shapes (jax.eval_shape): no memory, no compile.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import (
    AUTOENCODER_PRESETS,
    Autoencoder,
    abstract_inputs,
    abstract_params,
    autoencoder as ae,
    build_model,
    check_input_shape,
    count_params,
    xla_forward_flops,
)

TINY = AUTOENCODER_PRESETS["tiny"]  # (8, 16) channels, f = 2, 3 latent / 3 image channels
SHAPE = (8, 8, 3)


def _cfg(arch=None, **top):
    return {"name": "autoencoder", "autoencoder": dict(TINY, **(arch or {})), **top}


def _sd_vae():
    return build_model({"name": "autoencoder", "autoencoder": AUTOENCODER_PRESETS["sd-vae"]})


@pytest.fixture(scope="module")
def tiny():
    model = build_model(_cfg())
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, *SHAPE)), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), x)
    return model, params, x


def _flat(params):
    return flax.traverse_util.flatten_dict(params["params"], sep="/")


# --------------------------------------------------------------------------- sizes


def _vae_param_count(
    block_channels, layers_per_block, latent_channels, image_channels, mid_attention=True, **_
):
    """Closed-form parameter counts (encoder, quant_conv, post_quant_conv, decoder) of the
    LDM / diffusers AutoencoderKL, layer by layer (conv k*k*cin*cout + cout, GroupNorm 2c,
    attention GroupNorm + 4 biased c x c linears), independent of flax."""

    def conv(cin, cout, k=3):
        return k * k * cin * cout + cout

    def res(cin, cout):  # norm1, conv1, norm2, conv2, 1x1 conv_shortcut if widths differ
        shortcut = conv(cin, cout, 1) if cin != cout else 0
        return 2 * cin + conv(cin, cout) + 2 * cout + conv(cout, cout) + shortcut

    def mid(c):
        return 2 * res(c, c) + (2 * c + 4 * (c * c + c) if mid_attention else 0)

    latent, levels = latent_channels, len(block_channels)
    c = block_channels[0]
    enc = conv(image_channels, c)
    for i, out in enumerate(block_channels):
        for _ in range(layers_per_block):
            enc, c = enc + res(c, out), out
        enc += conv(c, c) if i < levels - 1 else 0  # downsampler
    enc += mid(c) + 2 * c + conv(c, 2 * latent)
    dec = conv(latent, c) + mid(c)
    for i, out in enumerate(reversed(block_channels)):
        for _ in range(layers_per_block + 1):
            dec, c = dec + res(c, out), out
        dec += conv(c, c) if i < levels - 1 else 0  # upsampler
    dec += 2 * c + conv(c, image_channels)
    return enc, conv(2 * latent, 2 * latent, 1), conv(latent, latent, 1), dec


# SD VAE by _vae_param_count's terms (res(a, b): ResNet block a -> b channels):
#   encoder  conv_in 3,584; level 0: 2 res(128,128) 591,360 + down 147,584; level 1:
#            res(128,256) 919,040 + res(256,256) 1,181,184 + down 590,080; level 2:
#            res(256,512) 3,673,088 + res(512,512) 4,721,664 + down 2,359,808; level 3:
#            2 res(512,512) 9,443,328; mid 10,494,976; norm 1,024; conv_out 36,872
#                                                                       = 34,163,592
#   quant_conv 72, post_quant_conv 20
#   decoder  conv_in 18,944; mid 10,494,976; up 0 and 1: 3 res(512,512) 14,164,992 + up
#            2,359,808 each; up 2: res(512,256) 1,902,848 + 2 res(256,256) 2,362,368 + up
#            590,080; up 3: res(256,128) 476,288 + 2 res(128,128) 591,360; norm 256;
#            conv_out 3,459                                             = 49,490,179
SD_VAE_PARAMS = 83_653_863  # diffusers AutoencoderKL (SD 1.x / 2.x VAE)


def test_sd_vae_param_count_matches_diffusers():
    params = abstract_params(_sd_vae(), (256, 256, 3))
    assert count_params(params) == SD_VAE_PARAMS
    parts = _vae_param_count(**AUTOENCODER_PRESETS["sd-vae"])
    assert parts == (34_163_592, 72, 20, 49_490_179)
    assert sum(parts) == SD_VAE_PARAMS
    # The comment's sums, then the same split in the flax tree.
    enc = [3_584, 591_360, 147_584, 919_040, 1_181_184, 590_080, 3_673_088, 4_721_664]
    enc += [2_359_808, 9_443_328, 10_494_976, 1_024, 36_872]
    dec = [18_944, 10_494_976, 2 * (14_164_992 + 2_359_808), 1_902_848, 2_362_368, 590_080]
    dec += [476_288, 591_360, 256, 3_459]
    assert (sum(enc), sum(dec)) == (parts[0], parts[3])
    tree = params["params"]
    got = tuple(
        count_params(tree[k]) for k in ("encoder", "quant_conv", "post_quant_conv", "decoder")
    )
    assert got == parts


def test_small_presets_follow_closed_form():
    for name, shape in (("fashion-f4", (32, 32, 1)), ("tiny", SHAPE)):
        arch = AUTOENCODER_PRESETS[name]
        n = count_params(abstract_params(build_model(_cfg(arch)), shape))
        assert n == sum(_vae_param_count(**arch)), name
    assert count_params(abstract_params(build_model(_cfg(dict(mid_attention=False))), SHAPE)) == (
        sum(_vae_param_count(**dict(TINY, mid_attention=False)))
    )


def test_parameter_names_map_to_diffusers_keys():
    """Names an importer maps by writing "_<i>" as ".<i>" (and kernel -> weight, scale ->
    weight), with diffusers' shapes transposed to flax's [kh, kw, in, out] / [in, out]."""
    flat = {k: v.shape for k, v in _flat(abstract_params(_sd_vae(), (64, 64, 3))).items()}
    expected = {
        "encoder/conv_in/kernel": (3, 3, 3, 128),
        "encoder/down_blocks_0/resnets_1/norm2/scale": (128,),
        "encoder/down_blocks_0/downsamplers_0/conv/kernel": (3, 3, 128, 128),
        "encoder/down_blocks_1/resnets_0/conv_shortcut/kernel": (1, 1, 128, 256),
        "encoder/mid_block/attentions_0/group_norm/bias": (512,),
        "encoder/mid_block/attentions_0/to_q/kernel": (512, 512),
        "encoder/mid_block/attentions_0/to_out_0/bias": (512,),
        "encoder/conv_out/kernel": (3, 3, 512, 8),
        "quant_conv/kernel": (1, 1, 8, 8),
        "post_quant_conv/kernel": (1, 1, 4, 4),
        "decoder/conv_in/kernel": (3, 3, 4, 512),
        "decoder/mid_block/resnets_1/conv2/kernel": (3, 3, 512, 512),
        # diffusers order: up_blocks_0 is the deepest level, up_blocks_3 full resolution.
        "decoder/up_blocks_0/resnets_2/conv1/kernel": (3, 3, 512, 512),
        "decoder/up_blocks_0/upsamplers_0/conv/kernel": (3, 3, 512, 512),
        "decoder/up_blocks_2/resnets_0/conv_shortcut/kernel": (1, 1, 512, 256),
        "decoder/up_blocks_3/resnets_0/conv_shortcut/kernel": (1, 1, 256, 128),
        "decoder/conv_norm_out/scale": (128,),
        "decoder/conv_out/kernel": (3, 3, 128, 3),
    }
    assert {k: flat.get(k) for k in expected} == expected
    # No resampler on the last encoder / last decoder level.
    assert not any("down_blocks_3/downsamplers" in k or "up_blocks_3/upsamplers" in k for k in flat)
    assert len([k for k in flat if "/upsamplers_0/conv/kernel" in k]) == 3


# --------------------------------------------------------------------------- shapes


def test_shapes_and_dtypes(tiny):
    model, params, x = tiny
    assert model.downsample_factor == 2 and model.latent_shape(SHAPE) == (4, 4, 3)
    assert _sd_vae().latent_shape((256, 192, 3)) == (32, 24, 4)
    mean, logvar = model.apply(params, x, method="encode")
    assert mean.shape == logvar.shape == (2, 4, 4, 3)
    rec = model.apply(params, mean, method="decode")  # round trip of the posterior mean
    assert rec.shape == x.shape
    out = model.apply(params, x)
    assert [o.shape for o in out] == [x.shape, mean.shape, mean.shape]
    assert all(o.dtype == jnp.float32 for o in (mean, logvar, rec, *out))
    # Non-square inputs and another batch size reuse the parameters.
    x2 = jax.ShapeDtypeStruct((3, 4, 12, 3), jnp.float32)
    shapes = jax.eval_shape(model.apply, params, x2)
    assert [s.shape for s in shapes] == [(3, 4, 12, 3), (3, 2, 6, 3), (3, 2, 6, 3)]
    with pytest.raises(ValueError, match="decodes 3-channel latents"):
        model.apply(params, jnp.zeros((1, 4, 4, 2)), method="decode")


# --------------------------------------------------------------------------- posterior


def _with_logvar_bias(params, value):
    """Params whose quant_conv bias sets the log-variance half of the moments to ~value."""
    params = jax.tree.map(lambda a: a, params)  # copy the tree structure
    bias = params["params"]["quant_conv"]["bias"]
    latent = bias.shape[0] // 2
    params["params"]["quant_conv"]["bias"] = bias.at[latent:].set(value)
    return params


def test_posterior_mean_and_reparameterisation(tiny):
    """Eager calls, so the same ops run in the same order: the comparisons are expected to
    be bitwise equal; the 1e-6 tolerance only allows a few float32 ulps (values are O(1))."""
    model, params, x = tiny
    params = _with_logvar_bias(params, -1.0)  # std ~ exp(-0.5): unlike exp(logvar) ~ e^-1
    mean, logvar = model.apply(params, x, method="encode")
    assert float(jnp.abs(logvar + 1.0).max()) < 1.0  # the bias dominates at init

    rec, mean_c, logvar_c = model.apply(params, x)
    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean_c, mean, **tol)
    np.testing.assert_allclose(logvar_c, logvar, **tol)
    np.testing.assert_allclose(rec, model.apply(params, mean, method="decode"), **tol)
    np.testing.assert_allclose(model.apply(params, x, jnp.zeros_like(mean))[0], rec, **tol)

    noise = jax.random.normal(jax.random.key(1), mean.shape)
    z = mean + jnp.exp(0.5 * logvar) * noise
    rec_noisy = model.apply(params, x, noise)[0]
    np.testing.assert_allclose(rec_noisy, model.apply(params, z, method="decode"), **tol)
    # The noise matters, and with std exp(logvar / 2) rather than exp(logvar).
    z_wrong = mean + jnp.exp(logvar) * noise
    wrong = model.apply(params, z_wrong, method="decode")
    assert float(jnp.abs(rec_noisy - rec).max()) > 1e-3
    assert float(jnp.abs(rec_noisy - wrong).max()) > 1e-4
    # train=True changes nothing (the SD VAE has no dropout).
    np.testing.assert_array_equal(model.apply(params, x, noise, train=True)[0], rec_noisy)


@pytest.mark.parametrize("bias,expected", [(100.0, 20.0), (-100.0, -30.0)])
def test_logvar_is_clamped(tiny, bias, expected):
    model, params, x = tiny
    assert ae.LOGVAR_RANGE == (-30.0, 20.0)  # LDM / diffusers DiagonalGaussianDistribution
    mean, logvar = model.apply(_with_logvar_bias(params, bias), x, method="encode")
    np.testing.assert_array_equal(logvar, jnp.full_like(logvar, expected))
    np.testing.assert_array_equal(mean, model.apply(params, x, method="encode")[0])


# --------------------------------------------------------------------------- layers


def test_downsample_pads_bottom_right_only():
    """Against a zero pad of (0, 1) rows/columns + VALID stride-2 conv; symmetric (1, 1)
    padding gives different values. Tolerance: float32 convs of O(1) values, same sums."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 6, 8, 4)), jnp.float32)
    layer = ae.Downsample(norm_groups=4)
    params = layer.init(jax.random.key(0), x)
    w, b = params["params"]["conv"]["kernel"], params["params"]["conv"]["bias"]
    out = layer.apply(params, x)
    assert out.shape == (1, 3, 4, 4)

    def ref(pad):
        xp = jnp.pad(x, ((0, 0), pad, pad, (0, 0)))
        dn = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(xp, w, (2, 2), "VALID", dimension_numbers=dn)
        return y[:, :3, :4] + b

    np.testing.assert_allclose(out, ref((0, 1)), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out - ref((1, 1))).max()) > 1e-2


def test_attention_matches_numpy_reference():
    """Single-head attention over all pixels with a residual, against float64 numpy
    (GroupNorm eps 1e-6). Tolerance 1e-5: float32 rounding of O(1) values over a few
    reductions of <= 8 terms."""
    rng = np.random.default_rng(0)
    b, h, w, c, groups = 2, 2, 3, 8, 4
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    layer = ae.SpatialSelfAttention(norm_groups=groups)
    params = layer.init(jax.random.key(0), x)
    params = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape), params)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])

    xg = x.astype(np.float64).reshape(b, h * w, groups, c // groups)
    mu, var = xg.mean(axis=(1, 3), keepdims=True), xg.var(axis=(1, 3), keepdims=True)
    hn = ((xg - mu) / np.sqrt(var + 1e-6)).reshape(b, h * w, c)
    hn = hn * p["group_norm"]["scale"] + p["group_norm"]["bias"]

    def lin(name, a):
        return a @ p[name]["kernel"] + p[name]["bias"]

    q, k, v = lin("to_q", hn), lin("to_k", hn), lin("to_v", hn)
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(c)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    ref = x + lin("to_out_0", attn @ v).reshape(b, h, w, c)
    np.testing.assert_allclose(layer.apply(params, x), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- registry


def test_build_model_and_abstract_inputs():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(
        {"name": "autoencoder", "num_classes": 0, "autoencoder": dict(TINY, block_channels=[8, 16])}
    )
    model = build_model(cfg)
    assert isinstance(model, Autoencoder) and model.block_channels == (8, 16)
    assert not hasattr(model, "num_classes")
    args = abstract_inputs(model, 5, SHAPE)
    assert isinstance(args, tuple) and [a.shape for a in args] == [(5, *SHAPE)]
    # Initialised the way the training state does it.
    params = jax.eval_shape(
        lambda k: model.init(k, *[jnp.zeros(a.shape, a.dtype) for a in args], train=False),
        jax.random.key(0),
    )
    assert count_params(params) == sum(_vae_param_count(**TINY))
    assert xla_forward_flops(model, SHAPE) > 0
    # The diffusion models keep (x, t, y); y is None when unconditional.
    unet = build_model({"name": "unet", "unet": {"channel_mult": (1, 2), "norm_groups": 8}})
    x, t, y = abstract_inputs(unet, 2, (8, 8, 1))
    assert x.shape == (2, 8, 8, 1) and t.shape == (2,) and y is None


def test_build_model_errors():
    with pytest.raises(ValueError, match="num_classes=10 but Autoencoder.*num_classes=0"):
        build_model(_cfg(num_classes=10))
    with pytest.raises(ValueError, match="autoencoder.block_channel .*valid keys.*block_channels"):
        build_model(_cfg(dict(block_channel=(8,))))
    with pytest.raises(ValueError, match=r"autoencoder.num_classes is not .*argument; valid"):
        build_model(_cfg(dict(num_classes=3)))
    with pytest.raises(ValueError, match="use model.compute_dtype"):
        build_model(_cfg(dict(dtype="bfloat16")))


def test_base_config_builds_the_fashion_autoencoder():
    from configs import base

    config = base.get_config()
    config.model.name = "autoencoder"
    model = build_model(config.model)
    assert model.latent_shape((32, 32, 1)) == (8, 8, 4)
    check_input_shape(config.model, 32, 1)


@pytest.mark.parametrize(
    "arch,size,channels,match",
    [
        ({}, 9, 3, "divisible by 2; got 9x9.*e.g. to 8x8"),
        (dict(block_channels=(8, 16, 16)), (8, 10), 3, "divisible by 4; got 8x10"),
        ({}, 8, 1, "image_channels=3 but the images have 1 channels.*image_channels=1"),
        (dict(block_channels=(8, 10)), 8, 3, "width 10 is not divisible by norm_groups=4"),
    ],
)
def test_bad_input_shapes_raise_clear_errors(arch, size, channels, match):
    cfg = _cfg(arch)
    with pytest.raises(ValueError, match=match):
        check_input_shape(cfg, size, channels)
    h, w = (size, size) if isinstance(size, int) else size
    x = jax.ShapeDtypeStruct((1, h, w, channels), jnp.float32)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(build_model(cfg).init, jax.random.key(0), x)


# --------------------------------------------------------------------------- numerics


def test_bfloat16_compute_keeps_float32_params(tiny):
    model, params, x = tiny
    model16 = build_model(_cfg(compute_dtype="bfloat16"))
    assert model16.dtype == jnp.bfloat16
    shapes = abstract_params(model16, SHAPE)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    out32 = jax.jit(model.apply)(params, x)[0]
    out16 = jax.jit(model16.apply)(params, x)
    assert all(o.dtype == jnp.float32 for o in out16)
    rel = float(jnp.linalg.norm(out16[0] - out32) / jnp.linalg.norm(out32))
    print(f"bf16 vs f32 relative error: {rel:.2e}")
    # bf16's unit roundoff is 2^-9 ~ 2e-3 per op; over ~20 layers a few 1e-2 at most.
    # Below 1e-3 the bf16 path cannot have been taken (float32 alone gives ~1e-7).
    assert 1e-3 < rel < 5e-2, rel


def test_explicit_grad_convs_give_the_same_gradients(tiny):
    """conv_impl="explicit_grad" (models/conv.py), incl. the asymmetric stride-2 pad: same
    parameters, values and gradients. Tolerance: float32 sums in another order."""
    model, params, x = tiny
    other = build_model(_cfg(dict(conv_impl="explicit_grad")))

    def loss(m):
        def f(p):
            rec, mean, logvar = m.apply(p, x, jnp.ones((2, 4, 4, 3)))
            return jnp.mean((rec - x) ** 2) + jnp.mean(mean**2 + jnp.exp(logvar))

        return jax.jit(jax.value_and_grad(f))(params)

    (l_a, g_a), (l_b, g_b) = loss(model), loss(other)
    np.testing.assert_allclose(l_a, l_b, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_a), jax.tree.leaves(g_b)):
        scale = float(jnp.abs(a).max()) + 1e-12
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))
