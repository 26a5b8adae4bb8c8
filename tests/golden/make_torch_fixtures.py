"""Write the PyTorch golden fixtures used to test the PyTorch -> JAX weight converter.

The JAX test suite never imports torch. It reads the small files this script leaves in
``tests/golden/torch/`` instead:

* ``ddpm_unet/``: a tiny diffusers ``UNet2DModel`` in the DDPM layout (``config.json`` and
  ``diffusion_pytorch_model.safetensors`` from ``save_pretrained``) and ``io.npz`` with an input
  batch ``x`` (NCHW), integer timesteps ``t`` and the model output ``out``.
* ``adm_unet/``: the same with the other options (attention in every block, several heads,
  scale-shift time conditioning, flipped sinusoids, ``freq_shift=0``, 1 -> 2 channels).
* ``autoencoder_kl/``: a tiny diffusers ``AutoencoderKL``; ``io.npz`` holds ``x``, the
  posterior ``mean`` and ``logvar``, a latent ``z`` and ``decoded``.
* ``dit/``: a tiny DiT (Peebles & Xie 2023, ``torch_dit.py``) with the state-dict keys of the
  official implementation, saved as ``dit.pt`` (``torch.save``, zip format), ``dit.safetensors``
  and ``legacy.pt`` (pre-1.6 non-zip format, which the converter must refuse), plus ``io.npz``
  with ``x``, ``t``, ``y`` (the last class index is the classifier-free-guidance null class) and
  ``out``.
* ``full_size_keys.json``: the state-dict key -> shape lists, configs and parameter counts of
  the full-size published layouts (google/ddpm-cifar10-32, google/ddpm-celebahq-256, the Stable
  Diffusion VAE and DiT-XL/2 256x256), built on the meta device: nothing is allocated or
  downloaded.

Every parameter of the tiny models is re-drawn from a normal distribution after construction
(norm weights around 1, biases and all other weights around 0, zero-initialised layers
included) so that no branch of the network is trivially zero and every weight matters to the
outputs. Everything is deterministic: fixed torch seeds per model, inputs from
``numpy.random.RandomState``, float32, eval mode, ``torch.no_grad()``.

Run by hand, from the repository root, with the separate PyTorch venv (torch is never a test
dependency)::

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install -r benchmarks/requirements-peer.txt
    /work/peer-venv/bin/python tests/golden/make_torch_fixtures.py

At the end it reloads every saved model and checks that it reproduces ``io.npz`` exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DModel
from torch import nn
from torch_dit import DiT

OUT_DIR = Path(__file__).resolve().parent / "torch"

WEIGHT_STD = 0.2
BIAS_STD = 0.1
NORM_STD = 0.1

# ----------------------------------------------------------------------------------------------
# Tiny model configurations.
# ----------------------------------------------------------------------------------------------

DDPM_UNET = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    norm_eps=1e-6,
    attention_head_dim=None,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    resnet_time_scale_shift="default",
)

ADM_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
    norm_num_groups=4,
    norm_eps=1e-6,
    attention_head_dim=4,  # 2 and 4 heads
    # diffusers gives the mid-block attention a GroupNorm under scale_shift only when
    # attn_norm_num_groups is set (our UNet always has one).
    attn_norm_num_groups=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=0,
    resnet_time_scale_shift="scale_shift",
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)

TINY_DIT = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=2,
    num_heads=4,
    mlp_ratio=4.0,
    num_classes=10,
    learn_sigma=True,
)

# ----------------------------------------------------------------------------------------------
# Full-size published layouts (keys and shapes only).
# ----------------------------------------------------------------------------------------------

DDPM_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    act_fn="silu",
    center_input_sample=False,
    time_embedding_type="positional",
    mid_block_scale_factor=1,
)

# google/ddpm-celebahq-256: the DDPM code's options, six levels, attention at 16x16.
DDPM_CELEBAHQ256 = dict(
    DDPM_CIFAR10,
    sample_size=256,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)
SD_VAE_NUM_PARAMS = 83_653_863

DIT_XL2_256 = dict(
    input_size=32,
    patch_size=2,
    in_channels=4,
    hidden_size=1152,
    depth=28,
    num_heads=16,
    mlp_ratio=4.0,
    num_classes=1000,
    learn_sigma=True,
)
DIT_XL2_NUM_PARAMS = 675_129_632


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------


def redraw_parameters(model: nn.Module, seed: int, skip: tuple[str, ...] = ()) -> None:
    """Re-draw every parameter: norm weights ~ 1 + 0.1 N, biases ~ 0.1 N, other ~ 0.2 N."""
    norm_params = set()
    for mod_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            for p_name, _ in module.named_parameters(recurse=False):
                norm_params.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in skip:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name in norm_params and name.endswith("weight"):
                value = 1.0 + NORM_STD * noise
            elif name.endswith("bias"):
                value = BIAS_STD * noise
            else:
                value = WEIGHT_STD * noise
            param.copy_(value)
    # pos_embed is excluded on purpose; make sure nothing else is.
    for name, param in model.named_parameters():
        assert name in skip or bool((param != 0).all()), name


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def diffusers_config(model) -> dict:
    """The model config as diffusers writes it to config.json, minus the private keys."""
    config = json.loads(model.to_json_string())
    # diffusers' bookkeeping keys dropped, except the class name a converter dispatches on
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def to_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float32)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------
# Fixture writers.
# ----------------------------------------------------------------------------------------------


def make_unet(name: str, config: dict, seed: int, t_values: list[int]) -> None:
    out = OUT_DIR / name
    torch.manual_seed(seed)
    model = UNet2DModel(**config).float().eval()
    redraw_parameters(model, seed)
    rs = np.random.RandomState(seed)
    size = config["sample_size"]
    x = rs.standard_normal((2, config["in_channels"], size, size)).astype(np.float32)
    t = np.asarray(t_values, dtype=np.int64)
    with torch.no_grad():
        y = model(torch.from_numpy(x), torch.from_numpy(t)).sample
    model.save_pretrained(out, safe_serialization=True)
    np.savez(out / "io.npz", x=x, t=t, out=to_np(y))
    print(f"{name}: {num_params(model):,} params, |out| max {float(y.abs().max()):.3g}")


def make_autoencoder(seed: int) -> None:
    out = OUT_DIR / "autoencoder_kl"
    torch.manual_seed(seed)
    model = AutoencoderKL(**TINY_VAE).float().eval()
    redraw_parameters(model, seed)
    rs = np.random.RandomState(seed)
    size = TINY_VAE["sample_size"]
    x = rs.uniform(-1.0, 1.0, (2, TINY_VAE["in_channels"], size, size)).astype(np.float32)
    latent = size // 2 ** (len(TINY_VAE["block_out_channels"]) - 1)
    z = rs.standard_normal((2, TINY_VAE["latent_channels"], latent, latent)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x)).latent_dist
        decoded = model.decode(torch.from_numpy(z)).sample
    model.save_pretrained(out, safe_serialization=True)
    np.savez(
        out / "io.npz",
        x=x,
        mean=to_np(posterior.mean),
        logvar=to_np(posterior.logvar),
        z=z,
        decoded=to_np(decoded),
    )
    print(
        f"autoencoder_kl: {num_params(model):,} params, "
        f"logvar range [{float(posterior.logvar.min()):.3g}, {float(posterior.logvar.max()):.3g}]"
        f", |decoded| max {float(decoded.abs().max()):.3g}"
    )


def dit_inputs() -> dict[str, np.ndarray]:
    rs = np.random.RandomState(4)
    c, s = TINY_DIT["in_channels"], TINY_DIT["input_size"]
    return dict(
        x=rs.standard_normal((2, c, s, s)).astype(np.float32),
        t=np.asarray([10, 999], dtype=np.int64),
        y=np.asarray([3, TINY_DIT["num_classes"]], dtype=np.int64),
    )


def run_dit(model: DiT, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        args = [torch.from_numpy(inputs[k]) for k in ("x", "t", "y")]
        return to_np(model(*args))


def make_dit(seed: int) -> None:
    out = OUT_DIR / "dit"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = DiT(**TINY_DIT).float().eval()
    redraw_parameters(model, seed, skip=("pos_embed",))
    inputs = dit_inputs()
    y = run_dit(model, inputs)
    state = model.state_dict()
    torch.save(state, out / "dit.pt")
    safetensors.torch.save_file(state, str(out / "dit.safetensors"))
    # Only there to be refused: one small tensor in the old non-zip format.
    legacy = {"pos_embed": state["pos_embed"]}
    torch.save(legacy, out / "legacy.pt", _use_new_zipfile_serialization=False)
    np.savez(out / "io.npz", **inputs, out=y)
    print(f"dit: {num_params(model):,} params, |out| max {float(np.abs(y).max()):.3g}")


def make_full_size_keys() -> None:
    entries = {}
    with torch.device("meta"):
        models = {
            "ddpm_cifar10": UNet2DModel(**DDPM_CIFAR10),
            "ddpm_celebahq256": UNet2DModel(**DDPM_CELEBAHQ256),
            "sd_vae": AutoencoderKL(**SD_VAE),
            "dit_xl2_256": DiT(**DIT_XL2_256),
        }
    for name, model in models.items():
        config = dict(DIT_XL2_256) if isinstance(model, DiT) else diffusers_config(model)
        keys = {k: list(v.shape) for k, v in model.state_dict().items()}
        count = num_params(model)
        entries[name] = {"config": config, "num_params": count, "keys": keys}
        print(f"{name}: {count:,} params, {len(keys)} keys")
    assert entries["sd_vae"]["num_params"] == SD_VAE_NUM_PARAMS, entries["sd_vae"]["num_params"]
    assert entries["dit_xl2_256"]["num_params"] == DIT_XL2_NUM_PARAMS
    with open(OUT_DIR / "full_size_keys.json", "w") as f:
        json.dump(entries, f, indent=1)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Self-check: reload from disk and reproduce io.npz exactly.
# ----------------------------------------------------------------------------------------------


def check_equal(name: str, got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
    assert np.array_equal(got, want), (name, float(np.abs(got - want).max()))


def self_check() -> None:
    for name in ("ddpm_unet", "adm_unet"):
        io = np.load(OUT_DIR / name / "io.npz")
        model = UNet2DModel.from_pretrained(OUT_DIR / name, low_cpu_mem_usage=False).float().eval()
        with torch.no_grad():
            y = model(torch.from_numpy(io["x"]), torch.from_numpy(io["t"])).sample
        check_equal(name, to_np(y), io["out"])

    io = np.load(OUT_DIR / "autoencoder_kl" / "io.npz")
    model = (
        AutoencoderKL.from_pretrained(OUT_DIR / "autoencoder_kl", low_cpu_mem_usage=False)
        .float()
        .eval()
    )
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(io["x"])).latent_dist
        decoded = model.decode(torch.from_numpy(io["z"])).sample
    check_equal("vae mean", to_np(posterior.mean), io["mean"])
    check_equal("vae logvar", to_np(posterior.logvar), io["logvar"])
    check_equal("vae decoded", to_np(decoded), io["decoded"])

    io = np.load(OUT_DIR / "dit" / "io.npz")
    inputs = {k: io[k] for k in ("x", "t", "y")}
    for fname in ("dit.pt", "dit.safetensors"):
        path = OUT_DIR / "dit" / fname
        if fname.endswith(".safetensors"):
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        torch.manual_seed(12345)  # a different init, fully overwritten by the load
        model = DiT(**TINY_DIT).float().eval()
        model.load_state_dict(state, strict=True)
        check_equal(f"dit {fname}", run_dit(model, inputs), io["out"])
    print("self-check: every reloaded model reproduces io.npz exactly")


def main() -> None:
    torch.set_num_threads(1)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    make_unet("ddpm_unet", DDPM_UNET, seed=1, t_values=[3, 917])
    make_unet("adm_unet", ADM_UNET, seed=2, t_values=[0, 500])
    make_autoencoder(seed=3)
    make_dit(seed=4)
    make_full_size_keys()
    self_check()
    print("sizes:")
    for path in sorted(OUT_DIR.rglob("*")):
        if path.is_file():
            print(f"  {os.path.relpath(path, OUT_DIR.parent)}: {path.stat().st_size:,} bytes")
    print(f"  total: {dir_size(OUT_DIR):,} bytes")


if __name__ == "__main__":
    main()
