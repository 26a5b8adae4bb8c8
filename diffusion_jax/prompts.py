"""Prompts for text models: from the sample CLI's flags to token batches, and grids that
show each row's prompt.

``prompt_rows``: N samples over P prompts in rows (prompt p gets samples
[p * per, (p + 1) * per), per = ceil(N / P)), so a grid with one row per prompt reads
like a contact sheet. ``encode``: strict tokenization; an unknown word is a one-line error
with the vocabulary size and the closest known words (tokenizer.py), raised before
anything compiles. ``captioned_grid``: the image grid with each row's prompt written
above it (DejaVu Sans from the matplotlib wheel, no download).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffusion_jax import metrics
from diffusion_jax.tokenizer import Tokenizer

_TEXT_HEIGHT = 14  # pixels of the caption strip above each row


def read_prompts(prompt: str, prompts_file: str) -> list[str]:
    """The prompts of ``--prompt`` (one) or ``--prompts_file`` (one per non-empty line)."""
    if prompt and prompts_file:
        raise ValueError("give --prompt or --prompts_file, not both")
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"--prompts_file={prompts_file!r} does not exist")
        with open(prompts_file) as f:
            lines = [line.strip() for line in f]
        prompts = [line for line in lines if line]
        if not prompts:
            raise ValueError(f"--prompts_file={prompts_file!r} has no prompts")
        return prompts
    return [prompt] if prompt else []


def prompt_rows(num_prompts: int, n: int) -> np.ndarray:
    """[n] prompt index of each sample: contiguous blocks of ceil(n / num_prompts)."""
    per = math.ceil(n / num_prompts)
    return np.minimum(np.arange(n) // per, num_prompts - 1)


def encode(tokenizer: Tokenizer, prompts: Sequence[str], n: int, flag: str) -> np.ndarray:
    """Tokens [n, L] of ``prompts`` laid out by ``prompt_rows``; ValueError naming the
    flag, the unknown words and their closest known ones."""
    try:
        tokens = tokenizer.encode_batch(prompts)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    return tokens[prompt_rows(len(prompts), n)]


def negative_tokens(tokenizer: Tokenizer, negative: str, n: int) -> Optional[np.ndarray]:
    """Tokens [n, L] of one negative prompt for every sample, or None (the empty caption,
    i.e. plain classifier-free guidance)."""
    if not negative:
        return None
    return encode(tokenizer, [negative], n, "--negative_prompt")


def _font(size: int) -> ImageFont.ImageFont:
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    return ImageFont.truetype(path, size)


def captioned_grid(images: np.ndarray, prompts: Sequence[str], upscale: int = 1) -> np.ndarray:
    """uint8 grid [rows * (strip + H + pad), ...]: one row per prompt (``prompt_rows``),
    the prompt written above its row, cut with "..." where it would not fit."""
    rows = prompt_rows(len(prompts), len(images))
    per = int(np.bincount(rows).max())
    blocks = []
    font = _font(_TEXT_HEIGHT - 3)
    for p, prompt in enumerate(prompts):
        row = images[rows == p]
        if not len(row):
            continue
        grid = metrics.make_grid(row, ncols=per, upscale=upscale)
        strip = Image.new("RGB", (grid.shape[1], _TEXT_HEIGHT), "white")
        draw = ImageDraw.Draw(strip)
        text = prompt
        while text and draw.textlength(text, font=font) > grid.shape[1] - 4:
            text = text[:-4] + "..."
            if text == "...":
                break
        draw.text((2, 1), text, fill="black", font=font)
        strip = np.asarray(strip)
        if grid.shape[-1] == 1:
            strip = strip[..., :1]
        blocks += [strip, grid]
    return np.concatenate(blocks)


__all__ = ("read_prompts", "prompt_rows", "encode", "negative_tokens", "captioned_grid")
