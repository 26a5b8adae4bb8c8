"""Training through the real entry points: the CLI end to end (train, in-loop eval,
resume, sample), bit-exact resume after SIGKILL, and clear errors for bad input.

Each CLI call is a fresh process that compiles the tiny model, so these tests are slow;
they live apart from test_train.py so pytest-xdist (--dist loadfile) runs the two halves
on different workers.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax import metrics, train

from helpers import REPO, cli, load_state, tiny_config


def test_cli_train_resume_sample(tmp_path):
    wd = str(tmp_path / "wd")
    r = cli(
        "diffusion_jax.main",
        "--config=configs/tiny.py",
        f"--workdir={wd}",
        "--config.eval.every_steps=8",
        "--config.eval.metrics_every_steps=8",
        "--config.eval.metrics_num_samples=16",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # in-loop quality metrics, logged with their provenance
    with open(os.path.join(wd, "eval.jsonl")) as f:
        record = json.loads(f.readlines()[-1])
    assert record["step"] == 8 and record["num_samples"] == 16
    assert np.isfinite(record["fid"]) and record["sampler"] == "ddim"
    # the floor at the matched N (16) and the training clock, for learning curves
    assert record["matched_num_samples"] == 16 and record["fid_floor"] > 0
    assert record["fid_matched_ratio"] == pytest.approx(record["fid_matched"] / record["fid_floor"])
    assert 0 < record["train_seconds"] < 600
    from diffusion_jax.checkpoint import Checkpointer

    assert Checkpointer(os.path.join(wd, "checkpoints")).latest_step() == 8
    assert os.path.exists(os.path.join(wd, "samples", "step_0000008.png"))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(wd, "tensorboard")))
    # resume to 12 steps from the step-8 checkpoint
    r = cli(
        "diffusion_jax.main",
        "--config=configs/tiny.py",
        f"--workdir={wd}",
        "--config.train.num_steps=12",
        "--config.eval.metrics_every_steps=4",
        "--config.eval.metrics_num_samples=16",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 8" in r.stderr
    with open(os.path.join(wd, "eval.jsonl")) as f:
        resumed = json.loads(f.readlines()[-1])
    # the clock went on from the step-8 checkpoint's reading (taken before that record)
    assert resumed["step"] == 12 and resumed["train_seconds"] > record["train_seconds"]
    # sampling restores the 8-device checkpoint onto 1 device
    npz = str(tmp_path / "s.npz")
    r = cli(
        "diffusion_jax.sample",
        f"--workdir={wd}",
        "--num_samples=6",
        "--config.sampler.num_steps=3",
        f"--npz={npz}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = np.load(npz)
    assert out["images"].shape == (6, 8, 8, 1) and out["images"].dtype == np.uint8
    assert out["labels"].shape == (6,)


def test_train_clock_excludes_paused_time_and_continues_after_resume(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    clock = metrics.TrainClock()
    now[0] += 5.0
    with clock.paused():  # sampling / metrics: not training time
        now[0] += 30.0
    now[0] += 2.0
    assert clock.seconds() == 7.0
    clock.resume(60.0)  # a checkpoint's reading
    assert clock.seconds() == 67.0


def test_exact_resume_after_sigkill(tmp_path):
    """Kill -9 a run right after its first checkpoint, resume, and compare with an
    uninterrupted run to the same step: parameters must be bit-identical."""
    common = [
        "--config=configs/tiny.py",
        "--config.ckpt.every_steps=2",
        "--config.train.log_every_steps=2",
        "--config.model.unet.dropout=0.1",
    ]
    killed = str(tmp_path / "killed")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffusion_jax.main",
            *common,
            f"--workdir={killed}",
            "--config.train.num_steps=100000",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckdir = os.path.join(killed, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [d for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
        if done:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done, "no checkpoint appeared"
    from diffusion_jax.checkpoint import Checkpointer

    last = Checkpointer(ckdir).latest_step()
    target = last + 4
    with open(os.path.join(killed, "metrics.jsonl")) as f:
        logged_before = len(f.readlines())
    r = cli(
        "diffusion_jax.main", *common, f"--workdir={killed}", f"--config.train.num_steps={target}"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # it resumed from the checkpoint, not from step 0: a run that retrained from scratch
    # would end with the same parameters, so the steps it trained are checked
    assert f"resumed from step {last}" in r.stderr
    with open(os.path.join(killed, "metrics.jsonl")) as f:
        resumed_steps = [json.loads(line)["step"] for line in f.readlines()[logged_before:]]
    assert resumed_steps == [last + 2, last + 4], resumed_steps
    straight = str(tmp_path / "straight")
    r = cli(
        "diffusion_jax.main", *common, f"--workdir={straight}", f"--config.train.num_steps={target}"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_state(killed, target)
    b = load_state(straight, target)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # bit-exact: same programs, same inputs


# ----------------------------------------------------------------------------- errors


def test_missing_named_dataset_is_clear(tmp_path):
    cfg = tiny_config(**{"data.name": "cifar10", "data.data_dir": str(tmp_path)})
    with pytest.raises(Exception, match="tfds build"):
        train.train_and_evaluate(cfg, str(tmp_path / "wd"))


def test_non_finite_loss_stops_with_step(tmp_path):
    cfg = tiny_config(
        **{"optim.learning_rate": 1e38, "optim.grad_clip_norm": 0.0, "optim.warmup_steps": 0}
    )
    with pytest.raises(train.NonFiniteError, match=r"at step \d+"):
        train.train_and_evaluate(cfg, str(tmp_path / "wd"))
