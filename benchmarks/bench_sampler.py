"""Sampler overhead and compile time: DDIM-50 and DDPM-1000 (one jitted lax.scan each, via
steps.make_sample_fn, as train.py samples) against the same number of bare jitted forward
passes of the network, and the compile time of a 10-step vs a 1000-step sampler.

    .venv/bin/python benchmarks/bench_sampler.py                 # digits UNet, batch 16, ~2 min
    .venv/bin/python benchmarks/bench_sampler.py --config cifar10_ddpm --batch 8 --samplers ddim50
    .venv/bin/python benchmarks/bench_sampler.py --xla_options eigen_conv

Baseline "N bare forwards": a Python loop of N calls of ``jax.jit(model.apply)`` (eval
mode, the sampler's batch), each call fed the previous output so the calls form the same
dependency chain as the sampler, timed as one wall interval (async dispatch pipelines the
calls as it does in any Python loop). overhead = sampler time / baseline - 1: what the
scan, the DDIM/DDPM update math, the per-step noise and x0 clipping cost on top of the
network. Each number is the median of --repeats runs after a warmup run.

Compile time: lower+compile wall time of the whole sampler (jax.jit of make_sample_fn's
function, caches cleared before each, persistent cache off) for DDIM with 10 and with
1000 steps; the step count only changes the scan length, so the two should be equal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SAMPLERS = {"ddim50": ("ddim", 50), "ddpm1000": ("ddpm", 1000)}
SHAPES = {"digits_unet": (8, 8, 1), "cifar10_ddpm": (32, 32, 3), "dit_s2": (32, 32, 4)}


def build(config_name: str):
    import bench_train  # same configs as the train benchmark

    return bench_train.get_config(config_name)


def make_params(model, shape, conditional):
    """Initialized parameters with every leaf perturbed, so no output layer is all-zero
    (cost is value-independent, but the samples should not be trivially constant)."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1, *shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if conditional else None
    params = jax.jit(lambda k: model.init(k, x, t, y))(jax.random.key(0))["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda p: p + 0.01 * rng.standard_normal(p.shape).astype(p.dtype), params)


def sample_fn_for(model, schedule, cfg, shape, name: str, num_steps: int):
    import jax

    from diffusion_jax import steps

    cfg = cfg.copy_and_resolve_references()
    cfg.sampler.name = name
    cfg.sampler.num_steps = num_steps if name == "ddim" else cfg.sampler.num_steps
    return jax.jit(steps.make_sample_fn(model, schedule, cfg, shape))


def timed_compile(jitted, *args, compiler_options=None):
    import jax

    jax.clear_caches()
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options or None)
    return compiled, t1 - t0, time.perf_counter() - t1


