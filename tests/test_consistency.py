"""Consistency distillation and multistep consistency sampling (diffusion_jax/consistency.py,
the "consistency" rule of step_rules.py).

The oracle: for Gaussian data x0 ~ N(mu, s^2) the exact eps-predictor is affine in x_t
(tests/oracles.py), and so is the probability-flow ODE's map from x_t to x0. A student
whose eps output is affine in x_t with one (weight, bias) per timestep can represent the
exact consistency function, so distillation from the exact teacher must drive its
one-step samples to the data's mean and variance.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from diffusion_jax import consistency, samplers, train, workdir
from diffusion_jax.state import state_from_params
from diffusion_jax.step_rules import boundary_scalings, consistency_output

from helpers import cli, tiny_config
from oracles import AB, SCHED, T, check_moments, gaussian_eps, propagate


def test_boundary_condition_is_exact():
    c_skip, c_out = boundary_scalings(jnp.array([0, 1, 999]), 2)
    assert (float(c_skip[0, 0]), float(c_out[0, 0])) == (1.0, 0.0)
    assert 0 < float(c_skip[1, 0]) < 0.003 and float(c_out[2, 0]) > 0.999999
    x, garbage = jax.random.normal(jax.random.key(0), (2, 4, 4, 3, 2))
    np.testing.assert_array_equal(consistency_output(x, jnp.zeros(4, jnp.int32), garbage), x)
    # the sampler from index 0: one evaluation of f(x, 0) = x, whatever the network says
    out = samplers.run(
        lambda x, t: 1e3 * jnp.ones_like(x),
        SCHED,
        x,
        np.array([0], np.int32),
        None,
        jax.random.split(jax.random.key(1), 1),
        0.0,
        update="consistency",
        prediction="eps",
        clip_x0=False,
    )
    np.testing.assert_array_equal(out, x)


class TableEps(nn.Module):
    """eps(x_t, t) = w[t] x_t + b[t]: affine in x_t per timestep, like the exact Gaussian
    eps-predictor and the exact consistency function."""

    num_timesteps: int = T

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        w = self.param("w", nn.initializers.zeros, (self.num_timesteps,))
        b = self.param("b", nn.initializers.zeros, (self.num_timesteps,))
        shape = t.shape + (1,) * (x.ndim - 1)
        return w[t].reshape(shape) * x + b[t].reshape(shape)


def _oracle_params(mu, s):
    """TableEps parameters of the exact eps-predictor (the teacher's)."""
    ab = AB
    c = np.sqrt(1 - ab) / (ab * s * s + 1 - ab)
    return {"w": jnp.asarray(c, jnp.float32), "b": jnp.asarray(-c * np.sqrt(ab) * mu, jnp.float32)}


def _distill_config(num_grid_steps):
    c = base.get_config()
    c.model.num_classes = 0
    c.objective.prediction = "eps"
    c.consistency.num_grid_steps = num_grid_steps
    c.consistency.distance = "l2"
    c.optim.ema_decay = 0.95
    c.optim.ema_warmup = False
    return c


def test_distilled_student_of_the_gaussian_oracle_samples_the_data_in_one_step():
    """Distillation from the exact Gaussian teacher on a 10-step grid (1,000 updates of
    the 2,000-parameter table model, batch 512) makes the ONE-step samples follow the
    exact law of the chain the student distils: the teacher's DDIM steps 999 -> 899 ->
    ... -> 99 -> 0 (the boundary), propagated in float64 by oracles.propagate. Mean and
    variance within 5 standard errors of it (N = 20,000); its mean is the data's within
    1e-3. Its variance is 0.141, not the data's 0.25: ten DDIM steps of this grid lose
    that much (the student inherits its teacher's discretisation; 40 steps give 0.217).
    Before distillation the one-step sample (the teacher's E[x0 | x_T]) has 0.2% of it."""
    mu, s = 0.3, 0.5
    config = _distill_config(10)
    model = TableEps()
    teacher = (lambda p, x, t, y: model.apply({"params": p}, x, t, y), _oracle_params(mu, s))
    tx = optax.adam(0.01)
    step = consistency.make_distill_step(model, tx, SCHED, config, teacher[0])
    rng = jax.random.key(3)

    @jax.jit
    def train(state):
        def body(state, i):
            x0 = mu + s * jax.random.normal(jax.random.fold_in(rng, i), (512, 1, 1, 1))
            return step(state, {"image": x0}, teacher[1])

        return jax.lax.scan(body, state, jnp.arange(1000))

    state, metrics = train(state_from_params(teacher[1], tx, seed=0))
    assert bool(jnp.all(metrics["finite"] == 1))

    def one_step(params):
        fn = jax.tree_util.Partial(lambda p, x, t: model.apply({"params": p}, x, t), params)
        return samplers.sample(fn, SCHED, jax.random.key(4), (20_000, 1, 1, 1),
                               sampler="consistency", num_steps=1, spacing="trailing",
                               clip_x0=False)  # fmt: skip

    ts = consistency.grid(T, 10)
    m, v, _, _ = propagate(list(zip(ts, list(ts[1:]) + [0])), mu, s, "ddim")
    assert abs(m - mu) < 1e-3 and 0.13 < v < 0.15
    check_moments(one_step(state.ema_params), m, v, "consistency 1-step vs its DDIM chain")
    assert float(jnp.var(one_step(teacher[1]))) < 0.01 * v


def test_teacher_step_is_ddim():
    """The distillation target's teacher step is deterministic DDIM from t to s."""
    mu, s = 0.3, 0.5
    x = jax.random.normal(jax.random.key(5), (64, 1, 1, 1))
    t, sp = jnp.full((64,), 500), jnp.full((64,), 475)
    out = consistency.teacher_step(gaussian_eps(mu, s), SCHED, "eps", x, t, sp)
    ref = samplers.run(gaussian_eps(mu, s), SCHED, x, np.array([500], np.int32),
                       np.array([475], np.int32), jax.random.split(jax.random.key(0), 1), 0.0,
                       update="ddim", prediction="eps", clip_x0=False)  # fmt: skip
    np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("kind", consistency.DISTANCES)
def test_distances(kind):
    a = jnp.zeros((2, 4, 4, 1))
    b = a.at[1].set(0.1)
    d = consistency.distance(a, b, kind)
    assert float(d[0]) == 0.0
    if kind == "l2":
        np.testing.assert_allclose(d[1], 0.01, rtol=1e-6)
    else:  # sqrt(16 * 0.01 + c^2) - c, c = 0.00054 * 4
        c = 0.00054 * 4
        np.testing.assert_allclose(d[1], np.sqrt(0.16 + c * c) - c, rtol=1e-6)


def test_consistency_sampler_compiles_once_per_step_count():
    """One lax.scan per step count: a new rng or x_T never retraces the model (the scan
    body is traced once per compile)."""
    calls = []

    def counting_model(x, t):
        calls.append(1)
        return gaussian_eps(0.3, 0.5)(x, t)

    outs = {}
    for n in (1, 2, 4, 1, 2, 4):
        outs[n] = samplers.sample(counting_model, SCHED, jax.random.key(len(calls)), (8, 1, 1, 1),
                                  sampler="consistency", num_steps=n, spacing="trailing")  # fmt: skip
    assert len(calls) == 3
    assert samplers.num_function_evals("consistency", 2, T) == 2


def test_distillation_run_resumes_and_samples_from_the_cli(tmp_path, digits_dir):
    """A tiny class-conditional teacher, then distillation through the trainer: the student
    starts from the teacher's weights (step 0 state = teacher EMA), resumes exactly, and
    the sample CLI draws 1- and 2-step consistency samples with labels. A student whose
    model differs from the teacher's is refused in one line."""
    common = {"data.data_dir": str(digits_dir), "model.num_classes": 10}
    teacher = str(tmp_path / "teacher")
    train.train_and_evaluate(tiny_config(**common), teacher)
    _, _, teacher_state = workdir.load_state(teacher)

    student = str(tmp_path / "student")
    distill = {
        **common,
        "consistency.mode": "distill",
        "consistency.teacher": teacher,
        "consistency.num_grid_steps": 10,
        "consistency.teacher_guidance": 2.0,
        "sampler.name": "consistency",
        "sampler.spacing": "trailing",
        "optim.ema_decay": 0.95,
        "optim.ema_warmup": False,
        "train.num_steps": 4,
    }
    first = train.train_and_evaluate(tiny_config(**distill), student)
    assert int(first.step) == 4
    moved = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(teacher_state.ema_params))
    )
    assert 0 < moved < 0.1  # started from the teacher, then trained
    resumed = train.train_and_evaluate(tiny_config(**{**distill, "train.num_steps": 8}), student)
    straight = train.train_and_evaluate(
        tiny_config(**{**distill, "train.num_steps": 8}), str(tmp_path / "straight")
    )
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
        np.testing.assert_array_equal(a, b)

    for n in (1, 2):
        r = cli("diffusion_jax.sample", f"--workdir={student}", "--num_samples=4",
                "--labels=3", f"--config.sampler.num_steps={n}", f"--npz={tmp_path}/s{n}.npz")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"sampler consistency, {n} steps" in r.stdout
        assert np.load(tmp_path / f"s{n}.npz")["images"].shape == (4, 8, 8, 1)

    bad = tiny_config(**{**distill, "model.unet.base_channels": 8})
    with pytest.raises(workdir.ConfigError, match="model.unet.base_channels=8 differs"):
        train.train_and_evaluate(bad, str(tmp_path / "bad"))


