"""Discrete noise schedules for DDPM-style diffusion.

A schedule is the list beta_1..beta_T; everything else (alpha_bar, log-SNR, the DDPM
posterior coefficients) follows from it. All arithmetic is done in float64 with numpy
and only the final arrays are cast to float32, so schedules are bit-stable across
backends and T.

Indexing convention: array index ``t`` in ``0..T-1`` is the paper's timestep ``t+1``.
``alphas_cumprod[t]`` is alpha_bar after ``t+1`` noising steps and
``alphas_cumprod_prev[t]`` the one before it (1.0 for ``t == 0``).

Registered schedules are never changed once committed, so ablations stay reproducible:
a variant gets a new name in ``SCHEDULES``.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import struct

# beta_t is clipped here by the alpha_bar-defined schedules (Nichol & Dhariwal 2021):
# larger values make the last steps numerically singular.
MAX_BETA = 0.999


@struct.dataclass
class NoiseSchedule:
    """Immutable pytree of per-timestep float32 arrays, each of shape [T]."""

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_snr: jnp.ndarray  # log(alpha_bar / (1 - alpha_bar)); -inf at zero terminal SNR
    posterior_variance: jnp.ndarray  # beta_tilde_t = beta_t (1 - a_bar_{t-1}) / (1 - a_bar_t)
    posterior_log_variance_clipped: jnp.ndarray  # log beta_tilde, with t=0 set to t=1's value
    posterior_mean_coef1: jnp.ndarray  # multiplies x0
    posterior_mean_coef2: jnp.ndarray  # multiplies x_t

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def at(values: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """``values[t]`` for a batch of int timesteps ``t`` [B], shaped [B, 1, ..] to broadcast
    against an array of rank ``ndim`` (e.g. NHWC images: ndim=4)."""
    return jnp.take(values, t).reshape(t.shape + (1,) * (ndim - t.ndim))


# --------------------------------------------------------------------------- betas


def _betas_from_alpha_bar(alpha_bar_fn: Callable[[np.ndarray], np.ndarray], T: int) -> np.ndarray:
    """beta_t = min(1 - f(t/T) / f((t-1)/T), MAX_BETA) for a continuous alpha_bar f."""
    grid = np.arange(T + 1, dtype=np.float64) / T
    alpha_bar = alpha_bar_fn(grid)
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], MAX_BETA)


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. 2020. The endpoints are given for T=1000 and scaled by 1000/T, so the
    total noise is (approximately) the same for every T (Nichol & Dhariwal 2021)."""
    scale = 1000.0 / T
    if scale * beta_end >= 1.0:
        raise ValueError(
            f"linear schedule with T={T}: beta_end * 1000/T = {scale * beta_end:g} "
            f">= 1; use T > {int(1000 * beta_end)} or another schedule"
        )
    return np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal 2021: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t + s)/(1 + s) * pi/2)."""

    def f(u):
        return np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    return _betas_from_alpha_bar(lambda u: f(u) / f(0.0), T)


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """Stable Diffusion's schedule: linear in sqrt(beta). Not rescaled with T (as in SD)."""
    return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=np.float64) ** 2


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> np.ndarray:
    """Sigmoid alpha_bar (Jabri et al. 2023; Chen 2023, "On the importance of noise
    scheduling"): alpha_bar(t) = (sig(end/tau) - sig((t(end-start)+start)/tau)) /
    (sig(end/tau) - sig(start/tau))."""

    def sig(z):
        return 1.0 / (1.0 + np.exp(-z))

    v_start, v_end = sig(start / tau), sig(end / tau)

    def alpha_bar(u):
        return (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)

    return _betas_from_alpha_bar(alpha_bar, T)


SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "scaled_linear": scaled_linear_betas,
    "sigmoid": sigmoid_betas,
}


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Alg. 1: shift and scale sqrt(alpha_bar) so that sqrt(alpha_bar_T)
    is exactly 0 while sqrt(alpha_bar_1) is kept."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


# --------------------------------------------------------------------------- schedule


def schedule_from_betas(betas: np.ndarray) -> NoiseSchedule:
    """All derived quantities of a beta sequence, in float64, stored as float32."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"betas must be a 1-D array of >= 2 steps, got shape {betas.shape}")
    if np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError("betas must lie in (0, 1]; check the schedule's options")
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    with np.errstate(divide="ignore"):
        log_snr = np.log(ab) - np.log1p(-ab)
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    # beta_tilde_1 = 0: use beta_tilde_2 in the log so it stays finite (as Ho et al.'s code).
    post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return NoiseSchedule(
        betas=f32(betas),
        alphas=f32(alphas),
        alphas_cumprod=f32(ab),
        alphas_cumprod_prev=f32(ab_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(ab)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ab)),
        log_snr=f32(log_snr),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_log_var),
        posterior_mean_coef1=f32(betas * np.sqrt(ab_prev) / (1.0 - ab)),
        posterior_mean_coef2=f32((1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)),
    )


def make_schedule(
    name: str, num_timesteps: int, *, zero_terminal_snr: bool = False, **options
) -> NoiseSchedule:
    """The named schedule for ``num_timesteps`` steps.

    ``options`` go to the schedule's beta function (e.g. ``s`` for cosine,
    ``beta_start``/``beta_end`` for linear). ``zero_terminal_snr`` rescales any schedule so
    alpha_bar_T == 0 (Lin et al. 2024; pair it with v-prediction).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {sorted(SCHEDULES)}")
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    try:
        betas = SCHEDULES[name](int(num_timesteps), **options)
    except TypeError as e:
        raise ValueError(f"bad options {options} for schedule {name!r}: {e}") from None
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return schedule_from_betas(betas)


def build(schedule_cfg) -> NoiseSchedule:
    """The schedule a config's ``schedule`` section names (``name``, ``num_timesteps``,
    ``zero_terminal_snr``): the one place configs become schedules, as
    ``models.build_model`` is for models."""
    return make_schedule(
        schedule_cfg.name,
        schedule_cfg.num_timesteps,
        zero_terminal_snr=schedule_cfg.zero_terminal_snr,
    )
