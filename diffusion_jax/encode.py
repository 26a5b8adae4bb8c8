r"""Encode a dataset with a trained autoencoder into a latent dataset.

  python -m diffusion_jax.encode --autoencoder=runs/fashion_ae --out=runs/fashion_latents \
      [--dataset=fashion_mnist --data_dir=DIR --splits=train,test --posterior=mean]

Reads every image of each split (the autoencoder's data config: its dataset, image size
and resize method, unless --dataset/--data_dir say otherwise), encodes it with the
autoencoder's EMA parameters, and writes a TFDS latent dataset to --out
(``diffusion_jax/datasets/latents.py`` describes it), with the labels (and captions) carried along and
the train split's per-channel statistics and measured ``scale_factor`` in latents.json.
Train a diffusion model on it with ``--config.data.name=latents
--config.data.data_dir=OUT --config.latent.autoencoder=AUTOENCODER_WORKDIR``.

Encoding runs in chunks of --chunk_size images, each a file under OUT/chunks: an
interrupted run resumes where it stopped (finished chunks are kept), and with several
processes (jax.distributed) process p encodes chunks p, p + P, ...; every chunk is
sharded over the process's local devices. ``--posterior=sample`` draws z ~ q(z | x) with
the noise of image i keyed by (--seed, split, i), so any layout gives the same latents.
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from diffusion_jax import cli

FLAGS = flags.FlagValues()
OWN = dict(flag_values=FLAGS)
flags.DEFINE_string("autoencoder", None, "Workdir of a trained autoencoder.", **OWN)
flags.DEFINE_string("out", None, "Directory of the latent dataset to write.", **OWN)
flags.DEFINE_string("dataset", "", "Source dataset (default: the autoencoder's).", **OWN)
flags.DEFINE_string("data_dir", "", "Source data dir (default: the autoencoder's).", **OWN)
flags.DEFINE_list("splits", ["train", "test"], "Splits to encode.", **OWN)
flags.DEFINE_enum("posterior", "mean", ["mean", "sample"], "Latent: mean or a sample.", **OWN)
flags.DEFINE_integer("batch_size", 256, "Images per compiled encoder call.", **OWN)
flags.DEFINE_integer("chunk_size", 4096, "Images per chunk file (the resume unit).", **OWN)
flags.DEFINE_integer("seed", 0, "Noise seed of --posterior=sample.", **OWN)
flags.mark_flags_as_required(["autoencoder", "out"], flag_values=FLAGS)


def _encoder(model, params, posterior: str, batch_size: int, seed: int):
    """``encode(images, split_id, index) -> latents``, jitted once, each batch sharded over
    this process's devices (padded to a multiple of their count)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from diffusion_jax import autoencoding

    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("batch",))
    sharded = NamedSharding(mesh, PartitionSpec("batch"))
    batch = -(-batch_size // len(devices)) * len(devices)
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))

    @jax.jit
    def fn(params, x, keys):
        mean, logvar = autoencoding.encode(model, params, x)
        if posterior == "mean":
            return mean
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
        return mean + jnp.exp(0.5 * logvar) * noise

    def encode(images, split_id: int, index):
        out = []
        for start in range(0, len(images), batch):
            x = images[start : start + batch]
            idx = index[start : start + batch]
            n = len(x)
            x = np.resize(x, (batch, *x.shape[1:]))
            idx = np.resize(idx, batch)
            base = jax.random.fold_in(jax.random.key(seed), split_id)
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(idx))
            z = fn(params, jax.device_put(x, sharded), jax.device_put(keys, sharded))
            out.append(np.asarray(z)[:n])
        return np.concatenate(out).astype(np.float32)

    return encode


def channel_statistics(data_dir: str, split: str) -> dict:
    """Per-channel mean/std and the overall std of a split's encoded chunks (float64)."""
    from diffusion_jax.datasets import latents

    count, total, total_sq = 0, 0.0, 0.0
    for path in latents.chunk_files(data_dir, split):
        with np.load(path) as chunk:
            z = chunk["latent"].astype(np.float64)
        z = z.reshape(-1, z.shape[-1])
        count += len(z)
        total = total + z.sum(0)
        total_sq = total_sq + np.square(z).sum(0)
    mean = total / count
    var = total_sq / count - np.square(mean)
    overall_mean = mean.mean()
    overall_var = (total_sq.sum() / (count * len(mean))) - overall_mean**2
    return {
        "channel_mean": [float(m) for m in mean],
        "channel_std": [float(s) for s in np.sqrt(var)],
        "mean": float(overall_mean),
        "std": float(np.sqrt(overall_var)),
    }


