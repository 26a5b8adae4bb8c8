"""Subject tuning (DreamBooth, Ruiz et al. 2023) of a class-conditional model: teach the
base a new subject under a new *identifier* from a few dozen images, while a
prior-preservation loss on the base's own samples keeps what it knew.

    python -m diffusion_jax.subject --base=WORKDIR --out=DIR [--font=cmr10.ttf
        --num_instances=100 --num_prior=1000 --prior_weight=1 --guidance_scale=2]

prepares a subject run; the run itself is an ordinary adapter run (adapters.py) of the
*extended base* it writes, ``full`` or ``lora`` (configs/digits_dreambooth.py):

* **The identifier** is a new class label, ``K`` for a base of K classes. The label
  table of K + 1 rows (the last is the null label of guidance) gets a new row before the
  null one, a copy of the null row: the identifier starts as "a digit, any class", as
  DreamBooth's "a [V] dog" starts as "a dog" (``add_identifier``). Old labels and the
  null label keep their rows, so the extended base samples them exactly as the base did
  (tested). The extended base is written as a workdir of its own, DIR/base (step 0,
  ``model.num_classes`` = K + 1, a record of the base it came from), so full fine-tuning
  and LoRA adapt it with the machinery they already have. A LoRA of the subject also
  adapts the label table (``adapter.targets`` may name an embedding table): with the
  table frozen the identifier would stay the null label.
* **The instances** are renders of the subject: digits typeset in a font
  (datasets/font_digits.py), labelled with the identifier.
* **The prior** is ``num_prior`` samples the base draws for its own labels (class
  balanced, classifier-free guidance ``guidance_scale``), labelled with those labels.
* **Prior preservation** (loss L_instance + lambda * L_prior, lambda = ``prior_weight``)
  is realised by how often each part is seen: the train split repeats instances and
  prior images so that the prior makes up lambda / (1 + lambda) of it. A uniformly
  shuffled batch then has the expected gradient of (L_instance + lambda * L_prior) /
  (1 + lambda), DreamBooth's loss up to a constant Adam ignores, with no change to the
  loss or the train step. The realised lambda is recorded.

The subject dataset (datasets/subject.py) is written to DIR: the train split
(instances and prior) and a test split of held-out instances.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import traverse_util

from diffusion_jax import adapters, cli, generate, metrics, schedules, tasks, workdir as workdir_lib
from diffusion_jax.datasets import digits, font_digits, subject as subject_data

BASE_DIR = "base"  # the extended base, inside the subject directory
TABLE = ("table", "embedding")  # the label table's parameter (models/layers.LabelEmbedding)


def add_identifier(params, num_classes: int):
    """``params`` with a row inserted at index ``num_classes`` of every label table
    ([K + 1, D] -> [K + 2, D]), a copy of the null row; everything else unchanged."""
    flat = traverse_util.flatten_dict(params)
    tables = [path for path in flat if path[-2:] == TABLE]
    if not tables:
        raise ValueError("the base has no label table (models/layers.LabelEmbedding)")
    for path in tables:
        table = flat[path]
        if table.shape[0] != num_classes + 1:
            raise ValueError(
                f"{'/'.join(path)} has {table.shape[0]} rows; a base of {num_classes} "
                f"classes has {num_classes + 1} (the last is the null label)"
            )
        null = table[num_classes:]
        flat[path] = jnp.concatenate([table[:num_classes], null, null])
    return traverse_util.unflatten_dict(flat)


def repeats(num_instances: int, num_prior: int, prior_weight: float) -> tuple[int, int]:
    """(instance repeats, prior repeats) that make the prior's share of the train split
    closest to prior_weight / (1 + prior_weight)."""
    if prior_weight <= 0:
        return 1, 0
    ratio = prior_weight * num_instances / num_prior  # prior repeats per instance repeat
    if ratio >= 1:
        return 1, round(ratio)
    return max(1, round(1 / ratio)), 1


class Sampler:
    """The samples of a workdir (EMA weights; a LoRA merged at ``lora_scale``) with its
    config's sampler: the checkpoint is read and the sampler built once, so drawing more
    label groups or LoRA scales compiles nothing new (the scale is traced)."""

    def __init__(self, workdir: str, batch_size: int = 256):
        self.config = workdir_lib.load_config(workdir)
        self.model, self.spec, self.state = workdir_lib.load_state(workdir, self.config)
        self._batch_size = batch_size
        self._sample_fns = {}  # batch size -> (sample_fn, params_of)

    def draw(self, labels, *, guidance_scale: float, seed: int, lora_scale: float = 1.0):
        """uint8 samples [N, H, W, C] for ``labels`` [N]."""
        model, params = adapters.for_sampling(self.model, self.state.ema_params, lora_scale)
        bs = min(self._batch_size, len(labels))
        if bs not in self._sample_fns:
            self._sample_fns[bs] = tasks.image_sample_fn(
                self.config,
                model,
                schedules.build(self.config.schedule),
                (bs, *self.spec.image_shape),
            )
        sample_fn, params_of = self._sample_fns[bs]
        x = generate.generate_samples(
            sample_fn,
            params_of(params),
            len(labels),
            bs,
            seed,
            np.asarray(labels, np.int32),
            guidance_scale=guidance_scale,
        )
        return metrics.to_uint8(x)


def mix(instances: dict, r_inst: int, prior: dict | None, r_prior: int) -> dict:
    """The train split's arrays: the instances' arrays (``image``, ``label``, and any
    other per-example field) repeated ``r_inst`` times, then the prior's ``r_prior``
    times, with each example's ``source``."""
    parts = [(instances, r_inst, subject_data.INSTANCE)]
    if r_prior:
        parts.append((prior, r_prior, subject_data.PRIOR))
    out = {k: np.concatenate([p[k] for p, r, _ in parts for _ in range(r)]) for k in instances}
    out["label"] = out["label"].astype(np.int32)
    out["source"] = np.concatenate(
        [np.full(len(p["label"]) * r, src, np.int32) for p, r, src in parts]
    )
    return out


