"""The latent pipeline's throughput: encoding a dataset with the autoencoder, the latent
diffusion train step next to the same network on pixels, and sampling through the decoder.

    .venv/bin/python benchmarks/bench_latent.py                  # ~3 min on 2 cores
    .venv/bin/python benchmarks/bench_latent.py --skip_train --batch 512

Rows (each the median of --repeats calls after a warmup, jitted, persistent cache off):
- encode / decode: images/s of ``autoencoding.encode`` (posterior mean, what
  ``diffusion_jax.encode`` stores) and ``autoencoding.decode`` of the autoencoder of
  configs/fashion_autoencoder.py (32x32x1 -> 8x8x4) at --batch. The weights are random:
  the cost of a network does not depend on its values.
- train step: bench_train.py's rows ``fashion_ldm`` (the DiT of configs/fashion_ldm.py on
  8x8x4 latents, 16 tokens) and ``fashion_ldm_pixels`` (the same DiT on the 32x32x1 images,
  256 tokens), each in its own process: what working in latent space buys per step.
- sample: DDIM-50 with classifier-free guidance (the config's scale: two network passes
  per step) of --sample_batch latents, then their decode, as ``diffusion_jax.sample``
  does it (``steps.make_sample_fn`` wrapped by ``latent_space.wrap_sample_fn``'s decode).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PIXELS = (32, 32, 1)  # Fashion-MNIST padded to 32x32, the autoencoder's input


def random_params(model, *inputs):
    """Initialised parameters, every leaf perturbed (no all-zero output layer)."""
    import jax

    params = jax.jit(model.init)(jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda p: p + 0.01 * rng.standard_normal(p.shape).astype(p.dtype), params)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(compile seconds of the first call, median seconds of ``repeats`` later calls)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    return first, common.median(common.time_calls(fn, repeats, block=jax.block_until_ready))


def autoencoder_rows(batch: int, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from configs import fashion_autoencoder
    from diffusion_jax import autoencoding
    from diffusion_jax.models import build_model, count_params

    model = build_model(fashion_autoencoder.get_config().model)
    x = jax.random.uniform(jax.random.key(2), (batch, *PIXELS), jnp.float32, -1, 1)
    params = random_params(model, x[:1])
    encode = jax.jit(lambda p, x: autoencoding.encode(model, p, x)[0])
    z = encode(params, x)
    decode = jax.jit(lambda p, z: autoencoding.decode(model, p, z))
    rows = []
    for name, fn in (("encode", lambda: encode(params, x)), ("decode", lambda: decode(params, z))):
        first, s = timed(fn, repeats)
        rows.append(
            dict(
                row=f"{name} (autoencoder {count_params(params) / 1e6:.2f}M, "
                f"{'x'.join(map(str, PIXELS))} <-> {'x'.join(map(str, z.shape[1:]))})",
                batch=batch,
                seconds=s,
                images_per_s=batch / s,
                first_call_s=first,
            )
        )
    return rows


def sample_row(batch: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from configs import fashion_autoencoder, fashion_ldm
    from diffusion_jax import autoencoding, latent_space, schedules, steps
    from diffusion_jax.models import build_model

    cfg = fashion_ldm.get_config()
    cfg.sampler.name, cfg.sampler.num_steps = "ddim", 50
    ae = build_model(fashion_autoencoder.get_config().model)
    ae_params = random_params(ae, jnp.zeros((1, *PIXELS), jnp.float32))
    latent_shape = autoencoding.encode(ae, ae_params, jnp.zeros((1, *PIXELS)))[0].shape[1:]
    model = build_model(cfg.model)
    x, t, y = (jnp.zeros((1, *latent_shape)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), int))
    params = random_params(model, x, t, y)
    schedule = schedules.make_schedule(cfg.schedule.name, cfg.schedule.num_timesteps)
    space = latent_space.LatentSpace(ae, ae_params, scale_factor=1.0, metadata={})
    fn = latent_space.wrap_sample_fn(
        steps.make_sample_fn(model, schedule, cfg, (batch, *latent_shape)), space
    )
    both = (params, ae_params)
    labels = jnp.arange(batch, dtype=jnp.int32) % cfg.model.num_classes
    scale = jnp.float32(cfg.sampler.guidance_scale)
    sample = jax.jit(lambda p, key: fn(p, key, labels, scale))
    first, s = timed(lambda: sample(both, jax.random.key(3)), repeats)
    return dict(
        row=f"sample: DDIM-50 + CFG {cfg.sampler.guidance_scale:g} on latents, then decode",
        batch=batch,
        seconds=s,
        images_per_s=batch / s,
        first_call_s=first,
    )


def train_rows() -> list[dict]:
    """bench_train.py's two latent rows, each in a fresh process."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_train.py")
    rows = []
    for name in ("fashion_ldm", "fashion_ldm_pixels"):
        r = common.run_child(common.self_argv(script) + ["--child", name])
        rows.append(
            dict(
                row=f"train step: {name} ({'x'.join(map(str, r['shape']))}, "
                f"{r['params'] / 1e6:.2f}M)",
                batch=r["batch"],
                seconds=r["step_s"],
                images_per_s=r["images_per_s"],
                first_call_s=r["lower_s"] + r["compile_s"],
                peak_rss_mb=r["peak_rss_mb"],
            )
        )
    return rows


def main():
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--batch", type=int, default=256, help="images per encode / decode call")
    p.add_argument("--sample_batch", type=int, default=64, help="images per sampler call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    p.add_argument("--skip_train", action="store_true", help="no train-step rows")
    args = p.parse_args()

    from diffusion_jax import runtime

    runtime.configure_cpu_xla_flags()  # what every CLI runs with
    common.disable_compilation_cache()
    load0 = common.load_average()[0]
    print(f"# bench_latent: {common.describe_machine()}", flush=True)
    rows = autoencoder_rows(args.batch, args.repeats)
    rows.append(sample_row(args.sample_batch, max(1, args.repeats // 2)))
    if not args.skip_train:
        rows += train_rows()
    print(
        common.format_table(
            ["row", "batch", "s per call", "images/s", "first call s"],
            [
                [r["row"], r["batch"], f"{r['seconds']:.3f}", f"{r['images_per_s']:.0f}"]
                + [f"{r['first_call_s']:.1f}"]
                for r in rows
            ],
        )
    )
    print(f"# load average {load0:.2f} -> {common.load_average()[0]:.2f}")


if __name__ == "__main__":
    main()
