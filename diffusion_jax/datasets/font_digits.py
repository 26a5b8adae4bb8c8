"""Digits typeset in a font, drawn the way the bundled handwritten digits were made.

The UCI optdigits set behind scikit-learn's digits turned each handwritten digit into a
32x32 binary bitmap, normalised in size, and counted the ink pixels in each 4x4 block:
an 8x8 image of values 0..16. ``render`` does the same to a digit set in a TrueType font
(by default Computer Modern Roman, bundled with matplotlib): the glyph's ink box is
scaled to fill most of the 32x32 bitmap (height 26-31 px, aspect kept, width jittered
by +-15%), turned by up to +-6 degrees, moved by up to +-1 px, thresholded at 30-60% of
full ink (the stroke weight), and block-counted. Stored like the digits dataset: uint8
``round(count * 255 / 16)``.

A typeset digit is a *new style* of a known class: what a subject-tuning run
(subject.py) teaches the digits model, and what ``evaluation/subject_net.py`` learns to
tell from handwriting. Every example depends only on ``(seed, i)``.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from diffusion_jax.datasets import glyph_render

DEFAULT_FONT = "cmr10.ttf"  # Computer Modern Roman: absent from the digits and the glyphs
BITMAP = 32  # the optdigits bitmap
BLOCK = 4  # 32 / 4 = 8x8 counts of 0..16
_REFERENCE_SIZE = 160  # font size the ink is drawn at before scaling down


def font_path(font: str) -> str:
    """A font file: a path, or the name of a font in matplotlib's bundled fonts."""
    path = font if os.path.sep in font else os.path.join(glyph_render.font_dir(), font)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"font {font!r} not found (looked for {path}); name a file in "
            f"{glyph_render.font_dir()} (e.g. {DEFAULT_FONT}) or give a path"
        )
    return path


def _bitmap(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float [32, 32] coverage in [0, 1]: ``ink`` (uint8, cropped to its box) scaled,
    turned, centred and shifted as the module docstring says."""
    height = int(rng.integers(26, 32))
    width = ink.shape[1] * height / ink.shape[0] * rng.uniform(0.85, 1.15)
    width = int(np.clip(round(width), 4, BITMAP - 2))
    glyph = Image.fromarray(ink).resize((width, height), Image.Resampling.LANCZOS)
    glyph = glyph.rotate(rng.uniform(-6.0, 6.0), Image.Resampling.BILINEAR, expand=True)
    glyph = np.asarray(glyph, np.float32) / 255.0
    rows, cols = np.flatnonzero(glyph.max(1) > 0.05), np.flatnonzero(glyph.max(0) > 0.05)
    glyph = glyph[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1][:BITMAP, :BITMAP]
    canvas = np.zeros((BITMAP, BITMAP), np.float32)
    dy, dx = rng.integers(-1, 2, size=2)
    top = int(np.clip((BITMAP - glyph.shape[0]) // 2 + dy, 0, BITMAP - glyph.shape[0]))
    left = int(np.clip((BITMAP - glyph.shape[1]) // 2 + dx, 0, BITMAP - glyph.shape[1]))
    canvas[top : top + glyph.shape[0], left : left + glyph.shape[1]] = glyph
    return canvas


def render(n: int, seed: int, font: str = DEFAULT_FONT) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, 8, 8, 1], int32 labels [n]): example ``i`` is digit ``i % 10`` drawn
    with ``default_rng([seed, i])``."""
    path = font_path(font)
    inks = [glyph_render.ink_box(path, _REFERENCE_SIZE, str(d)) for d in range(10)]
    images = np.zeros((n, 8, 8, 1), np.uint8)
    labels = (np.arange(n) % 10).astype(np.int32)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        on = _bitmap(inks[labels[i]], rng) >= rng.uniform(0.3, 0.6)
        counts = on.reshape(8, BLOCK, 8, BLOCK).sum(axis=(1, 3))
        images[i, ..., 0] = np.rint(counts * (255.0 / 16.0)).astype(np.uint8)
    return images, labels


__all__ = ("DEFAULT_FONT", "font_path", "render")
