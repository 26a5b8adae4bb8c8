"""Test setup: 8 fake CPU devices (must happen before jax is imported) and a shared
persistent compilation cache so repeated test runs compile once."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402  (import after XLA_FLAGS on purpose)

jax.config.update("jax_platforms", "cpu")
# Same persistent cache as training runs (train.setup_compilation_cache): a second test
# run skips most XLA compilation.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
