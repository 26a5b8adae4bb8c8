"""Glyphs: captioned 32x32 RGB images of one character, an offline text-to-image dataset.

Each image is a character drawn from matplotlib's bundled fonts with attributes and a
caption from :mod:`diffusion_jax.datasets.glyph_render` (how it is drawn, the attributes,
the caption templates). Written once, on first use, as the TFDS dataset ``glyphs``
(array_record) under the data dir, in two configs of the same generator:
  * ``full`` (``data.name="glyphs"``): 20,000 train / 2,000 test;
  * ``tiny`` (``data.name="glyphs_tiny"``): 512 train / 128 test, for tests.
Example ``i`` of a split is drawn with ``np.random.default_rng([SEED, split_id, i])``, so
it does not depend on generation order and the tiny splits are prefixes of the full ones.
Building the full dataset takes ~13 s on a 2-core CPU (14 MB on disk).

What is held out, for measuring generalisation:
  * train: only the (fg, char) pairs outside ``glyph_render.heldout_pairs()`` (10% of the
    8 x 36), and only templates other than ``HELDOUT_TEMPLATE``, drawn uniformly;
  * test: even ``i`` draws a held-out (fg, char) pair (``heldout`` = 1), odd ``i`` a seen
    one; the template is drawn uniformly from all templates.

Features: "image" uint8 [32, 32, 3]; "label" the character (ClassLabel, 36 classes, so
class-conditional code works unchanged); one ClassLabel per captioned attribute; "dx",
"dy", "template", "heldout", "index" int32; "caption" Text (read back as UTF-8 bytes
through ``as_data_source``, no TensorFlow; ``caption_text`` decodes it). The stored image
is exactly ``glyph_render.render(attributes(record))[0]``.

The builder class must live in a package module: TFDS mis-handles builder classes defined
in ``__main__`` or a script.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffusion_jax.datasets import glyph_render as gr, prepare

NAME = "glyphs"  # the `data.name` of the full dataset
TINY_NAME = "glyphs_tiny"  # the `data.name` of the tiny one (tests)
IMAGE_SIZE = gr.IMAGE_SIZE
NUM_CLASSES = len(gr.CHARS)  # "label" is the character
SEED = 0  # example i of split s: np.random.default_rng([SEED, SPLIT_IDS[s], i])
PAIRS_SEED = 0  # glyph_render.heldout_pairs(PAIRS_SEED)
SPLIT_IDS = {"train": 0, "test": 1}


@dataclasses.dataclass(eq=False)
class GlyphsConfig(tfds.core.BuilderConfig):
    """A config: how many examples each split has."""

    num_train: int = 0
    num_test: int = 0


CONFIGS = {
    NAME: GlyphsConfig(
        name="full", description="20,000 train / 2,000 test.", num_train=20_000, num_test=2_000
    ),
    TINY_NAME: GlyphsConfig(
        name="tiny", description="512 train / 128 test (for tests).", num_train=512, num_test=128
    ),
}


class Glyphs(tfds.core.GeneratorBasedBuilder):
    """Captioned glyph images (see the module doc); configs "full" and "tiny"."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Glyphs: matplotlib's DejaVu and STIX fonts, 8 colours."}
    BUILDER_CONFIGS = list(CONFIGS.values())

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # As digits.SklearnDigits: TFDS's default probes `importlib_resources`.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        int32 = lambda: tfds.features.Scalar(dtype=np.int32)
        attributes = {
            name: tfds.features.ClassLabel(names=classes) for name, classes in gr.ATTRIBUTES.items()
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description="One character from matplotlib's DejaVu / STIX fonts, 32x32 RGB, "
            "with its attributes and a caption; held-out (fg, char) pairs and caption "
            "template only in 'test'.",
            features=tfds.features.FeaturesDict(
                {
                    # Tensor, not Image: encoding Image features needs TensorFlow.
                    "image": tfds.features.Tensor(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=gr.CHARS),
                    **attributes,
                    "dx": int32(),
                    "dy": int32(),
                    "template": int32(),  # index into glyph_render.TEMPLATES
                    "heldout": int32(),  # 1: (fg, char) is a held-out pair
                    "index": int32(),  # i in default_rng([SEED, split_id, i])
                    "caption": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep index order within each split
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        sizes = {"train": self.builder_config.num_train, "test": self.builder_config.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split, num_examples):
        for i in range(num_examples):
            yield i, example(split, i)


def example(split: str, i: int, pairs: frozenset[tuple[int, int]] | None = None) -> dict:
    """Example `i` of `split` as stored (a function of (SEED, split, i) alone)."""
    pairs = gr.heldout_pairs(PAIRS_SEED) if pairs is None else pairs
    rng = np.random.default_rng([SEED, SPLIT_IDS[split], i])
    if split == "train":
        heldout = False
        templates = [t for t in range(len(gr.TEMPLATES)) if t != gr.HELDOUT_TEMPLATE]
    else:
        heldout = i % 2 == 0
        templates = list(range(len(gr.TEMPLATES)))
    attrs = gr.sample_attributes(rng, heldout, pairs)
    template = templates[int(rng.integers(len(templates)))]
    image, _ = gr.render(attrs)
    fields = dataclasses.asdict(attrs)
    return {
        "image": image,
        "label": attrs.char,
        **fields,
        "template": template,
        "heldout": int(heldout),
        "index": i,
        "caption": gr.caption(attrs, template),
    }


def attributes(record: Mapping[str, Any]) -> gr.Attributes:
    """The ``glyph_render.Attributes`` stored in a record (they re-render its image)."""
    return gr.Attributes.from_mapping(record)


def _prepared(config: GlyphsConfig, data_dir: str) -> Glyphs:
    return prepare.prepare_once(
        lambda: Glyphs(config=config, data_dir=data_dir, file_format="array_record"), data_dir
    )


def builder(data_dir: str) -> Glyphs:
    """The prepared full glyphs builder, building it first if needed (safe when processes
    race: ``prepare.prepare_once``)."""
    return _prepared(CONFIGS[NAME], data_dir)


def tiny_builder(data_dir: str) -> Glyphs:
    """The prepared tiny glyphs builder (config "tiny"), built first if needed."""
    return _prepared(CONFIGS[TINY_NAME], data_dir)
