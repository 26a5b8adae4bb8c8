"""Datasets as TFDS builders, one builder per module, looked up by ``data.name``.

Bundled / locally built datasets (registered in ``BUILDERS``, written once on first use):
  * ``digits`` (:mod:`diffusion_jax.datasets.digits`): scikit-learn's 8x8 handwritten
    digits, works offline.
  * ``fashion_mnist`` (:mod:`diffusion_jax.datasets.fashion_mnist`): Fashion-MNIST, 28x28,
    built from local IDX files (``apt-get install dataset-fashion-mnist``, or
    ``$DIFFUSION_JAX_FASHION_MNIST_DIR``); without them, a copy already prepared in the
    data dir (including TFDS's own ``fashion_mnist``).
  * ``latents`` (:mod:`diffusion_jax.datasets.latents`): a dataset encoded by an
    autoencoder (``python -m diffusion_jax.encode``) in ``data.data_dir``; never built
    here, only read.
  * ``glyphs`` / ``glyphs_tiny`` (:mod:`diffusion_jax.datasets.glyphs`): captioned 32x32
    RGB characters drawn from matplotlib's fonts, 20,000 / 512 train; works offline.
  * ``subject`` (:mod:`diffusion_jax.datasets.subject`): a subject-tuning (DreamBooth)
    run's instances and prior images (``python -m diffusion_jax.subject``) in
    ``data.data_dir``; never built here, only read.

Any other name is a TFDS dataset that must already be prepared (array_record) in the data
dir: ``tfds.builder(name, data_dir=...)``. Nothing is downloaded at run time.
``open_split`` opens a split as a random-access source (``builder.as_data_source``) and
says how to prepare a dataset that is missing.

A new bundled dataset is a module with its builder class (in a package module: TFDS
mis-handles builder classes defined in ``__main__`` or a script; override ``code_path``
like ``digits.SklearnDigits`` does, because TFDS's default probes ``importlib_resources``)
and a ``(data_dir) -> prepared builder`` function (``prepare.prepare_once`` builds it
once, under a file lock), added to ``BUILDERS``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow_datasets as tfds

from diffusion_jax.datasets import digits, fashion_mnist, glyph_render, glyphs, latents, subject

# dataset name -> (data_dir -> prepared TFDS builder), building it on first use.
BUILDERS: dict[str, Callable[[str], tfds.core.DatasetBuilder]] = {
    digits.NAME: digits.builder,
    fashion_mnist.NAME: fashion_mnist.builder,
    latents.NAME: latents.builder,
    glyphs.NAME: glyphs.builder,
    glyphs.TINY_NAME: glyphs.tiny_builder,
    subject.NAME: subject.builder,
}


# Captioned datasets: name -> the words their captions are made of (tokenizer.py builds
# on them), and name -> caption -> {attribute: class index} (classifier guidance's targets).
VOCABULARIES: dict[str, tuple[str, ...]] = {
    glyphs.NAME: glyph_render.VOCABULARY,
    glyphs.TINY_NAME: glyph_render.VOCABULARY,
}
CAPTION_PARSERS: dict[str, Callable[[str], dict[str, int]]] = {
    glyphs.NAME: glyph_render.parse_caption,
    glyphs.TINY_NAME: glyph_render.parse_caption,
}


def caption_source(name: str, data_dir: str = "") -> str:
    """The captioned dataset whose captions ``name`` holds: itself, or for a latent or
    subject dataset in ``data_dir`` its source; ValueError naming the fix for uncaptioned
    ones."""
    if name == subject.NAME:
        metadata = subject.read_metadata(data_dir)
        if not subject.has_captions(metadata):
            raise ValueError(
                f"the subject dataset in {data_dir!r} names its identifier as a class label, "
                "not a word: it has no captions (make it from a text model's workdir with "
                "python -m diffusion_jax.glyph_subject)"
            )
        return metadata["caption_source"]
    if name == latents.NAME:
        metadata = latents.read_metadata(data_dir)
        if not metadata.get("captions"):
            raise ValueError(
                f"the latent dataset in {data_dir!r} has no captions ({metadata['source']['name']!r}"
                " has none, or it was encoded before captions were carried); text models and "
                "caption guides cannot train on it"
            )
        name = metadata["source"]["name"]
    if name not in VOCABULARIES:
        raise ValueError(
            f"dataset {name!r} has no captions, so a text model cannot train on it; "
            f"captioned datasets: {sorted(VOCABULARIES)}"
        )
    return name


def vocabulary(name: str, data_dir: str = "") -> tuple[str, ...]:
    """The caption vocabulary of dataset ``name`` (``caption_source``'s; a subject
    dataset's own: its source's words and the identifier)."""
    source = caption_source(name, data_dir)
    if name == subject.NAME:
        return tuple(subject.read_metadata(data_dir)["vocabulary"])
    return VOCABULARIES[source]


def caption_parser(name: str, data_dir: str = "") -> Callable[[str], dict[str, int]]:
    """caption -> {attribute: class index} for dataset ``name`` (``caption_source``)."""
    return CAPTION_PARSERS[caption_source(name, data_dir)]


def _how_to_prepare(name: str) -> str:
    """Instructions for preparing TFDS dataset `name` so that it can be read offline."""
    return (
        "Prepare it once, in array_record format, on a machine with internet access:\n"
        f"    tfds build {name} --data_dir=DIR --file_format=array_record\n"
        "(some builders need `pip install tensorflow` for generation only; training never "
        "imports it), copy DIR here if needed, then pass --config.data.data_dir=DIR. "
        "Or use --config.data.name=digits, which works offline."
    )


def _not_prepared_message(name: str, data_dir: str) -> str:
    return (
        f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}, and nothing is "
        "downloaded at run time. " + _how_to_prepare(name)
    )


def builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The TFDS builder of dataset `name` in `data_dir` (bundled ones are built if needed).

    For a name outside ``BUILDERS`` this does not check that the dataset is prepared;
    ``open_split`` does. ``data_dir`` may start with "~" (``data.DEFAULT_DATA_DIR`` does).
    """
    data_dir = os.path.expanduser(data_dir)
    if name in BUILDERS:
        return BUILDERS[name](data_dir)
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        bundled = ", ".join(repr(known) for known in BUILDERS)
        raise ValueError(
            f"Unknown dataset {name!r}: it is neither {bundled}, a registered TFDS dataset, "
            f"nor a prepared dataset under data_dir={data_dir!r}. " + _how_to_prepare(name)
        ) from None


def open_split(
    name: str, data_dir: str, split: str
) -> tuple[tfds.core.DatasetBuilder, Sequence[Any]]:
    """(builder, random-access source of `split`): ``builder.as_data_source``, no TensorFlow.

    A dataset that is not prepared, or not stored in a random-access format, raises an error
    that says how to prepare it.
    """
    dataset = builder(name, data_dir)
    try:
        return dataset, dataset.as_data_source(split=split)
    except Exception as e:  # translate the common failures into instructions
        if not dataset.is_prepared():
            raise FileNotFoundError(_not_prepared_message(name, data_dir)) from None
        formats = tfds.core.file_adapters.FileFormat.with_random_access()
        if dataset.info.file_format not in formats:
            raise ValueError(
                f"{name!r} in {data_dir!r} is stored as {dataset.info.file_format.value}, "
                "which has no random access. " + _how_to_prepare(name)
            ) from e
        raise
