"""Which schedule indices a sampler visits: the step grids and RePaint's schedule.

``ddim_timesteps`` spaces ``num_steps`` indices over the T steps of a schedule (the
spacings in ``SPACINGS``); ``repaint_timesteps`` turns such a grid into RePaint's walk of
denoising and re-noising steps. Pure numpy on concrete numbers: a grid is made once per
call, outside jit, and handed to the samplers' scan as a traced array (see samplers.py).

Schedule indexing follows schedules.py: index ``t`` in 0..T-1 is the paper's step t+1,
and index -1 stands for the clean end of the chain, alpha_bar = 1.
"""

from __future__ import annotations

import operator

import jax
import numpy as np

from diffusion_jax.objectives import check_choice

SPACINGS = ("leading", "trailing", "linspace", "logsnr")

# Where the "logsnr" grid starts: lambda = log(alpha / sigma) >= LAMBDA_MIN. The cosine and
# sigmoid schedules clip their last beta to 0.999, so index T-1 alone sits far below its
# neighbour (T = 1000, cosine: lambda -9.9 at 999, -6.5 at 998, -5.1 at 995; sigmoid: -7.5
# at 999, -4.1 at 998; linear: -5.06 at 999, so it is unaffected). An eps-prediction model's
# data prediction x0 = (x - sigma eps) / alpha multiplies its eps error by sigma / alpha
# (2e4 at lambda -9.9, 160 at -5.1), and DPM-Solver++'s multistep update carries that x0
# into the next steps. -5.1 is the clip diffusers calls lambda_min_clipped for cosine
# models; DPM-Solver (Lu et al. 2022) likewise stops its cosine schedule short of t = 1.
LAMBDA_MIN = -5.1


def ddim_timesteps(
    num_timesteps: int,
    num_steps: int,
    spacing: str = "leading",
    log_snr=None,
    lambda_min: float = LAMBDA_MIN,
) -> np.ndarray:
    """The schedule indices a ``num_steps`` DDIM sampler visits, strictly descending, int32.

    With T = num_timesteps and n = num_steps:
      leading:  arange(0, T, T // n)[:n], reversed          (DDIM paper code, diffusers)
      trailing: round(T - arange(n) * T / n) - 1            (Lin et al. 2024)
      linspace: round(linspace(0, T - 1, n)), reversed
      logsnr:   uniform in lambda = log_snr / 2 from max(lambda(T-1), lambda_min) to
                lambda(0) (Lu et al. 2022, DPM-Solver's "logSNR" steps); needs the
                schedule's ``log_snr`` table. It starts at the largest index with
                lambda >= lambda_min (x_T ~ N(0, I) stands for x there; see LAMBDA_MIN),
                or at T-1 where lambda(T-1) = -inf (zero terminal SNR, where x_T is
                exact). lambda_min = -inf gives the whole range.
    (round is numpy's, half to even). After the last (smallest) index the sampler steps to
    alpha_bar = 1, i.e. clean x0, for every spacing.

    Pitfalls: for n < T "leading" never visits T-1 (its largest index is
    (n-1) * (T // n) <= T - T/n; 900 for T=1000, n=10), so it treats x_T ~ N(0, I) as a
    less noisy x_t than it is; "trailing" always starts at T-1 and fixes that. Trailing is often written
    round(arange(T, 0, -T/n)) - 1, but float arange can return n+1 points, the last one
    mapping to index -1 (T=1000: n = 61, 103, 121, ...); the closed form above always has n.
    Time-uniform spacings end with a long step in lambda (the linear schedule's lambda
    rises from 1.0 at index 111 to 4.6 at 0), where the multistep extrapolation of
    dpmpp_2m overshoots at 10-20 steps; "logsnr" spaces the steps evenly in lambda.
    """
    check_choice("spacing", spacing, SPACINGS)
    try:
        T, n = operator.index(num_timesteps), operator.index(num_steps)
    except TypeError:
        raise ValueError(
            f"num_timesteps and num_steps must be integers, got {num_timesteps!r} and {num_steps!r}"
        ) from None
    if not 1 <= n <= T:
        raise ValueError(f"num_steps must be in 1..{T} (the schedule's steps), got {n}")
    if spacing == "leading":
        ts = np.arange(0, T, T // n)[:n][::-1]
    elif spacing == "trailing":
        ts = np.round(T - np.arange(n) * (T / n)) - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, T - 1, n))[::-1]
    else:
        ts = _logsnr_timesteps(log_snr, T, n, lambda_min)
    return np.ascontiguousarray(ts, dtype=np.int32)


