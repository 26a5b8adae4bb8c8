"""Data parallelism over all devices of all processes, two ways from one pure step:

* ``jit``  (default): global arrays on a ('data',) mesh; the batch is sharded along its
  first axis, the state replicated; XLA inserts the gradient all-reduce. Extends to
  sharding parameters of big models by changing the state sharding.
* ``pmap``: the classic per-device program with explicit ``lax.pmean``; the state carries
  a leading device axis.

The rest of the code sees one canonical state (global arrays replicated on the mesh),
converted at the boundary by ``DataParallel``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from flax import jax_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
MODES = ("jit", "pmap")


def make_mesh(devices=None) -> Mesh:
    """A 1-D ('data',) mesh over ``devices`` (default: all devices of all processes).
    Auto axis type: with jax.make_mesh's default Explicit axes, linen Dropout inside a
    batch-sharded jitted step fails with a ShardingTypeError (jax 0.10.2)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Shard axis ``leading_axes`` (0: [B, ...]; 1: [k, B, ...] for scanned steps)."""
    return NamedSharding(mesh, P(*([None] * leading_axes), AXIS))


def check_batch_size(global_batch: int, num_devices: int) -> None:
    if global_batch % num_devices:
        raise ValueError(
            f"train.batch_size={global_batch} is not divisible by the {num_devices} devices; "
            f"set --config.train.batch_size to a multiple of {num_devices}"
        )


def host_value_to_global(value, sharding: NamedSharding) -> jax.Array:
    """A host value that every process holds identically -> a global array with ``sharding``."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def replicate_host_value(value: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host value that every process holds identically -> a global replicated array."""
    return host_value_to_global(value, replicated(mesh))


# Generous: a process may be compiling a big model while the others wait here.
SYNC_TIMEOUT_S = 1800


def sync_processes(name: str, timeout_s: int = SYNC_TIMEOUT_S) -> None:
    """Block until every process has reached the barrier ``name`` (no-op for one process).

    Call it between compiling a multi-process program and its first run. The barrier is
    the coordination service's (a message to process 0), not a device collective: on CPU
    a gloo collective whose peers arrive more than 30 s apart fails ("Gloo context
    initialization failed: DEADLINE_EXCEEDED"; not configurable in jaxlib 0.10.2), and two
    processes compiling the same step on a loaded machine can drift that far apart.
    ``multihost_utils.sync_global_devices`` is itself such a collective, so it cannot help.
    """
    if jax.process_count() == 1:
        return
    coordination_client().wait_at_barrier(f"diffusion_jax:{name}", timeout_in_ms=timeout_s * 1000)


def coordination_client():
    """The client of jax.distributed's coordination service (its key-value store and
    barriers). jax 0.10.2 has no public accessor, so this is the one place that reaches
    into ``jax._src``; tests/test_parallel.py fails loudly if that path moves."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized: no coordination service")
    return client


def gather_to_host(x: jax.Array, name: str = "gather") -> np.ndarray:
    """A global (possibly multi-process) array as one host numpy array on every process.
    Multi-process: the processes first meet at a barrier, since ``x`` is typically the
    output of a program that each process just compiled at its own speed."""
    if x.is_fully_addressable:
        return np.asarray(x)
    sync_processes(name)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def precompile_and_sync(fn, *args, name: str) -> None:
    """Compile the jitted or pmapped ``fn`` for ``args``, then meet the other processes
    (`sync_processes`), so that the collectives in the first ``fn(*args)`` start together.
    The next call reuses this compilation from jax's cache (tests/test_train.py checks)."""
    fn.lower(*args).compile()
    sync_processes(f"compiled:{name}")


def scan_steps(train_step: Callable) -> Callable:
    """Several updates per dispatch: ``(state, batches[k, ...]) -> (state, metrics[k, ...])``.
    Cuts Python dispatch overhead for small models; identical math to k single steps."""

    def multi_step(state, batches):
        return jax.lax.scan(train_step, state, batches)

    return multi_step


