"""Judge a subject-tuning run (subject.py): did the identifier learn the subject, and did
the old labels keep what the base drew?

    python -m diffusion_jax.evaluate_subject --workdir=runs/digits_db [--num_samples=500
        --lora_scales=0,0.5,1 --seed=0]

For each LoRA scale (a full fine-tuning run has one, 1), it draws ``num_samples`` samples
for the identifier and ``num_samples`` class-balanced samples of the old labels, at the
run's guidance scale, and reports
  subject_rate      share of identifier samples the subject detector
                    (evaluation/subject_net.py) calls the subject (target >= 80%);
  class_accuracy    share of old-label samples the digits classifier reads as their label
                    (the drift: compare with the extended base, ``--workdir=DIR/base``,
                    whose old labels are the base's exactly);
  style_leak        share of old-label samples the detector calls the subject;
  fid_old           classifier-FID of the old-label samples against the digits test split;
  fid_subject       classifier-FID of the identifier samples against the held-out renders;
next to the real-vs-real floors of both FIDs (``num_samples`` digits of the train split,
and as many fresh renders, against the same references).
Results are printed as a markdown table and appended to WORKDIR/subject_eval.jsonl.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags

from diffusion_jax import cli, generate, workdir as workdir_lib
from diffusion_jax.datasets import subject as subject_data
from diffusion_jax.metrics import from_uint8


def define_flags(values: flags.FlagValues, workdir_help: str) -> None:
    """The flags of both subject judges (this one and evaluate_glyph_subject.py)."""
    own = dict(flag_values=values)
    flags.DEFINE_string("workdir", None, workdir_help, **own)
    flags.DEFINE_integer("num_samples", 500, "Samples per group (identifier, old ones).", **own)
    flags.DEFINE_list("lora_scales", ["1"], "LoRA scales to judge (a LoRA run only).", **own)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", **own)
    flags.DEFINE_string("cache_dir", "", "Feature-net cache (default: the usual one).", **own)
    flags.mark_flag_as_required("workdir", flag_values=values)


def run_cli(name: str, values: flags.FlagValues, run_fn, markdown_fn, overrides: dict) -> dict:
    """A subject judge's main: ``run_fn`` on the flags, errors as one line, the result
    appended to WORKDIR/subject_eval.jsonl and printed."""
    from diffusion_jax import runtime

    if overrides:
        cli.fail(f"{name} takes no --config overrides")
    runtime.configure_cpu_xla_flags()
    try:
        scales = tuple(float(s) for s in values.lora_scales)
    except ValueError:
        cli.fail(f"--lora_scales must be numbers, got {values.lora_scales}")
    try:
        result = run_fn(values.workdir, values.num_samples, scales, values.seed, values.cache_dir)
    except (workdir_lib.ConfigError, FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    with open(os.path.join(values.workdir, "subject_eval.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"detector held-out accuracy: {result['detector']}")
    print(markdown_fn(result), flush=True)
    floor = ", ".join(f"{k} {v:.3g}" for k, v in result["floor"].items())
    print(f"real-vs-real floor: {floor}")
    return result


FLAGS = flags.FlagValues()
define_flags(FLAGS, "A subject-tuning run (or its extended base).")

COLUMNS = ("lora_scale", "subject_rate", "class_accuracy", "style_leak", "fid_old", "fid_subject")


def _fid(extractor, a, b) -> float:
    from diffusion_jax.evaluation.distances import fid_from_features

    return fid_from_features(extractor.features(a), extractor.features(b))


def run(workdir: str, num_samples: int = 500, lora_scales=(1.0,), seed: int = 0, cache_dir=""):
    """The rows (one per LoRA scale) described in the module docstring, plus the
    detector's own held-out accuracy."""
    from diffusion_jax import adapters, data, subject
    from diffusion_jax.datasets import font_digits
    from diffusion_jax.evaluation.digits_net import digits_classifier
    from diffusion_jax.evaluation.subject_net import RENDER_SEED, subject_detector

    workdir_lib.require_checkpoint(workdir)
    config = workdir_lib.load_config(workdir)
    if config.data.name != subject_data.NAME:
        raise workdir_lib.ConfigError(
            f"{workdir} is not a subject-tuning run (data.name={config.data.name!r}, "
            f"not {subject_data.NAME!r}); see python -m diffusion_jax.subject"
        )
    if num_samples < 2:
        raise workdir_lib.ConfigError(f"num_samples must be >= 2, got {num_samples}")
    is_lora = adapters.kind(config) == "lora"
    if not is_lora and tuple(lora_scales) != (1.0,):
        raise workdir_lib.ConfigError("--lora_scales needs a LoRA run (adapter.kind=lora)")
    metadata = subject_data.read_metadata(config.data.data_dir)
    k = int(metadata["identifier"])
    data_dir = metadata["base"]["data_dir"]  # the base's digits
    detector = subject_detector(metadata["instances"]["font"], data_dir)
    classifier = digits_classifier(cache_dir, data_dir)
    digits_cfg = {"name": "digits", "data_dir": data_dir, "image_size": 8}
    real, _ = data.load_split_arrays(digits_cfg, "test")  # images in [-1, 1]
    with np.load(subject_data.split_path(config.data.data_dir, "test")) as arrays:
        held_out = from_uint8(arrays["image"])
    old = generate.class_balanced_labels(k, num_samples)
    guidance = float(config.sampler.guidance_scale)
    sampler = subject.Sampler(workdir)
    rows = []
    for scale in lora_scales:
        draw = lambda labels: from_uint8(
            sampler.draw(labels, guidance_scale=guidance, seed=seed, lora_scale=scale)
        )
        ident, olds = draw(np.full(num_samples, k)), draw(old)
        predicted = classifier.logits(olds).argmax(-1)
        rows.append(
            {
                "lora_scale": float(scale) if is_lora else None,
                "subject_rate": float(detector.is_subject(ident).mean()),
                "class_accuracy": float((predicted == old).mean()),
                "style_leak": float(detector.is_subject(olds).mean()),
                "fid_old": _fid(classifier, olds, real),
                "fid_subject": _fid(classifier, ident, held_out),
            }
        )
    fresh, _ = font_digits.render(num_samples, RENDER_SEED + 2, metadata["instances"]["font"])
    train_real, _ = data.load_split_arrays(digits_cfg, "train")
    floor = {  # the same FIDs between real sets of the same sizes
        "fid_old": _fid(classifier, train_real[:num_samples], real),
        "fid_subject": _fid(classifier, from_uint8(fresh), held_out),
    }
    return {
        "workdir": os.path.abspath(workdir),
        "num_samples": num_samples,
        "seed": seed,
        "guidance_scale": guidance,
        "detector": detector.info,
        "floor": floor,
        "rows": rows,
    }


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if column.startswith(("fid", "lora")) else f"{value:.1%}"


def markdown(result: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_cell(c, row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(overrides: dict) -> dict:
    return run_cli("evaluate_subject", FLAGS, run, markdown, overrides)


if __name__ == "__main__":
    cli.run(main, FLAGS, __doc__)
