"""Scoring samples: ``evaluate_samples`` (every metric of a set of images against reference
statistics), ``evaluate_sampler`` (generate with ``generate.generate_samples``, then score,
with provenance), and the logging helpers (TensorBoard scalars, JSON lines)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np

from diffusion_jax import conditioning, generate, samplers
from diffusion_jax.evaluation.distances import feature_stats, fid_from_stats, kid, precision_recall
from diffusion_jax.evaluation.extractor import FeatureExtractor
from diffusion_jax.evaluation.intervals import bootstrap_matched_fid
from diffusion_jax.evaluation.stats import FeatureStats, matched_fid


def evaluate_samples(
    extractor: FeatureExtractor,
    samples,
    ref_stats: FeatureStats,
    *,
    labels=None,
    real_feats=None,
    matched_num_samples: Optional[int] = None,
    matched_num_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    seed: int = 0,
    bootstrap_resamples: int = 200,
) -> dict:
    """Metrics of ``samples`` [N, H, W, C] in [-1, 1] against ``ref_stats``.

    Returns
      fid: vs the reference Gaussian (N samples vs all ``num_reference`` real images: the
        standard number, e.g. CIFAR-10 50k samples vs the 50k train images);
      kid, kid_std, precision, recall: vs ``real_feats`` (default ``ref_stats.features``;
        skipped if neither). Precision/recall use ``min(N, R)`` rows of each set (random,
        ``seed``) so both manifolds have the same density;
      fid_matched, fid_matched_std: with ``matched_num_samples`` M, the ``matched_fid``
        protocol (M samples vs M real rows, mean over splits): compare with
        ``real_floor(num_samples=M)``; with ``bootstrap_resamples`` > 0 also
        fid_matched_low / fid_matched_high, its 95% bootstrap interval over the samples
        (``intervals.bootstrap_matched_fid``: what another sampling seed could give);
      class_accuracy: if ``labels`` [N] are given and the feature net is a classifier;
      num_samples, num_reference, feature_net, feature_version.
    """
    samples = np.asarray(samples, np.float32)
    if extractor.name != ref_stats.provenance.get(
        "feature_net", extractor.name
    ) or extractor.version != ref_stats.provenance.get("feature_version", extractor.version):
        raise ValueError(
            f"reference stats were computed with {ref_stats.provenance}, not "
            f"{extractor.name} {extractor.version}"
        )
    feats = extractor.features(samples)
    result = {
        "fid": fid_from_stats(*feature_stats(feats), ref_stats.mu, ref_stats.sigma),
        "num_samples": int(len(samples)),
        "num_reference": int(ref_stats.n),
        "feature_net": extractor.name,
        "feature_version": extractor.version,
    }
    real = ref_stats.features if real_feats is None else np.asarray(real_feats, np.float32)
    if matched_num_samples:
        if real is None:
            raise ValueError("matched FID needs real features")
        matched = matched_fid(
            real, matched_num_samples, sample_feats=feats, num_splits=matched_num_splits, seed=seed
        )
        result.update(
            fid_matched=matched["fid"],
            fid_matched_std=matched["fid_std"],
            matched_num_samples=matched["num_samples"],
            matched_num_splits=matched["num_splits"],
        )
        if bootstrap_resamples:
            ci = bootstrap_matched_fid(
                feats,
                real,
                matched_num_samples,
                num_splits=matched_num_splits,
                seed=seed,
                num_resamples=bootstrap_resamples,
            )
            result.update(
                fid_matched_low=ci.low,
                fid_matched_high=ci.high,
                bootstrap_resamples=int(bootstrap_resamples),
            )
    if real is not None:
        result["kid"], result["kid_std"] = kid(
            feats, real, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
        m = min(len(feats), len(real))
        rng = np.random.default_rng(seed)

        def pick(f):
            return f[np.sort(rng.choice(len(f), m, replace=False))]

        result["precision"], result["recall"] = precision_recall(pick(real), pick(feats), k=pr_k)
    if labels is not None and extractor.has_logits:
        labels = np.asarray(labels)
        if labels.shape != (len(samples),):
            raise ValueError(f"labels must be [{len(samples)}], got {labels.shape}")
        result["class_accuracy"] = float((extractor.logits(samples).argmax(-1) == labels).mean())
    return result


def sampler_info(config) -> dict:
    """What produced the samples, to log with every metric: sampler, steps, eta, spacing
    (with a "logsnr" grid's lambda_min), DDPM variance, x0 clipping, guidance scale (DDPM runs all T steps unless respaced)."""
    s = config.sampler
    ddpm = s.name == "ddpm"
    respaced = ddpm and s.respacing not in (0, config.schedule.num_timesteps)
    return {
        "sampler": s.name,
        "num_steps": samplers.ddpm_num_steps(config.schedule.num_timesteps, s.respacing)
        if ddpm
        else int(s.num_steps),
        "eta": None if ddpm else float(s.eta),
        "spacing": s.spacing if respaced or not ddpm else None,
        "lambda_min": float(s.lambda_min)
        if s.spacing == "logsnr" and (respaced or not ddpm)
        else None,
        "variance": s.variance if ddpm else None,
        "clip_x0": bool(s.clip_x0),
        "guidance_scale": float(s.guidance_scale),
        "conditional": conditioning.kind(config.model) != "none",
    }


def evaluate_sampler(
    sample_fn: Callable,
    params,
    extractor: FeatureExtractor,
    ref_stats: FeatureStats,
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    conditions=None,
    labels=None,
    guidance_scale: float,
    mesh=None,
    matched_num_samples: Optional[int] = None,
    info: Optional[Mapping[str, Any]] = None,
    interrupt: Optional[Callable[[], bool]] = None,
) -> dict:
    """Generate ``num_samples`` images under ``conditions`` [N, ...] (labels or caption
    tokens, conditioning.py; None for unconditional models) and score them:
    ``evaluate_samples``' metrics (class accuracy against ``labels`` [N] when given) plus
    seed, guidance_scale, the sampler ``info`` (see ``sampler_info``) and wall time, in one
    record. ``conditioning.evaluation_conditions`` gives both. Use one fixed ``seed`` for
    in-loop evaluation so successive numbers differ by the model only. ``interrupt``: see
    ``generate.generate_samples``."""
    t0 = time.time()
    images = generate.generate_samples(
        sample_fn,
        params,
        num_samples,
        batch_size,
        seed,
        conditions,
        guidance_scale=guidance_scale,
        mesh=mesh,
        interrupt=interrupt,
    )
    t1 = time.time()
    result = dict(info or {})
    result.update(
        evaluate_samples(
            extractor,
            images,
            ref_stats,
            labels=labels,
            matched_num_samples=matched_num_samples,
            seed=0,
        )
    )
    result.update(
        seed=int(seed),
        guidance_scale=float(guidance_scale),
        sample_seconds=round(t1 - t0, 2),
        metric_seconds=round(time.time() - t1, 2),
    )
    return result


def with_floor(result: dict, floor: Mapping[str, float]) -> dict:
    """``result`` (an ``evaluate_sampler`` record with ``fid_matched``) plus the
    real-vs-real floor measured at the same matched N (``real_floor``'s dict) and
    ``fid_matched_ratio`` = fid_matched / fid_floor, the number targets are stated in (and
    its bootstrap interval, fid_matched_ratio_low / _high, when the record has one)."""
    floor_fid = max(floor["fid"], 1e-12)
    result.update(
        fid_floor=floor["fid"],
        fid_floor_std=floor["fid_std"],
        kid_floor=floor["kid"],
        kid_floor_std=floor["kid_std"],
        fid_matched_ratio=result["fid_matched"] / floor_fid,
    )
    for end in ("low", "high"):
        if f"fid_matched_{end}" in result:
            result[f"fid_matched_ratio_{end}"] = result[f"fid_matched_{end}"] / floor_fid
    return result


# Always logged next to the metrics: a FID means nothing without them.
PROVENANCE_SCALARS = (
    "num_samples",
    "num_reference",
    "seed",
    "guidance_scale",
    "num_steps",
    "eta",
    "matched_num_samples",
)
METRIC_SCALARS = (
    "fid",
    "kid",
    "kid_std",
    "precision",
    "recall",
    "class_accuracy",
    "fid_matched",
    "fid_matched_std",
    "fid_floor",
    "fid_matched_ratio",
    "psnr",
    "ssim",
)


def tensorboard_scalars(result: Mapping[str, Any], prefix: str = "eval") -> dict:
    """Numeric metrics and their provenance (N, seed, guidance, steps, eta) as
    ``{prefix}/{name}`` scalars for ``metrics.MetricWriter.scalars``."""
    return {
        f"{prefix}/{k}": float(result[k])
        for k in METRIC_SCALARS + PROVENANCE_SCALARS
        if result.get(k) is not None
    }


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
    """Append one JSON line (a whole line per write, so concurrent appends do not mix)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
