"""The subject detector: a two-class ``small_classifier.SmallConvNet`` that tells the
base's real training images (class 0) from renders of a subject (class 1), e.g.
handwritten digits from digits typeset in Computer Modern (datasets/font_digits.py).

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

import jax
import numpy as np

from diffusion_jax.datasets import digits, font_digits
from diffusion_jax.evaluation import small_classifier
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
        """bool [N]: which images [N, 8, 8, 1] in [-1, 1] the detector calls the subject."""
        _, logits = jax.jit(self.net.apply)({"params": self.params}, images)
        return np.asarray(logits).argmax(-1) == 1


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
    x = np.concatenate([real, renders])
    y = np.concatenate([np.zeros(len(real)), np.ones(len(renders))]).astype(np.int32)
    params = small_classifier.train(net, x, y, recipe)
    detector = SubjectDetector(net, params, {})
    real_as_subject = detector.is_subject(real_test)
    info = {
        "font": font,
        "accuracy_real": float(1 - real_as_subject.mean()),
        "accuracy_subject": float(detector.is_subject(renders_test).mean()),
        "num_test": [len(real_test), len(renders_test)],
    }
    return dataclasses.replace(detector, info=info)


__all__ = ("RECIPE", "RENDER_SEED", "SubjectDetector", "subject_detector")