def _check_base(base: str):
    workdir_lib.require_checkpoint(base)
    config = workdir_lib.load_config(base)
    k = int(config.model.get("num_classes", 0))
    if not k or config.model.get("text", {}).get("vocab_size", 0):
        raise workdir_lib.ConfigError(
            f"--base={base} is not a class-conditional model (model.num_classes > 0, no text); "
            "subject tuning adds a class label"
        )
    if config.data.name != digits.NAME:
        raise workdir_lib.ConfigError(
            f"--base={base} was trained on {config.data.name!r}; the subject renders "
            f"(typeset digits) fit a base trained on data.name={digits.NAME!r}"
        )
    return config, k


def _write_extended_base(base: str, config, params, out: str, shape) -> str:
    """DIR/base: the base (its EMA ``params``) with the identifier's label row."""
    k = int(config.model.num_classes)
    config = config.copy_and_resolve_references()
    config.model.num_classes = k + 1
    return write_base(base, config, add_identifier(params, k), out, shape, k + 1)


def write_base(base: str, config, params, out: str, shape, num_classes: int) -> str:
    """DIR/base: the extended ``base`` (``params`` under its ``config``, both already
    given the identifier) as a step-0 workdir that trains on the subject data in ``out``."""
    from diffusion_jax.data import DatasetSpec
    from diffusion_jax.state import make_optimizer, state_from_params

    config = config.copy_and_resolve_references()
    config.data.name, config.data.data_dir = subject_data.NAME, out
    spec = DatasetSpec(subject_data.NAME, tuple(shape), num_classes, 0)
    path = os.path.join(out, BASE_DIR)
    workdir_lib.check_config(config, spec, training=False)
    workdir_lib.ensure_writable_dir(path, "the extended base")
    workdir_lib.save_config(config, path)
    workdir_lib.save_spec(spec, path)
    state = state_from_params(params, make_optimizer(config.optim, 1), config.seed)
    with workdir_lib.checkpointer(path, config) as ckpt:
        ckpt.save(0, state, extra={"subject_of": os.path.abspath(base)})
    return path


def check_counts(num_instances: int, num_prior: int, prior_weight: float, num_test: int, out):
    """ConfigError naming the fix for impossible counts or an ``out`` already used."""
    if num_instances < 1 or num_test < 1 or num_prior < 0 or prior_weight < 0:
        raise workdir_lib.ConfigError(
            "need num_instances >= 1, num_test >= 1, num_prior >= 0 and prior_weight >= 0"
        )
    if prior_weight > 0 and num_prior == 0:
        raise workdir_lib.ConfigError("prior_weight > 0 needs prior images: set num_prior > 0")
    if workdir_lib.has_checkpoints(os.path.join(out, BASE_DIR)):
        raise workdir_lib.ConfigError(f"--out={out} already holds a subject; choose a new one")


def summary(m: dict, out: str) -> str:
    """One line on a prepared subject (its metadata ``m``)."""
    return (
        f"subject in {out}: identifier {m['identifier']!r}, train split "
        f"{m['splits']['train']} ({m['instances']['count']} instances x "
        f"{m['repeats']['instance']}, {m['prior']['count']} prior x {m['repeats']['prior']}: "
        f"lambda {m['realised_prior_weight']:.2f}), test {m['splits']['test']}; extended "
        f"base {os.path.join(out, BASE_DIR)}"
    )


