r"""Train a diffusion model from a config file.

  python -m diffusion_jax.main --config=configs/digits_unet.py --workdir=runs/digits \
      [--config.schedule.name=cosine ...] [--verbosity=0]

The workdir holds config.json, checkpoints/, tensorboard/, samples/ and metrics.jsonl;
running the same command again resumes from the latest checkpoint. The console shows
progress lines and this package's own messages; ``--verbosity=0`` (absl's flag) also shows
the libraries' INFO logs (orbax, TensorStore), ``--verbosity=1`` their debug logs.
"""

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import cli, runtime, train
from diffusion_jax.workdir import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum(
    "multihost",
    "auto",
    ["auto", "on", "off"],
    "jax.distributed: auto = on when --coordinator_address is given or a "
    "TPU/SLURM/MPI cluster is detected.",
)
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.setup_logging(FLAGS.verbosity if FLAGS["verbosity"].present else None)
    runtime.configure_cpu_xla_flags()
    try:
        try:
            runtime.initialize_distributed(
                FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.multihost
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ConfigError, FileNotFoundError, train.NonFiniteError) as e:
        cli.fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
