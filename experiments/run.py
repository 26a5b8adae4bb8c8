"""Run a sweep locally, one run after another; resumable.

  python -m experiments.run --sweep=schedule_ablation [--root=runs/experiments] [--dry_run] \
      [--stage=all|train|eval] [--records=experiments/results] [--only=seed=1,arm=cosine]

Each run trains through the normal CLI (so an interrupted run resumes from its last
checkpoint), then runs every evaluation of the sweep that its ``eval.jsonl`` does not hold
yet. Trained runs are not retrained and recorded evaluations are not rerun. ``--stage``
splits the two: ``train`` trains every run, ``eval`` evaluates the runs trained so far
(two processes can then share a machine). A run that is trained and fully evaluated is
archived under ``--records`` (experiments.records: its metrics.jsonl, eval.jsonl and
config.json, to commit), and a run whose archive is complete and not stale is skipped, even
with no workdir: a sweep can go on on another machine. ``--only`` restricts the plan to
the runs whose axes take the given values (e.g. the short runs first, or one seed per
machine). Afterwards build the report with experiments.report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

from diffusion_jax import cli
from experiments import records as archive
from experiments.sweeps import SWEEPS, value_name

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
    ] + [f"--config.{k}={v}" for k, v in sweep.train_overrides(overrides).items()]


def matches(record: dict, spec: dict) -> bool:
    """Whether an evaluate.py record was produced by the flag set ``spec`` (a spec without
    "seed" means evaluate.py's default sampling seed, 0)."""
    return all(record.get(k) == v for k, v in spec.items()) and record.get("seed", 0) == spec.get(
        "seed", 0
    )


def recorded_evals(workdir: str, num_samples: int) -> list[dict]:
    """evaluate.py's records in the run's eval.jsonl at ``num_samples`` samples (in-loop
    records, which carry "step" instead of "checkpoint_step", don't count)."""
    path = os.path.join(workdir, "eval.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [
            r
            for r in map(json.loads, filter(str.strip, f))
            if "checkpoint_step" in r and r.get("num_samples") == num_samples
        ]


def pending_evals(sweep, workdir: str, overrides: dict | None = None) -> list[tuple[dict, int]]:
    """(spec, num samples) of the run's evaluations not yet recorded: the sweep's evals
    and the limited ones its ``overrides`` qualify for, each at ``sweep.samples_of``."""
    wanted = [(spec, sweep.samples_of(spec)) for spec in sweep.evals_for(overrides or {})]
    records = {n: recorded_evals(workdir, n) for n in {n for _, n in wanted}}
    return [(s, n) for s, n in wanted if not any(matches(r, s) for r in records[n])]


# An evaluation spec's keys are those of the evaluate.py record; each sets a config key,
# but "seed" (the sampling seed) and "num_samples", evaluate.py's own flags.
EVAL_SPEC_KEYS = {
    "sampler": "sampler.name",
    "num_steps": "sampler.num_steps",
    "eta": "sampler.eta",
    "spacing": "sampler.spacing",
    "lambda_min": "sampler.lambda_min",
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
        if k != "num_samples"
    ]


STAGES = ("all", "train", "eval")


def train_config(sweep, overrides):
    """The config a run trains with: its config file and its overrides, as main.py builds
    it from ``train_command``'s flags."""
    config = cli.load_config_file(sweep.config_of(overrides))
    cli.apply_overrides(config, {k: str(v) for k, v in sweep.train_overrides(overrides).items()})
    return config


def parse_only(sweep, only: str) -> dict[str, str]:
    """``--only``'s "axis=value,..." as a dict, checked against the sweep's axes and values
    (a typo would otherwise select no run and silently do nothing)."""
    selected = {}
    for item in filter(None, only.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in sweep.axes:
            raise ValueError(
                f"--only={only!r}: {item!r} is not axis=value; sweep {sweep.name!r} has axes "
                f"{sorted(sweep.axes)}"
            )
        names = [value_name(key, v) for v in sweep.axes[key]]
        if value not in names:
            raise ValueError(f"--only={only!r}: axis {key!r} takes one of {names}, not {value!r}")
        selected[key] = value
    return selected


def selected_runs(sweep, only: dict[str, str] | None = None) -> list[dict]:
    """The sweep's runs whose axes take the values in ``only`` (all runs without it)."""
    return [
        o for o in sweep.runs() if all(value_name(k, o[k]) == v for k, v in (only or {}).items())
    ]


def _archived_and_complete(sweep, overrides, root: str, records: str | None) -> bool:
    """Whether a run's archive holds every evaluation the sweep asks of it, was trained
    with the config the sweep gives the run now, and the workdir holds no training of its
    own (then there is nothing to run). A stale archive is reported; it is replaced once
    the run is retrained and evaluated."""
    wd = workdir_of(sweep, overrides, root)
    if not archive.is_archived(sweep, overrides, records) or os.path.exists(
        os.path.join(wd, "TRAINED")
    ):
        return False
    dest = archive.archive_of(sweep, overrides, records)
    stale = archive.stale_keys(train_config(sweep, overrides), dest)
    if stale:
        print(f"[stale] {dest}: trained with another config ({', '.join(stale[:6])}); retraining")
        return False
    return not pending_evals(sweep, dest, overrides)


def archive_finished(sweep, root: str, records: str) -> list[str]:
    """Archive every run that is trained and has no pending evaluation (experiments.records);
    returns the archives written."""
    written = []
    for overrides in sweep.runs():
        wd = workdir_of(sweep, overrides, root)
        if not os.path.exists(os.path.join(wd, "TRAINED")) or pending_evals(sweep, wd, overrides):
            continue
        dest = archive.archive_of(sweep, overrides, records)
        if archive.save(wd, dest):
            print("[archived]", dest, flush=True)
            written.append(dest)
    return written


def _plan(
    sweep,
    root: str,
    stage: str,
    verbose: bool = True,
    records: str | None = None,
    only: dict[str, str] | None = None,
):
    """(run workdirs, [(workdir, command, training or a common eval)]) of what is left:
    see ``run_sweep``."""
    workdirs, plan = [], []
    for overrides in selected_runs(sweep, only):
        wd = workdir_of(sweep, overrides, root)
        workdirs.append(wd)
        if _archived_and_complete(sweep, overrides, root, records):
            if verbose:
                print(f"[skip] {wd} (archived)")
            continue
        trained = os.path.exists(os.path.join(wd, "TRAINED"))
        commands = []
        if not trained and stage != "eval":
            commands.append((wd, train_command(sweep, overrides, wd), True))
        if stage == "all" or (stage == "eval" and trained):
            commands += [
                (wd, eval_command(spec, wd, n), spec in sweep.evals)
                for spec, n in pending_evals(sweep, wd, overrides)
            ]
        if not commands and verbose:
            why = "not trained yet" if stage == "eval" and not trained else "done"
            print(f"[skip] {wd} ({why})")
        plan += commands
    if stage == "eval" and any(common for _, _, common in plan):
        plan = [c for c in plan if c[2]]
    return workdirs, plan


PREPARED = "PREPARED"


def prepare(sweep, dry_run: bool = False) -> None:
    """Make what the sweep's runs need (``Sweep.prepare``), each step whose workdir lacks
    the PREPARED marker; the marker is written once its command has succeeded."""
    for wd, args in sweep.prepare:
        path = os.path.join(REPO, wd)
        if os.path.exists(os.path.join(path, PREPARED)):
            continue
        cmd = [sys.executable, "-m", *args]
        print("[prepare]", " ".join(args), flush=True)
        if not dry_run:
            subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=REPO))
            os.makedirs(path, exist_ok=True)
            open(os.path.join(path, PREPARED), "w").close()


