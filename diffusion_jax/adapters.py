"""Adapting a trained model, the *base* workdir (``adapter.base``), to new data.

``adapter.kind``:
  ""      an ordinary run.
  "full"  full fine-tuning: every parameter trains, starting from the base's EMA weights.
  "lora"  LoRA (lora.py): the base's EMA weights stay frozen; the run's parameters, EMA,
          optimizer state and checkpoints hold only the LoRA factors (adapter.rank,
          adapter.alpha, on the kernels adapter.targets match).

An adapter run has the base's model, schedule and prediction (checked before anything
runs, ``check_same_model``). Its workdir records which base it adapts in
``adapter_base.json``: the base workdir, the checkpoint step and a fingerprint (SHA-256)
of that step's EMA parameters. A resume and every later load read that step of the base
and refuse to go on if its parameters are not the ones the adapter was trained on.

A LoRA run's model is a ``LoraModel``: ``init`` draws a fresh LoRA, ``apply`` merges it
into the base. Training passes the base parameters to the compiled step as an argument
(``frozen``), never as constants baked into the program, so a large base costs no compile
time and no second copy; sampling merges once (``for_sampling``), at a traced scale.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Optional, Tuple

import jax
import numpy as np

from diffusion_jax import lora
from diffusion_jax.models import build_model

KINDS = ("", "full", "lora")
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


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: params are not hashable
class LoraModel:
    """The base model seen through a LoRA: ``init`` returns ``{"params": fresh LoRA}``
    (from the params rng), ``apply`` merges the LoRA given as params into
    ``base_params``. Everything else is the base model's."""

    model: Any
    base_params: Any
    targets: Tuple[str, ...]
    rank: int
    alpha: float

    def init(self, rngs, *args, **kwargs):
        del args, kwargs
        key = rngs["params"] if isinstance(rngs, dict) else rngs
        return {"params": lora.init(self.base_params, self.targets, self.rank, key)}

    def apply(self, variables, *args, **kwargs):
        merged = lora.merge(self.base_params, variables["params"], self.alpha)
        return self.model.apply({"params": merged}, *args, **kwargs)

    def with_base(self, base_params) -> "LoraModel":
        """The same adapter over other base arrays (the step's traced argument)."""
        return dataclasses.replace(self, base_params=base_params)

    def __getattr__(self, name):  # check_input_shape, fields the samplers read, ...
        if name == "model":  # not set yet (copy, unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


def build(config, run_dir: Optional[str] = None):
    """The model a run trains or a workdir holds: ``build_model(config.model)``, or for
    a LoRA run that model wrapped in a ``LoraModel`` over its base."""
    model = build_model(config.model)
    if kind(config) != "lora":
        return model
    from diffusion_jax.workdir import ConfigError

    a = config.adapter
    base = base_of(config, run_dir)
    try:
        lora.select(base.params, a.targets)  # a pattern that matches nothing: say so now
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return LoraModel(model, base.params, tuple(a.targets), int(a.rank), float(a.alpha))


@functools.partial(jax.jit, static_argnames="alpha")
def _merge(base_params, lora_params, alpha: float, scale):
    return lora.merge(base_params, lora_params, alpha, scale)


def for_sampling(model, params, scale: float = 1.0):
    """(model, params) to sample with: a LoraModel's base model and the LoRA merged into
    its base at ``scale`` (traced: a new scale compiles nothing); others unchanged."""
    if not isinstance(model, LoraModel):
        return model, params
    merged = _merge(model.base_params, params, model.alpha, np.float32(scale))
    return model.model, merged


def lora_train_step(train_step_of):
    """A LoRA run's step ``(state, batch, base_params)`` from a step factory ``(model, ...)
    -> step(state, batch)``: the base is the step's argument, not a constant."""

    def make(model, tx, schedule, config, axis_name=None):
        def step(state, batch, base_params):
            bound = model.with_base(base_params)
            return train_step_of(bound, tx, schedule, config, axis_name=axis_name)(state, batch)

        return step

    return make


__all__ = (
    "KINDS",
    "RECORD_FILE",
    "Base",
    "LoraModel",
    "base_of",
    "build",
    "check_config",
    "check_same_model",
    "fingerprint",
    "for_sampling",
    "kind",
    "lora_train_step",
    "read_record",
    "record_base",
)
