"""Sampling with a learned variance (Nichol & Dhariwal 2021, "improved DDPM"; DiT): DDPM's
"learned" rule against the Gaussian oracle's exact reverse variance (moments and
pathwise), classifier-free guidance and editing with 2C-channel outputs. The loss side
and the oracle itself: test_learned_sigma.py.

Oracle (tests/oracles.py): for x0 ~ N(mu, s^2) every reverse conditional q(x_{t-1} | x_t)
is Gaussian with the variance ``reverse_variance``, which ``gaussian_eps_sigma`` outputs
as variance values next to the exact eps. Tolerances: float32 round-off as measured and
stated at each assertion; Monte Carlo bounds at 5 standard errors (check_moments).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import editing, guidance, samplers
from diffusion_jax.step_rules import normal

from helpers import f64
from oracles import (
    AB,
    BETAS,
    SCHED,
    T,
    check_moments,
    gaussian_eps,
    gaussian_eps_at,
    gaussian_eps_sigma,
    pairs,
    propagate,
    ref_tables,
)

MU, S = 0.3, 0.5


# --------------------------------------------------------------------------- (b) sampling

SHAPE = (12_500, 2, 2, 1)  # 50k independent scalars


def test_ddpm_learned_variance_reproduces_the_data_marginals():
    """DDPM with variance="learned" from the oracle: every reverse step is then the exact
    q(x_{t-1} | x_t), so after 999 steps x (at index 0, the paper's x_1) is distributed as
    q(x_1) = N(sqrt(ab_0) mu, V_0), V_0 = ab_0 s^2 + beta_0, up to x_T ~ N(0, 1) instead of
    q(x_T) (a 1e-5 effect, below). DDPM's last step adds no noise, so the output is
    E[x0 | x_1], variance s^2 - E Var(x0 | x_1) = ab_0 s^4 / V_0 (20% below s^2 at s =
    0.02). Sampled moments within 5 SE of the exact ones (se_mean = sqrt(v / N), se_var =
    v sqrt(2 / (N - 1)), N = 50k; oracles.check_moments). s = 0.02: the fixed variances
    miss q(x_1)'s variance by > 20 SE (asserted), so this fails for either of them."""
    mu, s = 0.3, 0.02
    steps_ = pairs(np.arange(T)[::-1])
    v0 = AB[0] * s * s + BETAS[0]
    m1, var1, _, _ = propagate(steps_[:-1], mu, s, "learned")
    assert abs(m1 - np.sqrt(AB[0]) * mu) < 2e-5 and abs(var1 / v0 - 1) < 1e-8
    m, var, _, _ = propagate(steps_, mu, s, "learned")
    np.testing.assert_allclose(var, AB[0] * s**4 / v0, rtol=1e-8)
    se_v = v0 * np.sqrt(2.0 / np.prod(SHAPE))
    for fixed in samplers.VARIANCES:
        assert abs(propagate(steps_[:-1], mu, s, fixed)[1] - v0) > 20 * se_v, fixed

    x, traj = samplers.ddpm_sample(
        gaussian_eps_sigma(mu, s),
        SCHED,
        jax.random.key(36),
        SHAPE,
        variance="learned",
        return_every=T - 1,
    )
    check_moments(traj[0], m1, var1, "ddpm learned, x_1")
    check_moments(x, m, var, "ddpm learned, x0")


def _tanh_values(x, t):
    """eps exact for N(MU, S^2), variance values tanh(3 x_t): each element its own sigma."""
    return jnp.concatenate([gaussian_eps_at(x, t, MU, S), jnp.tanh(3.0 * x)], axis=-1)


def test_ddpm_learned_step_is_the_papers_update_pathwise():
    """With the sampler's own draws (samplers.py, RNG: x_T = normal(rng_xT), step i's z_i =
    normal(split(rng_steps, T)[i])), DDPM "learned" must be, per element,
      x_{t-1} = mu_tilde(x0(x_t), x_t) + exp(log sigma_t^2 / 2) z,  no noise at index 0,
      log sigma_t^2 = frac log beta_t + (1 - frac) log bt_t,  frac = (v + 1) / 2
    (Ho et al. eq. 7, 11; improved DDPM eq. 15), here recomputed in float64 over all 1000
    steps. The moment test above cannot tell the oracle's variance from a constant frac
    0.5 (2.3 SE); this can: it moves every element by ~1e-2. 2e-5: float32 rounding
    carried through 1000 contracting steps (measured max 1.3e-6)."""
    shape, rng = (16, 2, 2, 1), jax.random.key(41)
    x = samplers.ddpm_sample(_tanh_values, SCHED, rng, shape, variance="learned")
    rng_xT, rng_steps = jax.random.split(rng)
    z = f64(jax.vmap(lambda k: normal(k, shape))(jax.random.split(rng_steps, T)))
    ref = f64(normal(rng_xT, shape))
    betas, ab, abp, bt = ref_tables(T)
    for i, t in enumerate(range(T - 1, -1, -1)):
        eps = np.sqrt(1 - ab[t]) * (ref - np.sqrt(ab[t]) * MU) / (ab[t] * S * S + 1 - ab[t])
        x0 = (ref - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
        c1 = betas[t] * np.sqrt(abp[t]) / (1 - ab[t])
        c2 = (1 - abp[t]) * np.sqrt(1 - betas[t]) / (1 - ab[t])
        frac = (np.tanh(3.0 * ref) + 1) / 2
        log_var = frac * np.log(betas[t]) + (1 - frac) * np.log(bt[t])
        ref = c1 * x0 + c2 * ref + (np.exp(0.5 * log_var) * z[i] if t > 0 else 0.0)
    print("ddpm learned vs float64 reference: max", np.max(np.abs(f64(x) - ref)))
    np.testing.assert_allclose(f64(x), ref, atol=2e-5, rtol=0)


# --------------------------------------------------------------------------- (e) guidance

MUS, SD, NULL = (-0.5, 0.5), 0.3, 2
GPARAMS = {"mu": jnp.asarray(MUS + (0.0,)), "v": jnp.asarray([0.1, 0.2, -0.7])}
LABELS = jnp.arange(8) % 2


def _class_apply(params, x, t, y, with_values=True):
    """eps of N(params["mu"][y], SD^2) (y = NULL: mu = 0) and values params["v"][y]."""
    shape = y.shape + (1,) * (x.ndim - 1)
    eps = gaussian_eps_at(x, t, params["mu"][y].reshape(shape), SD)
    if not with_values:
        return eps
    return jnp.concatenate([eps, jnp.broadcast_to(params["v"][y].reshape(shape), x.shape)], -1)


def _class_apply_c(params, x, t, y):
    return _class_apply(params, x, t, y, with_values=False)


@pytest.mark.parametrize("options", [{}, {"interval": (0, 499)}, {"rescale": 0.7}])
def test_guidance_guides_predictions_and_keeps_conditional_variance(options):
    """2C outputs: the last C channels are the conditional model's values exactly (the
    null label's differ by 0.8 and 0.9), the first C equal guidance of the C-channel model
    with the same options. 1e-6: the same float32 ops on a concatenated array, which XLA
    may fuse differently (measured 0)."""
    x_t = jax.random.normal(jax.random.key(37), (8, 2, 2, 1))
    t = jnp.asarray([10, 200, 400, 499, 500, 700, 900, 999], jnp.int32)
    null = jnp.full_like(LABELS, NULL)
    out = guidance.guided_model_fn(
        _class_apply, GPARAMS, LABELS, null, 3.0, schedule=SCHED, **options
    )(x_t, t)
    ref = guidance.guided_model_fn(
        _class_apply_c, GPARAMS, LABELS, null, 3.0, schedule=SCHED, **options
    )(x_t, t)
    assert out.shape == (8, 2, 2, 2)
    np.testing.assert_array_equal(out[..., 1:], _class_apply(GPARAMS, x_t, t, LABELS)[..., 1:])
    np.testing.assert_allclose(out[..., :1], ref, atol=1e-6, rtol=0)
    cond = _class_apply_c(GPARAMS, x_t, t, LABELS)
    assert np.max(np.abs(f64(out[..., :1]) - f64(cond))) > 1e-2  # it did guide (somewhere)


# --------------------------------------------------------------------------- editing

ESHAPE = (16, 2, 2, 1)


def test_editing_uses_the_prediction_channels_and_learned_ddpm():
    """img2img, inpaint and DDIM-inversion editing with the 2C oracle equal the C oracle
    (same eps; the variance channels are not read by DDIM); img2img at strength 1 with
    DDPM "learned" is sample() with it, draw for draw (img2img's documented promise), and
    differs from fixedlarge (so the variance channels are read). 1e-6: identical float32
    ops on sliced inputs (measured 0)."""
    c, sig = gaussian_eps(MU, S), gaussian_eps_sigma(MU, S)
    x0 = jax.random.uniform(jax.random.key(38), ESHAPE, minval=-1, maxval=1)
    mask = (jnp.arange(4).reshape(1, 2, 2, 1) % 2).astype(jnp.float32)
    rng = jax.random.key(39)
    kw = dict(sampler="ddim", num_steps=20, eta=0.5)
    for edit in (
        lambda fn: editing.img2img(fn, SCHED, rng, x0, strength=0.6, **kw),
        lambda fn: editing.inpaint(fn, SCHED, rng, x0, mask, **kw),
        lambda fn: editing.ddim_edit(fn, fn, SCHED, x0, num_steps=20)[0],
    ):
        np.testing.assert_allclose(edit(sig), edit(c), atol=1e-6, rtol=0)
    learned = dict(sampler="ddpm", variance="learned")
    full = editing.img2img(sig, SCHED, rng, x0, strength=1.0, **learned)
    np.testing.assert_array_equal(full, samplers.sample(sig, SCHED, rng, ESHAPE, **learned))
    large = editing.img2img(sig, SCHED, rng, x0, strength=1.0, sampler="ddpm")
    assert np.max(np.abs(f64(full) - f64(large))) > 1e-3


# --------------------------------------------------------------------------- errors


def test_learned_ddpm_needs_variance_channels():
    with pytest.raises(ValueError, match="variance"):  # a C-channel model: nothing to read
        fn, key = gaussian_eps(0.0, 1.0), jax.random.key(0)
        samplers.ddpm_sample(fn, SCHED, key, ESHAPE, variance="learned")
    with pytest.raises(ValueError, match="variance"):  # not one of DDPM_VARIANCES
        samplers.ddpm_sample(fn, SCHED, key, ESHAPE, variance="large")


@pytest.mark.parametrize("value, fixed", [(-1.0, "fixedsmall"), (1.0, "fixedlarge")])
def test_respaced_learned_variance_spans_the_respaced_betas(value, fixed):
    """With respacing the variance values interpolate between the respaced chain's
    log beta' and log beta_tilde' (improved DDPM sec. 4): v = -1 is DDPM with fixedsmall
    and v = +1 with fixedlarge over the same 40 steps, sample by sample (same keys)."""
    eps = gaussian_eps(MU, S)

    def with_values(x, t):
        return jnp.concatenate([eps(x, t), jnp.full_like(x, value)], axis=-1)

    shape, rng = (128, 2, 2, 1), jax.random.key(7)
    learned = samplers.ddpm_sample(with_values, SCHED, rng, shape, variance="learned", respacing=40)
    plain = samplers.ddpm_sample(eps, SCHED, rng, shape, variance=fixed, respacing=40)
    np.testing.assert_allclose(learned, plain, atol=1e-6)
