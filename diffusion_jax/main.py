"""Train a diffusion model from a config file.

  python -m diffusion_jax.main --config=configs/digits_unet.py --workdir=runs/digits \
      [--config.schedule.name=cosine ...]

The workdir holds config.json, checkpoints/, tensorboard/ and samples/; running the same
command again resumes from the latest checkpoint.
"""
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import parallel, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"],
                  "jax.distributed: auto = on when --coordinator_address is given or a "
                  "TPU/SLURM/MPI cluster is detected.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl flag parsing, with a one-line error for a bad --config override (unknown key or
    wrong type) instead of ml_collections' traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        # absl wraps errors raised while parsing a flag; the cause names the bad key
        cause = e.__cause__ or e.__context__ or e
        print(f"error: bad command-line flag: {e} ({type(cause).__name__}: {cause}). "
              "Config keys are declared in configs/base.py; check the spelling and type.",
              file=sys.stderr)
    except (AttributeError, KeyError) as e:
        text = str(e.args[0] if e.args else e)
        key = re.search(r"'(\w+)", text)
        hint = re.search(r'Did you mean "(\w+)"', text)
        print(f"error: unknown config key {key.group(1) if key else text!r} in a --config "
              f"override{f' (did you mean {hint.group(1)!r}?)' if hint else ''}. "
              "Config keys are declared in configs/base.py; check the spelling.",
              file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    parallel.configure_cpu_xla_flags()
    try:
        try:
            parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                            FLAGS.process_id, FLAGS.multihost)
        except ValueError as e:
            raise train.ConfigError(str(e)) from None
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (train.ConfigError, FileNotFoundError, train.NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
