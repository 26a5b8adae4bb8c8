"""The sweep launcher (resumable) and the report builder, on a seconds-long sweep."""

import dataclasses
import json
import os
import shutil
import subprocess

import pytest

from diffusion_jax import cli
from experiments import report, results, run
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
    assert capsys.readouterr().out.count("(done)") == len(workdirs)

    # an evaluation added to the sweep later runs on the trained runs, without retraining
    grown = dataclasses.replace(sweep, evals=sweep.evals + ({"sampler": "ddim", "num_steps": 2},))
    run.run_sweep(grown, root)
    out = capsys.readouterr().out
    assert (
        out.count("--config.sampler.num_steps=2") == len(workdirs)
        and "diffusion_jax.main" not in out
    )
    assert all(not run.pending_evals(grown, wd) for wd in workdirs)

    path = report.build(grown, root, str(tmp_path / "report"))
    text = open(path).read()
    assert "| DDIM-3 eta" not in text  # the smoke eval spec has no eta
    row = next(line for line in text.splitlines() if line.startswith("| DDIM-3"))
    assert "—" not in row  # both schedules have a FID value
    for png in ("loss_by_t.png", "fid_vs_sampler_steps.png", "log_snr.png"):
        assert os.path.exists(os.path.join(tmp_path, "report", png))


def test_config_axis_picks_the_config_file():
    sweep = Sweep("s", "configs/tiny.py", axes={"config": ("configs/tiny.py", "configs/a/b.py")})
    runs = sweep.runs()
    assert [sweep.run_name(r) for r in runs] == ["config=tiny", "config=b"]
    cmd = run.train_command(sweep, runs[1], "/tmp/wd")
    assert "--config=configs/a/b.py" in cmd
    assert not any(c.startswith("--config.config") for c in cmd)


def test_eval_spec_seed_is_the_evaluate_seed_flag():
    cmd = run.eval_command({"sampler": "ddim", "guidance_scale": 2.0, "seed": 3}, "/w", 500)
    assert cmd[-3:] == ["--config.sampler.name=ddim", "--config.sampler.guidance_scale=2.0"] + [
        "--seed=3"
    ]
    assert results.spec_label({"sampler": "ddim", "num_steps": 50, "guidance_scale": 2.0}) == (
        "DDIM-50 guidance 2"
    )
    spec = {"sampler": "dpmpp_2m", "num_steps": 10, "spacing": "logsnr", "lambda_min": -5.1}
    assert run.eval_command(spec, "/w", 500)[-1] == "--config.sampler.lambda_min=-5.1"
    assert results.spec_label(spec) == "DPMPP_2M-10 (logsnr, lambda >= -5.1)"


def test_arm_axis_expands_into_its_overrides_and_limited_evals_pick_runs():
    arms = {"a": {"schedule.name": "linear"}, "b": {"schedule.name": "cosine", "x.y": 2}}
    sweep = Sweep(
        "s",
        "configs/tiny.py",
        axes={"seed": (0, 1), "arm": ("a", "b")},
        arms=arms,
        evals=({"sampler": "ddim", "num_steps": 5},),
        limited_evals=(
            ({"seed": 0}, {"sampler": "ddim", "num_steps": 50}),
            ({"seed": 0}, {"sampler": "ddim", "num_steps": 5, "num_samples": 10}),
        ),
        eval_samples=20,
    )
    runs = sweep.runs()
    assert [sweep.run_name(r) for r in runs][:2] == ["seed=0,arm=a", "seed=0,arm=b"]
    cmd = run.train_command(sweep, runs[1], "/tmp/wd")
    assert "--config.schedule.name=cosine" in cmd and "--config.x.y=2" in cmd
    assert not any(c.startswith("--config.arm") for c in cmd)
    cmd = run.eval_command(sweep.limited_evals[1][1], "/w", 10)
    assert "--num_samples=10" in cmd and not any("config.num_samples" in c for c in cmd)
    # seed 0: all three (one at its own N); seed 1: the common eval only
    assert [(s["num_steps"], n) for s, n in run.pending_evals(sweep, "/nonexistent", runs[0])] == [
        (5, 20),
        (50, 20),
        (5, 10),
    ]
    assert [(s["num_steps"], n) for s, n in run.pending_evals(sweep, "/nonexistent", runs[2])] == [
        (5, 20)
    ]
    try:
        Sweep("s", "c.py", axes={"arm": ("a", "z")}, arms=arms)
        raise AssertionError("an arm missing from Sweep.arms must be refused")
    except ValueError as e:
        assert "['z']" in str(e)


