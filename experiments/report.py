"""Build a sweep's report (markdown tables with 95% intervals over training seeds, paired
comparisons between arms, the noise of one number, and PNG plots) from its runs'
metrics.jsonl (training) and eval.jsonl (in-loop and evaluate.py records) only.

  python -m experiments.report --sweep=schedule_ablation [--root=runs/experiments] \
      [--out=experiments/results]

Finished runs are read from their archives, ``<out>/<sweep>/records/`` (experiments.records,
written by experiments.run), others from their workdirs under ``--root``.

Runs are grouped by every axis except ``seed``. Whatever has finished is reported; a
missing value shows as "—". Runs with in-loop metrics (``eval.metrics_every_steps``) also
get sample quality against training minutes (the run's own clock, without sampling and
metric time): a table of minutes to the targets and a plot.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from diffusion_jax.steps import NUM_LOSS_BUCKETS
from experiments import plots, significance
from experiments.results import (
    TARGET_ACCURACY,
    TARGET_FID_RATIO,
    collect,
    eval_by_seed,
    eval_record,
    final_loss_buckets,
    first_minutes,
    inloop_by_step,
    main_specs,
    meets_accuracy,
    meets_fid,
    timed_inloop,
)
from experiments.sweeps import SWEEPS

FLAGS = flags.FLAGS


# (record key, section title, decimals) of the sample-quality tables, in order.
METRICS = (
    ("fid_matched", "classifier-FID (N matched to the floor)", 3),
    ("fid_matched_ratio", "FID / real-vs-real floor", 2),
    ("class_accuracy", "class accuracy", 3),
    ("kid", "KID", 4),
    ("precision", "precision", 3),
    ("recall", "recall", 3),
)


def _intro(sweep, groups) -> list[str]:
    records = [r for runs in groups.values() for run in runs for r in run["evals"]]
    floor = next((r for r in records if "fid_floor" in r), None)
    net = records[0].get("feature_net", "?") if records else "?"
    arms = "".join(f"\n- `{name}`: {o}" for name, o in sweep.arms.items())
    return [
        f"# {sweep.name}",
        "",
        f"Base config `{sweep.config}`; axes {sweep.axes}; fixed overrides {sweep.fixed}."
        + (f" Arms:{arms}" if arms else ""),
        "",
        f"Budget: {sweep.budget or 'not stated'}.",
        "",
        f"Each evaluation scores {sweep.eval_samples} samples from the final EMA parameters "
        f"(sampling seed 0 unless a row says otherwise; every arm and seed gets the same "
        f"seeds and the same reference subsets) with features from `{net}`."
        + (
            f" The real-vs-real floor at matched N = {floor.get('matched_num_samples', '?')} is "
            f"{floor['fid_floor']:.3f} (std {floor.get('fid_floor_std', 0):.3f} over "
            "reference splits)."
            if floor
            else ""
        ),
        "",
        "Cells: mean over training seeds [95% Student-t interval] (n = finished runs; one "
        "run: the bare value). Comparisons: paired over training seeds; `*` marks a "
        "difference whose 95% interval excludes 0, `n.s.` one that does not. In the plots, "
        "an interval that runs off the bottom of a log axis reaches 0 or below.",
        "",
    ]


def _loss_table(buckets) -> list[str]:
    """Markdown: training loss per timestep bucket, per arm (interval over seeds)."""
    groups = list(buckets)
    lines = [
        "## Training loss by timestep bucket (last quarter of training)",
        "",
        "MSE of each run's prediction target (eps, x0 or v: compare only arms with the "
        "same target).",
        "",
        "| t bucket | " + " | ".join(groups) + " |",
        "|---" * (len(groups) + 1) + "|",
    ]
    for b in range(NUM_LOSS_BUCKETS):
        lines.append(
            f"| {b / NUM_LOSS_BUCKETS:.1f}-{(b + 1) / NUM_LOSS_BUCKETS:.1f} T | "
            + " | ".join(significance.interval_cell(buckets[g][:, b], 4) for g in groups)
            + " |"
        )
    return lines + [""]


def build(sweep, root: str, out_dir: str, records: str | None = None) -> str:
    """Write ``out_dir``/report.md and its plots from the runs' records (their archives
    under ``records`` first, else their workdirs under ``root``); returns its path."""
    groups = collect(sweep, root, records)
    os.makedirs(out_dir, exist_ok=True)
    specs = main_specs(sweep)
    lines = _intro(sweep, groups)
    for key, title, digits in METRICS:
        if any(eval_by_seed(runs, s, key) for runs in groups.values() for s in specs):
            lines += [f"## {title}", "", *significance.metric_table(groups, specs, key, digits)]
    lines += cost_table(groups, sweep.all_evals())
    if len(groups) > 1:
        lines += [
            "## Which arm to train with (classifier-FID)",
            "",
            "Per sampler: the arm with the lowest mean over training seeds, the arms it beats "
            "in a paired comparison whose 95% interval excludes 0, and those it does not.",
            "",
            *significance.best_arm_table(groups, specs, "fid_matched"),
            "## Paired differences between arms (classifier-FID)",
            "",
            "Mean of (b - a) over training seeds relative to a's mean, with its 95% interval "
            "(negative: b is better).",
            "",
            *significance.comparison_table(groups, specs, "fid_matched"),
        ]
    lines += [
        "## How noisy one number is",
        "",
        "95% half-widths relative to the FID: the bootstrap over one run's samples (what "
        "another sampling seed could give) and the t-interval over training seeds (what "
        "another training run could give).",
        "",
        *significance.noise_table(groups, specs),
    ]
    size_rows = significance.sample_size_table(groups, sweep)
    if size_rows:
        lines += [
            "## Sample size",
            "",
            "One evaluation repeated at several N on the first training seed: "
            "matched FID ± its bootstrap 95% half-width. The floor's matched N is "
            "min(N, half the reference split).",
            "",
            *size_rows,
        ]
    seed_rows = significance.sampling_seed_table(groups, sweep)
    if seed_rows:
        lines += [
            "## Does the bootstrap predict the sampling-seed spread?",
            "",
            "Matched FID of one run at several sampling seeds: its standard deviation over "
            "the seeds next to the bootstrap's (half-width / 1.96).",
            "",
            *seed_rows,
        ]

    # in-loop evaluation during training
    inloop = {g: inloop_by_step(runs) for g, runs in groups.items()}
    steps_seen = sorted({s for by_step in inloop.values() for s in by_step})
    if steps_seen:
        lines += [
            "## classifier-FID during training (in-loop, EMA params)",
            "",
            "| training step | " + " | ".join(groups) + " |",
            "|---" * (len(groups) + 1) + "|",
        ]
        for step in steps_seen:
            lines.append(
                f"| {step} | "
                + " | ".join(significance.interval_cell(inloop[g].get(step, [])) for g in groups)
                + " |"
            )
        lines.append("")

    # minutes to the class-conditional targets: only for runs that measure class accuracy
    targets = any("class_accuracy" in r for rs in groups.values() for x in rs for r in x["inloop"])
    if targets:
        lines += quality_vs_time_table(groups)

    # training loss per timestep bucket
    buckets = {
        g: np.array([final_loss_buckets(r["train"]) for r in runs]) for g, runs in groups.items()
    }
    if not all(np.isnan(arr).all() for arr in buckets.values()):
        lines += _loss_table(buckets)

    figures = {
        "loss_by_t.png": plots.plot_buckets(buckets),
        "fid_vs_train_step.png": plots.plot_inloop(groups),
        "quality_vs_train_minutes.png": plots.plot_quality_vs_time(groups) if targets else None,
        "fid_vs_sampler_steps.png": plots.plot_steps(groups, sweep),
        "log_snr.png": plots.plot_log_snr(groups, sweep),
    }
    for name, fig in figures.items():
        if fig is not None:
            plots.save(fig, os.path.join(out_dir, name))
            lines += [f"![{name}]({name})", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _median_rate(train: list[dict]) -> float | None:
    """The median of a run's logged training steps/s (a pause or a shared core distorts
    a few logs only); None without any."""
    rates = [r["train/steps_per_sec"] for r in train if "train/steps_per_sec" in r]
    return float(np.median(rates)) if rates else None


def cost_table(groups, specs) -> list[str]:
    """Markdown: what each arm's finished runs cost, measured, as mean [min-max] over
    them: training speed (``_median_rate``) and the minutes it implies for the run's
    steps; the run's own training clock (wall time, so pauses count); the minutes of its
    evaluate.py records of ``specs``, the latest of each (what the sweep asks for: a
    superseded or extra record is not counted)."""

    def cell(values, digits=1):
        if not values:
            return "—"
        spread = f" [{min(values):.{digits}f}-{max(values):.{digits}f}]" if len(values) > 1 else ""
        return f"{np.mean(values):.{digits}f}{spread}"

    rows = []
    for g, runs in groups.items():
        runs = [run for run in runs if run["records"]]  # finished: evaluated at least once
        speeds = [
            (run["train"][-1]["step"], rate) for run in runs if (rate := _median_rate(run["train"]))
        ]
        clocks = [recs[-1]["train_seconds"] / 60 for recs in map(timed_inloop, runs) if recs]
        evals = [
            sum(
                r.get("sample_seconds", 0) + r.get("metric_seconds", 0)
                for r in filter(None, (eval_record(run, s) for s in specs))
            )
            / 60
            for run in runs
        ]
        if runs:
            rows.append(
                f"| {g} | {len(runs)} | {cell([v for _, v in speeds], 2)} "
                f"| {cell([n / v / 60 for n, v in speeds])} | {cell(clocks)} | {cell(evals)} |"
            )
    if not rows:
        return []
    return [
        "## Measured cost",
        "",
        "Per run, mean [min-max] over its training seeds, on the 2-core CPU guest each ran "
        "on. Steps/s: the median of the run's logged rates; training: its steps at that rate. "
        "Clock: the run's own training clock (compilation, steps, checkpoints; not in-loop "
        "sampling), wall time, so a run paused or sharing its cores reads longer. "
        "Evaluations: sampling and metric time of all its evaluate.py records.",
        "",
        "| arm | runs | steps/s | training (min) | clock (min) | evaluations (min) |",
        "|---|--:|--:|--:|--:|--:|",
        *rows,
        "",
    ]


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


def main(argv):
    del argv
    if FLAGS.sweep not in SWEEPS:
        raise app.UsageError(f"--sweep must be one of {sorted(SWEEPS)}")
    sweep = SWEEPS[FLAGS.sweep]
    print("wrote", build(sweep, FLAGS.root, os.path.join(FLAGS.out, sweep.name), FLAGS.out))


if __name__ == "__main__":
    # flags only for the CLI, so run.py and report.py can both be imported
    flags.DEFINE_string("sweep", None, f"One of {sorted(SWEEPS)}.")
    flags.DEFINE_string("root", "runs/experiments", "Where the run workdirs are.")
    flags.DEFINE_string("out", "experiments/results", "Report directory (a subdir per sweep).")
    app.run(main)
