"""Build a sweep's report (markdown tables, mean +- std over seeds, and PNG plots) from
its runs' metrics.jsonl (training) and eval.jsonl (in-loop and evaluate.py records).

  python -m experiments.report --sweep=schedule_ablation [--root=runs/experiments] \
      [--out=experiments/results]

Runs are grouped by every axis except ``seed``. Whatever has finished is reported; a
missing value shows as "—". Runs with in-loop metrics (``eval.metrics_every_steps``) also
get sample quality against training minutes (the run's own clock, without sampling and
metric time): a table of minutes to the targets and a plot.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from diffusion_jax import schedules  # noqa: E402
from diffusion_jax.steps import NUM_LOSS_BUCKETS  # noqa: E402
from experiments.run import matches, workdir_of  # noqa: E402
from experiments.sweeps import SWEEPS  # noqa: E402

FLAGS = flags.FLAGS


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def spec_label(spec: dict) -> str:
    if spec["sampler"] == "ddpm":  # all T = 1000 steps unless respaced
        return f"DDPM-{spec.get('respacing') or 1000}"
    label = f"{spec['sampler'].upper()}-{spec['num_steps']}"
    if "eta" in spec:
        label += f" eta={spec['eta']:g}"
    if "guidance_scale" in spec:
        label += f" guidance {spec['guidance_scale']:g}"
    if "seed" in spec:
        label += f" seed {spec['seed']}"
    return label + (f" ({spec['spacing']})" if "spacing" in spec else "")


def mean_std(values) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def collect(sweep, root: str) -> dict:
    """group name -> list of per-seed dicts {train, inloop, evals}."""
    groups = defaultdict(list)
    for overrides in sweep.runs():
        wd = workdir_of(sweep, overrides, root)
        group = sweep.run_name(overrides, skip=("seed",))
        evals = [r for r in read_jsonl(os.path.join(wd, "eval.jsonl"))]
        groups[group].append(
            {
                "overrides": overrides,
                "train": read_jsonl(os.path.join(wd, "metrics.jsonl")),
                "inloop": [r for r in evals if "step" in r and "checkpoint_step" not in r],
                "evals": [
                    r
                    for r in evals
                    if "checkpoint_step" in r and r.get("num_samples") == sweep.eval_samples
                ],
            }
        )
    return dict(groups)


def final_loss_buckets(train: list[dict]) -> np.ndarray:
    """Mean loss per timestep bucket over the last quarter of training logs."""
    rows = [r for r in train if "loss_by_t/bucket_0" in r]
    rows = rows[-max(1, len(rows) // 4) :]
    return (
        np.array(
            [
                np.mean([r.get(f"loss_by_t/bucket_{b}", np.nan) for r in rows])
                for b in range(NUM_LOSS_BUCKETS)
            ]
        )
        if rows
        else np.full(NUM_LOSS_BUCKETS, np.nan)
    )


def eval_value(run: dict, spec: dict, key: str):
    hits = [r for r in run["evals"] if matches(r, spec)]
    return hits[-1].get(key) if hits else None


def build(sweep, root: str, out_dir: str) -> str:
    groups = collect(sweep, root)
    os.makedirs(out_dir, exist_ok=True)
    floors = [
        r["fid_floor"]
        for runs in groups.values()
        for run in runs
        for r in run["evals"]
        if "fid_floor" in r
    ]
    floor = (
        f" The real-vs-real floor (FID between two disjoint real sets of the same N) is "
        f"{floors[0]:.3f}."
        if floors
        else ""
    )
    lines = [
        f"# {sweep.name}",
        "",
        f"Base config `{sweep.config}`; axes {sweep.axes}; fixed overrides "
        f"{sweep.fixed}. Budget: {sweep.budget}. Each evaluation uses "
        f"{sweep.eval_samples} samples from the final EMA parameters with a fixed seed; "
        "features from the project's digits classifier (diffusion_jax.evaluation)."
        + floor
        + " Values are mean ± std over seeds (n = number of finished runs).",
        "",
    ]

    # sample quality vs sampler and steps
    metric_keys = (
        ("fid_matched", "classifier-FID (N matched to the floor)"),
        ("fid_matched_ratio", "FID / real-vs-real floor"),
        ("kid", "KID"),
        ("precision", "precision"),
        ("recall", "recall"),
    )
    for key, title in metric_keys:
        lines += [
            f"## {title}",
            "",
            "| sampler | "
            + " | ".join(
                f"{g} (n={sum(1 for r in runs if r['evals'])})" for g, runs in groups.items()
            )
            + " |",
            "|---" * (len(groups) + 1) + "|",
        ]
        for spec in sweep.evals:
            lines.append(
                f"| {spec_label(spec)} | "
                + " | ".join(
                    mean_std([eval_value(r, spec, key) for r in runs]) for runs in groups.values()
                )
                + " |"
            )
        lines.append("")

    # in-loop evaluation during training
    inloop = {g: inloop_by_step(runs) for g, runs in groups.items()}
    steps_seen = sorted({s for by_step in inloop.values() for s in by_step})
    if steps_seen:
        lines += [
            "## classifier-FID during training (in-loop, DDIM-50, EMA params)",
            "",
            "| training step | " + " | ".join(groups) + " |",
            "|---" * (len(groups) + 1) + "|",
        ]
        for step in steps_seen:
            lines.append(
                f"| {step} | "
                + " | ".join(mean_std(inloop[g].get(step, [])) for g in groups)
                + " |"
            )
        lines.append("")

    lines += quality_vs_time_table(groups)

    # training loss per timestep bucket
    lines += [
        "## Training loss by timestep bucket (last quarter of training)",
        "",
        "| t bucket | " + " | ".join(groups) + " |",
        "|---" * (len(groups) + 1) + "|",
    ]
    buckets = {
        g: np.array([final_loss_buckets(r["train"]) for r in runs]) for g, runs in groups.items()
    }
    for b in range(NUM_LOSS_BUCKETS):
        lines.append(
            f"| {b / NUM_LOSS_BUCKETS:.1f}-{(b + 1) / NUM_LOSS_BUCKETS:.1f} T | "
            + " | ".join(mean_std(buckets[g][:, b]) for g in groups)
            + " |"
        )
    lines.append("")

    plots = {
        "loss_by_t.png": plot_buckets(buckets),
        "fid_vs_train_step.png": plot_inloop(groups),
        "quality_vs_train_minutes.png": plot_quality_vs_time(groups),
        "fid_vs_sampler_steps.png": plot_steps(groups, sweep),
        "log_snr.png": plot_log_snr(sweep) if "schedule.name" in sweep.axes else None,
    }
    for name, fig in plots.items():
        if fig is not None:
            fig.savefig(os.path.join(out_dir, name), dpi=110, bbox_inches="tight")
            plt.close(fig)
            lines += [f"![{name}]({name})", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def plot_buckets(buckets):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = (np.arange(NUM_LOSS_BUCKETS) + 0.5) / NUM_LOSS_BUCKETS
    for g, arr in buckets.items():
        ax.plot(x, np.nanmean(arr, axis=0), marker="o", label=g)
    ax.set(xlabel="t / T", ylabel="eps-MSE", yscale="log", title="Training loss by timestep")
    ax.legend(fontsize=7)
    return fig


def inloop_by_step(runs) -> dict[int, list[float]]:
    """training step -> in-loop FID of each run that evaluated at that step."""
    by_step = defaultdict(list)
    for r in runs:
        for rec in r["inloop"]:
            by_step[rec["step"]].append(rec.get("fid_matched", rec.get("fid")))
    return dict(by_step)


def plot_inloop(groups):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    any_data = False
    for g, runs in groups.items():
        by_step = inloop_by_step(runs)
        if by_step:
            any_data = True
            steps_ = sorted(by_step)
            ax.errorbar(
                steps_,
                [np.mean(by_step[s]) for s in steps_],
                yerr=[np.std(by_step[s]) for s in steps_],
                marker="o",
                label=g,
                capsize=3,
            )
    ax.set(
        xlabel="training step",
        ylabel="classifier-FID (matched N)",
        yscale="log",
        title="Sample quality during training (DDIM-50, EMA)",
    )
    if any_data:
        ax.legend(fontsize=7)
    return fig if any_data else None


# The targets the README states for class-conditional digits (issue 24).
TARGET_ACCURACY = 0.95
TARGET_FID_RATIO = 2.0


def timed_inloop(run: dict) -> list[dict]:
    """A run's in-loop records that carry the training clock and the floor, in order."""
    recs = [r for r in run["inloop"] if "train_seconds" in r and "fid_matched_ratio" in r]
    return sorted(recs, key=lambda r: r["step"])


