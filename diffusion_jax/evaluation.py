"""Sample-quality metrics: FID, KID, precision/recall and class accuracy, computed from the
features of a pluggable feature network.

Metrics (pure functions over feature arrays; nothing here knows about diffusion):
  * FID (Heusel et al. 2017): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between
    Gaussians fitted to two feature sets. ``tr (S1 S2)^(1/2)`` is the sum of the square
    roots of the eigenvalues of the symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (similar
    to S1 S2), so only symmetric eigendecompositions are needed: no complex sqrtm, no
    "imaginary component" fix-ups. ``fid_from_stats`` runs in numpy float64 on the host
    (~1e-15 relative to scipy's sqrtm; cheap at D <= 2048); ``fid_from_stats_jax`` is the
    same algorithm in jnp for jitted code (float32 unless jax_enable_x64: absolute
    round-off ~1e-7 x trace(S), which matters only for FIDs near zero).
  * KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / D + 1)^3, averaged over random subsets; reported as (mean, std over
    subsets). Unbiased: ~0 for two samples of one distribution at any sample size.
  * Improved precision/recall (Kynkaanniemi et al. 2019): each set's manifold is the union
    of balls reaching every point's k-th nearest neighbour (k = 3) within its own set;
    precision = fraction of fakes inside the real manifold, recall = fraction of reals
    inside the fake manifold. Both sets should have the same size (radii shrink as a set
    grows), so ``evaluate_samples`` subsamples the real features to the number of samples.
  * class accuracy: argmax of a classifier feature net on class-conditional samples vs the
    requested labels.

Feature networks (``FEATURE_EXTRACTORS``, name -> factory; each gives a ``FeatureExtractor``
mapping images [N, H, W, C] in [-1, 1] to float32 features [N, D]):
  * ``digits_classifier``: a small conv net trained by this module on the bundled digits'
    train split (deterministic, fixed seed, ~10 s on 2 CPU cores), test accuracy recorded.
    Params + a JSON record are cached in ``cache_dir`` (default
    ``~/.cache/diffusion_jax/eval``); later calls load them. Features: the 64-d penultimate
    layer ("classifier-FID"); logits give class accuracy.
  * ``inception_v3``: the FID Inception network (pool3, 2048-d) in Flax, with weights loaded
    from a local file; nothing is downloaded. See ``inception_v3`` for where to get the
    standard weights and how to verify them.

Sample-size bias. FID estimated from N images is biased upwards by roughly c (1/N1 + 1/N2)
(mean term: tr(S)/N per side; the covariance term behaves alike), and for a good model that
bias is most of the number (digits, classifier features: two disjoint real sets score 0.69
at N = 299 per side, 0.26 at N = 749). FIDs are only comparable at the same N on both sides
and the same reference set. Hence two numbers:
  * ``fid``: N samples vs the cached statistics of the whole reference split (the usual
    protocol, e.g. 50k samples vs CIFAR-10 train);
  * ``fid_matched`` (``matched_fid``): M samples vs M real images, mean over 10 random
    reference draws, directly comparable with ``real_floor`` (M real vs M other real
    images, the same draws), the FID a perfect generator would get.
Always report N, seed and the guidance scale with the metric (``evaluate_sampler`` does).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from diffusion_jax import parallel

# Bump when anything that changes cached statistics changes (feature extraction batching,
# statistics formulas, the cache file layout).
STATS_VERSION = "1"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "diffusion_jax", "eval")
# Real features kept in a reference-stats cache for KID / precision-recall (float32 rows;
# 50k x 2048 Inception features = 400 MB).
MAX_REFERENCE_FEATURES = 50_000

_HIGHEST = jax.lax.Precision.HIGHEST


def _cache_dir(cache_dir: str) -> str:
    return os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)


# ========================================================================== metric math


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (ddof=1) of features [N, D], in float64."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sqrt_psd(a, xp):
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues
    clipped to 0)."""
    w, v = xp.linalg.eigh(a)
    return (v * xp.sqrt(xp.clip(w, 0, None))) @ v.T


def _fid(mu1, sigma1, mu2, sigma2, xp):
    s1_half = _sqrt_psd(sigma1, xp)
    m = s1_half @ sigma2 @ s1_half
    m = (m + m.T) / 2  # exactly symmetric for eigvalsh
    tr_covmean = xp.sum(xp.sqrt(xp.clip(xp.linalg.eigvalsh(m), 0, None)))
    diff = mu1 - mu2
    return diff @ diff + xp.trace(sigma1) + xp.trace(sigma2) - 2 * tr_covmean


def _check_stats(mu1, sigma1, mu2, sigma2):
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"inconsistent statistics shapes: mu {mu1.shape}, {mu2.shape}; "
                         f"sigma {sigma1.shape}, {sigma2.shape}")


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in numpy float64.

    Matches ``scipy.linalg.sqrtm``-based implementations to ~1e-9 relative on SPD inputs
    (tests/test_evaluation.py); exact 0 up to round-off for identical statistics.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_stats(mu1, sigma1, mu2, sigma2)
    return float(max(_fid(mu1, sigma1, mu2, sigma2, np), 0.0))


