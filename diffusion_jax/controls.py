"""Control signals for ControlNet runs (adapters.py, models/controlnet.py): each maps images
[B, H, W, C] in [-1, 1] to a binary control image [B, H, W, 1] in {0, 1}, computed in
the train step from the batch's own images and at sampling from ``--control`` images.

  edges  Sobel gradient magnitude of the grey image above EDGE_THRESHOLD (the digits'
         edge map);
  mask   pixels whose colour is farther than MASK_DISTANCE from the background colour,
         the median of the image's border (the glyphs' shape mask: a glyph is drawn in
         one colour on one background colour, so this is the renderer's mask up to
         anti-aliased edge pixels).

``iou`` scores how well a sample follows its control: the intersection over union of
the control extracted from the sample and the one it was given.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Sobel magnitude in [-1, 1] pixel units: half of a full -1 -> 1 step's 8. On the 8x8
# digits this marks ~47% of the pixels (1.0 would mark 77%: everything near a stroke).
EDGE_THRESHOLD = 4.0
MASK_DISTANCE = 0.5  # RGB distance in [-1, 1] units (named colours are >= 1 apart)
_SOBEL = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], np.float32)


def edges(images):
    grey = jnp.mean(jnp.asarray(images, jnp.float32), axis=-1)
    padded = jnp.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = grey.shape[1:]

    def filt(k):
        return sum(
            float(k[i, j]) * padded[:, i : i + h, j : j + w]
            for i in range(3)
            for j in range(3)
            if k[i, j]
        )

    magnitude = jnp.sqrt(filt(_SOBEL) ** 2 + filt(_SOBEL.T) ** 2)
    return (magnitude > EDGE_THRESHOLD).astype(jnp.float32)[..., None]


def mask(images):
    x = jnp.asarray(images, jnp.float32)
    border = jnp.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    background = jnp.median(border, axis=1)  # [B, C]
    distance = jnp.linalg.norm(x - background[:, None, None, :], axis=-1)
    return (distance > MASK_DISTANCE).astype(jnp.float32)[..., None]


CONTROLS = {"edges": edges, "mask": mask}


def extract(name: str, images):
    """The ``name`` control of ``images`` (ValueError naming the choices)."""
    if name not in CONTROLS:
        raise ValueError(f"unknown adapter.control {name!r}; valid: {sorted(CONTROLS)}")
    return CONTROLS[name](images)


def iou(a, b) -> np.ndarray:
    """Per-image intersection over union of binary images [B, H, W, 1] (1 where both are
    empty)."""
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    inter = np.sum(a & b, axis=(1, 2, 3))
    union = np.sum(a | b, axis=(1, 2, 3))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


__all__ = ("CONTROLS", "EDGE_THRESHOLD", "MASK_DISTANCE", "edges", "extract", "iou", "mask")