def test_a_record_at_another_sampling_seed_is_not_the_default_one():
    rec = {"sampler": "ddim", "num_steps": 50, "seed": 3}
    assert not run.matches(rec, {"sampler": "ddim", "num_steps": 50})
    assert run.matches(rec, {"sampler": "ddim", "num_steps": 50, "seed": 3})
    assert run.matches({"sampler": "ddim"}, {"sampler": "ddim"})  # older records: seed 0


def test_stages_split_training_from_evaluation(tmp_path, capsys):
    sweep = SWEEPS["smoke"]
    root = str(tmp_path / "runs")
    run.run_sweep(sweep, root, dry_run=True, stage="eval")  # nothing trained: nothing to do
    out = capsys.readouterr().out
    assert "[run]" not in out and out.count("(not trained yet)") == 2
    run.run_sweep(sweep, root, dry_run=True, stage="train")
    out = capsys.readouterr().out
    assert out.count("diffusion_jax.main") == 2 and "diffusion_jax.evaluate" not in out
    wd = run.workdir_of(sweep, sweep.runs()[0], root)
    os.makedirs(wd)
    open(os.path.join(wd, "TRAINED"), "w").close()
    run.run_sweep(sweep, root, dry_run=True, stage="eval")  # the trained run only
    out = capsys.readouterr().out
    assert out.count("diffusion_jax.evaluate") == 1 and "diffusion_jax.main" not in out


def test_only_plans_the_selected_runs_and_rejects_unknown_axes_and_values(tmp_path, capsys):
    sweep = SWEEPS["schedule_arms"]
    root = str(tmp_path / "runs")
    only = run.parse_only(sweep, "seed=1,arm=cosine")
    assert only == {"seed": "1", "arm": "cosine"}
    assert [sweep.run_name(o) for o in run.selected_runs(sweep, only)] == ["seed=1,arm=cosine"]
    run.run_sweep(sweep, root, dry_run=True, stage="train", only=run.parse_only(sweep, "seed=2"))
    trains = [line for line in capsys.readouterr().out.splitlines() if "diffusion_jax.main" in line]
    assert len(trains) == len(sweep.axes["arm"]) and all("seed=2," in t for t in trains)
    with pytest.raises(ValueError, match="has axes"):
        run.parse_only(sweep, "sed=1")
    with pytest.raises(ValueError, match="takes one of"):
        run.parse_only(sweep, "seed=7")


def test_prepare_steps_run_once_before_the_runs_and_a_failed_one_is_not_marked(
    tmp_path, monkeypatch
):
    made, broken = str(tmp_path / "made"), str(tmp_path / "broken")
    os.makedirs(made)
    # a step that appends to a file, so running it twice would show; commands run from
    # run.REPO, here the test's directory holding the probe module
    (tmp_path / "prepare_probe.py").write_text(
        f"open({os.path.join(made, 'log')!r}, 'a').write('x')"
    )
    monkeypatch.setattr(run, "REPO", str(tmp_path))
    sweep = dataclasses.replace(SWEEPS["smoke"], prepare=((made, ("prepare_probe",)),))
    run.prepare(sweep)
    run.prepare(sweep)  # marked: not run again
    assert open(os.path.join(made, "log")).read() == "x"
    assert os.path.exists(os.path.join(made, run.PREPARED))
    failing = dataclasses.replace(sweep, prepare=((broken, ("no_such_module_xyz",)),))
    with pytest.raises(subprocess.CalledProcessError):
        run.prepare(failing)
    assert not os.path.exists(os.path.join(broken, run.PREPARED))


