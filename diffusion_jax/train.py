"""The training loop: builds the pieces from the config, then steps, logs, samples and
checkpoints. What is trained (a denoiser or an autoencoder: its train step, sample grid and
in-loop metrics) comes from tasks.py; all math lives in steps.py / objectives.py /
autoencoding.py, all parallelism in parallel.py, the workdir's config and checkpoints in
workdir.py, sampling in generate.py.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from diffusion_jax import (
    adapters,
    data,
    evaluation,
    metrics,
    parallel,
    runtime,
    schedules,
    tasks,
    workdir,
)
from diffusion_jax.lock import WorkdirLock
from diffusion_jax.preemption import Interrupted, PreemptionHandler
from diffusion_jax.state import (
    complete_params,
    create_train_state,
    make_lr_schedule,
    make_optimizer,
    state_from_params,
)

log = logging.getLogger(__name__)


# Metrics every train step returns that flush_metrics logs its own way.
_LOOP_METRICS = {"loss", "grad_norm", "finite", "loss_bucket_sum", "loss_bucket_count"}


class NonFiniteError(FloatingPointError):
    pass


def train_and_evaluate(config, workdir_path: str):
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint) and return the
    final canonical TrainState; its step is below ``train.num_steps`` when the run was
    preempted. Everything that can be refused is checked before anything is written or
    compiled: the config (keys, values, shapes), the workdir (writable, not in use by
    another run, and on a resume: the same config in every key that may not change)."""
    try:
        spec = data.dataset_spec(config.data)
    except ValueError as e:  # a bad data config: one line, like every other config error
        raise workdir.ConfigError(str(e)) from None
    workdir.check_config(config, spec)
    workdir.ensure_writable_dir(workdir_path, "--workdir")
    with WorkdirLock(workdir_path):
        if workdir.has_checkpoints(workdir_path):
            workdir.check_resume(config, workdir_path)
        if adapters.kind(config):  # which base this run adapts: recorded, or checked
            adapters.record_base(workdir_path, adapters.base_of(config, workdir_path))
        runtime.setup_compilation_cache(config.train.compilation_cache_dir)
        return _train(config, workdir_path, spec)


