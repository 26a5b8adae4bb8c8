"""Code the test modules share (no test module imports another): the tiny config with
overrides, synthetic batches, running the CLIs in a subprocess, restoring a workdir's
state, comparing parameter trees, lowering the samplers' scan, and holding a workdir's
lock from another process."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from diffusion_jax import samplers, timesteps, workdir

from oracles import SCHED, T, gaussian_eps_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """configs/tiny.py with {"section.key": value} overrides."""
    c = tiny.get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def synthetic_batches(n, batch_size, shape=(8, 8, 1), seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.uniform(-1, 1, (batch_size, *shape)).astype(np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
        }
        for _ in range(n)
    ]


def cli(module, *args, timeout=600, env_extra=None):
    """Run ``python -m module args`` from the repository root; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def hold_lock(path):
    """A process that holds ``path``'s workdir lock until killed; returns it once it does."""
    code = (
        "import sys, time\n"
        "from diffusion_jax.lock import WorkdirLock\n"
        "with WorkdirLock(sys.argv[1]):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(600)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, path],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def load_state(workdir_path, step):
    """The host copy of a workdir's TrainState at ``step``."""
    return jax.device_get(workdir.load_state(workdir_path, step=step)[2])


def max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def lower_sampler_scan(sampler, num_steps):
    """Lower the samplers' jitted scan for ``num_steps`` steps of ``sampler`` (a step-rule
    name) on the Gaussian oracle. The model is a new function object each call, so nothing
    is reused from jit's caches and compile() really compiles."""
    ts = timesteps.ddim_timesteps(T, num_steps, "leading")
    model_fn = functools.partial(gaussian_eps_at, mu=0.3, s=0.5)
    return samplers._scan_sample.lower(
        jax.tree_util.Partial(model_fn),
        SCHED,
        jnp.zeros((8, 4, 4, 3)),
        jnp.asarray(ts),
        jnp.asarray(np.append(ts[1:], -1).astype(np.int32)),
        jax.random.split(jax.random.key(0), num_steps),
        jnp.float32(0.0),
        update=sampler,
        prediction="eps",
        clip_x0=False,
        return_every=0,
    )
