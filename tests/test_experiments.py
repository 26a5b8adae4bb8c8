"""The sweep launcher (resumable) and the report builder, on a seconds-long sweep."""

import dataclasses
import os

from experiments import report, run
from experiments.sweeps import SWEEPS, Sweep


def test_sweep_is_product_of_axes():
    sweep = Sweep(
        "s",
        "configs/tiny.py",
        axes={"schedule.name": ("linear", "cosine"), "seed": (0, 1, 2)},
        fixed={"train.num_steps": 2},
    )
    runs = sweep.runs()
    assert len(runs) == 6 and all(r["train.num_steps"] == 2 for r in runs)
    assert sweep.run_name(runs[0]) == "schedule.name=linear,seed=0"
    assert len({sweep.run_name(r) for r in runs}) == 6


def test_smoke_sweep_runs_resumes_and_reports(tmp_path, capsys):
    sweep = SWEEPS["smoke"]
    root = str(tmp_path / "runs")
    workdirs = run.run_sweep(sweep, root)
    for wd in workdirs:
        assert os.path.exists(os.path.join(wd, "TRAINED"))
        assert not run.pending_evals(sweep, wd)  # every evaluation recorded
    capsys.readouterr()
    run.run_sweep(sweep, root)  # finished runs are skipped, nothing re-runs
    assert capsys.readouterr().out.count("[skip]") == len(workdirs)

    # an evaluation added to the sweep later runs on the trained runs, without retraining
    grown = dataclasses.replace(sweep, evals=sweep.evals + ({"sampler": "ddim", "num_steps": 2},))
    run.run_sweep(grown, root)
    out = capsys.readouterr().out
    assert (
        out.count("--config.sampler.num_steps=2") == len(workdirs)
        and "diffusion_jax.main" not in out
    )
    assert all(not run.pending_evals(grown, wd) for wd in workdirs)

    path = report.build(sweep, root, str(tmp_path / "report"))
    text = open(path).read()
    assert "| DDIM-3 eta" not in text  # the smoke eval spec has no eta
    row = next(line for line in text.splitlines() if line.startswith("| DDIM-3"))
    assert "—" not in row  # both schedules have a FID value
    for png in ("loss_by_t.png", "fid_vs_sampler_steps.png", "log_snr.png"):
        assert os.path.exists(os.path.join(tmp_path, "report", png))
