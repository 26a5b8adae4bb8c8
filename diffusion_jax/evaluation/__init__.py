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

Feature networks (``extractor.FEATURE_EXTRACTORS``, name -> factory; each gives a
``FeatureExtractor`` mapping images [N, H, W, C] in [-1, 1] to float32 features [N, D]):
  * ``digits_classifier``: a small conv net trained by ``digits_net`` on the bundled digits'
    train split (deterministic, fixed seed, ~10 s on 2 CPU cores), test accuracy recorded.
    Params + a JSON record are cached in ``cache_dir`` (default
    ``~/.cache/diffusion_jax/eval``); later calls load them. Features: the 64-d penultimate
    layer ("classifier-FID"); logits give class accuracy.
  * ``fashion_classifier``: the same kind of net trained by ``fashion_net`` on the
    Fashion-MNIST train split at 28x28 (~2.5 min on 2 CPU cores, ~90% test accuracy),
    cached alike; images the data pipeline padded to 32x32 are center-cropped back to 28.
  * ``glyph_classifier``: for glyphs, a conv net with one head per glyph attribute, trained
    by ``glyph_net`` on fresh renders (~3.5 min on 2 CPU cores), cached alike; logits are
    the char head, ``predict_attributes`` and ``caption_following`` judge whether samples
    show what their captions ask for.
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

Modules (one job each; the names below are re-exported here):
  * ``distances``: the metric math (feature statistics, FID, KID, precision/recall);
  * ``stats``: ``FeatureStats``, the statistics cache, ``reference_stats``, ``matched_fid``,
    ``real_floor``;
  * ``extractor``: the ``FeatureExtractor`` interface, the feature-net registry and
    ``make_extractor`` (a dataset's default net);
  * ``small_classifier``: the small conv classifier nets (net, deterministic training,
    cache, fitting inputs to the native size);
  * ``digits_net``, ``fashion_net``: the digits and Fashion-MNIST classifiers (recipes);
  * ``glyph_net``: the glyphs attribute classifier and the caption-following judge;
  * ``inception``: InceptionV3 and its weight conversion/loading;
  * ``reconstruction``: an autoencoder's PSNR, SSIM and reconstruction FID;
  * ``scoring``: ``evaluate_samples``, ``evaluate_sampler`` (samples come from
    ``diffusion_jax.generate``), ``sampler_info`` and the logging helpers.
"""

from diffusion_jax.evaluation.digits_net import DigitsClassifierNet, digits_classifier
from diffusion_jax.evaluation.distances import (
    feature_stats,
    fid_from_features,
    fid_from_stats,
    fid_from_stats_jax,
    kid,
    precision_recall,
)
from diffusion_jax.evaluation.extractor import FEATURE_EXTRACTORS, FeatureExtractor, make_extractor
from diffusion_jax.evaluation.fashion_net import fashion_classifier
from diffusion_jax.evaluation.glyph_net import (
    GlyphClassifier,
    attribute_arrays,
    caption_following,
    glyph_classifier,
)
from diffusion_jax.evaluation.inception import (
    INCEPTION_FILE_NAME,
    INCEPTION_INPUT_SIZE,
    InceptionV3,
    inception_v3,
    inception_variables_from_torch,
    load_inception_variables,
)
from diffusion_jax.evaluation.reconstruction import (
    evaluate_reconstructions,
    make_reconstruct_fn,
    psnr,
    ssim,
)
from diffusion_jax.evaluation.scoring import (
    METRIC_SCALARS,
    PROVENANCE_SCALARS,
    append_jsonl,
    evaluate_sampler,
    evaluate_samples,
    sampler_info,
    tensorboard_scalars,
    with_floor,
)
from diffusion_jax.evaluation.stats import (
    DEFAULT_CACHE_DIR,
    MAX_REFERENCE_FEATURES,
    STATS_VERSION,
    FeatureStats,
    matched_fid,
    real_floor,
    reference_stats,
)

__all__ = [
    # distances
    "feature_stats",
    "fid_from_features",
    "fid_from_stats",
    "fid_from_stats_jax",
    "kid",
    "precision_recall",
    # stats
    "DEFAULT_CACHE_DIR",
    "MAX_REFERENCE_FEATURES",
    "STATS_VERSION",
    "FeatureStats",
    "matched_fid",
    "real_floor",
    "reference_stats",
    # extractor
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "make_extractor",
    # feature nets
    "DigitsClassifierNet",
    "digits_classifier",
    "fashion_classifier",
    "GlyphClassifier",
    "attribute_arrays",
    "caption_following",
    "glyph_classifier",
    "INCEPTION_FILE_NAME",
    "INCEPTION_INPUT_SIZE",
    "InceptionV3",
    "inception_v3",
    "inception_variables_from_torch",
    "load_inception_variables",
    # reconstruction
    "evaluate_reconstructions",
    "make_reconstruct_fn",
    "psnr",
    "ssim",
    # scoring
    "METRIC_SCALARS",
    "PROVENANCE_SCALARS",
    "append_jsonl",
    "evaluate_sampler",
    "evaluate_samples",
    "sampler_info",
    "tensorboard_scalars",
    "with_floor",
]
