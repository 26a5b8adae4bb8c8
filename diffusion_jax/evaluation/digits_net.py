"""The digits feature net: a small conv classifier trained on the bundled digits' train
split (deterministic, fixed seed), cached with its test accuracy; its penultimate layer
gives classifier-FID features and its logits class accuracy (``digits_classifier``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from diffusion_jax.datasets.digits import IMAGE_SIZE as DIGITS_SIZE
from diffusion_jax.evaluation.extractor import FeatureExtractor, to_channels
from diffusion_jax.evaluation.stats import atomic_write, resolve_cache_dir

# The whole training recipe; its hash is part of the cache key and of the version.
_DIGITS_RECIPE = dict(
    version=2,
    widths=(64, 128),
    feature_dim=64,
    epochs=60,
    batch_size=64,
    learning_rate=2e-3,
    weight_decay=1e-4,
    max_shift=1,
    seed=0,
)


def _patches_3x3(x):
    """[B, H, W, C] -> [B, H, W, 9C]: each pixel's 3x3 neighbourhood, padded with the
    background value -1. A 3x3 conv is then one matmul, which XLA's CPU backend runs ~10x
    faster than its convolution (XLA:CPU's convolution weight gradient is ~3x slower than
    its forward; see benchmarks/README.md)."""
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    return jnp.concatenate(
        [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=-1
    )


class DigitsClassifierNet(nn.Module):
    """Two stages of 3x3 conv (as a matmul over patches) + SiLU + 2x2 average pool
    (8 -> 4 -> 2), a SiLU dense feature layer (the penultimate layer: classifier-FID
    features; SiLU rather than ReLU so no feature unit dies) and the class logits."""

    widths: tuple = (64, 128)
    feature_dim: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):  # [B, 8, 8, 1] in [-1, 1]
        for i, width in enumerate(self.widths):
            x = nn.silu(nn.Dense(width, name=f"conv{i}")(_patches_3x3(x)))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        feats = nn.silu(nn.Dense(self.feature_dim, name="features")(x.reshape(x.shape[0], -1)))
        return feats, nn.Dense(self.num_classes, name="logits")(feats)


def _random_shift(rng, images, max_shift: int):
    """Shift each image by up to ``max_shift`` pixels in x and y (background -1 fills)."""
    b, h, w, _ = images.shape
    s = max_shift
    padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(rng, (b, 2), 0, 2 * s + 1)

    def crop(img, offset):
        return jax.lax.dynamic_slice(img, (offset[0], offset[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def _train_digits_classifier(train_x, train_y, recipe) -> dict:
    """Deterministic training (fixed seed, fixed per-epoch permutations); returns params."""
    net = DigitsClassifierNet(tuple(recipe["widths"]), recipe["feature_dim"])
    key = jax.random.PRNGKey(recipe["seed"])
    params = net.init(key, jnp.zeros((1, DIGITS_SIZE, DIGITS_SIZE, 1)))["params"]
    bs = recipe["batch_size"]
    steps_per_epoch = len(train_x) // bs
    schedule = optax.cosine_decay_schedule(
        recipe["learning_rate"], recipe["epochs"] * steps_per_epoch
    )
    tx = optax.adamw(schedule, weight_decay=recipe["weight_decay"])
    opt_state = tx.init(params)

    def step(carry, batch):
        params, opt_state = carry
        x, y, rng = batch
        x = _random_shift(rng, x, recipe["max_shift"])

        def loss_fn(p):
            _, logits = net.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    @jax.jit
    def epoch(params, opt_state, xs, ys, rngs):
        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), (xs, ys, rngs))
        return params, opt_state

    n_used = steps_per_epoch * bs
    for e in range(recipe["epochs"]):
        perm = np.random.default_rng([recipe["seed"], e]).permutation(len(train_x))[:n_used]
        xs = train_x[perm].reshape(steps_per_epoch, bs, *train_x.shape[1:])
        ys = train_y[perm].reshape(steps_per_epoch, bs)
        rngs = jax.random.split(jax.random.fold_in(key, e + 1), steps_per_epoch)
        params, opt_state = epoch(params, opt_state, xs, ys, rngs)
    return jax.device_get(params)


def _digits_extractor(params, info) -> FeatureExtractor:
    recipe = _DIGITS_RECIPE
    net = DigitsClassifierNet(tuple(recipe["widths"]), recipe["feature_dim"])
    scale = np.float32(info.get("feature_scale", 1.0))

    def prepare(x):
        x = to_channels(jnp.asarray(x, jnp.float32), 1)
        if x.shape[1:3] != (DIGITS_SIZE, DIGITS_SIZE):  # e.g. digits upscaled by data.py
            x = jax.image.resize(
                x, (x.shape[0], DIGITS_SIZE, DIGITS_SIZE, 1), "linear", antialias=True
            )
        return x

    # params are closed over: constants of the compiled programs (~140k floats).
    feats_fn = jax.jit(lambda x: net.apply({"params": params}, prepare(x))[0] * scale)
    logits_fn = jax.jit(lambda x: net.apply({"params": params}, prepare(x))[1])
    return FeatureExtractor(
        name="digits_classifier",
        version=info["version"],
        feature_dim=recipe["feature_dim"],
        apply_features=feats_fn,
        apply_logits=logits_fn,
        batch_size=500,
        info=info,
    )


def digits_classifier(cache_dir: str = "", data_dir: str = "") -> FeatureExtractor:
    """The digits feature net: trained once on the digits train split, then cached.

    Training: ``_DIGITS_RECIPE`` (AdamW, cosine decay, 60 epochs of 1,498 images with
    random +-1 pixel shifts, fixed seed): ~5-12 s on 2 CPU cores, 98.3% test accuracy on
    the 299 test digits. Features are the penultimate layer times a fixed scale that gives
    the train features unit mean square (so FID/KID magnitudes do not depend on an
    arbitrary layer scale; the polynomial KID kernel assumes features of order one).

    Cache: ``<cache_dir>/digits_classifier-<recipe hash>.msgpack`` (params) and ``.json``
    (test accuracy, training time, feature scale, params sha256, versions). The
    extractor's ``version`` is ``<recipe hash>-<params sha256[:12]>``, so statistics
    computed with other weights (e.g. trained on another machine, with other float
    round-off) are never reused. ``info["loaded_from_cache"]`` says whether this call
    trained. ``data_dir``: where the digits TFDS dataset lives (data.py's default if "").
    """
    from diffusion_jax import data  # deferred: the metric math needs no data pipeline

    recipe_json = json.dumps(_DIGITS_RECIPE, sort_keys=True).encode()
    recipe_hash = hashlib.sha256(recipe_json).hexdigest()[:8]
    base = os.path.join(resolve_cache_dir(cache_dir), f"digits_classifier-{recipe_hash}")
    params_path, info_path = base + ".msgpack", base + ".json"
    data_cfg = {"name": data.DIGITS, "data_dir": data_dir, "image_size": DIGITS_SIZE}

    if os.path.exists(params_path) and os.path.exists(info_path):
        with open(params_path, "rb") as f:
            raw = f.read()
        with open(info_path) as f:
            info = json.load(f)
        if info.get("params_sha256") == hashlib.sha256(raw).hexdigest():
            net = DigitsClassifierNet(
                tuple(_DIGITS_RECIPE["widths"]), _DIGITS_RECIPE["feature_dim"]
            )
            template = jax.eval_shape(
                net.init, jax.random.PRNGKey(0), jnp.zeros((1, DIGITS_SIZE, DIGITS_SIZE, 1))
            )["params"]
            params = serialization.from_bytes(
                jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template), raw
            )
            return _digits_extractor(
                params, {**info, "loaded_from_cache": True, "path": params_path}
            )
        logging.warning("digits classifier cache %s is inconsistent; retraining", params_path)

    train_x, train_y = data.load_split_arrays(data_cfg, "train")
    test_x, test_y = data.load_split_arrays(data_cfg, "test")
    t0 = time.time()
    params = _train_digits_classifier(train_x, train_y, _DIGITS_RECIPE)
    train_seconds = time.time() - t0
    raw = serialization.to_bytes(params)
    sha = hashlib.sha256(raw).hexdigest()
    info = {
        "recipe": _DIGITS_RECIPE,
        "recipe_hash": recipe_hash,
        "params_sha256": sha,
        "version": f"{recipe_hash}-{sha[:12]}",
        "train_seconds": round(train_seconds, 2),
        "num_train": int(len(train_x)),
        "num_test": int(len(test_x)),
        "jax_version": jax.__version__,
    }
    unscaled = _digits_extractor(params, info)
    train_feats = unscaled.features(train_x)
    info["feature_scale"] = float(1.0 / np.sqrt(np.mean(np.square(train_feats, dtype=np.float64))))
    info["test_accuracy"] = float((unscaled.logits(test_x).argmax(-1) == test_y).mean())
    info["train_accuracy"] = float((unscaled.logits(train_x).argmax(-1) == train_y).mean())
    logging.info(
        "digits classifier: test accuracy %.4f, trained in %.1f s",
        info["test_accuracy"],
        train_seconds,
    )
    # params first: a reader that finds the JSON also finds the matching params
    atomic_write(params_path, lambda f: f.write(raw))
    atomic_write(info_path, lambda f: f.write(json.dumps(info, indent=2).encode()))
    return _digits_extractor(params, {**info, "loaded_from_cache": False, "path": params_path})
