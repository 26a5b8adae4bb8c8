"""The report's plots, each from the grouped results (``results.collect``): one colour per
arm (group), one marker per sampler family, error bars from ``evaluation.intervals``,
legends outside the axes so they never cover data, log axes labelled as such."""

from __future__ import annotations

from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from diffusion_jax import schedules  # noqa: E402
from diffusion_jax.evaluation import intervals  # noqa: E402
from diffusion_jax.steps import NUM_LOSS_BUCKETS  # noqa: E402
from experiments.results import (  # noqa: E402
    TARGET_ACCURACY,
    TARGET_FID_RATIO,
    eval_by_seed,
    eval_record,
    inloop_by_step,
    main_specs,
    spec_label,
    timed_inloop,
)


def save(fig, path: str) -> None:
    """Write ``fig`` as a PNG (legends outside the axes included) and free it."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plain_log_ticks(axis) -> None:
    """Ticks at 1, 2, 3, 5 x 10^k written as plain numbers on a log axis."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 3, 5)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _log_bottom(ax, values) -> None:
    """Set a log y axis' bottom just below the smallest positive of ``values`` (the means
    and interval ends): an interval that reaches 0 or below (a t-interval over two seeds
    can) runs off the bottom of the plot instead of stretching the axis down by decades."""
    v = np.asarray([x for x in values if np.isfinite(x) and x > 0])
    if v.size:
        ax.set_ylim(bottom=v.min() / 1.25)


def _legend_outside(ax, **kw):
    """The legend to the right of the axes: it cannot hide a point."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, **kw)


def plot_buckets(buckets):
    """Training loss per timestep bucket, one line per arm; None without loss logs."""
    if all(np.isnan(arr).all() for arr in buckets.values()):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = (np.arange(NUM_LOSS_BUCKETS) + 0.5) / NUM_LOSS_BUCKETS
    for i, (g, arr) in enumerate(buckets.items()):
        ax.plot(x, np.nanmean(arr, axis=0), marker="o", color=f"C{i}", label=g)
    ax.set(
        xlabel="t / T",
        ylabel="MSE of the prediction target (log scale)",
        yscale="log",
        title="Training loss by timestep",
    )
    _legend_outside(ax, fontsize=7)
    return fig


def plot_inloop(groups):
    """In-loop FID vs training step, mean over seeds with its 95% t-interval, arms nudged
    apart along x, the in-loop real-vs-real floor as a band."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    any_data = False
    shown = []  # means and interval ends, for the axis' bottom
    k = len(groups)
    for i, (g, runs) in enumerate(groups.items()):
        by_step = inloop_by_step(runs)
        if by_step:
            any_data = True
            steps_ = sorted(by_step)
            nudge = 1.0 + 0.012 * (i - (k - 1) / 2)
            ivs = [intervals.t_interval(by_step[s]) for s in steps_]
            means = np.array([iv.mean for iv in ivs])
            err = np.array(
                [[0.0, 0.0] if iv.n < 2 else [iv.mean - iv.low, iv.high - iv.mean] for iv in ivs]
            ).T
            shown += [*means, *(means - err[0])]
            ax.errorbar(
                np.array(steps_) * nudge,
                means,
                yerr=np.minimum(err, [means * 0.999, np.inf * means]),  # log axis: stay > 0
                marker="o",
                color=f"C{i}",
                label=g,
                capsize=3,
            )
    ax.set(
        xlabel="training step",
        ylabel="classifier-FID, matched N (log scale)",
        yscale="log",
        title="Sample quality during training (DDIM-50, EMA)",
    )
    floor = _floor(groups, "inloop")
    if floor is not None:
        shown.append(_floor_band(ax, floor[0], 1.96 * floor[1]))
    _log_bottom(ax, shown)
    _plain_log_ticks(ax.yaxis)
    if any_data:
        _legend_outside(ax, fontsize=7)
    return fig if any_data else None


def plot_quality_vs_time(groups):
    """Class accuracy and FID / floor vs training minutes, one colour per group."""
    fig, (ax_acc, ax_fid) = plt.subplots(1, 2, figsize=(9, 3.3))
    any_data = False
    for i, (g, runs) in enumerate(groups.items()):
        for j, run in enumerate(runs):
            recs = timed_inloop(run)
            if not recs:
                continue
            any_data = True
            minutes = [r["train_seconds"] / 60 for r in recs]
            label = g if j == 0 else None
            acc = [r.get("class_accuracy", np.nan) for r in recs]
            ax_acc.plot(minutes, acc, "o-", color=f"C{i}", label=label, ms=3)
            ratio = [r["fid_matched_ratio"] for r in recs]
            ax_fid.plot(minutes, ratio, "o-", color=f"C{i}", label=label, ms=3)
    ax_acc.axhline(TARGET_ACCURACY, ls="--", color="gray", lw=1)
    ax_fid.axhline(TARGET_FID_RATIO, ls="--", color="gray", lw=1)
    ax_acc.set(xlabel="training minutes (2-core CPU)", ylabel="class accuracy", ylim=(0, 1.02))
    ax_fid.set(xlabel="training minutes (2-core CPU)", ylabel="FID / real-vs-real floor")
    ax_fid.set_yscale("log")
    _plain_log_ticks(ax_fid.yaxis)
    if any_data:
        _legend_outside(ax_fid, fontsize=7)
    fig.suptitle("Sample quality vs training time (in-loop, dashed: targets)", fontsize=9)
    return fig if any_data else None


MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def _families(sweep) -> dict:
    """Sampler family (the spec without num_steps and num_samples) -> its specs, over
    every evaluation but the repeats: other sampling seeds, and a sweep eval repeated at
    another N (a DDIM-1000 at its own N joins its family: the y axis is the ratio to the
    floor at each point's N)."""
    families = defaultdict(list)
    for spec in main_specs(sweep):
        skip = ("num_steps", "num_samples")
        families[tuple((k, v) for k, v in sorted(spec.items()) if k not in skip)].append(spec)
    return families


def _point(runs, spec):
    """(mean, low, high) of matched FID for one arm and spec: the t-interval over training
    seeds, or with one seed that run's bootstrap interval; None without a value."""
    by_seed = eval_by_seed(runs, spec, "fid_matched_ratio")
    iv = intervals.t_interval(by_seed.values())
    if iv is None:
        return None
    if iv.n > 1:
        return iv.mean, iv.low, iv.high
    record = next(r for r in (eval_record(run, spec) for run in runs) if r is not None)
    return (
        iv.mean,
        record.get("fid_matched_ratio_low", iv.mean),
        record.get("fid_matched_ratio_high", iv.mean),
    )


def _floor(groups, kind: str = "evals"):
    """(fid_floor, fid_floor_std) of the first record with one: of an evaluation at the
    sweep's N (``kind`` "evals") or of an in-loop one ("inloop")."""
    for runs in groups.values():
        for run in runs:
            for r in run[kind]:
                if "fid_floor" in r:
                    return r["fid_floor"], r.get("fid_floor_std", 0.0)
    return None


def _floor_band(ax, center: float, half: float) -> float:
    """Draw the real-vs-real floor, ``center`` +- ``half`` (its spread over reference
    splits), as a grey band with a dashed centre line; returns the band's low edge."""
    low = max(center - half, 1e-3 * center)
    ax.axhspan(low, center + half, color="0.85", zorder=0, label="real-vs-real floor")
    ax.axhline(center, color="0.5", lw=1, ls="--", zorder=0)
    return low


def plot_steps(groups, sweep):
    """FID / floor vs sampler steps: colour = arm, marker = sampler family, error bars =
    95% interval (over training seeds; one seed: its bootstrap over samples), the
    real-vs-real floor as a band (mean +- 1.96 std over its reference splits). Arms are
    nudged apart along x so their bars do not overlap. None when the sweep's evaluations
    all use one number of steps."""
    families = _families(sweep)
    if len({s.get("num_steps", 1000) for f in families.values() for s in f}) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    k = len(groups)
    shown = []  # means and interval ends, for the axis' bottom
    for i, (g, runs) in enumerate(groups.items()):
        nudge = 1.0 + 0.04 * (i - (k - 1) / 2)
        for marker, specs in zip(MARKERS, families.values()):
            pts = [(s.get("num_steps", 1000), _point(runs, s)) for s in specs]
            pts = [(x * nudge, p) for x, p in pts if p is not None]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys = np.array([p[0] for _, p in pts])
            err = np.array([[p[0] - p[1] for _, p in pts], [p[2] - p[0] for _, p in pts]])
            shown += [v for _, p in pts for v in p]
            ax.errorbar(
                xs,
                ys,
                yerr=[np.minimum(err[0], 0.999 * ys).clip(0), err[1].clip(0)],
                color=f"C{i}",
                marker=marker,
                ms=4,
                lw=1,
                capsize=2,
            )
    floor = _floor(groups)
    if floor is not None:
        rel = 1.96 * floor[1] / floor[0]  # the floor's spread over its reference splits
        ax.axhspan(max(1 - rel, 1e-3), 1 + rel, color="0.85", zorder=0)
        shown.append(1 - rel)
        ax.axhline(1.0, color="0.5", lw=1, ls="--", zorder=0)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="sampler steps (log scale)",
        ylabel="FID / real-vs-real floor at matched N (log scale)",
        title="Quality vs sampling steps (95% intervals)",
    )
    steps = sorted({s.get("num_steps", 1000) for f in families.values() for s in f})
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    _log_bottom(ax, shown)
    _plain_log_ticks(ax.yaxis)
    handles = [Line2D([], [], color=f"C{i}", lw=2, label=g) for i, g in enumerate(groups)]
    handles += [
        Line2D(
            [],
            [],
            color="0.3",
            marker=m,
            ls="",
            label=spec_label(specs[0]).replace(f"-{specs[0].get('num_steps')}", ""),
        )
        for m, specs in zip(MARKERS, families.values())
    ]
    if floor is not None:
        handles.append(plt.Rectangle((0, 0), 1, 1, color="0.85", label="real-vs-real floor"))
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, borderaxespad=0
    )
    return fig


def _schedule_of(sweep, overrides):
    """The noise schedule a run trains with, from its overrides (None if they set none)."""
    o = sweep.train_overrides(overrides)
    if "schedule.name" not in o:
        return None
    return schedules.make_schedule(
        o["schedule.name"], 1000, zero_terminal_snr=bool(o.get("schedule.zero_terminal_snr"))
    )


def plot_log_snr(groups, sweep):
    """log SNR(t) of each arm's schedule; None when no arm sets one."""
    curves = {g: _schedule_of(sweep, runs[0]["overrides"]) for g, runs in groups.items()}
    curves = {g: s for g, s in curves.items() if s is not None}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, (g, sched) in enumerate(curves.items()):
        ax.plot(np.arange(1, 1001) / 1000, np.asarray(sched.log_snr), color=f"C{i}", label=g)
    ax.set(xlabel="t / T", ylabel="log SNR", title="Noise schedules (T = 1000)")
    _legend_outside(ax, fontsize=7)
    return fig
