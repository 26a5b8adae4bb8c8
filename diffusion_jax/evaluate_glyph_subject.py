"""Judge a glyph subject-tuning run (glyph_subject.py): does the identifier draw the new
face, and do the old captions keep what the base drew?

    python -m diffusion_jax.evaluate_glyph_subject --workdir=runs/glyphs_db \
        [--num_samples=500 --lora_scales=0,0.5,1 --seed=0]

One row for the extended base (the base's own samples for every old caption) and one per
LoRA scale of the run (a full fine-tuning run has one, 1), all at the run's guidance scale:
  face_rate     share of samples under the identifier's captions (the subject's held-out
                instance captions: "... zxq letter A ...") that the face detector
                (evaluation/subject_net.face_detector) calls the face (target >= 80%);
  old_accuracy  the attribute judge's mean accuracy over the seven attributes on samples
                under the glyphs test split's "seen" captions (the drift: the run's row
                against the base's; target: a drop of <= 3 points); each attribute too;
  face_leak     share of those old-caption samples the detector calls the face;
  fid_subject   classifier-FID (judge features) of the identifier samples against the
                held-out instances, next to its real-vs-real floor (as many fresh renders
                of the face against the same instances).
Printed as a markdown table and appended to WORKDIR/subject_eval.jsonl.
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from diffusion_jax import cli, evaluate_subject, workdir as workdir_lib
from diffusion_jax.datasets import subject as subject_data
from diffusion_jax.metrics import from_uint8

FLAGS = flags.FlagValues()
evaluate_subject.define_flags(FLAGS, "A glyph subject-tuning run.")

COLUMNS = ("model", "face_rate", "old_accuracy", "face_leak", "fid_subject")


def _subject_run(workdir: str, num_samples: int):
    """(config, subject metadata) of a glyph subject run; ConfigError naming the fix."""
    workdir_lib.require_checkpoint(workdir)
    config = workdir_lib.load_config(workdir)
    metadata = {}
    if config.data.name == subject_data.NAME:
        metadata = subject_data.read_metadata(config.data.data_dir)
    if not subject_data.has_captions(metadata) or not config.adapter.get("base"):
        raise workdir_lib.ConfigError(
            f"{workdir} is not a glyph subject-tuning run (an adapter run on data.name="
            f"{subject_data.NAME!r} made by python -m diffusion_jax.glyph_subject)"
        )
    if num_samples < 2:
        raise workdir_lib.ConfigError(f"num_samples must be >= 2, got {num_samples}")
    return config, metadata


def run(workdir: str, num_samples: int = 500, lora_scales=(1.0,), seed: int = 0, cache_dir=""):
    """The rows described in the module docstring, with the detector's and the floor's
    numbers."""
    from diffusion_jax import (
        adapters,
        conditioning,
        evaluate_text,
        evaluation,
        glyph_subject,
        subject,
    )
    from diffusion_jax.evaluation import glyph_net
    from diffusion_jax.evaluation.distances import fid_from_features
    from diffusion_jax.evaluation.subject_net import RENDER_SEED, face_detector

    config, metadata = _subject_run(workdir, num_samples)
    is_lora = adapters.kind(config) == "lora"
    if not is_lora and tuple(lora_scales) != (1.0,):
        raise workdir_lib.ConfigError("--lora_scales needs a LoRA run (adapter.kind=lora)")
    size, face = int(config.data.image_size), metadata["instances"]["face"]
    pixels = {
        "name": metadata["caption_source"],
        "data_dir": metadata["base"]["data_dir"],
        "image_size": size,
    }
    judge = evaluation.make_extractor(pixels, cache_dir=cache_dir)
    if not isinstance(judge, glyph_net.GlyphClassifier):
        raise ValueError(f"{pixels['name']!r} has no attribute classifier")
    detector = face_detector(face, size)
    with np.load(subject_data.split_path(config.data.data_dir, "test")) as arrays:
        held_out, ident_captions = from_uint8(arrays["image"]), list(arrays["caption"])
    ident_captions = [ident_captions[i % len(ident_captions)] for i in range(num_samples)]
    old_captions, target, _ = evaluate_text.prompt_groups(pixels, num_samples)["seen"]
    tokenizer = conditioning.tokenizer(config)
    ident_tokens, old_tokens = map(tokenizer.encode_batch, (ident_captions, old_captions))
    guidance = float(config.sampler.guidance_scale)

    def fid(a, b):
        return fid_from_features(judge.features(a), judge.features(b))

    def row(name, sampler, scale=1.0):
        def draw(tokens):
            images = sampler.draw(tokens, guidance_scale=guidance, seed=seed, lora_scale=scale)
            return from_uint8(images)

        ident, olds = draw(ident_tokens), draw(old_tokens)
        following = glyph_net.caption_following(judge.predict_attributes(olds), target)
        return {
            "model": name,
            "face_rate": float(detector.is_subject(ident).mean()),
            "old_accuracy": float(np.mean([following[a] for a in glyph_net.ATTRIBUTE_NAMES])),
            "old_attributes": following,
            "face_leak": float(detector.is_subject(olds).mean()),
            "fid_subject": fid(ident, held_out),
        }

    rows = [row("base", subject.Sampler(config.adapter.base))]
    tuned = subject.Sampler(workdir)
    for scale in lora_scales:
        rows.append(row(f"lora {float(scale):g}" if is_lora else "tuned", tuned, float(scale)))
    fresh = from_uint8(glyph_subject.instances(face, "x", num_samples, RENDER_SEED + 2, size)[0])
    return {
        "workdir": os.path.abspath(workdir),
        "num_samples": num_samples,
        "seed": seed,
        "guidance_scale": guidance,
        "detector": detector.info,
        "floor": {"fid_subject": fid(fresh, held_out)},
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in result["rows"]:
        cells = [row["model"]] + [
            f"{row[c]:.3g}" if c.startswith("fid") else f"{row[c]:.1%}" for c in COLUMNS[1:]
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(overrides: dict) -> dict:
    return evaluate_subject.run_cli("evaluate_glyph_subject", FLAGS, run, markdown, overrides)


if __name__ == "__main__":
    cli.run(main, FLAGS, __doc__)
