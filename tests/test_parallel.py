"""parallel.py's one reach into private JAX: the coordination-service client behind the
multi-process barrier (jax 0.10.2 has no public accessor). If a JAX upgrade moves it, this
test fails here, by name, instead of a multi-host run hanging or crashing later."""

import pytest

from diffusion_jax import parallel


def test_coordination_client_path_exists_and_needs_distributed():
    # Single process, jax.distributed not initialized: the private path must still resolve
    # (an ImportError/AttributeError here means jax moved it) and say what is missing.
    with pytest.raises(RuntimeError, match="jax.distributed is not initialized"):
        parallel.coordination_client()


def test_sync_processes_is_a_no_op_for_one_process():
    parallel.sync_processes("single")  # must not touch the (absent) coordination service
