"""The Fashion-MNIST feature net: a ``small_classifier.SmallConvNet`` (28 -> 14 -> 7)
trained on the Fashion-MNIST train split at its native 28x28 (deterministic, fixed seed),
cached with its test accuracy; its penultimate layer gives classifier-FID features and its
logits class accuracy (``fashion_classifier``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from diffusion_jax.datasets import fashion_mnist
from diffusion_jax.evaluation import small_classifier
from diffusion_jax.evaluation.extractor import FeatureExtractor

# The whole training recipe; with the dataset's identity it makes the cache key.
_FASHION_RECIPE = dict(
    version=1,
    widths=(16, 32),
    feature_dim=64,
    epochs=5,
    batch_size=128,
    learning_rate=3e-3,
    weight_decay=1e-4,
    max_shift=0,  # measured: shifts cost ~0.5% test accuracy at this short training
    seed=0,
)


def fashion_classifier(
    cache_dir: str = "",
    data_dir: str = "",
    resize_method: str = "bilinear",
    recipe: Optional[Mapping[str, Any]] = None,
) -> FeatureExtractor:
    """The Fashion-MNIST feature net: trained once on the train split, then cached.

    Training: ``_FASHION_RECIPE`` (AdamW, cosine decay, 5 epochs of the 60,000 training
    images, fixed seed; ``recipe`` replaces it, for tests). Measured on 2 CPU cores: ~2.3
    min of training plus ~30 s reading the splits; 90.9% test accuracy on the 10,000
    test images (1 epoch of widths (32, 64): 86.7%; 3 epochs: 89.3%).

    Inputs of the diffusion model's size are fitted back to 28x28: unchanged at 28;
    center-cropped when ``resize_method`` is "pad" (exactly undoing data.py's padding, so
    real padded images give the classifier its own training distribution; the margin the
    model draws is then not looked at); otherwise resized (antialiased linear).

    Cache: ``<cache_dir>/fashion_classifier-<hash>.{msgpack,json}``, the hash over the
    recipe and the prepared dataset's TFDS full name (``fashion_mnist_idx/source_<sha of
    the IDX files>/1.0.0``, or TFDS's ``fashion_mnist/<version>``), so a net trained on
    other data (a test's tiny IDX files) is never reused. ``data_dir``: where the TFDS
    dataset lives (data.py's default if "").
    """
    from diffusion_jax import data, datasets  # deferred: the metric math needs no data

    recipe = dict(_FASHION_RECIPE if recipe is None else recipe)
    resolved_dir = os.path.expanduser(data_dir or data.DEFAULT_DATA_DIR)
    dataset = datasets.builder(fashion_mnist.NAME, resolved_dir).info.full_name
    spec = small_classifier.ClassifierSpec(
        name="fashion_classifier",
        recipe=recipe,
        key={"recipe": recipe, "dataset": dataset},
        data_cfg={
            "name": fashion_mnist.NAME,
            "data_dir": data_dir,
            "image_size": fashion_mnist.IMAGE_SIZE,
        },
        native_size=fashion_mnist.IMAGE_SIZE,
        num_classes=fashion_mnist.NUM_CLASSES,
    )
    return small_classifier.cached_classifier(spec, cache_dir, crop=resize_method == "pad")
