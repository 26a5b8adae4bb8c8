"""Per-example and per-batch transforms of the input pipeline (data.py): fitting images to
``image_size`` (bilinear resize after a center crop, or center padding), scaling latents,
tokenizing captions, random flips and uint8 -> float. Module-level functions and frozen dataclasses, so grain
can pickle them for its worker processes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
from PIL import Image

from diffusion_jax.tokenizer import Tokenizer


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWxC -> uint8 size x size x C, PIL bilinear (antialiased when shrinking)."""
    channels = image.shape[-1]
    if channels in (1, 3):
        mode_image = image[..., 0] if channels == 1 else image
        out = np.asarray(Image.fromarray(mode_image).resize((size, size), Image.BILINEAR))
        return out.reshape(size, size, channels)
    return np.stack(  # any other channel count: one grayscale resize per channel
        [resize(image[..., c : c + 1], size)[..., 0] for c in range(channels)], axis=-1
    )


def center_pad(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWxC -> size x size x C, centred on zeros (the extra pixel of an odd margin
    at the bottom/right). ValueError if the image is larger than `size`."""
    h, w = image.shape[:2]
    if h > size or w > size:
        raise ValueError(
            f"image of {h}x{w} is larger than data.image_size={size}: "
            "data.resize_method='pad' never shrinks"
        )
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((size, size, image.shape[-1]), image.dtype)
    out[top : top + h, left : left + w] = image
    return out


def center_crop_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def caption_text(record) -> str:
    """A record's "caption" as text (TFDS Text features read back as UTF-8 bytes)."""
    value = record["caption"]
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class CaptionFields:
    """What to read from a record's caption: "tokens" int32 [L] (``tokenizer``) and/or
    "attributes" int32 [K] (``parser``: caption -> {attribute: index}, K attributes in
    its order; what a guide classifier learns)."""

    tokenizer: Optional[Tokenizer] = None
    parser: Optional[Callable[[str], dict]] = None

    @classmethod
    def of(cls, name, data_dir, features, caption_length: int, attributes: bool):
        """The fields of dataset ``name`` (TFDS ``features``): tokens [caption_length]
        (0: none) with its vocabulary, the attributes (``attributes``) with its parser."""
        from diffusion_jax import datasets

        if not caption_length and not attributes:
            return cls()
        if "caption" not in features:
            raise ValueError(
                f"a text model or caption guide reads captions but {name!r} has none "
                f"(features: {list(features)}); use a captioned dataset such as data.name=glyphs"
            )
        tokenizer = None
        if caption_length:
            tokenizer = Tokenizer(datasets.vocabulary(name, data_dir), caption_length)
        return cls(tokenizer, datasets.caption_parser(name, data_dir) if attributes else None)

    def add_to(self, example: dict, record) -> dict:
        if self.tokenizer is None and self.parser is None:
            return example
        text = caption_text(record)
        if self.tokenizer is not None:
            example["tokens"] = self.tokenizer.encode(text)
        if self.parser is not None:
            example["attributes"] = np.asarray(list(self.parser(text).values()), np.int32)
        return example


@dataclasses.dataclass(frozen=True)
class PrepareExample:
    """TFDS record -> {"image": uint8 [S, S, C], "label": int32 scalar} (+ the
    ``captions`` fields: "tokens", "attributes").

    A different-size image is center-padded with 0 (``pad``), or else center-cropped to a
    square (``crop``) and resized with PIL bilinear.
    """

    image_size: int
    crop: bool
    has_label: bool
    pad: bool = False
    captions: CaptionFields = CaptionFields()

    def __call__(self, record):
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[..., None]
        if image.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {image.dtype}")
        size = self.image_size
        if image.shape[:2] != (size, size) and self.pad:
            image = center_pad(image, size)
        elif image.shape[:2] != (size, size):
            image = resize(center_crop_square(image) if self.crop else image, size)
        label = np.int32(record["label"]) if self.has_label else np.int32(0)
        return self.captions.add_to({"image": image, "label": label}, record)


@dataclasses.dataclass(frozen=True)
class PrepareLatent:
    """Latent record -> {"image": float32 latent * scale_factor, "label": int32 scalar}
    (+ the ``captions`` fields like ``PrepareExample``)."""

    scale_factor: float
    has_label: bool
    captions: CaptionFields = CaptionFields()

    def __call__(self, record):
        latent = np.asarray(record["latent"], np.float32) * np.float32(self.scale_factor)
        label = np.int32(record["label"]) if self.has_label else np.int32(0)
        return self.captions.add_to({"image": latent, "label": label}, record)


def random_flip(example, rng: np.random.Generator):
    """Horizontal flip with probability 1/2; `rng` is grain's, keyed by (seed, index)."""
    if rng.integers(2):
        example = {**example, "image": example["image"][:, ::-1]}
    return example


def to_float(batch):
    """uint8 [B, H, W, C] -> float32 in [-1, 1] (float latents pass unchanged); labels
    int32 [B]; caption tokens and attributes, if any, unchanged."""
    image = batch["image"]
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    out = {"image": image, "label": batch["label"].astype(np.int32)}
    out.update({k: batch[k] for k in ("tokens", "attributes") if k in batch})
    return out
