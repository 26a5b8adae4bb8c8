"""Small conv classifiers as feature nets: the net, deterministic training and the cache
shared by the dataset-specific nets (``digits_net``, ``fashion_net``).

A net is trained once on its dataset's train split at the native image size (fixed seed,
fixed per-epoch permutations), then cached in ``cache_dir`` as
``<name>-<key hash>.msgpack`` (params) and ``.json`` (recipe, test accuracy, training
time, feature scale, params sha256, versions). Its penultimate layer gives
classifier-FID features, its logits class accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from diffusion_jax.evaluation.extractor import FeatureExtractor, to_channels
from diffusion_jax.evaluation.stats import atomic_write, resolve_cache_dir

log = logging.getLogger(__name__)


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


class SmallConvNet(nn.Module):
    """Stages of 3x3 conv (as a matmul over patches) + SiLU + 2x2 average pool (one stage
    per entry of ``widths``: 8 -> 4 -> 2, 28 -> 14 -> 7), a SiLU dense feature layer (the
    penultimate layer: classifier-FID features; SiLU rather than ReLU so no feature unit
    dies) and the class logits. Returns (features, logits)."""

    widths: tuple = (64, 128)
    feature_dim: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):  # [B, H, W, 1] in [-1, 1]
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


def _augment(rng, images, recipe):
    """Random +-max_shift pixel shifts, then (``flip`` in the recipe) horizontal flips.
    Without ``flip``, `rng` goes to the shifts unsplit (the digits net's weights stay
    those of its recipe hash)."""
    if not recipe.get("flip", False):
        return _random_shift(rng, images, recipe["max_shift"])
    shift_rng, flip_rng = jax.random.split(rng)
    images = _random_shift(shift_rng, images, recipe["max_shift"])
    flip = jax.random.bernoulli(flip_rng, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1], images)


def train(net: SmallConvNet, train_x, train_y, recipe: Mapping[str, Any]) -> dict:
    """Deterministic training (fixed seed, fixed per-epoch permutations); returns params.

    AdamW with cosine decay over ``epochs`` of ``len(train_x) // batch_size`` steps, each
    epoch one jitted ``lax.scan``; shifted (and optionally flipped) batches.
    """
    key = jax.random.PRNGKey(recipe["seed"])
    params = net.init(key, jnp.zeros((1, *train_x.shape[1:])))["params"]
    bs = recipe["batch_size"]
    steps_per_epoch = len(train_x) // bs
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_x)} training images, fewer than a batch of {bs}")
    schedule = optax.cosine_decay_schedule(
        recipe["learning_rate"], recipe["epochs"] * steps_per_epoch
    )
    tx = optax.adamw(schedule, weight_decay=recipe["weight_decay"])
    opt_state = tx.init(params)

    def step(carry, batch):
        params, opt_state = carry
        x, y, rng = batch
        x = _augment(rng, x, recipe)

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


# ----------------------------------------------------------------------------------------
# The cached classifier as a FeatureExtractor.


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """What ``cached_classifier`` needs to know about one dataset's classifier.

    ``key`` (JSON) identifies the training: its sha256 names the cache files and is part of
    ``version``; ``recipe`` holds the ``SmallConvNet`` shape (widths, feature_dim) and the
    ``train`` settings. ``data_cfg`` reads the dataset at ``native_size``.
    """

    name: str
    recipe: Mapping[str, Any]
    key: Any
    data_cfg: Mapping[str, Any]
    native_size: int
    num_classes: int = 10

    def net(self) -> SmallConvNet:
        return SmallConvNet(
            tuple(self.recipe["widths"]), self.recipe["feature_dim"], self.num_classes
        )


def fit_to_native(x, native: int, crop: bool):
    """Images [B, S, S, C] -> [B, native, native, 1]: unchanged at the native size; a
    larger image is center-cropped (``crop``: the inverse of data.py's ``pad``, which
    centres the native image with the extra pixel of an odd margin at the bottom/right),
    any other size resized (linear, antialiased when shrinking)."""
    x = to_channels(jnp.asarray(x, jnp.float32), 1)
    size = x.shape[1:3]
    if size == (native, native):
        return x
    if crop and min(size) >= native:
        top, left = (size[0] - native) // 2, (size[1] - native) // 2
        return x[:, top : top + native, left : left + native]
    return jax.image.resize(x, (x.shape[0], native, native, 1), "linear", antialias=True)


def _extractor(spec: ClassifierSpec, params, info, crop: bool) -> FeatureExtractor:
    net = spec.net()
    scale = np.float32(info.get("feature_scale", 1.0))
    prepare = lambda x: fit_to_native(x, spec.native_size, crop)
    # params are closed over: constants of the compiled programs.
    feats_fn = jax.jit(lambda x: net.apply({"params": params}, prepare(x))[0] * scale)
    logits_fn = jax.jit(lambda x: net.apply({"params": params}, prepare(x))[1])
    return FeatureExtractor(
        name=spec.name,
        # Cropped inputs are other features than resized ones (pad vs bilinear data):
        # statistics must not be shared between them.
        version=info["version"] + ("-crop" if crop else ""),
        feature_dim=spec.recipe["feature_dim"],
        apply_features=feats_fn,
        apply_logits=logits_fn,
        batch_size=500,
        info=info,
    )


def load_cached(net, input_shape, params_path: str, info_path: str):
    """(params, info) of ``net`` (inputs [1, *input_shape]) from a cache entry, or None if
    absent or inconsistent (the params' sha256 must match the one recorded in info)."""
    if not (os.path.exists(params_path) and os.path.exists(info_path)):
        return None
    with open(params_path, "rb") as f:
        raw = f.read()
    with open(info_path) as f:
        info = json.load(f)
    if info.get("params_sha256") != hashlib.sha256(raw).hexdigest():
        log.warning("classifier cache %s is inconsistent; retraining", params_path)
        return None
    template = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, *input_shape)))
    params = serialization.from_bytes(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template["params"]), raw
    )
    return params, info


