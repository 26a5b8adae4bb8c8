"""Run a sweep locally, one run after another; resumable.

  python -m experiments.run --sweep=schedule_ablation [--root=runs/experiments] [--dry_run]

Each run trains through the normal CLI (so an interrupted run resumes from its last
checkpoint), then runs every evaluation of the sweep that its ``eval.jsonl`` does not hold
yet. Trained runs are not retrained and recorded evaluations are not rerun. Afterwards
build the report with experiments.report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

from experiments.sweeps import CONFIG_AXIS, SWEEPS

FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def workdir_of(sweep, overrides, root: str) -> str:
    return os.path.join(root, sweep.name, sweep.run_name(overrides))


def train_command(sweep, overrides, workdir: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "diffusion_jax.main",
        f"--config={sweep.config_of(overrides)}",
        f"--workdir={workdir}",
    ] + [f"--config.{k}={v}" for k, v in overrides.items() if k != CONFIG_AXIS]


def matches(record: dict, spec: dict) -> bool:
    """Whether an evaluate.py record was produced by the flag set ``spec``."""
    return all(record.get(k) == v for k, v in spec.items())


def pending_evals(sweep, workdir: str) -> list[dict]:
    """The sweep's evaluation specs not yet recorded by evaluate.py in eval.jsonl
    (in-loop records, which carry "step" instead of "checkpoint_step", don't count)."""
    path = os.path.join(workdir, "eval.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = [
                r
                for r in map(json.loads, filter(str.strip, f))
                if "checkpoint_step" in r and r.get("num_samples") == sweep.eval_samples
            ]
    return [spec for spec in sweep.evals if not any(matches(r, spec) for r in records)]


# An evaluation spec's keys are those of the evaluate.py record; each sets a config key,
# but "seed" (the sampling seed), which is evaluate.py's own --seed flag.
EVAL_SPEC_KEYS = {
    "sampler": "sampler.name",
    "num_steps": "sampler.num_steps",
    "eta": "sampler.eta",
    "spacing": "sampler.spacing",
    "guidance_scale": "sampler.guidance_scale",
}


def eval_command(spec: dict, workdir: str, num_samples: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "diffusion_jax.evaluate",
        f"--workdir={workdir}",
        f"--num_samples={num_samples}",
    ] + [
        f"--seed={v}" if k == "seed" else f"--config.{EVAL_SPEC_KEYS[k]}={v}"
        for k, v in spec.items()
    ]


def run_sweep(sweep, root: str, dry_run: bool = False) -> list[str]:
    """Train every run not trained yet, then run every evaluation not yet recorded in its
    eval.jsonl (so adding an evaluation to a sweep runs just that one); returns the run
    workdirs. The ``TRAINED`` marker is written once a run's training has finished."""
    workdirs = []
    for overrides in sweep.runs():
        wd = workdir_of(sweep, overrides, root)
        workdirs.append(wd)
        marker = os.path.join(wd, "TRAINED")
        trained = os.path.exists(marker)
        commands = [] if trained else [train_command(sweep, overrides, wd)]
        commands += [
            eval_command(spec, wd, sweep.eval_samples) for spec in pending_evals(sweep, wd)
        ]
        if not commands:
            print(f"[skip] {wd} (trained and evaluated)")
        for cmd in commands:
            print("[run]", " ".join(cmd[1:]), flush=True)
            if not dry_run:
                subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=REPO))
                if cmd is commands[0] and not trained:
                    open(marker, "w").close()
    return workdirs


def main(argv):
    del argv
    if FLAGS.sweep not in SWEEPS:
        raise app.UsageError(f"--sweep must be one of {sorted(SWEEPS)}")
    run_sweep(SWEEPS[FLAGS.sweep], FLAGS.root, FLAGS.dry_run)


if __name__ == "__main__":
    # flags only for the CLI, so run.py and report.py can both be imported
    flags.DEFINE_string("sweep", None, f"One of {sorted(SWEEPS)}.")
    flags.DEFINE_string("root", "runs/experiments", "Where run workdirs go.")
    flags.DEFINE_bool("dry_run", False, "Print the commands only.")
    app.run(main)