def main():
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--config", default="digits_unet", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(
        "--samplers",
        default="ddim50,ddpm1000",
        help=f"comma-separated subset of {','.join(SAMPLERS)}",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs of samplers with <= 100 steps (median)"
    )
    p.add_argument(
        "--long_repeats",
        type=int,
        default=1,
        help="timed runs of longer samplers (DDPM-1000), no warmup run",
    )
    p.add_argument(
        "--compile_steps",
        default="10,1000",
        help="DDIM step counts whose compile time is compared ('' to skip)",
    )
    p.add_argument(
        "--xla_options",
        default="default",
        help="per-compile XLA options: a preset ("
        f"{', '.join(common.XLA_OPTION_PRESETS)}) or a JSON object",
    )
    p.add_argument("--json", action="store_true", help="also print one machine-readable line")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    common.disable_compilation_cache()
    from diffusion_jax import schedules
    from diffusion_jax.models import build_model

    opts = common.xla_options_from_arg(args.xla_options)
    load0 = common.load_average()[0]
    print(f"# bench_sampler: {common.describe_machine()}", flush=True)
    cfg = build(args.config)
    shape = SHAPES[args.config]
    full_shape = (args.batch, *shape)
    conditional = cfg.model.num_classes > 0
    model = build_model(cfg.model)
    schedule = schedules.make_schedule(
        cfg.schedule.name,
        cfg.schedule.num_timesteps,
        zero_terminal_snr=cfg.schedule.zero_terminal_snr,
    )
    params = make_params(model, shape, conditional)
    labels = jnp.asarray(np.arange(args.batch) % max(cfg.model.num_classes, 1), jnp.int32)
    guidance = jnp.asarray(cfg.sampler.guidance_scale, jnp.float32)
    # classifier-free guidance runs the network on 2B images per step
    fwd_batch = 2 * args.batch if conditional else args.batch

    # ---- bare forward
    def forward(params, x, t, y):
        return model.apply({"params": params}, x, t, y, train=False)

    x = jax.random.normal(jax.random.key(2), (fwd_batch, *shape), jnp.float32)
    t = jnp.full((fwd_batch,), 500, jnp.int32)
    y = jnp.zeros((fwd_batch,), jnp.int32) if conditional else None
    fwd, fwd_lower_s, fwd_compile_s = timed_compile(
        jax.jit(forward), params, x, t, y, compiler_options=opts
    )
    single = common.time_calls(
        lambda: fwd(params, x, t, y), max(5, args.repeats), warmup=2, block=jax.block_until_ready
    )

    def chain(n):
        h = x
        for _ in range(n):
            h = fwd(params, h, t, y)
        return h

    rows, result = (
        [],
        {
            "config": args.config,
            "batch": args.batch,
            "xla_options": opts,
            "fwd_single_s": common.median(single),
            "samplers": {},
        },
    )
    for key in filter(None, args.samplers.split(",")):
        name, n = SAMPLERS[key]
        fn = sample_fn_for(model, schedule, cfg, full_shape, name, n)
        compiled, lower_s, compile_s = timed_compile(
            fn, params, jax.random.key(3), labels, guidance, compiler_options=opts
        )
        # interleave sampler and baseline runs so load changes hit both alike
        s_times, b_times = [], []
        long = n > 100
        if not long:
            jax.block_until_ready(compiled(params, jax.random.key(3), labels, guidance))
            jax.block_until_ready(chain(n))
        for _ in range(args.long_repeats if long else args.repeats):
            s_times += common.time_calls(
                lambda: compiled(params, jax.random.key(3), labels, guidance),
                1,
                warmup=0,
                block=jax.block_until_ready,
            )
            b_times += common.time_calls(lambda: chain(n), 1, warmup=0, block=jax.block_until_ready)
        s, b = common.median(s_times), common.median(b_times)
        result["samplers"][key] = dict(
            steps=n,
            sampler_s=s,
            baseline_s=b,
            single_x_n_s=n * common.median(single),
            overhead=s / b - 1,
            lower_s=lower_s,
            compile_s=compile_s,
        )
        rows.append(
            [
                key,
                n,
                f"{s:.3f}",
                f"{b:.3f}",
                f"{n * common.median(single):.3f}",
                f"{100 * (s / b - 1):+.1f}%",
                f"{1e3 * s / n:.2f}",
                f"{lower_s:.1f}+{compile_s:.1f}",
            ]
        )
        print(
            f"  {key}: sampler {common.stats_line(s_times)}; {n} bare forwards "
            f"{common.stats_line(b_times)}",
            flush=True,
        )

    ctimes = []
    for n in [int(v) for v in filter(None, args.compile_steps.split(","))]:
        fn = sample_fn_for(model, schedule, cfg, full_shape, "ddim", n)
        _, lower_s, compile_s = timed_compile(
            fn, params, jax.random.key(3), labels, guidance, compiler_options=opts
        )
        ctimes.append((n, lower_s, compile_s))
    result["compile"] = [dict(steps=n, lower_s=lo, compile_s=co) for n, lo, co in ctimes]
    load1 = common.load_average()[0]

    print(
        f"\n{common.jax_versions()}; XLA options: {opts or 'default'}; "
        f"{args.config} batch {args.batch} ({'x'.join(map(str, shape))}, forward batch "
        f"{fwd_batch}); 1-min load avg {load0:.2f} at start, {load1:.2f} at end"
    )
    print(
        f"one bare forward: median {1e3 * common.median(single):.2f} ms "
        f"(compile {fwd_lower_s:.1f}+{fwd_compile_s:.1f} s)"
    )
    if rows:
        print(
            common.format_table(
                [
                    "sampler",
                    "steps",
                    "sampler s",
                    "N bare fwd s (chained loop)",
                    "N x single fwd s",
                    "overhead vs loop",
                    "ms/step",
                    "lower+compile s",
                ],
                rows,
            )
        )
    if ctimes:
        base = ctimes[0][1] + ctimes[0][2]
        print(
            common.format_table(
                ["DDIM steps", "lower s", "compile s", "total s", "ratio to first"],
                [
                    [n, f"{lo:.2f}", f"{co:.2f}", f"{lo + co:.2f}", f"{(lo + co) / base:.2f}"]
                    for n, lo, co in ctimes
                ],
            )
        )
    if args.json:
        result["load"] = [load0, load1]
        common.emit_json(result)


if __name__ == "__main__":
    main()
