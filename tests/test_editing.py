"""Classifier-free guidance, img2img (SDEdit), inpainting (replacement, RePaint) and
DDIM-inversion editing, against class-conditional Gaussian oracles (tests/oracles.py).

The conditional oracle: x0 | y ~ N(MUS[y], SD^2) for y in {0, 1}; the null label NULL is
the 50/50 mixture of both, so guidance has an exact unconditional model to reduce to.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import editing, guidance, samplers, steps, timesteps

from oracles import (
    AB,
    SCHED,
    T,
    check_moments,
    coefs,
    exact_ode,
    gaussian_eps,
    gaussian_eps_at,
    leading,
    mixture_eps,
    pairs,
    propagate,
)

MUS, SD, NULL = (-0.5, 0.5), 0.3, 2
PARAMS = {"mu": jnp.asarray(MUS, jnp.float32)}
UNCOND = mixture_eps((0.5, 0.5), MUS, (SD, SD))  # one object: jit caches hit
MU, S = 0.3, 0.5  # the single-Gaussian oracle of the inpainting / img2img tests


def class_apply(params, x, t, y):
    """apply_fn(params, x_t, t, y): the exact eps-predictor of x0 | y ~ N(params["mu"][y],
    SD^2), and of the mixture for y = NULL."""
    mu = params["mu"][jnp.minimum(y, 1)].reshape(y.shape + (1,) * (x.ndim - 1))
    return jnp.where((y == NULL).reshape(mu.shape), UNCOND(x, t), gaussian_eps_at(x, t, mu, SD))


def cond_only(labels, x, t):
    return class_apply(PARAMS, x, t, labels)


def conditional(labels):
    return jax.tree_util.Partial(cond_only, labels)


def guided(scale, labels, apply_fn=class_apply, params=PARAMS, **kw):
    return guidance.guided_model_fn(
        apply_fn, params, labels, jnp.full_like(labels, NULL), scale, schedule=SCHED, **kw
    )


def rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


# --------------------------------------------------------------------------- guidance

LABELS = jnp.arange(8) % 2
SHAPE = (8, 2, 2, 1)


def _sample(model_fn, sampler, rng=1):
    return samplers.sample(
        model_fn, SCHED, jax.random.key(rng), SHAPE, sampler=sampler, num_steps=10, eta=0.5
    )


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_guidance_scale_0_and_1_are_the_unguided_samplers(sampler):
    # w c + (1 - w) u is exactly u at w = 0 and c at w = 1 and the oracle is elementwise,
    # yet not equal to the last bit: XLA vectorizes the mixture's exp/log differently for
    # the doubled batch (measured max 6e-7 after 1000 DDPM steps). 2e-6; a weight 1e-3 off
    # moves the outputs by > 1e-3.
    np.testing.assert_allclose(
        _sample(guided(0.0, LABELS), sampler), _sample(UNCOND, sampler), atol=2e-6, rtol=0
    )
    np.testing.assert_allclose(
        _sample(guided(1.0, LABELS), sampler),
        _sample(conditional(LABELS), sampler),
        atol=2e-6,
        rtol=0,
    )
    assert not np.allclose(
        _sample(guided(3.0, LABELS), sampler), _sample(guided(1.0, LABELS), sampler)
    )


def test_guidance_scale_params_and_labels_never_retrace():
    traced_once = chex.assert_max_traces(class_apply, n=1)
    outs = [
        _sample(guided(w, labels, apply_fn=traced_once, params=params), "dpmpp_2m")
        for w, labels, params in (
            (1.0, LABELS, PARAMS),
            (4.0, LABELS, PARAMS),
            (jnp.float32(0.5), 1 - LABELS, PARAMS),
            (2.0, LABELS, {"mu": PARAMS["mu"] + 1}),
        )
    ]
    assert all(not np.allclose(a, b) for a, b in zip(outs, outs[1:]))


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, 7.0, "per-example"])
def test_guided_prediction_is_w_cond_minus_w_minus_1_uncond(w):
    """One model call: guided(x_t, t) = w * cond - (w - 1) * uncond, with cond and uncond
    from calling the model directly with the labels and with the null label."""
    x_t = 1.5 * jax.random.normal(jax.random.key(20), SHAPE)
    t = jnp.asarray([0, 3, 50, 200, 400, 600, 850, 999], jnp.int32)  # a different t each
    if w == "per-example":  # a [B] scale: each example its own w
        w = np.asarray([0.0, 1.0, 2.5, 7.0, 7.0, 2.5, 1.0, 0.0], np.float32)
    wb = np.reshape(w, (-1, 1, 1, 1)) if np.ndim(w) else w
    cond = np.asarray(class_apply(PARAMS, x_t, t, LABELS), np.float64)
    uncond = np.asarray(class_apply(PARAMS, x_t, t, jnp.full_like(LABELS, NULL)), np.float64)
    # every example differs somewhere (near t = 0 the mixture is one class at many x)
    assert np.abs(cond - uncond).reshape(8, -1).max(axis=1).min() > 3e-3
    out = np.asarray(guided(w, LABELS)(x_t, t), np.float64)
    # float32 rounding only: the guided fn evaluates the (elementwise) oracle on the doubled
    # batch, which XLA may vectorize differently (about 1 ulp of cond and of uncond), then
    # w c + (1 - w) u in float32 (an ulp or two more): 4 ulps of the terms' magnitudes
    # (measured <= 0.45 ulp). Swapped cond/uncond is off by |2w - 1| |c - u|, w (c - u) by |u|.
    tol = 4 * np.finfo(np.float32).eps * (np.abs(wb * cond) + np.abs((wb - 1) * uncond))
    err = np.abs(out - (wb * cond - (wb - 1) * uncond))
    assert np.all(err <= tol), (err.max(), tol[err > tol])


def test_guided_samples_move_away_from_the_other_class():
    x = _sample(guided(3.0, LABELS), "ddim")
    c = _sample(conditional(LABELS), "ddim")
    ones = np.asarray(LABELS) == 1
    # guidance extrapolates away from the mixture: class-1 samples get larger, class 0 smaller
    assert x[ones].mean() > c[ones].mean() + 0.1 and x[~ones].mean() < c[~ones].mean() - 0.1


def test_guidance_interval_and_rescale():
    x_t = jax.random.normal(jax.random.key(2), SHAPE)
    t = jnp.full((8,), 500, jnp.int32)
    cond = conditional(LABELS)(x_t, t)
    # outside the interval: the plain conditional model, at any scale
    np.testing.assert_array_equal(guided(5.0, LABELS, interval=(0, 499))(x_t, t), cond)
    np.testing.assert_array_equal(
        guided(5.0, LABELS, interval=(500, 999))(x_t, t), guided(5.0, LABELS)(x_t, t)
    )
    # rescale 1: the guided x0 has exactly the conditional x0's per-example std (Lin et al.
    # 2024); rescale 0: plain guidance. 1e-6: float32 rounding of the x0 <-> eps round trip.
    a, s = coefs(x_t, t)
    x0_of = lambda eps: (x_t - s * eps) / a
    std = lambda x0: np.std(np.asarray(x0).reshape(8, -1), axis=1)
    out = guided(5.0, LABELS, rescale=1.0)(x_t, t)
    np.testing.assert_allclose(std(x0_of(out)), std(x0_of(cond)), rtol=1e-5)
    assert not np.allclose(std(x0_of(guided(5.0, LABELS)(x_t, t))), std(x0_of(cond)), rtol=0.01)
    np.testing.assert_allclose(
        guided(5.0, LABELS, rescale=0.0)(x_t, t), guided(5.0, LABELS)(x_t, t), atol=1e-6
    )
    with pytest.raises(ValueError, match="schedule"):
        guidance.guided_model_fn(class_apply, PARAMS, LABELS, LABELS, 2.0, rescale=0.5)


# --------------------------------------------------------------------------- img2img


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "heun", "dpmpp_2m_sde"])
def test_img2img_strength_limits(sampler):
    model_fn, rng = gaussian_eps(MU, S), jax.random.key(3)
    x0 = jax.random.uniform(jax.random.key(4), SHAPE, minval=-1, maxval=1)
    kw = dict(sampler=sampler, num_steps=10, eta=0.5)
    np.testing.assert_array_equal(editing.img2img(model_fn, SCHED, rng, x0, strength=0.0, **kw), x0)
    # strength 1 draws the same x_T and step noise as sampling from noise
    np.testing.assert_array_equal(
        editing.img2img(model_fn, SCHED, rng, x0, strength=1.0, **kw),
        samplers.sample(model_fn, SCHED, rng, SHAPE, **kw),
    )
    with pytest.raises(ValueError, match="strength"):
        editing.img2img(model_fn, SCHED, rng, x0, strength=1.5, **kw)


def test_img2img_noises_to_the_level_of_its_first_step():
    """strength 0.5 of 20 DDIM steps: x0 = c noised to the 11th step's level, then 10
    deterministic steps; the output law follows exactly from the oracle."""
    c, shape = 1.2, (12_500, 2, 2, 1)
    x = editing.img2img(
        gaussian_eps(MU, S),
        SCHED,
        jax.random.key(5),
        jnp.full(shape, c),
        strength=0.5,
        num_steps=20,
    )
    ts = leading(20)[10:]
    _, _, gain, offset = propagate(pairs(ts), MU, S, "ddim")  # output = gain * x_start + offset
    a2 = AB[ts[0]]
    check_moments(x, gain * np.sqrt(a2) * c + offset, gain**2 * (1 - a2), "img2img 0.5")


# --------------------------------------------------------------------------- inpainting

IMG = (16, 4, 4, 1)
TOP = np.concatenate([np.ones((2, 4, 1)), np.zeros((2, 4, 1))]).astype(np.float32)  # 1 = known


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_inpaint_keeps_known_pixels_and_leaves_independent_ones_alone(sampler):
    model_fn, rng = gaussian_eps(MU, S), jax.random.key(6)
    known = jax.random.uniform(jax.random.key(7), IMG, minval=-1, maxval=1)
    kw = dict(sampler=sampler, num_steps=10, eta=0.5)
    x = np.asarray(editing.inpaint(model_fn, SCHED, rng, known, TOP, **kw))
    ref = np.asarray(samplers.sample(model_fn, SCHED, rng, IMG, **kw))
    # at the last step the known pixels are set to `known` itself: exact
    np.testing.assert_array_equal(x[:, :2], np.asarray(known)[:, :2])
    # the oracle is per pixel, so the known ones cannot change the others: they are the
    # plain sampler's (same x_T and step noise); 1e-6, as XLA fuses the two programs
    # differently (measured: 1 ulp, 1e-7)
    np.testing.assert_allclose(x[:, 2:], ref[:, 2:], atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        editing.inpaint(model_fn, SCHED, rng, known, np.zeros_like(TOP), **kw),
        ref,
        atol=1e-6,
        rtol=0,
    )
    if sampler in ("ddim", "dpmpp_2m"):  # RePaint path (incl. a multistep history reset)
        x = editing.inpaint(model_fn, SCHED, rng, known, TOP, jump_length=2, jump_n_sample=3, **kw)
        np.testing.assert_array_equal(np.asarray(x)[:, :2], np.asarray(known)[:, :2])


def test_repaint_timesteps_small_case():
    ts = np.array([50, 40, 30, 20, 10, 0], np.int32)
    # n = 6, L = 2: jumps back up from positions 0 and 2 (ts 0 and 20), once each (r = 2)
    levels = [50, 40, 30, 20, 30, 40, 30, 20, 10, 0, 10, 20, 10, 0, -1]
    ts_from, ts_to = timesteps.repaint_timesteps(ts, 2, 2)
    np.testing.assert_array_equal(ts_from, levels[:-1])
    np.testing.assert_array_equal(ts_to, levels[1:])
    plain = timesteps.repaint_timesteps(ts, 2, 1)
    np.testing.assert_array_equal(plain[0], ts)
    np.testing.assert_array_equal(plain[1], [40, 30, 20, 10, 0, -1])
    with pytest.raises(ValueError, match="jump"):
        timesteps.repaint_timesteps(ts, 0, 2)


@pytest.mark.parametrize("jump_n_sample", [1, 5])
def test_inpaint_unknown_pixels_have_the_exact_law(jump_n_sample):
    """Independent pixels: the generated ones follow exactly the law of their own step
    sequence (down steps of DDIM eta = 1, RePaint's up steps q(x_t' | x_t)), computed by
    oracles.propagate: 50k Monte Carlo samples within 5 standard errors."""
    shape = (6_250, 4, 4, 1)  # 8 of 16 pixels unknown: 50k scalars
    ts = leading(100)
    steps_ = (
        pairs(ts)
        if jump_n_sample == 1
        else list(zip(*timesteps.repaint_timesteps(ts, 5, jump_n_sample)))
    )
    m, v, _, _ = propagate(steps_, MU, S, "ddim", eta=1.0)
    x = editing.inpaint(
        gaussian_eps(MU, S),
        SCHED,
        jax.random.key(8),
        jnp.ones(shape),
        TOP,
        num_steps=100,
        eta=1.0,
        jump_length=5,
        jump_n_sample=jump_n_sample,
    )
    check_moments(np.asarray(x)[:, 2:], m, v, f"inpaint unknown pixels, resample {jump_n_sample}")


def test_repaint_fixes_the_replacement_bias_on_correlated_pixels():
    """Pixel pairs with correlation 0.9, the first known (= 1): the second should follow
    N(0.9, 0.218^2). Replacement only ever shows the model noised versions of the known
    pixel, never their agreement with the generated one, and lands far off (mean 0.60);
    RePaint's resampling brings it to 0.83 (Lugmayr et al. 2022's motivation), measured
    on 4000 pairs (standard error 0.004)."""
    rho, s = 0.9, 0.5
    sd = jnp.asarray([s * np.sqrt(1 + rho), s * np.sqrt(1 - rho)])  # of (x1 +- x2) / sqrt 2

    def pair_eps(x, t):  # x [N, 2]: independent Gaussians in the rotated basis
        a, sig = coefs(x, t)
        u = jnp.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 1]], 1) / np.sqrt(2)
        e = sig * u / (a**2 * sd**2 + sig**2)
        return jnp.stack([e[:, 0] + e[:, 1], e[:, 0] - e[:, 1]], 1) / np.sqrt(2)

    known, mask = jnp.tile(jnp.asarray([[1.0, 0.0]]), (4000, 1)), jnp.asarray([[1.0, 0.0]])
    err = {}
    for r in (1, 5):
        x = np.asarray(
            editing.inpaint(
                pair_eps,
                SCHED,
                jax.random.key(9),
                known,
                mask,
                num_steps=100,
                eta=1.0,
                jump_length=5,
                jump_n_sample=r,
            )
        )
        assert np.all(x[:, 0] == 1.0)
        err[r] = abs(x[:, 1].mean() - rho)
        print(
            f"resample {r}: generated pixel mean {x[:, 1].mean():.4f} std {x[:, 1].std():.4f} "
            f"(exact {rho}, {s * np.sqrt(1 - rho**2):.4f})"
        )
    assert err[1] > 0.2 and err[5] < 0.4 * err[1], err


# --------------------------------------------------------------------------- inversion


def test_ddim_edit_round_trip_and_class_swap():
    """Invert class-0 data under class 0, regenerate under class 0 (round trip) and class 1
    (edit). The exact ODE edit keeps each sample's standardized value: x -> x + 1 (both
    classes have std SD), up to the ODE's start at index T-1 instead of pure noise."""
    x0 = MUS[0] + SD * jax.random.normal(jax.random.key(10), (4096,))
    src, tgt = conditional(jnp.zeros(4096, jnp.int32)), conditional(jnp.ones(4096, jnp.int32))
    rec, edit = {}, {}
    for n in (50, 200):
        back, x_T = editing.ddim_edit(src, src, SCHED, x0, num_steps=n, spacing="trailing")
        moved, _ = editing.ddim_edit(src, tgt, SCHED, x0, num_steps=n, spacing="trailing")
        ideal = exact_ode(
            exact_ode(np.asarray(x0, np.float64), -1, T - 1, MUS[0], SD), T - 1, -1, MUS[1], SD
        )
        rec[n], edit[n] = rms(back, x0), rms(moved, ideal)
        assert float(jnp.std(x_T)) > 0.9  # went to noise
    print(
        f"DDIM inversion, trailing spacing: round-trip RMS {rec}; edit RMS vs the exact "
        f"ODE edit {edit} (data std {SD})"
    )
    # first order in the step size (measured 0.040 -> 0.0104, and the same for the edit)
    assert rec[200] < 0.35 * rec[50] and rec[200] < 0.015
    assert edit[200] < 0.35 * edit[50] and edit[200] < 0.015