def run(
    autoencoder: str,
    out: str,
    *,
    dataset: str = "",
    data_dir: str = "",
    splits=("train", "test"),
    posterior: str = "mean",
    batch_size: int = 256,
    chunk_size: int = 4096,
    seed: int = 0,
) -> dict:
    """Encode (resuming) and build the latent dataset; returns its metadata."""
    import jax

    from diffusion_jax import data, datasets, metrics, parallel, workdir
    from diffusion_jax.datasets import latents
    from diffusion_jax.models import is_autoencoder

    if batch_size < 1 or chunk_size < 1:
        raise workdir.ConfigError("--batch_size and --chunk_size must be >= 1")
    config = workdir.load_config(autoencoder)
    if not is_autoencoder(config.model):
        raise workdir.ConfigError(
            f"--autoencoder={autoencoder} holds a {config.model.name!r} model, not an "
            "autoencoder; train one with a configs/*_autoencoder.py config"
        )
    workdir.require_checkpoint(autoencoder)
    source = config.data.to_dict()
    source.update({k: v for k, v in (("name", dataset), ("data_dir", data_dir)) if v})
    model, _, state = workdir.load_state(autoencoder, config)
    specs = {s: data.dataset_spec({**source, "split": s}) for s in splits}
    image_shape = next(iter(specs.values())).image_shape
    f = model.downsample_factor
    identity = {
        "autoencoder": os.path.abspath(autoencoder),
        "autoencoder_step": int(state.step),
        "posterior": posterior,
        "seed": int(seed) if posterior == "sample" else None,
        "source": {
            k: source[k] for k in ("name", "data_dir", "image_size", "resize_method") if k in source
        },
        "latent_shape": [image_shape[0] // f, image_shape[1] // f, model.latent_channels],
        "num_classes": next(iter(specs.values())).num_classes,
        "splits": {s: spec.num_examples for s, spec in specs.items()},
    }
    if source["name"] in datasets.VOCABULARIES:  # captions are carried for text models
        identity["captions"] = True
    workdir.ensure_writable_dir(out, "--out")
    path = latents.metadata_path(out)
    if os.path.exists(path):
        old = latents.read_metadata(out)
        if {k: old.get(k) for k in identity} != identity:
            raise workdir.ConfigError(
                f"--out={out} holds another encoding ({old.get('autoencoder')} step "
                f"{old.get('autoencoder_step')}, {old.get('source')}); choose another --out"
            )
        if old.get("scale_factor"):
            return old  # already complete
    elif jax.process_index() == 0:
        latents.write_metadata(out, identity)
    parallel.sync_processes("encode:metadata")

    encode = _encoder(model, state.ema_params, posterior, batch_size, seed)
    todo = [
        (split_id, s, k)
        for split_id, s in enumerate(splits)
        for k in range(-(-specs[s].num_examples // chunk_size))
        if k % jax.process_count() == jax.process_index()
    ]
    progress = metrics.Progress(len(todo), quiet=True)
    os.makedirs(os.path.join(out, latents.CHUNKS_DIR), exist_ok=True)
    for done, (split_id, s, k) in enumerate(todo, 1):
        target = latents.chunk_path(out, s, k)
        if not os.path.exists(target):
            start = k * chunk_size
            stop = min(start + chunk_size, specs[s].num_examples)
            images, labels = data.load_split_rows({**source, "split": s}, s, start, stop)
            index = np.arange(start, stop, dtype=np.int32)
            z = encode(images, split_id, index)
            extra = {}
            if identity.get("captions"):
                captions, _ = data.load_split_captions({**source, "split": s}, s, stop, start)
                extra["caption"] = np.asarray(captions)
            tmp = target + ".tmp.npz"
            np.savez(tmp, latent=z, label=labels, index=index, **extra)
            os.replace(tmp, target)  # a chunk file is complete or absent
        progress.update(done)
    progress.close()
    parallel.sync_processes("encode:chunks")

    if jax.process_index() == 0:
        stats = channel_statistics(out, "train" if "train" in splits else splits[0])
        metadata = {**identity, **stats, "scale_factor": 1.0 / stats["std"]}
        latents.write_metadata(out, {**identity, **stats})  # the builder reads the shape
        latents.build(out)
        latents.write_metadata(out, metadata)  # scale_factor marks the dataset complete
        for s in splits:
            for chunk in latents.chunk_files(out, s):
                os.remove(chunk)
    parallel.sync_processes("encode:built")
    return latents.read_metadata(out)


def main(overrides: dict) -> dict:
    from diffusion_jax import runtime
    from diffusion_jax.workdir import ConfigError

    if overrides:
        cli.fail("encode takes no --config overrides; use --dataset/--data_dir")
    runtime.configure_cpu_xla_flags()
    try:
        metadata = run(
            FLAGS.autoencoder,
            FLAGS.out,
            dataset=FLAGS.dataset,
            data_dir=FLAGS.data_dir,
            splits=tuple(FLAGS.splits),
            posterior=FLAGS.posterior,
            batch_size=FLAGS.batch_size,
            chunk_size=FLAGS.chunk_size,
            seed=FLAGS.seed,
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    print(
        f"latent dataset in {FLAGS.out}: shape {metadata['latent_shape']}, splits "
        f"{metadata['splits']}, scale_factor {metadata['scale_factor']:.5f} "
        f"(train latent std {metadata['std']:.4f})",
        flush=True,
    )
    return metadata


if __name__ == "__main__":
    cli.run(main, FLAGS, __doc__)
