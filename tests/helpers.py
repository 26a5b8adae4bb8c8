"""Code the test modules share (no test module imports another): the tiny config with
overrides, synthetic batches, running the CLIs in a subprocess, restoring a workdir's
state, comparing parameter trees, lowering the samplers' scan, holding a workdir's lock
from another process; and, each for a pair of modules split by topic, the tiny models
(test_models, test_model_init), float64 schedule references (test_objectives,
test_diffusion_loss) and the digits data config (test_data, test_data_named)."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import tiny
from diffusion_jax import samplers, timesteps, workdir
from diffusion_jax.models import build_model
from diffusion_jax.schedules import make_schedule

from oracles import SCHED, T, gaussian_eps_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """configs/tiny.py with {"section.key": value} overrides (any depth: "model.unet.dropout")."""
    c = tiny.get_config()
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = c
        for part in path:
            node = node[part]
        node[name] = value
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


# --------------------------------------------------------------------------- tiny models
# test_models.py, test_model_init.py

TINY_NUM_CLASSES = 3
UNET_TINY = dict(
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    num_heads=2,
    dropout=0.5,
    norm_groups=4,
)
DIT_TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2)
TINY_MODEL_SHAPES = {"unet": (8, 8, 1), "dit": (8, 8, 4)}


def tiny_model_cfg(name, num_classes=TINY_NUM_CLASSES, compute_dtype="float32", **arch):
    """A model config: the tiny ``name`` ("unet" or "dit") with ``arch`` overrides."""
    base = {"unet": UNET_TINY, "dit": DIT_TINY}[name]
    return {
        "name": name,
        "num_classes": num_classes,
        "compute_dtype": compute_dtype,
        name: dict(base, **arch),
    }


def _model_inputs(shape, batch=4, seed=0):
    x = jax.random.normal(jax.random.key(seed), (batch, *shape), jnp.float32)
    t = jnp.arange(batch, dtype=jnp.int32) * 250  # distinct timesteps 0, 250, 500, 750
    y = jnp.arange(batch, dtype=jnp.int32) % TINY_NUM_CLASSES
    return x, t, y


def perturb_params(params, seed=1, scale=0.3):
    """Random non-zero parameters: a fresh model's zero-initialized output layers would
    make every output 0 and hide the effect of t, y and dropout. Drawn with numpy on the
    host: eager jax.random per leaf shape would compile once per shape."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


class TinyModel:
    """A tiny class-conditional model with real init and one jitted eval / train apply
    each, shared by all tests of a module (few compiles). The init uses an 'rbg' PRNG key:
    same distributions, but XLA compiles it several times faster than threefry on CPU."""

    def __init__(self, name):
        self.model = build_model(tiny_model_cfg(name))
        self.x, self.t, self.y = _model_inputs(TINY_MODEL_SHAPES[name])
        self.params = jax.jit(self.model.init)(
            jax.random.key(0, impl="rbg"), self.x, self.t, self.y
        )
        self.perturbed = perturb_params(self.params)

        # A trace counter of this instance: every test that calls it also checks that
        # nothing retraces (all calls share shapes and dtypes).
        self.traces = 0

        def forward(params, x, t, y):
            self.traces += 1  # the Python body runs once per trace
            assert self.traces == 1, f"TinyModel({name!r}).eval_fn retraced"
            return self.model.apply(params, x, t, y)  # train=False

        self.eval_fn = jax.jit(forward)
        self.train_fn = jax.jit(
            lambda p, x, t, y, rng: self.model.apply(p, x, t, y, train=True, rngs={"dropout": rng})
        )


# --------------------------------------------------------------------------- schedules
# test_objectives.py, test_diffusion_loss.py

MC_K = 5  # Monte Carlo tolerance in standard errors.


def f64(x):
    return np.asarray(x, dtype=np.float64)


def ref_alpha_bar(name, T, zero_terminal_snr=False):
    """alpha_bar in float64 from the paper formulas (independent of diffusion_jax)."""
    if name == "linear":
        betas = (1000 / T) * np.linspace(1e-4, 0.02, T)
    elif name == "cosine":
        f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
        ab = f(np.arange(T + 1) / T) / f(0.0)
        betas = np.minimum(1 - ab[1:] / ab[:-1], 0.999)
    else:
        raise AssertionError(name)
    ab = np.cumprod(1 - betas)
    if zero_terminal_snr:  # Lin et al. 2024, Alg. 1
        sq = np.sqrt(ab)
        ab = ((sq - sq[-1]) * sq[0] / (sq[0] - sq[-1])) ** 2
    return ab


@functools.lru_cache(maxsize=None)
def cached_schedule(name="linear", T=1000, zero_terminal_snr=False):
    """make_schedule, built once per arguments."""
    return make_schedule(name, T, zero_terminal_snr=zero_terminal_snr)


# --------------------------------------------------------------------------- digits data
# test_data.py, test_data_named.py

DIGITS_NUM_TRAIN, DIGITS_NUM_TEST = 1498, 299  # sklearn index i is a test example iff i % 6 == 5


def digits_data_cfg(data_dir, **overrides):
    """A data config: the bundled digits at 8x8, unflipped, no worker processes; overrides."""
    cfg = dict(
        name="digits",
        data_dir=str(data_dir),
        split="train",
        image_size=8,
        random_flip=False,
        worker_count=0,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def take(iterator, num_batches):
    return [next(iterator) for _ in range(num_batches)]


def tiny_glyph_judge(monkeypatch):
    """Make the glyphs attribute judge (evaluation/glyph_net.py) train with a tiny recipe:
    the real one trains for minutes."""
    from diffusion_jax.evaluation import glyph_net

    tiny = dict(
        glyph_net._GLYPH_RECIPE,
        widths=(8, 16, 32),
        feature_dim=32,
        num_renders=2_000,
        epochs=1,
        batch_size=32,
        num_eval=200,
    )
    monkeypatch.setattr(glyph_net, "_GLYPH_RECIPE", tiny)