def meets_accuracy(record: dict) -> bool:
    return (record.get("class_accuracy") or 0.0) >= TARGET_ACCURACY


def meets_fid(record: dict) -> bool:
    return record["fid_matched_ratio"] <= TARGET_FID_RATIO


def first_minutes(recs: list[dict], ok) -> float | None:
    """Training minutes of the first record for which ``ok(record)`` holds."""
    return next((r["train_seconds"] / 60 for r in recs if ok(r)), None)


def quality_vs_time_table(groups) -> list[str]:
    """Markdown: per run, minutes of training until the targets are met (in-loop records;
    the clock excludes sampling and metric time) and the final values."""
    rows = [(g, run, timed_inloop(run)) for g, runs in groups.items() for run in runs]
    rows = [(g, run, recs) for g, run, recs in rows if recs]
    if not rows:
        return []

    def fmt(m):
        return "not reached" if m is None else f"{m:.1f}"

    lines = [
        "## Sample quality vs training time (in-loop, EMA params)",
        "",
        f"Minutes of training (compilation, steps and checkpoints; not sampling) until "
        f"class accuracy >= {TARGET_ACCURACY:.0%} and FID / floor <= {TARGET_FID_RATIO:g}, "
        f"at the sampler and guidance scale of each run's config.",
        "",
        "| run | seed | accuracy target (min) | FID target (min) | both (min) | final step "
        "| final min | final accuracy | final FID / floor |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for g, run, recs in rows:
        last = recs[-1]
        acc = last.get("class_accuracy")
        lines.append(
            f"| {g} | {run['overrides'].get('seed', 0)} "
            f"| {fmt(first_minutes(recs, meets_accuracy))} "
            f"| {fmt(first_minutes(recs, meets_fid))} "
            f"| {fmt(first_minutes(recs, lambda r: meets_accuracy(r) and meets_fid(r)))} "
            f"| {last['step']} | {last['train_seconds'] / 60:.1f} "
            f"| {'—' if acc is None else f'{acc:.1%}'} | {last['fid_matched_ratio']:.2f}x |"
        )
    return lines + [""]


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
    ax_fid.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 3, 5)))
    ax_fid.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_fid.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if any_data:
        ax_acc.legend(fontsize=7)
    fig.suptitle("Sample quality vs training time (in-loop, dashed: targets)", fontsize=9)
    return fig if any_data else None


