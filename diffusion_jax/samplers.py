"""Samplers, each one ``lax.scan`` in one jit.

Samplers (``SAMPLERS``): DDPM ancestral sampling, DDIM, Euler and Heun in the sense of
Karras et al. 2022 (EDM), and DPM-Solver++(2M) with its SDE variant (Lu et al. 2022),
all on the discrete schedule of schedules.py, over the timesteps of timesteps.py. Built on
the same scan: editing.py (img2img, inpainting, DDIM inversion); a model_fn transform:
guidance.py (classifier-free guidance).

The model is any callable ``model_fn(x_t, t) -> output`` with ``t`` int32 [B] schedule
indices and ``output`` of kind ``prediction`` (eps, x0 or v; see objectives.py), so a
network, a guided wrapper or an analytic oracle plug in the same way. Shapes are [B, ...]
(NHWC images in practice). A learned-variance model's output has 2C channels (variance.py):
every sampler uses the first C, and DDPM with variance "learned" also the last C.

Compiling once. The visited timesteps are arrays passed to one jitted scan as traced
arguments, like the schedule, x_T, the RNG keys and eta. A new ``num_steps`` changes only
the scan length: the body is traced and compiled once whatever the length, so compile
time does not grow with the number of steps, and a new eta, rng, x_T, input image, mask
or guidance scale never recompiles. ``model_fn`` is part of the jit cache key: a plain
function counts by identity (reuse the same object), and anything it closes over is
baked into the program as a constant. To pass network parameters as traced arrays (no
recompile when they change), give ``jax.tree_util.Partial(apply_fn, params)``; its
arguments are pytree leaves (``guidance.guided_model_fn`` returns such a Partial).

One step rule per sampler (step_rules.py, registry ``RULES``), ``rule(predict, schedule,
x, t, t_prev, key, aux, eta) -> (x, aux)``, from index t to t_prev. Everything else (the scan, RNG, trajectories, inpainting's known-pixel replacement, RePaint's
re-noising steps) is shared by all rules in ``_scan_sample``. ``plan``, ``start`` and
``run`` (with ``as_pytree_fn``, ``replace_known`` and ``sqrt_alpha_bar``) are the seam
that editing.py builds on: a sampler's steps, its x_T and keys, and the scan.

RNG. ``rng`` splits into (rng_xT, rng_steps); x_T ~ N(0, I) is drawn from rng_xT unless
given, and step i (in visiting order) draws its noise from ``split(rng_steps, n)[i]``.
DDPM and DDIM draw identically, so DDIM with eta=1 over all T steps reproduces DDPM with
the posterior variance ("fixedsmall") sample by sample (Song et al. 2021, sec. 4.1).

Schedule indexing follows schedules.py: index ``t`` in 0..T-1 is the paper's step t+1,
and index -1 stands for the clean end of the chain, alpha_bar = 1. Every sampler steps
from its smallest visited index to -1 with a first-order (DDIM / x0-prediction) step.
"""

from __future__ import annotations

import functools
import numbers
import operator
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import step_rules
from diffusion_jax.objectives import PREDICTIONS, check_choice
from diffusion_jax.schedules import NoiseSchedule
from diffusion_jax.step_rules import RULES, normal, ratio_var, sqrt_alpha_bar
from diffusion_jax.timesteps import LAMBDA_MIN, ddim_timesteps
from diffusion_jax.variance import FIXED, LEARNED

SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "consistency")
VARIANCES = FIXED  # DDPM's fixed variances; all of DDPM's, with the model's own:
DDPM_VARIANCES = VARIANCES + (LEARNED,)
# What the sample CLI / steps.make_sample_fn can do with a trained model (editing.py).
MODES = ("sample", "img2img", "inpaint", "invert")

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


# --------------------------------------------------------------------------- timesteps
# The grids themselves (spacings, RePaint's walk) are in timesteps.py.


def ddpm_num_steps(num_timesteps: int, respacing: int = 0) -> int:
    """Steps of the ddpm sampler: all T, or ``respacing`` in 1..T (improved DDPM sec. 4)."""
    if isinstance(respacing, bool) or not 0 <= int(respacing) <= num_timesteps:
        raise ValueError(
            f"respacing={respacing!r} must be 0 (all {num_timesteps} steps) or a step "
            f"count in 1..{num_timesteps}"
        )
    return int(respacing) or num_timesteps


