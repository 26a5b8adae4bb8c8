"""Statistics of real images: ``FeatureStats`` (Gaussian statistics plus kept feature rows),
the on-disk cache (atomic writes under ``cache_dir``), the cached reference statistics of a
dataset split, FID at a matched sample size and the real-vs-real floor."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np

from diffusion_jax.evaluation.distances import feature_stats, fid_from_features, kid
from diffusion_jax.evaluation.extractor import FeatureExtractor, cfg_get

# Bump when anything that changes cached statistics changes (feature extraction batching,
# statistics formulas, the cache file layout).
STATS_VERSION = "1"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "diffusion_jax", "eval")
# Real features kept in a reference-stats cache for KID / precision-recall (float32 rows;
# 50k x 2048 Inception features = 400 MB).
MAX_REFERENCE_FEATURES = 50_000


def resolve_cache_dir(cache_dir: str) -> str:
    """``cache_dir`` with ~ expanded; DEFAULT_CACHE_DIR if empty."""
    return os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
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
    def from_features(
        cls,
        feats,
        provenance: Optional[dict] = None,
        keep_features: int = MAX_REFERENCE_FEATURES,
        seed: int = 0,
    ):
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
        arrays = {
            "mu": self.mu,
            "sigma": self.sigma,
            "n": np.int64(self.n),
            "provenance": np.array(json.dumps(self.provenance, sort_keys=True)),
        }
        if self.features is not None:
            arrays["features"] = self.features
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str) -> FeatureStats:
        with np.load(path, allow_pickle=False) as z:
            feats = z["features"] if "features" in z.files else None
            return cls(z["mu"], z["sigma"], int(z["n"]), json.loads(str(z["provenance"])), feats)


# ========================================================================== reference


def reference_stats(
    extractor: FeatureExtractor, data_cfg, split: str = "train", cache_dir: str = ""
) -> FeatureStats:
    """Statistics of the whole ``split`` of ``data_cfg``'s dataset under ``extractor``.

    Cached in ``<cache_dir>/ref-<dataset>-<split>-<size>px-<feature net>.npz`` with
    provenance (dataset, split, image size, number of images, feature net and its version,
    STATS_VERSION); recomputed whenever the provenance differs. The file also keeps up to
    MAX_REFERENCE_FEATURES real feature rows for KID and precision/recall.
    Reads the split with ``data.load_split_arrays`` (whole split in memory: fine for
    digits and CIFAR-10, not for ImageNet).
    """
    from diffusion_jax import data

    name, size = cfg_get(data_cfg, "name"), int(cfg_get(data_cfg, "image_size"))
    spec = data.dataset_spec({**_as_dict(data_cfg), "split": split})
    provenance = {
        "dataset": name,
        "split": split,
        "image_size": size,
        "resize_method": cfg_get(data_cfg, "resize_method", "bilinear"),
        "num_images": int(spec.num_examples),
        "feature_net": extractor.name,
        "feature_version": extractor.version,
        "stats_version": STATS_VERSION,
    }
    path = os.path.join(
        resolve_cache_dir(cache_dir),
        f"ref-{name.replace('/', '_')}-{split}-{size}px-{extractor.name}.npz",
    )
    if os.path.exists(path):
        try:
            stats = FeatureStats.load(path)
            if stats.provenance == provenance:
                return stats
            logging.info(
                "reference stats %s have provenance %s; recomputing for %s",
                path,
                stats.provenance,
                provenance,
            )
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
    return perm[:num_samples], perm[num_samples : 2 * num_samples]


def matched_fid(
    real_feats, num_samples: int, *, sample_feats=None, num_splits: int = 10, seed: int = 0
) -> dict:
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
        raise ValueError(
            f"the real floor at N={n} needs 2N={2 * n} real images, have "
            f"{len(real)}; lower num_samples to <= {len(real) // 2}"
        )
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
            query = fake[s * n : (s + 1) * n]
        else:
            query = fake[np.random.default_rng([seed, s, 1]).choice(len(fake), n, replace=False)]
        values.append(fid_from_features(query, real[ref_rows]))
    return {
        "fid": float(np.mean(values)),
        "fid_std": float(np.std(values)),
        "num_samples": n,
        "num_splits": int(num_splits),
    }


def real_floor(
    extractor: FeatureExtractor,
    data_cfg,
    *,
    num_samples: Optional[int] = None,
    split: str = "train",
    num_splits: int = 10,
    seed: int = 0,
    cache_dir: str = "",
) -> dict:
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
    kept = 0 if ref.features is None else len(ref.features)  # <= MAX_REFERENCE_FEATURES
    n = int(num_samples or kept // 2)
    if n < 2 or 2 * n > kept:
        raise ValueError(
            f"a floor of {n} vs {n} real images needs {2 * n} reference features; "
            f"the statistics of {split!r} keep {kept}"
        )
    out = matched_fid(ref.features, n, num_splits=num_splits, seed=seed)
    kids = []
    for s in range(num_splits):
        ref_rows, query_rows = _split_rows(len(ref.features), n, s, seed)
        kids.append(kid(ref.features[query_rows], ref.features[ref_rows], seed=seed)[0])
    out.update(
        kid=float(np.mean(kids)),
        kid_std=float(np.std(kids)),
        dataset=ref.provenance["dataset"],
        split=split,
        feature_net=extractor.name,
        feature_version=extractor.version,
        seed=int(seed),
    )
    return out
