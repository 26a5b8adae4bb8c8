"""Train-step throughput: images/s, achieved FLOP/s vs the measured matmul peak, compile
time and peak memory of the REAL step (steps.make_train_step, jitted by
parallel.DataParallel("jit") on a 1-device mesh, state from state.create_train_state).

    .venv/bin/python benchmarks/bench_train.py                       # all four, ~2 min
    .venv/bin/python benchmarks/bench_train.py --configs cifar10_ddpm --batch cifar10_ddpm=16
    .venv/bin/python benchmarks/bench_train.py --xla_options default,eigen_conv_ynn_reduce
    .venv/bin/python benchmarks/bench_train.py --configs digits_unet --steps_per_dispatch 4 \
        --conv_impl explicit_grad        # scanned steps: needs UNet.conv_impl (see README)

Each config runs in a fresh subprocess, so "peak RSS" is that config's own high-water mark
(ru_maxrss: JAX runtime + state + compiler + buffers). In that process: build the state,
measure the f32 matmul peak (2048^3, 2 FLOPs per multiply-add), lower+compile the step
(wall time, persistent compilation cache off), run --warmup steps, then time --steps steps
(each waited for) and take the median. Achieved FLOP/s = XLA cost-analysis FLOPs of the
compiled step (multiply-add = 2, the same convention as the peak) / median step time.
The peak is measured just before and just after the timed steps and averaged, so a load
change on a shared machine shows up as a gap between the two (printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)

CONFIGS = ("digits_unet", "digits_dit", "cifar10_ddpm", "dit_s2")
# Rows run on request (--configs; benchmarks/bench_latent.py runs them): the latent DiT of
# configs/fashion_ldm.py on its 8x8x4 latents, and the same network on the 32x32x1 pixels
# those latents encode (patch 2: 256 tokens instead of 16), what the latent space buys.
LATENT_CONFIGS = ("fashion_ldm", "fashion_ldm_pixels")
DEFAULT_BATCH = {"digits_unet": 128, "digits_dit": 128, "cifar10_ddpm": 8, "dit_s2": 8}
DEFAULT_BATCH.update(fashion_ldm=128, fashion_ldm_pixels=128)
# image shape (H, W, C) each config is benchmarked at
SHAPES = {
    "digits_unet": (8, 8, 1),
    "digits_dit": (8, 8, 1),
    "cifar10_ddpm": (32, 32, 3),
    "dit_s2": (32, 32, 4),
    "fashion_ldm": (8, 8, 4),
    "fashion_ldm_pixels": (32, 32, 1),
}
DESCRIPTION = {
    "digits_unet": "UNet digits preset (configs/digits_unet.py), uncond.",
    "digits_dit": "DiT digits (configs/digits_dit.py), 4.2M, 10 classes, 16 tokens",
    "cifar10_ddpm": "UNet DDPM CIFAR-10 (configs/cifar10_ddpm.py), 35.7M, uncond.",
    "dit_s2": "DiT-S/2 (configs/base.py, model.name=dit), 1000 classes, 32x32x4",
    "fashion_ldm": "latent DiT (configs/fashion_ldm.py), 10 classes, 8x8x4 latents",
    "fashion_ldm_pixels": "the same DiT on 32x32x1 Fashion pixels (256 tokens)",
}


def get_config(name: str):
    """The config a row benchmarks, built from configs/ (never a copy of their values)."""
    from configs import base, cifar10_ddpm, digits_dit, digits_unet, fashion_ldm

    if name in LATENT_CONFIGS:
        return fashion_ldm.get_config()  # the shape (SHAPES) tells the two rows apart
    if name == "digits_unet":
        return digits_unet.get_config()
    if name == "digits_dit":
        return digits_dit.get_config()
    if name == "cifar10_ddpm":
        return cifar10_ddpm.get_config()
    if name == "dit_s2":
        # DiT-S/2 on 32x32x4 latents (the paper's ImageNet-256 setting, eps-only output),
        # class-conditional so label dropout / the label table are in the step.
        c = base.get_config()
        c.model.name = "dit"
        c.model.num_classes = 1000
        c.model.dit.update(dict(patch_size=2, hidden_size=384, depth=12, num_heads=6))
        return c
    raise ValueError(f"unknown config {name!r}; valid: {list(CONFIGS + LATENT_CONFIGS)}")


# --------------------------------------------------------------------------- child


def run_one(
    name: str,
    batch_size: int,
    steps: int,
    warmup: int,
    k: int,
    xla_options: dict,
    matmul_n: int,
    conv_impl: str = "",
    malloc_trim: bool = True,
) -> dict:
    import jax

    common.disable_compilation_cache()
    from diffusion_jax import parallel, runtime, schedules, steps as steps_lib
    from diffusion_jax.models import build_model, count_params
    from diffusion_jax.state import create_train_state, make_optimizer

    # where the peak RSS comes from: (current, peak) MB after each stage
    memory = {"runtime": (common.rss_mb(), common.peak_rss_mb())}
    cfg = get_config(name)
    cfg.train.batch_size = batch_size
    cfg.train.steps_per_dispatch = k
    if conv_impl and cfg.model.name == "unet":
        # needs UNet.conv_impl (models/conv.py); build_model names the problem if it is absent
        cfg.model.unet.conv_impl = conv_impl
    shape = SHAPES[name]
    model = build_model(cfg.model)
    schedule = schedules.make_schedule(
        cfg.schedule.name,
        cfg.schedule.num_timesteps,
        zero_terminal_snr=cfg.schedule.zero_terminal_snr,
    )
    tx = make_optimizer(cfg.optim, cfg.train.num_steps)
    dp = parallel.DataParallel("jit", parallel.make_mesh(jax.devices()[:1]))
    state = create_train_state(model, tx, shape, cfg.seed, out_sharding=dp.state_sharding)
    n_params = count_params(state.params)
    jax.block_until_ready(state)
    memory["state"] = (common.rss_mb(), common.peak_rss_mb())

    rng = np.random.default_rng(0)
    lead = (k, batch_size) if k > 1 else (batch_size,)
    host_batch = {
        "image": rng.uniform(-1, 1, lead + shape).astype(np.float32),
        "label": rng.integers(0, max(cfg.model.num_classes, 1), lead).astype(np.int32),
    }
    batch = dp.put_batch(host_batch, k)

    step = dp.compile(
        lambda axis: steps_lib.make_train_step(model, tx, schedule, cfg, axis_name=axis), k
    )
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=xla_options or None)
    t2 = time.perf_counter()
    memory["compiled"] = (common.rss_mb(), common.peak_rss_mb())
    if malloc_trim:
        runtime.release_freed_memory()  # as train.py does once the step is compiled
    # XLA counts a while-loop body once, so with k > 1 this is already per step.
    flops_per_step = common.cost_flops(compiled)

    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    peak_before = common.measure_matmul_peak(matmul_n)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    memory["steps"] = (common.rss_mb(), common.peak_rss_mb())
    peak_after = common.measure_matmul_peak(matmul_n)
    loss = float(np.asarray(metrics["loss"]).mean())
    assert np.isfinite(loss), f"{name}: non-finite loss {loss}"

    step_s = common.median(times) / k
    peak = 0.5 * (peak_before["gflops_median"] + peak_after["gflops_median"])
    achieved = flops_per_step / step_s / 1e9
    out = dict(
        config=name,
        batch=batch_size,
        shape=list(shape),
        params=n_params,
        k=k,
        conv_impl=conv_impl or "config",
        xla_options=xla_options,
        step_s=step_s,
        step_times=[x / k for x in times],
        images_per_s=batch_size / step_s,
        gflop_per_step=flops_per_step / 1e9,
        achieved_gflops=achieved,
        peak_gflops=peak,
        peak_before=peak_before["gflops_median"],
        peak_after=peak_after["gflops_median"],
        peak_best=max(peak_before["gflops_best"], peak_after["gflops_best"]),
        ratio=achieved / peak,
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        peak_rss_mb=common.peak_rss_mb(),
        memory_by_stage=memory,
        loss=loss,
        load_end=common.load_average()[0],
    )
    out.update(common.memory_stats_mb(compiled))
    return out


# --------------------------------------------------------------------------- parent


def parse_batches(spec: str) -> dict:
    batches = dict(DEFAULT_BATCH)
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in DEFAULT_BATCH or not value:
            raise SystemExit(
                f"--batch wants NAME=INT[,NAME=INT] with NAME in {list(DEFAULT_BATCH)}; "
                f"got {item!r}"
            )
        batches[key] = int(value)
    return batches


def print_table(results, header_line):
    rows = []
    for r in results:
        rows.append(
            [
                r["config"],
                r.get("xla_preset", "default")
                + ("" if r.get("conv_impl", "config") == "config" else f" +{r['conv_impl']}"),
                f"{r['params'] / 1e6:.2f}M",
                r["batch"],
                "x".join(map(str, r["shape"])),
                r["k"],
                f"{1e3 * r['step_s']:.0f}",
                f"{r['images_per_s']:.1f}",
                f"{r['gflop_per_step']:.1f}",
                f"{r['achieved_gflops']:.1f}",
                f"{r['peak_gflops']:.0f} ({r['peak_before']:.0f}/{r['peak_after']:.0f})",
                f"{100 * r['ratio']:.0f}%",
                f"{r['lower_s']:.1f}+{r['compile_s']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r.get('xla_temp_mb', float('nan')):.0f}",
            ]
        )
    print(header_line)
    print(
        common.format_table(
            [
                "config",
                "XLA options",
                "params",
                "batch",
                "image",
                "k",
                "step ms",
                "img/s",
                "GFLOP/step",
                "GFLOP/s",
                "peak GFLOP/s (before/after)",
                "of peak",
                "lower+compile s",
                "peak RSS MB",
                "XLA temp MB",
            ],
            rows,
        )
    )
    print("\nRSS MB, current / peak so far, after each stage of the benchmark process:")
    stages = ("runtime", "state", "compiled", "steps")
    print(
        common.format_table(
            ["config", "XLA options", *stages],
            [
                [r["config"], r.get("xla_preset", "default")]
                + ["{:.0f} / {:.0f}".format(*r["memory_by_stage"][s]) for s in stages]
                for r in results
            ],
        )
    )


def main():
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS + LATENT_CONFIGS)}",
    )
    p.add_argument(
        "--batch",
        default="",
        help="per-config batch overrides, e.g. "
        "cifar10_ddpm=16,dit_s2=16 (defaults: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_BATCH.items())
        + ")",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    p.add_argument(
        "--steps_per_dispatch",
        type=int,
        default=1,
        help="k > 1: lax.scan over k steps per call (train.steps_per_dispatch)",
    )
    p.add_argument(
        "--xla_options",
        default="default",
        help="per-compile XLA options: comma-separated presets "
        f"({', '.join(common.XLA_OPTION_PRESETS)}; each config runs once per "
        "preset) or one JSON object of XLA DebugOptions fields",
    )
    p.add_argument("--matmul_n", type=int, default=2048, help="size of the peak matmul")
    p.add_argument(
        "--conv_impl",
        default="",
        help="UNet convolution gradients: 'xla' or 'explicit_grad' (models/conv.py); "
        "default: the config's",
    )
    p.add_argument(
        "--no_malloc_trim",
        action="store_true",
        help="skip runtime.release_freed_memory() after compiling (what train.py does)",
    )
    p.add_argument(
        "--json", action="store_true", help="also print the results as one machine-readable line"
    )
    p.add_argument(
        "--in_process",
        action="store_true",
        help="run configs in this process (peak RSS then accumulates)",
    )
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.xla_options.lstrip().startswith("{"):
        option_sets = [args.xla_options]
    else:
        option_sets = [o for o in args.xla_options.split(",") if o] or ["default"]
    for o in option_sets:
        common.xla_options_from_arg(o)  # validate before running anything
    batches = parse_batches(args.batch)
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in DEFAULT_BATCH:
            raise SystemExit(f"unknown config {n!r}; valid: {list(DEFAULT_BATCH)}")

    if args.child:
        r = run_one(
            args.child,
            batches[args.child],
            args.steps,
            args.warmup,
            args.steps_per_dispatch,
            common.xla_options_from_arg(option_sets[0]),
            args.matmul_n,
            args.conv_impl,
            not args.no_malloc_trim,
        )
        r["xla_preset"] = option_sets[0]
        common.emit_json(r)
        return

    load0 = common.load_average()[0]
    print(f"# bench_train: {common.describe_machine()}", flush=True)
    results = []
    for name in names:
        for opt in option_sets:
            t0 = time.time()
            if args.in_process:
                r = run_one(
                    name,
                    batches[name],
                    args.steps,
                    args.warmup,
                    args.steps_per_dispatch,
                    common.xla_options_from_arg(opt),
                    args.matmul_n,
                    args.conv_impl,
                    not args.no_malloc_trim,
                )
                r["xla_preset"] = opt
            else:
                argv = (
                    common.self_argv(__file__)
                    + [
                        "--child",
                        name,
                        "--batch",
                        f"{name}={batches[name]}",
                        "--steps",
                        str(args.steps),
                        "--warmup",
                        str(args.warmup),
                        "--steps_per_dispatch",
                        str(args.steps_per_dispatch),
                        "--xla_options",
                        opt,
                        "--matmul_n",
                        str(args.matmul_n),
                        "--conv_impl",
                        args.conv_impl,
                    ]
                    + (["--no_malloc_trim"] if args.no_malloc_trim else [])
                )
                r = common.run_child(argv)
            results.append(r)
            print(
                f"  {name} [{opt}]: {common.stats_line(r['step_times'])} per step "
                f"({time.time() - t0:.0f} s incl. init/compile), loss {r['loss']:.3f}, "
                f"load {common.load_average()[0]:.2f}",
                flush=True,
            )
    load1 = common.load_average()[0]
    import jax  # noqa: F401  (versions for the header only)

    header = f"\n{common.jax_versions()}; 1-min load avg {load0:.2f} at start, {load1:.2f} at end"
    print_table(results, header)
    print(
        "FLOPs: XLA cost analysis of the compiled step, multiply-add = 2 (same as the "
        "2*N^3 peak matmul). 'of peak' = GFLOP/s / peak (median 2048^3 f32 matmul, "
        "measured in the same process before and after the timed steps)."
    )
    if args.json:
        common.emit_json({"results": results, "load": [load0, load1]})


if __name__ == "__main__":
    main()
