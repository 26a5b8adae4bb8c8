"""Training an autoencoder with the same trainer as the diffusion models: the loss, the
train step on every parallel layout, exact resume, in-loop reconstruction metrics, the
evaluate CLI and the clear refusals."""

import json
import os

import jax
import numpy as np
import pytest

from diffusion_jax import autoencoding, parallel, tasks, train, workdir
from diffusion_jax.models import build_model
from diffusion_jax.models.autoencoder import AUTOENCODER_PRESETS
from diffusion_jax.state import create_train_state, make_optimizer

from helpers import cli, load_state, max_diff, synthetic_batches, tiny_config

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")


def ae_config(**overrides):
    """configs/tiny.py as an autoencoder (the "tiny" preset, 8x8 digits -> 4x4 latents)."""
    c = tiny_config(**{"model.name": "autoencoder"})
    c.model.autoencoder.update(AUTOENCODER_PRESETS["tiny"])
    c.model.autoencoder.image_channels = 1
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = c
        for part in path:
            node = node[part]
        node[name] = value
    return c


def run_steps(config, devices, batches):
    model = build_model(config.model)
    tx = make_optimizer(config.optim, config.train.num_steps)
    dp = parallel.DataParallel(config.train.parallel, parallel.make_mesh(devices))
    state = create_train_state(model, tx, (8, 8, 1), config.seed, out_sharding=dp.state_sharding)
    task = tasks.task_of(config)
    step = dp.compile(lambda axis: task.train_step(model, tx, None, config, axis_name=axis))
    dstate, ms = dp.put_state(state), []
    for b in batches:
        dstate, m = step(dstate, dp.put_batch(b))
        ms.append(dp.get_metrics(m))
    return jax.device_get(dp.get_state(dstate).params), ms


def test_loss_is_the_weighted_sum_of_its_terms():
    config = ae_config()
    model = build_model(config.model)
    x = synthetic_batches(1, 4)[0]
    params = model.init(jax.random.key(0), x["image"])["params"]
    parts = {}
    for name, weights in (("l1", (1.0, 0.0, 0.0)), ("l2", (0.0, 1.0, 0.0)), ("kl", (0, 0, 1.0))):
        kw = dict(zip(("l1_weight", "l2_weight", "kl_weight"), weights))
        parts[name], aux = autoencoding.autoencoder_loss(model, params, x, jax.random.key(1), **kw)
    # every call draws the same posterior noise, so the terms add up exactly (float32)
    both, aux = autoencoding.autoencoder_loss(
        model, params, x, jax.random.key(1), l1_weight=2.0, l2_weight=3.0, kl_weight=1e-3
    )
    want = 2 * parts["l1"] + 3 * parts["l2"] + 1e-3 * parts["kl"]
    np.testing.assert_allclose(both, want, rtol=1e-5)
    np.testing.assert_allclose(parts["l1"], aux["recon_l1"], rtol=1e-6)
    # kl is per image summed over latents, divided by the 64 pixels in the loss
    np.testing.assert_allclose(parts["kl"], aux["kl"] / 64, rtol=1e-5)


@needs_8
def test_train_step_is_the_same_on_one_device_eight_devices_and_pmap():
    """Same posterior noise per example id on every layout; only float summation order
    differs (~1e-6 relative after a few Adam steps; 1e-5 allowed, as for diffusion)."""
    batches = synthetic_batches(3, 16)
    p1, m1 = run_steps(ae_config(), jax.devices()[:1], batches)
    p8, m8 = run_steps(ae_config(), jax.devices(), batches)
    pp, mp = run_steps(ae_config(**{"train.parallel": "pmap"}), jax.devices(), batches)
    for ms in (m8, mp):
        for a, b in zip(m1, ms):
            for key in ("loss", "grad_norm", "recon_l1", "kl"):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    assert max_diff(p1, p8) < 1e-5 and max_diff(p1, pp) < 1e-5


def test_training_resumes_exactly_and_logs_reconstruction_metrics(tmp_path, digits_dir):
    overrides = {
        "data.data_dir": str(digits_dir),
        "eval.metrics_every_steps": 4,
        "eval.metrics_num_samples": 40,
        "eval.every_steps": 4,
    }
    whole = str(tmp_path / "whole")
    train.train_and_evaluate(ae_config(**overrides), whole)
    split = str(tmp_path / "split")
    train.train_and_evaluate(ae_config(**overrides, **{"train.num_steps": 4}), split)
    train.train_and_evaluate(ae_config(**overrides), split)
    a, b = load_state(whole, 8), load_state(split, 8)
    assert max_diff(a.params, b.params) == 0 and max_diff(a.opt_state, b.opt_state) == 0

    with open(os.path.join(whole, "eval.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [4, 8]
    r = records[-1]
    assert r["num_samples"] == 40 and r["heldout_split"] == "test"
    assert 0 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1 and np.isfinite(r["fid"])
    assert r["fid_floor"] > 0 and 0 <= r["class_accuracy"] <= 1
    with open(os.path.join(whole, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    logged = [r for r in logged if "train/loss" in r][-1]
    assert {"train/recon_l1", "train/recon_mse", "train/kl"} <= set(logged)
    assert os.path.exists(os.path.join(whole, "samples", "step_0000008.png"))


def test_evaluate_cli_scores_reconstructions_and_sample_refuses(tmp_path, digits_dir):
    wd = str(tmp_path / "wd")
    train.train_and_evaluate(ae_config(**{"data.data_dir": str(digits_dir)}), wd)
    out = str(tmp_path / "eval.jsonl")
    r = cli(
        "diffusion_jax.evaluate",
        f"--workdir={wd}",
        "--num_samples=50",
        f"--out={out}",
        "--floor_num_samples=40",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(r.stdout.strip().splitlines()[-1])
    assert record["num_samples"] == 50 and record["checkpoint_step"] == 8
    assert record["psnr"] > 0 and "fid_matched_ratio" in record and "sampler" not in record
    r = cli("diffusion_jax.sample", f"--workdir={wd}")
    assert r.returncode != 0 and "holds an autoencoder" in r.stderr
    assert "Traceback" not in r.stderr


def test_autoencoder_with_classes_is_refused_before_anything_runs(tmp_path, digits_dir):
    config = ae_config(**{"data.data_dir": str(digits_dir), "model.num_classes": 10})
    with pytest.raises(workdir.ConfigError, match="num_classes"):
        train.train_and_evaluate(config, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd" / "checkpoints")