def test_a_latent_runs_archive_names_its_latent_dataset(tmp_path):
    latents_dir, wd = tmp_path / "latents", tmp_path / "run"
    latents_dir.mkdir()
    wd.mkdir()
    meta = {"autoencoder": "runs/fashion_ae", "autoencoder_step": 9000, "scale_factor": 0.36}
    (latents_dir / "latents.json").write_text(json.dumps(meta))
    config = {"data": {"name": "latents", "data_dir": str(latents_dir)}}
    (wd / "config.json").write_text(json.dumps(config))
    (wd / "eval.jsonl").write_text("{}\n")
    assert run.archive.save(str(wd), str(tmp_path / "a"))
    assert json.loads((tmp_path / "a" / "latents.json").read_text()) == meta
    config["data"]["name"] = "digits"  # a pixel run: nothing more than its own files
    (wd / "config.json").write_text(json.dumps(config))
    assert run.archive.save(str(wd), str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b")) == ["config.json", "eval.jsonl"]


TIERED_EVALS = ({"sampler": "ddim", "num_steps": 3}, {"sampler": "ddim", "num_steps": 99})


def _tiered_sweep():
    """Two runs; a common evaluation on both and a costly one on seed 0 only."""
    common, costly = TIERED_EVALS
    return Sweep(
        "s",
        "configs/tiny.py",
        axes={"seed": (0, 1)},
        evals=(common,),
        limited_evals=(({"seed": 0}, costly),),
        eval_samples=8,
    )


def test_eval_stage_runs_every_common_eval_before_any_limited_one(tmp_path, capsys):
    common, costly = TIERED_EVALS
    sweep = _tiered_sweep()
    root = str(tmp_path / "runs")
    wds = [run.workdir_of(sweep, o, root) for o in sweep.runs()]
    for wd in wds:
        os.makedirs(wd)
        open(os.path.join(wd, "TRAINED"), "w").close()
    run.run_sweep(sweep, root, dry_run=True, stage="eval")
    out = capsys.readouterr().out
    assert out.count("num_steps=3") == 2 and "num_steps=99" not in out
    for wd in wds:  # the common evals recorded: the next pass runs the costly one
        with open(os.path.join(wd, "eval.jsonl"), "w") as f:
            f.write(json.dumps({"checkpoint_step": 1, "num_samples": 8, **common}) + "\n")
    run.run_sweep(sweep, root, dry_run=True, stage="eval")
    out = capsys.readouterr().out
    assert out.count("[run]") == 1 and "seed=0" in out and "num_steps=99" in out


def test_eval_stage_replans_after_every_evaluation(tmp_path, monkeypatch):
    """A run that finishes training while costly evaluations wait gets its common one
    first; an evaluation whose record never appears stops the loop with a clear error."""
    common, costly = TIERED_EVALS
    sweep = _tiered_sweep()
    root = str(tmp_path / "runs")
    wd0, wd1 = (run.workdir_of(sweep, o, root) for o in sweep.runs())
    for wd in (wd0, wd1):
        os.makedirs(wd)
    open(os.path.join(wd0, "TRAINED"), "w").close()
    done = []

    def fake_run(wd, cmd):  # record what evaluate.py would, and "finish" run 1 meanwhile
        steps = int(next(a for a in cmd if "num_steps=" in a).split("=")[1])
        done.append((os.path.basename(wd), steps))
        with open(os.path.join(wd, "eval.jsonl"), "a") as f:
            rec = {"checkpoint_step": 1, "num_samples": 8, "sampler": "ddim", "num_steps": steps}
            f.write(json.dumps(rec) + "\n")
        open(os.path.join(wd1, "TRAINED"), "w").close()

    monkeypatch.setattr(run, "_run", fake_run)
    run.run_sweep(sweep, root, stage="eval")
    assert done == [("seed=0", 3), ("seed=1", 3), ("seed=0", 99)]

    monkeypatch.setattr(run, "_run", lambda wd, cmd: None)  # records nothing
    os.remove(os.path.join(wd1, "eval.jsonl"))
    with pytest.raises(RuntimeError, match="left no matching record"):
        run.run_sweep(sweep, root, stage="eval")


def test_finished_runs_are_archived_and_a_sweep_goes_on_without_its_workdirs(
    tmp_path, monkeypatch, capsys
):
    """A run is archived once trained and fully evaluated, never before; archived runs
    are skipped with no workdir left and the report reads them; an evaluation added later
    retrains an archived run whose workdir is gone and replaces its archive."""
    common, costly = TIERED_EVALS
    sweep = _tiered_sweep()
    root, recs = str(tmp_path / "runs"), str(tmp_path / "results")
    calls = []

    def fake_run(wd, cmd):  # what main.py / evaluate.py would leave in the workdir
        calls.append(cmd[2])
        os.makedirs(wd, exist_ok=True)
        if cmd[2] == "diffusion_jax.main":
            with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
                f.write(json.dumps({"step": 1, "loss": 0.5}) + "\n")
            flags = dict(a[2:].split("=", 1) for a in cmd[3:])
            config = cli.load_config_file(flags.pop("config"))
            overrides = {k[7:]: v for k, v in flags.items() if k.startswith("config.")}
            cli.apply_overrides(config, overrides)
            with open(os.path.join(wd, "config.json"), "w") as f:
                f.write(config.to_json_best_effort())
            open(os.path.join(wd, "TRAINED"), "w").close()
            return
        steps = int(next(a for a in cmd if "num_steps=" in a).split("=")[1])
        rec = {"checkpoint_step": 1, "num_samples": 8, "sampler": "ddim", "num_steps": steps}
        with open(os.path.join(wd, "eval.jsonl"), "a") as f:
            f.write(json.dumps({**rec, "fid": float(steps)}) + "\n")

    monkeypatch.setattr(run, "_run", fake_run)
    run.run_sweep(sweep, root, stage="train", records=recs)
    assert not os.path.exists(os.path.join(recs, "s"))  # trained, not evaluated: no archive
    run.run_sweep(sweep, root, records=recs)
    for overrides in sweep.runs():
        dest = run.archive.archive_of(sweep, overrides, recs)
        wd = run.workdir_of(sweep, overrides, root)
        for name in ("metrics.jsonl", "eval.jsonl"):
            assert open(os.path.join(dest, name)).read() == open(os.path.join(wd, name)).read()
    assert not run.archive.save(wd, dest)  # up to date: nothing rewritten

    shutil.rmtree(root)  # another machine: the workdirs are gone, the archives committed
    calls.clear()
    capsys.readouterr()
    run.run_sweep(sweep, root, records=recs)
    assert calls == [] and capsys.readouterr().out.count("(archived)") == 2
    groups = results.collect(sweep, root, recs)
    (runs_,) = groups.values()
    assert [results.eval_value(r, costly, "fid") for r in runs_] == [99.0, None]
    assert all(r["train"] == [{"step": 1, "loss": 0.5}] for r in runs_)

    grown = dataclasses.replace(sweep, evals=sweep.evals + ({"sampler": "ddim", "num_steps": 5},))
    run.run_sweep(grown, root, records=recs)
    assert calls.count("diffusion_jax.main") == 2  # no checkpoint left: retrained
    first = run.archive.archive_of(grown, grown.runs()[0], recs)
    specs = [json.loads(line)["num_steps"] for line in open(os.path.join(first, "eval.jsonl"))]
    assert sorted(specs) == [3, 5, 99]  # one training's records, all of them

    # an archive trained with another config than the sweep's now is stale: retrained
    shutil.rmtree(root)
    calls.clear()
    changed = dataclasses.replace(grown, fixed={"train.num_steps": 7})
    run.run_sweep(changed, root, records=recs)
    assert calls.count("diffusion_jax.main") == 2
    assert "[stale]" in capsys.readouterr().out
    assert run.archive.stale_keys(run.train_config(changed, changed.runs()[0]), first) == []
    assert run.archive.stale_keys(run.train_config(grown, grown.runs()[0]), first) == [
        "train.num_steps"
    ]
