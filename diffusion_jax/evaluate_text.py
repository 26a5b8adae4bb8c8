r"""Caption following of a text-to-image workdir on glyphs, judged by the attribute
classifier (evaluation/glyph_net.py), at several guidance scales.

  python -m diffusion_jax.evaluate_text --workdir=runs/glyphs_text --num_samples=500 \
      --scales=1,2,4 [--config.sampler.num_steps=50 --seed=0 --out=FILE.json]

Prompts: the captions of the glyphs test split, split in two groups of --num_samples
each, in stored order: "seen" ((fg colour, character) pairs the training split has) and
"heldout" (pairs it never has). Both groups hold the held-out caption template in about
1/6 of the prompts. Each prompt's sample is judged on all seven attributes. Per group and
scale the record holds the per-attribute accuracy, the exact-match rate (all seven right),
the exact-match rate on held-out-template prompts, and, for the seen group, the
classifier-FID against the training split with the real-vs-real floor at the same N (a
ratio near 1 is the best possible). Chance levels and the judge's own accuracy on real
test images go next to them.

--guidance=classifier|clip --guide=WORKDIR: --scales scale the gradient of a noise-aware
attribute classifier or CLIP (guides.py) added to the score, on top of classifier-free
guidance at the workdir's sampler.guidance_scale (override it with
--config.sampler.guidance_scale=1 for the plain conditional model).

Prints a markdown table and writes everything to --out (default
<workdir>/text_eval_<guidance>.json). Scales are traced arguments of one compiled sampler.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import flags

from diffusion_jax import cli

FLAGS = flags.FlagValues()
OWN = dict(flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "A text-to-image workdir trained on glyphs.", **OWN)
flags.DEFINE_integer("num_samples", 500, "Prompts per group (seen, heldout).", **OWN)
flags.DEFINE_list("scales", ["1", "2", "4"], "Classifier-free guidance scales.", **OWN)
flags.DEFINE_integer("batch_size", 500, "Samples per compiled sampling call.", **OWN)
flags.DEFINE_integer("seed", 0, "Sampling seed.", **OWN)
flags.DEFINE_string("cache_dir", "", "Feature net + reference stats cache.", **OWN)
flags.DEFINE_enum(
    "guidance",
    "cfg",
    ["cfg", "classifier", "clip"],
    "What --scales scale: classifier-free guidance, or classifier / CLIP guidance from "
    "--guide on top of classifier-free guidance at the workdir's sampler.guidance_scale.",
    **OWN,
)
flags.DEFINE_string("guide", "", "classifier / clip: the guide's workdir.", **OWN)
flags.DEFINE_string("out", "", "JSON output (default <workdir>/text_eval_<guidance>.json).", **OWN)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)

GROUPS = ("seen", "heldout")


def prompt_groups(pixels, n: int) -> dict:
    """{group: (captions [n], target attribute arrays, template [n])} from the test split."""
    from diffusion_jax import data, data_transforms, datasets
    from diffusion_jax.datasets import glyph_render, glyphs
    from diffusion_jax.evaluation import glyph_net

    _, source = datasets.open_split(pixels["name"], data.data_dir_of(pixels), "test")
    rows = {g: [] for g in GROUPS}
    for i in range(len(source)):
        record = source[i]
        group = rows[GROUPS[int(record["heldout"])]]
        if len(group) < n:
            group.append(record)
    out = {}
    for group, records in rows.items():
        if len(records) < n:
            raise ValueError(
                f"the {pixels['name']!r} test split has {len(records)} {group} prompts; "
                f"--num_samples={n} is too many"
            )
        attributes = [glyphs.attributes(r) for r in records]
        out[group] = (
            [data_transforms.caption_text(r) for r in records],
            glyph_net.attribute_arrays(attributes),
            np.asarray([int(r["template"]) for r in records]),
        )
    out["heldout_template"] = glyph_render.HELDOUT_TEMPLATE
    return out


def chance_levels() -> dict:
    """Accuracy of uniform guessing per attribute, and of all seven at once."""
    from diffusion_jax.datasets import glyph_render

    levels = {k: 1.0 / len(v) for k, v in glyph_render.ATTRIBUTES.items()}
    levels["exact_match"] = float(np.prod(list(levels.values())))
    return levels


def run(
    workdir: str,
    *,
    num_samples: int,
    scales,
    batch_size=500,
    seed=0,
    cache_dir="",
    overrides=None,
    guidance="cfg",
    guide="",
):
    """The record (see the module doc); ``overrides`` {dotted key: value} apply to the
    workdir's config (usually sampler settings); ``guidance`` = classifier or clip scales
    the gradient of the guide in workdir ``guide`` instead of classifier-free guidance."""
    from diffusion_jax import (
        adapters,
        conditioning,
        evaluation,
        generate,
        guides,
        latent_space,
        schedules,
        tasks,
        workdir as workdir_lib,
    )
    from diffusion_jax.evaluation import glyph_net

    config = workdir_lib.load_config(workdir)
    workdir_lib.require_checkpoint(workdir)
    cli.apply_overrides(config, overrides or {})
    if conditioning.kind(config.model) != "caption":
        raise ValueError(f"{workdir} is not a text model (model.text.vocab_size is 0)")
    model, spec, state = workdir_lib.load_state(workdir, config)
    model, ema_params = adapters.for_sampling(
        model, state.ema_params
    )  # a LoRA merged; a ControlNet with its base
    pixels = latent_space.pixel_data_config(config)
    groups = prompt_groups(pixels, num_samples)
    judge = evaluation.make_extractor(pixels, cache_dir=cache_dir)
    if not isinstance(judge, glyph_net.GlyphClassifier):
        raise ValueError(f"{pixels['name']!r} has no attribute classifier; use glyphs")
    ref = evaluation.reference_stats(judge, pixels, "train", cache_dir)
    floor = evaluation.real_floor(judge, pixels, num_samples=num_samples, cache_dir=cache_dir)
    bs = min(batch_size, num_samples)
    tokenizer = conditioning.tokenizer(config)
    if guidance == "cfg":
        sample_fn, params_of = tasks.image_sample_fn(
            config, model, schedules.build(config.schedule), (bs, *spec.image_shape)
        )
        conditions_of = tokenizer.encode_batch
    else:
        if not guide:
            raise ValueError(f"--guidance={guidance} needs --guide=<the guide's workdir>")
        sample_fn, params_of, targets_of = guides.load_guided_sampler(
            config, model, spec, guide, bs
        )

        def conditions_of(captions):
            return {"tokens": tokenizer.encode_batch(captions), "target": targets_of(captions)}

    result = {
        "workdir": os.path.abspath(workdir),
        "checkpoint_step": int(state.step),
        "num_samples": num_samples,
        "seed": seed,
        **evaluation.sampler_info(config),
        "conditioning": config.model.text.conditioning,
        "guidance": guidance,
        "guide": os.path.abspath(guide) if guide else None,
        "chance": chance_levels(),
        "judge_real_accuracy": judge.info.get("real_test", {}).get(pixels["name"], {}).get("all"),
        "fid_floor": floor["fid"],
        "scales": {},
    }
    for scale in scales:
        by_group = {}
        for group in GROUPS:
            captions, target, template = groups[group]
            t0 = time.time()
            images = generate.generate_samples(
                sample_fn,
                params_of(ema_params),
                num_samples,
                bs,
                seed,
                conditions_of(captions),
                guidance_scale=float(scale),
            )
            seconds = time.time() - t0
            predicted = judge.predict_attributes(images)
            record = glyph_net.caption_following(predicted, target)
            new = template == groups["heldout_template"]
            sub = {k: v[new] for k, v in predicted.items()}
            record["exact_match_heldout_template"] = glyph_net.caption_following(
                sub, {k: v[new] for k, v in target.items()}
            )["exact_match"]
            record["num_heldout_template"] = int(new.sum())
            record["sample_seconds"] = round(seconds, 1)
            if group == "seen":
                scores = evaluation.evaluate_samples(
                    judge, images, ref, matched_num_samples=num_samples, seed=0
                )
                record["fid_matched"] = scores["fid_matched"]
                record["fid_matched_ratio"] = scores["fid_matched"] / max(floor["fid"], 1e-12)
            by_group[group] = record
        result["scales"][str(scale)] = by_group
    return result


def markdown(result: dict) -> str:
    """The record as a table: one row per (scale, group)."""
    from diffusion_jax.datasets import glyph_render

    names = list(glyph_render.ATTRIBUTES)
    head = ["scale", "group", *names, "exact", "exact (new template)", "FID / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scale, groups in result["scales"].items():
        for group, r in groups.items():
            ratio = f"{r['fid_matched_ratio']:.2f}x" if "fid_matched_ratio" in r else ""
            cells = [scale, group, *(f"{100 * r[n]:.1f}" for n in names)]
            cells += [f"{100 * r['exact_match']:.1f}"]
            cells += [f"{100 * r['exact_match_heldout_template']:.1f}", ratio]
            lines.append("| " + " | ".join(cells) + " |")
    chance = result["chance"]
    cells = ["", "chance", *(f"{100 * chance[n]:.1f}" for n in names)]
    lines.append("| " + " | ".join(cells + [f"{100 * chance['exact_match']:.4f}", "", ""]) + " |")
    real = result.get("judge_real_accuracy") or {}
    if real:
        cells = ["", "judge on real", *(f"{100 * real[n]:.1f}" for n in names)]
        lines.append("| " + " | ".join(cells + [f"{100 * real['exact_match']:.1f}", "", ""]) + " |")
    return "\n".join(lines)


def main(overrides: dict) -> dict:
    from diffusion_jax import runtime
    from diffusion_jax.workdir import ConfigError

    runtime.configure_cpu_xla_flags()
    try:
        scales = [float(s) for s in FLAGS.scales]
        result = run(
            FLAGS.workdir,
            num_samples=FLAGS.num_samples,
            scales=scales,
            batch_size=FLAGS.batch_size,
            seed=FLAGS.seed,
            cache_dir=FLAGS.cache_dir,
            overrides=overrides,
            guidance=FLAGS.guidance,
            guide=FLAGS.guide,
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    out = FLAGS.out or os.path.join(FLAGS.workdir, f"text_eval_{FLAGS.guidance}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(markdown(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    cli.run(main, FLAGS, __doc__)
