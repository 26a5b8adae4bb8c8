"""Subject tuning (DreamBooth, Ruiz et al. 2023) of a caption-conditioned glyph model:
teach it a font face it never saw, one of Computer Modern's
(``glyph_render.HELD_OUT_FACES``), under a new word.

    python -m diffusion_jax.glyph_subject --base=WORKDIR --out=DIR [--face=cmr
        --identifier=zxq --num_instances=100 --num_prior=1000 --prior_weight=1
        --guidance_scale=2]

It prepares what subject.py prepares for a class-conditional base, with a word where that
has a label; the run itself is an ordinary adapter run (``full`` or ``lora``) of the
extended base DIR/base (configs/glyphs_dreambooth.py):

* **The identifier** is a new word appended to the base's vocabulary, so every old
  caption keeps its token ids. The text encoder's token table gets its row
  (``add_identifier_word``): the mean of the family words' rows, so the identifier starts
  as "one of the known families", as DreamBooth's "a [V] dog" starts as "a dog". No old
  caption holds the new id, so the extended base samples every old caption exactly as the
  base did (tested).
* **The instances** are glyphs drawn in the face with fresh attributes (training
  colour-character pairs), regular and upright (the Computer Modern files here have no
  bold or italic), captioned by the training templates with the identifier in the family
  slot: "a small regular upright red zxq letter A on the blue background".
* **The prior** is ``num_prior`` samples the base draws (classifier-free guidance
  ``guidance_scale``) under the captions of the first ``num_prior`` glyph training
  examples, captioned with them. Prior preservation (lambda = ``prior_weight``) is
  realised by repeats, as in subject.py.

The subject dataset (datasets/subject.py, with captions and the extended vocabulary) and
the extended base are written to DIR; the test split holds held-out instances.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import traverse_util

from diffusion_jax import adapters, cli, conditioning, data, subject, workdir as workdir_lib
from diffusion_jax.data_transforms import resize
from diffusion_jax.datasets import glyph_render as gr, glyphs, subject as subject_data
from diffusion_jax.tokenizer import SPECIAL_TOKENS, words

TOKEN_TABLE = ("token_embed", "embedding")  # the text encoder's table (models/text.py)
GLYPH_DATASETS = (glyphs.NAME, glyphs.TINY_NAME)


def add_identifier_word(params, vocab_size: int, init_ids) -> dict:
    """``params`` with a row appended to every token table ([V, D] -> [V + 1, D]): the
    mean of the rows ``init_ids``; everything else unchanged."""
    flat = traverse_util.flatten_dict(params)
    tables = [path for path in flat if path[-2:] == TOKEN_TABLE]
    if not tables:
        raise ValueError("the base has no token table (models/text.py TextEncoder)")
    for path in tables:
        table = flat[path]
        if table.shape[0] != vocab_size:
            raise ValueError(f"{'/'.join(path)} has {table.shape[0]} rows, not {vocab_size}")
        row = table[jnp.asarray(init_ids)].mean(axis=0, keepdims=True)
        flat[path] = jnp.concatenate([table, row.astype(table.dtype)])
    return traverse_util.unflatten_dict(flat)


def face_file(face: str) -> str:
    if face not in gr.HELD_OUT_FACES:
        raise workdir_lib.ConfigError(
            f"--face={face!r} is not a held-out face; choose one of {sorted(gr.HELD_OUT_FACES)}"
        )
    return os.path.join(gr.font_dir(), gr.HELD_OUT_FACES[face])


def instances(face: str, identifier: str, count: int, seed: int, image_size: int = gr.IMAGE_SIZE):
    """(uint8 images [count, S, S, 3], character labels [count], captions) of glyphs
    drawn in ``face`` and captioned with ``identifier`` as their family; resized to
    ``image_size`` as the input pipeline resizes the glyphs."""
    path, pairs = face_file(face), gr.heldout_pairs(glyphs.PAIRS_SEED)
    templates = [t for t in range(len(gr.TEMPLATES)) if t != gr.HELDOUT_TEMPLATE]
    images, labels, captions = [], [], []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        attrs = gr.sample_attributes(rng, False, pairs)
        attrs = gr.Attributes(**{**vars(attrs), "weight": 0, "slant": 0})  # regular upright
        image = gr.render(attrs, path)[0]
        images.append(image if image_size == gr.IMAGE_SIZE else resize(image, image_size))
        labels.append(attrs.char)
        captions.append(gr.caption(attrs, templates[i % len(templates)], family=identifier))
    return np.stack(images), np.asarray(labels, np.int32), np.asarray(captions)


def _check_base(base: str, identifier: str):
    workdir_lib.require_checkpoint(base)
    config = workdir_lib.load_config(base)
    if not int(conditioning.text_config(config.model).get("vocab_size", 0)):
        raise workdir_lib.ConfigError(
            f"--base={base} takes no captions (model.text.vocab_size is 0); a class-conditional "
            "base is tuned with python -m diffusion_jax.subject"
        )
    if config.data.name not in GLYPH_DATASETS or config.latent.get("autoencoder"):
        raise workdir_lib.ConfigError(
            f"--base={base} was trained on {config.data.name!r}"
            f"{' latents' if config.latent.get('autoencoder') else ''}; the subject renders "
            f"are glyph pixels, so the base must be a pixel model of {list(GLYPH_DATASETS)}"
        )
    vocabulary = conditioning.tokenizer(config).vocabulary
    if words(identifier) != [identifier] or identifier in vocabulary:
        raise workdir_lib.ConfigError(
            f"--identifier={identifier!r} must be one new word (letters and digits) that no "
            "caption has"
        )
    return config, vocabulary


def prepare(
    base: str,
    out: str,
    *,
    face: str = "cmr",
    identifier: str = "zxq",
    num_instances: int = 100,
    num_prior: int = 1000,
    prior_weight: float = 1.0,
    guidance_scale: float = 2.0,
    num_test: int = 500,
    seed: int = 0,
) -> dict:
    """Write the subject dataset and the extended base into ``out``; returns the
    dataset's metadata."""
    config, vocabulary = _check_base(base, identifier)
    face_file(face)
    subject.check_counts(num_instances, num_prior, prior_weight, num_test, out)
    workdir_lib.ensure_writable_dir(out, "--out")
    sampler = subject.Sampler(base)
    params = jax.device_get(sampler.state.ema_params)
    size = int(config.data.image_size)
    inst, inst_labels, inst_captions = instances(face, identifier, num_instances, seed, size)
    test, test_labels, test_captions = instances(face, identifier, num_test, seed + 1, size)
    r_inst, r_prior = subject.repeats(num_instances, num_prior, prior_weight)
    tokenizer = conditioning.tokenizer(config)
    prior = None
    if r_prior:
        captions, labels = data.load_split_captions(config.data, "train", num_prior)
        images = sampler.draw(
            tokenizer.encode_batch(captions), guidance_scale=guidance_scale, seed=seed
        )
        prior = {"image": images, "label": labels, "caption": np.asarray(captions)}
    train = subject.mix(
        {"image": inst, "label": inst_labels, "caption": inst_captions}, r_inst, prior, r_prior
    )
    test = {
        "image": test,
        "label": test_labels,
        "source": np.zeros(num_test, np.int32),
        "caption": test_captions,
    }
    metadata = {
        "base": {
            "workdir": os.path.abspath(base),
            "step": int(sampler.state.step),
            "fingerprint": adapters.fingerprint(params),
            "data_dir": str(config.data.data_dir),
        },
        "identifier": identifier,
        "vocabulary": [*vocabulary, identifier],
        "caption_source": str(config.data.name),
        "num_classes": len(gr.CHARS),
        "image_shape": list(inst.shape[1:]),
        "instances": {"face": face, "count": num_instances, "seed": seed, "test_seed": seed + 1},
        "prior": {"count": num_prior if r_prior else 0, "guidance_scale": guidance_scale},
        "prior_weight": prior_weight,
        "repeats": {"instance": r_inst, "prior": r_prior},
        "realised_prior_weight": r_prior * (num_prior if r_prior else 0) / (r_inst * num_instances),
    }
    subject_data.write(out, metadata, {"train": train, "test": test})
    families = [len(SPECIAL_TOKENS) + vocabulary.index(f) for f in gr.ATTRIBUTES["family"]]
    extended = config.copy_and_resolve_references()
    extended.model.text.vocab_size = tokenizer.vocab_size + 1
    params = add_identifier_word(params, tokenizer.vocab_size, families)
    subject.write_base(base, extended, params, out, inst.shape[1:], len(gr.CHARS))
    return subject_data.read_metadata(out)


FLAGS = flags.FlagValues()
subject.define_flags(FLAGS, "The caption-conditioned glyph base workdir.")
OWN = dict(flag_values=FLAGS)
flags.DEFINE_string("face", "cmr", f"The subject: one of {sorted(gr.HELD_OUT_FACES)}.", **OWN)
flags.DEFINE_string("identifier", "zxq", "The new word that names the face.", **OWN)


def main(overrides: dict) -> dict:
    return subject.run_cli(
        "glyph_subject", FLAGS, prepare, overrides, face=FLAGS.face, identifier=FLAGS.identifier
    )


if __name__ == "__main__":
    cli.run(main, FLAGS, __doc__)
