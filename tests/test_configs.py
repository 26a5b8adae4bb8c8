"""Every shipped config file is valid: its keys exist in configs/base.py, its values pass
the config checks for its dataset's image shape and the 8 test devices, and its model
builds (shapes only, so DiT-XL/2 costs no memory)."""

import glob
import importlib
import os

import jax
import pytest

from diffusion_jax import adapters, conditioning, consistency, data, latent_space, workdir
from diffusion_jax.datasets import glyph_render
from diffusion_jax.models import abstract_params, build_model

from helpers import REPO

CONFIGS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not p.endswith("__init__.py")
)
# Channels of each dataset the configs name (the specs of tfds datasets need their data).
CHANNELS = {"digits": 1, "fashion_mnist": 1, "cifar10": 3, "glyphs": 3}
CHANNELS["latents"] = 4  # fashion_ldm.py, imagenet256_dit_xl2.py: 4-channel latents
CHANNELS["subject"] = 1  # digits_dreambooth.py: typeset digits next to the base's samples
TEXT_CHANNELS = {"subject": 3}  # glyphs_dreambooth.py: glyphs in a new face


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid_and_its_model_builds(name, monkeypatch):
    config = importlib.import_module(f"configs.{name}").get_config()
    # A latent config names an encoded dataset that only exists after its autoencoder was
    # trained; the pairing is checked in test_latent_diffusion.py, everything else here.
    monkeypatch.setattr(latent_space, "metadata_of", lambda c: None)
    # Likewise a distillation config names a teacher workdir trained first
    # (test_consistency.py checks the pairing).
    monkeypatch.setattr(consistency, "check_teacher", lambda c: None)
    # and an adapter config its base (test_lora.py checks the pairing)
    monkeypatch.setattr(adapters, "check_same_model", lambda c, other, flag: None)
    # and a latent text config reads its vocabulary from the encoded dataset's source
    if config.data.name == "latents" and config.model.text.vocab_size:
        monkeypatch.setattr(conditioning, "vocabulary", lambda d: glyph_render.VOCABULARY)
    # and a glyph subject config its subject dataset's vocabulary (the identifier added)
    if config.data.name == "subject" and config.model.text.vocab_size:
        words = (*glyph_render.VOCABULARY, "zxq")
        monkeypatch.setattr(conditioning, "vocabulary", lambda d: words)
    size = config.data.image_size
    classes = max(config.model.num_classes, 10)
    text = bool(config.model.text.vocab_size)
    channels = (TEXT_CHANNELS if text else {}).get(config.data.name, CHANNELS[config.data.name])
    shape = (size, size, channels)
    spec = data.DatasetSpec(config.data.name, shape, classes, 1000)
    workdir.check_config(config, spec)  # raises ConfigError naming the problem
    shapes = abstract_params(build_model(config.model), spec.image_shape)
    assert jax.tree.leaves(shapes), name
