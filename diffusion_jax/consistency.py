"""Consistency models on our discrete VP schedules: few-step generation by consistency
distillation of a trained diffusion model (Song et al. 2023; the latent consistency model
recipe of Luo et al. 2023 for discrete schedules).

The consistency function maps any point of a probability-flow trajectory to its start:

  f(x_t, t) = c_skip(t) x_t + c_out(t) x0_theta(x_t, t),
  c_skip(t) = s_d^2 / ((k t)^2 + s_d^2),  c_out(t) = k t / sqrt((k t)^2 + s_d^2),

with s_d = 0.5, k = 10 (LCM's timestep scaling) and x0_theta the network's x0 (from its
eps / x0 / v prediction, objectives.x0_eps_from_prediction). At index 0, c_skip = 1 and
c_out = 0 exactly: the boundary condition f(x, 0) = x holds for any network. The student
is initialised from the teacher and keeps its architecture and parameterisation.

Distillation (``make_distill_step``): on the grid ``ddim_timesteps(T, N, "trailing")``
(T-1, T-1-T/N, ..., T/N-1) an example draws a grid index t, x_t ~ q(x_t | x0), and the
teacher's deterministic DDIM step (guided at ``consistency.teacher_guidance`` for a
conditional teacher, a fixed scale the student learns; or, with
``consistency.teacher_guidance_max`` > 0, at a scale w drawn per example from
[teacher_guidance, teacher_guidance_max] that the student gets as an input, LCM's
guidance-conditioned variant: models/guidance_input.py) gives x_s at s, the next
grid index (0 after the last). The loss is the distance between f_theta(x_t, t) and f_target(x_s, s), the
target network being the EMA of theta (``optim.ema_decay``, LCM's 0.95) under
stop-gradient; with s = 0 the target is x_s itself (the boundary). Distance: pseudo-Huber
sqrt(|d|^2 + c^2) - c (Song & Dhariwal 2023, c = 0.00054 sqrt(dim) by default) or L2.
The target network's parameters are the run's EMA parameters, so sampling, grids and
in-loop metrics use it, like every run.

The parameterisation and sampling live with the samplers (step_rules.py:
``boundary_scalings``, ``consistency_output`` and the "consistency" rule: x0 = f(x_t, t),
then x0 noised to the next index, Song et al. 2023 Alg. 1).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import conditioning, guidance, objectives, steps
from diffusion_jax.schedules import NoiseSchedule
from diffusion_jax.step_rules import consistency_output, predict_x0_eps, sqrt_alpha_bar
from diffusion_jax.timesteps import ddim_timesteps

DISTANCES = ("pseudo_huber", "l2")
HUBER_C_PER_SQRT_DIM = 0.00054  # iCT (Song & Dhariwal 2023)


def grid(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The distillation grid, descending: ddim_timesteps(T, N, "trailing")."""
    return ddim_timesteps(num_timesteps, num_steps, "trailing")


def distance(pred, target, kind: str, huber_c: float = 0.0):
    """Per-example distance [B]: pseudo-Huber sqrt(|d|^2 + c^2) - c (c = 0.00054 sqrt(dim)
    unless ``huber_c`` > 0) or the mean squared error."""
    objectives.check_choice("consistency.distance", kind, DISTANCES)
    d = (pred - target).reshape(pred.shape[0], -1)
    if kind == "l2":
        return jnp.mean(d**2, axis=-1)
    c = huber_c or HUBER_C_PER_SQRT_DIM * math.sqrt(d.shape[-1])
    return jnp.sqrt(jnp.sum(d**2, axis=-1) + c**2) - c


def teacher_step(model_fn, schedule: NoiseSchedule, prediction: str, x_t, t, s):
    """The teacher's deterministic DDIM step from index t to s (eta = 0, no clipping)."""
    x0, eps = predict_x0_eps(model_fn, schedule, prediction, False, x_t, t)
    a_s, sig_s = sqrt_alpha_bar(schedule, s, x_t.ndim)
    return a_s * x0 + sig_s * eps