def _run(wd: str, cmd: list[str]) -> None:
    print("[run]", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=REPO))
    if cmd[2] == "diffusion_jax.main":
        open(os.path.join(wd, "TRAINED"), "w").close()


def run_sweep(
    sweep,
    root: str,
    dry_run: bool = False,
    stage: str = "all",
    records: str | None = None,
    only: dict[str, str] | None = None,
) -> list[str]:
    """Train every run not trained yet, then run every evaluation not yet recorded in its
    eval.jsonl (so adding an evaluation to a sweep runs just that one); returns the run
    workdirs. The ``TRAINED`` marker is written once a run's training has finished. With
    ``records``, each run is archived there as soon as it is finished, and runs whose
    archive is complete are skipped.

    ``stage="train"`` only trains. ``stage="eval"`` only evaluates runs already trained,
    cheapest tier first and re-planned after every evaluation: while any trained run lacks
    one of the sweep's ``evals``, those run (a run that finishes training meanwhile gets
    its turn before any costly one), then the ``limited_evals``. It returns when nothing
    trained is left to evaluate; run it again as more runs finish training. ``only``
    (``parse_only``) restricts all of this to the selected runs. Anything is run only
    after ``prepare``."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    workdirs, plan = _plan(sweep, root, stage, records=records, only=only)
    if plan:
        prepare(sweep, dry_run)

    def execute(wd, cmd):
        _run(wd, cmd)
        if records:
            archive_finished(sweep, root, records)

    if dry_run or stage != "eval":
        for wd, cmd, _ in plan:
            if dry_run:
                print("[run]", " ".join(cmd[1:]), flush=True)
            else:
                execute(wd, cmd)
        return workdirs
    while plan:
        wd, cmd, _ = plan[0]
        execute(wd, cmd)
        _, plan = _plan(sweep, root, stage, verbose=False, records=records, only=only)
        if plan and plan[0][1] == cmd:
            raise RuntimeError(
                f"{' '.join(cmd[1:])} ran but left no matching record in {wd}/eval.jsonl"
            )
    return workdirs


def main(argv):
    del argv
    if FLAGS.sweep not in SWEEPS:
        raise app.UsageError(f"--sweep must be one of {sorted(SWEEPS)}")
    sweep = SWEEPS[FLAGS.sweep]
    if FLAGS.records and not FLAGS.dry_run:
        archive_finished(sweep, FLAGS.root, FLAGS.records)  # runs finished before
    try:
        only = parse_only(sweep, FLAGS.only)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    run_sweep(sweep, FLAGS.root, FLAGS.dry_run, FLAGS.stage, FLAGS.records or None, only)


if __name__ == "__main__":
    # flags only for the CLI, so run.py and report.py can both be imported
    flags.DEFINE_string("sweep", None, f"One of {sorted(SWEEPS)}.")
    flags.DEFINE_string("root", "runs/experiments", "Where run workdirs go.")
    flags.DEFINE_bool("dry_run", False, "Print the commands only.")
    flags.DEFINE_enum("stage", "all", STAGES, "all | train (no evaluation) | eval (trained runs).")
    flags.DEFINE_string(
        "records",
        "experiments/results",
        "Where finished runs are archived (<records>/<sweep>/records/<run>; '' = nowhere).",
    )
    flags.DEFINE_string(
        "only", "", "Runs to plan, by axis values: 'seed=1' or 'seed=1,arm=cosine'."
    )
    app.run(main)
