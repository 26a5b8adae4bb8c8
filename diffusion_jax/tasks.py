"""What a run trains: the seam between the generic training loop (train.py) and the kind of
model. A ``Task`` builds, from the config, the three things the loop needs besides the
model and the optimizer:

  train_step(model, tx, schedule, config, axis_name) -> step(state, batch) -> (state, metrics)
  grid(config, model, schedule, spec, mesh) -> images(params, interrupt) -> [N, H, W, C]
      the images of the sample grid written every ``eval.every_steps``;
  quality(config, model, schedule, mesh) -> record(params, step, interrupt) -> dict
      the in-loop metrics of ``eval.metrics_every_steps`` (eval.jsonl, TensorBoard).

Tasks: ``diffusion`` (the UNet and DiT denoisers: samples, FID of samples),
``consistency`` (a consistency model distilled from a teacher workdir, starting from its
weights, or trained without one; consistency.py; sampled and scored like a denoiser) and ``autoencoder`` (``model.name == "autoencoder"``: held-out images over their
reconstructions; PSNR, SSIM and reconstruction FID on ``eval.heldout_split``) and
``guide`` (a noise-aware classifier or CLIP for classifier / CLIP guidance, guides.py: no
grid, accuracy on noisy test examples), ``finetune``, ``lora`` and ``controlnet`` (adapting the
diffusion model of adapter.base, adapters.py: sampled and scored like a denoiser). A latent
diffusion run is the diffusion task whose samples are decoded (``image_sample_fn``) and
scored against the latent dataset's source images. Each
piece lives in its own module (steps, autoencoding, generate, evaluation); this module only
wires them to the config.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from diffusion_jax import (
    adapters,
    autoencoding,
    conditioning,
    consistency,
    data,
    evaluation,
    generate,
    guides,
    latent_space,
    steps,
)
from diffusion_jax.models import is_autoencoder, is_guide


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    train_step: Callable
    grid: Callable
    quality: Callable
    # config -> the parameters a fresh run starts from (None: the model's random init)
    initial_params: Callable = lambda config: None
    # config -> what the train iterator reads from captions (data.create_train_iterator)
    batch_fields: Callable = lambda config: {
        "caption_length": conditioning.caption_length(config.model)
    }
    # (config, model) -> arrays the step reads but never trains, passed to it as an
    # argument (train_step(...) is then step(state, batch, frozen);
    # parallel.DataParallel.compile): an adapter's base, a distillation teacher
    frozen: Callable = lambda config, model: None


def _eval_reference(config):
    """(feature net, train-split reference stats, real-vs-real floor at matched N, N) of
    the images samples are compared with (a latent run's source dataset)."""
    pixels = latent_space.pixel_data_config(config)
    extractor = evaluation.make_extractor(
        pixels, cache_dir=config.eval.cache_dir, inception_weights=config.eval.inception_weights
    )
    ref = evaluation.reference_stats(extractor, pixels, "train", config.eval.cache_dir)
    matched = min(config.eval.metrics_num_samples, ref.n // 2)
    floor = evaluation.real_floor(
        extractor, pixels, num_samples=matched, cache_dir=config.eval.cache_dir
    )
    return extractor, ref, floor, matched


def image_sample_fn(config, model, schedule, shape):
    """``(sample_fn, params_of)``: the sampler for ``shape`` (``steps.make_sample_fn``) and
    how to turn the denoiser's params into its params argument. Latent runs decode: the
    sample_fn is ``latent_space.wrap_sample_fn``'s and takes (denoiser, autoencoder)
    params."""
    sample_fn = steps.make_sample_fn(model, schedule, config, shape)
    space = latent_space.load(config)
    if space is None:
        return sample_fn, lambda params: params
    return latent_space.wrap_sample_fn(sample_fn, space), lambda params: (params, space.params)


# ----------------------------------------------------------------------------------------
# Diffusion.


def _diffusion_grid(config, model, schedule, spec, mesh):
    """The sample grid: what `diffusion_jax.sample --seed=<seed + 1>` draws too."""
    n = config.eval.num_samples
    batch = generate.padded_batch_size(n, mesh)
    sample_fn, params_of = image_sample_fn(config, model, schedule, (batch, *spec.image_shape))
    conditions, _ = conditioning.evaluation_conditions(config, n)

    def images(params, interrupt=None):
        return generate.generate_samples(
            sample_fn,
            params_of(params),
            n,
            batch,
            config.seed + 1,
            conditions,
            guidance_scale=config.sampler.guidance_scale,
            mesh=mesh,
            interrupt=interrupt,
        )

    return images


def _diffusion_quality(config, model, schedule, mesh):
    """FID/KID/precision/recall (and class accuracy) of ``eval.metrics_num_samples``
    samples from a fixed seed, sampled data-parallel over the mesh; the record carries N,
    seed, sampler, steps, eta and guidance scale (a FID means nothing without them) and the
    real-vs-real floor at its matched N with ``fid_matched_ratio`` (the floor is measured
    once per run)."""
    spec = data.dataset_spec(config.data)
    extractor, ref, floor, matched = _eval_reference(config)
    n = config.eval.metrics_num_samples
    batch = generate.padded_batch_size(min(n, 500), mesh)
    sample_fn, params_of = image_sample_fn(config, model, schedule, (batch, *spec.image_shape))
    conditions, labels = conditioning.evaluation_conditions(config, n)

    def quality(params, step: int, interrupt=None) -> dict:
        record = evaluation.evaluate_sampler(
            sample_fn,
            params_of(params),
            extractor,
            ref,
            num_samples=n,
            batch_size=batch,
            seed=config.eval.metrics_seed,
            conditions=conditions,
            labels=labels,
            guidance_scale=config.sampler.guidance_scale,
            mesh=mesh,
            matched_num_samples=matched,
            info={**evaluation.sampler_info(config), "step": step},
            interrupt=interrupt,
        )
        return evaluation.with_floor(record, floor)

    return quality


# ----------------------------------------------------------------------------------------
# Autoencoder.


def heldout_images(config, num: int):
    """The first ``num`` images and labels of ``eval.heldout_split`` (stored order)."""
    images, labels = data.load_split_arrays(config.data, config.eval.heldout_split)
    return images[:num], labels[:num]


def reconstruct_fn(model):
    """A ``generate.generate_samples`` sample_fn that reconstructs its input images."""
    return evaluation.make_reconstruct_fn(
        lambda params, x: autoencoding.reconstruct(model, params, x)
    )


def _autoencoder_grid(config, model, schedule, spec, mesh):
    """Rows of eight held-out images, each row followed by its reconstructions."""
    del schedule, spec
    n = 8 * max(1, config.eval.num_samples // 16)
    originals, _ = heldout_images(config, n)
    n = len(originals)
    batch = generate.padded_batch_size(n, mesh)
    fn = reconstruct_fn(model)

    def images(params, interrupt=None):
        recon = generate.generate_samples(
            fn, params, n, batch, 0, mesh=mesh, images=originals, interrupt=interrupt
        )
        rows = [x for i in range(0, n, 8) for x in (originals[i : i + 8], recon[i : i + 8])]
        return np.concatenate(rows)

    return images


def _autoencoder_quality(config, model, schedule, mesh):
    """PSNR, SSIM and rFID of the reconstructions of ``eval.metrics_num_samples`` held-out
    images, with the real-vs-real floor at the matched N."""
    del schedule
    extractor, ref, floor, matched = _eval_reference(config)
    images, labels = heldout_images(config, config.eval.metrics_num_samples)
    matched = min(matched, len(images))
    batch = generate.padded_batch_size(min(len(images), 500), mesh)
    fn = reconstruct_fn(model)
    conditional_net = data.dataset_spec(config.data).num_classes > 0

    def quality(params, step: int, interrupt=None) -> dict:
        record = evaluation.evaluate_reconstructions(
            fn,
            params,
            images,
            labels if conditional_net else None,
            extractor,
            ref,
            batch_size=batch,
            mesh=mesh,
            matched_num_samples=matched,
            info={"step": step, "heldout_split": config.eval.heldout_split},
            interrupt=interrupt,
        )
        return evaluation.with_floor(record, floor)

    return quality


def _autoencoder_train_step(model, tx, schedule, config, axis_name=None):
    del schedule
    return autoencoding.make_train_step(model, tx, config, axis_name=axis_name)


# ----------------------------------------------------------------------------------------
# Consistency distillation: a denoiser trained from a teacher, sampled and scored like one.


def _consistency_train_step(model, tx, schedule, config, axis_name=None):
    if config.consistency.mode == "train":
        return consistency.make_ct_step(model, tx, schedule, config, axis_name=axis_name)
    teacher_apply = consistency.load_teacher(config)[0]
    return consistency.make_distill_step(
        model, tx, schedule, config, teacher_apply, axis_name=axis_name
    )


def _teacher_params(config):
    """Distillation: the teacher's EMA weights, both where the student starts and the
    frozen argument of its step. Consistency training (no teacher): None, from scratch."""
    if config.consistency.mode == "distill":
        return consistency.load_teacher(config)[1]
    return None


# ----------------------------------------------------------------------------------------
# Adapters (adapters.py): full fine-tuning starts from the base's weights; LoRA trains
# only its factors, over the frozen base, and samples through the merged weights.


def _adapter_view(make):
    """A grid / quality factory that samples an adapted model's sampling view
    (adapted.py): each call turns the adapter's params into the view's (a LoRA merged into
    its base, a ControlNet joined with it) first."""

    def view(config, model, schedule, *args):
        inner = make(config, model.sampling_model, schedule, *args)
        if inner is None:
            return None
        return lambda params, *rest, **kw: inner(model.sampling_params(params), *rest, **kw)

    return view


def _adapter_task(name: str) -> Task:
    """A LoRA / ControlNet run: the diffusion step over the frozen base (an argument of the
    compiled step), sampled and scored through the adapter's sampling view."""
    return Task(
        name,
        adapters.adapter_train_step(steps.make_train_step),
        _adapter_view(_diffusion_grid),
        _adapter_view(_diffusion_quality),
        frozen=lambda config, model: model.base_params,
    )


# ----------------------------------------------------------------------------------------
# Noise-aware guides (classifier and CLIP guidance): no images to show, scored by accuracy.


def _no_grid(config, model, schedule, spec, mesh):
    return None


TASKS = {
    "diffusion": Task("diffusion", steps.make_train_step, _diffusion_grid, _diffusion_quality),
    "consistency": Task(
        "consistency",
        _consistency_train_step,
        _diffusion_grid,
        _diffusion_quality,
        initial_params=_teacher_params,
        frozen=lambda config, model: _teacher_params(config),
    ),
    "autoencoder": Task(
        "autoencoder", _autoencoder_train_step, _autoencoder_grid, _autoencoder_quality
    ),
    "finetune": Task(
        "finetune",
        steps.make_train_step,
        _diffusion_grid,
        _diffusion_quality,
        initial_params=lambda config: adapters.base_of(config).params,
    ),
    "lora": _adapter_task("lora"),
    "controlnet": _adapter_task("controlnet"),
    "guide": Task(
        "guide",
        guides.make_train_step,
        _no_grid,
        guides.make_quality,
        batch_fields=lambda config: guides.batch_fields(config.model),
    ),
}


def task_of(config) -> Task:
    """The task a config trains: ``autoencoder`` for autoencoder models, ``consistency``
    with a consistency.mode, else diffusion."""
    if is_autoencoder(config.model):
        return TASKS["autoencoder"]
    if is_guide(config.model):
        return TASKS["guide"]
    if config.get("consistency", {}).get("mode"):
        return TASKS["consistency"]
    if adapters.kind(config):
        return TASKS[{"full": "finetune"}.get(adapters.kind(config), adapters.kind(config))]
    return TASKS["diffusion"]
