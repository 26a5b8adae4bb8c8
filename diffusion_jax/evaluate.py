r"""Score a trained workdir's latest EMA checkpoint: FID, KID, precision/recall and (class-
conditional models) class accuracy, with any sampler settings. For an autoencoder workdir:
PSNR, SSIM and reconstruction FID of the first --num_samples images of its
eval.heldout_split (the sampler settings and --seed play no part).

  python -m diffusion_jax.evaluate --workdir=runs/digits --num_samples=1498 [--seed=0] \
      [--config.sampler.name=ddim --config.sampler.num_steps=50 --config.sampler.eta=0 \
       --config.sampler.spacing=leading --config.sampler.guidance_scale=1]

Sampler settings come from the workdir's config.json; ``--config.KEY=VALUE`` overrides any
key of it, checked like a training config.

Feature net: the digits classifier for data.name == "digits" (trained and cached on first
use, ~10 s), InceptionV3 otherwise (--inception_weights=FILE; see
diffusion_jax/evaluation/inception.py for where to get it). Reference statistics: the whole
--ref_split of the workdir's dataset, cached in --cache_dir.

Prints one JSON line and appends it to <workdir>/eval.jsonl. Besides the metrics it holds
everything that determines them: num_samples, num_reference, seed, sampler, num_steps, eta,
spacing, guidance_scale, checkpoint step, feature net and its version. With --floor (the
default) it also holds the real-vs-real floor at a matched size M = --floor_num_samples
(default: min(num_samples, half the reference split)): fid_floor (two disjoint real halves
of M images each), fid_matched (M samples vs M real images, the same reference draws) and
fid_matched_ratio = fid_matched / fid_floor. Only fid_matched is comparable with the floor;
"fid" (N samples vs the whole split) has a different sample-size bias.
"""

from __future__ import annotations

import json
import os

from absl import flags

from diffusion_jax import cli

