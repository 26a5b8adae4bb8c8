"""Evaluation: the digits feature net, cached reference statistics, the real floor,
InceptionV3 shapes and weight loading, batched/sharded sample generation and the evaluate
CLI. The FID/KID/precision-recall math is tested in test_evaluation_metrics.py."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import data, evaluation as ev, generate
from diffusion_jax.evaluation.inception import _ConvBN, _flatten, _unflatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = {"name": "digits", "image_size": 8}
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")


# --------------------------------------------------------------------------- digits net


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("eval_cache"))


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return ev.digits_classifier(cache_dir)  # trains: the cache dir is fresh


@pytest.fixture(scope="module")
def digits_test():
    return data.load_split_arrays(DIGITS, "test")


def test_digits_classifier_accuracy_and_cache(classifier, cache_dir, digits_test):
    info = classifier.info
    assert not info["loaded_from_cache"]
    assert info["test_accuracy"] >= 0.97, info
    # (its training time, info["train_seconds"], is recorded but not asserted: speed is
    # for benchmarks; under the suite's -O0 and a parallel worker it took 40-62 s)
    again = ev.digits_classifier(cache_dir)
    assert again.info["loaded_from_cache"] and again.version == classifier.version
    images, _ = digits_test
    np.testing.assert_array_equal(again.features(images[:50]), classifier.features(images[:50]))
    feats = classifier.features(images)
    assert feats.shape == (299, 64) and feats.dtype == np.float32 and np.isfinite(feats).all()
    # digits upscaled by the data pipeline (image_size 16) are resized back to 8x8
    up = np.repeat(np.repeat(images[:10], 2, axis=1), 2, axis=2)
    assert classifier.features(up).shape == (10, 64)
    # digits the pipeline padded (resize_method "pad") are center-cropped back: the same
    # features as unpadded (equal inputs; float32 reassociation between compiled shapes
    # allowed), under another version (other reference statistics)
    cropping = ev.make_extractor({**DIGITS, "resize_method": "pad"}, cache_dir=cache_dir)
    assert cropping.info["loaded_from_cache"] and cropping.version == classifier.version + "-crop"
    padded = np.pad(images[:10], ((0, 0), (2, 3), (2, 3), (0, 0)), constant_values=-1.0)
    np.testing.assert_allclose(
        cropping.features(padded), classifier.features(images[:10]), rtol=1e-5, atol=1e-5
    )


def test_class_accuracy_on_real_test_images(classifier, cache_dir, digits_test):
    images, labels = digits_test
    ref = ev.reference_stats(classifier, DIGITS, "train", cache_dir)
    result = ev.evaluate_samples(classifier, images, ref, labels=labels)
    assert result["class_accuracy"] >= 0.95
    assert result["num_samples"] == 299 and result["num_reference"] == 1498
    assert {"fid", "kid", "kid_std", "precision", "recall"} <= set(result)


def test_reference_stats_cache_and_provenance(classifier, tmp_path):
    calls = []

    def counting(x):
        calls.append(len(x))
        return classifier.apply_features(x)

    extractor = dataclasses.replace(classifier, apply_features=counting)
    first = ev.reference_stats(extractor, DIGITS, "test", str(tmp_path))
    assert calls and first.n == 299 and first.features.shape == (299, 64)
    assert first.provenance == {
        "dataset": "digits",
        "split": "test",
        "image_size": 8,
        "resize_method": "bilinear",  # pad and bilinear images differ: their stats too
        "num_images": 299,
        "feature_net": "digits_classifier",
        "feature_version": classifier.version,
        "stats_version": ev.STATS_VERSION,
    }
    calls.clear()
    second = ev.reference_stats(extractor, DIGITS, "test", str(tmp_path))
    assert not calls  # loaded, not recomputed
    np.testing.assert_array_equal(second.sigma, first.sigma)
    other = dataclasses.replace(extractor, version="other-weights")
    third = ev.reference_stats(other, DIGITS, "test", str(tmp_path))
    assert calls and third.provenance["feature_version"] == "other-weights"
    calls.clear()
    ev.reference_stats(other, DIGITS, "test", str(tmp_path))
    assert not calls
    with pytest.raises(ValueError, match="reference stats were computed with"):
        ev.evaluate_samples(classifier, np.zeros((4, 8, 8, 1), np.float32), third)


def test_real_floor_is_small_and_ordering(classifier, cache_dir):
    floor = ev.real_floor(classifier, DIGITS, cache_dir=cache_dir)
    assert floor["num_samples"] == 749 and np.isfinite(floor["fid"])
    assert abs(floor["kid"]) < 3 * floor["kid_std"] + 1e-3  # unbiased: ~0
    ref = ev.reference_stats(classifier, DIGITS, "train", cache_dir)
    train_images, _ = data.load_split_arrays(DIGITS, "train")
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, (749, 8, 8, 1)).astype(np.float32)
    blurred = (train_images + np.roll(train_images, 1, 1) + np.roll(train_images, 1, 2)) / 3
    fid = lambda x: ev.evaluate_samples(classifier, x, ref, matched_num_samples=749)
    noise_fid, blur_fid = fid(noise)["fid_matched"], fid(blurred[:749])["fid_matched"]
    assert noise_fid > blur_fid > 3 * floor["fid"]
    assert floor["fid"] < 0.05 * noise_fid
    with pytest.raises(ValueError, match="needs 2N"):
        ev.matched_fid(ref.features, 1000)


# --------------------------------------------------------------------------- InceptionV3


def test_inception_v3_shapes_and_weight_loading(tmp_path):
    net = ev.InceptionV3()
    variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3)))
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    # torchvision inception_v3 (27,161,264) minus AuxLogits (3,326,696) and fc (2,049,000)
    assert n_params == 21_785_568
    out = jax.eval_shape(net.apply, variables, jnp.zeros((2, 75, 75, 3)))  # smallest input
    assert out.shape == (2, 2048)

    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        ev.inception_v3(str(tmp_path / "missing.npz"))
    # A file in pytorch-fid's naming/layout converts on load (conv [O,I,kh,kw] -> [kh,kw,I,O];
    # BN weight/bias/running_mean/running_var -> scale/bias/mean/var). Every tensor gets its
    # own random values (variances positive), so a swapped mean/var, a transposition with
    # kh/kw or I/O exchanged, or two modules' weights mapped to each other's keys all fail
    # the exact comparison below (each leaf is copied, never computed: equality is exact).
    rng = np.random.default_rng(5)
    flat = _flatten(variables)
    torch_sd = {"fc.weight": np.zeros((1008, 2048), np.float32)}  # dropped on load
    expected = {}
    for key, shape in flat.items():
        collection, *path, leaf = key.split("/")
        module = ".".join(path)
        if leaf == "kernel":
            kh, kw, i, o = shape.shape
            weight = rng.standard_normal((o, i, kh, kw), np.float32)
            torch_sd[f"{module}.weight"] = weight
            expected[key] = weight.transpose(2, 3, 1, 0)
            continue
        torch_name = {
            "scale": "weight",
            "bias": "bias",
            "mean": "running_mean",
            "var": "running_var",
        }[leaf]
        value = rng.uniform(0.5, 2.0, shape.shape).astype(np.float32)
        if leaf != "var":
            value -= 1.25  # mean/scale/bias of either sign, var > 0
        torch_sd[f"{module}.{torch_name}"] = value
        expected[key] = value
    path = tmp_path / ev.INCEPTION_FILE_NAME
    np.savez(path, **torch_sd)
    loaded = _flatten(ev.load_inception_variables(str(path)))
    assert set(loaded) == set(expected)
    for key, want in expected.items():
        np.testing.assert_array_equal(loaded[key], want, err_msg=key)
    assert loaded["batch_stats/Mixed_7c/branch_pool/bn/var"].shape == (192,)
    extractor = ev.inception_v3(str(path))
    feats = jax.eval_shape(
        extractor.apply_features,
        jax.ShapeDtypeStruct((extractor.batch_size, 32, 32, 1), jnp.float32),
    )
    assert feats.shape == (extractor.batch_size, 2048)  # gray -> RGB, resized to 299
    del torch_sd["Mixed_5b.branch1x1.conv.weight"]
    np.savez(path, **torch_sd)
    with pytest.raises(ValueError, match="missing"):
        ev.load_inception_variables(str(path))


def test_inception_conv_bn_matches_pytorch_basic_conv2d():
    """What the converted names mean: a converted pytorch-fid BasicConv2d state dict in one
    _ConvBN computes relu((conv(x) - running_mean) / sqrt(running_var + 1e-3) * weight +
    bias), PyTorch's cross-correlation out[o, h, w] = sum_{i,y,x} W[o, i, y, x]
    in[i, h + y, w + x] (zero padding). A 1x3 kernel with padding (0, 1) tells kh from kw;
    running_var is a variance (its square root is taken), not a standard deviation."""
    rng = np.random.default_rng(6)
    o, i, kh, kw = 4, 3, 1, 3
    sd = {
        "blk.conv.weight": rng.standard_normal((o, i, kh, kw)).astype(np.float32),
        "blk.bn.weight": rng.uniform(0.5, 2.0, o).astype(np.float32),
        "blk.bn.bias": rng.uniform(-1.0, 1.0, o).astype(np.float32),
        "blk.bn.running_mean": rng.uniform(-1.0, 1.0, o).astype(np.float32),
        "blk.bn.running_var": rng.uniform(0.2, 4.0, o).astype(np.float32),
    }
    tree = _unflatten(ev.inception_variables_from_torch(sd))
    variables = {"params": tree["params"]["blk"], "batch_stats": tree["batch_stats"]["blk"]}
    x = rng.standard_normal((2, 5, 6, i)).astype(np.float32)
    got = _ConvBN(o, (kh, kw), padding=(0, 1)).apply(variables, jnp.asarray(x))
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (0, 0)))
    w = sd["blk.conv.weight"].astype(np.float64)
    conv = sum(
        np.einsum("nhwi,oi->nhwo", xp[:, y : y + 5, dx : dx + 6], w[:, :, y, dx])
        for y in range(kh)
        for dx in range(kw)
    )
    f64 = {k: v.astype(np.float64) for k, v in sd.items()}
    bn = (conv - f64["blk.bn.running_mean"]) / np.sqrt(f64["blk.bn.running_var"] + 1e-3)
    want = np.maximum(bn * f64["blk.bn.weight"] + f64["blk.bn.bias"], 0.0)
    assert (want > 0).mean() > 0.3  # the ReLU does not hide the comparison
    # float32 conv of 9 O(1) products, then BN with scale/sqrt(var) <= ~4.5: round-off
    # ~1e-6 absolute; 1e-5 still tells a sqrt(var) from var or a wrong eps (>= ~1e-3).
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- sampling


def toy_sample_fn(params, rng, labels, guidance_scale, images=None, mask=None, *unused):
    """Stands in for steps.make_sample_fn's output: [B, 2, 2, 1] from noise + labels."""
    noise = jax.random.normal(rng, (labels.shape[0], 2, 2, 1))
    return params["w"] * noise + guidance_scale * labels[:, None, None, None]