def test_ct_curriculum_and_pair_distribution():
    """iCT's discretisation doubles N from 10 up to min(1280, T) in equal stages; each
    stage's pairs are adjacent grid indices ending at the boundary 0, drawn with the
    lognormal mass of their sigma interval (probabilities sum to 1, peak at mid noise)."""
    per_stage, sizes = consistency.ct_curriculum(T, 8000)
    assert sizes == [10, 20, 40, 80, 160, 320, 640, 1000] and per_stage == 1000
    hi, lo, weight, logp = consistency.ct_tables(SCHED, sizes)
    for k, n in enumerate(sizes):
        np.testing.assert_array_equal(hi[k, :n], consistency.grid(T, n))
        np.testing.assert_array_equal(lo[k, : n - 1], hi[k, 1:n])
        assert lo[k, n - 1] == 0 and np.all(weight[k, :n] > 0)
        p = np.exp(logp[k, :n].astype(np.float64))
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
        assert np.all(np.isneginf(logp[k, n:]))
    # sigma = sqrt((1 - ab) / ab) of the median pair (ascending in t) is near the lognormal's
    # median exp(P_mean) = 0.33
    k = len(sizes) - 1
    p = np.exp(logp[k].astype(np.float64))[::-1]
    median = hi[k][::-1][np.searchsorted(np.cumsum(p), 0.5)]
    sigma = np.sqrt((1 - AB[median]) / AB[median])
    assert 0.2 < sigma < 0.55, sigma


def test_consistency_training_runs_from_scratch(tmp_path, digits_dir):
    c = tiny_config(**{"data.data_dir": str(digits_dir), "consistency.mode": "train",
                       "sampler.name": "consistency", "sampler.spacing": "trailing"})  # fmt: skip
    state = train.train_and_evaluate(c, str(tmp_path / "ct"))
    assert int(state.step) == 8
    with open(tmp_path / "ct" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if "train/loss" in line]
    assert all(np.isfinite(r["train/loss"]) for r in records)
    assert records[-1]["train/ct_grid_size"] == 100  # tiny (T = 100): the last stage, N = T
    bad = tiny_config(**{"data.data_dir": str(digits_dir), "consistency.mode": "train",
                         "consistency.teacher": str(tmp_path / "ct")})  # fmt: skip
    with pytest.raises(workdir.ConfigError, match="without a teacher"):
        train.train_and_evaluate(bad, str(tmp_path / "bad"))
