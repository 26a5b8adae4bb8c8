"""A run's working directory: its config file, config validation and restoring its state.

A workdir holds ``config.json`` (the config it was trained with), ``checkpoints/``,
``tensorboard/``, ``samples/``, ``metrics.jsonl`` and ``eval.jsonl``. The training loop and
every CLI that reads a workdir (sample, evaluate) go through this module, so a config is
checked the same way everywhere and a state is restored one way.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from typing import Optional

import jax
import ml_collections

from diffusion_jax import data, objectives, parallel, samplers, schedules, timesteps
from diffusion_jax.checkpoint import Checkpointer
from diffusion_jax.models import build_model, check_input_shape
from diffusion_jax.state import abstract_train_state, make_optimizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class ConfigError(ValueError):
    """A bad config value or CLI input, reported as one line naming the fix (before any
    compile)."""


def check_config(config, spec: data.DatasetSpec, *, training: bool = True) -> None:
    """Every check that can be made without compiling; raises ConfigError.

    ``training=False`` (sample, evaluate) skips what only matters to the training loop:
    the global batch size against this machine's device count and the step multiples.
    """
    try:
        _check(config, spec, training)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check(c, spec: data.DatasetSpec, training: bool) -> None:
    check_choice = objectives.check_choice
    check_choice("train.parallel", c.train.parallel, parallel.MODES)
    check_choice("objective.prediction", c.objective.prediction, objectives.PREDICTIONS)
    check_choice("objective.weighting", c.objective.weighting, objectives.WEIGHTINGS)
    check_choice("sampler.name", c.sampler.name, samplers.SAMPLERS)
    check_choice("sampler.spacing", c.sampler.spacing, timesteps.SPACINGS)
    check_choice("schedule.name", c.schedule.name, sorted(schedules.SCHEDULES))
    for key in (
        "train.num_steps",
        "train.batch_size",
        "train.steps_per_dispatch",
        "train.log_every_steps",
        "ckpt.every_steps",
        "ckpt.keep",
        "eval.num_samples",
    ):
        section, name = key.split(".")
        if c[section][name] < 1:
            raise ValueError(f"{key} must be >= 1, got {c[section][name]}")
    if training:
        k = c.train.steps_per_dispatch
        for key, value in (
            ("train.num_steps", c.train.num_steps),
            ("ckpt.every_steps", c.ckpt.every_steps),
            ("eval.every_steps", c.eval.every_steps),
            ("eval.metrics_every_steps", c.eval.metrics_every_steps),
            ("train.log_every_steps", c.train.log_every_steps),
        ):
            if value % k:
                raise ValueError(
                    f"{key}={value} is not a multiple of train.steps_per_dispatch={k}; make it one"
                )
        parallel.check_batch_size(c.train.batch_size, jax.device_count())
    if c.model.num_classes not in (0, spec.num_classes):
        raise ValueError(
            f"model.num_classes={c.model.num_classes} but dataset "
            f"{spec.name!r} has {spec.num_classes} classes; set it to 0 "
            f"(unconditional) or {spec.num_classes}"
        )
    if not 1 <= c.sampler.num_steps <= c.schedule.num_timesteps:
        raise ValueError(
            f"sampler.num_steps={c.sampler.num_steps} must be in "
            f"1..schedule.num_timesteps={c.schedule.num_timesteps}"
        )
    check_input_shape(c.model, spec.image_shape[0], spec.image_shape[2])
    if (
        training
        and c.train.steps_per_dispatch > 1
        and c.model.name == "unet"
        and c.model.unet.conv_impl == "xla"
        and jax.default_backend() == "cpu"
    ):
        log.warning(
            "train.steps_per_dispatch=%d with model.unet.conv_impl='xla' is ~38x "
            "slower on CPU (XLA:CPU runs autodiff conv gradients inside lax.scan "
            "as naive loops); set model.unet.conv_impl=explicit_grad",
            c.train.steps_per_dispatch,
        )


def ensure_writable_dir(path: str, what: str) -> None:
    """Create directory ``path`` if needed and prove it takes a file, or raise ConfigError
    naming ``what`` (e.g. "--workdir") and the fix: a path that is a file, a read-only file
    system, no permission, no space. Run it before any compile or sampling, so a run never
    computes for minutes and then cannot write its result."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except FileExistsError:
        raise ConfigError(
            f"{what} {path!r}: a file is in the way (it must be a directory); "
            "choose another path or move the file"
        ) from None
    except OSError as e:
        reason = {
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.ENOSPC: "no space left on the device",
            errno.ENOTDIR: "a file is in the way (a parent is not a directory)",
        }.get(e.errno, e.strerror or str(e))
        raise ConfigError(
            f"{what} {path!r} is not writable ({reason}); choose a writable location"
        ) from None


def save_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (lists restored to tuples for module attrs)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{path} not found: is {workdir!r} a diffusion_jax workdir?")
    with open(path) as f:
        raw = json.load(f)

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    return ml_collections.ConfigDict(tuples(raw))


def checkpointer(workdir: str, config=None) -> Checkpointer:
    """The workdir's checkpoint manager (``config`` given: with its ckpt options)."""
    options = (
        {} if config is None else dict(keep=config.ckpt.keep, async_save=config.ckpt.async_save)
    )
    return Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), **options)


def restore_state(
    ckpt: Checkpointer,
    config,
    model,
    tx,
    spec: data.DatasetSpec,
    sharding,
    step: Optional[int] = None,
):
    """``(TrainState, extra)`` of the latest (or ``step``) checkpoint, every array placed
    on ``sharding``; None when there is no checkpoint yet."""
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        abstract_train_state(
            model, tx, spec.image_shape, config.seed, conditional=config.model.num_classes > 0
        ),
    )
    return ckpt.restore(abstract, step=step)


def load_state(workdir: str, config=None, step: Optional[int] = None):
    """A workdir's checkpointed TrainState (latest, or ``step``) on the default device,
    with the model and dataset spec it was trained with: (model, spec, state)."""
    config = config or load_config(workdir)
    spec = data.dataset_spec(config.data)
    model = build_model(config.model)
    tx = make_optimizer(config.optim, config.train.num_steps)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with checkpointer(workdir) as ckpt:
        restored = restore_state(ckpt, config, model, tx, spec, sharding, step)
    if restored is None:
        raise ConfigError(f"no checkpoint in {workdir}/{CHECKPOINT_DIR}: train first")
    return model, spec, restored[0]
