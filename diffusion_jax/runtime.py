"""Process setup before any device is touched: XLA flags for the CPU, the persistent
compilation cache, JAX's multi-controller runtime (jax.distributed) and log verbosity.
The CLIs call these first; nothing else in the package depends on them. And one thing
for later: handing the compiler's freed memory back to the OS (``release_freed_memory``).
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Optional

import jax
from absl import logging as absl_logging

log = logging.getLogger(__name__)

# Environment variables that mark a cluster where jax.distributed.initialize() can find
# its coordinator, process count and id by itself (TPU pod slices, SLURM, Open MPI).
_CLUSTER_ENV = (
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
)


def initialize_distributed(
    coordinator_address: str = "",
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    mode: str = "auto",
) -> None:
    """Start JAX's multi-controller runtime (one Python process per host).

    mode "off": single process. "on": always call jax.distributed.initialize, with the
    given address/count/id or, if not given, auto-detected (TPU, SLURM, MPI). "auto": like
    "on" when an address is given or a known cluster environment is detected, else off.
    Must run before anything touches a device.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"unknown multihost mode {mode!r}; valid: ['auto', 'on', 'off']")
    detected = [k for k in _CLUSTER_ENV if k in os.environ]
    if mode == "off" or (mode == "auto" and not coordinator_address and not detected):
        return
    kwargs = {}
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        kwargs = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices%s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        f" (detected {detected})" if detected else "",
    )


# XLA:CPU in jaxlib 0.10.2 sends convolutions to YNNPACK, whose weight-gradient conv runs
# ~3x slower than Eigen's; Eigen convolutions + YNNPACK reductions measured -31% (DDPM
# CIFAR-10 UNet) and -18% (digits UNet) per train step (benchmarks/README.md). CPU-only
# flag: other backends ignore it.
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"


def configure_cpu_xla_flags() -> None:
    """Add CPU_XLA_FLAGS to XLA_FLAGS unless the user set that option; must run before
    the first device use (JAX reads XLA_FLAGS when it starts its backend)."""
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in current:
        os.environ["XLA_FLAGS"] = f"{current} {CPU_XLA_FLAGS}".strip()


def release_freed_memory() -> None:
    """Return the heap pages this process has freed to the OS (glibc's ``malloc_trim(0)``;
    a no-op without glibc). Called once the train step is compiled: XLA's compiler frees
    hundreds of MB that glibc keeps in per-thread arenas, where the step's buffers, made
    on other threads, do not reuse them. Trimming there lowers the run's peak RSS
    (DDPM CIFAR-10 UNet, batch 8: 2.50 -> 2.02 GB; benchmarks/README.md)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


def setup_compilation_cache(cache_dir: str) -> None:
    """Persistent XLA cache, so a second run of the same config skips compilation
    (``cache_dir`` "" = ~/.cache/diffusion_jax/xla, "off" = disabled)."""
    if cache_dir == "off":
        return
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def setup_logging(verbosity: Optional[int]) -> None:
    """Console logs for people. ``verbosity=None`` (the default): only this package's own
    INFO lines (resumes, warnings) and every library's warnings; orbax's per-save INFO
    lines are hidden. An absl level (``--verbosity=0`` INFO, 1 DEBUG) shows every
    library's logs at that level."""
    absl_logging.use_absl_handler()  # one line format, under absl.app.run or not
    if verbosity is not None:
        absl_logging.set_verbosity(verbosity)
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("diffusion_jax").setLevel(logging.INFO)
