"""Text models on latents: encoding a captioned dataset carries its captions into the
latent dataset (same rows, same text), the tokenizer finds the source's vocabulary, and a
tiny cross-attention DiT trains on the latents and samples decoded images under prompts."""

import jax
import ml_collections
import numpy as np
import pytest

from diffusion_jax import conditioning, data, encode, latent_space, schedules, steps, train, workdir
from diffusion_jax.datasets import glyph_render, latents
from diffusion_jax.models.autoencoder import AUTOENCODER_PRESETS
from diffusion_jax.tokenizer import SPECIAL_TOKENS

from helpers import tiny_config

VOCAB_SIZE = len(glyph_render.VOCABULARY) + len(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def glyph_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("glyph_data"))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, glyph_dir):
    """A tiny autoencoder, 4 steps on glyphs_tiny at 8x8 (-> 4x4x3 latents), encoded."""
    c = tiny_config(
        **{
            "model.name": "autoencoder",
            "data.name": "glyphs_tiny",
            "data.data_dir": glyph_dir,
            "train.num_steps": 4,
        }
    )
    c.model.autoencoder.update(AUTOENCODER_PRESETS["tiny"])
    ae = str(tmp_path_factory.mktemp("ae") / "wd")
    train.train_and_evaluate(c, ae)
    out = str(tmp_path_factory.mktemp("latents") / "glyphs")
    encode.run(ae, out, chunk_size=200, batch_size=64)
    return ae, out


def test_latent_dataset_carries_the_captions(encoded, glyph_dir):
    _, out = encoded
    assert latents.read_metadata(out)["captions"] is True
    source_cfg = {"name": "glyphs_tiny", "data_dir": glyph_dir, "image_size": 8}
    want, want_labels = data.load_split_captions(source_cfg, "test", 128)
    latent_cfg = {"name": "latents", "data_dir": out, "image_size": 4}
    got, got_labels = data.load_split_captions(latent_cfg, "test", 128)
    assert got == want and len(set(got)) > 100  # same rows, in order, real captions
    np.testing.assert_array_equal(got_labels, want_labels)
    vocab = conditioning.vocabulary(ml_collections.ConfigDict(latent_cfg))
    assert vocab == glyph_render.VOCABULARY


def test_text_dit_trains_on_latents_and_samples_under_prompts(encoded, tmp_path):
    ae, out = encoded
    c = tiny_config(
        **{
            "data.name": "latents",
            "data.data_dir": out,
            "data.image_size": 4,
            "latent.autoencoder": ae,
            "model.name": "dit",
            "sampler.clip_x0": False,
            "sampler.guidance_scale": 3.0,
        }
    )
    c.model.dit.update(patch_size=2, hidden_size=32, depth=2, num_heads=2)
    c.model.text.update(vocab_size=VOCAB_SIZE, width=16, depth=1, num_heads=2)
    wd = str(tmp_path / "wd")
    train.train_and_evaluate(c, wd)
    config = workdir.load_config(wd)
    model, spec, state = workdir.load_state(wd, config)
    tokens = conditioning.tokenizer(config).encode_batch(["large red A", "small blue 7"] * 2)
    sample_fn = steps.make_sample_fn(
        model, schedules.build(config.schedule), config, (4, *spec.image_shape)
    )
    space = latent_space.load(config)
    fn = jax.jit(latent_space.wrap_sample_fn(sample_fn, space))
    params = (state.ema_params, space.params)
    images = np.asarray(fn(params, jax.random.key(0), tokens, 3.0))
    assert images.shape == (4, 8, 8, 3) and np.isfinite(images).all()
    # the same noise under the other prompt: the caption reaches the model
    swapped = np.asarray(fn(params, jax.random.key(0), tokens[[1, 0, 3, 2]], 3.0))
    assert np.abs(images[0] - swapped[0]).max() > 1e-4
