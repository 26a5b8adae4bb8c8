"""Adapting a trained model, the *base* workdir (``adapter.base``), to new data.

``adapter.kind``:
  ""      an ordinary run.
  "full"  full fine-tuning: every parameter trains, starting from the base's EMA weights.
  "lora"  LoRA (lora.py): the base's EMA weights stay frozen; the run's parameters, EMA,
          optimizer state and checkpoints hold only the LoRA factors (adapter.rank,
          adapter.alpha, on the kernels adapter.targets match).
  "controlnet"  ControlNet (models/controlnet.py): a trainable copy of the base UNet's
          encoder, fed the control (controls.py: adapter.control) of each training image;
          the base stays frozen and the run holds the ControlNet only.

An adapter run has the base's model, schedule and prediction (checked before anything
runs, ``check_same_model``). Its workdir records which base it adapts in
``adapter_base.json``: the base workdir, the checkpoint step and a fingerprint (SHA-256)
of that step's EMA parameters. A resume and every later load read that step of the base
and refuse to go on if its parameters are not the ones the adapter was trained on.

A LoRA or ControlNet run's model is an ``adapted.LoraModel`` / ``ControlledModel``:
``init`` draws the adapter's fresh parameters, ``apply`` runs the base with them.
Training passes the base parameters to the compiled step as an argument (``frozen``),
never as constants baked into the program, so a large base costs no compile time and no
second copy; sampling uses the adapter's sampling view (``for_sampling``: a LoRA merged
once at a traced scale; a ControlNet next to its base).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Optional

import jax
import numpy as np

from diffusion_jax import controls, lora
from diffusion_jax.adapted import Adapted, ControlledModel, LoraModel
from diffusion_jax.models import build_model
from diffusion_jax.models.controlnet import ControlNet
from diffusion_jax.models.text import TextConditional
from diffusion_jax.models.unet import UNet

KINDS = ("", "full", "lora", "controlnet")
RECORD_FILE = "adapter_base.json"


def kind(config) -> str:
    return config.get("adapter", {}).get("kind", "")


def check_config(config) -> None:
    """adapter.*: the kind, a base workdir with a checkpoint and the same model, LoRA
    rank / alpha / targets (the targets are matched against the base when it loads)."""
    from diffusion_jax import objectives

    a = config.adapter
    objectives.check_choice("adapter.kind", a.kind, KINDS)
    if not a.kind:
        return
    if not a.base:
        raise ValueError(f"adapter.kind={a.kind} needs adapter.base=WORKDIR (the model to adapt)")
    if a.kind == "lora":
        if a.rank < 1:
            raise ValueError(f"adapter.rank must be >= 1, got {a.rank}")
        if a.alpha <= 0:
            raise ValueError(f"adapter.alpha must be > 0, got {a.alpha}")
        if not a.targets:
            raise ValueError("adapter.targets is empty: name the kernels LoRA adapts")
    if a.kind == "controlnet":
        objectives.check_choice("adapter.control", a.control, tuple(controls.CONTROLS))
        if config.data.name == "latents":
            raise ValueError(
                "adapter.kind=controlnet trains on pixel images (its control is computed "
                "from them); latent datasets are not supported yet"
            )
    check_same_model(config, a.base, "adapter.base")


def check_same_model(config, other: str, flag: str) -> None:
    """The workdir ``other`` (named by ``flag``) has a checkpoint and ``config``'s model,
    schedule and prediction. A ValueError names the first difference."""
    from diffusion_jax import workdir

    workdir.require_checkpoint(other)
    theirs_cfg = workdir.load_config(other)
    if theirs_cfg.model.name == "autoencoder":
        raise ValueError(f"{flag}={other!r} holds an autoencoder")
    name = config.model.name
    sections = {"model": ("name", "num_classes", "text", name), "schedule": tuple(config.schedule)}
    for section, keys in sections.items():
        ours = workdir.flatten({k: config[section][k] for k in keys if k in config[section]})
        theirs = workdir.flatten(
            {k: theirs_cfg[section][k] for k in keys if k in theirs_cfg[section]}
        )
        # keys the other's (older) config.json lacks keep their defaults: not compared
        for key in sorted(set(ours) & set(theirs)):
            if key.endswith(".dropout") or key.endswith(".conv_impl"):
                continue
            if ours.get(key) != theirs.get(key):
                raise ValueError(
                    f"{section}.{key}={ours.get(key)!r} differs from {flag}'s "
                    f"({theirs.get(key)!r} in {other}); set it to the same value"
                )
    if config.objective.prediction != theirs_cfg.objective.prediction:
        raise ValueError(
            f"objective.prediction={config.objective.prediction!r} differs from {flag}'s "
            f"{theirs_cfg.objective.prediction!r}"
        )


# ----------------------------------------------------------------------------------------
# The base and its identity.


@dataclasses.dataclass(frozen=True)
class Base:
    workdir: str
    step: int
    params: Any  # EMA parameters
    fingerprint: str


def fingerprint(params) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (hex, 16 digits)."""
    h = hashlib.sha256()
    for path, leaf in sorted(
        (jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)
    ):
        leaf = np.asarray(leaf)
        h.update(f"{path}:{leaf.dtype}:{leaf.shape}".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def _load_base(path: str, step: Optional[int]) -> Base:
    from diffusion_jax import workdir

    _, _, state = workdir.load_state(path, workdir.load_config(path), step=step)
    params = jax.device_get(state.ema_params)
    return Base(path, int(state.step), params, fingerprint(params))


def base_of(config, run_dir: Optional[str] = None) -> Base:
    """The base an adapter run adapts. With a ``run_dir`` that recorded one: that step of
    the base, checked against the recorded fingerprint; otherwise the latest step."""
    from diffusion_jax.workdir import ConfigError

    path = os.path.abspath(config.adapter.base)
    record = read_record(run_dir) if run_dir else None
    if record is None:
        return _load_base(path, None)
    try:
        base = _load_base(path, record["step"])
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(
            f"{run_dir} adapts step {record['step']} of {path}, which cannot be loaded ({e}); "
            "restore that checkpoint or train the adapter again"
        ) from None
    if base.fingerprint != record["fingerprint"]:
        raise ConfigError(
            f"{run_dir} was trained on {path} step {record['step']} with parameter fingerprint "
            f"{record['fingerprint']}; that checkpoint now has {base.fingerprint}. The base "
            "changed: restore it or train the adapter again"
        )
    return base


def read_record(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, RECORD_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def record_base(run_dir: str, base: Base) -> None:
    """Write ``adapter_base.json`` (once: a resume checks it instead)."""
    if jax.process_index() != 0 or read_record(run_dir) is not None:
        return
    record = {"workdir": base.workdir, "step": base.step, "fingerprint": base.fingerprint}
    path = os.path.join(run_dir, RECORD_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------
# The model of a run.


def build(config, run_dir: Optional[str] = None):
    """The model a run trains or a workdir holds: ``build_model(config.model)``, or for a
    LoRA / ControlNet run that model seen through its adapter (adapted.py) over its base."""
    from diffusion_jax.workdir import ConfigError

    model = build_model(config.model)
    k = kind(config)
    if k not in ("lora", "controlnet"):
        return model
    a = config.adapter
    base = base_of(config, run_dir)
    if k == "controlnet":
        unet = model.backbone if isinstance(model, TextConditional) else model
        if not isinstance(unet, UNet):
            raise ConfigError(
                f"adapter.kind=controlnet needs a UNet base (model.name=unet, with or without "
                f"captions); {a.base} holds a {type(unet).__name__}"
            )
        size = int(config.data.image_size)
        net = ControlNet.of(unet, a.hint_channels)
        return ControlledModel(model, base.params, net, a.control, (size, size, 1))
    try:
        lora.select(base.params, a.targets)  # a pattern that matches nothing: say so now
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return LoraModel(model, base.params, tuple(a.targets), int(a.rank), float(a.alpha))


def for_sampling(model, params, scale: float = 1.0):
    """(model, params) to sample with: an adapted model's sampling view at ``scale`` (a
    LoRA merged into its base, a ControlNet with its base; the scale is traced, so a new
    one compiles nothing); other models unchanged."""
    if not isinstance(model, Adapted):
        return model, params
    return model.sampling_model, model.sampling_params(params, scale)


def adapter_train_step(train_step_of):
    """An adapter run's step ``(state, batch, base_params)`` from a step factory
    ``(model, ...) -> step(state, batch)``: the base is the step's argument, not a
    constant, and the adapter prepares the batch (a ControlNet adds its control)."""

    def make(model, tx, schedule, config, axis_name=None):
        def step(state, batch, base_params):
            bound = model.with_base(base_params)
            inner = train_step_of(bound, tx, schedule, config, axis_name=axis_name)
            return inner(state, bound.prepare(batch))

        return step

    return make


def control_conditions(config, n: int):
    """(conditions, labels) of a ControlNet run's grids and metrics: the first n test
    images (cycled) give the controls, and their labels (or captions) the base's
    condition."""
    from diffusion_jax import conditioning, data

    images, labels = data.load_split_arrays(config.data, "test")  # in [-1, 1]
    idx = np.arange(n) % len(images)
    images, labels = images[idx], labels[idx]
    hint = np.asarray(controls.extract(config.adapter.control, images))
    k = conditioning.kind(config.model)
    if k == "caption":  # stored order, wrapping around like idx
        captions, _ = data.load_split_captions(config.data, "test", n)
        return {"y": conditioning.tokenizer(config).encode_batch(captions), "hint": hint}, labels
    labels = labels if k == "label" else None
    return {"y": labels, "hint": hint}, labels


def controlled_condition(
    config, model, n: int, labels, images, scale: float, *, test_labels: bool
) -> dict:
    """The condition of n ControlNet samples: ``{"y", "hint", "scale"}``. The controls
    come from ``images`` [N, H, W, C] in [-1, 1] (cycled), else from the first n test
    images, whose labels (or caption tokens) replace ``labels`` when ``test_labels``."""
    if images is not None:
        images = np.resize(images, (n, *images.shape[1:]))
        hint = np.asarray(controls.extract(model.control, images))
    else:
        default, _ = control_conditions(config, n)
        hint = default["hint"]
        if labels is not None and test_labels:
            labels = default["y"]
    return {"y": labels, "hint": hint, "scale": np.full(n, scale, np.float32)}


def load_lora_onto(lora_dir: str, base_dir: str):
    """(LoraModel, LoRA EMA params) of the LoRA workdir ``lora_dir``, which must adapt
    ``base_dir`` (``sample --workdir=base_dir --lora=lora_dir``)."""
    from diffusion_jax import workdir

    workdir.require_checkpoint(lora_dir)
    lora_config = workdir.load_config(lora_dir)
    if kind(lora_config) != "lora":
        raise workdir.ConfigError(f"--lora={lora_dir} is not a LoRA workdir (adapter.kind=lora)")
    base = os.path.abspath(lora_config.adapter.base)
    if not os.path.samefile(base, base_dir):
        raise workdir.ConfigError(f"--lora={lora_dir} adapts {base}, not --workdir={base_dir}")
    model, _, state = workdir.load_state(lora_dir, lora_config)
    return model, state.ema_params


__all__ = (
    "KINDS",
    "RECORD_FILE",
    "Base",
    "adapter_train_step",
    "base_of",
    "build",
    "check_config",
    "check_same_model",
    "control_conditions",
    "controlled_condition",
    "fingerprint",
    "for_sampling",
    "kind",
    "load_lora_onto",
    "read_record",
    "record_base",
)
