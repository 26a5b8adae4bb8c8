"""Importing PyTorch weights (diffusion_jax.convert) against golden PyTorch outputs.

The fixtures in tests/golden/torch were written once by tests/golden/make_torch_fixtures.py
(torch 2.13 + diffusers 0.42 in a separate venv; torch is never a test dependency): tiny
random-initialised diffusers UNet2DModel (DDPM and ADM-style options), AutoencoderKL, and a
DiT with the official state-dict layout, every parameter re-drawn so no branch is zero,
with their outputs on fixed inputs; and the key/shape lists of the full-size published
layouts (built on torch's meta device).

Tolerance 1e-4 max abs error (the bar of the weight-import issue): float32 evaluation
order differs between XLA and PyTorch (matmul blocking, exp/sin implementations) by a few
ulps per op; through these networks with O(1) random weights that gives 2e-6..4e-6 for
the UNets and the autoencoder and 8e-5 for the DiT (outputs up to ~10, so ~1e-5 relative;
its timestep sinusoid at t=999 carries float32 rounding of 999 * freq). A layout mistake
(a transposed kernel, a swapped chunk, sin/cos order) gives errors of order 1.
"""

import json
import os
import pickle
import shutil
import zipfile

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffusion_jax import workdir
from diffusion_jax.convert import (
    ConversionError,
    convert_diffusers,
    diffusers,
    dit,
    load_diffusers,
    load_dit,
    read_weights,
)
from diffusion_jax.models import (
    AUTOENCODER_PRESETS,
    DIT_PRESETS,
    UNET_PRESETS,
    build_model,
    count_params,
)

from helpers import REPO, cli

GOLDEN = os.path.join(REPO, "tests", "golden", "torch")
ATOL = 1e-4
ST_FILE = "diffusion_pytorch_model.safetensors"


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def golden(name):
    return np.load(os.path.join(GOLDEN, name, "io.npz"))


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)))


@pytest.mark.parametrize("name", ["ddpm_unet", "adm_unet"])
def test_unet_matches_diffusers(name):
    model, params = load_diffusers(os.path.join(GOLDEN, name))
    io = golden(name)
    out = model.apply({"params": params}, nhwc(io["x"]), io["t"].astype(np.int32))
    assert out.shape == nhwc(io["out"]).shape
    assert max_err(out, nhwc(io["out"])) <= ATOL
    assert np.abs(io["out"]).max() > 1.0  # the golden output is not trivially small


def test_unet_options_reach_the_model():
    """The two fixtures exercise the options a DDPM import depends on."""
    ddpm, _ = load_diffusers(os.path.join(GOLDEN, "ddpm_unet"))
    adm, _ = load_diffusers(os.path.join(GOLDEN, "adm_unet"))
    assert (ddpm.time_cos_first, ddpm.time_freq_shift) == (False, 1.0)  # DDPM's sinusoid
    assert (adm.time_cos_first, adm.time_freq_shift) == (True, 0.0)
    assert adm.use_scale_shift_norm and adm.num_head_channels == 4 and adm.out_channels == 2


def test_autoencoder_matches_diffusers():
    model, params = load_diffusers(os.path.join(GOLDEN, "autoencoder_kl"))
    io = golden("autoencoder_kl")
    mean, logvar = model.apply({"params": params}, nhwc(io["x"]), method="encode")
    decoded = model.apply({"params": params}, nhwc(io["z"]), method="decode")
    assert max_err(mean, nhwc(io["mean"])) <= ATOL
    assert max_err(logvar, nhwc(io["logvar"])) <= ATOL
    assert max_err(decoded, nhwc(io["decoded"])) <= ATOL


@pytest.mark.parametrize("fname", ["dit.pt", "dit.safetensors"])
def test_dit_matches_official_layout(fname):
    model, params = load_dit(os.path.join(GOLDEN, "dit", fname), num_heads=4)
    io = golden("dit")
    assert io["y"][1] == model.num_classes  # the null (CFG) class is exercised
    out = model.apply(
        {"params": params}, nhwc(io["x"]), io["t"].astype(np.int32), io["y"].astype(np.int32)
    )
    assert out.shape == (2, 8, 8, 8)  # learned sigma: 2 x 4 channels
    assert max_err(out, nhwc(io["out"])) <= ATOL