def fid_from_stats_jax(mu1, sigma1, mu2, sigma2) -> jnp.ndarray:
    """``fid_from_stats`` in jnp (jittable; float32 unless jax_enable_x64). Measured against
    scipy on 8..2048-d SPD covariances: ~1e-7 relative, and ~1e-7 x trace absolute for
    near-identical statistics. Report numbers from ``fid_from_stats``."""
    mu1, mu2, sigma1, sigma2 = map(jnp.asarray, (mu1, mu2, sigma1, sigma2))
    _check_stats(mu1, sigma1, mu2, sigma2)
    with jax.default_matmul_precision("highest"):
        return jnp.maximum(_fid(mu1, sigma1, mu2, sigma2, jnp), 0.0)


def fid_from_features(feats1, feats2) -> float:
    return fid_from_stats(*feature_stats(feats1), *feature_stats(feats2))


@jax.jit
def _mmd2_subsets(x, y, idx_x, idx_y):
    """Unbiased MMD^2 with the cubic polynomial kernel for each subset row of idx_* [S, m]."""
    d = x.shape[1]

    def one(idx):
        ix, iy = idx
        a, b = x[ix], y[iy]  # [m, D]
        m = a.shape[0]
        kern = lambda u, v: (jnp.matmul(u, v.T, precision=_HIGHEST) / d + 1.0) ** 3  # noqa: E731
        k_xx, k_yy, k_xy = kern(a, a), kern(b, b), kern(a, b)
        # two-stage sums (rows, then total): ~sqrt(m) eps relative error instead of m eps
        total = lambda k: jnp.sum(jnp.sum(k, axis=1))  # noqa: E731
        off_xx = total(k_xx) - jnp.trace(k_xx)
        off_yy = total(k_yy) - jnp.trace(k_yy)
        return (off_xx + off_yy) / (m * (m - 1)) - 2.0 * total(k_xy) / (m * m)

    return jax.lax.map(one, (idx_x, idx_y))


