"""Model initialization: fresh models output exact zeros (DDPM's zero output conv, DiT's
adaLN-Zero), every parameter against the initializer its paper uses (distribution checked
within 5 standard errors of its sampling statistics), and fresh ResBlocks return their skip
path exactly.

Real initializations use an 'rbg' PRNG key: same distributions, but XLA compiles it
several times faster than threefry on CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import layers
from diffusion_jax.models.unet import UNet

from helpers import TINY_NUM_CLASSES as NUM_CLASSES

# --------------------------------------------------------------------------- fresh models


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


def _check_init(name, w, kind):
    """Check one parameter tensor against its initializer. Tolerances come from the
    sampling distribution of n draws (the key is fixed, so this is deterministic; 5
    standard errors would be exceeded by a correct init with probability < 1e-6)."""
    w64 = np.asarray(w, np.float64)
    n = w64.size
    if kind == "zeros":
        assert np.all(w64 == 0), name
    elif kind == "ones":
        assert np.all(w64 == 1), name
    elif kind == "xavier_uniform":
        # U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010; flax's
        # variance_scaling(1, "fan_avg", "uniform")), std a / sqrt(3). Fans as flax counts
        # them: the last two axes are (in, out), leading axes a receptive field multiplying
        # both (3x3 conv: fan_in = 9 * in, fan_out = 9 * out).
        rf = math.prod(w64.shape[:-2])
        fan_in, fan_out = w64.shape[-2] * rf, w64.shape[-1] * rf
        a = math.sqrt(6 / (fan_in + fan_out))
        std = a / math.sqrt(3)
        top = np.abs(w64).max()
        # Support: nothing beyond a (f32 rounding aside); and the largest of n draws is
        # within a * 20/n of the edge unless (1 - 20/n)^n < e^-20.
        assert top <= a * (1 + 1e-6), (name, top, a)
        assert top >= a * (1 - 20 / n), (name, top, a)
        # Sample std of a uniform: relative standard error sqrt((kurtosis - 1) / 4n)
        # = sqrt(0.2 / n) (kurtosis 9/5); the mean's standard error is std / sqrt(n).
        assert abs(w64.std() / std - 1) < 5 * math.sqrt(0.2 / n), (name, w64.std(), std)
        assert abs(w64.mean()) < 5 * std / math.sqrt(n), name
    else:  # ("normal", stddev)
        std = kind[1]
        # Sample std of a Gaussian: relative standard error sqrt(1 / 2n).
        assert abs(w64.std() / std - 1) < 5 * math.sqrt(0.5 / n), (name, w64.std(), std)
        assert abs(w64.mean()) < 5 * std / math.sqrt(n), name


def test_initialization_matches_papers(tiny):
    """Every parameter against the initializer its paper uses.

    DDPM (diffusion_tf nn.default_init): every conv / dense kernel Xavier uniform (fan-avg
    uniform variance scaling), zero biases, the last conv of each residual branch, every
    attention output projection and the output conv zero; ADM's label table N(0, 1).
    DiT: Xavier uniform linears (patch embedding on its flattened p*p*C -> d view), timestep
    MLP and label table N(0, 0.02), adaLN modulations and the final linear zero.
    GroupNorm scale 1, bias 0 (DiT's LayerNorms have no parameters)."""
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(tiny.params)[0]
    }
    if isinstance(tiny.model, UNet):
        # Last conv of every residual branch, every attention output projection, output conv.
        zero = [k.replace("conv1", "conv2") for k in flat if k.endswith("conv1/kernel")]
        zero += [k.replace("qkv", "proj") for k in flat if k.endswith("attn/qkv/kernel")]
        zero += ["params/conv_out/kernel"]
        assert len(zero) == 8 + 4 + 1  # tiny UNet: 8 ResBlocks, 4 attention blocks
        normal = {"params/label_embed/table/embedding": 1.0}
        assert flat["params/label_embed/table/embedding"].shape == (NUM_CLASSES + 1, 64)
    else:
        zero = [k for k in flat if "adaLN" in k or k.startswith("params/final/linear")]
        zero = [k for k in zero if k.endswith("kernel")]
        assert len(zero) == 2 + 1 + 1  # 2 blocks' adaLN + final adaLN + final linear
        normal = {k: 0.02 for k in flat if k.startswith("params/t_embed") and "kernel" in k}
        assert len(normal) == 2  # the timestep MLP's two kernels
        normal["params/y_embed/table/embedding"] = 0.02
        assert flat["params/y_embed/table/embedding"].shape == (NUM_CLASSES + 1, 32)
    kinds = {}
    for k in flat:
        if k in zero:
            kinds[k] = "zeros"
        elif k in normal:
            kinds[k] = ("normal", normal[k])
        elif k.endswith("/bias"):
            kinds[k] = "zeros"
        elif k.endswith("/scale"):
            kinds[k] = "ones"
        else:
            assert k.endswith("/kernel"), k  # nothing unclassified
            kinds[k] = "xavier_uniform"
    for k, kind in kinds.items():
        _check_init(k, flat[k], kind)
    n_xavier = sum(kind == "xavier_uniform" for kind in kinds.values())
    if isinstance(tiny.model, UNet):
        # time MLP 2, conv_in 1, conv1 + emb_proj per ResBlock 8 x 2, skip projections 5,
        # qkv 4, conv down/upsample 2.
        assert n_xavier == 2 + 1 + 16 + 5 + 4 + 2
    else:
        # patch embedding 1, per block qkv, proj, fc1, fc2: 2 x 4.
        assert n_xavier == 1 + 8


