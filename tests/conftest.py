"""Test setup: 8 fake CPU devices (must happen before jax is imported) and a shared
persistent compilation cache so repeated test runs compile once."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402  (import after XLA_FLAGS on purpose)

jax.config.update("jax_platforms", "cpu")
