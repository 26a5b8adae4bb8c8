"""Helpers shared by the benchmark scripts: the machine, its measured matmul peak, timing,
memory, XLA cost analysis, fresh-process runs and plain-text tables.

FLOP convention everywhere: one multiply-add = 2 FLOPs. That is what XLA's cost analysis
counts for dots and convolutions, and what the peak measurement counts for an N x N x N
matmul (2 N^3), so "achieved / peak" compares like with like. (bench_models.py divides by
2 to quote papers' multiply-add "GFLOPs"; these scripts do not.)

Imports only numpy and the standard library at module level, so the PyTorch peer script
can use it from a venv without JAX.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_TAG = "BENCH_JSON "  # prefix of the one machine-readable line a child prints

# Per-compile XLA:CPU options (jaxlib 0.10.2) the benchmarks can apply with
# ``--xla_options NAME``; the XLA_FLAGS spelling of each is in XLA_FLAG_PRESETS.
# By default XLA:CPU sends dots AND convolutions to YNNPACK. YNNPACK's convolution
# computes a 3x3 conv's weight gradient (a conv with an HxW window and a 3x3 output, on
# operands transposed to [C, H, W, B]) ~3x slower than the forward; XLA's Eigen
# convolution runs it about as fast as the forward. "eigen_conv" keeps YNNPACK for dots
# only; "eigen_conv_ynn_reduce" also lets YNNPACK run reductions (GroupNorm statistics,
# bias gradients). Numerics: same step to ~2e-7 relative. See README.md for what each buys.
_YNN = "xla_cpu_experimental_ynn_fusion_type"
XLA_OPTION_PRESETS = {
    "default": {},
    "eigen_conv": {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "eigen_conv_ynn_reduce": {
        _YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    },
}
XLA_FLAG_PRESETS = {
    "default": "",
    "eigen_conv": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "eigen_conv_ynn_reduce": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce",
}


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> tuple:
    return os.getloadavg()


def describe_machine(extra: str = "") -> str:
    """One line: CPU, usable cores, memory, load average (+ framework versions)."""
    l1, l5, _ = load_average()
    line = (
        f"{cpu_model()}, {usable_cores()} usable core(s) of {os.cpu_count()}, "
        f"{mem_total_gb():.0f} GiB RAM, load avg {l1:.2f} (1 min) / {l5:.2f} (5 min)"
    )
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if xla_flags:
        line += f", XLA_FLAGS='{xla_flags}'"
    return line + (f", {extra}" if extra else "")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc; nan elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


# --------------------------------------------------------------------------- timing


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def time_calls(
    fn: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    block: Optional[Callable[[Any], Any]] = None,
) -> List[float]:
    """Wall seconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones, each
    waited for with ``block`` (e.g. jax.block_until_ready): JAX dispatch is async."""
    block = block or (lambda x: x)
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return times


def disable_compilation_cache() -> None:
    """Benchmarks measure real compiles: make sure no persistent cache answers them."""
    import jax

    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_enable_compilation_cache", False)


def measure_matmul_peak(n: int = 2048, repeats: int = 7) -> Dict[str, float]:
    """f32 n x n x n jitted matmul: GFLOP/s (2 n^3 FLOPs per call), median and best of
    ``repeats`` after a warmup. The 'peak' the benchmarks compare against is the median
    (the best is printed too): same statistic as the step times."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    times = time_calls(lambda: mm(a, b), repeats, warmup=2, block=jax.block_until_ready)
    flops = 2.0 * n**3
    return {
        "n": n,
        "gflops_median": flops / median(times) / 1e9,
        "gflops_best": flops / min(times) / 1e9,
    }


def cost_flops(compiled) -> float:
    """XLA's cost-analysis FLOP count of a compiled executable (multiply-add = 2)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def memory_stats_mb(compiled) -> Dict[str, float]:
    """XLA's buffer assignment: arguments, outputs and temporaries of one call, in MiB."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if m is None:
        return {}
    mb = lambda v: float(v) / 2**20
    return {
        "xla_args_mb": mb(m.argument_size_in_bytes),
        "xla_out_mb": mb(m.output_size_in_bytes),
        "xla_temp_mb": mb(m.temp_size_in_bytes),
        "xla_alias_mb": mb(m.alias_size_in_bytes),
    }


# --------------------------------------------------------------------------- processes


def emit_json(obj: Dict[str, Any]) -> None:
    """The child's result: one tagged JSON line on stdout."""
    print(JSON_TAG + json.dumps(obj), flush=True)


def run_child(
    argv: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: Optional[float] = None
) -> Dict[str, Any]:
    """Run ``argv`` in a fresh process (so its peak RSS is its own) and return the JSON it
    emitted; raise with its stderr tail if it failed."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONPATH", REPO)
    if REPO not in full_env["PYTHONPATH"].split(os.pathsep):
        full_env["PYTHONPATH"] = REPO + os.pathsep + full_env["PYTHONPATH"]
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(JSON_TAG):
            return json.loads(line[len(JSON_TAG) :])
    tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
    raise RuntimeError(f"benchmark child {' '.join(argv)} failed (rc {proc.returncode}):\n{tail}")


def self_argv(script: str) -> List[str]:
    """argv prefix that reruns ``script`` with this interpreter."""
    return [sys.executable, os.path.abspath(script)]


# --------------------------------------------------------------------------- output


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Markdown table (readable as plain text too); floats pre-formatted by the caller."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def jax_versions() -> str:
    import jax
    import jaxlib

    return f"jax {jax.__version__} / jaxlib {jaxlib.__version__}, backend {jax.default_backend()}"


def xla_options_from_arg(value: str) -> Dict[str, Any]:
    """``--xla_options`` value: a preset name (XLA_OPTION_PRESETS) or a JSON object of
    per-compile XLA DebugOptions fields, e.g. '{"xla_cpu_enable_fast_math": true}'."""
    if value in ("", "none"):
        return {}
    if value in XLA_OPTION_PRESETS:
        return dict(XLA_OPTION_PRESETS[value])
    if not value.lstrip().startswith("{"):
        raise SystemExit(
            f"--xla_options {value!r}: not a preset {sorted(XLA_OPTION_PRESETS)} nor a JSON object"
        )
    return dict(json.loads(value))


def stats_line(times: Sequence[float]) -> str:
    arr = np.asarray(times)
    return f"median {np.median(arr):.4f}s min {arr.min():.4f}s max {arr.max():.4f}s n={len(arr)}"
