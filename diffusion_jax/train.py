"""The training loop: builds the pieces from the config, then steps, logs, samples and
checkpoints. All math lives in steps.py / objectives.py; all parallelism in parallel.py.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from diffusion_jax import (data, evaluation, metrics, objectives, parallel, samplers,
                           schedules, steps)
from diffusion_jax.checkpoint import Checkpointer, install_preemption_handler
from diffusion_jax.models import build_model, check_input_shape
from diffusion_jax.state import (abstract_train_state, create_train_state, make_lr_schedule,
                                 make_optimizer)

CONFIG_FILE = "config.json"


class ConfigError(ValueError):
    """A bad config value, reported as one line naming the fix (before any compile)."""


def setup_compilation_cache(cache_dir: str) -> None:
    """Persistent XLA cache, so a second run of the same config skips compilation."""
    if cache_dir == "off":
        return
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def check_config(config, spec: data.DatasetSpec) -> None:
    """Every check that can be made without compiling; raises ConfigError."""
    try:
        c = config
        objectives.check_choice("train.parallel", c.train.parallel, parallel.MODES)
        objectives.check_choice("objective.prediction", c.objective.prediction,
                                objectives.PREDICTIONS)
        objectives.check_choice("objective.weighting", c.objective.weighting, objectives.WEIGHTINGS)
        objectives.check_choice("sampler.name", c.sampler.name, steps.SAMPLERS)
        objectives.check_choice("sampler.spacing", c.sampler.spacing, samplers.SPACINGS)
        objectives.check_choice("schedule.name", c.schedule.name, sorted(schedules.SCHEDULES))
        for key in ("train.num_steps", "train.batch_size", "train.steps_per_dispatch",
                    "train.log_every_steps", "ckpt.every_steps", "ckpt.keep",
                    "eval.num_samples"):
            section, name = key.split(".")
            if c[section][name] < 1:
                raise ValueError(f"{key} must be >= 1, got {c[section][name]}")
        k = c.train.steps_per_dispatch
        for key, value in (("train.num_steps", c.train.num_steps),
                           ("ckpt.every_steps", c.ckpt.every_steps),
                           ("eval.every_steps", c.eval.every_steps),
                           ("eval.metrics_every_steps", c.eval.metrics_every_steps),
                           ("train.log_every_steps", c.train.log_every_steps)):
            if value % k:
                raise ValueError(f"{key}={value} is not a multiple of "
                                 f"train.steps_per_dispatch={k}; make it one")
        parallel.check_batch_size(c.train.batch_size, jax.device_count())
        if c.model.num_classes not in (0, spec.num_classes):
            raise ValueError(f"model.num_classes={c.model.num_classes} but dataset "
                             f"{spec.name!r} has {spec.num_classes} classes; set it to 0 "
                             f"(unconditional) or {spec.num_classes}")
        if not 1 <= c.sampler.num_steps <= c.schedule.num_timesteps:
            raise ValueError(f"sampler.num_steps={c.sampler.num_steps} must be in "
                             f"1..schedule.num_timesteps={c.schedule.num_timesteps}")
        check_input_shape(c.model, spec.image_shape[0], spec.image_shape[2])
        if (k > 1 and c.model.name == "unet" and c.model.unet.conv_impl == "xla"
                and jax.default_backend() == "cpu"):
            logging.warning("train.steps_per_dispatch=%d with model.unet.conv_impl='xla' is "
                            "~38x slower on CPU (XLA:CPU runs autodiff conv gradients inside "
                            "lax.scan as naive loops); set model.unet.conv_impl=explicit_grad", k)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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


def load_state(workdir: str, config=None, step: Optional[int] = None):
    """A workdir's checkpointed TrainState (latest, or ``step``) on the default device,
    with the model and dataset spec it was trained with: (model, spec, state)."""
    config = config or load_config(workdir)
    spec = data.dataset_spec(config.data)
    model = build_model(config.model)
    tx = make_optimizer(config.optim, config.train.num_steps)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        abstract_train_state(model, tx, spec.image_shape, config.seed,
                             conditional=config.model.num_classes > 0))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    restored = ckpt.restore(abstract, step=step)
    ckpt.close()
    if restored is None:
        raise ConfigError(f"no checkpoint in {workdir}/checkpoints: train first")
    return model, spec, restored[0]


class NonFiniteError(FloatingPointError):
    pass


def make_quality_eval(config, model, schedule, dp: parallel.DataParallel):
    """``quality(ema_params, step) -> record`` of FID/KID/precision/recall (and class
    accuracy) for ``eval.metrics_num_samples`` samples from a fixed seed, sampled
    data-parallel over the mesh; the record carries N, seed, sampler, steps, eta and
    guidance scale (a FID means nothing without them)."""
    spec = data.dataset_spec(config.data)
    extractor = evaluation.make_extractor(config.data, cache_dir=config.eval.cache_dir,
                                          inception_weights=config.eval.inception_weights)
    ref = evaluation.reference_stats(extractor, config.data, "train", config.eval.cache_dir)
    n = config.eval.metrics_num_samples
    batch = -(-min(n, 500) // dp.mesh.size) * dp.mesh.size
    sample_fn = steps.make_sample_fn(model, schedule, config, (batch, *spec.image_shape))

    def quality(params, step: int) -> dict:
        return evaluation.evaluate_sampler(
            sample_fn, params, extractor, ref, num_samples=n, batch_size=batch,
            seed=config.eval.metrics_seed, num_classes=config.model.num_classes,
            guidance_scale=config.sampler.guidance_scale, mesh=dp.mesh,
            matched_num_samples=min(n, ref.n // 2),
            info={**evaluation.sampler_info(config), "step": step})

    return quality


def make_sharded_sample_fn(model, schedule, config, spec, dp: parallel.DataParallel):
    """The configured sampler, jitted with its batch sharded over all devices (of all
    processes): each device denoises its own slice through the whole lax.scan. The batch
    is padded to a multiple of the device count; returns (sample_fn, padded size)."""
    n_dev = dp.mesh.size
    n = -(-config.eval.num_samples // n_dev) * n_dev
    fn = steps.make_sample_fn(model, schedule, config, (n, *spec.image_shape))
    return jax.jit(fn, out_shardings=parallel.batch_sharding(dp.mesh)), n


def train_and_evaluate(config, workdir: str):
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint) and return the
    final canonical TrainState."""
    setup_compilation_cache(config.train.compilation_cache_dir)
    spec = data.dataset_spec(config.data)
    check_config(config, spec)
    os.makedirs(workdir, exist_ok=True)
    save_config(config, workdir)

    model = build_model(config.model)
    schedule = schedules.make_schedule(config.schedule.name, config.schedule.num_timesteps,
                                       zero_terminal_snr=config.schedule.zero_terminal_snr)
    num_steps = config.train.num_steps
    tx = make_optimizer(config.optim, num_steps)
    lr_at = make_lr_schedule(config.optim, num_steps)
    dp = parallel.DataParallel(config.train.parallel, parallel.make_mesh())
    conditional = config.model.num_classes > 0

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.ckpt.keep,
                        async_save=config.ckpt.async_save)
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dp.state_sharding),
        abstract_train_state(model, tx, spec.image_shape, config.seed, conditional=conditional))
    restored = ckpt.restore(abstract)
    process_batch = config.train.batch_size // jax.process_count()
    it = data.create_train_iterator(config.data, batch_size=process_batch, seed=config.seed,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    if restored is None:
        state = create_train_state(model, tx, spec.image_shape, config.seed,
                                   conditional=conditional, out_sharding=dp.state_sharding)
    else:
        state, extra = restored
        it.set_state(extra["data"])
        logging.info("resumed from step %d", int(state.step))

    k = config.train.steps_per_dispatch
    train_step = dp.compile(
        lambda axis: steps.make_train_step(model, tx, schedule, config, axis_name=axis), k)
    n_samples = config.eval.num_samples
    sample_fn, n_padded = make_sharded_sample_fn(model, schedule, config, spec, dp)
    writer = metrics.MetricWriter(os.path.join(workdir, "tensorboard"),
                                  os.path.join(workdir, "metrics.jsonl"))
    step = int(state.step)
    progress = metrics.Progress(num_steps, start=step, quiet=config.train.quiet)
    dstate = dp.put_state(state)
    del state  # donated into the first step
    pending, last_log, compiled = [], time.time(), False

    def flush_metrics():
        """Fetch pending step metrics, stop on non-finite values, log averages."""
        nonlocal pending, last_log
        if not pending:
            return
        ms = [dp.get_metrics(m) for m in pending]
        ms = [jax.tree.map(lambda x: x.reshape(-1, *x.shape[1:]) if k > 1 else x[None], m)
              for m in ms]
        m = jax.tree.map(lambda *xs: np.concatenate(xs), *ms)
        first = step - len(m["loss"]) + 1
        bad = np.flatnonzero(m["finite"] == 0)
        if bad.size:
            raise NonFiniteError(
                f"non-finite loss or gradient at step {first + bad[0]} (loss "
                f"{m['loss'][bad[0]]}); that update was skipped and no bad state was saved. "
                f"Lower optim.learning_rate or check the data.")
        elapsed = time.time() - last_log
        n = len(m["loss"])
        scalars = {"train/loss": m["loss"].mean(), "train/grad_norm": m["grad_norm"].mean(),
                   "train/learning_rate": float(lr_at(step)),
                   "train/steps_per_sec": n / elapsed,
                   "train/images_per_sec": n * config.train.batch_size / elapsed}
        sums, counts = m["loss_bucket_sum"].sum(0), m["loss_bucket_count"].sum(0)
        for b in range(steps.NUM_LOSS_BUCKETS):
            if counts[b]:
                scalars[f"loss_by_t/bucket_{b}"] = sums[b] / counts[b]
        writer.scalars(step, scalars)
        progress.update(step, loss=float(m["loss"].mean()))
        pending, last_log = [], time.time()

    quality = make_quality_eval(config, model, schedule, dp) \
        if config.eval.metrics_every_steps else None

    def write_samples():
        params = dp.get_state(dstate).ema_params
        images = sample_fn(params, jax.random.PRNGKey(config.seed + 1),
                           evaluation.class_balanced_labels(config.model.num_classes, n_padded),
                           config.sampler.guidance_scale)
        images = parallel.gather_to_host(images, name=f"samples:{step}")[:n_samples]
        grid = metrics.make_grid(images, upscale=max(1, 32 // spec.image_shape[0]))
        if jax.process_index() == 0:
            metrics.save_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"), grid)
            writer.image(step, "samples/ema", grid)

    with install_preemption_handler() as should_stop:
        while step < num_steps:
            batches = [next(it) for _ in range(k)]
            batch = batches[0] if k == 1 else jax.tree.map(lambda *xs: np.stack(xs), *batches)
            batch = dp.put_batch(batch, k)
            if not compiled:
                parallel.precompile_and_sync(train_step, dstate, batch, name="train_step")
                compiled = True
            dstate, m = train_step(dstate, batch)
            pending.append(m)
            step += k
            stop = should_stop(step)
            final = step == num_steps
            if step % config.train.log_every_steps == 0 or final or stop:
                flush_metrics()
            if step % config.ckpt.every_steps == 0 or final or stop:
                flush_metrics()
                # orbax copies to host before save() returns, so donating dstate in the
                # next step is safe (tests/test_checkpoint.py deletes the buffers to check)
                ckpt.save(step, dp.get_state(dstate), extra={"data": it.get_state()},
                          force=stop)
            if stop:
                logging.warning("preempted (SIGTERM): saved step %d, exiting", step)
                break
            if final or (config.eval.every_steps and step % config.eval.every_steps == 0):
                write_samples()
            if quality and (final or step % config.eval.metrics_every_steps == 0):
                record = quality(dp.get_state(dstate).ema_params, step)
                writer.scalars(step, evaluation.tensorboard_scalars(record))
                if jax.process_index() == 0:
                    evaluation.append_jsonl(os.path.join(workdir, "eval.jsonl"), record)
            if not pending:  # sampling/eval time does not count against steps/s
                last_log = time.time()
    ckpt.wait()
    ckpt.close()
    progress.close()
    writer.close()
    return dp.get_state(dstate)
