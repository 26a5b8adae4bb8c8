r"""Train a diffusion model from a config file.

  python -m diffusion_jax.main --config=configs/digits_unet_small.py --workdir=runs/digits \
      [--config.schedule.name=cosine ...] [--verbosity=0]

The workdir holds config.json, checkpoints/, tensorboard/, samples/ and metrics.jsonl;
running the same command again resumes from the latest checkpoint (a changed config is
refused, except the keys listed in diffusion_jax/workdir.py's RESUMABLE_KEYS). One run per
workdir: a second one is refused while the first holds <workdir>/lock.

Exit codes: 0 done; 2 bad input or a refused run (one ``error:`` line, nothing written);
75 preempted (SIGTERM: the checkpoint is saved, run the same command to resume); 1 a bug.
The console shows progress lines and this package's own messages; ``--verbosity=0``
(absl's levels) also shows the libraries' INFO logs (orbax, TensorStore), ``--verbosity=1``
their debug logs.
"""

import sys

from absl import flags

from diffusion_jax import cli, preemption, runtime, train
from diffusion_jax.checkpoint import CheckpointWriteError
from diffusion_jax.workdir import ConfigError

# Own FlagValues, like the other CLIs; config overrides are --config.KEY=VALUE.
FLAGS = flags.FlagValues()
OWN = dict(flag_values=FLAGS)
flags.DEFINE_string("config", None, "Config file (configs/*.py, or FILE.py:ARG).", **OWN)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.", **OWN)
flags.DEFINE_enum(
    "multihost",
    "auto",
    ["auto", "on", "off"],
    "jax.distributed: auto = on when --coordinator_address is given or a "
    "TPU/SLURM/MPI cluster is detected.",
    **OWN,
)
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host).", **OWN)
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).", **OWN)
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).", **OWN)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def main(overrides: dict):
    runtime.configure_cpu_xla_flags()
    try:
        config = cli.load_config_file(FLAGS.config)
        cli.apply_overrides(config, overrides)
        try:
            runtime.initialize_distributed(
                FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.multihost
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        state = train.train_and_evaluate(config, FLAGS.workdir)
    except (ConfigError, FileNotFoundError, train.NonFiniteError, CheckpointWriteError) as e:
        cli.fail(str(e))
    if int(state.step) < config.train.num_steps:
        sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
    cli.run(main, FLAGS, __doc__)
