"""A sweep's recorded results, read back: training logs (metrics.jsonl), in-loop and
evaluate.py records (eval.jsonl), grouped by every axis but the training seed. Everything
the report, its tables and its plots show comes from here.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from diffusion_jax.steps import NUM_LOSS_BUCKETS
from experiments import records as archive
from experiments.run import matches, workdir_of


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
    if "num_samples" in spec:
        label += f" N={spec['num_samples']}"
    if "lambda_min" in spec:
        return label + f" ({spec['spacing']}, lambda >= {spec['lambda_min']:g})"
    return label + (f" ({spec['spacing']})" if "spacing" in spec else "")


def collect(sweep, root: str, records_dir: str | None = None) -> dict:
    """group name -> list of per-seed run dicts {overrides, train, inloop, evals, records,
    eval_samples}: ``evals`` are the evaluate.py records at the sweep's ``eval_samples``,
    ``records`` all of them (specs with their own "num_samples" too). A run is read from
    its archive under ``records_dir`` (experiments.records) if it has one, else from its
    workdir under ``root``."""
    groups = defaultdict(list)
    for overrides in sweep.runs():
        wd = (
            archive.archive_of(sweep, overrides, records_dir)
            if archive.is_archived(sweep, overrides, records_dir)
            else workdir_of(sweep, overrides, root)
        )
        group = sweep.run_name(overrides, skip=("seed",))
        evals = read_jsonl(os.path.join(wd, "eval.jsonl"))
        records = [r for r in evals if "checkpoint_step" in r]
        groups[group].append(
            {
                "overrides": overrides,
                "train": read_jsonl(os.path.join(wd, "metrics.jsonl")),
                "inloop": [r for r in evals if "step" in r and "checkpoint_step" not in r],
                "evals": [r for r in records if r.get("num_samples") == sweep.eval_samples],
                "records": records,
                "eval_samples": sweep.eval_samples,
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


def is_repeat(sweep, spec: dict) -> bool:
    """Whether ``spec`` repeats one of the sweep's evals at another sampling seed or
    another N (the report's noise tables use those; its main tables do not)."""
    base = {k: v for k, v in spec.items() if k != "num_samples"}
    return "seed" in spec or ("num_samples" in spec and base in sweep.evals)


def main_specs(sweep) -> list[dict]:
    """The evaluations of the main tables and plots: every spec but the repeats."""
    return [s for s in sweep.all_evals() if not is_repeat(sweep, s)]


def eval_record(run: dict, spec: dict) -> dict | None:
    """The latest evaluate.py record of ``run`` made by ``spec`` (at its "num_samples",
    else the sweep's ``eval_samples``)."""
    n = spec.get("num_samples", run["eval_samples"])
    hits = [r for r in run["records"] if matches(r, spec) and r.get("num_samples") == n]
    return hits[-1] if hits else None


def eval_value(run: dict, spec: dict, key: str):
    record = eval_record(run, spec)
    return None if record is None else record.get(key)


def eval_by_seed(runs, spec: dict, key: str) -> dict:
    """training seed -> the latest value of ``key`` in the records matching ``spec``, for
    the runs of one group that have one (pairs arms by seed)."""
    out = {}
    for run in runs:
        value = eval_value(run, spec, key)
        if value is not None:
            out[run["overrides"].get("seed", 0)] = value
    return out


def inloop_by_step(runs) -> dict[int, list[float]]:
    """training step -> in-loop FID of each run that evaluated at that step."""
    by_step = defaultdict(list)
    for r in runs:
        for rec in r["inloop"]:
            by_step[rec["step"]].append(rec.get("fid_matched", rec.get("fid")))
    return dict(by_step)


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
