"""Code the test modules share (no test module imports another): the tiny config with
overrides, synthetic batches, running the CLIs in a subprocess, restoring a workdir's
state, and comparing parameter trees."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from diffusion_jax import workdir

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


def load_state(workdir_path, step):
    """The host copy of a workdir's TrainState at ``step``."""
    return jax.device_get(workdir.load_state(workdir_path, step=step)[2])


def max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
