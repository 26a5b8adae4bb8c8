r"""Sample from, or edit images with, a trained workdir's latest EMA checkpoint.

  python -m diffusion_jax.sample --workdir=runs/digits --num_samples=64 \
      [--config.sampler.name=dpmpp_2m --config.sampler.spacing=logsnr \
       --config.sampler.num_steps=20 --config.sampler.guidance_scale=2 --labels=3]
  python -m diffusion_jax.sample --workdir=runs/digits --mode=img2img --input=in.npz --strength=0.6
  python -m diffusion_jax.sample --workdir=runs/digits --mode=inpaint --input=a.png,b.png --mask=top
  python -m diffusion_jax.sample --workdir=runs/digits --mode=invert --input=in.npz --labels=7
  python -m diffusion_jax.sample --workdir=runs/digits --lora=runs/digits_lora --lora_scale=0.5
  python -m diffusion_jax.sample --workdir=runs/glyphs --num_samples=16 \
      --prompt="a large bold upright red serif letter A on a blue background" \
      [--prompts_file=prompts.txt --negative_prompt="..."]

Modes (see steps.make_sample_fn): sample (from noise), img2img (SDEdit: noise the inputs
to --strength and denoise), inpaint (keep the inputs where --mask is 1, fill in the rest;
--repaint_resample > 1 adds RePaint resampling), invert (DDIM-invert the inputs under
their own labels and regenerate them under --labels; prints the round-trip RMS).

--input: comma-separated PNG files (grayscale or RGB, one image each) or one .npz with
``images`` uint8 [N, H, W, C] (as written by --npz; its ``labels``, if any, are the
inputs' labels). Images must already have the model's size and channels. --mask: a PNG
(white/>= 128 = known) or .npz with ``mask`` ([H, W], [H, W, C] or [N, H, W, C], 1 = known),
or a named mask: top, bottom, left, right (that half is known) or center (the central
square is generated, the border known).

Sampler settings come from the workdir's config.json; ``--config.KEY=VALUE`` overrides any
key of it (usually ``sampler.*``), checked like a training config. ``--seed=S`` with the
default batch size redraws the training run's sample grids (they use seed config.seed + 1).

Text models (model.text) take --prompt or --prompts_file instead of --labels, and
--negative_prompt (guidance pushes away from it instead of from the empty caption); a word
outside the training vocabulary is an error that names the closest known words.

ControlNet workdirs (adapter.kind=controlnet) take --control=IMAGES (PNG files or an .npz;
their control, e.g. edges, is what the samples follow; default the first test images) and
--control_scale; the grid shows each control next to its sample.

LoRA (adapters.py): --lora=W samples --workdir (the base) with the LoRA workdir W merged
into it at --lora_scale (0 = the base, 1 = as trained); a LoRA workdir given as --workdir
samples the same way over the base it recorded.

Writes a PNG grid (default <workdir>/samples/<mode>_<sampler>.png; edit modes show each
input, masked for inpaint, next to its output; text models get one row per prompt with the
prompt above it) and optionally the raw outputs as uint8 images with their class labels
(text models: tokens, and the prompts) to an .npz (keys: images, labels[, prompts]).
"""

import os

import numpy as np
from absl import flags

from diffusion_jax import (
    adapted,
    adapters,
    cli,
    conditioning,
    controls,
    data,
    generate,
    guides,
    latent_space,
    metrics,
    prompts,
    runtime,
    samplers,
    schedules,
    steps,
)
from diffusion_jax.edit_inputs import MASKS, load_images, load_mask, parse_interval, parse_labels
from diffusion_jax.models import is_autoencoder
from diffusion_jax.workdir import (
    ConfigError,
    check_config,
    ensure_writable_dir,
    ensure_writable_file,
    load_config,
    load_state,
    require_checkpoint,
    run_spec,
)

