"""The report builder and its plots (experiments.report, experiments.plots), from
synthetic records with known answers."""

import json
import os

import pytest

from experiments import plots, report, results, run, significance
from experiments.sweeps import Sweep


def _arm_sweep(arms: str, seeds, specs) -> Sweep:
    """A sweep of the given one-letter arms (all the linear schedule) x training seeds,
    scored by ``specs`` at N = 30."""
    return Sweep(
        "s",
        "configs/tiny.py",
        axes={"seed": tuple(seeds), "arm": tuple(arms)},
        arms={k: {"schedule.name": "linear"} for k in arms},
        evals=tuple(specs),
        eval_samples=30,
    )


def _write_runs(sweep, root, fid_of, specs):
    """One evaluate.py record per spec in each run's workdir, at FID ``fid_of(arm, seed)``
    (None: the run has not finished, no record)."""
    for overrides in sweep.runs():
        fid = fid_of(overrides["arm"], overrides["seed"])
        if fid is None:
            continue
        wd = run.workdir_of(sweep, overrides, str(root))
        os.makedirs(wd)
        with open(os.path.join(wd, "eval.jsonl"), "w") as f:
            f.writelines(json.dumps(_record(fid, **s)) + "\n" for s in specs)


def _inloop(step, minutes, accuracy, ratio):
    return {
        "step": step,
        "train_seconds": 60 * minutes,
        "class_accuracy": accuracy,
        "fid_matched": ratio * 0.5,
        "fid_matched_ratio": ratio,
    }


