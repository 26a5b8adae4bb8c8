"""Feature networks behind the metrics: the ``FeatureExtractor`` interface, the registry of
feature nets (``FEATURE_EXTRACTORS``, name -> factory) and ``make_extractor``, which picks
a dataset's default net.

Each net lives in its own module of this package and builds a ``FeatureExtractor``; the
factories here import it on first use (the nets' modules import this one). Adding a net:
a new module plus one ``FEATURE_EXTRACTORS`` entry (and one in ``dataset_feature_nets`` if
it becomes a dataset's default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A feature network: ``features(images [N, H, W, C] in [-1, 1]) -> float32 [N, D]``.

    ``apply_features`` / ``apply_logits`` are jitted functions of one batch of exactly
    ``batch_size`` images; ``features`` / ``logits`` handle any N by padding the last batch
    (one compiled shape). ``version`` identifies the exact weights: cached statistics
    record it and are recomputed when it changes. ``info`` holds extra facts (accuracy,
    whether the weights came from a cache, ...).
    """

    name: str
    version: str
    feature_dim: int
    apply_features: Callable[[jnp.ndarray], jnp.ndarray]
    apply_logits: Optional[Callable[[jnp.ndarray], jnp.ndarray]] = None
    batch_size: int = 256
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def has_logits(self) -> bool:
        return self.apply_logits is not None

    def _batched(self, fn, images) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
        out = []
        for start in range(0, len(images), self.batch_size):
            block = images[start : start + self.batch_size]
            pad = self.batch_size - len(block)
            if pad:
                block = np.concatenate([block, np.zeros((pad, *block.shape[1:]), block.dtype)])
            out.append(np.asarray(fn(block), np.float32)[: self.batch_size - pad])
        if not out:
            raise ValueError("no images")
        return np.concatenate(out)

    def features(self, images) -> np.ndarray:
        return self._batched(self.apply_features, images)

    def logits(self, images) -> np.ndarray:
        if self.apply_logits is None:
            raise ValueError(f"feature net {self.name!r} has no classifier head")
        return self._batched(self.apply_logits, images)


def to_channels(x, channels: int):
    """Grayscale <-> RGB: repeat a single channel, or average RGB to gray."""
    if x.shape[-1] == channels:
        return x
    if x.shape[-1] == 1:
        return jnp.repeat(x, channels, axis=-1)
    if channels == 1:
        return jnp.mean(x, axis=-1, keepdims=True)
    raise ValueError(f"cannot map {x.shape[-1]} channels to {channels}")


def cfg_get(cfg, key, default=None):
    """``cfg[key]`` of a dict or ConfigDict, or ``cfg.key`` of any other object."""
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


# ========================================================================== registry
# A factory takes (data_cfg, *, cache_dir, inception_weights) and builds its net's
# extractor; it imports the net's module when called.


def _digits_classifier(
    data_cfg, *, cache_dir: str = "", inception_weights: str = ""
) -> FeatureExtractor:
    from diffusion_jax.evaluation.digits_net import digits_classifier

    return digits_classifier(cache_dir, **_data_location(data_cfg))


def _fashion_classifier(
    data_cfg, *, cache_dir: str = "", inception_weights: str = ""
) -> FeatureExtractor:
    from diffusion_jax.evaluation.fashion_net import fashion_classifier

    return fashion_classifier(cache_dir, **_data_location(data_cfg))


def _glyph_classifier(
    data_cfg, *, cache_dir: str = "", inception_weights: str = ""
) -> FeatureExtractor:
    from diffusion_jax.evaluation.glyph_net import glyph_classifier

    # Trained on renders, not on the dataset; its real test split is only evaluated.
    name = cfg_get(data_cfg, "name")
    return glyph_classifier(cache_dir, dataset=name, **_data_location(data_cfg))


def _data_location(data_cfg) -> dict:
    """What a classifier net needs of the data config: where its dataset is, and how the
    diffusion model's images were fitted to image_size ("pad": the net center-crops)."""
    return {
        "data_dir": cfg_get(data_cfg, "data_dir", "") or "",
        "resize_method": cfg_get(data_cfg, "resize_method", "bilinear") or "bilinear",
    }


def _inception_v3(
    data_cfg, *, cache_dir: str = "", inception_weights: str = ""
) -> FeatureExtractor:
    from diffusion_jax.evaluation.inception import inception_v3

    return inception_v3(inception_weights)


FEATURE_EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "digits_classifier": _digits_classifier,
    "fashion_classifier": _fashion_classifier,
    "glyph_classifier": _glyph_classifier,
    "inception_v3": _inception_v3,
}
# The feature net of datasets without an entry in ``dataset_feature_nets``.
DEFAULT_FEATURE_NET = "inception_v3"


def dataset_feature_nets() -> dict[str, str]:
    """Dataset name -> its default feature net (a ``FEATURE_EXTRACTORS`` key)."""
    from diffusion_jax import data  # deferred: the metric math needs no data pipeline
    from diffusion_jax.datasets import fashion_mnist, glyphs

    return {
        data.DIGITS: "digits_classifier",
        fashion_mnist.NAME: "fashion_classifier",
        glyphs.NAME: "glyph_classifier",
        glyphs.TINY_NAME: "glyph_classifier",
    }


def make_extractor(
    data_cfg, *, cache_dir: str = "", inception_weights: str = ""
) -> FeatureExtractor:
    """The default feature net for a dataset: a small classifier trained on the dataset for
    digits and Fashion-MNIST, the glyph attribute classifier (trained on fresh renders) for
    glyphs (offline, "classifier-FID"), InceptionV3 (standard FID) for anything else."""
    name = dataset_feature_nets().get(cfg_get(data_cfg, "name"), DEFAULT_FEATURE_NET)
    return FEATURE_EXTRACTORS[name](
        data_cfg, cache_dir=cache_dir, inception_weights=inception_weights
    )