# Own FlagValues: importable next to the other CLIs, whose flags share names.
FLAGS = flags.FlagValues()
OWN = dict(flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "A workdir written by diffusion_jax.main.", **OWN)
flags.DEFINE_enum("mode", "sample", list(samplers.MODES), "What to do (see the module doc).", **OWN)
flags.DEFINE_integer(
    "num_samples",
    64,
    "How many samples (edit modes: default one per input; more cycles the inputs).",
    **OWN,
)
flags.DEFINE_integer("batch_size", 256, "Samples per compiled call.", **OWN)
flags.DEFINE_string(
    "guidance_interval",
    "",
    "'t_lo,t_hi': guide only at schedule indices in [t_lo, t_hi] (default: all).",
    **OWN,
)
flags.DEFINE_float(
    "guidance_rescale", None, "Guidance rescale phi in [0, 1] (default: off).", **OWN
)
flags.DEFINE_string(
    "labels",
    "",
    "Comma-separated class labels cycled over samples "
    "(default: 0..num_classes-1 cycled, or the --input .npz's labels; "
    "invert: the labels to regenerate with). Class-conditional models only.",
    **OWN,
)
flags.DEFINE_string("prompt", "", "Text models: the caption every sample is drawn under.", **OWN)
flags.DEFINE_string(
    "prompts_file",
    "",
    "Text models: a file of prompts, one per line; the samples are split into one row per "
    "prompt (default: the first 8 training captions).",
    **OWN,
)
flags.DEFINE_string(
    "negative_prompt",
    "",
    "Text models: guide away from this caption instead of the empty one.",
    **OWN,
)
flags.DEFINE_enum(
    "guidance",
    "cfg",
    ["cfg", "classifier", "clip"],
    "Text models: classifier-free guidance only (cfg, scale sampler.guidance_scale), or on "
    "top of it the gradient of the noise-aware classifier / CLIP in --guide, scaled by "
    "--guide_scale.",
    **OWN,
)
flags.DEFINE_string("guide", "", "--guidance=classifier|clip: the guide's workdir.", **OWN)
flags.DEFINE_float("guide_scale", 1.0, "Scale of the guide's gradient.", **OWN)
flags.DEFINE_string(
    "lora",
    "",
    "A LoRA workdir trained on --workdir (adapter.kind=lora): sample the base with it merged.",
    **OWN,
)
flags.DEFINE_float(
    "lora_scale",
    1.0,
    "Strength of the LoRA (--lora, or a LoRA --workdir): W + scale * delta; 0 = the base.",
    **OWN,
)
flags.DEFINE_string(
    "control",
    "",
    "ControlNet workdirs: images (PNG files or an .npz, like --input) whose control "
    "(adapter.control: edges, mask) the samples follow; default the first test images.",
    **OWN,
)
flags.DEFINE_float(
    "control_scale", 1.0, "ControlNet workdirs: the conditioning scale (0 = the base).", **OWN
)
flags.DEFINE_string(
    "input",
    "",
    "img2img / inpaint / invert: PNG file(s), comma-separated, "
    "or an .npz with uint8 'images' [N, H, W, C].",
    **OWN,
)
flags.DEFINE_string(
    "mask", "", f"inpaint: PNG, .npz with 'mask' (1 = known) or one of {', '.join(MASKS)}.", **OWN
)
flags.DEFINE_float(
    "strength",
    0.5,
    "img2img: fraction of the sampler's steps to run "
    "(0 = return the input, 1 = sample from noise).",
    **OWN,
)
flags.DEFINE_integer("repaint_jump", 10, "inpaint: RePaint jump length (in sampler steps).", **OWN)
flags.DEFINE_integer(
    "repaint_resample", 1, "inpaint: RePaint resamplings per jump (1 = plain replacement).", **OWN
)
flags.DEFINE_string(
    "source_labels",
    "",
    "invert: labels to invert with (default: the --input .npz's labels, else --labels).",
    **OWN,
)
flags.DEFINE_integer("seed", 0, "Sampling seed.", **OWN)
flags.DEFINE_string("out", "", "PNG path (default <workdir>/samples/<mode>_<sampler>.png).", **OWN)
flags.DEFINE_string("npz", "", "If set, also write uint8 images + labels to this .npz.", **OWN)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def setup(overrides: dict):
    """Everything that can fail on user input, before any compile: (config, model, spec,
    params, step, n, labels, inputs dict). Raises ConfigError / ValueError /
    FileNotFoundError."""
    if FLAGS.num_samples < 1:
        raise ConfigError(f"--num_samples must be >= 1, got {FLAGS.num_samples}")
    if FLAGS.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    config = load_config(FLAGS.workdir)
    require_checkpoint(FLAGS.workdir)
    cli.apply_overrides(config, overrides)
    if is_autoencoder(config.model):
        raise ConfigError(
            f"{FLAGS.workdir} holds an autoencoder, which does not sample; score its "
            f"reconstructions with `python -m diffusion_jax.evaluate --workdir={FLAGS.workdir}`"
        )
    spec = run_spec(FLAGS.workdir, config)
    check_config(config, spec, training=False)
    mode = FLAGS.mode
    if conditioning.kind(config.model) == "caption" and (FLAGS.labels or FLAGS.source_labels):
        raise ConfigError("a text model takes --prompt or --prompts_file, not --labels")
    if mode == "invert" and config.sampler.name != "ddim" and "sampler.name" in overrides:
        raise ConfigError(
            "--mode=invert always uses deterministic DDIM; drop --config.sampler.name"
        )
    if mode == "sample" and (FLAGS.input or FLAGS.mask):
        raise ConfigError("--input/--mask need --mode=img2img, inpaint or invert")
    if mode != "sample" and not FLAGS.input:
        raise ConfigError(f"--mode={mode} needs --input")
    if mode == "inpaint" and not FLAGS.mask:
        raise ConfigError("--mode=inpaint needs --mask")
    if not 0.0 <= FLAGS.strength <= 1.0:
        raise ConfigError(f"--strength must be in [0, 1], got {FLAGS.strength}")
    # the images a latent run's inputs and outputs are (its source dataset's)
    pixel_shape = latent_space.pixel_shape(config, spec)
    interval = parse_interval(FLAGS.guidance_interval)
    num_classes = config.model.num_classes
    inputs = {"interval": interval}
    n = FLAGS.num_samples
    if mode != "sample":
        images, input_labels = load_images(FLAGS.input, pixel_shape)
        n = n if FLAGS["num_samples"].present else len(images)
        inputs["images"] = np.resize(images, (n, *images.shape[1:]))
        if input_labels is not None and num_classes:
            input_labels = np.resize(input_labels, n)
            if input_labels.min() < 0 or input_labels.max() >= num_classes:
                input_labels = None
        else:
            input_labels = None
        if mode == "inpaint":
            mask = load_mask(FLAGS.mask, pixel_shape)
            inputs["mask"] = mask if mask.ndim == 3 else np.resize(mask, (n, *mask.shape[1:]))
        if mode == "invert":
            inputs["source_labels"] = (
                parse_labels(FLAGS.source_labels, n, num_classes, "--source_labels")
                if FLAGS.source_labels or input_labels is None
                else input_labels
            )
            default = inputs["source_labels"]
        else:
            default = input_labels
        labels = (
            parse_labels(FLAGS.labels, n, num_classes)
            if FLAGS.labels or default is None
            else default
        )
    else:
        labels = parse_labels(FLAGS.labels, n, num_classes)
    if FLAGS.guidance != "cfg" and (mode != "sample" or not FLAGS.guide):
        raise ConfigError(f"--guidance={FLAGS.guidance} needs --mode=sample and --guide=WORKDIR")
    if conditioning.kind(config.model) == "caption":
        labels = _caption_conditions(config, n, inputs)
    elif FLAGS.prompt or FLAGS.prompts_file or FLAGS.negative_prompt:
        raise ConfigError(
            "--prompt/--prompts_file/--negative_prompt need a text model; this one is "
            f"conditioned on {conditioning.kind(config.model)} (use --labels for classes)"
        )
    # last of the checks: the probes create the output directories
    if FLAGS.out:
        ensure_writable_file(FLAGS.out, "--out", image=True)
    else:
        ensure_writable_dir(os.path.join(FLAGS.workdir, "samples"), "the default --out directory")
    if FLAGS.npz:
        ensure_writable_file(FLAGS.npz, "--npz")
    model, spec, state = load_state(FLAGS.workdir, config)
    params, step = state.ema_params, int(state.step)
    if FLAGS.lora:
        model, params = adapters.load_lora_onto(FLAGS.lora, FLAGS.workdir)
    elif FLAGS["lora_scale"].present and not isinstance(model, adapted.LoraModel):
        raise ConfigError("--lora_scale needs --lora=WORKDIR or a LoRA --workdir")
    model, params = adapters.for_sampling(model, params, FLAGS.lora_scale)
    if isinstance(model, adapted.ControlledModel):
        images = None
        if FLAGS.control:
            images = load_images(FLAGS.control, pixel_shape)[0].astype(np.float32) / 127.5 - 1
        test_conditions = not (FLAGS.labels or FLAGS.prompt or FLAGS.prompts_file)
        labels = adapters.controlled_condition(
            config, model, n, labels, images, FLAGS.control_scale, test_labels=test_conditions
        )
        inputs["control"] = labels["hint"]
        if test_conditions and images is None:  # each sample has its test image's caption:
            inputs.pop("prompts", None)  # no rows of one prompt to title the grid with
    elif FLAGS.control or FLAGS["control_scale"].present:
        raise ConfigError("--control/--control_scale need a ControlNet workdir")
    return config, model, spec, params, step, n, labels, inputs