def test_generate_samples_batches_labels_and_seeds():
    params = {"w": jnp.float32(1.0)}
    labels = generate.class_balanced_labels(10, 25)
    assert np.bincount(generate.class_balanced_labels(10, 50)).tolist() == [5] * 10
    a = generate.generate_samples(
        toy_sample_fn, params, 25, 8, seed=3, labels=labels, guidance_scale=0.0
    )
    assert a.shape == (25, 2, 2, 1)
    b = generate.generate_samples(
        toy_sample_fn, params, 25, 8, seed=3, labels=labels, guidance_scale=0.0
    )
    np.testing.assert_array_equal(a, b)
    # batch i uses fold_in(PRNGKey(seed), i), as sample.py does
    first = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), 0), (8, 2, 2, 1))
    np.testing.assert_array_equal(a[:8], first)
    c = generate.generate_samples(
        toy_sample_fn, params, 25, 8, seed=3, labels=labels, guidance_scale=1.0
    )
    np.testing.assert_allclose(
        c - a, np.broadcast_to(labels[:, None, None, None], a.shape), atol=1e-6
    )


@needs_8
def test_generate_samples_sharded_equals_unsharded():
    """A real sampler (a tiny class-conditional DiT, 2 DDIM steps, guidance 2) on 8 devices
    gives the unsharded images. A fresh model's zero-initialized output layer predicts
    eps = 0 whatever its input, label or noise, which would hide labels or noise sent to
    the wrong shard; so every parameter is random here (drawn directly, which also skips
    compiling model.init), x0 is not clipped (clipping would flatten most pixels to +-1),
    and the test checks that the images depend on the parameters and on each image's own
    label."""
    from diffusion_jax import parallel, schedules, steps
    from diffusion_jax.models import build_model

    cfg = tiny.get_config()
    cfg.model.name = "dit"
    cfg.model.dit.update(hidden_size=32, depth=1, num_heads=2, patch_size=2, freq_embed_dim=32)
    cfg.model.num_classes = 10
    cfg.sampler.update(num_steps=2, clip_x0=False)
    n, batch, shape = 20, 16, (8, 8, 1)  # 2 batches, the second padded
    model = build_model(cfg.model)
    schedule = schedules.make_schedule(cfg.schedule.name, cfg.schedule.num_timesteps)
    abstract = jax.eval_shape(
        lambda: model.init(
            {"params": jax.random.key(0)},
            jnp.zeros((1, *shape)),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1,), jnp.int32),
            train=False,
        )["params"]
    )
    rng = np.random.default_rng(0)
    fan_in = lambda x: int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
    params = jax.tree.map(
        lambda x: 0.3 * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(fan_in(x)),
        abstract,
    )
    labels = generate.class_balanced_labels(10, n)
    fn = steps.make_sample_fn(model, schedule, cfg, (batch, *shape))
    draw = functools.partial(
        generate.generate_samples, fn, num_samples=n, batch_size=batch, seed=0, guidance_scale=2
    )
    one = draw(params=params, labels=labels)
    mesh = parallel.make_mesh()
    sharded = draw(params=params, labels=labels, mesh=mesh)
    assert sharded.shape == (n, *shape)
    # Same arithmetic per image; a batch of 2 per device instead of 16 may reorder float32
    # reductions: a few ulps of pixels up to ~15 after two steps (measured 2e-6). A label
    # or noise mix-up moves pixels by >= 0.05 (checked below).
    np.testing.assert_allclose(sharded, one, rtol=0, atol=1e-4)
    # Non-trivial: the images differ from the zero-output model's (all parameters 0), and
    # each image depends on its own label (labels shifted by one -> other images).
    zero_out = draw(params=jax.tree.map(np.zeros_like, params), labels=labels)
    shifted = draw(params=params, labels=(labels + 1) % 10)
    per_image = lambda a, b: np.abs(a - b).reshape(n, -1).max(axis=1)
    assert per_image(one, zero_out).min() > 0.05
    assert per_image(one, shifted).min() > 0.05
    with pytest.raises(ValueError, match="not divisible"):
        generate.generate_samples(toy_sample_fn, params, 20, 12, 0, labels, mesh=mesh)