# --------------------------------------------------------------------------- make_sample_fn


class OracleModel:
    """Stands in for a network: model.apply({"params": p}, x_t, t, y, train=False)."""

    def apply(self, variables, x, t, y, train):
        assert not train
        return class_apply(variables["params"], x, t, y)


def _config(**sampler):
    c = tiny.get_config()
    c.model.num_classes = 2
    c.schedule.num_timesteps = T
    c.sampler.update(dict(dict(name="ddim", num_steps=10, eta=0.0, clip_x0=False), **sampler))
    return c


def test_make_sample_fn_guidance_is_traced_and_exact():
    sample = steps.make_sample_fn(OracleModel(), SCHED, _config(), SHAPE)
    jitted = jax.jit(chex.assert_max_traces(sample, n=1))  # as train.py calls it
    rng = jax.random.key(11)
    outs = {w: jitted(PARAMS, rng, LABELS, w) for w in (0.0, 1.0, 4.0)}
    run = lambda fn: samplers.sample(fn, SCHED, rng, SHAPE, num_steps=10)
    # 1e-6: the same math, compiled as part of an enclosing jit (fusion may differ)
    np.testing.assert_allclose(outs[0.0], run(UNCOND), atol=1e-6)
    np.testing.assert_allclose(outs[1.0], run(conditional(LABELS)), atol=1e-6)
    assert not np.allclose(outs[4.0], outs[1.0])


