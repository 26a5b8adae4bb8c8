"""The optimizer's learning-rate schedule and the EMA against their closed forms: every
sample and evaluation uses the EMA parameters, so ``ema = d·ema + (1 − d)·params`` with the
right d is checked exactly, not through a training run that would pass either way."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from diffusion_jax import steps
from diffusion_jax.state import TrainState, ema_decay_at, make_lr_schedule, make_optimizer


def optim_cfg(**kw):
    c = dict(
        learning_rate=1e-3,
        warmup_steps=10,
        decay="cosine",
        final_lr_fraction=0.1,
        grad_clip_norm=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        ema_decay=0.999,
        ema_warmup=True,
    )
    c.update(kw)
    return ml_collections.ConfigDict(c)


@pytest.mark.parametrize("step", [0, 1, 5, 90, 1000, 100000])
def test_ema_decay_warmup_closed_form(step):
    # (1 + s) / (10 + s) until it reaches the configured decay (s = 9981 for 0.999)
    expected = min(0.999, (1 + step) / (10 + step))
    np.testing.assert_allclose(ema_decay_at(0.999, True, step), expected, rtol=1e-7)
    np.testing.assert_allclose(ema_decay_at(0.999, False, step), 0.999, rtol=1e-7)


@pytest.mark.parametrize("step, warmup", [(3, True), (3, False), (50000, True)])
def test_apply_gradients_moves_the_ema_toward_the_new_params(step, warmup):
    """With SGD(lr=1) the new params are params − grads exactly, and the EMA must be
    d·ema + (1 − d)·new_params with d = ema_decay_at(step): d = 4/13 at step 3 with
    warmup, so swapping d and 1 − d moves the result by ~0.4·|ema − params|."""
    cfg = optim_cfg(ema_decay=0.9, ema_warmup=warmup)
    tx = optax.sgd(1.0)
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    ema = {"w": jnp.array([0.0, 4.0, -1.0])}
    grads = {"w": jnp.array([0.5, 0.25, -1.0])}
    state = TrainState(
        step=jnp.int32(step),
        params=params,
        ema_params=ema,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
    )
    new = steps.apply_gradients(state, grads, tx, cfg)
    d = min(0.9, (1 + step) / (10 + step)) if warmup else 0.9
    new_params = np.array([0.5, -2.25, 1.5])
    # float32 arithmetic on O(1) values: 1e-6
    np.testing.assert_allclose(new.params["w"], new_params, rtol=1e-6)
    np.testing.assert_allclose(
        new.ema_params["w"], d * np.array([0.0, 4.0, -1.0]) + (1 - d) * new_params, atol=1e-6
    )
    assert int(new.step) == step  # the caller advances the step


def test_cosine_schedule_values():
    """Linear warmup 0 -> lr over `warmup_steps`, then half a cosine down to lr·final:
    lr(s) = lr·(f + (1 − f)·(1 + cos(pi·(s − w)/(N − w)))/2)."""
    lr, w, n, f = 1e-3, 10, 110, 0.1
    sched = make_lr_schedule(optim_cfg(learning_rate=lr, warmup_steps=w, final_lr_fraction=f), n)
    for s in (0, 1, 5, 10, 35, 60, 85, 110, 500):
        if s < w:
            expected = lr * s / w
        else:
            u = min(s - w, n - w) / (n - w)
            expected = lr * (f + (1 - f) * 0.5 * (1 + np.cos(np.pi * u)))
        # float32 cosine: 1e-6 relative (atol for the exact 0 at step 0)
        np.testing.assert_allclose(float(sched(s)), expected, rtol=1e-5, atol=1e-12)


def test_constant_schedule_values():
    sched = make_lr_schedule(optim_cfg(decay="constant", warmup_steps=4), 100)
    got = [float(sched(s)) for s in (0, 1, 2, 4, 50, 1000)]
    np.testing.assert_allclose(got, [0, 2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    with pytest.raises(ValueError, match="cosine"):
        make_lr_schedule(optim_cfg(decay="step"), 100)


def test_optimizer_follows_the_schedule():
    """Adam's bias-corrected step for a constant gradient is lr·g_i/(|g_i| + eps) per
    coordinate (m̂ = g, v̂ = g²), i.e. lr·sign(g_i), so the parameter change at each step
    reads the schedule back: the first step is the warmup's lr 0, the next ones lr·s/w.
    Clipping (norm 0.5 < |g| = 5) rescales g but not the Adam step."""
    cfg = optim_cfg(warmup_steps=4, decay="constant", grad_clip_norm=0.5)
    tx = make_optimizer(cfg, 100)
    params = {"w": jnp.array([1.0, 2.0])}
    opt_state = tx.init(params)
    g = {"w": jnp.array([3.0, -4.0])}  # |g| = 5
    moves = []
    for _ in range(6):
        updates, opt_state = tx.update(g, opt_state, params)
        new = optax.apply_updates(params, updates)
        moves.append(np.asarray(new["w"] - params["w"]))
        params = new
    lrs = [0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3]
    expected = [-lr * np.array([1.0, -1.0]) for lr in lrs]
    # float32 parameter differences of O(1) values: ~1e-7 absolute
    np.testing.assert_allclose(moves, expected, atol=2e-7)
