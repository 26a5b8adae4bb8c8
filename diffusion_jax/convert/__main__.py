r"""Convert published PyTorch weights into a diffusion_jax workdir.

  # diffusers UNet2DModel (e.g. google/ddpm-cifar10-32) or AutoencoderKL (e.g. the SD VAE)
  python -m diffusion_jax.convert --from=diffusers --weights=DIR --workdir=OUT \
      [--config=configs/cifar10_ddpm.py] [--dataset=cifar10] [--data_dir=DIR]
  # official DiT checkpoint, decoded by a converted SD VAE workdir
  python -m diffusion_jax.convert --from=dit --weights=DiT-XL-2-256x256.pt --workdir=OUT \
      --autoencoder=runs/sd_vae [--config=configs/imagenet256_dit_xl2.py] [--num_heads=16]

DIR is what diffusers' ``save_pretrained`` writes (config.json +
diffusion_pytorch_model.safetensors). The workdir gets the config (--config's, default
configs/base.py, with the model block and image size of the weights; --dataset and
--data_dir set data.name and data.data_dir), one checkpoint at step 0 whose parameters and EMA parameters are the imported
weights, ``dataset_spec.json`` (so sample runs without the dataset on this machine) and
``convert.json`` (what was imported, from where). ``sample``, ``evaluate`` and ``encode``
take it like a trained workdir, and a training run started in it fine-tunes the weights.

A DiT works in an autoencoder's latent space: --autoencoder names the (converted) SD VAE
workdir and --scale_factor the latent scale the weights were trained with (default: the
autoencoder's published ``scaling_factor``, 0.18215 for the SD VAE). The workdir holds a
metadata-only latent space (``latent_space/latents.json``, no encoded data), so samples
decode; training on real latents points ``data.data_dir`` at an encoded dataset.
"""

from __future__ import annotations

import datetime
import json
import os

from absl import flags

from diffusion_jax import cli

FLAGS = flags.FlagValues()
OWN = dict(flag_values=FLAGS)
flags.DEFINE_enum("from", None, ["diffusers", "dit"], "Format of --weights.", **OWN)
flags.DEFINE_string("weights", None, "diffusers directory, or DiT .pt/.safetensors.", **OWN)
flags.DEFINE_string("workdir", None, "Workdir to create (must hold no checkpoint).", **OWN)
flags.DEFINE_string("config", "configs/base.py", "Config file to start from.", **OWN)
flags.DEFINE_string(
    "dataset", "", "data.name of the workdir's config (default: --config's).", **OWN
)
flags.DEFINE_string("data_dir", "", "data.data_dir of the workdir's config.", **OWN)
flags.DEFINE_string("autoencoder", "", "DiT: the autoencoder workdir decoding its latents.", **OWN)
flags.DEFINE_float("scale_factor", 0.0, "DiT: latent scale (default: the autoencoder's).", **OWN)
flags.DEFINE_integer("num_heads", 0, "DiT: attention heads (default: the paper's table).", **OWN)
for _name in ("from", "weights", "workdir"):
    flags.mark_flag_as_required(_name, flag_values=FLAGS)

INFO_FILE = "convert.json"
LATENT_DIR = "latent_space"


def _config(config_file: str, model_cfg: dict, facts: dict, dataset: str, data_dir: str):
    from diffusion_jax.cli import load_config_file

    config = load_config_file(config_file)
    name = model_cfg["name"]
    config.model.name = name
    config.model.num_classes = model_cfg["num_classes"]
    config.model[name].update(model_cfg[name])
    config.data.image_size = facts["image_size"]
    out_channels = model_cfg[name].get("out_channels")
    if name != "autoencoder" and out_channels == 2 * facts["image_channels"]:
        # the second half of the output is the learned variance (improved DDPM / DiT)
        config.objective.learn_sigma = True
        config.sampler.variance = "learned"
    if dataset:
        config.data.name = dataset
    if data_dir:
        config.data.data_dir = data_dir
    return config


