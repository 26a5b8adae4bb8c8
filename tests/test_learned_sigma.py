"""Learned variance and the hybrid loss (Nichol & Dhariwal 2021, "improved DDPM"; DiT):
the oracle, variance.py's terms, objectives.vlb_term / diffusion_loss(learn_sigma=True),
the train step's wiring and the config check. Sampling, guidance and editing with
2C-channel outputs: test_learned_sigma_sampling.py.

The oracle: for x0 ~ N(mu, s^2) the reverse conditional q(x_{t-1} | x_t) is Gaussian with
the variance ``oracles.reverse_variance``, the VLB-optimal sigma_t^2 given the exact mean
(Bao et al. 2022, Analytic-DPM), inside improved DDPM's interpolation range [beta_tilde,
beta] for s <= 1 at every t >= 1 (asserted; index 0, where DDPM adds no noise and the
loss is the decoder's, is left out). ``oracles.gaussian_eps_sigma`` outputs the exact eps
and the values for it. Hand computations are float64 from the papers' formulas.
Tolerances: float32 round-off as measured and stated at each assertion; Monte Carlo
bounds at 5 standard errors (MC_K), each check's standard error derived where it is made.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base, imagenet256_dit_xl2
from diffusion_jax import objectives, steps, variance
from diffusion_jax.schedules import make_schedule
from diffusion_jax.state import TrainState

from helpers import MC_K, f64, tiny_config
from oracles import (
    BETAS,
    SCHED,
    T,
    gaussian_eps_at,
    learned_values,
    ref_tables,
    ref_vlb,
    reverse_variance,
)

LN2 = np.log(2.0)

# --------------------------------------------------------------------------- the oracle


def test_oracle_variance_is_inside_the_interpolation_range():
    """reverse_variance two ways: beta_t V_{t-1} / V_t (the joint Gaussian) and Analytic-DPM's
    beta_tilde_t + coef1^2 Var(x0 | x_t) (posterior variance plus the posterior mean's
    error, Var(x0 | x_t) = s^2 (1 - ab) / V_t). They agree to float64 round-off (1e-12
    relative). Inside [beta_tilde, beta] at every t >= 1 for s <= 1, not for s > 1."""
    betas, ab, abp, bt = ref_tables(T)
    for s in (0.02, 0.5, 0.9):
        var = reverse_variance(BETAS, s)
        c1 = betas * np.sqrt(abp) / (1 - ab)
        analytic = bt + c1**2 * s * s * (1 - ab) / (ab * s * s + 1 - ab)
        np.testing.assert_allclose(var[1:], analytic[1:], rtol=1e-12)
        assert np.all((var[1:] >= bt[1:]) & (var[1:] <= betas[1:])), s
        assert learned_values(BETAS, s)[1][1:].all(), s
    assert not learned_values(BETAS, 2.0)[1][1:].any()  # wider data: above beta


# --------------------------------------------------------------------------- VLB terms

T_SMALL = 100
SCHED_SMALL = make_schedule("linear", T_SMALL)


def test_vlb_term_matches_hand_computed_kl_and_decoder_nll():
    """objectives.vlb_term on fixed numbers: the decoder NLL at t = 0 for the two open end
    bins (x0 = -1, 1), an interior bin and two ~6 sigma into the tails below and above the
    mean (where float32 CDFs near 1 would cancel), and the Gaussian KL
    at t = 37, 99; v = 1.2 extrapolates beyond beta (frac 1.1). Inputs are float32 values,
    used as such in the float64 reference: what differs is float32 arithmetic, ~1e-7
    relative per op, and the float32 schedule tables: rtol 1e-5 (measured 2e-6). At t = 99
    the KL is 9e-7 bits, ~d^2 / 2 of d = the difference of two float32 log-variances
    (~1e-3): their 1e-7 rounding gives ~1e-10 absolute: atol 1e-10 (measured 1.5e-11)."""
    grid = lambda k: 2.0 * k / 255.0 - 1.0
    t = np.array([0, 0, 0, 0, 0, 37, 99])
    x0 = np.float32([-1.0, 1.0, grid(100), grid(90), grid(165), 0.3, -0.7])
    x0_pred = x0 + np.float32([0.03, -0.1, 0.01, 0.2, -0.2, -0.2, 0.5])
    x_t = np.float32([-0.95, 0.95, -0.2, -0.3, 0.3, 0.4, -0.1])
    v = np.float32([0.3, -0.5, 1.2, 0.0, 0.0, 0.25, -0.9])
    col = lambda a: jnp.asarray(a)[:, None]  # [B, 1]: one dimension per example
    got = objectives.vlb_term(SCHED_SMALL, col(x0), col(x_t), jnp.asarray(t), col(x0_pred), col(v))
    want = ref_vlb(T_SMALL, t, *(f64(a) for a in (x0, x_t, x0_pred, v))) / LN2
    print("vlb terms (bits):", np.asarray(got), want)
    np.testing.assert_allclose(f64(got), want, rtol=1e-5, atol=1e-10)
    assert min(want[3:5]) > 20  # the tail bins are far out (P < 1e-8)


def spy_model(seen):
    """eps prediction 0.8 x_t (not the exact one) and variance values tanh(x_t)."""

    def apply_fn(params, x_t, t, y, rng):
        seen.update(x_t=x_t, t=t)
        return jnp.concatenate([0.8 * x_t, jnp.tanh(x_t)], axis=-1)

    return apply_fn


def test_hybrid_loss_is_mse_plus_weighted_vlb_on_the_drawn_examples():
    """diffusion_loss(learn_sigma=True) on grid data (256 levels) against the float64
    reference at the x_t and t the model received: vlb_per_example is the VLB term in bits
    per dim (mean over dims / log 2) and loss_per_example = MSE + vlb_weight * T * vlb (L_vlb
    = sum over t, estimated by T L_t). 1024 examples draw t = 0 too (asserted), so both
    branches are checked. Tolerance 1e-4 relative: x0 = (x_t - s eps) / a in float32
    divides rounding by a = sqrt(alpha_bar) >= 6e-3 (T = 100), moving the model's mean
    by up to ~2e-5 relative where KL is dominated by the mean (measured max 2.6e-6)."""
    b, shape = 1024, (2, 2, 1)
    k = jax.random.randint(jax.random.key(30), (b,) + shape, 0, 256)
    batch = {"image": (2.0 * k / 255.0 - 1.0).astype(jnp.float32)}
    seen = {}
    loss, aux = objectives.diffusion_loss(
        spy_model(seen), None, SCHED_SMALL, batch, jax.random.key(31), learn_sigma=True
    )
    t = np.asarray(aux["t"])
    assert (t == 0).sum() >= 3 and (t > 0).sum() > 900
    _, ab, _, _ = ref_tables(T_SMALL)
    x_t, x0 = f64(seen["x_t"]), f64(batch["image"])
    a, s = (np.sqrt(v)[t][:, None, None, None] for v in (ab, 1 - ab))
    x0_pred = (x_t - s * 0.8 * x_t) / a
    tb = t[:, None, None, None]
    ref = ref_vlb(T_SMALL, tb, x0, x_t, x0_pred, np.tanh(x_t)).reshape(b, -1).mean(1) / LN2
    np.testing.assert_allclose(f64(aux["vlb_per_example"]), ref, rtol=1e-4)
    mse = np.mean(((0.8 * x_t - (x_t - a * x0) / s) ** 2).reshape(b, -1), axis=1)
    # eps = (x_t - a x0) / s recovers the noise from float32 x_t: 1e-7 / s relative, s >= 0.03
    np.testing.assert_allclose(f64(aux["loss_per_example"]), mse + 0.1 * ref, rtol=1e-4)
    np.testing.assert_allclose(float(loss), np.mean(mse + 0.1 * ref), rtol=1e-4)
    # The factor T matters: vlb_weight alone (0.001 instead of 0.1) would move the loss by
    # > 100x the tolerance.
    assert np.mean(0.099 * ref) > 100 * 1e-4 * np.mean(mse + 0.1 * ref)


def _linear_2c(params, x_t, t, y, rng):
    return jnp.concatenate([params["e"] * x_t, params["w"] * jnp.ones_like(x_t)], axis=-1)


def _linear_c(params, x_t, t, y, rng):
    return params["e"] * x_t


@jax.jit
def _grads(params, batch, rng):
    def loss(p, fn, learn_sigma, vlb_weight=0.001):
        return objectives.diffusion_loss(
            fn, p, SCHED_SMALL, batch, rng, learn_sigma=learn_sigma, vlb_weight=vlb_weight
        )

    return (
        jax.value_and_grad(loss, has_aux=True)(params, _linear_2c, True),
        jax.value_and_grad(loss, has_aux=True)(params, _linear_c, False),
        loss(params, _linear_2c, True, 0.0),
    )


def test_vlb_trains_only_the_variance_and_off_is_the_plain_loss():
    """The VLB's mean comes from a stop-gradient copy of the prediction (improved DDPM sec.
    3.1): the hybrid loss's gradient wrt the prediction parameter equals the MSE's alone,
    while the variance parameter gets one. And vlb_weight = 0 is the plain loss bit for
    bit (the MSE takes the first C channels through the same ops). 1e-6 relative on the
    gradient: the same float32 sums, possibly reassociated (measured 0)."""
    batch = {"image": jax.random.uniform(jax.random.key(32), (256, 2, 2, 1), minval=-1, maxval=1)}
    params = {"e": jnp.float32(0.7), "w": jnp.float32(-0.3)}
    ((_, _), hyb_grad), ((plain, _), plain_grad), (zero, _) = _grads(
        params, batch, jax.random.key(33)
    )
    np.testing.assert_allclose(float(hyb_grad["e"]), float(plain_grad["e"]), rtol=1e-6)
    assert abs(float(hyb_grad["w"])) > 1e-3 and float(plain_grad["w"]) == 0.0
    assert float(zero) == float(plain)
    # Without the stop-gradient the VLB would reach the prediction: its gradient wrt
    # x0_pred is far from 0 (so the equality above can fail).
    x = jnp.full((4, 1), 0.3)
    t = jnp.asarray([0, 1, 5, 20])
    g = jax.grad(lambda p: objectives.vlb_term(SCHED_SMALL, x, x, t, p, 0 * x).sum())(x - 0.1)
    print("d vlb / d x0_pred at t = 0, 1, 5, 20:", np.asarray(g).ravel())
    assert float(jnp.min(jnp.abs(g))) > 1e-2


# --------------------------------------------------------------------------- (a) optimum

MU, S = 0.3, 0.5
# Narrow data for the optimum: its optimal sigma^2 moves from near beta (t ~ 1) to near
# beta_tilde (t > 100), so neither end is close to it on average (s = 0.5 stays near beta
# where the gradients are large, and frac 1 would be hard to tell from the optimum).
S_OPT = 0.02
V_ORACLE = jnp.asarray(learned_values(BETAS, S_OPT)[0], jnp.float32)


def _oracle_apply(params, x_t, t, y, rng):
    v = jnp.take(params["table"], t).reshape(-1, 1, 1, 1) + params["dv"]
    return jnp.concatenate(
        [gaussian_eps_at(x_t, t, MU, S_OPT), jnp.broadcast_to(v, x_t.shape)], axis=-1
    )


@jax.jit
def _vlb_and_grad(table, batch, rng):
    dv = jnp.zeros((batch["image"].shape[0], 1, 1, 1))

    def loss(dv):
        params = {"table": table, "dv": dv}
        return objectives.diffusion_loss(_oracle_apply, params, SCHED, batch, rng, learn_sigma=True)

    (_, aux), g = jax.value_and_grad(loss, has_aux=True)(dv)
    return aux, g.reshape(-1) * dv.shape[0]  # per-example d(loss_i)/dv


def test_oracle_variance_minimises_the_vlb():
    """With the exact eps, E[L_{t-1} | t] as a function of sigma^2 is (in nats per dim)
        0.5 (log sigma^2 - log bt + var*(t) / sigma^2 - 1),  var* = reverse_variance,
    and its derivative wrt the variance value v is 0.25 (log beta - log bt) (1 - var* /
    sigma^2) (d log sigma^2 / dv = (log beta - log bt) / 2): 0 exactly at the oracle's
    values, negative at frac 0 (sigma^2 = bt), positive at frac 1. diffusion_loss's
    per-example value and gradient (x vlb_weight * T = 1) must match these expectations
    given each example's t within 5 SE of the mean of the residuals (the residuals are
    independent, mean 0 given t; SE from their sample std). t = 0 (decoder term) excluded."""
    batch = {"image": MU + S_OPT * jax.random.normal(jax.random.key(34), (4096, 4, 4, 1))}
    betas, ab, abp, bt = ref_tables(T)
    var_star = reverse_variance(BETAS, S_OPT)
    tables = {"oracle": V_ORACLE, "frac 0": -jnp.ones(T), "frac 1": jnp.ones(T)}
    means, power = {}, []
    for name, table in tables.items():
        aux, g = _vlb_and_grad(table, batch, jax.random.key(35))
        t = np.asarray(aux["t"])
        keep = t > 0
        t, vlb, g = t[keep], f64(aux["vlb_per_example"])[keep], f64(g)[keep]
        frac = (f64(table)[t] + 1) / 2
        log_var = frac * np.log(betas[t]) + (1 - frac) * np.log(bt[t])
        e_vlb = 0.5 * (log_var - np.log(bt[t]) + var_star[t] / np.exp(log_var) - 1) / LN2
        e_g = 0.25 * np.log(betas[t] / bt[t]) * (1 - var_star[t] / np.exp(log_var)) / LN2
        for label, x, e in (("vlb", vlb, e_vlb), ("grad", g, e_g)):
            se = np.std(x - e, ddof=1) / np.sqrt(x.size)
            print(f"{name} {label}: {x.mean():.6f} expected {e.mean():.6f} (se {se:.2e})")
            assert abs(x.mean() - e.mean()) < MC_K * se, (name, label)
            if name != "oracle" and label == "grad":
                power.append(abs(e.mean()) / se)
        means[name] = vlb.mean()
        if name == "oracle":
            # the expected gradient is 0 up to the float32 rounding of the oracle's values
            # (frac ~6e-8 relative, times |log(beta / bt)| <= ~1): measured 3e-9
            np.testing.assert_allclose(e_g, 0.0, atol=1e-7)
    # The same draws: the oracle's VLB is the lowest, and both ends' gradients are tens
    # of SE from 0 (the gradient check would catch a wrong optimum).
    assert means["oracle"] < min(means["frac 0"], means["frac 1"])
    assert min(power) > 10, power


# --------------------------------------------------------------------------- errors


def test_mismatched_outputs_raise():
    batch, key = {"image": jnp.zeros((4, 2, 2, 1))}, jax.random.key(0)
    with pytest.raises(ValueError, match="learn_sigma"):  # C channels, learn_sigma on
        objectives.diffusion_loss(_linear_c, {"e": 1.0}, SCHED, batch, key, learn_sigma=True)
    with pytest.raises(ValueError, match="learn_sigma"):  # 2C = 2 would broadcast vs C = 1
        objectives.diffusion_loss(_linear_2c, {"e": 1.0, "w": 0.0}, SCHED, batch, key)
    with pytest.raises(ValueError, match="channels"):
        variance.split_output(jnp.zeros((2, 3)), jnp.zeros((2, 5)))


def _config(**overrides):
    c = base.get_config()
    for key, value in overrides.items():
        section, *path = key.split(".")
        node = c[section]
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return c


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"objective.learn_sigma": True}, "out_channels=6"),
        ({"model.unet.out_channels": 6}, "learn_sigma=True or"),
        ({"model.unet.out_channels": 4}, "must be None or 3"),
        ({"sampler.variance": "learned"}, "needs objective.learn_sigma=True"),
        ({"sampler.variance": "large"}, "unknown sampler.variance"),
        ({"objective.vlb_weight": -1.0}, "vlb_weight"),
    ],
)
def test_check_learned_sigma_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        variance.check_learned_sigma(_config(**overrides), 3)


def test_check_learned_sigma_accepts_consistent_configs():
    variance.check_learned_sigma(base.get_config(), 3)
    variance.check_learned_sigma(_config(**{"model.unet.out_channels": 3}), 3)
    on = {"objective.learn_sigma": True, "model.unet.out_channels": 6}
    variance.check_learned_sigma(_config(**on, **{"sampler.variance": "learned"}), 3)
    paper = imagenet256_dit_xl2.get_config()
    variance.check_learned_sigma(paper, 4)
    assert paper.objective.learn_sigma and paper.sampler.variance == "learned"
    with pytest.raises(ValueError, match="out_channels=2"):  # wrong data channels
        variance.check_learned_sigma(paper, 1)
    old = _config()  # a config from before the keys: learn_sigma off
    del old.objective["learn_sigma"], old.objective["vlb_weight"]
    variance.check_learned_sigma(old, 3)


# --------------------------------------------------------------------------- train step


class _Linear2C:
    """A stand-in network: eps = a x_t, then variance values b (model.apply's signature);
    without ``learned`` only the eps."""

    def __init__(self, learned=True):
        self.learned = learned

    def apply(self, variables, x, t, y, train):
        p = variables["params"]
        out = jnp.concatenate([p["a"] * x, p["b"] * jnp.ones_like(x)], axis=-1)
        return out if self.learned else out[..., :1]


def test_train_step_wires_the_hybrid_loss_from_the_config():
    """steps.make_train_step passes objective.learn_sigma / vlb_weight on: its loss is
    diffusion_loss(learn_sigma=True, vlb_weight=0.25) at the step's own rng (fold_in(rng,
    step), first split; example ids 0..B-1). A config from before the keys trains the
    plain loss. 1e-6 relative: the same program up to XLA's fusion of the surrounding step
    (measured 0)."""
    cfg = tiny_config(**{"objective.learn_sigma": True, "objective.vlb_weight": 0.25})
    sched = make_schedule("linear", cfg.schedule.num_timesteps)
    params = {"a": jnp.float32(0.5), "b": jnp.float32(0.2)}
    tx = optax.sgd(0.1)
    state = TrainState(jnp.int32(0), params, params, tx.init(params), jax.random.PRNGKey(3))
    batch = {"image": jax.random.uniform(jax.random.key(40), (16, 2, 2, 1), minval=-1, maxval=1)}
    _, metrics = jax.jit(steps.make_train_step(_Linear2C(), tx, sched, cfg))(state, batch)
    rng_loss = jax.random.split(jax.random.fold_in(state.rng, 0))[0]

    def apply_fn(p, x, t, y, rng):
        return _Linear2C().apply({"params": p}, x, t, y, train=True)

    want, _ = objectives.diffusion_loss(
        apply_fn, params, sched, batch, rng_loss, learn_sigma=True, vlb_weight=0.25
    )
    plain, _ = objectives.diffusion_loss(
        lambda p, x, t, y, r: apply_fn(p, x, t, y, r)[..., :1], params, sched, batch, rng_loss
    )
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-6)
    assert abs(float(want) - float(plain)) > 1e-2  # the VLB part is in it
    old = tiny_config()
    del old.objective["learn_sigma"], old.objective["vlb_weight"]
    _, metrics = jax.jit(steps.make_train_step(_Linear2C(False), tx, sched, old))(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(plain), rtol=1e-6)
