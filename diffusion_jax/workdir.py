"""A run's working directory: its config file, config validation and restoring its state.

A workdir holds ``config.json`` (the config it was trained with), ``checkpoints/``,
``tensorboard/``, ``samples/``, ``metrics.jsonl`` and ``eval.jsonl``. The training loop and
every CLI that reads a workdir (sample, evaluate) go through this module, so a config is
checked the same way everywhere and a state is restored one way.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import json
import logging
import os
import tempfile
from typing import Optional

import jax
import ml_collections

from diffusion_jax import (
    adapters,
    conditioning,
    consistency,
    data,
    latent_space,
    objectives,
    parallel,
    samplers,
    schedules,
    timesteps,
    variance,
)
from diffusion_jax.checkpoint import Checkpointer
from diffusion_jax.models import check_input_shape
from diffusion_jax.state import abstract_train_state, make_optimizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# The dataset spec a workdir's model was built for, recorded where the dataset itself may
# be absent (imported weights: ``diffusion_jax.convert``); read instead of the dataset.
SPEC_FILE = "dataset_spec.json"


class ConfigError(ValueError):
    """A bad config value or CLI input, reported as one line naming the fix (before any
    compile)."""


def check_config(config, spec: data.DatasetSpec, *, training: bool = True) -> None:
    """Every check that can be made without compiling; raises ConfigError.

    ``training=False`` (sample, evaluate) skips what only matters to the training loop:
    keys against configs/base.py (an old workdir's config.json may predate a key), the
    global batch size against this machine's device count and the step multiples.
    """
    try:
        if training:
            check_keys(config)
        _check(config, spec, training)
        _check_ranges(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def flatten(config, prefix: str = "") -> dict:
    """{"train.num_steps": 3000, ...} with JSON-normal values (tuples as lists)."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def check_keys(config) -> None:
    """Every key of ``config`` must be declared in configs/base.py (a config file that
    sets ``c.train.nmu_steps`` would otherwise train the default job silently)."""
    from configs import base

    declared = flatten(base.get_config())
    for key in flatten(config):
        if key not in declared:
            close = difflib.get_close_matches(key, list(declared), n=1)
            raise ConfigError(
                f"unknown config key {key!r} (not declared in configs/base.py)"
                f"{f'; did you mean {close[0]!r}?' if close else ''}"
            )


# (key, low, high or None, low inclusive, high inclusive): values outside train silently
# or give NaN
_RANGES = (
    ("optim.learning_rate", 0.0, None, False, True),
    ("optim.warmup_steps", 0, None, True, True),
    ("optim.final_lr_fraction", 0.0, 1.0, True, True),
    ("optim.weight_decay", 0.0, None, True, True),
    ("optim.grad_clip_norm", 0.0, None, True, True),
    ("optim.b1", 0.0, 1.0, True, False),
    ("optim.b2", 0.0, 1.0, True, False),
    ("optim.eps", 0.0, None, False, True),
    ("optim.ema_decay", 0.0, 1.0, True, False),
    ("model.unet.dropout", 0.0, 1.0, True, False),
    ("objective.label_dropout", 0.0, 1.0, True, False),
    ("objective.min_snr_gamma", 0.0, None, False, True),
    ("sampler.eta", 0.0, None, True, True),
    ("sampler.guidance_scale", 0.0, None, True, True),
)


def _check_ranges(config) -> None:
    values = flatten(config)
    for key, low, high, low_in, high_in in _RANGES:
        v = values[key]
        ok = (v >= low if low_in else v > low) and (
            high is None or (v <= high if high_in else v < high)
        )
        if not ok:
            lo = f"{'[' if low_in else '('}{low}"
            hi = "inf)" if high is None else f"{high}{']' if high_in else ')'}"
            raise ValueError(f"{key}={v} is out of range: it must lie in {lo}, {hi}")


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
    conditioning.check_vocabulary(c)
    try:
        samplers.ddpm_num_steps(c.schedule.num_timesteps, c.sampler.respacing)
    except ValueError as e:
        raise ValueError(f"sampler.{e}") from None
    if not 1 <= c.sampler.num_steps <= c.schedule.num_timesteps:
        raise ValueError(
            f"sampler.num_steps={c.sampler.num_steps} must be in "
            f"1..schedule.num_timesteps={c.schedule.num_timesteps}"
        )
    s, schedule = c.sampler, schedules.build(c.schedule)
    ts = samplers.sampler_timesteps(  # a logsnr lambda_min must leave num_steps indices
        s.name,
        schedule.num_timesteps,
        s.num_steps,
        s.spacing,
        schedule.log_snr,
        s.respacing,
        s.lambda_min,
    )
    if c.objective.prediction == "eps" and not s.clip_x0 and s.name != "consistency":
        if warning := timesteps.low_start_warning(ts, schedule.log_snr, s.lambda_min):
            log.warning("%s", warning)
    check_input_shape(c.model, spec.image_shape[0], spec.image_shape[2])
    variance.check_learned_sigma(c, spec.image_shape[2])  # the channels the model sees
    latent_space.metadata_of(c)  # latent runs: the dataset was encoded by latent.autoencoder
    if training and "consistency" in c:
        consistency.check_config(c)
    if training and "adapter" in c:
        adapters.check_config(c)
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


# Keys that may differ between a run and its resume: how long to train, how often to
# log/checkpoint/evaluate, how to sample, where caches and data live, and how the (equal)
# math is laid out on devices. Everything else changes what is being trained.
RESUMABLE_KEYS = (
    "train.num_steps",
    "train.log_every_steps",
    "train.quiet",
    "train.compilation_cache_dir",
    "train.parallel",
    "train.steps_per_dispatch",
    "ckpt.every_steps",
    "ckpt.keep",
    "ckpt.async_save",
    "data.data_dir",
    "data.worker_count",
    "eval.*",
    "sampler.*",
)


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)


