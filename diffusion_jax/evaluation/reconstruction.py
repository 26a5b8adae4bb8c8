"""Reconstruction quality of an autoencoder: PSNR, SSIM and reconstruction FID.

Images are in [-1, 1]; both metrics are computed on [0, 1] images (x + 1) / 2, so the peak
signal is 1.
  * PSNR = 10 log10(1 / MSE), the MSE per image over all pixels and channels; the record
    holds the mean over images of the per-image PSNR (and the PSNR of the mean MSE).
  * SSIM (Wang et al. 2004): luminance x contrast x structure from local Gaussian-weighted
    statistics (window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, L = 1), computed per channel on
    the "valid" window positions only (no padding: MATLAB ``ssim_index``'s choice) and
    averaged over positions, channels and images. Images smaller than 11 pixels use the
    largest odd window that fits (digits: 7).
  * rFID: the feature-net FID of the reconstructions of held-out images against the
    training split's statistics, with ``fid_matched`` against the same real-vs-real floor as
    generation FIDs (``evaluation.with_floor``): the best a latent diffusion model on these
    latents can hope for.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import numpy as np

from diffusion_jax import generate
from diffusion_jax.evaluation.extractor import FeatureExtractor
from diffusion_jax.evaluation.scoring import evaluate_samples
from diffusion_jax.evaluation.stats import FeatureStats

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(images, reconstructions) -> np.ndarray:
    """Per-image PSNR [N] in dB of [-1, 1] images (peak 1 on the [0, 1] scale)."""
    diff = (np.asarray(images, np.float64) - np.asarray(reconstructions, np.float64)) / 2.0
    mse = np.mean(np.square(diff).reshape(len(diff), -1), axis=1)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-20))


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-0.5 * np.square(x / sigma))
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [N, H, W, C] along H then W."""
    k = len(w)
    h, wd = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(w[i] * x[:, i : i + h] for i in range(k))
    return sum(w[j] * rows[:, :, j : j + wd] for j in range(k))


def ssim(images, reconstructions) -> np.ndarray:
    """Per-image SSIM [N] (see the module docstring) of [-1, 1] images [N, H, W, C]."""
    x = (np.asarray(images, np.float64) + 1.0) / 2.0
    y = (np.asarray(reconstructions, np.float64) + 1.0) / 2.0
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"need two [N, H, W, C] arrays of one shape, got {x.shape}, {y.shape}")
    size = min(SSIM_WINDOW, *x.shape[1:3])
    size -= 1 - size % 2  # odd
    w = _gaussian_window(size, SSIM_SIGMA)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mx, my = _filter_valid(x, w), _filter_valid(y, w)
    vx = _filter_valid(x * x, w) - mx * mx
    vy = _filter_valid(y * y, w) - my * my
    cxy = _filter_valid(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.reshape(len(s), -1).mean(axis=1)


def make_reconstruct_fn(reconstruct: Callable) -> Callable:
    """``reconstruct(params, images) -> images`` as a ``generate.generate_samples``
    sample_fn (the inputs ride in ``images``; rng, labels and guidance are unused), so
    reconstructions are batched, padded, sharded over a mesh and interruptible exactly like
    samples."""

    def sample_fn(params, rng, labels, guidance_scale, images=None, mask=None, *unused):
        del rng, labels, guidance_scale, mask, unused  # source labels, negative condition
        return reconstruct(params, images)

    return sample_fn


def evaluate_reconstructions(
    sample_fn: Callable,
    params,
    images: np.ndarray,
    labels: Optional[np.ndarray],
    extractor: FeatureExtractor,
    ref_stats: FeatureStats,
    *,
    batch_size: int,
    mesh=None,
    matched_num_samples: Optional[int] = None,
    info: Optional[Mapping[str, Any]] = None,
    interrupt: Optional[Callable[[], bool]] = None,
) -> dict:
    """Reconstruct ``images`` [N, H, W, C] with ``sample_fn`` (``make_reconstruct_fn``) and
    score them: psnr (mean of per-image), psnr_of_mean_mse, ssim, and ``evaluate_samples``'
    metrics of the reconstructions (fid = rFID, fid_matched, class_accuracy when ``labels``
    are given and the feature net classifies), plus ``info`` and wall times."""
    t0 = time.time()
    n = len(images)
    recon = generate.generate_samples(
        sample_fn, params, n, batch_size, 0, mesh=mesh, images=images, interrupt=interrupt
    )
    t1 = time.time()
    per_image = psnr(images, recon)
    mse = np.mean(np.square((np.asarray(images) - recon) / 2.0))
    result = dict(info or {})
    result.update(
        evaluate_samples(
            extractor,
            recon,
            ref_stats,
            labels=labels,
            matched_num_samples=matched_num_samples,
            seed=0,
        )
    )
    result.update(
        psnr=float(per_image.mean()),
        psnr_of_mean_mse=float(10.0 * np.log10(1.0 / mse)),
        ssim=float(ssim(images, recon).mean()),
        reconstruct_seconds=round(t1 - t0, 2),
        metric_seconds=round(time.time() - t1, 2),
    )
    return result