def kid(feats1, feats2, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) between feature sets [N1, D], [N2, D].

    Each of ``num_subsets`` subsets draws ``min(subset_size, N1, N2)`` rows of each set
    without replacement (numpy rng ``seed``); returns (mean, std over subsets) of the
    unbiased MMD^2 estimates. The std describes the spread of one subset's estimate, not
    the standard error of the mean (subsets overlap).
    """
    x, y = np.asarray(feats1, np.float32), np.asarray(feats2, np.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need features [N1, D] and [N2, D], got {x.shape}, {y.shape}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(x)}, {len(y)}")
    rng = np.random.default_rng(seed)
    idx_x = np.stack([rng.choice(len(x), m, replace=False) for _ in range(num_subsets)])
    idx_y = np.stack([rng.choice(len(y), m, replace=False) for _ in range(num_subsets)])
    values = np.asarray(_mmd2_subsets(x, y, idx_x.astype(np.int32), idx_y.astype(np.int32)),
                        np.float64)
    return float(values.mean()), float(values.std())


_PR_BATCH = 1024  # query rows per distance block: [1024, N] float32


def _sq_norms(x):
    return jnp.sum(x * x, axis=1)


def _sq_dists(q, r, r_norms):
    """Squared distances [b, n] via |q|^2 + |r|^2 - 2 q.r (clamped at 0) and a bound on
    its float32 round-off (relative to the norms) for comparisons."""
    q_norms = _sq_norms(q)
    d2 = q_norms[:, None] + r_norms[None, :] - 2.0 * jnp.matmul(q, r.T, precision=_HIGHEST)
    tol = 1e-5 * (q_norms[:, None] + r_norms[None, :])
    return jnp.maximum(d2, 0.0), tol


@functools.partial(jax.jit, static_argnames="k")
def _kth_nn_sq_radius(queries, refs, *, k):
    """Squared distance from each query (a row of refs itself) to its k-th nearest
    neighbour among refs, the query excluded (it is its own nearest, at distance 0)."""
    d2, _ = _sq_dists(queries, refs, _sq_norms(refs))
    neg_smallest, _ = jax.lax.top_k(-d2, k + 1)
    return -neg_smallest[:, k]


@jax.jit
def _inside_manifold(queries, refs, radii2):
    d2, tol = _sq_dists(queries, refs, _sq_norms(refs))
    return jnp.any(d2 <= radii2[None, :] + tol, axis=1)


def _batched_rows(fn, queries: np.ndarray, *args, **kw) -> np.ndarray:
    """Apply ``fn(block, *args)`` to fixed-size row blocks of ``queries`` (last one padded,
    so one compiled shape)."""
    n = len(queries)
    b = min(_PR_BATCH, n)
    out = []
    for start in range(0, n, b):
        block = queries[start:start + b]
        pad = b - len(block)
        if pad:
            block = np.concatenate([block, np.repeat(block[-1:], pad, 0)])
        out.append(np.asarray(fn(block, *args, **kw))[:b - pad])
    return np.concatenate(out)


def precision_recall(real_feats, fake_feats, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    A point is inside a manifold if its distance to some member is at most that member's
    distance to its k-th nearest neighbour in its own set (squared distances in float32
    with a 1e-5 relative round-off allowance, so a set always covers its own points).
    Use equally many real and fake features (the paper uses 50k each).
    """
    real = np.asarray(real_feats, np.float32)
    fake = np.asarray(fake_feats, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need features [N1, D] and [N2, D], got {real.shape}, {fake.shape}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set")
    real_r2 = _batched_rows(_kth_nn_sq_radius, real, real, k=k)
    fake_r2 = _batched_rows(_kth_nn_sq_radius, fake, fake, k=k)
    precision = _batched_rows(_inside_manifold, fake, real, real_r2).mean()
    recall = _batched_rows(_inside_manifold, real, fake, fake_r2).mean()
    return float(precision), float(recall)


# ========================================================================== statistics


@dataclasses.dataclass
class FeatureStats:
    """Gaussian statistics of one feature set, where they came from, and (optionally) the
    features themselves (float32, at most MAX_REFERENCE_FEATURES rows) for KID and
    precision/recall."""

    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    n: int  # number of images behind mu and sigma
    provenance: dict
    features: Optional[np.ndarray] = None  # float32 [<= n, D]

    @classmethod
    def from_features(cls, feats, provenance: Optional[dict] = None,
                      keep_features: int = MAX_REFERENCE_FEATURES, seed: int = 0):
        feats = np.asarray(feats, np.float32)
        mu, sigma = feature_stats(feats)
        kept = None
        if keep_features:
            kept = feats
            if len(feats) > keep_features:
                rows = np.random.default_rng(seed).choice(len(feats), keep_features, replace=False)
                kept = feats[np.sort(rows)]
        return cls(mu, sigma, len(feats), dict(provenance or {}), kept)

    def save(self, path: str) -> None:
        """Atomic write of an .npz (provenance as a JSON string)."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n),
                  "provenance": np.array(json.dumps(self.provenance, sort_keys=True))}
        if self.features is not None:
            arrays["features"] = self.features
        _atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str) -> FeatureStats:
        with np.load(path, allow_pickle=False) as z:
            feats = z["features"] if "features" in z.files else None
            return cls(z["mu"], z["sigma"], int(z["n"]), json.loads(str(z["provenance"])), feats)


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write via a temporary file in the same directory and rename: concurrent readers see
    the old file or the whole new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ========================================================================== extractors


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A feature network: ``features(images [N, H, W, C] in [-1, 1]) -> float32 [N, D]``.

    ``apply_features`` / ``apply_logits`` are jitted functions of one batch of exactly
    ``batch_size`` images; ``features`` / ``logits`` handle any N by padding the last batch
    (one compiled shape). ``version`` identifies the exact weights: cached statistics
    record it and are recomputed when it changes. ``info`` holds extra facts (accuracy,
    whether the weights came from a cache, ...).
    """

    name: str
    version: str
    feature_dim: int
    apply_features: Callable[[jnp.ndarray], jnp.ndarray]
    apply_logits: Optional[Callable[[jnp.ndarray], jnp.ndarray]] = None
    batch_size: int = 256
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def has_logits(self) -> bool:
        return self.apply_logits is not None

    def _batched(self, fn, images) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
        out = []
        for start in range(0, len(images), self.batch_size):
            block = images[start:start + self.batch_size]
            pad = self.batch_size - len(block)
            if pad:
                block = np.concatenate([block, np.zeros((pad, *block.shape[1:]), block.dtype)])
            out.append(np.asarray(fn(block), np.float32)[:self.batch_size - pad])
        if not out:
            raise ValueError("no images")
        return np.concatenate(out)

    def features(self, images) -> np.ndarray:
        return self._batched(self.apply_features, images)

    def logits(self, images) -> np.ndarray:
        if self.apply_logits is None:
            raise ValueError(f"feature net {self.name!r} has no classifier head")
        return self._batched(self.apply_logits, images)


def _to_channels(x, channels: int):
    """Grayscale <-> RGB: repeat a single channel, or average RGB to gray."""
    if x.shape[-1] == channels:
        return x
    if x.shape[-1] == 1:
        return jnp.repeat(x, channels, axis=-1)
    if channels == 1:
        return jnp.mean(x, axis=-1, keepdims=True)
    raise ValueError(f"cannot map {x.shape[-1]} channels to {channels}")


# --------------------------------------------------------------------- digits classifier

_DIGITS_SIZE = 8
# The whole training recipe; its hash is part of the cache key and of the version.
_DIGITS_RECIPE = dict(version=2, widths=(64, 128), feature_dim=64, epochs=60, batch_size=64,
                      learning_rate=2e-3, weight_decay=1e-4, max_shift=1, seed=0)


def _patches_3x3(x):
    """[B, H, W, C] -> [B, H, W, 9C]: each pixel's 3x3 neighbourhood, padded with the
    background value -1. A 3x3 conv is then one matmul, which XLA's CPU backend runs ~10x
    faster than its convolution (whose weight gradient is slow: jax-notes.md)."""
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    return jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)],
                           axis=-1)


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
    params = net.init(key, jnp.zeros((1, _DIGITS_SIZE, _DIGITS_SIZE, 1)))["params"]
    bs = recipe["batch_size"]
    steps_per_epoch = len(train_x) // bs
    schedule = optax.cosine_decay_schedule(recipe["learning_rate"],
                                           recipe["epochs"] * steps_per_epoch)
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
        x = _to_channels(jnp.asarray(x, jnp.float32), 1)
        if x.shape[1:3] != (_DIGITS_SIZE, _DIGITS_SIZE):  # e.g. digits upscaled by data.py
            x = jax.image.resize(x, (x.shape[0], _DIGITS_SIZE, _DIGITS_SIZE, 1), "linear",
                                 antialias=True)
        return x

    # params are closed over: constants of the compiled programs (~140k floats).
    feats_fn = jax.jit(lambda x: net.apply({"params": params}, prepare(x))[0] * scale)
    logits_fn = jax.jit(lambda x: net.apply({"params": params}, prepare(x))[1])
    return FeatureExtractor(name="digits_classifier", version=info["version"],
                            feature_dim=recipe["feature_dim"], apply_features=feats_fn,
                            apply_logits=logits_fn, batch_size=500, info=info)


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
    base = os.path.join(_cache_dir(cache_dir), f"digits_classifier-{recipe_hash}")
    params_path, info_path = base + ".msgpack", base + ".json"
    data_cfg = {"name": data.DIGITS, "data_dir": data_dir, "image_size": _DIGITS_SIZE}

    if os.path.exists(params_path) and os.path.exists(info_path):
        with open(params_path, "rb") as f:
            raw = f.read()
        with open(info_path) as f:
            info = json.load(f)
        if info.get("params_sha256") == hashlib.sha256(raw).hexdigest():
            net = DigitsClassifierNet(tuple(_DIGITS_RECIPE["widths"]),
                                      _DIGITS_RECIPE["feature_dim"])
            template = jax.eval_shape(net.init, jax.random.PRNGKey(0),
                                      jnp.zeros((1, _DIGITS_SIZE, _DIGITS_SIZE, 1)))["params"]
            params = serialization.from_bytes(
                jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template), raw)
            return _digits_extractor(params, {**info, "loaded_from_cache": True,
                                              "path": params_path})
        logging.warning("digits classifier cache %s is inconsistent; retraining", params_path)

    train_x, train_y = data.load_split_arrays(data_cfg, "train")
    test_x, test_y = data.load_split_arrays(data_cfg, "test")
    t0 = time.time()
    params = _train_digits_classifier(train_x, train_y, _DIGITS_RECIPE)
    train_seconds = time.time() - t0
    raw = serialization.to_bytes(params)
    sha = hashlib.sha256(raw).hexdigest()
    info = {"recipe": _DIGITS_RECIPE, "recipe_hash": recipe_hash, "params_sha256": sha,
            "version": f"{recipe_hash}-{sha[:12]}", "train_seconds": round(train_seconds, 2),
            "num_train": int(len(train_x)), "num_test": int(len(test_x)),
            "jax_version": jax.__version__}
    unscaled = _digits_extractor(params, info)
    train_feats = unscaled.features(train_x)
    info["feature_scale"] = float(1.0 / np.sqrt(np.mean(np.square(train_feats, dtype=np.float64))))
    info["test_accuracy"] = float((unscaled.logits(test_x).argmax(-1) == test_y).mean())
    info["train_accuracy"] = float((unscaled.logits(train_x).argmax(-1) == train_y).mean())
    logging.info("digits classifier: test accuracy %.4f, trained in %.1f s",
                 info["test_accuracy"], train_seconds)
    # params first: a reader that finds the JSON also finds the matching params
    _atomic_write(params_path, lambda f: f.write(raw))
    _atomic_write(info_path, lambda f: f.write(json.dumps(info, indent=2).encode()))
    return _digits_extractor(params, {**info, "loaded_from_cache": False, "path": params_path})