def test_make_sample_fn_edit_modes():
    x0 = MUS[1] + SD * jax.random.normal(jax.random.key(12), SHAPE)
    rng, cfg = jax.random.key(13), _config(spacing="trailing", num_steps=100)

    def make(mode, **kw):
        return jax.jit(steps.make_sample_fn(OracleModel(), SCHED, cfg, SHAPE, mode=mode, **kw))

    np.testing.assert_array_equal(make("img2img", strength=0.0)(PARAMS, rng, LABELS, 1.0, x0), x0)
    out = make("inpaint")(PARAMS, rng, LABELS, 1.0, x0, TOP[:2, :2])
    np.testing.assert_array_equal(np.asarray(out)[:, :1], np.asarray(x0)[:, :1])
    ones = jnp.ones(8, jnp.int32)
    invert = make("invert")
    back = invert(PARAMS, rng, ones, 1.0, x0)  # source labels default to labels: round trip
    print(f"make_sample_fn invert round trip (100 trailing DDIM steps): RMS {rms(back, x0):.2e}")
    assert rms(back, x0) < 0.03  # first order: 0.040 at 50 steps, 0.010 at 200 (above)
    np.testing.assert_allclose(
        invert(PARAMS, rng, 1 - ones, 1.0, x0, source_labels=ones),
        editing.ddim_edit(
            conditional(ones), conditional(1 - ones), SCHED, x0, num_steps=100, spacing="trailing"
        )[0],
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="mode"):
        steps.make_sample_fn(OracleModel(), SCHED, cfg, SHAPE, mode="edit")