def low_start_warning(ts, log_snr, lambda_min: float = LAMBDA_MIN) -> str:
    """A warning for a grid ``ts`` whose first index has a finite lambda below
    ``lambda_min`` (see LAMBDA_MIN), else "". Only an eps-prediction model sampled without
    x0 clipping (latents) needs it: its x0 there multiplies its eps error by sigma / alpha.
    Time-uniform grids that start above the last index with lambda >= lambda_min do this
    on the cosine and sigmoid schedules: every "trailing" and "linspace" grid (they start
    at T-1), and "leading" beyond 200 steps of 1000 on cosine (first index > 995)."""
    lam = 0.5 * np.asarray(log_snr, np.float64)
    t0 = int(ts[0])
    if not (np.isfinite(lam[t0]) and lam[t0] < lambda_min):
        return ""
    ok = np.flatnonzero(np.isfinite(lam) & (lam >= lambda_min))
    return (
        f"the sampler's first step is schedule index {t0}, where lambda = log(alpha / "
        f"sigma) = {lam[t0]:.2f} < sampler.lambda_min = {lambda_min}: an eps-prediction "
        f"model's x0 there multiplies its error by sigma / alpha = {np.exp(-lam[t0]):.1e}, "
        f"and sampler.clip_x0 is off, so samples may fail. Start at index <= "
        f"{ok[-1] if ok.size else 0}: sampler.spacing=logsnr, or fewer leading steps"
    )


def _logsnr_timesteps(log_snr, T: int, n: int, lambda_min: float) -> np.ndarray:
    """The (rounded) indices at which lambda, linear between indices, takes n values
    uniform from the start's lambda to lambda(0), made strictly descending: near index 0
    lambda changes by ~0.3 per index (linear schedule), so for large n several targets
    round to one index; they are pushed apart by one index at a time, first upwards from
    0, then downwards from the start (possible while n <= start + 1)."""
    if log_snr is None:
        raise ValueError('spacing "logsnr" needs the schedule\'s log_snr table')
    try:
        lam = 0.5 * np.asarray(log_snr, np.float64)
    except jax.errors.TracerArrayConversionError:
        raise ValueError('spacing "logsnr" needs a concrete (not traced) schedule') from None
    if lam.shape != (T,):
        raise ValueError(f"log_snr has shape {lam.shape}, expected ({T},)")
    if np.isnan(lambda_min) or lambda_min > lam[0]:
        raise ValueError(
            f"sampler.lambda_min={lambda_min} leaves no step: the schedule's largest lambda "
            f"is {lam[0]:.3f}; lower it (-inf keeps the whole range)"
        )
    # Only lambdas >= lambda_min (finite ones): a zero-terminal-SNR step (lambda = -inf)
    # is visited first anyway.
    kept = np.isfinite(lam) & (lam >= lambda_min)
    lam_k, idx_k = lam[kept], np.arange(T)[kept]  # lambda descending in the index
    start = T - 1 if lam[-1] == -np.inf else int(idx_k[-1])
    if n > start + 1:
        raise ValueError(
            f"num_steps={n} needs {n} indices, but only {start + 1} have lambda >= "
            f"sampler.lambda_min={lambda_min}; use fewer steps or a lower lambda_min"
        )
    targets = np.linspace(lam_k[-1], lam_k[0], n)
    ts = np.round(np.interp(targets, lam_k[::-1], idx_k[::-1])).astype(np.int64)
    ts[0] = start
    for i in range(n - 2, -1, -1):
        ts[i] = max(ts[i], ts[i + 1] + 1)
    ts[0] = min(ts[0], start)
    for i in range(1, n):
        ts[i] = min(ts[i], ts[i - 1] - 1)
    return ts


def repaint_timesteps(ts: np.ndarray, jump_length: int, jump_n_sample: int):
    """RePaint's resampling schedule (Lugmayr et al. 2022, sec. 4.2) on the grid ``ts``.

    Positions p = n-1 .. 0 stand for ts[0] .. ts[n-1] and p = -1 for the clean end. The
    walk goes down one position at a time; the first jump_n_sample - 1 times it reaches
    each of p = 0, L, 2L, .. (L = jump_length, p < n - L) it jumps back up L positions
    (re-noising one interval at a time) and denoises them again. Returns
    (ts_from, ts_to) int32 [m]: a step denoises if ts_to < ts_from, else re-noises.
    jump_n_sample = 1 gives the plain schedule.
    """
    jump_length, jump_n_sample = operator.index(jump_length), operator.index(jump_n_sample)
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(
            f"jump_length and jump_n_sample must be >= 1, got {jump_length} and {jump_n_sample}"
        )
    n = len(ts)
    jumps = {p: jump_n_sample - 1 for p in range(0, n - jump_length, jump_length)}
    p, walk = n - 1, [n - 1]
    while p >= 0:
        p -= 1
        walk.append(p)
        if jumps.get(p, 0) > 0:
            jumps[p] -= 1
            for _ in range(jump_length):
                p += 1
                walk.append(p)
    level = np.append(np.asarray(ts, np.int32)[::-1], -1)  # level[p] = ts[n-1-p]; [-1] = -1
    idx = np.asarray(walk)
    return (
        np.ascontiguousarray(level[idx[:-1]], dtype=np.int32),
        np.ascontiguousarray(level[idx[1:]], dtype=np.int32),
    )