@dataclasses.dataclass(frozen=True)
class _WithFrozen:
    """A compiled ``step(state, batch, frozen)`` with ``frozen`` bound: called and lowered
    as ``(state, batch)``."""

    step: Callable
    frozen: object

    def __call__(self, state, batch):
        return self.step(state, batch, self.frozen)

    def lower(self, state, batch):
        return self.step.lower(state, batch, self.frozen)


@dataclasses.dataclass
class DataParallel:
    """Moves states and batches between the canonical form and the ``mode``'s form and
    compiles the step for it."""

    mode: str
    mesh: Mesh

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown train.parallel {self.mode!r}; valid: {list(MODES)}")

    @property
    def state_sharding(self) -> NamedSharding:
        return replicated(self.mesh)

    def compile(self, make_step: Callable[..., Callable], steps_per_dispatch: int = 1, frozen=None):
        """``make_step(axis_name)`` -> pure step; returns the compiled, state-donating one.
        With ``steps_per_dispatch > 1`` the step is scanned over a stack of batches.

        ``frozen``: a pytree of arrays the step reads but never updates (an adapter's base
        parameters, a distillation teacher's). The step is then ``step(state, batch, frozen)``; the arrays are placed
        (replicated) once and passed as arguments, not baked into the program as constants,
        and the returned callable still takes ``(state, batch)``."""
        scanned = steps_per_dispatch > 1
        step = make_step(None if self.mode == "jit" else AXIS)
        if frozen is not None:
            with_frozen = step

            def step(state, batches, fixed):
                one = lambda s, b: with_frozen(s, b, fixed)
                return (scan_steps(one) if scanned else one)(state, batches)

        elif scanned:
            step = scan_steps(step)
        if self.mode == "jit":
            shardings = (self.state_sharding, batch_sharding(self.mesh, int(scanned)))
            compiled = jax.jit(
                step,
                in_shardings=shardings + ((self.state_sharding,) if frozen is not None else ()),
                out_shardings=(self.state_sharding, self.state_sharding),
                donate_argnums=0,
            )
        else:
            compiled = jax.pmap(step, axis_name=AXIS, donate_argnums=0)
        if frozen is None:
            return compiled
        return _WithFrozen(compiled, self._put_frozen(frozen))

    def _put_frozen(self, tree):
        """Host arrays every process holds identically -> the mode's replicated form."""
        host = jax.tree.map(np.asarray, jax.device_get(tree))
        if self.mode == "jit":
            return jax.tree.map(lambda x: replicate_host_value(x, self.mesh), host)
        return jax_utils.replicate(host, devices=jax.local_devices())

    def put_state(self, state):
        if self.mode == "jit":
            return jax.device_put(state, self.state_sharding)
        # pmap: this process's copy, stacked over its local devices
        local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)
        return jax_utils.replicate(local, devices=jax.local_devices())

    def get_state(self, state):
        """Canonical (replicated global) state, for checkpoints and sampling."""
        if self.mode == "jit":
            return state
        return jax.tree.map(
            lambda x: replicate_host_value(np.asarray(x), self.mesh), jax_utils.unreplicate(state)
        )

    def put_batch(self, local_batch: dict, steps_per_dispatch: int = 1):
        """This process's rows -> the mode's global batch. ``local_batch`` arrays are
        [b, ...] or, scanned, [k, b, ...]."""
        scanned = steps_per_dispatch > 1
        if self.mode == "jit":
            sharding = batch_sharding(self.mesh, int(scanned))

            def put(x):
                shape = list(x.shape)
                shape[int(scanned)] *= jax.process_count()
                return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

            return jax.tree.map(put, local_batch)
        n = jax.local_device_count()

        def split(x):  # [b, ...] -> [n, b/n, ...]; scanned [k, b, ...] -> [n, k, b/n, ...]
            if scanned:
                k, b = x.shape[:2]
                return np.swapaxes(x.reshape(k, n, b // n, *x.shape[2:]), 0, 1)
            return x.reshape(n, x.shape[0] // n, *x.shape[1:])

        return jax.tree.map(split, local_batch)

    def get_metrics(self, metrics):
        """Metrics as host numpy; pmap metrics are identical across devices (pmean/psum)."""
        if self.mode == "pmap":
            metrics = jax.tree.map(lambda x: x[0], metrics)
        return jax.tree.map(np.asarray, jax.device_get(metrics))