def plot_steps(groups, sweep):
    """FID vs number of sampler steps: one line per sampler family (sampler, eta, spacing)
    and schedule group; colour = group, line style/marker = family. None when the sweep's
    evaluations all use one number of steps."""
    if len({spec.get("num_steps", 1000) for spec in sweep.evals}) < 2:
        return None
    families = defaultdict(list)
    for spec in sweep.evals:
        families[tuple((k, v) for k, v in sorted(spec.items()) if k != "num_steps")].append(spec)
    styles = ("o-", "s--", "^:", "D-.", "v-", "x--")
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, (g, runs) in enumerate(groups.items()):
        for style, specs in zip(styles, families.values()):
            xs, ys = [], []
            for spec in specs:
                vals = [
                    v for v in (eval_value(r, spec, "fid_matched") for r in runs) if v is not None
                ]
                if vals:
                    xs.append(spec.get("num_steps", 1000))  # DDPM runs all T = 1000 steps
                    ys.append(np.mean(vals))
            if xs:
                label = spec_label(specs[0]).replace(f"-{specs[0].get('num_steps')}", "")
                ax.plot(xs, ys, style, color=f"C{i}", label=f"{g} {label}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="sampler steps (network evaluations)",
        ylabel="classifier-FID (matched N)",
        title="Quality vs sampling steps",
    )
    ax.legend(fontsize=5, ncol=2)
    return fig


def plot_log_snr(sweep):
    names = sweep.axes.get("schedule.name", ("linear",))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name in names:
        sched = schedules.make_schedule(name, 1000)
        ax.plot(np.arange(1, 1001) / 1000, np.asarray(sched.log_snr), label=name)
    ax.set(xlabel="t / T", ylabel="log SNR", title="Noise schedules (T = 1000)")
    ax.legend()
    return fig


def main(argv):
    del argv
    if FLAGS.sweep not in SWEEPS:
        raise app.UsageError(f"--sweep must be one of {sorted(SWEEPS)}")
    sweep = SWEEPS[FLAGS.sweep]
    print("wrote", build(sweep, FLAGS.root, os.path.join(FLAGS.out, sweep.name)))


if __name__ == "__main__":
    # flags only for the CLI, so run.py and report.py can both be imported
    flags.DEFINE_string("sweep", None, f"One of {sorted(SWEEPS)}.")
    flags.DEFINE_string("root", "runs/experiments", "Where the run workdirs are.")
    flags.DEFINE_string("out", "experiments/results", "Report directory (a subdir per sweep).")
    app.run(main)
