"""What conditions a denoiser, in one place: nothing, a class label, or a caption.

The network's third argument ``y`` is, by ``kind``:
  none     None (unconditional);
  label    int32 labels [B] in 0..num_classes-1; the null label is ``num_classes``;
  caption  int32 token ids [B, max_length] (tokenizer.py); the null caption is all
           padding (``PAD_ID``), the empty caption.
Everything that trains or samples a conditional model asks this module for the batch's
condition (``from_batch``), the null condition of classifier-free guidance (``null_like``)
and the condition dropout of training (``drop``), so labels and captions share one code
path. Captions in batches are the ``tokens`` the input pipeline produces when a train
iterator is given the model's ``caption_length`` (data.py).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from diffusion_jax import objectives
from diffusion_jax.models import is_text_conditional, text_config
from diffusion_jax.tokenizer import PAD_ID, Tokenizer

KINDS = ("none", "label", "caption")


def kind(model_cfg) -> str:
    """ "caption" for text models, "label" for class-conditional ones, else "none"."""
    if is_text_conditional(model_cfg):
        return "caption"
    return "label" if int(model_cfg.get("num_classes", 0)) > 0 else "none"


def caption_length(model_cfg) -> int:
    """Tokens per caption a text model reads (its max_length); 0 for other models."""
    return int(text_config(model_cfg).get("max_length", 0)) if kind(model_cfg) == "caption" else 0


def null_id(model_cfg) -> int:
    """The value a null condition is filled with: the null label or the padding id."""
    return PAD_ID if kind(model_cfg) == "caption" else int(model_cfg.num_classes)


def null_like(model_cfg, y):
    """The null condition (unconditional branch of guidance) with the shape of ``y``; a
    controlled condition keeps its control (guidance is about the label or caption)."""
    if isinstance(y, dict):
        return {**y, "y": None if y["y"] is None else null_like(model_cfg, y["y"])}
    return jnp.full_like(y, null_id(model_cfg))


def from_batch(model_cfg, batch: Mapping[str, Any]) -> Optional[Any]:
    """The condition a batch carries for this model: tokens, labels or None; with a
    ControlNet's ``hint`` in the batch, {"y": that, "hint": hint}."""
    k = kind(model_cfg)
    if k == "caption":
        if "tokens" not in batch:
            raise ValueError(
                "a text model needs caption tokens in its batches; the dataset has none "
                "(use a captioned dataset such as data.name=glyphs)"
            )
        y = batch["tokens"]
    else:
        y = batch["label"] if k == "label" else None
    return {"y": y, "hint": batch["hint"]} if "hint" in batch else y


def drop(rng, y, example_ids, p: float, null: int):
    """Classifier-free guidance training: replace each example's condition (a label, or a
    whole caption) by ``null`` with probability ``p``, drawn per example id (so the same
    on any device layout, like the noise). A ControlNet's control is never dropped."""
    if isinstance(y, dict):
        inner = y["y"]
        return {**y, "y": None if inner is None else drop(rng, inner, example_ids, p, null)}
    keys = objectives.per_example_keys(rng, example_ids)
    dropped = jax.vmap(lambda k: jax.random.bernoulli(k, p))(keys)
    return jnp.where(dropped.reshape(dropped.shape + (1,) * (y.ndim - 1)), null, y)


def evaluation_conditions(config, n: int) -> tuple[Optional[Any], Optional[Any]]:
    """(conditions [n, ...], class labels [n]) that sample grids and sample metrics draw
    under: class-balanced labels (both) for label models; for caption models the captions
    of the first n examples of the training split (its distribution is the FID
    reference's), with their labels; (None, None) for unconditional models."""
    from diffusion_jax import adapters, data, generate, latent_space

    if adapters.kind(config) == "controlnet":  # the controls of test images
        return adapters.control_conditions(config, n)
    k = kind(config.model)
    if k == "none":
        return None, None
    if k == "label":
        labels = generate.class_balanced_labels(int(config.model.num_classes), n)
        return labels, labels
    pixels = latent_space.pixel_data_config(config)
    captions, labels = data.load_split_captions(pixels, "train", n)
    return tokenizer(config).encode_batch(captions), labels


def vocabulary(data_cfg) -> tuple[str, ...]:
    """The caption vocabulary of the dataset ``data_cfg.name`` names."""
    from diffusion_jax import datasets  # TFDS is slow to import; samplers never need it

    return datasets.vocabulary(str(data_cfg.name), os.path.expanduser(str(data_cfg.data_dir)))


def tokenizer(config) -> Tokenizer:
    """The tokenizer of a run with a text encoder (a text model, a CLIP guide): its
    dataset's vocabulary, its max_length."""
    text = text_config(config.model)
    if not int(text.get("vocab_size", 0)):
        raise ValueError("this model takes no captions (model.text.vocab_size is 0)")
    return Tokenizer(vocabulary(config.data), int(text["max_length"]))


def check_vocabulary(config) -> None:
    """ValueError naming the fix unless model.text.vocab_size matches the dataset's
    tokenizer (its words plus the padding and unknown ids)."""
    if not int(text_config(config.model).get("vocab_size", 0)):
        return
    expected = tokenizer(config).vocab_size
    got = int(text_config(config.model)["vocab_size"])
    if got != expected:
        raise ValueError(
            f"model.text.vocab_size={got} but the {config.data.name!r} captions need "
            f"{expected} ids ({expected - 2} words + padding + unknown); set "
            f"--config.model.text.vocab_size={expected}"
        )


__all__ = (
    "KINDS",
    "kind",
    "caption_length",
    "null_id",
    "null_like",
    "from_batch",
    "drop",
    "evaluation_conditions",
    "vocabulary",
    "tokenizer",
    "check_vocabulary",
)