def sampler_timesteps(
    sampler: str,
    num_timesteps: int,
    num_steps: int,
    spacing: str = "leading",
    log_snr=None,
    respacing: int = 0,
    lambda_min: float = LAMBDA_MIN,
) -> np.ndarray:
    """The descending indices ``sampler`` visits: for ddpm all T, or with ``respacing``
    the ``ddim_timesteps`` grid of that many steps; for the others ddim_timesteps."""
    check_choice("sampler", sampler, SAMPLERS)
    if sampler == "ddpm":
        n = ddpm_num_steps(num_timesteps, respacing)
        if n == num_timesteps:
            return np.arange(num_timesteps - 1, -1, -1, dtype=np.int32)
        return ddim_timesteps(num_timesteps, n, spacing, log_snr, lambda_min)
    return ddim_timesteps(num_timesteps, num_steps, spacing, log_snr, lambda_min)


def num_function_evals(sampler: str, num_steps: int, num_timesteps: int, respacing: int = 0) -> int:
    """Network evaluations (NFE) of one sample: Heun evaluates twice per step except the
    last (which ends at alpha_bar = 1 and is an Euler step); the others once per step.
    Guidance doubles the batch of each evaluation, not the count."""
    check_choice("sampler", sampler, SAMPLERS)
    n = ddpm_num_steps(num_timesteps, respacing) if sampler == "ddpm" else num_steps
    return 2 * n - 1 if sampler == "heun" else n


# --------------------------------------------------------------------------- the scan


def _renoise(schedule, x, t, t_up, key):
    """x_{t_up} ~ q(x_{t_up} | x_t) = N(sqrt(ab_up / ab) x_t, (1 - ab_up / ab) I), t_up > t."""
    a, s = sqrt_alpha_bar(schedule, t, x.ndim)
    a_up, s_up = sqrt_alpha_bar(schedule, t_up, x.ndim)
    return (a_up / a) * x + jnp.sqrt(ratio_var(a, s, a_up, s_up)) * normal(key, x.shape, x.dtype)


def replace_known(schedule, x, known, mask, t, key):
    """Inpainting by replacement: the known pixels (mask = 1) become a fresh draw of
    q(x_t | known); at t = -1 exactly ``known``."""
    a, s = sqrt_alpha_bar(schedule, t, x.ndim)
    known_t = a * known + s * normal(key, x.shape, x.dtype)
    return mask * known_t + (1.0 - mask) * x


@functools.partial(
    jax.jit, static_argnames=("update", "prediction", "clip_x0", "return_every", "renoise")
)
def _scan_sample(
    model_fn,
    schedule,
    x_T,
    ts,
    ts_prev,
    keys,
    eta,
    known=None,
    mask=None,
    *,
    update,
    prediction,
    clip_x0,
    return_every,
    renoise=False,
):
    """Run rule ``update`` over the steps ts[i] -> ts_prev[i] (int32 [n], traced) from x_T,
    step i drawing from keys[i].

    model_fn is a jax.tree_util.Partial (a pytree: its function is static, its bound
    arguments traced). With ``known`` and ``mask`` (inpainting) the known pixels are
    replaced after every denoising step (noise from fold_in(keys[i], 1)). With renoise,
    steps with ts_prev > ts re-noise instead (RePaint) and reset a multistep history. With
    return_every = k > 0 a nested scan (n // k chunks of k steps, each emitting its last
    x, then the n % k remaining steps) returns the trajectory [n // k, *x.shape] without
    storing every step.
    """
    batch, rule = x_T.shape[0], RULES[update]
    predict = functools.partial(step_rules.predict_x0_eps, model_fn, schedule, prediction, clip_x0)

    def denoise(x, aux, t, t_prev, key):
        x, aux = rule.step(predict, schedule, x, t, t_prev, key, aux, eta)
        if known is not None:
            x = replace_known(schedule, x, known, mask, t_prev, jax.random.fold_in(key, 1))
        return x.astype(x_T.dtype), aux

    def up(x, aux, t, t_prev, key):
        del aux
        return _renoise(schedule, x, t, t_prev, key).astype(x_T.dtype), rule.init(x)

    def step(carry, inputs):
        t0, t_prev0, key = inputs
        t = jnp.full((batch,), t0, jnp.int32)
        t_prev = jnp.full((batch,), t_prev0, jnp.int32)
        if renoise:
            carry = jax.lax.cond(t_prev0 > t0, up, denoise, *carry, t, t_prev, key)
        else:
            carry = denoise(*carry, t, t_prev, key)
        return carry, None

    n = ts.shape[0]
    steps = (ts, ts_prev, keys)
    carry = (x_T, rule.init(x_T))
    if not return_every:
        return jax.lax.scan(step, carry, steps)[0][0]

    def chunk(carry, inputs):
        carry = jax.lax.scan(step, carry, inputs)[0]
        return carry, carry[0]

    m = n // return_every
    head = jax.tree.map(
        lambda a: a[: m * return_every].reshape((m, return_every) + a.shape[1:]), steps
    )
    tail = jax.tree.map(lambda a: a[m * return_every :], steps)
    carry, traj = jax.lax.scan(chunk, carry, head)
    return jax.lax.scan(step, carry, tail)[0][0], traj


