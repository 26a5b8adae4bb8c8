"""Run a sweep locally, one run after another; resumable.

  python -m experiments.run --sweep=schedule_ablation [--root=runs/experiments] [--dry_run]

Each run trains through the normal CLI (so an interrupted run resumes from its last
checkpoint), then runs every evaluation of the sweep that its ``eval.jsonl`` does not hold
yet. Finished runs are skipped. Afterwards build the report with experiments.report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

from experiments.sweeps import SWEEPS

flags.DEFINE_string("sweep", None, f"One of {sorted(SWEEPS)}.")
flags.DEFINE_string("root", "runs/experiments", "Where run workdirs go.")
flags.DEFINE_bool("dry_run", False, "Print the commands only.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def workdir_of(sweep, overrides, root: str) -> str:
    return os.path.join(root, sweep.name, sweep.run_name(overrides))


def train_command(sweep, overrides, workdir: str) -> list[str]:
    return [sys.executable, "-m", "diffusion_jax.main", f"--config={sweep.config}",
            f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]


def eval_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def done_evals(workdir: str) -> set[str]:
    """Evaluation specs already recorded in the workdir's eval.jsonl."""
    path = os.path.join(workdir, "eval.jsonl")
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {json.loads(line).get("spec", "") for line in f if line.strip()}


def eval_command(spec: dict, workdir: str, num_samples: int) -> list[str]:
    return [sys.executable, "-m", "diffusion_jax.evaluate", f"--workdir={workdir}",
            f"--num_samples={num_samples}", f"--spec={eval_key(spec)}"] + [
        f"--{k}={v}" for k, v in spec.items()]


def run_sweep(sweep, root: str, dry_run: bool = False) -> list[str]:
    """Train and evaluate every run not finished yet; returns the run workdirs."""
    workdirs = []
    for overrides in sweep.runs():
        wd = workdir_of(sweep, overrides, root)
        workdirs.append(wd)
        marker = os.path.join(wd, "DONE")
        if os.path.exists(marker):
            print(f"[skip] {wd} (finished)")
            continue
        commands = [train_command(sweep, overrides, wd)]
        have = done_evals(wd)
        commands += [eval_command(spec, wd, sweep.eval_samples) for spec in sweep.evals
                     if eval_key(spec) not in have]
        for cmd in commands:
            print("[run]", " ".join(cmd[1:]), flush=True)
            if not dry_run:
                subprocess.run(cmd, cwd=REPO, check=True,
                               env=dict(os.environ, PYTHONPATH=REPO))
        if not dry_run:
            open(marker, "w").close()
    return workdirs


def main(argv):
    del argv
    if FLAGS.sweep not in SWEEPS:
        raise app.UsageError(f"--sweep must be one of {sorted(SWEEPS)}")
    run_sweep(SWEEPS[FLAGS.sweep], FLAGS.root, FLAGS.dry_run)


if __name__ == "__main__":
    app.run(main)
