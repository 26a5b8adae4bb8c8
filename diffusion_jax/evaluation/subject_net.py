"""The subject detector: a two-class ``small_classifier.SmallConvNet`` that tells the
base's real training images (class 0) from renders of a subject (class 1), e.g.
handwritten digits from digits typeset in Computer Modern (datasets/font_digits.py), or
glyphs in the training faces from glyphs in a held-out face (``face_detector``).

It judges subject tuning (evaluate_subject.py): the share of samples it calls "subject".
It trains on the digits train split against as many renders (seed ``RENDER_SEED``, never
one a subject dataset's instances use by default) and reports its accuracy on each held-out
side: the digits test split, and renders of seed ``RENDER_SEED + 1``. Training takes a few
seconds, so it is cached in memory only (per font and data dir, for the process).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from diffusion_jax.datasets import digits, font_digits
from diffusion_jax.evaluation import glyph_net, small_classifier
from diffusion_jax.metrics import from_uint8

RENDER_SEED = 10_000
RECIPE = dict(
    widths=(32, 64),
    feature_dim=32,
    epochs=20,
    batch_size=64,
    learning_rate=2e-3,
    weight_decay=1e-4,
    max_shift=1,
    seed=0,
)


@dataclasses.dataclass(frozen=True)
class SubjectDetector:
    net: small_classifier.SmallConvNet
    params: Any
    info: Mapping[str, Any]

    def is_subject(self, images: np.ndarray) -> np.ndarray:
        """bool [N]: which images [N, H, W, C] in [-1, 1] the detector calls the subject."""
        _, logits = _jitted_apply(self.net)({"params": self.params}, images)
        return np.asarray(logits).argmax(-1) == 1


@functools.lru_cache(maxsize=8)
def _jitted_apply(net: nn.Module):
    """One compiled ``net.apply`` per (hashable) net, so repeated calls reuse it."""
    return jax.jit(net.apply)


@functools.lru_cache(maxsize=4)
def subject_detector(font: str, data_dir: str = "") -> SubjectDetector:
    """The detector of digits typeset in ``font`` (trained with ``RECIPE``); ``info``
    holds its held-out accuracy on real digits and on renders."""
    recipe = RECIPE
    from diffusion_jax import data  # deferred: the data pipeline imports TFDS

    cfg = {"name": digits.NAME, "data_dir": data_dir, "image_size": digits.IMAGE_SIZE}
    real, _ = data.load_split_arrays(cfg, "train")
    real_test, _ = data.load_split_arrays(cfg, "test")
    renders = from_uint8(font_digits.render(len(real), RENDER_SEED, font)[0])
    renders_test = from_uint8(font_digits.render(len(real_test), RENDER_SEED + 1, font)[0])
    net = small_classifier.SmallConvNet(tuple(recipe["widths"]), recipe["feature_dim"], 2)
    return fit_detector(net, (real, renders), (real_test, renders_test), recipe, {"font": font})


def fit_detector(net, train, test, recipe, info) -> SubjectDetector:
    """``net`` trained on ``train`` = (real (class 0), subject (class 1)) images in
    [-1, 1]; ``info`` gains its accuracy on each side of ``test``, the same held out."""
    (real, subject), (real_test, subject_test) = train, test
    x = np.concatenate([real, subject])
    y = np.concatenate([np.zeros(len(real)), np.ones(len(subject))]).astype(np.int32)
    detector = SubjectDetector(net, small_classifier.train(net, x, y, recipe), {})
    info = {
        **info,
        "accuracy_real": float(1 - detector.is_subject(real_test).mean()),
        "accuracy_subject": float(detector.is_subject(subject_test).mean()),
        "num_test": [len(real_test), len(subject_test)],
    }
    return dataclasses.replace(detector, info=info)


class FaceNet(nn.Module):
    """The glyph judge's trunk (glyph_net.GlyphNet: colour-free shape channels, max
    pooling that keeps thin strokes) with one two-way head: (features, logits)."""

    widths: tuple = (32, 64)
    feature_dim: int = 64

    @nn.compact
    def __call__(self, x):
        feats, logits = glyph_net.GlyphNet(self.widths, self.feature_dim, (("face", 2),))(x)
        return feats, logits["face"]


# Glyphs: the renders carry their jitter, so no shifts (small_classifier's shift pads
# with -1, not the background colour).
GLYPH_RECIPE = dict(
    widths=(32, 64),
    feature_dim=64,
    epochs=4,
    batch_size=32,
    learning_rate=2e-3,
    weight_decay=1e-4,
    max_shift=0,
    seed=0,
)


def glyph_pairs(face: str, count: int, seed: int, image_size: int):
    """(training-face glyphs, ``face`` glyphs), uint8 [count, S, S, 3] each: example i of
    both has the attributes ``glyph_subject.instances`` draws for it (char, colours, size,
    jitter); the first in its own family, weight and slant, the second in ``face``, regular
    upright. A detector of the pair must read the strokes."""
    from diffusion_jax import glyph_subject
    from diffusion_jax.data_transforms import resize
    from diffusion_jax.datasets import glyph_render as gr, glyphs

    pairs = gr.heldout_pairs(glyphs.PAIRS_SEED)
    others = []
    for i in range(count):
        image = gr.render(gr.sample_attributes(np.random.default_rng([seed, i]), False, pairs))[0]
        others.append(image if image_size == gr.IMAGE_SIZE else resize(image, image_size))
    faces = glyph_subject.instances(face, "x", count, seed, image_size)[0]
    return np.stack(others), faces


@functools.lru_cache(maxsize=4)
def face_detector(face: str, image_size: int = 32, count: int = 4000) -> SubjectDetector:
    """The detector of glyphs drawn in the held-out ``face`` against glyphs of the
    training distribution (``glyph_pairs``: ``count`` of each from ``RENDER_SEED``, a
    quarter as many held out from ``RENDER_SEED + 1``), trained with ``GLYPH_RECIPE``."""
    train = glyph_pairs(face, count, RENDER_SEED, image_size)
    test = glyph_pairs(face, max(count // 4, 1), RENDER_SEED + 1, image_size)
    train, test = (tuple(map(from_uint8, p)) for p in (train, test))
    net = FaceNet(tuple(GLYPH_RECIPE["widths"]), GLYPH_RECIPE["feature_dim"])
    info = {"face": face, "image_size": image_size, "count": count}
    return fit_detector(net, train, test, GLYPH_RECIPE, info)


__all__ = (
    "FaceNet",
    "GLYPH_RECIPE",
    "RECIPE",
    "RENDER_SEED",
    "SubjectDetector",
    "face_detector",
    "fit_detector",
    "glyph_pairs",
    "subject_detector",
)