# --------------------------------------------------------------------------- public API
# plan, start and run (with as_pytree_fn, replace_known, sqrt_alpha_bar) are also the seam
# editing.py builds on; sample and its two shorthands are the samplers proper.


def as_pytree_fn(model_fn) -> jax.tree_util.Partial:
    """model_fn as the jax.tree_util.Partial the scans take (a Partial is kept as is)."""
    return (
        model_fn if isinstance(model_fn, jax.tree_util.Partial) else jax.tree_util.Partial(model_fn)
    )


def plan(
    sampler: str,
    schedule: NoiseSchedule,
    num_steps,
    spacing: str,
    variance: str,
    eta,
    respacing: int = 0,
    lambda_min: float = LAMBDA_MIN,
):
    """(descending timesteps, rule name for ``run``'s update) of a sampler, with its options
    checked (``respacing``: ddpm only, see ``sampler_timesteps``; ``lambda_min``: where a
    "logsnr" grid starts, see timesteps.LAMBDA_MIN)."""
    check_choice("sampler", sampler, SAMPLERS)
    if sampler == "ddpm":
        check_choice("variance", variance, DDPM_VARIANCES)
    if sampler == "ddim" and isinstance(eta, numbers.Real) and not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    ts = sampler_timesteps(
        sampler, schedule.num_timesteps, num_steps, spacing, schedule.log_snr, respacing, lambda_min
    )
    return ts, (variance if sampler == "ddpm" else sampler)


def run(
    model_fn,
    schedule,
    x_start,
    ts,
    ts_prev,
    keys,
    eta,
    *,
    update,
    prediction,
    clip_x0,
    return_every=0,
    known=None,
    mask=None,
    renoise=False,
):
    """Check the options and run ``_scan_sample`` from x_start over ts -> ts_prev (default:
    each next index of ts, then -1), step i drawing from keys[i]."""
    check_choice("prediction", prediction, PREDICTIONS)
    if operator.index(return_every) < 0:
        raise ValueError(f"return_every must be >= 0, got {return_every}")
    if ts_prev is None:
        ts_prev = np.append(ts[1:], -1).astype(np.int32)
    return _scan_sample(
        as_pytree_fn(model_fn),
        schedule,
        x_start,
        jnp.asarray(ts),
        jnp.asarray(ts_prev),
        keys,
        jnp.asarray(eta, jnp.float32),
        known,
        mask,
        update=update,
        prediction=prediction,
        clip_x0=bool(clip_x0),
        return_every=int(return_every),
        renoise=renoise,
    )


