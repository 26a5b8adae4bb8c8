"""Test setup, before anything touches a device:

* 8 fake CPU devices, so data-parallel code runs for real;
* the CLIs' CPU XLA flags (runtime.CPU_XLA_FLAGS), so in-process tests and the CLI
  subprocesses they start (which inherit XLA_FLAGS) compile identical programs and share
  the persistent compilation cache below;
* ``--xla_backend_optimization_level=0``: test programs run a handful of steps, so XLA's
  backend optimizations cost more than they save (halves compile time; measured: tiny
  train step 19 s -> 10-12 s). Benchmarks and real runs keep the default level.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_backend_optimization_level=0",
    ]
).strip()

import jax  # noqa: E402  (import after XLA_FLAGS on purpose)

from diffusion_jax import runtime  # noqa: E402

runtime.configure_cpu_xla_flags()
jax.config.update("jax_platforms", "cpu")
# Same persistent cache as training runs (runtime.setup_compilation_cache): a second test
# run skips most XLA compilation.
jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "xla"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402

from diffusion_jax import data  # noqa: E402

from helpers import TinyModel, digits_data_cfg  # noqa: E402

# ------------------------------------------------------------- fixtures shared by modules
# Module-scoped: each test module that asks builds its own (xdist runs modules apart).


@pytest.fixture(scope="module")
def tiny_unet():
    """helpers.TinyModel("unet"): the tiny UNet with params and inputs."""
    return TinyModel("unet")


@pytest.fixture(scope="module")
def tiny_dit():
    return TinyModel("dit")


@pytest.fixture(params=["unet", "dit"])
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """A data_dir holding the bundled digits dataset, built once per module."""
    path = tmp_path_factory.mktemp("tfds")
    data.dataset_spec(digits_data_cfg(path))
    return path