def test_tensorboard_scalars_carry_provenance():
    result = {
        "fid": 1.5,
        "kid": 0.1,
        "num_samples": 1000,
        "num_reference": 1498,
        "seed": 0,
        "guidance_scale": 2.0,
        "num_steps": 50,
        "eta": None,
        "sampler": "ddim",
    }
    scalars = ev.tensorboard_scalars(result)
    assert scalars == {
        "eval/fid": 1.5,
        "eval/kid": 0.1,
        "eval/num_samples": 1000.0,
        "eval/num_reference": 1498.0,
        "eval/seed": 0.0,
        "eval/guidance_scale": 2.0,
        "eval/num_steps": 50.0,
    }


# --------------------------------------------------------------------------- CLI


def test_evaluate_cli_on_tiny_workdir(classifier, cache_dir, tmp_path):
    workdir = str(tmp_path / "tiny")
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusion_jax.main",
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusion_jax.evaluate",
            f"--workdir={workdir}",
            "--num_samples=40",
            "--batch_size=20",
            "--config.sampler.num_steps=3",
            "--config.sampler.eta=0.5",
            "--seed=7",
            f"--cache_dir={cache_dir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["num_samples"] == 40 and record["seed"] == 7
    assert record["sampler"] == "ddim" and record["num_steps"] == 3 and record["eta"] == 0.5
    assert record["guidance_scale"] == 1.0
    assert record["checkpoint_step"] == tiny.get_config().train.num_steps
    assert record["feature_version"] == classifier.version  # cached net reused, not retrained
    assert record["matched_num_samples"] == 40 and record["fid_matched_ratio"] > 0
    for key in ("fid", "kid", "precision", "recall", "fid_floor", "fid_matched"):
        assert np.isfinite(record[key]), key
    # the bootstrap interval over samples, and the same interval over the floor
    assert record["fid_matched_low"] < record["fid_matched"] < record["fid_matched_high"]
    assert record["bootstrap_resamples"] == 200
    np.testing.assert_allclose(
        record["fid_matched_ratio_high"], record["fid_matched_high"] / record["fid_floor"], 1e-6
    )
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        assert json.loads(f.readlines()[-1]) == record
    from diffusion_jax import evaluate, workdir as workdir_lib

    with pytest.raises(workdir_lib.ConfigError, match="num_steps=1000"):  # before sampling
        evaluate.run(workdir, num_samples=10, overrides={"sampler.num_steps": 1000})


def test_floor_of_a_split_larger_than_the_kept_features(classifier, monkeypatch):
    # Fashion-MNIST's 60k train images keep MAX_REFERENCE_FEATURES (50k) feature rows: the
    # floor needs 2N of them, not all 60k (the old check refused every such split).
    from diffusion_jax.evaluation import stats

    feats = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    big = stats.FeatureStats.from_features(feats, {"dataset": "x"}, keep_features=60)
    big = dataclasses.replace(big, n=60_000)
    monkeypatch.setattr(stats, "reference_stats", lambda *a, **k: big)
    floor = ev.real_floor(classifier, DIGITS, num_samples=30)
    assert floor["num_samples"] == 30 and np.isfinite(floor["fid"])
    assert ev.real_floor(classifier, DIGITS)["num_samples"] == 30  # default: kept // 2
    with pytest.raises(ValueError, match="needs 62 reference features"):
        ev.real_floor(classifier, DIGITS, num_samples=31)