def consistency_fn(model, schedule: NoiseSchedule, prediction: str):
    """f(params, x_t, t, y): the model as a consistency function (no dropout)."""

    def f(params, x, t, y):
        out = model.apply({"params": params}, x, t, y, train=False)
        x0, _ = objectives.x0_eps_from_prediction(schedule, prediction, x, t, out)
        return consistency_output(x, t, x0)

    return f


def _example_draws(state, x0, axis_name):
    """Per-example keys (by global example id, as the diffusion step) and noise like x0."""
    rng = jax.random.fold_in(state.rng, state.step)
    ids = steps.global_example_ids(x0.shape[0], axis_name)
    keys = objectives.per_example_keys(rng, ids)
    noise = jax.vmap(lambda k, x: jax.random.normal(jax.random.fold_in(k, 1), x.shape))(keys, x0)
    return keys, noise


def _finish(state, loss, per_example, t, grads, tx, config, axis_name, means=None):
    bucket_sum, bucket_count = steps.loss_buckets(t, per_example, config.schedule.num_timesteps)
    sums = {"loss_bucket_sum": bucket_sum, "loss_bucket_count": bucket_count}
    return steps.finish_update(state, loss, grads, means or {}, tx, config.optim, axis_name, sums)


def make_distill_step(
    model, tx, schedule: NoiseSchedule, config, teacher_apply, *, axis_name: Optional[str] = None
):
    """``train_step(state, batch, teacher_params) -> (state, metrics)`` of consistency
    distillation.

    ``teacher_apply(params, x, t, y)`` is the frozen teacher's network. Its parameters
    are the step's third argument (the trainer binds them once, parallel.DataParallel's
    ``frozen``), not constants baked into the compiled program. Layout-independent like
    the diffusion step: every draw of an example is keyed by its global id.
    """
    cons, obj, model_cfg = config.consistency, config.objective, config.model
    conditional = conditioning.kind(model_cfg) != "none"
    ranged = cons.teacher_guidance_max > 0  # w per example, an input of the student
    grid_ts = grid(schedule.num_timesteps, cons.num_grid_steps)
    ts = jnp.asarray(grid_ts)
    ts_next = jnp.asarray(np.append(grid_ts[1:], 0).astype(np.int32))  # the boundary last
    f = consistency_fn(model, schedule, obj.prediction)

    def teacher_fn(teacher_params, y, w):
        if not conditional:
            return functools.partial(teacher_apply, teacher_params, y=None)
        null = conditioning.null_like(model_cfg, y)
        return guidance.guided_model_fn(
            teacher_apply, teacher_params, y, null, w, schedule=schedule, prediction=obj.prediction
        )

    def guidance_scales(keys):
        """(teacher scale, student condition maker): fixed, or uniform per example."""
        if not ranged:
            return cons.teacher_guidance, lambda y: y
        lo, hi = cons.teacher_guidance, cons.teacher_guidance_max
        w = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2), (), jnp.float32))(keys)
        w = lo + (hi - lo) * w
        return w, lambda y: {"y": y, "w": w}

    def train_step(state, batch, teacher_params):
        x0 = batch["image"]
        keys, noise = _example_draws(state, x0, axis_name)
        n = jax.vmap(lambda k: jax.random.randint(k, (), 0, ts.shape[0]))(keys)
        t, s = ts[n], ts_next[n]
        y = conditioning.from_batch(model_cfg, batch)
        w, student_condition = guidance_scales(keys)
        x_t = objectives.q_sample(schedule, x0, t, noise)
        x_s = jax.lax.stop_gradient(
            teacher_step(teacher_fn(teacher_params, y, w), schedule, obj.prediction, x_t, t, s)
        )
        y = student_condition(y)
        target = jax.lax.stop_gradient(f(state.ema_params, x_s, s, y))

        def loss_fn(params):
            per_example = distance(f(params, x_t, t, y), target, cons.distance, cons.huber_c)
            return jnp.mean(per_example), per_example

        (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return _finish(state, loss, per_example, t, grads, tx, config, axis_name)

    return train_step


# ----------------------------------------------------------------------------------------
# Consistency training (no teacher): iCT (Song & Dhariwal 2023) on the discrete schedule.

CT_S0, CT_S1 = 10, 1280  # the discretisation curriculum: N doubles from s0 up to s1
P_MEAN, P_STD = -1.1, 2.0  # lognormal distribution of the noise level sigma (EDM's)


def ct_curriculum(num_timesteps: int, num_train_steps: int):
    """(updates per stage K', grid sizes [N_0, N_1, ...]): N doubles from 10 up to
    min(1280, T) in equal stages of training (iCT's exponential curriculum)."""
    s1 = min(CT_S1, num_timesteps)
    sizes = [min(CT_S0 * 2**k, s1) for k in range(int(math.log2(s1 / CT_S0)) + 2)]
    sizes = sorted(set(sizes))
    return max(1, num_train_steps // len(sizes)), sizes


def ct_tables(schedule: NoiseSchedule, sizes):
    """Per stage, padded to the largest grid: (t_hi, t_lo, weight, log-probability) of the
    adjacent grid pairs. sigma = sqrt((1 - ab) / ab) is the EDM noise level of an index;
    a pair (sigma_lo, sigma_hi) is drawn with the lognormal mass between its ends (iCT's
    discretised lognormal) and weighted 1 / (sigma_hi - sigma_lo)."""
    ab = np.asarray(schedule.alphas_cumprod, np.float64)
    sigma = np.sqrt((1.0 - ab) / ab)
    width = max(sizes)
    hi, lo = np.zeros((len(sizes), width), np.int32), np.zeros((len(sizes), width), np.int32)
    weight = np.zeros((len(sizes), width), np.float32)
    logp = np.full((len(sizes), width), -np.inf, np.float32)
    for k, n in enumerate(sizes):
        g = grid(schedule.num_timesteps, n)
        g_lo = np.append(g[1:], 0)
        cdf = [math.erf((math.log(sig) - P_MEAN) / (math.sqrt(2.0) * P_STD)) for sig in sigma]
        mass = np.array([cdf[a] - cdf[b] for a, b in zip(g, g_lo)]) + 1e-12
        hi[k, :n], lo[k, :n] = g, g_lo
        weight[k, :n] = 1.0 / np.maximum(sigma[g] - sigma[g_lo], 1e-12)
        logp[k, :n] = np.log(mass / mass.sum())
    return hi, lo, weight, logp


def make_ct_step(model, tx, schedule: NoiseSchedule, config, *, axis_name: Optional[str] = None):
    """``train_step(state, batch) -> (state, metrics)`` of consistency training: the same
    noise z gives x at two adjacent grid indices; the loss is weight * distance(f_theta(
    x_hi, t_hi), stop_gradient(f_theta(x_lo, t_lo))) (no target network, as iCT)."""
    cons, obj = config.consistency, config.objective
    per_stage, sizes = ct_curriculum(schedule.num_timesteps, config.train.num_steps)
    hi, lo, weight, logp = (jnp.asarray(a) for a in ct_tables(schedule, sizes))
    f = consistency_fn(model, schedule, obj.prediction)

    def train_step(state, batch):
        x0 = batch["image"]
        keys, noise = _example_draws(state, x0, axis_name)
        stage = jnp.minimum(state.step // per_stage, len(sizes) - 1)
        i = jax.vmap(lambda k: jax.random.categorical(k, logp[stage]))(keys)
        t_hi, t_lo = hi[stage, i], lo[stage, i]
        y = conditioning.from_batch(config.model, batch)
        x_hi = objectives.q_sample(schedule, x0, t_hi, noise)
        x_lo = objectives.q_sample(schedule, x0, t_lo, noise)
        target = jax.lax.stop_gradient(f(state.params, x_lo, t_lo, y))

        def loss_fn(params):
            d = distance(f(params, x_hi, t_hi, y), target, cons.distance, cons.huber_c)
            per_example = weight[stage, i] * d
            return jnp.mean(per_example), per_example

        (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        means = {"ct_grid_size": jnp.asarray(sizes, jnp.float32)[stage]}
        return _finish(state, loss, per_example, t_hi, grads, tx, config, axis_name, means)

    return train_step


MODES = ("", "distill", "train")


def check_config(config) -> None:
    """consistency.* of a run: the mode; for distillation, a teacher workdir with a
    checkpoint and the student's model, schedule and prediction. A ValueError names the
    first problem."""
    cons = config.consistency
    objectives.check_choice("consistency.mode", cons.mode, MODES)
    _check_guidance_input(config)
    if not cons.mode:
        return
    objectives.check_choice("consistency.distance", cons.distance, DISTANCES)
    if cons.mode == "train":
        if cons.teacher:
            raise ValueError(
                "consistency.mode=train trains without a teacher: unset consistency.teacher"
            )
        return
    if not cons.teacher:
        raise ValueError("consistency.mode=distill needs consistency.teacher=WORKDIR")
    if not 1 <= cons.num_grid_steps <= config.schedule.num_timesteps:
        raise ValueError(
            f"consistency.num_grid_steps={cons.num_grid_steps} must be in "
            f"1..{config.schedule.num_timesteps}"
        )
    check_teacher(config)


def _check_guidance_input(config) -> None:
    """model.guidance_input and consistency.teacher_guidance_max go together: the scale
    input is learned only by distilling a conditional teacher over a range of scales."""
    cons = config.consistency
    ranged = cons.get("teacher_guidance_max", 0.0) > 0
    embedded = bool(config.model.get("guidance_input", False))
    if ranged and not (cons.mode == "distill" and embedded):
        raise ValueError(
            "consistency.teacher_guidance_max > 0 distils over a range of guidance scales "
            "into a student that takes the scale as an input: set consistency.mode=distill "
            "and model.guidance_input=True"
        )
    if embedded and not ranged:
        raise ValueError(
            "model.guidance_input=True: the scale input is learned by consistency "
            "distillation over a range of scales; set consistency.mode=distill and "
            "consistency.teacher_guidance_max > consistency.teacher_guidance"
        )
    if ranged:
        if conditioning.kind(config.model) == "none":
            raise ValueError(
                "consistency.teacher_guidance_max > 0 needs a conditional teacher (class "
                "labels or captions): an unconditional model has no guidance"
            )
        if cons.teacher_guidance_max <= cons.teacher_guidance:
            raise ValueError(
                f"consistency.teacher_guidance_max={cons.teacher_guidance_max} must exceed "
                f"consistency.teacher_guidance={cons.teacher_guidance} (the range's low end)"
            )


def check_teacher(config) -> None:
    """The teacher workdir has a checkpoint and the student's model, schedule and
    prediction (ValueError naming the first difference)."""
    from diffusion_jax import adapters

    adapters.check_same_model(config, config.consistency.teacher, "consistency.teacher")


def load_teacher(config):
    """(apply(params, x, t, y), EMA params) of the teacher workdir, read once per process
    (the run's initial parameters and its train step both need them)."""
    return _teacher(os.path.abspath(config.consistency.teacher))


@functools.lru_cache(maxsize=1)
def _teacher(path: str):
    from diffusion_jax import workdir

    model, _, state = workdir.load_state(path, workdir.load_config(path))

    def apply(params, x, t, y):
        return model.apply({"params": params}, x, t, y, train=False)

    return apply, state.ema_params


__all__ = (
    "MODES",
    "check_config",
    "check_teacher",
    "consistency_fn",
    "ct_curriculum",
    "ct_tables",
    "distance",
    "grid",
    "load_teacher",
    "make_ct_step",
    "make_distill_step",
    "teacher_step",
)
