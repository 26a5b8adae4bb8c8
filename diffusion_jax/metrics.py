"""Scalar/image logging (TensorBoard via tensorboardX: no TensorFlow needed), image grids,
a console progress line with ETA and the run's training clock. Only process 0 writes;
other processes get no-ops.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import jax
import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255] (clipped, rounded)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8
    )


def from_uint8(images) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (``to_uint8``'s inverse up to rounding)."""
    return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)


def make_grid(
    images: np.ndarray, ncols: int | None = None, pad: int = 1, upscale: int = 1
) -> np.ndarray:
    """Tile [N, H, W, C] images in [-1, 1] into one uint8 [rows*(H+pad)+pad, ..., C] grid,
    each image upscaled ``upscale`` x by pixel repetition (8x8 digits are tiny)."""
    images = to_uint8(images)
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = img
    return grid


def save_png(path: str, grid: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


class MetricWriter:
    """Scalars to TensorBoard (``logdir``) and, for scripts and reports, one JSON line per
    call to ``jsonl_path``; images to TensorBoard. Silent on processes other than 0."""

    def __init__(self, logdir: str, jsonl_path: str = ""):
        self._writer, self._jsonl = None, None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir, flush_secs=10)
            if jsonl_path:
                self._jsonl = open(jsonl_path, "a")

    def scalars(self, step: int, values: dict) -> None:
        if self._writer:
            values = {k: float(v) for k, v in values.items()}
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self._jsonl.flush()

    def image(self, step: int, tag: str, grid: np.ndarray) -> None:
        if self._writer:
            self._writer.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer:
            self._writer.close()
        if self._jsonl:
            self._jsonl.close()


class Progress:
    """One console line: step, loss, it/s, ETA. ``quiet`` prints only every ``every``
    steps as plain lines (CI logs); otherwise it redraws in place on a terminal."""

    def __init__(self, total: int, start: int = 0, quiet: bool = False):
        self.total, self.start, self.quiet = total, start, quiet
        self.t0 = time.time()
        self.tty = sys.stdout.isatty() and not quiet

    def update(self, step: int, **values) -> str:
        elapsed = time.time() - self.t0
        rate = (step - self.start) / elapsed if elapsed > 0 and step > self.start else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        fields = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        line = f"step {step}/{self.total} {fields} | {rate:.2f} it/s | ETA {_fmt_seconds(eta)}"
        if jax.process_index() == 0:
            if self.tty:
                sys.stdout.write("\r" + line + " " * 8)
                sys.stdout.flush()
            else:
                print(line, flush=True)
        return line

    def close(self) -> None:
        if self.tty and jax.process_index() == 0:
            sys.stdout.write("\n")


class TrainClock:
    """Wall-clock seconds a run has spent training, summed over resumes (the checkpoint
    carries it): compilation, steps and checkpoints count; sample grids and in-loop
    metrics (``paused``) do not, so learning curves of different models share one
    honest time axis."""

    def __init__(self):
        self._base, self._start, self._paused = 0.0, time.monotonic(), 0.0

    def resume(self, seconds: float) -> None:
        """Continue from the ``seconds`` a checkpoint recorded."""
        self._base = float(seconds)

    def seconds(self) -> float:
        return self._base + time.monotonic() - self._start - self._paused

    @contextlib.contextmanager
    def paused(self):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._paused += time.monotonic() - t0


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "--:--"
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
