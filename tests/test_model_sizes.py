"""Model sizes: parameter counts and Gflops of the published presets against the papers
(DDPM's CIFAR-10 UNet, DiT Table 4) and against closed forms counted here layer by layer,
independent of flax; the preset table itself.

Nothing runs: the paper-sized models are only counted / lowered with abstract shapes
(jax.eval_shape, .lower().cost_analysis()), which costs no memory and no compile.
"""

from __future__ import annotations

import pytest

from diffusion_jax.models import (
    DIT_PRESETS,
    UNET_PRESETS,
    abstract_params,
    build_model,
    count_params,
    xla_forward_flops,
)

# --------------------------------------------------------------------------- paper sizes


def _unet_param_count(
    base_channels,
    channel_mult,
    num_res_blocks,
    attn_resolutions,
    image_size,
    in_channels,
    num_classes=0,
    conv_resample=True,
    resblock_updown=False,
    use_scale_shift_norm=False,
    **_,
):
    """Closed-form parameter count of the DDPM/ADM UNet, layer by layer from the paper's
    architecture (conv k*k*cin*cout + cout, dense i*o + o, GroupNorm 2c), independent of
    flax. Output channels = input channels."""

    def conv(cin, cout, k=3):
        return k * k * cin * cout + cout

    def dense(i, o):
        return i * o + o

    emb = 4 * base_channels  # timestep-MLP / conditioning width

    def res(cin, cout):  # norm1, conv1, emb projection, norm2, conv2, 1x1 skip if widths differ
        n_emb = 2 * cout if use_scale_shift_norm else cout
        skip = dense(cin, cout) if cin != cout else 0
        return 2 * cin + conv(cin, cout) + dense(emb, n_emb) + 2 * cout + conv(cout, cout) + skip

    def attn(c):  # GroupNorm, fused qkv, output projection
        return 2 * c + dense(c, 3 * c) + dense(c, c)

    def resample(c):
        return res(c, c) if resblock_updown else conv(c, c) if conv_resample else 0

    n = dense(base_channels, emb) + dense(emb, emb)  # time_embed
    n += (num_classes + 1) * emb if num_classes else 0  # label table with the null row
    n += conv(in_channels, base_channels)  # conv_in
    c, size, skips = base_channels, image_size, [base_channels]
    levels = len(channel_mult)
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            n += res(c, mult * base_channels) + (
                attn(mult * base_channels) if size in attn_resolutions else 0
            )
            c = mult * base_channels
            skips.append(c)
        if level != levels - 1:
            n, size = n + resample(c), size // 2
            skips.append(c)
    n += 2 * res(c, c) + attn(c)  # middle
    for level in reversed(range(levels)):
        for _ in range(num_res_blocks + 1):
            cout = channel_mult[level] * base_channels
            n += res(c + skips.pop(), cout) + (attn(cout) if size in attn_resolutions else 0)
            c = cout
        if level != 0:
            n, size = n + resample(c), size * 2
    return n + 2 * c + conv(c, in_channels)  # norm_out, conv_out


def test_ddpm_cifar10_param_count():
    model = build_model({"name": "unet", "num_classes": 0, "unet": UNET_PRESETS["ddpm_cifar10"]})
    n = count_params(abstract_params(model, (32, 32, 3)))
    print(f"ddpm_cifar10 params: {n:,}")
    # Ho et al. 2020 report 35.7M; their official diffusion_tf code counts 35,746,307.
    assert n == 35_746_307
    # The closed form reproduces the official count: it is trusted for the presets below.
    assert _unet_param_count(**UNET_PRESETS["ddpm_cifar10"], image_size=32, in_channels=3) == n


# Peebles & Xie 2023, Table 4 (params in millions, Gflops) at 256x256 -> 32x32x4 latent,
# learned sigma (8 output channels), 1000 classes.
DIT_PAPER = {
    "DiT-S/2": (33, 6.06),
    "DiT-S/4": (33, 1.41),
    "DiT-S/8": (33, 0.36),
    "DiT-B/2": (130, 23.01),
    "DiT-B/4": (130, 5.56),
    "DiT-B/8": (131, 1.42),
    "DiT-L/2": (458, 80.71),
    "DiT-L/4": (458, 19.70),
    "DiT-L/8": (459, 5.01),
    "DiT-XL/2": (675, 118.64),
    "DiT-XL/4": (675, 29.05),
    "DiT-XL/8": (676, 7.39),
}