def _train(config, workdir_path: str, spec: data.DatasetSpec):
    model = adapters.build(config, workdir_path)
    schedule = schedules.build(config.schedule)
    num_steps = config.train.num_steps
    tx = make_optimizer(config.optim, num_steps)
    lr_at = make_lr_schedule(config.optim, num_steps)
    dp = parallel.DataParallel(config.train.parallel, parallel.make_mesh())
    task = tasks.task_of(config)

    ckpt = workdir.checkpointer(workdir_path, config)
    restored = workdir.restore_state(ckpt, config, model, tx, spec, dp.state_sharding)
    workdir.save_config(config, workdir_path)  # the resume is valid: record its config
    clock = metrics.TrainClock()
    process_batch = config.train.batch_size // jax.process_count()
    it = data.create_train_iterator(
        config.data,
        batch_size=process_batch,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        **task.batch_fields(config),
    )
    if restored is None and (start := task.initial_params(config)) is not None:
        start = complete_params(model, start, spec.image_shape, config.seed)
        state = jax.device_put(state_from_params(start, tx, config.seed), dp.state_sharding)
    elif restored is None:
        state = create_train_state(
            model, tx, spec.image_shape, config.seed, out_sharding=dp.state_sharding
        )
    else:
        state, extra = restored
        if "data" in extra:  # not in an imported checkpoint: its data stream starts afresh
            it.set_state(extra["data"])
        clock.resume(extra.get("train_seconds", 0.0))
        log.info("resumed from step %d", int(state.step))

    k = config.train.steps_per_dispatch
    train_step = dp.compile(
        lambda axis: task.train_step(model, tx, schedule, config, axis_name=axis),
        k,
        frozen=task.frozen(config, model),
    )
    grid_images = task.grid(config, model, schedule, spec, dp.mesh)
    writer = metrics.MetricWriter(
        os.path.join(workdir_path, "tensorboard"), os.path.join(workdir_path, "metrics.jsonl")
    )
    step = int(state.step)
    progress = metrics.Progress(num_steps, start=step, quiet=config.train.quiet)
    dstate = dp.put_state(state)
    del state  # donated into the first step
    pending, last_log, compiled = [], time.time(), False
    outcome = {"loss": None, "samples": None, "preempted": False}

    def flush_metrics():
        """Fetch pending step metrics, stop on non-finite values, log averages."""
        nonlocal pending, last_log
        if not pending:
            return
        ms = [dp.get_metrics(m) for m in pending]
        ms = [
            jax.tree.map(lambda x: x.reshape(-1, *x.shape[1:]) if k > 1 else x[None], m) for m in ms
        ]
        m = jax.tree.map(lambda *xs: np.concatenate(xs), *ms)
        first = step - len(m["loss"]) + 1
        bad = np.flatnonzero(m["finite"] == 0)
        if bad.size:
            raise NonFiniteError(
                f"non-finite loss or gradient at step {first + bad[0]} (loss "
                f"{m['loss'][bad[0]]}); that update was skipped and no bad state was saved. "
                f"Lower optim.learning_rate or check the data."
            )
        elapsed = time.time() - last_log
        n = len(m["loss"])
        scalars = {
            "train/loss": m["loss"].mean(),
            "train/grad_norm": m["grad_norm"].mean(),
            "train/learning_rate": float(lr_at(step)),
            "train/steps_per_sec": n / elapsed,
            "train/images_per_sec": n * config.train.batch_size / elapsed,
        }
        if "loss_bucket_sum" in m:  # diffusion: the loss per timestep bucket
            sums, counts = m["loss_bucket_sum"].sum(0), m["loss_bucket_count"].sum(0)
            for b in range(len(sums)):
                if counts[b]:
                    scalars[f"loss_by_t/bucket_{b}"] = sums[b] / counts[b]
        for key in sorted(set(m) - _LOOP_METRICS):  # task-specific means (autoencoder)
            scalars[f"train/{key}"] = m[key].mean()
        writer.scalars(step, scalars)
        progress.update(step, loss=float(m["loss"].mean()))
        pending, last_log = [], time.time()
        outcome["loss"] = float(m["loss"].mean())

    quality = None
    if config.eval.metrics_every_steps:
        with clock.paused():  # the feature net, reference stats and floor: measuring costs
            quality = task.quality(config, model, schedule, dp.mesh)

    def save(force: bool):
        flush_metrics()
        # orbax copies to host before save() returns, so donating dstate in the next
        # step is safe (tests/test_checkpoint.py deletes the buffers to check)
        extra = {"data": it.get_state(), "train_seconds": clock.seconds()}
        ckpt.save(step, dp.get_state(dstate), extra=extra, force=force)

    def write_samples(interrupt):
        """The task's grid (samples; autoencoders: held-out images and reconstructions)."""
        images = grid_images(dp.get_state(dstate).ema_params, interrupt)
        grid = metrics.make_grid(images, upscale=max(1, 32 // images.shape[1]))
        path = os.path.join(workdir_path, "samples", f"step_{step:07d}.png")
        if jax.process_index() == 0:
            metrics.save_png(path, grid)
            writer.image(step, "samples/ema", grid)
        return path

    with PreemptionHandler() as should_stop:
        interrupt = lambda: should_stop.received  # polled while sampling (single-process)
        while step < num_steps:
            batches = [next(it) for _ in range(k)]
            batch = batches[0] if k == 1 else jax.tree.map(lambda *xs: np.stack(xs), *batches)
            batch = dp.put_batch(batch, k)
            if not compiled:
                parallel.precompile_and_sync(train_step, dstate, batch, name="train_step")
                runtime.release_freed_memory()  # the compiler's, before the step allocates
                compiled = True
            dstate, m = train_step(dstate, batch)
            pending.append(m)
            step += k
            stop = should_stop(step)
            final = step == num_steps
            if step % config.train.log_every_steps == 0 or final or stop:
                flush_metrics()
            if step % config.ckpt.every_steps == 0 or final or stop:
                save(force=stop)
            if stop:
                log.warning("preempted (SIGTERM): saved step %d, exiting", step)
                outcome["preempted"] = True
                break
            try:
                grid_due = final or (
                    config.eval.every_steps and step % config.eval.every_steps == 0
                )
                if grid_images is not None and grid_due:  # guides have no images to show
                    with clock.paused():
                        outcome["samples"] = write_samples(interrupt)
                if quality and (final or step % config.eval.metrics_every_steps == 0):
                    train_seconds = clock.seconds()
                    with clock.paused():
                        record = quality(dp.get_state(dstate).ema_params, step, interrupt)
                    record["train_seconds"] = round(train_seconds, 1)
                    writer.scalars(step, evaluation.tensorboard_scalars(record))
                    if jax.process_index() == 0:
                        evaluation.append_jsonl(os.path.join(workdir_path, "eval.jsonl"), record)
            except Interrupted as e:
                save(force=True)  # a no-op when this step is already saved
                ckpt.wait()
                log.warning("preempted (SIGTERM) while sampling: saved step %d, exiting", step)
                jax.block_until_ready(e.pending)  # exiting under a running batch crashes
                outcome["preempted"] = not final
                break
            if not pending:  # sampling/eval time does not count against steps/s
                last_log = time.time()
    ckpt.wait()
    ckpt.close()
    progress.close()
    writer.close()
    if jax.process_index() == 0:
        print(summary(workdir_path, step, num_steps, **outcome), flush=True)
    return dp.get_state(dstate)


def summary(workdir_path: str, step: int, num_steps: int, *, loss, samples, preempted) -> str:
    """The run's last lines: where everything is and what to run next."""
    head = (
        f"preempted at step {step}/{num_steps}; run the same command again to resume"
        if preempted
        else f"done: step {step}/{num_steps}"
    )
    if loss is not None:
        head += f", loss {loss:.4f} (mean over the last logged steps)"
    rows = [
        ("samples", samples),
        ("checkpoints", os.path.join(workdir_path, "checkpoints")),
        ("metrics", os.path.join(workdir_path, "metrics.jsonl")),
        ("TensorBoard", f"tensorboard --logdir {os.path.join(workdir_path, 'tensorboard')}"),
        (
            "sample more",
            f"python -m diffusion_jax.sample --workdir={workdir_path} --num_samples=64",
        ),
        (
            "evaluate",
            f"python -m diffusion_jax.evaluate --workdir={workdir_path} --num_samples=1000",
        ),
    ]
    return "\n".join([head] + [f"  {name + ':':<13}{value}" for name, value in rows if value])
