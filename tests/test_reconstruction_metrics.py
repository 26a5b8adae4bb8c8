"""PSNR and SSIM against closed forms (evaluation/reconstruction.py), and the KL term of the
autoencoder loss against the Gaussian KL formula."""

import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import autoencoding
from diffusion_jax.evaluation import reconstruction


def test_psnr_of_a_uniform_error_is_closed_form():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, (3, 8, 8, 1))
    # error d in [-1, 1] units is d/2 on the [0, 1] scale: PSNR = 10 log10(4 / d^2)
    for d in (0.02, 0.2):
        got = reconstruction.psnr(x, x + d)
        np.testing.assert_allclose(got, 10 * np.log10(4 / d**2), rtol=1e-12)


def test_ssim_of_identical_images_is_one_and_of_noise_is_low():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 64, 64, 3))
    np.testing.assert_allclose(reconstruction.ssim(x, x), 1.0, rtol=1e-12)
    # independent images: the structure term is a local correlation with mean 0; one
    # window sees ~2 pi sigma^2 = 14 effective pixels (std ~0.27), the mean over 54^2 x 3
    # overlapping positions has std ~0.01: 0.05 is > 4 sigma.
    noise = rng.uniform(-1, 1, x.shape)
    assert np.abs(reconstruction.ssim(x, noise)).max() < 0.05


def test_ssim_of_constant_images_is_the_luminance_term():
    # Two flat images a, b (on [0, 1]): variances and covariance are 0, so the contrast-
    # structure factor is C2 / C2 = 1 and SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly.
    a, b = 0.3, 0.7
    x = np.full((1, 12, 12, 1), 2 * a - 1)
    y = np.full((1, 12, 12, 1), 2 * b - 1)
    c1 = reconstruction.SSIM_K1**2
    np.testing.assert_allclose(
        reconstruction.ssim(x, y), (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-9
    )


def test_ssim_of_a_contrast_change_is_closed_form():
    # y = m + s (x - m) around the image mean m, on an image whose local means are all m
    # (a checkerboard seen through a symmetric window of odd size is not; use a large flat
    # window instead: sizes 11 on an 11x11 image give one window position). Then
    # luminance = 1 and contrast-structure = (2 s var + C2) / ((1 + s^2) var + C2).
    rng = np.random.default_rng(1)
    x01 = rng.uniform(0.2, 0.8, (1, 11, 11, 1))
    w = reconstruction._gaussian_window(11, reconstruction.SSIM_SIGMA)
    w2 = np.outer(w, w)[None, :, :, None]
    m = np.sum(w2 * x01)
    var = np.sum(w2 * x01**2) - m**2
    s = 0.5
    y01 = m + s * (x01 - m)
    c2 = reconstruction.SSIM_K2**2
    want = (2 * s * var + c2) / ((1 + s * s) * var + c2)
    np.testing.assert_allclose(reconstruction.ssim(2 * x01 - 1, 2 * y01 - 1), want, rtol=1e-9)


def test_ssim_window_shrinks_to_fit_small_images():
    x = np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 1))
    assert reconstruction.ssim(x, x * 0.9).shape == (1,)  # 8x8 digits: window 7, not 11
    with pytest.raises(ValueError, match="one shape"):
        reconstruction.ssim(x, x[:, :4])


def test_kl_to_standard_normal_matches_the_gaussian_formula():
    mean = jnp.array([[0.0, 1.0], [0.5, -2.0]])
    logvar = jnp.array([[0.0, 0.0], [np.log(0.25), np.log(4.0)]])
    # KL(N(m, v) || N(0, 1)) = (m^2 + v - 1 - log v) / 2 per element, summed per row
    want = [0.5 * (0 + 1 - 1 - 0) + 0.5 * (1 + 1 - 1 - 0)]
    want.append(0.5 * (0.25 + 0.25 - 1 - np.log(0.25)) + 0.5 * (4 + 4 - 1 - np.log(4.0)))
    np.testing.assert_allclose(autoencoding.kl_to_standard_normal(mean, logvar), want, rtol=1e-6)