def test_quality_vs_time_table_and_plot(tmp_path):
    """Minutes to each target come from the first in-loop record that meets it (the
    accuracy and FID targets may be met at different records)."""
    sweep = Sweep("s", "configs/tiny.py", axes={"config": ("configs/u.py", "configs/d.py")})
    records = {
        "config=u": [_inloop(100, 1.0, 0.5, 3.0), _inloop(200, 2.0, 0.96, 2.5)]
        + [_inloop(300, 3.0, 0.97, 1.5)],
        "config=d": [_inloop(100, 1.5, 0.2, 1.9), _inloop(200, 3.5, 0.9, 1.8)],
    }
    for name, recs in records.items():
        os.makedirs(tmp_path / "runs" / "s" / name)
        with open(tmp_path / "runs" / "s" / name / "eval.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    text = open(report.build(sweep, str(tmp_path / "runs"), str(tmp_path / "out"))).read()
    rows = {
        line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| config=")
    }
    assert rows["| config=u"].startswith("| config=u | 0 | 2.0 | 3.0 | 3.0 | 300 | 3.0 | 97.0%")
    assert rows["| config=d"].startswith("| config=d | 0 | not reached | 1.5 | not reached | 200")
    assert os.path.exists(tmp_path / "out" / "quality_vs_train_minutes.png")


def _record(fid, **spec):
    return {
        "checkpoint_step": 10,
        "num_samples": 30,
        "fid_matched": fid,
        "fid_matched_low": fid - 0.1,
        "fid_matched_high": fid + 0.1,
        "fid_floor": 0.5,
        "fid_floor_std": 0.02,
        "fid_matched_ratio": fid / 0.5,
        **spec,
    }


def test_report_intervals_and_significance_from_known_records(tmp_path):
    """Three arms x three training seeds with known FIDs: arm b is lower than a by
    exactly 0.2 on every seed (a shared seed effect on top), c equals a up to +-0.05
    noise. The report must print the t-intervals and mark b-vs-a significant, c-vs-a not."""
    spec = {"sampler": "ddim", "num_steps": 10}
    sweep = _arm_sweep("abc", (0, 1, 2), [spec])
    seed_effect = {0: 1.0, 1: 1.5, 2: 1.2}
    noise = {0: 0.05, 1: -0.05, 2: 0.0}
    fids = {
        "a": seed_effect,
        "b": {s: v - 0.2 for s, v in seed_effect.items()},
        "c": {s: v + noise[s] for s, v in seed_effect.items()},
    }
    _write_runs(sweep, tmp_path / "runs", lambda arm, seed: fids[arm][seed], [spec])
    text = open(report.build(sweep, str(tmp_path / "runs"), str(tmp_path / "out"))).read()
    # arm a: mean 1.233, s = 0.2517, t_{0.975,2} = 4.3027: half-width 0.625
    row = next(line for line in text.splitlines() if line.startswith("| DDIM-10 | 1.233"))
    assert "1.233 [0.608, 1.858]" in row
    cmp = next(line for line in text.splitlines() if line.startswith("| DDIM-10 | -16%"))
    b_vs_a, c_vs_a, c_vs_b = cmp.split(" | ")[1:4]
    assert b_vs_a.startswith("-16%") and b_vs_a.endswith("*")  # -0.2 / 1.233
    assert c_vs_a.endswith("n.s.")
    # bootstrap: mean over the 9 runs of 0.1 / fid = 0.0888 -> "±9%"; seeds: mean over
    # arms of half-width / mean = (0.625 / 1.233 + 0.625 / 1.033 + 0.502 / 1.233) / 3
    # = 0.506 -> "±51%"
    assert "| DDIM-10 | ±9% | ±51% |" in text
    assert os.path.exists(tmp_path / "out" / "fid_vs_sampler_steps.png") is False  # one N


def test_an_interval_through_zero_does_not_stretch_the_log_axis(tmp_path):
    """Two seeds far apart give a t-interval whose low end is negative: the plot's log
    axis must stop just below the smallest positive mean or interval end (here the floor
    band's low edge, 1 - 1.96 * 0.02 / 0.5 = 0.9216), not decades lower."""
    specs = ({"sampler": "ddim", "num_steps": 10}, {"sampler": "ddim", "num_steps": 50})
    sweep = _arm_sweep("ab", (0, 1), specs)
    # ratios (fid / 0.5): a 1.2, 6.0 -> 3.6 +- 30.5; b 1.4, 1.42 -> its low end 1.283
    fids = {"a": {0: 0.6, 1: 3.0}, "b": {0: 0.7, 1: 0.71}}
    _write_runs(sweep, tmp_path / "runs", lambda arm, seed: fids[arm][seed], specs)
    fig = plots.plot_steps(results.collect(sweep, str(tmp_path / "runs"), None), sweep)
    bottom = fig.axes[0].get_ylim()[0]
    assert bottom == pytest.approx(0.9216 / 1.25, rel=1e-6)
    plots.save(fig, str(tmp_path / "steps.png"))


def test_cost_table_uses_the_median_rate_and_only_finished_runs():
    """Arm a: two finished runs at median 2.0 and 1.0 steps/s over 120 steps (1 and 2
    min), one of them paused (its clock reads 30 min, its rate logs barely move), and an
    unfinished run (no evaluate.py record) that must not count. Arm b: nothing finished.
    Only the latest record of each asked-for spec counts: a superseded one (same spec,
    earlier) and one the sweep does not ask for add 10 min each if counted."""
    spec = {"sampler": "ddim", "num_steps": 10}
    other = {"sampler": "ddim", "num_steps": 20}

    def finished(rates, clock_min, eval_seconds, step=120):
        record = {**spec, "num_samples": 100, "metric_seconds": 30}
        return {
            "train": [{"step": step, "train/steps_per_sec": r} for r in rates],
            "inloop": [{"step": step, "train_seconds": 60 * clock_min, "fid_matched_ratio": 1}],
            "records": [
                {**record, "sample_seconds": 570},
                {**record, **other, "sample_seconds": 570},
                {**record, "sample_seconds": eval_seconds},
            ],
            "eval_samples": 100,
        }

    groups = {
        "a": [
            finished([2.0, 2.1, 1.9], 1.0, 90),
            finished([1.0, 0.01, 1.0, 1.1], 30.0, 30),
            {"train": [{"step": 40, "train/steps_per_sec": 9.0}], "inloop": [], "records": []},
        ],
        "b": [{"train": [], "inloop": [], "records": []}],
    }
    rows = [line for line in report.cost_table(groups, [spec]) if line.startswith("| ")]
    assert rows[1:] == [
        "| a | 2 | 1.50 [1.00-2.00] | 1.5 [1.0-2.0] | 15.5 [1.0-30.0] | 1.5 [1.0-2.0] |"
    ]


def test_best_arm_table_splits_the_others_by_paired_significance(tmp_path):
    """b is lowest; a is b + 0.2 on every seed under a shared seed effect (significant);
    c is b plus zero-mean noise (not distinguishable); d finished one seed (untested)."""
    spec = {"sampler": "ddim", "num_steps": 10}
    sweep = _arm_sweep("abcd", (0, 1, 2), [spec])
    seed_effect = {0: 1.0, 1: 1.5, 2: 1.2}
    noise = {0: 0.05, 1: -0.06, 2: 0.02}
    fids = {
        "a": {s: v + 0.2 for s, v in seed_effect.items()},
        "b": seed_effect,
        "c": {s: v + noise[s] for s, v in seed_effect.items()},
        "d": {0: 3.0},
    }
    _write_runs(sweep, tmp_path / "runs", lambda arm, seed: fids[arm].get(seed), [spec])
    groups = results.collect(sweep, str(tmp_path / "runs"), None)
    rows = significance.best_arm_table(groups, [spec], "fid_matched")
    assert rows[2] == "| DDIM-10 | arm=b (1.233) | arm=a | arm=c | arm=d |"


def test_best_arm_table_ranks_a_sweep_in_progress_on_the_seeds_all_arms_share(tmp_path):
    """Mid-sweep, b has a third seed with a low FID that a lacks: over its own seeds b's
    mean (1.0) is the lowest, but on the shared seeds 0 and 1 a is 0.2 lower every time,
    so a is the best and b significantly worse; c (one seed) is untested."""
    spec = {"sampler": "ddim", "num_steps": 10}
    sweep = _arm_sweep("abc", (0, 1, 2), [spec])
    fids = {"a": {0: 1.0, 1: 1.5}, "b": {0: 1.2, 1: 1.7, 2: 0.1}, "c": {0: 0.5}}
    _write_runs(sweep, tmp_path / "runs", lambda arm, seed: fids[arm].get(seed), [spec])
    groups = results.collect(sweep, str(tmp_path / "runs"), None)
    rows = significance.best_arm_table(groups, [spec], "fid_matched")
    assert rows[2] == "| DDIM-10 | arm=a (1.250) | arm=b | — | arm=c |"
