"""Latent diffusion end to end on the digits: train a tiny autoencoder, encode the dataset
(chunked, resumable), train a denoiser on the latents, sample and edit decoded images,
resume; and the one-line refusals of mismatched pieces."""

import json
import os

import jax
import numpy as np
import pytest

from diffusion_jax import autoencoding, data, encode, latent_space, train, workdir
from diffusion_jax.datasets import latents
from diffusion_jax.models.autoencoder import AUTOENCODER_PRESETS

from helpers import cli, load_state, tiny_config


def config_with(c, overrides):
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = c
        for part in path:
            node = node[part]
        node[name] = value
    return c


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory, digits_dir):
    """A tiny autoencoder trained 8 steps on the digits (8x8x1 -> 4x4x3 latents)."""
    c = tiny_config(**{"model.name": "autoencoder", "data.data_dir": str(digits_dir)})
    c.model.autoencoder.update(AUTOENCODER_PRESETS["tiny"], image_channels=1)
    wd = str(tmp_path_factory.mktemp("ae") / "wd")
    train.train_and_evaluate(c, wd)
    return wd


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, autoencoder):
    out = str(tmp_path_factory.mktemp("latents") / "digits")
    metadata = encode.run(autoencoder, out, chunk_size=500, batch_size=128)
    return out, metadata


def latent_config(autoencoder, encoded_dir, **overrides):
    c = tiny_config(
        **{
            "data.name": "latents",
            "data.data_dir": encoded_dir,
            "data.image_size": 4,
            "latent.autoencoder": autoencoder,
            "model.num_classes": 10,
            "sampler.clip_x0": False,
        }
    )
    return config_with(c, overrides)


def test_encoding_writes_latents_of_the_autoencoder_with_measured_scale(autoencoder, encoded):
    out, metadata = encoded
    assert metadata["latent_shape"] == [4, 4, 3]
    assert metadata["splits"] == {"train": 1498, "test": 299} and metadata["num_classes"] == 10
    assert not latents.chunk_files(out, "train")  # chunks removed once built
    # the latents are the autoencoder's posterior means of the source images, in order
    config = workdir.load_config(autoencoder)
    model, _, state = workdir.load_state(autoencoder, config)
    images, labels = data.load_split_arrays(config.data, "test")
    want = np.asarray(autoencoding.encode(model, state.ema_params, images[:20])[0])
    source = latents.builder(out).as_data_source("test")
    got = np.stack([source[i]["latent"] for i in range(20)])
    # one compiled batch vs another batch size: float32 conv reduction order only
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [int(source[i]["label"]) for i in range(20)] == list(labels[:20])
    # scale_factor brings the train latents to unit std (measured, float64 sums)
    z = np.stack([r["latent"] for r in latents.builder(out).as_data_source("train")])
    np.testing.assert_allclose(metadata["std"], z.std(), rtol=1e-4)
    np.testing.assert_allclose(metadata["scale_factor"], 1 / z.std(), rtol=1e-4)
    np.testing.assert_allclose(metadata["channel_mean"], z.mean((0, 1, 2)), atol=1e-4)


def test_interrupted_encoding_resumes_to_the_same_dataset(autoencoder, encoded, tmp_path):
    out = str(tmp_path / "lat")
    calls = []

    def fail_after_two(*args):
        calls.append(args)
        if len(calls) > 2:
            raise KeyboardInterrupt  # killed while encoding chunk 3
        return original(*args)

    original = data.load_split_rows
    data.load_split_rows = fail_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            encode.run(autoencoder, out, chunk_size=500, batch_size=128)
    finally:
        data.load_split_rows = original
    assert len(latents.chunk_files(out, "train")) == 2
    metadata = encode.run(autoencoder, out, chunk_size=500, batch_size=128)
    assert metadata["scale_factor"] == pytest.approx(encoded[1]["scale_factor"], rel=1e-6)
    a = latents.builder(out).as_data_source("train")
    b = latents.builder(encoded[0]).as_data_source("train")
    for i in (0, 700, 1497):
        np.testing.assert_array_equal(a[i]["latent"], b[i]["latent"])