def _latent_space(config, out: str, autoencoder: str, scale_factor: float, facts: dict):
    """Point a DiT's config at ``autoencoder`` through a metadata-only latent space."""
    from diffusion_jax import workdir
    from diffusion_jax.datasets import latents
    from diffusion_jax.models import build_model, is_autoencoder

    if not autoencoder:
        raise workdir.ConfigError(
            "--from=dit needs --autoencoder=WORKDIR: the autoencoder whose latents the DiT "
            "denoises (convert the SD VAE with --from=diffusers first)"
        )
    ae_config = workdir.load_config(autoencoder)
    workdir.require_checkpoint(autoencoder)
    if not is_autoencoder(ae_config.model):
        raise workdir.ConfigError(f"--autoencoder={autoencoder} holds no autoencoder")
    ae = build_model(ae_config.model)
    if ae.latent_channels != facts["image_channels"]:
        raise workdir.ConfigError(
            f"--autoencoder={autoencoder} has {ae.latent_channels} latent channels but the "
            f"DiT takes {facts['image_channels']}"
        )
    info_path = os.path.join(autoencoder, INFO_FILE)
    if not scale_factor and os.path.exists(info_path):
        with open(info_path) as f:
            scale_factor = json.load(f).get("scaling_factor", 0.0)
    if not scale_factor:
        raise workdir.ConfigError(
            f"no latent scale factor: {autoencoder} records none; pass --scale_factor "
            "(the value the DiT was trained with: 0.18215 for the SD VAE)"
        )
    with workdir.checkpointer(autoencoder, read_only=True) as ckpt:
        ae_step = ckpt.latest_step()
    size = facts["image_size"]
    data_dir = os.path.join(os.path.abspath(out), LATENT_DIR)
    os.makedirs(data_dir, exist_ok=True)
    source = ae_config.data.to_dict()
    latents.write_metadata(
        data_dir,
        {
            "autoencoder": os.path.abspath(autoencoder),
            "autoencoder_step": int(ae_step),
            "scale_factor": float(scale_factor),
            "source": {k: source[k] for k in ("name", "data_dir", "image_size", "resize_method")},
            "latent_shape": [size, size, ae.latent_channels],
            "num_classes": config.model.num_classes,
            "posterior": "mean",
            "splits": {},
            "imported": "metadata only: the scale factor the imported weights were trained "
            "with; no latents were encoded here",
        },
    )
    config.latent.autoencoder = os.path.abspath(autoencoder)
    config.data.name = latents.NAME
    config.data.data_dir = data_dir


def run(
    source: str,
    weights: str,
    out: str,
    *,
    config_file: str = "configs/base.py",
    dataset: str = "",
    data_dir: str = "",
    autoencoder: str = "",
    scale_factor: float = 0.0,
    num_heads: int = 0,
) -> dict:
    """Write the workdir; returns what convert.json records."""
    from diffusion_jax import data, workdir
    from diffusion_jax.convert import convert_diffusers, convert_dit
    from diffusion_jax.models import count_params
    from diffusion_jax.state import make_optimizer, state_from_params

    if workdir.has_checkpoints(out):
        raise workdir.ConfigError(f"--workdir={out} already holds checkpoints; choose a new one")
    if source == "diffusers":
        model_cfg, _, params, facts = convert_diffusers(weights)
    else:
        model_cfg, _, params, facts = convert_dit(weights, num_heads or None)
    config = _config(config_file, model_cfg, facts, dataset, data_dir)
    workdir.ensure_writable_dir(out, "--workdir")
    if source == "dit":
        _latent_space(config, out, autoencoder, scale_factor, facts)
    size, channels = facts["image_size"], facts["image_channels"]
    spec = data.DatasetSpec(
        name=config.data.name,
        image_shape=(size, size, channels),
        num_classes=config.model.num_classes,
        num_examples=0,
    )
    workdir.check_config(config, spec, training=False)

    state = state_from_params(
        params, make_optimizer(config.optim, config.train.num_steps), config.seed
    )
    info = {
        "from": source,
        "weights": os.path.abspath(weights),
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "num_params": count_params(state.params),
        **facts,
    }
    workdir.save_config(config, out)
    workdir.save_spec(spec, out)
    with workdir.checkpointer(out, config) as ckpt:
        ckpt.save(0, state, extra={"imported": info["weights"]})
    with open(os.path.join(out, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return info


def main(overrides: dict) -> dict:
    from diffusion_jax import runtime
    from diffusion_jax.convert import ConversionError
    from diffusion_jax.workdir import ConfigError

    if overrides:
        cli.fail("convert takes no --config overrides; pass a --config file")
    runtime.configure_cpu_xla_flags()
    try:
        info = run(
            FLAGS["from"].value,
            FLAGS.weights,
            FLAGS.workdir,
            config_file=FLAGS.config,
            dataset=FLAGS.dataset,
            data_dir=FLAGS.data_dir,
            autoencoder=FLAGS.autoencoder,
            scale_factor=FLAGS.scale_factor,
            num_heads=FLAGS.num_heads,
        )
    except (ConversionError, ConfigError, FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    print(
        f"converted {info['class_name']} ({info['num_params']:,} parameters, "
        f"{info['image_size']}x{info['image_size']}x{info['image_channels']}) from "
        f"{info['weights']} into {FLAGS.workdir}",
        flush=True,
    )
    return info


if __name__ == "__main__":
    cli.run(main, FLAGS, __doc__)
