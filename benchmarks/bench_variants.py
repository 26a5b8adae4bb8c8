"""Layer variants measured against the shipped layers, alone and in the whole train step
(ideas measured, not integrated: benchmarks/README.md says what each would buy).

    .venv/bin/python benchmarks/bench_variants.py          # GroupNorm alone, ~10 s
    .venv/bin/python benchmarks/bench_variants.py --steps digits_unet,cifar10_ddpm  # ~3 min
    .venv/bin/python benchmarks/bench_variants.py --variant attention_no_transpose \
        --steps digits_dit,dit_s2

Variants: ``groupnorm_matmul`` (GroupNorm + SiLU, flax's ``nn.GroupNorm`` against group
statistics taken with matmuls) and ``attention_no_transpose`` (the DiT's self-attention
with heads split by reshapes, einsums on [B, N, H, D], no einops transposes).

The GroupNorm variant sums each channel over H*W with a ones-vector contraction (a dot, which
XLA:CPU gives to YNNPACK) and pools channels into groups with a [C, G] one-hot matmul,
for the mean and the mean square; the normalised output is then one fused elementwise
pass. Both run under the CLIs' XLA flag (``runtime.CPU_XLA_FLAGS``, which already sends
reductions to YNNPACK). Each row: max |difference| of the outputs, and the median of 30
calls of the jitted forward loss and of its gradient (w.r.t. input and parameters), at
the feature-map shapes of the DDPM CIFAR-10 UNet and the digits UNet.
``--steps``: the whole train step of bench_train.py's configs, compiled twice in one
process, as shipped and with --variant's drop-in module (same parameters, same first
loss) swapped in, timed interleaved (--repeats each after a warmup round, median).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (batch, H, W, C) of GroupNorms in the two UNets, 32 groups as both use
SHAPES = {
    "CIFAR-10 UNet 32x32x128": (8, 32, 32, 128),
    "CIFAR-10 UNet 16x16x256": (8, 16, 16, 256),
    "digits UNet 8x8x64": (128, 8, 8, 64),
    "digits UNet 4x4x128": (128, 4, 4, 128),
}
GROUPS = 32


def group_norm_matmul(x, scale, bias, groups: int, eps: float = 1e-6):
    import jax
    import jax.numpy as jnp

    b, h, w, c = x.shape
    flat = x.reshape(b, h * w, c)
    ones = jnp.ones((h * w,), x.dtype)
    onehot = (jnp.arange(c)[:, None] // (c // groups) == jnp.arange(groups)[None]).astype(x.dtype)
    n = h * w * (c // groups)
    mean = jnp.einsum("p,bpc->bc", ones, flat) @ onehot / n
    mean_sq = jnp.einsum("p,bpc->bc", ones, flat * flat) @ onehot / n
    inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + eps)
    mean_c, inv_c = mean @ onehot.T, inv @ onehot.T
    return (x - mean_c[:, None, None, :]) * (inv_c * scale)[:, None, None, :] + bias


def matmul_group_norm_module():
    """A drop-in for ``flax.linen.GroupNorm`` (same "scale"/"bias") on the matmul stats."""
    import flax.linen as nn
    import jax.numpy as jnp

    class MatmulGroupNorm(nn.Module):
        num_groups: int = 32
        epsilon: float = 1e-6
        dtype: object = None
        param_dtype: object = jnp.float32

        @nn.compact
        def __call__(self, x):
            c = x.shape[-1]
            scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
            bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
            y = group_norm_matmul(x.astype(jnp.float32), scale, bias, self.num_groups, self.epsilon)
            return y.astype(self.dtype or x.dtype)

    return MatmulGroupNorm


def no_transpose_attention_module():
    """A drop-in for the DiT's ``layers.MultiHeadSelfAttention`` (same "qkv"/"proj") that
    splits heads with reshapes only and lets the attention einsums read [B, N, H, D]
    directly (no einops transposes to [B, H, N, D] and back)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from diffusion_jax.models import layers

    class NoTransposeAttention(layers.MultiHeadSelfAttention):
        @nn.compact
        def __call__(self, x, key_mask=None):
            b, n, c = x.shape
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
            qkv = nn.Dense(3 * c, kernel_init=self.kernel_init, name="qkv", **kw)(x)
            qkv = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads)
            q, k, v = qkv[:, :, 0] * (c // self.num_heads) ** -0.5, qkv[:, :, 1], qkv[:, :, 2]
            logits = jnp.einsum("bnhd,bmhd->bhnm", q, k).astype(jnp.float32)
            if key_mask is not None:
                logits = jnp.where(key_mask[:, None, None, :], logits, -1e9)
            weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            out = jnp.einsum("bhnm,bmhd->bnhd", weights, v).reshape(b, n, c)
            out_init = layers.zeros if self.zero_init_out else self.kernel_init
            return nn.Dense(c, kernel_init=out_init, name="proj", **kw)(out)

    return NoTransposeAttention


# variant -> (module holding the name the models look up, that name, the replacement)
def variants():
    import flax.linen as nn

    from diffusion_jax.models import dit

    return {
        "groupnorm_matmul": (nn, "GroupNorm", matmul_group_norm_module()),
        "attention_no_transpose": (dit, "MultiHeadSelfAttention", no_transpose_attention_module()),
    }


def whole_steps(variant: str, names, repeats: int) -> None:
    """The train step of each bench_train config as shipped and with ``variant`` swapped
    in (the models look the name up when traced), compiled in one process, interleaved."""
    import bench_train
    import jax

    from diffusion_jax import parallel, schedules, steps as steps_lib
    from diffusion_jax.models import build_model
    from diffusion_jax.state import create_train_state, make_optimizer

    module, attr, replacement = variants()[variant]
    shipped = getattr(module, attr)

    def build(name, swap_in):
        setattr(module, attr, swap_in)
        try:
            cfg = bench_train.get_config(name)
            shape, b = bench_train.SHAPES[name], bench_train.DEFAULT_BATCH[name]
            model = build_model(cfg.model)
            schedule = schedules.make_schedule(cfg.schedule.name, cfg.schedule.num_timesteps)
            tx = make_optimizer(cfg.optim, cfg.train.num_steps)
            dp = parallel.DataParallel("jit", parallel.make_mesh(jax.devices()[:1]))
            state = create_train_state(model, tx, shape, 0, out_sharding=dp.state_sharding)
            rng = np.random.default_rng(0)
            host = {"image": rng.uniform(-1, 1, (b, *shape)).astype(np.float32)}
            batch = dp.put_batch(dict(host, label=np.zeros((b,), np.int32)), 1)
            make = lambda axis: steps_lib.make_train_step(model, tx, schedule, cfg, axis_name=axis)
            step = dp.compile(make, 1).lower(state, batch).compile()
        finally:
            setattr(module, attr, shipped)
        return step, state, batch

    rows = []
    for name in names:
        runs = {"shipped": build(name, shipped), variant: build(name, replacement)}
        times = {k: [] for k in runs}
        losses = {}
        for i in range(repeats + 1):  # the first round warms up
            for k, (step, state, batch) in runs.items():
                t0 = time.perf_counter()
                state, metrics = step(state, batch)
                jax.block_until_ready(state)
                runs[k] = (step, state, batch)
                if i:
                    times[k].append(time.perf_counter() - t0)
                else:
                    losses[k] = float(np.asarray(metrics["loss"]).mean())
        a, b = (1e3 * common.median(times[k]) for k in runs)
        same = "yes" if np.isclose(*losses.values(), rtol=1e-5) else "NO"
        rows.append([name, bench_train.DEFAULT_BATCH[name], f"{a:.0f}", f"{b:.0f}"])
        rows[-1] += [f"{b / a - 1:+.1%}", same]
    print(
        common.format_table(
            ["config", "batch", "shipped ms", f"{variant} ms", "change", "same first loss"], rows
        )
    )


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="groupnorm_matmul", help="what --steps swaps in")
    p.add_argument("--steps", default="", help="bench_train configs whose whole step to A/B")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per variant")
    args = p.parse_args()
    from diffusion_jax import runtime

    runtime.configure_cpu_xla_flags()
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    common.disable_compilation_cache()
    print(f"# bench_variants: {common.describe_machine()}", flush=True)
    if args.steps:
        whole_steps(args.variant, args.steps.split(","), args.repeats)
        return
    rows = []
    for label, shape in SHAPES.items():
        x = jax.random.normal(jax.random.key(0), shape)
        norm = nn.GroupNorm(GROUPS, epsilon=1e-6)
        params = norm.init(jax.random.key(1), x)

        def flax_gn(p, x):
            return norm.apply(p, x)

        def matmul_gn(p, x):
            return group_norm_matmul(x, p["params"]["scale"], p["params"]["bias"], GROUPS)

        err = float(jnp.max(jnp.abs(flax_gn(params, x) - matmul_gn(params, x))))
        cells = []
        for gn in (flax_gn, matmul_gn):

            def loss(p, x, gn=gn):
                return jnp.sum(nn.silu(gn(p, x)) ** 2)

            for fn in (jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1)))):
                times = common.time_calls(
                    lambda fn=fn: fn(params, x), 30, warmup=2, block=jax.block_until_ready
                )
                cells.append(f"{1e3 * common.median(times):.2f}")
        rows.append([label, "x".join(map(str, shape)), f"{err:.1e}", *cells])
    print(
        common.format_table(
            ["feature map", "shape", "max |diff|", "flax fwd ms", "flax grad ms"]
            + ["matmul fwd ms", "matmul grad ms"],
            rows,
        )
    )


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"# {time.time() - t0:.0f} s")