# --------------------------------------------------------------------- InceptionV3 (FID)

INCEPTION_INPUT_SIZE = 299
INCEPTION_FILE_NAME = "pt_inception-2015-12-05.npz"
_INCEPTION_HOWTO = f"""\
The standard FID network is the 2015-12-05 TensorFlow Inception graph, as ported to PyTorch
by pytorch-fid: pt_inception-2015-12-05-6726825d.pth from
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
On a machine with internet access and PyTorch:
  python -c "import torch, numpy as np; \
    sd = torch.load('pt_inception-2015-12-05-6726825d.pth', map_location='cpu'); \
    np.savez('{INCEPTION_FILE_NAME}', **{{k: v.numpy() for k, v in sd.items()}})"
then pass the .npz path, e.g.
  --inception_weights=~/.cache/diffusion_jax/eval/{INCEPTION_FILE_NAME}
Verify the download before converting: torch.hub names such files with the first hex
digits of their sha256, so `sha256sum pt_inception-2015-12-05-6726825d.pth` must start
with 6726825d; compare the full digest with the one published for that release if you
have it. (No checksum of the .npz is given: it depends on the numpy version writing it.)
A .pkl holding a dict {{name: array}} with the same keys also works, as do files in this
module's own layout ("params/<module path>/kernel", "batch_stats/.../mean")."""


class _ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, inference statistics) + ReLU: Inception's
    BasicConv2d. Submodule names "conv"/"bn" mirror the PyTorch port."""

    features: int
    kernel: tuple = (1, 1)
    strides: tuple = (1, 1)
    padding: Any = "VALID"

    @nn.compact
    def __call__(self, x):
        pad = self.padding
        if isinstance(pad, tuple):  # (ph, pw) symmetric padding, as in PyTorch
            pad = ((pad[0], pad[0]), (pad[1], pad[1]))
        x = nn.Conv(self.features, self.kernel, self.strides, padding=pad, use_bias=False,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x):
    """3x3 stride-1 average pool, padding 1, padded cells excluded from the count
    (PyTorch count_include_pad=False, as in the TF graph)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3(x, stride: int):
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