def test_latent_training_samples_decoded_images_and_resumes(autoencoder, encoded, tmp_path):
    out, _ = encoded
    overrides = {"eval.every_steps": 4, "eval.metrics_every_steps": 4}
    overrides["eval.metrics_num_samples"] = 20
    wd = str(tmp_path / "ldm")
    train.train_and_evaluate(latent_config(autoencoder, out, **overrides), wd)
    with open(os.path.join(wd, "eval.jsonl")) as f:
        record = json.loads(f.readlines()[-1])
    # scored against the digits' own feature net and reference statistics
    assert record["feature_net"] == "digits_classifier" and record["num_reference"] == 1498
    assert np.isfinite(record["fid"]) and 0 <= record["class_accuracy"] <= 1
    from PIL import Image

    grid = np.asarray(Image.open(os.path.join(wd, "samples", "step_0000008.png")))
    # 8 decoded 8x8 images, upscaled 4x into a 3x3 grid: 3 * (32 + 1) + 1 pixels
    assert grid.shape[:2] == (100, 100)
    # resume from step 8 to 12 on the latents
    train.train_and_evaluate(latent_config(autoencoder, out, **{"train.num_steps": 12}), wd)
    assert int(load_state(wd, 12).step) == 12

    npz = str(tmp_path / "s.npz")
    r = cli("diffusion_jax.sample", f"--workdir={wd}", "--num_samples=4", f"--npz={npz}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.load(npz)["images"].shape == (4, 8, 8, 1)  # decoded, not latents
    # inpainting keeps the known half: its mask is pooled to the latent grid
    img = tmp_path / "in.npz"
    x = np.zeros((2, 8, 8, 1), np.uint8)
    np.savez(img, images=x, labels=np.array([3, 4]))
    r = cli(
        "diffusion_jax.sample",
        f"--workdir={wd}",
        "--mode=inpaint",
        f"--input={img}",
        "--mask=left",
        f"--npz={npz}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.load(npz)["images"].shape == (2, 8, 8, 1)


def test_downsampled_mask_is_known_only_where_every_pixel_is():
    mask = np.ones((8, 8, 1), np.float32)
    mask[3, 5] = 0  # one unknown pixel makes its whole 2x2 latent cell unknown
    got = np.asarray(latent_space.downsample_mask(mask, 2))
    want = np.ones((4, 4, 1), np.float32)
    want[1, 2] = 0
    np.testing.assert_array_equal(got, want)
    batched = np.asarray(latent_space.downsample_mask(np.stack([mask, 1 - mask]), 2))
    assert batched.shape == (2, 4, 4, 1) and batched[1].sum() == 0


def test_mismatched_latent_configs_are_refused_in_one_line(autoencoder, encoded, tmp_path):
    out, _ = encoded
    spec = data.dataset_spec(latent_config(autoencoder, out).data)
    assert spec.image_shape == (4, 4, 3) and spec.num_classes == 10
    bad = {
        "needs latent.autoencoder": {"latent.autoencoder": ""},
        "did not encode": {"latent.autoencoder": str(tmp_path)},
        "needs a latent dataset": {"data.name": "digits", "data.image_size": 8},
        "data.image_size": {"data.image_size": 8},
        "no latent dataset": {"data.data_dir": str(tmp_path)},
    }
    for message, overrides in bad.items():
        config = latent_config(autoencoder, out, **overrides)
        with pytest.raises((workdir.ConfigError, FileNotFoundError), match=message):
            train.train_and_evaluate(config, str(tmp_path / "wd"))
    r = cli("diffusion_jax.encode", f"--autoencoder={tmp_path}", f"--out={tmp_path / 'x'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert jax.device_count() == 8  # the suite's fake devices: encode shards over them