# --------------------------------------------------------------------------- ResBlock


@pytest.mark.parametrize("use_scale_shift_norm", [False, True], ids=["additive", "scale_shift"])
@pytest.mark.parametrize("out_channels,resample", [(8, None), (16, None), (16, "down"), (8, "up")])
def test_resblock_variants_start_as_skip(use_scale_shift_norm, out_channels, resample):
    """Zero-initialized conv2: a fresh ResBlock returns its skip path exactly: x itself,
    resampled (2x2 mean / nearest repeat) when ``resample`` is set, then the 1x1
    projection x @ W + b when the widths differ (W, b read from the params, the skip
    recomputed here in float64)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 8)), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    block = layers.ResBlock(
        out_channels, norm_groups=4, use_scale_shift_norm=use_scale_shift_norm, resample=resample
    )
    params = jax.jit(block.init)(jax.random.key(0, impl="rbg"), x, emb)
    apply = jax.jit(block.apply)
    p = params["params"]
    emb_width = (2 if use_scale_shift_norm else 1) * out_channels  # (scale, shift) or shift
    assert p["emb_proj"]["kernel"].shape == (16, emb_width)

    skip = np.asarray(x, np.float64)
    if resample == "down":
        skip = skip.reshape(2, 2, 2, 2, 2, 8).mean(axis=(2, 4))
    elif resample == "up":
        skip = skip.repeat(2, axis=1).repeat(2, axis=2)
    assert ("skip" in p) == (out_channels != 8)
    if out_channels != 8:
        kernel = np.asarray(p["skip"]["kernel"], np.float64)
        assert kernel.shape == (8, out_channels) and kernel.std() > 0.1  # Xavier: 0.29
        skip = skip @ kernel + np.asarray(p["skip"]["bias"], np.float64)

    out = np.asarray(apply(params, x, emb))
    assert out.shape == skip.shape
    if out_channels == 8 and resample is None:
        np.testing.assert_array_equal(out, x)  # x + 0.0: exact
    else:
        # Float32 reductions of <= 8 O(1) terms (4-pixel mean, 8-channel dot with |w| < 0.5)
        # against float64: error <= 8 * 2^-24 * sum |terms| ~ 1e-6; 1e-5 leaves 10x margin.
        np.testing.assert_allclose(out, skip, rtol=1e-5, atol=1e-5)

    assert np.all(np.asarray(p["conv2"]["kernel"]) == 0)  # the reason (DDPM's zero init)

    # The residual branch is really added: with a non-zero conv2 the output moves off the
    # skip path (a block returning only the skip would pass the check above).
    kicked = jax.tree.map(lambda v: v, params)
    kicked["params"]["conv2"]["kernel"] = jnp.full_like(p["conv2"]["kernel"], 0.05)
    moved = np.abs(np.asarray(apply(kicked, x, emb)) - skip).max()
    assert moved > 1e-2, moved