class _InceptionA(nn.Module):  # Mixed_5b..5d: 35x35
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _ConvBN(64, name="branch1x1")(x)
        b5 = _ConvBN(48, name="branch5x5_1")(x)
        b5 = _ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = _ConvBN(64, name="branch3x3dbl_1")(x)
        b3 = _ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = _ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = _ConvBN(self.pool_features, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):  # Mixed_6a: 35 -> 17
    @nn.compact
    def __call__(self, x):
        b3 = _ConvBN(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = _ConvBN(64, name="branch3x3dbl_1")(x)
        bd = _ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = _ConvBN(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class _InceptionC(nn.Module):  # Mixed_6b..6e: 17x17, factorized 7x7
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = _ConvBN(192, name="branch1x1")(x)
        b7 = _ConvBN(c, name="branch7x7_1")(x)
        b7 = _ConvBN(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = _ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = _ConvBN(c, name="branch7x7dbl_1")(x)
        bd = _ConvBN(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = _ConvBN(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = _ConvBN(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = _ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = _ConvBN(192, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):  # Mixed_7a: 17 -> 8
    @nn.compact
    def __call__(self, x):
        b3 = _ConvBN(192, name="branch3x3_1")(x)
        b3 = _ConvBN(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = _ConvBN(192, name="branch7x7x3_1")(x)
        b7 = _ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = _ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = _ConvBN(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class _InceptionE(nn.Module):  # Mixed_7b (average pool branch), Mixed_7c (max pool branch)
    pool: str  # "avg" | "max": the FID graph's Mixed_7c pools with max, unlike torchvision

    @nn.compact
    def __call__(self, x):
        b1 = _ConvBN(320, name="branch1x1")(x)
        b3 = _ConvBN(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([_ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              _ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = _ConvBN(448, name="branch3x3dbl_1")(x)
        bd = _ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([_ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              _ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)],
                             -1)
        pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3(x, 1)
        bp = _ConvBN(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID variant of InceptionV3 (the 2015-12-05 TF graph, as in pytorch-fid's
    FIDInception* blocks), up to the 2048-d global average pool ("pool3"). Input: NHWC RGB
    in [-1, 1], any size >= 75 (FID uses 299x299; ``inception_v3`` resizes). Submodule
    names follow the PyTorch port, so weights convert by renaming and transposing."""

    @nn.compact
    def __call__(self, x):  # [B, H, W, 3]
        x = _ConvBN(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = _ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = _ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = _ConvBN(80, name="Conv2d_3b_1x1")(x)
        x = _ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)  # 35x35x192 at 299 input
        x = _InceptionA(32, name="Mixed_5b")(x)
        x = _InceptionA(64, name="Mixed_5c")(x)
        x = _InceptionA(64, name="Mixed_5d")(x)
        x = _InceptionB(name="Mixed_6a")(x)  # 17x17x768
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = _InceptionC(c7, name=name)(x)
        x = _InceptionD(name="Mixed_7a")(x)  # 8x8x1280
        x = _InceptionE("avg", name="Mixed_7b")(x)
        x = _InceptionE("max", name="Mixed_7c")(x)  # 8x8x2048
        return jnp.mean(x, axis=(1, 2))  # pool3 [B, 2048]


def inception_variables_from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
    """pytorch-fid state dict (name -> numpy array) -> flat {"params/...": ...,
    "batch_stats/...": ...} in this module's layout. Conv weights [O, I, kh, kw] become
    kernels [kh, kw, I, O]; BN weight/bias/running_mean/running_var become
    scale/bias/mean/var. The 1008-way "fc" head, "AuxLogits" (absent from pytorch-fid's
    file) and "num_batches_tracked" are dropped."""
    out = {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        *path, leaf = name.split(".")
        if path[:1] in (["fc"], ["AuxLogits"]) or leaf == "num_batches_tracked":
            continue
        module = "/".join(path)
        if path[-1] == "conv" and leaf == "weight":
            out[f"params/{module}/kernel"] = value.transpose(2, 3, 1, 0)
        elif path[-1] == "bn" and leaf in ("weight", "bias"):
            out[f"params/{module}/{'scale' if leaf == 'weight' else 'bias'}"] = value
        elif path[-1] == "bn" and leaf in ("running_mean", "running_var"):
            out[f"batch_stats/{module}/{leaf[len('running_'):]}"] = value
        else:
            raise ValueError(f"unexpected InceptionV3 weight {name!r} {value.shape}")
    return out


def _flatten(tree, prefix=""):
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *path, leaf = key.split("/")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def load_inception_variables(weights_path: str) -> dict:
    """Flax variables {"params", "batch_stats"} of ``InceptionV3`` from a local .npz/.pkl
    (pytorch-fid names or this module's names); every shape is checked."""
    path = os.path.expanduser(weights_path or "")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"InceptionV3 weights not found at {weights_path!r}; nothing is downloaded at run "
            f"time.\n{_INCEPTION_HOWTO}")
    if path.endswith(".pkl"):
        with open(path, "rb") as f:  # user-supplied file: unpickling runs its code
            flat = dict(pickle.load(f))
    else:
        with np.load(path, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    if any("." in k for k in flat):
        flat = inception_variables_from_torch(flat)
    template = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0),
                              jnp.zeros((1, 75, 75, 3), jnp.float32))
    expected = _flatten(template)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: not FID InceptionV3 weights; missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    for key, shape in expected.items():
        if tuple(flat[key].shape) != tuple(shape.shape):
            raise ValueError(f"{path}: {key} has shape {flat[key].shape}, "
                             f"expected {shape.shape}")
    return _unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inception_v3(weights_path: str, *, batch_size: int = 64) -> FeatureExtractor:
    """FID InceptionV3 pool3 features (2048-d) with weights from ``weights_path``.

    Images [N, H, W, C] in [-1, 1] (C = 1 is repeated to RGB) are resized to 299x299 with
    bilinear interpolation (half-pixel centres, no antialiasing: PyTorch's
    ``F.interpolate(..., align_corners=False)`` as pytorch-fid does), then fed as is (the
    network expects [-1, 1]). The version is the weights file's sha256 prefix.
    """
    variables = load_inception_variables(weights_path)
    net = InceptionV3()
    size = INCEPTION_INPUT_SIZE

    @jax.jit
    def feats(x):
        x = _to_channels(jnp.asarray(x, jnp.float32), 3)
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, 3), "linear", antialias=False)
        return net.apply(variables, x)

    sha = _file_sha256(os.path.expanduser(weights_path))
    return FeatureExtractor(name="inception_v3", version=f"pool3-{sha[:12]}", feature_dim=2048,
                            apply_features=feats, batch_size=batch_size,
                            info={"weights_path": weights_path, "weights_sha256": sha})


FEATURE_EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "digits_classifier": digits_classifier,
    "inception_v3": inception_v3,
}


def make_extractor(data_cfg, *, cache_dir: str = "",
                   inception_weights: str = "") -> FeatureExtractor:
    """The default feature net for a dataset: the digits classifier for the bundled digits
    (offline, "classifier-FID"), InceptionV3 (standard FID) for anything else."""
    from diffusion_jax import data

    name = _cfg_get(data_cfg, "name")
    if name == data.DIGITS:
        return digits_classifier(cache_dir, data_dir=_cfg_get(data_cfg, "data_dir", ""))
    return inception_v3(inception_weights)


def _cfg_get(cfg, key, default=None):
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


# ========================================================================== reference


def reference_stats(extractor: FeatureExtractor, data_cfg, split: str = "train",
                    cache_dir: str = "") -> FeatureStats:
    """Statistics of the whole ``split`` of ``data_cfg``'s dataset under ``extractor``.

    Cached in ``<cache_dir>/ref-<dataset>-<split>-<size>px-<feature net>.npz`` with
    provenance (dataset, split, image size, number of images, feature net and its version,
    STATS_VERSION); recomputed whenever the provenance differs. The file also keeps up to
    MAX_REFERENCE_FEATURES real feature rows for KID and precision/recall.
    Reads the split with ``data.load_split_arrays`` (whole split in memory: fine for
    digits and CIFAR-10, not for ImageNet).
    """
    from diffusion_jax import data

    name, size = _cfg_get(data_cfg, "name"), int(_cfg_get(data_cfg, "image_size"))
    spec = data.dataset_spec({**_as_dict(data_cfg), "split": split})
    provenance = {"dataset": name, "split": split, "image_size": size,
                  "num_images": int(spec.num_examples), "feature_net": extractor.name,
                  "feature_version": extractor.version, "stats_version": STATS_VERSION}
    path = os.path.join(_cache_dir(cache_dir),
                        f"ref-{name.replace('/', '_')}-{split}-{size}px-{extractor.name}.npz")
    if os.path.exists(path):
        try:
            stats = FeatureStats.load(path)
            if stats.provenance == provenance:
                return stats
            logging.info("reference stats %s have provenance %s; recomputing for %s",
                         path, stats.provenance, provenance)
        except (OSError, ValueError, KeyError) as e:
            logging.warning("unreadable reference stats %s (%s); recomputing", path, e)
    images, _ = data.load_split_arrays(data_cfg, split)
    stats = FeatureStats.from_features(extractor.features(images), provenance)
    stats.save(path)
    return stats


def _as_dict(cfg) -> dict:
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg) if isinstance(cfg, Mapping) else dict(vars(cfg))


def _split_rows(n_real: int, num_samples: int, split: int, seed: int):
    """Disjoint (reference, query) row indices into the real features for one split."""
    perm = np.random.default_rng([seed, split]).permutation(n_real)
    return perm[:num_samples], perm[num_samples:2 * num_samples]


def matched_fid(real_feats, num_samples: int, *, sample_feats=None, num_splits: int = 10,
                seed: int = 0) -> dict:
    """FID at a matched sample size: the protocol behind ``real_floor``.

    Split ``s`` draws (numpy rng [seed, s]) a reference set of ``num_samples`` real rows
    and, disjoint from it, ``num_samples`` query rows: real ones (``sample_feats=None``:
    the floor, what a perfect generator would score) or sample rows (chunk ``s`` of the
    samples when there are ``num_splits * num_samples`` of them, else a random subset).
    Both sides always have ``num_samples`` rows, so the ~(1/N + 1/N) sample-size bias is
    the same for reals and samples, and with the same ``seed`` both are scored against the
    very same reference sets (a paired comparison). Returns mean and std over splits.
    """
    real = np.asarray(real_feats, np.float32)
    n = int(num_samples)
    if sample_feats is None and 2 * n > len(real):
        raise ValueError(f"the real floor at N={n} needs 2N={2 * n} real images, have "
                         f"{len(real)}; lower num_samples to <= {len(real) // 2}")
    if n < 2 or n > len(real):
        raise ValueError(f"num_samples={n} must be in 2..{len(real)}")
    fake = None if sample_feats is None else np.asarray(sample_feats, np.float32)
    if fake is not None and len(fake) < n:
        raise ValueError(f"matched FID at N={n} needs >= {n} samples, got {len(fake)}")
    values = []
    for s in range(num_splits):
        ref_rows, query_rows = _split_rows(len(real), n, s, seed)
        if fake is None:
            query = real[query_rows]
        elif len(fake) >= num_splits * n:
            query = fake[s * n:(s + 1) * n]
        else:
            query = fake[np.random.default_rng([seed, s, 1]).choice(len(fake), n, replace=False)]
        values.append(fid_from_features(query, real[ref_rows]))
    return {"fid": float(np.mean(values)), "fid_std": float(np.std(values)),
            "num_samples": n, "num_splits": int(num_splits)}


def real_floor(extractor: FeatureExtractor, data_cfg, *, num_samples: Optional[int] = None,
               split: str = "train", num_splits: int = 10, seed: int = 0,
               cache_dir: str = "") -> dict:
    """The real-vs-real floor: FID and KID between disjoint random halves of ``split``.

    Uses the cached reference features of ``split`` (``reference_stats``). Choice: two
    halves of the *train* split (not train vs test): the reference side is then drawn from
    the same images the model was trained on, exactly as for the samples' matched FID, and
    the digits test split (299) would allow only N <= 299. ``num_samples`` N (default: half
    the split, 749 for digits) is the size of *each* side: compare it only with
    ``matched_fid(..., sample_feats=...)`` at the same N and seed (``evaluate_samples``
    with ``matched_num_samples=N`` returns that as ``fid_matched``); a sample FID against
    the full-split statistics has a different bias. KID is unbiased, so its floor is ~0;
    its spread says how small a KID difference is meaningful.
    """
    ref = reference_stats(extractor, data_cfg, split, cache_dir)
    if ref.features is None or len(ref.features) < ref.n:
        raise ValueError("reference statistics keep too few features for a floor")
    n = int(num_samples or ref.n // 2)
    out = matched_fid(ref.features, n, num_splits=num_splits, seed=seed)
    kids = []
    for s in range(num_splits):
        ref_rows, query_rows = _split_rows(len(ref.features), n, s, seed)
        kids.append(kid(ref.features[query_rows], ref.features[ref_rows], seed=seed)[0])
    out.update(kid=float(np.mean(kids)), kid_std=float(np.std(kids)),
               dataset=ref.provenance["dataset"], split=split, feature_net=extractor.name,
               feature_version=extractor.version, seed=int(seed))
    return out


# ========================================================================== samples


def evaluate_samples(extractor: FeatureExtractor, samples, ref_stats: FeatureStats, *,
                     labels=None, real_feats=None, matched_num_samples: Optional[int] = None,
                     matched_num_splits: int = 10, kid_subsets: int = 100,
                     kid_subset_size: int = 1000, pr_k: int = 3, seed: int = 0) -> dict:
    """Metrics of ``samples`` [N, H, W, C] in [-1, 1] against ``ref_stats``.

    Returns
      fid: vs the reference Gaussian (N samples vs all ``num_reference`` real images: the
        standard number, e.g. CIFAR-10 50k samples vs the 50k train images);
      kid, kid_std, precision, recall: vs ``real_feats`` (default ``ref_stats.features``;
        skipped if neither). Precision/recall use ``min(N, R)`` rows of each set (random,
        ``seed``) so both manifolds have the same density;
      fid_matched, fid_matched_std: with ``matched_num_samples`` M, the ``matched_fid``
        protocol (M samples vs M real rows, mean over splits): compare with
        ``real_floor(num_samples=M)``;
      class_accuracy: if ``labels`` [N] are given and the feature net is a classifier;
      num_samples, num_reference, feature_net, feature_version.
    """
    samples = np.asarray(samples, np.float32)
    if extractor.name != ref_stats.provenance.get("feature_net", extractor.name) or \
            extractor.version != ref_stats.provenance.get("feature_version", extractor.version):
        raise ValueError(f"reference stats were computed with {ref_stats.provenance}, not "
                         f"{extractor.name} {extractor.version}")
    feats = extractor.features(samples)
    result = {"fid": fid_from_stats(*feature_stats(feats), ref_stats.mu, ref_stats.sigma),
              "num_samples": int(len(samples)), "num_reference": int(ref_stats.n),
              "feature_net": extractor.name, "feature_version": extractor.version}
    real = ref_stats.features if real_feats is None else np.asarray(real_feats, np.float32)
    if matched_num_samples:
        if real is None:
            raise ValueError("matched FID needs real features")
        matched = matched_fid(real, matched_num_samples, sample_feats=feats,
                              num_splits=matched_num_splits, seed=seed)
        result.update(fid_matched=matched["fid"], fid_matched_std=matched["fid_std"],
                      matched_num_samples=matched["num_samples"],
                      matched_num_splits=matched["num_splits"])
    if real is not None:
        result["kid"], result["kid_std"] = kid(feats, real, num_subsets=kid_subsets,
                                               subset_size=kid_subset_size, seed=seed)
        m = min(len(feats), len(real))
        rng = np.random.default_rng(seed)
        pick = lambda f: f[np.sort(rng.choice(len(f), m, replace=False))]  # noqa: E731
        result["precision"], result["recall"] = precision_recall(pick(real), pick(feats), k=pr_k)
    if labels is not None and extractor.has_logits:
        labels = np.asarray(labels)
        if labels.shape != (len(samples),):
            raise ValueError(f"labels must be [{len(samples)}], got {labels.shape}")
        result["class_accuracy"] = float((extractor.logits(samples).argmax(-1) == labels).mean())
    return result


# ========================================================================== sampling runs


def class_balanced_labels(num_classes: int, n: int) -> np.ndarray:
    """0, 1, ..., K-1, 0, 1, ... (all zeros for unconditional models): equal class counts
    whenever K divides n, so class-conditional FIDs see the data's class mix."""
    return (np.arange(n) % max(num_classes, 1)).astype(np.int32)


@functools.lru_cache(maxsize=8)
def _compiled_sampler(sample_fn: Callable, mesh):
    if mesh is None:
        return jax.jit(sample_fn)
    rep, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(sample_fn, in_shardings=(rep, rep, batch, rep), out_shardings=batch)


def generate_samples(sample_fn: Callable, params, num_samples: int, batch_size: int,
                     seed: int, labels=None, *, guidance_scale: float = 1.0,
                     mesh=None) -> np.ndarray:
    """``num_samples`` images [N, H, W, C] on the host from ``sample_fn`` in batches.

    ``sample_fn(params, rng, labels [B], guidance_scale) -> [B, H, W, C]`` is what
    ``steps.make_sample_fn`` returns for shape ``(batch_size, H, W, C)`` (jitted here; one
    compile for all batches). Batch ``i`` uses ``fold_in(PRNGKey(seed), i)`` (as
    sample.py does), so the samples depend only on (params, seed, labels, batch_size,
    guidance): a fixed seed gives a fixed set of starting noises across evaluations.
    ``labels`` [N] (default: zeros) are cut per batch, the last batch padded by repeating
    labels and the surplus images dropped. With a ``mesh`` the batch is sharded over the
    mesh's first axis (``batch_size`` must divide by its size) and ``params`` should be
    replicated on it; the random draws do not depend on the sharding (JAX's partitionable
    threefry), so the images equal the unsharded ones up to float reduction order.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"need num_samples, batch_size >= 1, got {num_samples}, {batch_size}")
    labels = np.zeros((num_samples,), np.int32) if labels is None else np.asarray(labels, np.int32)
    if labels.shape != (num_samples,):
        raise ValueError(f"labels must be [{num_samples}], got {labels.shape}")
    if mesh is not None and batch_size % mesh.devices.size:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {mesh.devices.size} "
                         "mesh devices")
    fn = _compiled_sampler(sample_fn, mesh)
    chunks = []
    for i, start in enumerate(range(0, num_samples, batch_size)):
        chunk_labels = np.resize(labels[start:start + batch_size], batch_size)
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        scale = np.float32(guidance_scale)
        if mesh is not None:
            rep = parallel.replicated(mesh)
            rng = parallel.host_value_to_global(rng, rep)
            scale = parallel.host_value_to_global(scale, rep)
            chunk_labels = parallel.host_value_to_global(chunk_labels,
                                                         parallel.batch_sharding(mesh))
        # multi-process: every process gets all samples
        chunks.append(parallel.gather_to_host(fn(params, rng, chunk_labels, scale),
                                              name=f"samples:{i}"))
    return np.concatenate(chunks)[:num_samples]


def sampler_info(config) -> dict:
    """What produced the samples, to log with every metric: sampler, steps, eta, spacing,
    DDPM variance, x0 clipping, guidance scale (DDPM always runs all T steps)."""
    s = config.sampler
    ddpm = s.name == "ddpm"
    return {"sampler": s.name,
            "num_steps": int(config.schedule.num_timesteps if ddpm else s.num_steps),
            "eta": None if ddpm else float(s.eta), "spacing": None if ddpm else s.spacing,
            "variance": s.variance if ddpm else None, "clip_x0": bool(s.clip_x0),
            "guidance_scale": float(s.guidance_scale),
            "conditional": bool(config.model.num_classes > 0)}


def evaluate_sampler(sample_fn: Callable, params, extractor: FeatureExtractor,
                     ref_stats: FeatureStats, *, num_samples: int, batch_size: int, seed: int,
                     num_classes: int, guidance_scale: float, mesh=None,
                     matched_num_samples: Optional[int] = None,
                     info: Optional[Mapping[str, Any]] = None) -> dict:
    """Generate ``num_samples`` images (class-balanced labels for conditional models) and
    score them: ``evaluate_samples``' metrics plus seed, guidance_scale, the sampler
    ``info`` (see ``sampler_info``) and wall time, in one record. Use one fixed ``seed``
    for in-loop evaluation so successive numbers differ by the model only."""
    t0 = time.time()
    labels = class_balanced_labels(num_classes, num_samples)
    images = generate_samples(sample_fn, params, num_samples, batch_size, seed, labels,
                              guidance_scale=guidance_scale, mesh=mesh)
    t1 = time.time()
    result = dict(info or {})
    result.update(evaluate_samples(extractor, images, ref_stats,
                                   labels=labels if num_classes else None,
                                   matched_num_samples=matched_num_samples, seed=0))
    result.update(seed=int(seed), guidance_scale=float(guidance_scale),
                  sample_seconds=round(t1 - t0, 2), metric_seconds=round(time.time() - t1, 2))
    return result


# Always logged next to the metrics: a FID means nothing without them.
PROVENANCE_SCALARS = ("num_samples", "num_reference", "seed", "guidance_scale", "num_steps",
                      "eta", "matched_num_samples")
METRIC_SCALARS = ("fid", "kid", "kid_std", "precision", "recall", "class_accuracy",
                  "fid_matched", "fid_matched_std", "fid_floor", "fid_matched_ratio")


def tensorboard_scalars(result: Mapping[str, Any], prefix: str = "eval") -> dict:
    """Numeric metrics and their provenance (N, seed, guidance, steps, eta) as
    ``{prefix}/{name}`` scalars for ``metrics.MetricWriter.scalars``."""
    return {f"{prefix}/{k}": float(result[k]) for k in METRIC_SCALARS + PROVENANCE_SCALARS
            if result.get(k) is not None}


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
    """Append one JSON line (a whole line per write, so concurrent appends do not mix)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