def start(rng, shape, x_T, n):
    """(x_T, per-step keys [n]) as documented in the module docstring."""
    rng_xT, rng_steps = jax.random.split(rng)
    if x_T is None:
        x_T = normal(rng_xT, tuple(shape))
    else:
        x_T = jnp.asarray(x_T)
        if x_T.shape != tuple(shape):
            raise ValueError(f"x_T has shape {x_T.shape}, expected {tuple(shape)}")
    return x_T, jax.random.split(rng_steps, n)


def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    rng,
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    num_steps: int = 50,
    eta=0.0,
    spacing: str = "leading",
    variance: str = "fixedlarge",
    respacing: int = 0,
    lambda_min: float = LAMBDA_MIN,
    prediction: str = "eps",
    clip_x0: bool = False,
    x_T: Optional[jnp.ndarray] = None,
    return_every: int = 0,
):
    """Sample [*shape] with the named sampler (one of ``SAMPLERS``) -> x0.

    ddpm runs all T steps with ``variance`` (with ``respacing`` = N: N steps of the
    respaced chain on the ``spacing`` grid, Nichol & Dhariwal 2021 sec. 4); the others visit
    ``ddim_timesteps(T, num_steps, spacing)``. eta is DDIM's (0 = deterministic; may be
    traced); euler, heun and dpmpp_2m are deterministic ODE solvers, dpmpp_2m_sde is
    stochastic with the reverse SDE's own noise (eta unused). With return_every = k > 0
    returns (x0, traj), traj[i] = x after (i + 1) * k steps.
    """
    ts, update = plan(sampler, schedule, num_steps, spacing, variance, eta, respacing, lambda_min)
    x_T, keys = start(rng, shape, x_T, len(ts))
    return run(
        model_fn,
        schedule,
        x_T,
        ts,
        None,
        keys,
        eta,
        update=update,
        prediction=prediction,
        clip_x0=clip_x0,
        return_every=return_every,
    )


def ddpm_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    rng,
    shape: Sequence[int],
    *,
    prediction: str = "eps",
    variance: str = "fixedlarge",
    respacing: int = 0,
    spacing: str = "leading",
    clip_x0: bool = False,
    x_T: Optional[jnp.ndarray] = None,
    return_every: int = 0,
):
    """Ancestral sampling (Ho et al. 2020, Alg. 2) -> x0 [*shape], over all T steps or,
    with ``respacing`` = N, over N steps of the respaced chain (Nichol & Dhariwal 2021,
    sec. 4) on ``ddim_timesteps(T, N, spacing)`` (their "250" is spacing "linspace").

    variance: "fixedlarge" (sigma^2 = beta_t, Ho et al.'s CIFAR-10 choice), "fixedsmall"
    (sigma^2 = beta_tilde_t, the true posterior variance) or "learned" (the model's own,
    from its variance channels; Nichol & Dhariwal 2021), each of the respaced chain's betas
    when respaced. The mean is the posterior's with the x0 implied by the model (clipped
    to [-1, 1] if clip_x0). With return_every = k > 0 returns (x0, traj), traj[i] = x after
    (i + 1) * k steps.
    """
    return sample(
        model_fn,
        schedule,
        rng,
        shape,
        sampler="ddpm",
        variance=variance,
        respacing=respacing,
        spacing=spacing,
        prediction=prediction,
        clip_x0=clip_x0,
        x_T=x_T,
        return_every=return_every,
    )


def ddim_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    rng,
    shape: Sequence[int],
    *,
    num_steps: int,
    eta=0.0,
    prediction: str = "eps",
    spacing: str = "leading",
    clip_x0: bool = False,
    x_T: Optional[jnp.ndarray] = None,
    return_every: int = 0,
):
    """DDIM (Song et al. 2021, eq. 12) over ``ddim_timesteps(T, num_steps, spacing)`` -> x0.

    eta in [0, 1] scales the per-step noise: 0 is the deterministic sampler, 1 over all T
    steps is DDPM with beta_tilde. eta may be a traced array (changing it never
    recompiles). return_every as in ddpm_sample.
    """
    return sample(
        model_fn,
        schedule,
        rng,
        shape,
        sampler="ddim",
        num_steps=num_steps,
        eta=eta,
        spacing=spacing,
        prediction=prediction,
        clip_x0=clip_x0,
        x_T=x_T,
        return_every=return_every,
    )