def prepare(
    base: str,
    out: str,
    *,
    font: str = font_digits.DEFAULT_FONT,
    num_instances: int = 100,
    num_prior: int = 1000,
    prior_weight: float = 1.0,
    guidance_scale: float = 2.0,
    num_test: int = 500,
    seed: int = 0,
) -> dict:
    """Write the subject dataset and the extended base into ``out``; returns the
    dataset's metadata."""
    config, k = _check_base(base)
    check_counts(num_instances, num_prior, prior_weight, num_test, out)
    workdir_lib.ensure_writable_dir(out, "--out")
    sampler = Sampler(base)
    state = sampler.state
    params = jax.device_get(state.ema_params)
    fingerprint = adapters.fingerprint(params)
    instances, _ = font_digits.render(num_instances, seed, font)
    held_out, _ = font_digits.render(num_test, seed + 1, font)
    r_inst, r_prior = repeats(num_instances, num_prior, prior_weight)
    prior_labels = generate.class_balanced_labels(k, num_prior * (r_prior > 0))
    prior = None
    if r_prior:
        prior = sampler.draw(prior_labels, guidance_scale=guidance_scale, seed=seed)
    train = mix(
        {"image": instances, "label": np.full(num_instances, k)},
        r_inst,
        {"image": prior, "label": prior_labels},
        r_prior,
    )
    test = {
        "image": held_out,
        "label": np.full(num_test, k, np.int32),
        "source": np.zeros(num_test, np.int32),
    }
    metadata = {
        "base": {
            "workdir": os.path.abspath(base),
            "step": int(state.step),
            "fingerprint": fingerprint,
            "data_dir": str(config.data.data_dir),
        },
        "identifier": k,
        "num_classes": k + 1,
        "image_shape": list(instances.shape[1:]),
        "instances": {"font": font, "count": num_instances, "seed": seed, "test_seed": seed + 1},
        "prior": {"count": int(len(prior_labels)), "guidance_scale": guidance_scale, "seed": seed},
        "prior_weight": prior_weight,
        "repeats": {"instance": r_inst, "prior": r_prior},
        "realised_prior_weight": r_prior * len(prior_labels) / (r_inst * num_instances),
    }
    subject_data.write(out, metadata, {"train": train, "test": test})
    _write_extended_base(base, config, params, out, instances.shape[1:])
    return subject_data.read_metadata(out)


# The flags both subject CLIs take (this one and glyph_subject.py), with the subject's own.
COMMON_FLAGS = ("num_instances", "num_prior", "prior_weight", "guidance_scale", "num_test", "seed")


def define_flags(values: flags.FlagValues, base_help: str) -> None:
    """Define the subject CLIs' shared flags in ``values`` (base and out required)."""
    own = dict(flag_values=values)
    flags.DEFINE_string("base", None, base_help, **own)
    flags.DEFINE_string("out", None, "Directory for the subject data and extended base.", **own)
    flags.DEFINE_integer("num_instances", 100, "Instance renders of the subject.", **own)
    flags.DEFINE_integer("num_prior", 1000, "Prior images the base draws (0: none).", **own)
    flags.DEFINE_float("prior_weight", 1.0, "Lambda of the prior-preservation loss.", **own)
    flags.DEFINE_float("guidance_scale", 2.0, "Classifier-free guidance of the prior.", **own)
    flags.DEFINE_integer("num_test", 500, "Held-out instance renders (the test split).", **own)
    flags.DEFINE_integer("seed", 0, "Render and sampling seed.", **own)
    flags.mark_flags_as_required(["base", "out"], flag_values=values)


def run_cli(name: str, values: flags.FlagValues, prepare_fn, overrides: dict, **own) -> dict:
    """A subject CLI's main: ``prepare_fn(base, out, **common flags, **own)``, errors as
    one line, the summary printed."""
    from diffusion_jax import runtime

    if overrides:
        cli.fail(f"{name} takes no --config overrides")
    runtime.configure_cpu_xla_flags()
    common = {k: values[k].value for k in COMMON_FLAGS}
    try:
        m = prepare_fn(values.base, values.out, **common, **own)
    except (workdir_lib.ConfigError, FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    print(summary(m, values.out), flush=True)
    return m


FLAGS = flags.FlagValues()
define_flags(FLAGS, "The class-conditional base workdir.")
flags.DEFINE_string(
    "font", font_digits.DEFAULT_FONT, "The subject's font (file or name).", flag_values=FLAGS
)


def main(overrides: dict) -> dict:
    return run_cli("subject", FLAGS, prepare, overrides, font=FLAGS.font)


if __name__ == "__main__":
    cli.run(main, FLAGS, __doc__)
