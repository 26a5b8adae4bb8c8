"""diffusion_jax: denoising diffusion models in JAX/Flax."""
