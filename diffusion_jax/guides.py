"""Noise-aware guides (models/guide.py): how they are trained, scored, and turned into the
gradients that classifier guidance and CLIP guidance add to a denoiser's score.

Training (``make_train_step``, the "guide" task): x_t = q_sample(x0, t, eps) with t and
eps drawn per global example id, as the diffusion loss draws them, so the guide sees
exactly the noisy inputs it will be asked about during sampling.
  classifier: the sum over attributes of the cross-entropy of each head against the
    attribute indices the caption names ("attributes" in batches, parsed from captions
    by the input pipeline; datasets.CAPTION_PARSERS);
  clip: the symmetric InfoNCE loss of CLIP (Radford et al. 2021) between the noisy
    images and their captions over the batch (the global batch under jit; under pmap
    each device's slice, so jit is the layout to use).
Quality (``make_quality``): accuracy per attribute (classifier) or caption-retrieval top-1
among 64 (clip) on the first test batch, at t = 0, T/4, T/2, 3T/4.

Guidance: ``classifier_grad`` is grad_x sum_k log p(a_k | x_t, t) for target attributes
a_k; ``clip_grad`` is grad_x of the cosine similarity between the noisy image and the
caption embeddings (GLIDE's CLIP guidance). ``guidance.gradient_guided_model_fn`` turns
either into a model_fn. ``make_guided_sample_fn`` is a ``steps.make_sample_fn``-shaped
sampler of a text model guided by classifier-free guidance and one of these.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import conditioning, data, guidance, objectives, samplers, steps
from diffusion_jax.models import NoisyClassifier, NoisyCLIP, is_guide
from diffusion_jax.models.guide import split_logits

KINDS = ("classifier", "clip")
EVAL_TIMESTEPS_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def kind_of(model) -> str:
    """ "classifier" or "clip" for a guide model."""
    if isinstance(model, NoisyClassifier):
        return "classifier"
    if isinstance(model, NoisyCLIP):
        return "clip"
    raise ValueError(f"{type(model).__name__} is not a guide model")


def _noised(rng, schedule, x0, example_ids):
    keys = objectives.per_example_keys(rng, example_ids)
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_timesteps))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:]))(keys)
    return objectives.q_sample(schedule, x0, t, noise.astype(x0.dtype)), t


def classifier_loss(logits, targets, head_sizes):
    """(summed cross-entropy [B], per-head accuracy [K]) of logits [B, sum K] vs int
    targets [B, K]."""
    heads = split_logits(logits, head_sizes)
    ce = sum(
        optax.softmax_cross_entropy_with_integer_labels(h, targets[:, i])
        for i, h in enumerate(heads)
    )
    acc = jnp.stack([jnp.mean(h.argmax(-1) == targets[:, i]) for i, h in enumerate(heads)])
    return ce, acc


def clip_loss(image, text, scale):
    """(symmetric InfoNCE, image->text top-1 accuracy) of matched rows."""
    logits = scale * image @ text.T
    labels = jnp.arange(logits.shape[0])
    loss = 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    )
    return loss, jnp.mean(logits.argmax(-1) == labels)


def _scores(model, params, x_t, t, batch):
    """(loss, metrics) of a guide on noisy inputs."""
    if isinstance(model, NoisyClassifier):
        logits = model.apply({"params": params}, x_t, t)
        ce, acc = classifier_loss(logits, batch["attributes"], model.head_sizes)
        return ce.mean(), {"accuracy": acc.mean(), "accuracy_min_head": acc.min()}
    image, text, scale = model.apply({"params": params}, x_t, t, batch["tokens"])
    loss, acc = clip_loss(image, text, scale)
    return loss, {"retrieval_top1": acc, "logit_scale": scale}


def make_train_step(model, tx, schedule, config, *, axis_name: Optional[str] = None):
    """``train_step(state, batch) -> (state, metrics)`` of a guide (see the module doc)."""
    kind_of(model)

    def train_step(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        ids = steps.global_example_ids(batch["image"].shape[0], axis_name)
        x_t, t = _noised(rng, schedule, batch["image"], ids)
        grad_fn = jax.value_and_grad(lambda p: _scores(model, p, x_t, t, batch), has_aux=True)
        (loss, metrics), grads = grad_fn(state.params)
        return steps.finish_update(state, loss, grads, metrics, tx, config.optim, axis_name)

    return train_step


def batch_fields(model_cfg) -> dict:
    """The train iterator's caption arguments for a guide: tokens (clip), attributes
    (classifier)."""
    if model_cfg.name == "clip":
        return {"caption_length": int(model_cfg.text.max_length)}
    return {"attributes": True}


def make_quality(config, model, schedule, mesh=None):
    """``quality(params, step, interrupt) -> record``: accuracy per timestep fraction on
    64 (clip) or 512 (classifier) test examples (fixed draws; fewer if the split is
    smaller)."""
    del mesh
    test = dict(config.data.to_dict(), split="test")
    n = min(64 if kind_of(model) == "clip" else 512, data.dataset_spec(test).num_examples)
    it = data.create_train_iterator(test, batch_size=n, seed=0, **batch_fields(config.model))
    batch = jax.tree.map(jnp.asarray, next(it))
    it.close()
    noise = jax.random.normal(jax.random.key(0), batch["image"].shape)

    @jax.jit
    def score(params, t):
        x_t = objectives.q_sample(schedule, batch["image"], t, noise)
        return _scores(model, params, x_t, t, batch)[1]

    def quality(params, step: int, interrupt=None) -> dict:
        record = {"step": step, "num_examples": n}
        for frac in EVAL_TIMESTEPS_FRACTIONS:
            t = jnp.full((n,), int(frac * schedule.num_timesteps), jnp.int32)
            metrics = score(params, t)
            for key, value in metrics.items():
                record[f"{key}_t{int(frac * schedule.num_timesteps)}"] = float(value)
        return record

    return quality


# --------------------------------------------------------------------------- guidance


@dataclasses.dataclass(frozen=True)
class _ClassifierGrad:
    apply_fn: Callable
    head_sizes: tuple

    def __call__(self, params, targets, x_t, t):
        def log_prob(x):
            heads = split_logits(self.apply_fn(params, x, t), self.head_sizes)
            logp = [
                jax.nn.log_softmax(h)[jnp.arange(len(h)), targets[:, i]]
                for i, h in enumerate(heads)
            ]
            return sum(jnp.sum(lp) for lp in logp)

        return jax.grad(log_prob)(x_t)


@dataclasses.dataclass(frozen=True)
class _ClipGrad:
    apply_fn: Callable

    def __call__(self, params, tokens, x_t, t):
        def similarity(x):
            image, text, _ = self.apply_fn(params, x, t, tokens)
            return jnp.sum(image * text)

        return jax.grad(similarity)(x_t)


def guide_grad(model, params, target) -> jax.tree_util.Partial:
    """``grad_fn(x_t, t)`` for ``guidance.gradient_guided_model_fn``: of the classifier's
    log-probability of ``target`` attributes [B, K], or of CLIP's similarity to
    ``target`` caption tokens [B, L]. params and target are traced."""

    def apply(p, *args):
        return model.apply({"params": p}, *args)

    if kind_of(model) == "classifier":
        return jax.tree_util.Partial(
            _ClassifierGrad(apply, tuple(model.head_sizes)), params, target
        )
    return jax.tree_util.Partial(_ClipGrad(apply), params, target)


def make_guided_sample_fn(model, guide, schedule, config, shape) -> Callable:
    """``sample((params, guide_params), rng, conditions, guide_scale, *unused) -> x``
    with ``conditions = {"tokens": [B, L], "target": [B, K] attributes or [B, L] tokens}``:
    the text model under classifier-free guidance at ``config.sampler.guidance_scale``,
    shifted by ``guide_scale`` times the guide's gradient (traced: no recompile), with
    the configured sampler. ``latent_space.wrap_sample_fn`` decodes it like any sampler."""
    s_cfg, prediction = config.sampler, config.objective.prediction

    def apply_fn(params, x_t, t, y):
        return model.apply({"params": params}, x_t, t, y, train=False)

    def sample(params, rng, conditions, guide_scale, *unused):
        denoiser, guide_params = params
        tokens = conditions["tokens"]
        base = guidance.guided_model_fn(
            apply_fn,
            denoiser,
            tokens,
            conditioning.null_like(config.model, tokens),
            s_cfg.guidance_scale,
            prediction=prediction,
        )
        grad_fn = guide_grad(guide, guide_params, conditions["target"])
        fn = guidance.gradient_guided_model_fn(base, grad_fn, guide_scale, schedule, prediction)
        return samplers.sample(fn, schedule, rng, shape, **steps.sampler_options(config))

    return sample


def load_guided_sampler(config, model, spec, guide_dir: str, batch_size: int):
    """(sample_fn, params_of, targets_of) of classifier / CLIP guidance of a text model
    by the guide trained in workdir ``guide_dir`` (``make_guided_sample_fn``, decoded for
    latent runs): sample_fn(params_of(text model params), rng, {"tokens", "target"},
    guide_scale); targets_of(captions) gives the guide's targets."""
    from diffusion_jax import (
        conditioning,
        datasets,
        latent_space,
        schedules,
        workdir as workdir_lib,
    )

    guide_config = workdir_lib.load_config(guide_dir)
    workdir_lib.require_checkpoint(guide_dir)
    if not is_guide(guide_config.model):
        raise ValueError(f"{guide_dir} holds a {guide_config.model.name!r} model, not a guide")
    for what, ours, theirs in (
        ("schedule", config.schedule.to_dict(), guide_config.schedule.to_dict()),
        (
            "data",
            (config.data.name, config.data.data_dir),
            (guide_config.data.name, guide_config.data.data_dir),
        ),
    ):
        if ours != theirs:
            raise ValueError(
                f"the guide in {guide_dir} was trained with {what} {theirs}, the text model "
                f"with {ours}; train the guide on the same data and schedule"
            )
    guide, _, guide_state = workdir_lib.load_state(guide_dir, guide_config)
    schedule = schedules.build(config.schedule)
    sample_fn = make_guided_sample_fn(
        model, guide, schedule, config, (batch_size, *spec.image_shape)
    )
    space = latent_space.load(config)
    guide_params = guide_state.ema_params
    if space is None:
        params_of = lambda p: (p, guide_params)  # noqa: E731
    else:
        sample_fn = latent_space.wrap_sample_fn(sample_fn, space)
        params_of = lambda p: ((p, guide_params), space.params)  # noqa: E731
    if kind_of(guide) == "classifier":
        parser = datasets.caption_parser(config.data.name, config.data.data_dir)
        targets_of = lambda captions: attribute_targets(parser, captions)  # noqa: E731
    else:
        targets_of = conditioning.tokenizer(guide_config).encode_batch
    return sample_fn, params_of, targets_of


def attribute_targets(parser, captions) -> np.ndarray:
    """int32 [N, K] attribute indices of captions (a dataset's caption parser)."""
    return np.asarray([list(parser(c).values()) for c in captions], np.int32)


__all__ = (
    "KINDS",
    "kind_of",
    "classifier_loss",
    "clip_loss",
    "make_train_step",
    "make_quality",
    "batch_fields",
    "guide_grad",
    "make_guided_sample_fn",
    "attribute_targets",
    "load_guided_sampler",
)