def check_resume(config, workdir: str) -> None:
    """Refuse to resume a workdir's checkpoints with a config that differs from its
    ``config.json`` in keys outside RESUMABLE_KEYS (one line listing them, old -> new).
    Call before anything is written: the workdir's record of how it was trained is only
    replaced once the resume is known to be valid."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = flatten(json.load(f))
    new = json.loads(config.to_json_best_effort())
    new = flatten(new)
    changed = [
        k for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")
    ]
    refused = [k for k in changed if not _resumable(k)]
    if refused:
        shown = ", ".join(
            f"{k} ({old.get(k, '<unset>')} -> {new.get(k, '<unset>')})" for k in refused[:6]
        )
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(
            f"{workdir} was trained with another config: {shown}{more} differ. Resume with "
            "the config in its config.json (only train.num_steps, logging, checkpoint, eval "
            "and sampler settings may change; see RESUMABLE_KEYS in diffusion_jax/workdir.py), "
            "or use a fresh --workdir"
        )
    if "train.num_steps" in changed and config.optim.decay != "constant":
        log.warning(
            "train.num_steps changed from %s to %s: the %s learning-rate decay is recomputed "
            "for the new length from step 0, so the rate jumps at the resume",
            old.get("train.num_steps"),
            config.train.num_steps,
            config.optim.decay,
        )
    if changed:
        log.info("resuming with changed %s", ", ".join(changed))


def ensure_writable_file(path: str, what: str, image: bool = False) -> None:
    """Raise ConfigError now, not after minutes of sampling, if the file ``path`` (flag
    ``what``) cannot be written: it is a directory, its directory is a file or not writable
    (created if missing: the probe needs it), or (``image``) PIL cannot write its
    extension."""
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a directory; give a file path")
    if image:
        from PIL import Image

        Image.init()
        ext = os.path.splitext(path)[1].lower()
        if Image.registered_extensions().get(ext) not in Image.SAVE:
            raise ConfigError(f"{what} {path!r}: unknown image extension {ext!r}; use .png")
    ensure_writable_dir(os.path.dirname(os.path.abspath(path)), f"{what}'s directory")


def save_config(config, workdir: str) -> None:
    """Write ``config.json`` atomically (a crash leaves the old record or the new one)."""
    if jax.process_index() == 0:
        path = os.path.join(workdir, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (lists restored to tuples for module attrs).
    Keys added to configs/base.py after it was written take their defaults, which keep
    what the run did (a new key's default is always the old behaviour)."""
    from configs import base

    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{path} not found: is {workdir!r} a diffusion_jax workdir?")
    with open(path) as f:
        raw = json.load(f)

    def merged(defaults, saved):
        if not isinstance(defaults, dict) or not isinstance(saved, dict):
            return saved
        out = dict(defaults)
        for key, value in saved.items():
            out[key] = merged(defaults.get(key), value)
        return out

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    return ml_collections.ConfigDict(tuples(merged(base.get_config().to_dict(), raw)))


