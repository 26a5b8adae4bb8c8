"""Reading and checking the sample CLI's user inputs: --input images, --mask, --labels and
--guidance_interval (see diffusion_jax.sample for the formats).

Every problem a user can cause here (a missing, empty, corrupt or wrongly shaped file, a bad
label) raises ConfigError with one line naming the file and the fix, so the CLI reports it
before any compile or sampling instead of failing later inside numpy, PIL or JAX.
"""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np

from diffusion_jax import generate
from diffusion_jax.workdir import ConfigError

MASKS = ("top", "bottom", "left", "right", "center")

# What PIL and numpy raise for a damaged file: OSError (truncated data, not an image),
# SyntaxError (broken PNG chunks), ValueError / EOFError (short or odd headers), BadZipFile
# and zlib.error (a damaged .npz or compressed chunk).
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def parse_labels(text: str, n: int, num_classes: int, flag: str = "--labels") -> np.ndarray:
    """``n`` int32 labels: ``text``'s comma-separated integers cycled, or (empty ``text``)
    0..num_classes-1 cycled; checked against the model's classes."""
    if not text:
        return generate.class_balanced_labels(num_classes, n)
    if num_classes == 0:
        raise ConfigError(f"{flag} given but the model is unconditional")
    try:
        labels = np.array([int(x) for x in text.split(",")], np.int32)
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"{flag} must be in 0..{num_classes - 1}")
    return np.resize(labels, n)


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape)


def _read_png(path: str, flag: str, mode: str | None = None):
    """The decoded PIL image at ``path`` (converted to ``mode`` if given), or ConfigError
    naming the file. PIL opens lazily, so the pixels are decoded here, inside the try: a
    truncated file would otherwise fail later with no file name."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode else img.copy()
    except (*_READ_ERRORS, Image.DecompressionBombError) as e:
        raise ConfigError(f"{flag} {path} is not a readable PNG ({e})") from None


def _read_npz(path: str, flag: str, key: str, optional=()) -> dict:
    """{name: array} of the .npz at ``path``: ``key`` (required) and those of ``optional``
    it holds, or ConfigError naming the file. np.load reads lazily, so the arrays are read
    here, inside the try."""
    try:
        with np.load(path) as f:
            if key not in f:
                raise ConfigError(f"{path} has no {key!r} array (keys: {list(f.keys())})")
            return {name: f[name] for name in (key, *optional) if name in f}
    except ConfigError:
        raise
    except _READ_ERRORS as e:
        raise ConfigError(f"{flag} {path} is not a readable .npz ({e})") from None


def load_images(spec_arg: str, image_shape):
    """(uint8 [N, H, W, C], labels [N] or None) from --input, checked against the model's
    (H, W, C); raises ConfigError with a one-line reason."""
    paths = [p for p in spec_arg.split(",") if p]
    if not paths:
        raise ConfigError(f"--input {spec_arg!r} names no files")
    for p in paths:
        if not os.path.exists(p):
            raise ConfigError(f"--input file {p} not found")
    labels = None
    if len(paths) == 1 and paths[0].endswith(".npz"):
        arrays = _read_npz(paths[0], "--input", "images", ("labels",))
        images = arrays["images"]
        labels = arrays["labels"].astype(np.int32) if "labels" in arrays else None
        if images.ndim == 3:  # [N, H, W] grayscale
            images = images[..., None]
        if images.ndim != 4:
            raise ConfigError(
                f"{paths[0]}: 'images' must be [N, H, W, C], got shape {images.shape}"
            )
        if images.dtype != np.uint8:
            raise ConfigError(f"{paths[0]}: 'images' must be uint8 (0..255), got {images.dtype}")
        if len(images) == 0:
            raise ConfigError(
                f"{paths[0]} holds no images ('images' has shape {images.shape}); give at least one"
            )
    else:
        arrays = []
        for p in paths:
            if not p.lower().endswith(".png"):
                raise ConfigError(f"--input {p}: expected .png files or one .npz")
            img = _read_png(p, "--input")
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB" if image_shape[2] == 3 else "L")
            a = np.asarray(img, np.uint8)
            arrays.append(a[..., None] if a.ndim == 2 else a)
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ConfigError(f"--input PNGs differ in size: {sorted(shapes)}")
        images = np.stack(arrays)
    if images.shape[1:] != tuple(image_shape):
        raise ConfigError(
            f"--input images are {_shape_text(images.shape[1:])} (HxWxC) but the model "
            f"expects {_shape_text(image_shape)}; resize/convert them first"
        )
    if labels is not None and labels.shape != (images.shape[0],):
        labels = None
    return images, labels


def load_mask(spec_arg: str, image_shape) -> np.ndarray:
    """float32 mask (1 = known) broadcastable to [N, H, W, C] from --mask."""
    h, w, c = image_shape
    if spec_arg in MASKS:
        m = np.zeros((h, w, 1), np.float32)
        if spec_arg == "top":
            m[: h // 2] = 1
        elif spec_arg == "bottom":
            m[h - h // 2 :] = 1
        elif spec_arg == "left":
            m[:, : w // 2] = 1
        elif spec_arg == "right":
            m[:, w - w // 2 :] = 1
        else:
            m[:] = 1
            m[h // 4 : h - h // 4, w // 4 : w - w // 4] = 0
        return m
    if not os.path.exists(spec_arg):
        raise ConfigError(f"--mask {spec_arg!r} is neither a file nor one of {MASKS}")
    if spec_arg.endswith(".npz"):
        m = np.asarray(_read_npz(spec_arg, "--mask", "mask")["mask"], np.float32)
        if m.ndim == 2:
            m = m[..., None]
    else:
        m = (np.asarray(_read_png(spec_arg, "--mask", "L"), np.float32) >= 128)[..., None]
        m = m.astype(np.float32)
    if m.ndim not in (3, 4) or m.shape[-3:-1] != (h, w) or m.shape[-1] not in (1, c):
        raise ConfigError(
            f"--mask is {_shape_text(m.shape)} but the images are "
            f"{_shape_text(image_shape)} (HxWxC; mask HxW, HxWx1, HxWxC "
            "or NxHxWxC)"
        )
    if np.any((m < 0) | (m > 1)):
        raise ConfigError("--mask values must lie in [0, 1] (1 = known)")
    return m


def parse_interval(text: str):
    """--guidance_interval 't_lo,t_hi' as (t_lo, t_hi), or None when empty."""
    if not text:
        return None
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance_interval must be 't_lo,t_hi', got {text!r}") from None
    return lo, hi
