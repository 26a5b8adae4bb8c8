"""Sample from a trained workdir's latest EMA checkpoint.

  python -m diffusion_jax.sample --workdir=runs/digits --num_samples=64 \
      [--sampler=ddim --num_steps=50 --eta=0 --guidance_scale=1 --labels=3 --npz=out.npz]

Writes a PNG grid (default <workdir>/samples/sample_<sampler>.png) and optionally the raw
samples as uint8 images with their class labels to an .npz (keys: images, labels) for
outside evaluation.
"""
import os
import sys

import jax
import numpy as np
from absl import app, flags

from diffusion_jax import data, metrics, schedules, steps, train
from diffusion_jax.checkpoint import Checkpointer
from diffusion_jax.models import build_model
from diffusion_jax.state import abstract_train_state, make_optimizer

flags.DEFINE_string("workdir", None, "A workdir written by diffusion_jax.main.")
flags.DEFINE_integer("num_samples", 64, "How many samples.")
flags.DEFINE_integer("batch_size", 256, "Samples per compiled call.")
flags.DEFINE_string("sampler", None, "ddim | ddpm (default: the workdir config's).")
flags.DEFINE_integer("num_steps", None, "DDIM steps (default: config's).")
flags.DEFINE_float("eta", None, "DDIM eta (default: config's).")
flags.DEFINE_string("spacing", None, "DDIM timestep spacing (default: config's).")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (default: config's).")
flags.DEFINE_string("labels", "", "Comma-separated class labels cycled over samples "
                    "(default: 0..num_classes-1 cycled). Class-conditional models only.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", "", "PNG path (default <workdir>/samples/sample_<sampler>.png).")
flags.DEFINE_string("npz", "", "If set, also write uint8 images + labels to this .npz.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def load_ema_params(config, workdir: str):
    """EMA params of the latest checkpoint in ``workdir`` (on the default device)."""
    spec = data.dataset_spec(config.data)
    model = build_model(config.model)
    tx = make_optimizer(config.optim, config.train.num_steps)
    abstract = abstract_train_state(model, tx, spec.image_shape, config.seed,
                                    conditional=config.model.num_classes > 0)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            abstract)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    restored = ckpt.restore(abstract)
    ckpt.close()
    if restored is None:
        raise train.ConfigError(f"no checkpoint in {workdir}/checkpoints: train first")
    state, _ = restored
    return model, spec, state.ema_params, int(state.step)


def parse_labels(text: str, n: int, num_classes: int) -> np.ndarray:
    if not text:
        return train.sample_labels(num_classes, n)
    if num_classes == 0:
        raise train.ConfigError("--labels given but the model is unconditional")
    labels = np.array([int(x) for x in text.split(",")], np.int32)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise train.ConfigError(f"--labels must be in 0..{num_classes - 1}")
    return np.resize(labels, n)


def main(argv):
    del argv
    try:
        config = train.load_config(FLAGS.workdir)
        for key in ("sampler", "num_steps", "eta", "spacing", "guidance_scale"):
            value = getattr(FLAGS, key)
            if value is not None:
                config.sampler["name" if key == "sampler" else key] = value
        model, spec, params, step = load_ema_params(config, FLAGS.workdir)
        labels = parse_labels(FLAGS.labels, FLAGS.num_samples, config.model.num_classes)
    except (train.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    schedule = schedules.make_schedule(config.schedule.name, config.schedule.num_timesteps,
                                       zero_terminal_snr=config.schedule.zero_terminal_snr)
    bs = min(FLAGS.batch_size, FLAGS.num_samples)
    sample_fn = jax.jit(steps.make_sample_fn(model, schedule, config, (bs, *spec.image_shape)))
    chunks = []
    for i, start in enumerate(range(0, FLAGS.num_samples, bs)):
        chunk_labels = np.resize(labels[start:start + bs], bs)  # pad the last chunk
        rng = jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), i)
        chunks.append(np.asarray(sample_fn(params, rng, chunk_labels,
                                           config.sampler.guidance_scale)))
    images = np.concatenate(chunks)[:FLAGS.num_samples]
    name = config.sampler.name + (f"{config.sampler.num_steps}" if config.sampler.name == "ddim"
                                  else "")
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples", f"sample_{name}.png")
    metrics.save_png(out, metrics.make_grid(images, upscale=max(1, 32 // spec.image_shape[0])))
    print(f"wrote {out} ({FLAGS.num_samples} samples, step {step}, sampler {name}, "
          f"eta {config.sampler.eta}, guidance {config.sampler.guidance_scale})")
    if FLAGS.npz:
        np.savez(FLAGS.npz, images=metrics.to_uint8(images), labels=labels)
        print(f"wrote {FLAGS.npz}")


if __name__ == "__main__":
    app.run(main)
