"""Parameters, GFLOPs and forward / forward+backward time of the model presets.

    .venv/bin/python benchmarks/bench_models.py [--repeats 3] [--only ddpm_cifar10,DiT-S/2]

GFLOPs are per image at batch 1, in multiply-adds (XLA's cost-analysis count divided by
2, the convention of the DiT paper's "Gflops"). Paper-sized DiTs (B/L/XL) are only
counted, with abstract shapes (no memory, no compile). Times are per batch, median of
``--repeats`` runs after one compile run, train mode (dropout on) for fwd+bwd with a
squared-error loss against random targets. On the 2-core CPU dev box expect noise of
+-20% or more when other jobs run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import (
    DIT_PRESETS,
    UNET_PRESETS,
    abstract_params,
    build_model,
    count_params,
    xla_forward_flops,
)

# (label, model config, image shape HWC, batch to time or None = count only)
ROWS = [
    (
        "ddpm_cifar10",
        {"name": "unet", "num_classes": 0, "unet": UNET_PRESETS["ddpm_cifar10"]},
        (32, 32, 3),
        8,
    ),
    ("digits", {"name": "unet", "num_classes": 10, "unet": UNET_PRESETS["digits"]}, (8, 8, 1), 64),
    (
        "adm_small",
        {"name": "unet", "num_classes": 10, "unet": UNET_PRESETS["adm_small"]},
        (32, 32, 3),
        None,
    ),
] + [
    # The paper's setting: 32x32x4 latents, learned sigma (8 output channels), 1000 classes.
    (
        name,
        {"name": "dit", "num_classes": 1000, "dit": dict(DIT_PRESETS[name], out_channels=8)},
        (32, 32, 4),
        8 if name == "DiT-S/2" else None,
    )
    for name in ("DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-B/2", "DiT-L/2", "DiT-XL/2")
]


def _time(fn, *args, repeats: int):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times))


def bench_row(label, cfg, shape, batch, repeats):
    model = build_model(cfg)
    params_abs = abstract_params(model, shape)
    n_params = count_params(params_abs)
    gflops = xla_forward_flops(model, shape, params=params_abs) / 2 / 1e9
    row = dict(label=label, params=n_params, gflops=gflops, shape=shape, batch=batch)
    if batch is None:
        return row

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    y = (
        jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)
        if model.num_classes
        else None
    )
    target = jnp.asarray(
        rng.standard_normal(x.shape[:3] + (model.out_channels or shape[2],)), jnp.float32
    )
    params = jax.jit(model.init)(jax.random.key(0), x, t, y)

    fwd = jax.jit(lambda p, x, t, y: model.apply(p, x, t, y))

    @jax.jit
    def fwd_bwd(p, x, t, y, key):
        def loss(p):
            out = model.apply(p, x, t, y, train=True, rngs={"dropout": key})
            return jnp.mean((out - target) ** 2)

        return jax.value_and_grad(loss)(p)

    row["fwd_compile_s"], row["fwd_s"] = _time(fwd, params, x, t, y, repeats=repeats)
    row["bwd_compile_s"], row["fwd_bwd_s"] = _time(
        fwd_bwd, params, x, t, y, jax.random.key(1), repeats=repeats
    )
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated preset labels")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))

    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s): {jax.devices()[0].device_kind}"
    )
    header = (
        f"{'preset':<14}{'input':>10}{'params':>15}{'GFLOPs/img':>12}{'batch':>7}"
        f"{'fwd ms':>10}{'fwd+bwd ms':>12}{'compile s (fwd/fwd+bwd)':>26}"
    )
    print(header)
    print("-" * len(header))
    for label, cfg, shape, batch in ROWS:
        if only and label not in only:
            continue
        r = bench_row(label, cfg, shape, batch, args.repeats)
        size = "x".join(map(str, shape))
        line = f"{label:<14}{size:>10}{r['params']:>15,}{r['gflops']:>12.3f}"
        if batch is None:
            line += f"{'-':>7}{'-':>10}{'-':>12}{'-':>26}"
        else:
            line += (
                f"{batch:>7}{1e3 * r['fwd_s']:>10.0f}{1e3 * r['fwd_bwd_s']:>12.0f}"
                f"{r['fwd_compile_s']:>13.1f} / {r['bwd_compile_s']:<10.1f}"
            )
        print(line, flush=True)
    print("GFLOPs: XLA cost analysis / 2 (one multiply-add = 1), per image at batch 1, eval mode.")


if __name__ == "__main__":
    main()
