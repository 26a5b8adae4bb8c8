"""The digits feature net: a ``small_classifier.SmallConvNet`` trained on the bundled
digits' train split (deterministic, fixed seed), cached with its test accuracy; its
penultimate layer gives classifier-FID features and its logits class accuracy
(``digits_classifier``)."""

from __future__ import annotations

from diffusion_jax.datasets import digits
from diffusion_jax.evaluation import small_classifier
from diffusion_jax.evaluation.extractor import FeatureExtractor

# The digits net (8 -> 4 -> 2); kept under its own name.
DigitsClassifierNet = small_classifier.SmallConvNet

# The whole training recipe; its hash is the cache key and part of the version.
_DIGITS_RECIPE = dict(
    version=2,
    widths=(64, 128),
    feature_dim=64,
    epochs=60,
    batch_size=64,
    learning_rate=2e-3,
    weight_decay=1e-4,
    max_shift=1,
    seed=0,
)


def digits_classifier(
    cache_dir: str = "", data_dir: str = "", resize_method: str = "bilinear"
) -> FeatureExtractor:
    """The digits feature net: trained once on the digits train split, then cached.

    Training: ``_DIGITS_RECIPE`` (AdamW, cosine decay, 60 epochs of 1,498 images with
    random +-1 pixel shifts, fixed seed): ~5-12 s on 2 CPU cores, 98.3% test accuracy on
    the 299 test digits. Features: the penultimate layer, scaled to unit mean square.

    Cache: ``<cache_dir>/digits_classifier-<recipe hash>.msgpack`` (params) and ``.json``
    (test accuracy, training time, feature scale, params sha256, versions); see
    ``small_classifier.cached_classifier`` for ``version``. Images larger than 8x8 are
    resized to 8x8, or center-cropped when ``resize_method`` is "pad" (the data pipeline
    padded them). ``data_dir``: where the digits TFDS dataset lives (data.py's default if "").
    """
    spec = small_classifier.ClassifierSpec(
        name="digits_classifier",
        recipe=_DIGITS_RECIPE,
        key=_DIGITS_RECIPE,
        data_cfg={"name": digits.NAME, "data_dir": data_dir, "image_size": digits.IMAGE_SIZE},
        native_size=digits.IMAGE_SIZE,
        num_classes=digits.NUM_CLASSES,
    )
    return small_classifier.cached_classifier(spec, cache_dir, crop=resize_method == "pad")