# Own FlagValues: importable next to the other CLIs, whose flags share names.
FLAGS = flags.FlagValues()
OWN = dict(flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "A workdir written by diffusion_jax.main.", **OWN)
flags.DEFINE_integer("num_samples", 1000, "Samples to generate and score.", **OWN)
flags.DEFINE_integer("batch_size", 500, "Samples per compiled sampling call.", **OWN)
flags.DEFINE_integer("seed", 0, "Sampling seed (batch i uses fold_in(PRNGKey(seed), i)).", **OWN)
flags.DEFINE_string("ref_split", "train", "Dataset split of the reference statistics.", **OWN)
flags.DEFINE_string(
    "cache_dir",
    "",
    "Feature net + reference stats cache (default ~/.cache/diffusion_jax/eval).",
    **OWN,
)
flags.DEFINE_string(
    "inception_weights",
    "",
    "InceptionV3 weights (.npz/.pkl) for datasets other than digits.",
    **OWN,
)
flags.DEFINE_bool("floor", True, "Also report the real-vs-real floor and the matched FID.", **OWN)
flags.DEFINE_integer(
    "floor_num_samples",
    0,
    "Images per side for the floor and matched FID "
    "(0: min(num_samples, half the reference split)).",
    **OWN,
)
flags.DEFINE_string("out", "", "JSONL file to append to (default <workdir>/eval.jsonl).", **OWN)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def run(
    workdir: str,
    *,
    num_samples: int,
    batch_size: int = 500,
    overrides=None,
    seed: int = 0,
    ref_split: str = "train",
    cache_dir: str = "",
    inception_weights: str = "",
    floor: bool = True,
    floor_num_samples: int = 0,
) -> dict:
    """Evaluate ``workdir``'s latest EMA params; returns the record (see module docstring).
    ``overrides``: {dotted config key: value or CLI text} applied to the workdir's config,
    e.g. {"sampler.num_steps": 20}."""
    import jax

    from diffusion_jax import (
        adapters,
        conditioning,
        evaluation,
        latent_space,
        schedules,
        tasks,
        workdir as workdir_lib,
    )
    from diffusion_jax.models import is_autoencoder

    if num_samples < 2:
        raise workdir_lib.ConfigError(f"num_samples must be >= 2, got {num_samples}")
    if batch_size < 1:
        raise workdir_lib.ConfigError(f"batch_size must be >= 1, got {batch_size}")
    config = workdir_lib.load_config(workdir)
    workdir_lib.require_checkpoint(workdir)
    cli.apply_overrides(config, overrides or {})
    workdir_lib.check_config(config, workdir_lib.run_spec(workdir, config), training=False)
    model, spec, state = workdir_lib.load_state(workdir, config)
    model, params = adapters.for_sampling(
        model, state.ema_params
    )  # a LoRA merged; a ControlNet with its base
    step = int(state.step)
    autoencoder = is_autoencoder(config.model)
    if autoencoder:  # the first num_samples held-out images, reconstructed
        images, labels = tasks.heldout_images(config, num_samples)
        num_samples = len(images)
    bs = min(batch_size, num_samples)

    pixels = latent_space.pixel_data_config(config)  # a latent run's source images
    extractor = evaluation.make_extractor(
        pixels, cache_dir=cache_dir, inception_weights=inception_weights
    )
    ref = evaluation.reference_stats(extractor, pixels, ref_split, cache_dir)
    matched = 0
    if floor:
        matched = floor_num_samples or min(num_samples, ref.n // 2)
    info = {
        "workdir": os.path.abspath(workdir),
        "checkpoint_step": step,
        "dataset": config.data.name,
        "ref_split": ref_split,
        "image_size": int(config.data.image_size),
    }
    if autoencoder:
        result = evaluation.evaluate_reconstructions(
            tasks.reconstruct_fn(model),
            params,
            images,
            labels if spec.num_classes else None,
            extractor,
            ref,
            batch_size=bs,
            matched_num_samples=matched or None,
            info={**info, "heldout_split": config.eval.heldout_split},
        )
    else:
        sample_fn, params_of = tasks.image_sample_fn(
            config, model, schedules.build(config.schedule), (bs, *spec.image_shape)
        )
        conditions, labels = conditioning.evaluation_conditions(config, num_samples)
        result = evaluation.evaluate_sampler(
            sample_fn,
            params_of(params),
            extractor,
            ref,
            num_samples=num_samples,
            batch_size=bs,
            seed=seed,
            conditions=conditions,
            labels=labels,
            guidance_scale=config.sampler.guidance_scale,
            matched_num_samples=matched or None,
            info={**evaluation.sampler_info(config), **info},
        )
    if matched:
        floor = evaluation.real_floor(
            extractor, pixels, num_samples=matched, split=ref_split, cache_dir=cache_dir
        )
        evaluation.with_floor(result, floor)
    result["jax_devices"] = f"{jax.device_count()}x{jax.devices()[0].platform}"
    return result


def main(overrides: dict) -> dict:
    from diffusion_jax import evaluation, runtime
    from diffusion_jax.workdir import ConfigError, ensure_writable_file

    runtime.configure_cpu_xla_flags()
    out = FLAGS.out or os.path.join(FLAGS.workdir, "eval.jsonl")
    try:
        # the record is appended after minutes of sampling: check first that it can be.
        # The default's directory is the workdir: not probed (so not created) when missing,
        # run() reports that.
        if FLAGS.out or os.path.isdir(FLAGS.workdir):
            ensure_writable_file(out, "--out" if FLAGS.out else "the default --out")
        result = run(
            FLAGS.workdir,
            num_samples=FLAGS.num_samples,
            batch_size=FLAGS.batch_size,
            overrides=overrides,
            seed=FLAGS.seed,
            ref_split=FLAGS.ref_split,
            cache_dir=FLAGS.cache_dir,
            inception_weights=FLAGS.inception_weights,
            floor=FLAGS.floor,
            floor_num_samples=FLAGS.floor_num_samples,
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    print(json.dumps(result, sort_keys=True))
    evaluation.append_jsonl(out, result)
    return result


if __name__ == "__main__":
    cli.run(main, FLAGS, __doc__)