def _dit_dims(preset):
    """(hidden d, depth, patch p, tokens N) of a preset at the paper's 32x32 latent."""
    cfg = DIT_PRESETS[preset]
    return cfg["hidden_size"], cfg["depth"], cfg["patch_size"], (32 // cfg["patch_size"]) ** 2


def _dit_param_count(d, depth, p, c_in=4, c_out=8, num_classes=1000, freq=256):
    """Closed-form trainable parameters of DiT (MLP ratio 4; dense i*o + o)."""

    def dense(i, o):
        return i * o + o

    # adaLN (d -> 6d), qkv (d -> 3d), attention out (d -> d), MLP (d -> 4d -> d):
    # 18 d^2 + 15 d. The LayerNorms have no parameters.
    block = dense(d, 6 * d) + dense(d, 3 * d) + dense(d, d) + dense(d, 4 * d) + dense(4 * d, d)
    embed = dense(p * p * c_in, d) + dense(freq, d) + dense(d, d) + (num_classes + 1) * d
    final = dense(d, 2 * d) + dense(d, p * p * c_out)  # adaLN (shift, scale) + linear
    return embed + depth * block + final


def _dit_macs(d, depth, p, tokens, c_in=4, c_out=8, freq=256):
    """Closed-form multiply-accumulates of one DiT forward pass (batch 1): every matmul,
    nothing elementwise. Per block: qkv 3d^2, out d^2, MLP 8d^2 per token; Q K^T and
    attention x V N^2 d each; adaLN 6d^2 once (it acts on c, not on the tokens)."""
    block = tokens * 12 * d * d + 2 * tokens * tokens * d + 6 * d * d
    embed = tokens * p * p * c_in * d + freq * d + d * d  # patches, timestep MLP
    final = 2 * d * d + tokens * d * p * p * c_out
    return embed + depth * block + final


# Exact trainable counts of this implementation, derived by _dit_param_count (see
# test_dit_exact_counts_follow_closed_form). DiT-XL/2, d = 1152, 28 blocks, p = 2:
#   block  18 d^2 + 15 d = 23,887,872 + 17,280                 = 23,905,152; x 28 = 669,344,256
#   patch  16*d + d = 19,584; t MLP 256*d + d + d^2 + d = 1,624,320; labels 1001*d = 1,153,152
#   final  2d^2 + 2d + 32*d + 32                               =  2,693,408
#   sum    669,344,256 + 19,584 + 1,624,320 + 1,153,152 + 2,693,408 = 674,834,720.
# The official code stores the fixed position embedding (tokens x width = 256 x 1152 =
# 294,912) as a frozen nn.Parameter and includes it in the count its train.py prints
# (675,129,632 for DiT-XL/2); it is a constant here.
DIT_EXACT = {
    "DiT-S/2": 32_865_056,
    "DiT-B/2": 130_315_808,
    "DiT-L/2": 457_840_672,
    "DiT-XL/2": 674_834_720,
}


def test_dit_exact_counts_follow_closed_form():
    for preset, n in DIT_EXACT.items():
        d, depth, p, _ = _dit_dims(preset)
        assert _dit_param_count(d, depth, p) == n, preset
    d = 1152
    block = 18 * d * d + 15 * d
    assert block == 23_905_152
    assert 28 * block + 19_584 + 1_624_320 + 1_153_152 + 2_693_408 == DIT_EXACT["DiT-XL/2"]


def _paper_dit(preset):
    return build_model(
        {"name": "dit", "num_classes": 1000, "dit": dict(DIT_PRESETS[preset], out_channels=8)}
    )


@pytest.mark.parametrize("preset", list(DIT_PAPER))
def test_dit_param_count_and_gflops_match_paper(preset):
    model = _paper_dit(preset)
    params = abstract_params(model, (32, 32, 4))
    n = count_params(params)
    d, depth, p, tokens = _dit_dims(preset)
    n_with_pos = n + tokens * d
    # XLA counts a multiply-add as 2 flops, the paper (Gflops) as 1: divide by 2.
    # Batch 1 with class labels, as the paper.
    flops = xla_forward_flops(model, (32, 32, 4), params=params) / 2
    macs = _dit_macs(d, depth, p, tokens)
    paper_m, paper_gflops = DIT_PAPER[preset]
    print(
        f"{preset}: params {n:,} (+pos-embed {n_with_pos:,}; paper {paper_m}M), "
        f"GFLOPs XLA {flops / 1e9:.3f}, matmul MACs {macs / 1e9:.4f} (paper {paper_gflops})"
    )
    assert n == _dit_param_count(d, depth, p)
    if preset in DIT_EXACT:
        assert n == DIT_EXACT[preset]
    # The paper's rounded counts are of the trainable parameters: with the position
    # embedding DiT-B/2 would round to 131M.
    assert round(n / 1e6) == paper_m
    if preset == "DiT-XL/2":
        assert n_with_pos == 675_129_632
    # The paper's 2-decimal Gflops are the matmul MACs up to their rounding (0.005) plus
    # at most 0.02% (XL/2 is 0.016% above, L/2 0.015%: the paper's counter also counts a
    # few non-matmul ops).
    assert abs(macs / 1e9 - paper_gflops) <= 0.005 + 2e-4 * paper_gflops
    # XLA counts every matmul (2 flops per MAC, so flops/2 >= MACs: nothing is missing)
    # plus elementwise work (bias, LayerNorm, GELU, softmax, residual adds, 1 flop per
    # element, i.e. +0.3..0.8% after halving here).
    assert macs <= flops <= 1.01 * macs


def test_imagenet256_config_is_the_paper_dit_xl2():
    """configs/imagenet256_dit_xl2.py builds the paper's DiT-XL/2: 8 output channels (eps
    and the learned variance of the 4 latent channels), 674,834,720 trainable parameters
    and 675,129,632 with the fixed position embedding, as the official code counts. With
    4 output channels (no learned sigma) the final linear would have 16 (d + 1) = 18,448
    fewer: 674,816,272."""
    from configs import imagenet256_dit_xl2

    config = imagenet256_dit_xl2.get_config()
    assert config.model.dit.out_channels == 8 and config.objective.learn_sigma
    n = count_params(abstract_params(build_model(config.model), (32, 32, 4)))
    d, depth, p, tokens = _dit_dims("DiT-XL/2")
    assert n == DIT_EXACT["DiT-XL/2"] == _dit_param_count(d, depth, p, c_out=8)
    assert n + tokens * d == 675_129_632
    assert _dit_param_count(d, depth, p, c_out=4) == n - 16 * (d + 1) == 674_816_272


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


# The digits UNet (base 64, levels 8x8 @ 64 ch and 4x4 @ 128 ch, attention at 4x4, 10
# classes, 1 channel), by _unet_param_count's terms:
#   time MLP 82,432 + labels 11*256 = 2,816 + conv_in 640
#   down: res 64->64 90,560, conv downsample 36,928, res 64->128 263,040, attention 66,304
#   middle: 2 res 128->128 2*328,576, attention 66,304
#   up 4x4: res 256->128 509,184, res 192->128 427,136, 2 attentions 2*66,304,
#           conv upsample 147,584;  up 8x8: res 192->64 176,896, res 128->64 135,808
#   norm_out 128 + conv_out 577                                   = 2,796,097
DIGITS_PARAMS = 2_796_097


def test_digits_preset_is_small():
    model = build_model({"name": "unet", "num_classes": 10, "unet": UNET_PRESETS["digits"]})
    n = count_params(abstract_params(model, (8, 8, 1)))
    assert n == DIGITS_PARAMS
    assert (
        _unet_param_count(**UNET_PRESETS["digits"], image_size=8, in_channels=1, num_classes=10)
        == DIGITS_PARAMS
    )
    # The per-module sums of the comment above.
    assert 82_432 + 2_816 + 640 + 90_560 + 36_928 + 263_040 + 66_304 == 542_720
    assert 2 * 328_576 + 66_304 == 723_456
    assert 509_184 + 427_136 + 2 * 66_304 + 147_584 + 176_896 + 135_808 == 1_529_216
    assert 542_720 + 723_456 + 1_529_216 + 128 + 577 == DIGITS_PARAMS
    assert round(n / 1e4) / 100 == 2.80  # "2.80M parameters" (unet.py, UNET_PRESETS)


def test_adm_small_param_count_follows_closed_form():
    """The scale-shift and ResBlock-resampling terms of the closed form (not exercised by
    the DDPM presets above)."""
    arch = UNET_PRESETS["adm_small"]
    model = build_model({"name": "unet", "num_classes": 10, "unet": arch})
    n = count_params(abstract_params(model, (32, 32, 3)))
    assert n == _unet_param_count(**arch, image_size=32, in_channels=3, num_classes=10)