def test_torch_zip_and_safetensors_read_the_same_tensors():
    a = read_weights(os.path.join(GOLDEN, "dit", "dit.pt"))
    b = read_weights(os.path.join(GOLDEN, "dit", "dit.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


FULL_SIZE = json.load(open(os.path.join(GOLDEN, "full_size_keys.json")))


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_layouts_map_every_key_and_shape(name):
    """Every key and shape of the published layouts maps onto ours (no weights needed:
    shapes only), and the parameter counts agree with PyTorch's."""
    entry = FULL_SIZE[name]
    shapes = {k: jax.ShapeDtypeStruct(tuple(v), np.float32) for k, v in entry["keys"].items()}
    if name.startswith("dit"):
        model_cfg, _, params, _ = dit.from_state_dict(shapes, name)
        pos_embed = int(np.prod(entry["keys"]["pos_embed"]))  # a constant here, not a param
        assert count_params(params) == entry["num_params"] - pos_embed == 674_834_720
        assert model_cfg["dit"] == dict(DIT_PRESETS["DiT-XL/2"], freq_embed_dim=256, out_channels=8)
        assert model_cfg["num_classes"] == 1000
        return
    model_cfg, _, params, _ = diffusers.from_state_dict(entry["config"], shapes, name)
    assert count_params(params) == entry["num_params"]
    if name == "ddpm_cifar10":  # our DDPM preset is the published model
        preset = UNET_PRESETS["ddpm_cifar10"]
        for key in ("base_channels", "channel_mult", "num_res_blocks", "attn_resolutions"):
            assert tuple(np.atleast_1d(model_cfg["unet"][key])) == tuple(np.atleast_1d(preset[key]))
        assert entry["num_params"] == 35_746_307
    if name == "sd_vae":
        assert model_cfg["autoencoder"] == AUTOENCODER_PRESETS["sd-vae"]
        assert entry["num_params"] == 83_653_863


def _copy_fixture(tmp_path, name, edit_tensors=None, edit_config=None):
    out = tmp_path / name
    shutil.copytree(os.path.join(GOLDEN, name), out)
    if edit_tensors:
        tensors = load_file(str(out / ST_FILE))
        edit_tensors(tensors)
        save_file(tensors, str(out / ST_FILE))
    if edit_config:
        config = json.loads((out / "config.json").read_text())
        edit_config(config)
        (out / "config.json").write_text(json.dumps(config))
    return str(out)


def test_old_diffusers_attention_names_are_renamed(tmp_path):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(tensors):
        for key in list(tensors):
            for new, before in old.items():
                if f".attentions.0.{new}." in key:
                    tensors[key.replace(f".{new}.", f".{before}.")] = tensors.pop(key)

    path = _copy_fixture(tmp_path, "ddpm_unet", edit_tensors=rename)
    assert "mid_block.attentions.0.query.weight" in load_file(os.path.join(path, ST_FILE))
    model, params = load_diffusers(path)
    io = golden("ddpm_unet")
    out = model.apply({"params": params}, nhwc(io["x"]), io["t"].astype(np.int32))
    assert max_err(out, nhwc(io["out"])) <= ATOL


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("mid_block.attentions.0.to_k.weight"), "missing weight 'mid_block"),
        (lambda t: t.update(extra=np.zeros(3, np.float32)), "unexpected weight 'extra'"),
        (
            lambda t: t.update({"conv_in.weight": np.zeros((8, 3, 5, 5), np.float32)}),
            "'conv_in.*' has shape (8, 3, 5, 5)",
        ),
    ],
)
def test_weight_mismatches_name_the_key(tmp_path, edit, message):
    path = _copy_fixture(tmp_path, "ddpm_unet", edit_tensors=edit)
    with pytest.raises(ConversionError, match=None) as e:
        load_diffusers(path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"norm_eps": 1e-5}, "norm_eps=1e-05"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
        ({"num_class_embeds": 10}, "num_class_embeds=10"),
        ({"downsample_padding": 1}, "downsample_padding=1"),
        ({"_class_name": "UNet2DConditionModel"}, "'UNet2DConditionModel'"),
        ({"block_out_channels": [8, 12]}, "not multiples of the first"),
        ({"up_block_types": ["UpBlock2D", "UpBlock2D"]}, "same resolutions on both paths"),
    ],
)
def test_configs_our_models_cannot_express_are_refused(tmp_path, change, message):
    path = _copy_fixture(tmp_path, "ddpm_unet", edit_config=lambda c: c.update(change))
    with pytest.raises(ConversionError) as e:
        convert_diffusers(path)
    assert message in str(e.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        convert_diffusers(str(tmp_path))
    path = _copy_fixture(tmp_path, "ddpm_unet")
    os.remove(os.path.join(path, ST_FILE))
    with pytest.raises(ConversionError, match="has none of"):
        convert_diffusers(path)
    with pytest.raises(ConversionError, match="not found"):
        read_weights(str(tmp_path / "nothing.pt"))
    truncated = tmp_path / "bad.safetensors"
    truncated.write_bytes(open(os.path.join(GOLDEN, "dit", "dit.safetensors"), "rb").read()[:50])
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        read_weights(str(truncated))


def test_legacy_torch_format_is_refused_with_the_resave_command():
    with pytest.raises(ConversionError) as e:
        read_weights(os.path.join(GOLDEN, "dit", "legacy.pt"))
    assert "legacy" in str(e.value) and "safetensors.torch" in str(e.value)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_run(tmp_path):
    """A torch-style archive whose data.pkl calls os.system is refused, and nothing runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"w": _Exploit(marker)}, protocol=2))
    with pytest.raises(ConversionError) as e:
        read_weights(str(path))
    assert "system" in str(e.value) and "no code is run" in str(e.value)
    assert not marker.exists()


def test_dit_errors_name_the_fix(tmp_path):
    tensors = read_weights(os.path.join(GOLDEN, "dit", "dit.pt"))
    with pytest.raises(ConversionError, match="pass --num_heads"):
        dit.from_state_dict(tensors, "tiny")
    moved = dict(tensors, pos_embed=tensors["pos_embed"][:, ::-1])  # tokens reordered
    with pytest.raises(ConversionError, match="pos_embed differs"):
        dit.from_state_dict(moved, "tiny", num_heads=4)
    no_qkv = {k: v for k, v in tensors.items() if k != "blocks.1.attn.qkv.bias"}
    with pytest.raises(ConversionError, match="missing weight 'blocks.1.attn.qkv.bias'"):
        dit.from_state_dict(no_qkv, "tiny", num_heads=4)
    with pytest.raises(ConversionError, match="x_embedder.proj.weight"):
        dit.from_state_dict({"w": tensors["pos_embed"]}, "tiny", num_heads=4)


def test_converted_workdirs_sample_and_decode(tmp_path):
    """The CLI chain: a UNet workdir samples without its dataset (cifar10, not prepared in
    the tests) on disk; a converted autoencoder decodes a converted DiT's samples (the SD
    VAE + DiT-XL/2 recipe, tiny); the checkpoint holds exactly the imported weights."""
    unet, ae, dit_dir = (str(tmp_path / n) for n in ("unet", "ae", "dit"))
    r = cli("diffusion_jax.convert", "--from=diffusers", f"--weights={GOLDEN}/ddpm_unet",
            f"--workdir={unet}", "--dataset=cifar10", "--data_dir=/nowhere")  # fmt: skip
    assert r.returncode == 0, r.stderr
    config = workdir.load_config(unet)  # cifar10 is not prepared on this machine
    assert (config.data.name, config.data.data_dir, config.data.image_size) == (
        "cifar10",
        "/nowhere",
        8,
    )
    assert not config.model.unet.time_cos_first and config.model.unet.time_freq_shift == 1.0
    _, _, state = workdir.load_state(unet)
    _, params = load_diffusers(os.path.join(GOLDEN, "ddpm_unet"))
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    r = cli("diffusion_jax.convert", "--from=diffusers", f"--weights={GOLDEN}/ddpm_unet",
            f"--workdir={unet}")  # fmt: skip
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr
    r = cli("diffusion_jax.sample", f"--workdir={unet}", "--num_samples=2",
            "--config.sampler.num_steps=3", f"--npz={tmp_path}/u.npz")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "u.npz")["images"].shape == (2, 8, 8, 3)

    r = cli("diffusion_jax.convert", "--from=dit", f"--weights={GOLDEN}/dit/dit.pt",
            f"--workdir={dit_dir}", "--num_heads=4")  # fmt: skip
    assert r.returncode == 2 and "needs --autoencoder" in r.stderr
    r = cli("diffusion_jax.convert", "--from=diffusers", f"--weights={GOLDEN}/autoencoder_kl",
            f"--workdir={ae}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("diffusion_jax.convert", "--from=dit", f"--weights={GOLDEN}/dit/dit.pt",
            f"--workdir={dit_dir}", f"--autoencoder={ae}", "--num_heads=4")  # fmt: skip
    assert r.returncode == 0, r.stderr
    config = workdir.load_config(dit_dir)
    assert config.objective.learn_sigma and config.sampler.variance == "learned"
    assert json.load(open(f"{dit_dir}/latent_space/latents.json"))["scale_factor"] == 0.18215
    r = cli("diffusion_jax.sample", f"--workdir={dit_dir}", "--num_samples=2", "--labels=3",
            "--config.sampler.name=ddim", "--config.sampler.num_steps=3",
            f"--npz={tmp_path}/d.npz")  # fmt: skip
    assert r.returncode == 0, r.stderr
    decoded = np.load(tmp_path / "d.npz")
    assert decoded["images"].shape == (2, 16, 16, 3)  # 8x8x4 latents, f = 2, RGB
    assert list(decoded["labels"]) == [3, 3]


def test_converted_model_configs_build():
    """Every config the converter writes is one our registry builds as is."""
    for name in ("ddpm_unet", "adm_unet", "autoencoder_kl"):
        model_cfg, model, _, _ = convert_diffusers(os.path.join(GOLDEN, name))
        assert build_model(model_cfg) == model