def save_spec(spec: data.DatasetSpec, workdir: str) -> None:
    """Record the dataset spec the workdir's model was built for (see ``run_spec``)."""
    with open(os.path.join(workdir, SPEC_FILE), "w") as f:
        json.dump(dataclasses.asdict(spec), f, indent=2)


def run_spec(workdir: str, config) -> data.DatasetSpec:
    """The workdir's recorded dataset spec if it has one (imported weights), else the spec
    of ``config.data`` (which opens the dataset)."""
    path = os.path.join(workdir, SPEC_FILE)
    if not os.path.exists(path):
        return data.dataset_spec(config.data)
    with open(path) as f:
        recorded = json.load(f)
    recorded["image_shape"] = tuple(recorded["image_shape"])
    return data.DatasetSpec(**recorded)


def has_checkpoints(workdir: str) -> bool:
    """Whether the workdir holds any finalized checkpoint step (cheap: no orbax)."""
    path = os.path.join(workdir, CHECKPOINT_DIR)
    return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def require_checkpoint(workdir: str) -> None:
    """Raise ConfigError (before any directory is created) if there is nothing to load."""
    if not has_checkpoints(workdir):
        raise _no_checkpoint(workdir)


def _no_checkpoint(workdir: str) -> ConfigError:
    return ConfigError(f"no checkpoint in {workdir}/{CHECKPOINT_DIR}: train first")


def checkpointer(workdir: str, config=None, *, read_only: bool = False) -> Checkpointer:
    """The workdir's checkpoint manager (``config`` given: with its ckpt options;
    ``read_only``: for sample/evaluate, creates nothing)."""
    options = (
        {} if config is None else dict(keep=config.ckpt.keep, async_save=config.ckpt.async_save)
    )
    return Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), read_only=read_only, **options)


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
        abstract_train_state(model, tx, spec.image_shape, config.seed),
    )
    try:
        return ckpt.restore(abstract, step=step)
    except ValueError as e:  # the checkpoint's tree/shapes differ: another model/optimizer
        raise ConfigError(str(e)) from None


def load_state(workdir: str, config=None, step: Optional[int] = None):
    """A workdir's checkpointed TrainState (latest, or ``step``) on the default device,
    with the model and dataset spec it was trained with: (model, spec, state). A LoRA
    workdir's model is its ``adapted.LoraModel`` and its state holds the LoRA only
    (``adapters.for_sampling`` gives the merged weights)."""
    config = config or load_config(workdir)
    spec = run_spec(workdir, config)
    model = adapters.build(config, workdir)
    tx = make_optimizer(config.optim, config.train.num_steps)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with checkpointer(workdir, read_only=True) as ckpt:
        restored = restore_state(ckpt, config, model, tx, spec, sharding, step)
    if restored is None:
        raise _no_checkpoint(workdir)
    return model, spec, restored[0]