def cached_classifier(
    spec: ClassifierSpec, cache_dir: str = "", *, crop: bool = False
) -> FeatureExtractor:
    """``spec``'s classifier: loaded from ``cache_dir``, else trained and cached there.

    ``version`` is ``<key hash>-<params sha256[:12]>`` (``-crop`` appended when ``crop``:
    larger inputs are center-cropped rather than resized, see ``fit_to_native``), so
    statistics computed with other weights (e.g. trained on another machine, with other
    float round-off) are never reused. Features are the penultimate layer times a fixed
    scale that gives the train features unit mean square (FID/KID magnitudes then do not
    depend on an arbitrary layer scale; the polynomial KID kernel assumes features of
    order one). ``info["loaded_from_cache"]`` says whether this call trained.
    """
    from diffusion_jax import data  # deferred: the metric math needs no data pipeline

    key_hash = hashlib.sha256(json.dumps(spec.key, sort_keys=True).encode()).hexdigest()[:8]
    base = os.path.join(resolve_cache_dir(cache_dir), f"{spec.name}-{key_hash}")
    params_path, info_path = base + ".msgpack", base + ".json"
    size = spec.native_size
    loaded = load_cached(spec.net(), (size, size, 1), params_path, info_path)
    if loaded is not None:
        params, info = loaded
        return _extractor(
            spec, params, {**info, "loaded_from_cache": True, "path": params_path}, crop
        )

    train_x, train_y = data.load_split_arrays(spec.data_cfg, "train")
    test_x, test_y = data.load_split_arrays(spec.data_cfg, "test")
    t0 = time.time()
    params = train(spec.net(), train_x, train_y, spec.recipe)
    train_seconds = time.time() - t0
    raw = serialization.to_bytes(params)
    sha = hashlib.sha256(raw).hexdigest()
    info = {
        "recipe": dict(spec.recipe),
        "recipe_hash": key_hash,
        "params_sha256": sha,
        "version": f"{key_hash}-{sha[:12]}",
        "train_seconds": round(train_seconds, 2),
        "num_train": int(len(train_x)),
        "num_test": int(len(test_x)),
        "jax_version": jax.__version__,
    }
    if spec.key != spec.recipe:
        info["key"] = spec.key
    unscaled = _extractor(spec, params, info, crop=False)
    train_feats = unscaled.features(train_x)
    info["feature_scale"] = float(1.0 / np.sqrt(np.mean(np.square(train_feats, dtype=np.float64))))
    info["test_accuracy"] = float((unscaled.logits(test_x).argmax(-1) == test_y).mean())
    info["train_accuracy"] = float((unscaled.logits(train_x).argmax(-1) == train_y).mean())
    log.info(
        "%s: test accuracy %.4f, trained in %.1f s", spec.name, info["test_accuracy"], train_seconds
    )
    # params first: a reader that finds the JSON also finds the matching params
    atomic_write(params_path, lambda f: f.write(raw))
    atomic_write(info_path, lambda f: f.write(json.dumps(info, indent=2).encode()))
    return _extractor(spec, params, {**info, "loaded_from_cache": False, "path": params_path}, crop)
