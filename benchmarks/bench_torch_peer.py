"""PyTorch peer: the same-shaped DDPM CIFAR-10 UNet from diffusers (UNet2DModel, 35.7M
parameters) timed for one train step and a DDIM-50 sampling loop, next to diffusion_jax's
real step and sampler, with the ratios side by side.

Optional. Needs torch and diffusers (benchmarks/requirements-peer.txt) in a SEPARATE venv,
so the main venv stays JAX-only; the JAX half runs in the main venv as subprocesses
(bench_train.py / bench_sampler.py with --json), one after the other, never concurrently:

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install -r benchmarks/requirements-peer.txt
    /work/peer-venv/bin/python benchmarks/bench_torch_peer.py            # batch 8, ~4-5 min
    /work/peer-venv/bin/python benchmarks/bench_torch_peer.py --jax_xla_options default,eigen_conv

PyTorch side (eager, float32, NCHW unless --channels_last, torch's default thread count):
- train step = the same update as steps.make_train_step: t ~ U{0..999}, eps ~ N(0, I),
  x_t = sqrt(ab) x0 + sqrt(1-ab) eps (linear betas 1e-4..0.02), MSE on eps with dropout
  0.1 active, backward, global-norm clip 1.0, AdamW(2e-4), EMA update of every parameter.
- DDIM-50 = diffusers' DDIMScheduler (leading spacing, eta 0, clip_sample, final
  alpha_bar = 1, as our sampler) in a Python loop under torch.inference_mode().
- 50 bare forwards = the same loop without the scheduler (its own overhead ratio).
Times are medians of --steps / --repeats runs after a warmup. "ratio" = PyTorch time /
JAX time, so >= 1.0 means diffusion_jax is at least as fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (numpy + stdlib only at import)

# The DDPM CIFAR-10 architecture in diffusers' terms (google/ddpm-cifar10-32's config):
# ch 128, mult (1, 2, 2, 2), 2 res blocks, attention at 16x16 only, GroupNorm 32, SiLU.
DDPM_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
    act_fn="silu",
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    time_embedding_type="positional",
    mid_block_scale_factor=1,
    dropout=0.1,
)


def torch_bench(batch: int, steps: int, repeats: int, channels_last: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**DDPM_CIFAR10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    params = [p for p in model.parameters()]
    n_params = sum(p.numel() for p in params)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    x0 = (torch.rand(batch, 3, 32, 32) * 2 - 1).contiguous(memory_format=fmt)

    def train_step():
        model.train()
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        loss = F.mse_loss(model(x_t, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.9999)
        return loss

    times = common.time_calls(train_step, steps, warmup=1)

    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    sched.set_timesteps(50)
    model.eval()

    def ddim(timesteps=sched.timesteps):
        with torch.inference_mode():
            x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
            for t in timesteps:
                eps = model(x, t).sample
                x = sched.step(eps, t, x, eta=0.0).prev_sample
        return x

    def bare(timesteps=sched.timesteps):  # eager is synchronous: a fixed input is fair
        with torch.inference_mode():
            x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
            for t in timesteps:
                out = model(x, t).sample
        return out

    ddim(sched.timesteps[:3]), bare(sched.timesteps[:3])  # warmup
    d_times, b_times = [], []
    for _ in range(repeats):  # interleaved, like bench_sampler
        d_times += common.time_calls(ddim, 1, warmup=0)
        b_times += common.time_calls(bare, 1, warmup=0)
    a = torch.randn(2048, 2048)
    mm = common.time_calls(lambda: a @ a, 7, warmup=2)
    return dict(
        params=n_params,
        step_s=common.median(times),
        step_times=times,
        ddim_s=common.median(d_times),
        bare_s=common.median(b_times),
        threads=torch.get_num_threads(),
        version=torch.__version__,
        matmul_gflops=2 * 2048**3 / common.median(mm) / 1e9,
        peak_rss_mb=common.peak_rss_mb(),
    )


def jax_bench(python: str, batch: int, steps: int, repeats: int, xla_options: str) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    train = common.run_child(
        [
            python,
            os.path.join(here, "bench_train.py"),
            "--configs",
            "cifar10_ddpm",
            "--batch",
            f"cifar10_ddpm={batch}",
            "--steps",
            str(steps),
            "--xla_options",
            xla_options,
            "--json",
        ]
    )["results"][0]
    sample = common.run_child(
        [
            python,
            os.path.join(here, "bench_sampler.py"),
            "--config",
            "cifar10_ddpm",
            "--batch",
            str(batch),
            "--samplers",
            "ddim50",
            "--compile_steps",
            "",
            "--repeats",
            str(repeats),
            "--xla_options",
            xla_options,
            "--json",
        ]
    )
    s = sample["samplers"]["ddim50"]
    return dict(
        params=train["params"],
        step_s=train["step_s"],
        ddim_s=s["sampler_s"],
        bare_s=s["baseline_s"],
        achieved_gflops=train["achieved_gflops"],
        peak_gflops=train["peak_gflops"],
        gflop_per_step=train["gflop_per_step"],
        compile_s=train["lower_s"] + train["compile_s"],
        peak_rss_mb=train["peak_rss_mb"],
    )


def main():
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed train steps (median)")
    p.add_argument("--repeats", type=int, default=1, help="timed DDIM-50 runs (median)")
    p.add_argument("--channels_last", action="store_true", help="PyTorch NHWC memory format")
    p.add_argument(
        "--jax_python",
        default=os.path.join(common.REPO, ".venv", "bin", "python"),
        help="interpreter of the main (JAX) venv",
    )
    p.add_argument(
        "--jax_xla_options",
        default="default",
        help="comma-separated --xla_options values for the JAX runs, e.g. "
        "default,eigen_conv (one JAX column each)",
    )
    p.add_argument("--skip_jax", action="store_true", help="PyTorch numbers only")
    args = p.parse_args()

    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"{e}: run this with the peer venv's python (see benchmarks/requirements-peer.txt)"
        ) from None

    print(f"# bench_torch_peer: {common.describe_machine()}", flush=True)
    load0 = common.load_average()[0]
    t0 = time.time()
    tr = torch_bench(args.batch, args.steps, args.repeats, args.channels_last)
    print(
        f"  torch {tr['version']} ({tr['threads']} threads, diffusers "
        f"{__import__('diffusers').__version__}): step {common.stats_line(tr['step_times'])}; "
        f"DDIM-50 {tr['ddim_s']:.2f}s ({time.time() - t0:.0f} s), load "
        f"{common.load_average()[0]:.2f}",
        flush=True,
    )
    jx = {}
    if not args.skip_jax:
        for opt in filter(None, args.jax_xla_options.split(",")):
            t0 = time.time()
            jx[opt] = jax_bench(args.jax_python, args.batch, args.steps, args.repeats, opt)
            print(
                f"  jax ({opt}): step {jx[opt]['step_s']:.3f}s, DDIM-50 "
                f"{jx[opt]['ddim_s']:.2f}s ({time.time() - t0:.0f} s), load "
                f"{common.load_average()[0]:.2f}",
                flush=True,
            )
    load1 = common.load_average()[0]

    cols = ["PyTorch eager" + (" (channels_last)" if args.channels_last else "")]
    cols += [f"JAX ({o})" for o in jx] + [f"ratio torch/JAX ({o})" for o in jx]
    fmt_s = lambda v: f"{v:.3f}"

    def row(label, key, fmt=fmt_s, ratio=True):
        out = [label, fmt(tr[key])] + [fmt(j[key]) for j in jx.values()]
        out += [f"{tr[key] / j[key]:.2f}" if ratio else "" for j in jx.values()]
        return out

    rows = [
        ["parameters", f"{tr['params']:,}"]
        + [f"{j['params']:,}" for j in jx.values()]
        + ["" for _ in jx],
        row("train step s", "step_s"),
        ["train img/s", f"{args.batch / tr['step_s']:.1f}"]
        + [f"{args.batch / j['step_s']:.1f}" for j in jx.values()]
        + ["" for _ in jx],
        row("DDIM-50 s", "ddim_s"),
        row("50 bare forwards s", "bare_s"),
        ["DDIM-50 overhead", f"{100 * (tr['ddim_s'] / tr['bare_s'] - 1):+.1f}%"]
        + [f"{100 * (j['ddim_s'] / j['bare_s'] - 1):+.1f}%" for j in jx.values()]
        + ["" for _ in jx],
        ["peak RSS MB (train proc.)", f"{tr['peak_rss_mb']:.0f}"]
        + [f"{j['peak_rss_mb']:.0f}" for j in jx.values()]
        + ["" for _ in jx],
    ]
    if jx:
        j0 = next(iter(jx.values()))
        rows.append(
            ["train GFLOP/s (XLA count)", f"{j0['gflop_per_step'] / tr['step_s']:.1f}"]
            + [f"{j['achieved_gflops']:.1f}" for j in jx.values()]
            + ["" for _ in jx]
        )
    rows.append(
        ["2048^3 f32 matmul GFLOP/s", f"{tr['matmul_gflops']:.0f}"]
        + [f"{j['peak_gflops']:.0f}" for j in jx.values()]
        + ["" for _ in jx]
    )
    print(
        f"\nDDPM CIFAR-10 UNet, batch {args.batch} @ 32x32x3; 1-min load avg {load0:.2f} at "
        f"start, {load1:.2f} at end"
    )
    print(common.format_table(["", *cols], rows))
    print(
        "ratio = PyTorch time / JAX time (>= 1.0: JAX at least as fast). PyTorch GFLOP/s "
        "uses the JAX step's XLA FLOP count (same architecture)."
    )


if __name__ == "__main__":
    main()