def _caption_conditions(config, n: int, inputs: dict) -> np.ndarray:
    """Tokens [n, L] of the prompts (default: the first 8 training captions); records
    the prompts, the negative prompt's tokens and (invert) the source captions in
    ``inputs``."""
    texts = prompts.read_prompts(FLAGS.prompt, FLAGS.prompts_file)
    if not texts:
        texts, _ = data.load_split_captions(
            latent_space.pixel_data_config(config), "train", min(n, 8)
        )
    tokenizer = conditioning.tokenizer(config)
    tokens = prompts.encode(tokenizer, texts, n, "--prompt")
    inputs["prompts"] = texts
    inputs["negative"] = prompts.negative_tokens(tokenizer, FLAGS.negative_prompt, n)
    if FLAGS.mode == "invert":
        inputs["source_labels"] = tokens
    return tokens


def _expanded_prompts(inputs: dict, n: int) -> list[str]:
    """The prompt of each of the n samples (``prompts.prompt_rows``)."""
    texts = inputs["prompts"]
    return [texts[i] for i in prompts.prompt_rows(len(texts), n)]


def main(overrides: dict):
    runtime.configure_cpu_xla_flags()
    try:
        config, model, spec, params, step, n, labels, inputs = setup(overrides)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as e:
        cli.fail(str(e))
    mode, s_cfg = FLAGS.mode, config.sampler
    bs = min(FLAGS.batch_size, n)
    sample_fn = steps.make_sample_fn(
        model,
        schedules.build(config.schedule),
        config,
        (bs, *spec.image_shape),
        mode=mode,
        strength=FLAGS.strength,
        jump_length=FLAGS.repaint_jump,
        jump_n_sample=FLAGS.repaint_resample,
        guidance_interval=inputs["interval"],
        guidance_rescale=FLAGS.guidance_rescale,
    )
    space = latent_space.load(config)
    scale = s_cfg.guidance_scale
    if FLAGS.guidance != "cfg":  # classifier / CLIP guidance on top of cfg (text models)
        try:
            sample_fn, params_of, targets_of = guides.load_guided_sampler(
                config, model, spec, FLAGS.guide, bs
            )
        except (ConfigError, FileNotFoundError, ValueError) as e:
            cli.fail(str(e))
        labels = {"tokens": labels, "target": targets_of(_expanded_prompts(inputs, n))}
        params, scale = params_of(params), FLAGS.guide_scale
    elif space is not None:  # sample latents, decode; inputs are encoded, masks pooled
        sample_fn = latent_space.wrap_sample_fn(sample_fn, space)
        params = (params, space.params)
    images_in = inputs.get("images")
    x_in = None if images_in is None else images_in.astype(np.float32) / 127.5 - 1.0
    mask = inputs.get("mask")

    def run(target_labels, guidance_scale):
        return generate.generate_samples(
            sample_fn,
            params,
            n,
            bs,
            FLAGS.seed,
            target_labels,
            guidance_scale=guidance_scale,
            images=x_in,
            mask=mask,
            source_labels=inputs.get("source_labels"),
            negative=inputs.get("negative"),
        )

    try:
        images = run(labels, scale)
    except ValueError as e:  # e.g. a mask that does not broadcast to the batch
        cli.fail(str(e))
    sampler = "ddim" if mode == "invert" else s_cfg.name  # invert: always DDIM
    if sampler == "ddpm":  # all T steps: "ddpm"; respaced to N: "ddpmN"
        num_steps = samplers.ddpm_num_steps(config.schedule.num_timesteps, s_cfg.respacing)
        name = sampler + (f"{num_steps}" if s_cfg.respacing else "")
    else:
        num_steps = s_cfg.num_steps
        name = f"{sampler}{num_steps}"
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples", f"{mode}_{name}.png")
    upscale = max(1, 32 // images.shape[1])
    if mode == "sample" and "prompts" in inputs:
        grid = prompts.captioned_grid(images, inputs["prompts"], upscale=upscale)
    elif mode == "sample" and "control" in inputs:  # each control next to its sample
        shown = np.broadcast_to(inputs["control"] * 2.0 - 1.0, images.shape)
        pairs = np.stack([shown, images], axis=1).reshape(-1, *images.shape[1:])
        grid = metrics.make_grid(pairs, ncols=2 * int(np.ceil(np.sqrt(n))), upscale=upscale)
    elif mode == "sample":
        grid = metrics.make_grid(images, upscale=upscale)
    else:
        # each input (inpaint: its unknown region gray) next to its output
        shown = x_in if mask is None else x_in * mask
        pairs = np.stack([shown, images], axis=1).reshape(-1, *images.shape[1:])
        grid = metrics.make_grid(pairs, ncols=2 * int(np.ceil(np.sqrt(n))), upscale=upscale)
    metrics.save_png(out, grid)
    extra = {
        "img2img": f", strength {FLAGS.strength}",
        "inpaint": f", mask {FLAGS.mask}, repaint {FLAGS.repaint_resample}x{FLAGS.repaint_jump}",
    }.get(mode, "")
    if FLAGS.guidance != "cfg":
        extra += f", {FLAGS.guidance} guidance {FLAGS.guide_scale} from {FLAGS.guide}"
    print(
        f"wrote {out} ({mode}, {n} images, step {step}, sampler {sampler}, {num_steps} steps, "
        f"eta {0.0 if mode == 'invert' else s_cfg.eta}, guidance {s_cfg.guidance_scale}{extra})"
    )
    if "control" in inputs:  # how well the samples follow their controls
        followed = controls.iou(controls.extract(model.control, images), inputs["control"])
        print(
            f"control IoU {followed.mean():.3f} (mean over {n} samples, scale {FLAGS.control_scale})"
        )
    if mode == "invert":
        # the round trip: invert and regenerate under the source labels, unguided
        same = np.array_equal(labels, inputs["source_labels"]) and s_cfg.guidance_scale == 1.0
        recon = images if same else run(inputs["source_labels"], 1.0)
        rms = float(np.sqrt(np.mean((recon - x_in) ** 2)))
        print(f"invert: round-trip (same labels) RMS {rms:.4f} in [-1, 1] units")
    if FLAGS.npz:
        extra_arrays = {"prompts": np.asarray(inputs["prompts"])} if "prompts" in inputs else {}
        if "control" in inputs:  # ControlNet: the base's labels, and the controls
            labels, extra_arrays = labels["y"], {"control": inputs["control"]}
        elif isinstance(labels, dict):  # guided: the caption tokens are the labels
            labels = labels["tokens"]
        np.savez(FLAGS.npz, images=metrics.to_uint8(images), labels=labels, **extra_arrays)
        print(f"wrote {FLAGS.npz}")


if __name__ == "__main__":
    cli.run(main, FLAGS, __doc__)
