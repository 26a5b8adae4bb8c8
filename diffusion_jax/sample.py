r"""Sample from, or edit images with, a trained workdir's latest EMA checkpoint.

  python -m diffusion_jax.sample --workdir=runs/digits --num_samples=64 \
      [--config.sampler.name=dpmpp_2m --config.sampler.spacing=logsnr \
       --config.sampler.num_steps=20 --config.sampler.guidance_scale=2 --labels=3]
  python -m diffusion_jax.sample --workdir=runs/digits --mode=img2img --input=in.npz --strength=0.6
  python -m diffusion_jax.sample --workdir=runs/digits --mode=inpaint --input=a.png,b.png --mask=top
  python -m diffusion_jax.sample --workdir=runs/digits --mode=invert --input=in.npz --labels=7

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

Writes a PNG grid (default <workdir>/samples/<mode>_<sampler>.png; edit modes show each
input, masked for inpaint, next to its output) and optionally the raw outputs as uint8
images with their class labels to an .npz (keys: images, labels).
"""

import os

import numpy as np
from absl import flags

from diffusion_jax import cli, data, generate, metrics, runtime, samplers, schedules, steps
from diffusion_jax.workdir import ConfigError, check_config, load_config, load_state

MASKS = ("top", "bottom", "left", "right", "center")

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


def parse_labels(text: str, n: int, num_classes: int, flag: str = "--labels") -> np.ndarray:
    if not text:
        return generate.class_balanced_labels(num_classes, n)
    if num_classes == 0:
        raise ConfigError(f"{flag} given but the model is unconditional")
    try:
        labels = np.array([int(x) for x in text.split(",")], np.int32)
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"{flag} must be in 0..{num_classes - 1}")
    return np.resize(labels, n)


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape)


def load_images(spec_arg: str, image_shape):
    """(uint8 [N, H, W, C], labels [N] or None) from --input, checked against the model's
    (H, W, C); raises ConfigError with a one-line reason."""
    from PIL import Image

    paths = [p for p in spec_arg.split(",") if p]
    for p in paths:
        if not os.path.exists(p):
            raise ConfigError(f"--input file {p} not found")
    labels = None
    if len(paths) == 1 and paths[0].endswith(".npz"):
        with np.load(paths[0]) as f:
            if "images" not in f:
                raise ConfigError(f"{paths[0]} has no 'images' array (keys: {list(f.keys())})")
            images = f["images"]
            labels = f["labels"].astype(np.int32) if "labels" in f else None
        if images.ndim == 3:  # [N, H, W] grayscale
            images = images[..., None]
        if images.ndim != 4:
            raise ConfigError(
                f"{paths[0]}: 'images' must be [N, H, W, C], got shape {images.shape}"
            )
        if images.dtype != np.uint8:
            raise ConfigError(f"{paths[0]}: 'images' must be uint8 (0..255), got {images.dtype}")
    else:
        arrays = []
        for p in paths:
            if not p.lower().endswith(".png"):
                raise ConfigError(f"--input {p}: expected .png files or one .npz")
            img = Image.open(p)
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB" if image_shape[2] == 3 else "L")
            a = np.asarray(img, np.uint8)
            arrays.append(a[..., None] if a.ndim == 2 else a)
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ConfigError(f"--input PNGs differ in size: {sorted(shapes)}")
        images = np.stack(arrays)
    if images.shape[1:] != tuple(image_shape):
        raise ConfigError(
            f"--input images are {_shape_text(images.shape[1:])} (HxWxC) but the model "
            f"expects {_shape_text(image_shape)}; resize/convert them first"
        )
    if labels is not None and labels.shape != (images.shape[0],):
        labels = None
    return images, labels


def load_mask(spec_arg: str, image_shape) -> np.ndarray:
    """float32 mask (1 = known) broadcastable to [N, H, W, C] from --mask."""
    from PIL import Image

    h, w, c = image_shape
    if spec_arg in MASKS:
        m = np.zeros((h, w, 1), np.float32)
        if spec_arg == "top":
            m[: h // 2] = 1
        elif spec_arg == "bottom":
            m[h - h // 2 :] = 1
        elif spec_arg == "left":
            m[:, : w // 2] = 1
        elif spec_arg == "right":
            m[:, w - w // 2 :] = 1
        else:
            m[:] = 1
            m[h // 4 : h - h // 4, w // 4 : w - w // 4] = 0
        return m
    if not os.path.exists(spec_arg):
        raise ConfigError(f"--mask {spec_arg!r} is neither a file nor one of {MASKS}")
    if spec_arg.endswith(".npz"):
        with np.load(spec_arg) as f:
            if "mask" not in f:
                raise ConfigError(f"{spec_arg} has no 'mask' array (keys: {list(f.keys())})")
            m = np.asarray(f["mask"], np.float32)
        if m.ndim == 2:
            m = m[..., None]
    else:
        m = (np.asarray(Image.open(spec_arg).convert("L"), np.float32) >= 128)[..., None]
        m = m.astype(np.float32)
    if m.ndim not in (3, 4) or m.shape[-3:-1] != (h, w) or m.shape[-1] not in (1, c):
        raise ConfigError(
            f"--mask is {_shape_text(m.shape)} but the images are "
            f"{_shape_text(image_shape)} (HxWxC; mask HxW, HxWx1, HxWxC "
            "or NxHxWxC)"
        )
    if np.any((m < 0) | (m > 1)):
        raise ConfigError("--mask values must lie in [0, 1] (1 = known)")
    return m


def parse_interval(text: str):
    if not text:
        return None
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance_interval must be 't_lo,t_hi', got {text!r}") from None
    return lo, hi


def setup(overrides: dict):
    """Everything that can fail on user input, before any compile: (config, model, spec,
    params, step, n, labels, inputs dict). Raises ConfigError / ValueError /
    FileNotFoundError."""
    config = load_config(FLAGS.workdir)
    cli.apply_overrides(config, overrides)
    spec = data.dataset_spec(config.data)
    check_config(config, spec, training=False)
    mode = FLAGS.mode
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
    interval = parse_interval(FLAGS.guidance_interval)
    num_classes = config.model.num_classes
    inputs = {"interval": interval}
    n = FLAGS.num_samples
    if mode != "sample":
        images, input_labels = load_images(FLAGS.input, spec.image_shape)
        n = n if FLAGS["num_samples"].present else len(images)
        inputs["images"] = np.resize(images, (n, *images.shape[1:]))
        if input_labels is not None and num_classes:
            input_labels = np.resize(input_labels, n)
            if input_labels.min() < 0 or input_labels.max() >= num_classes:
                input_labels = None
        else:
            input_labels = None
        if mode == "inpaint":
            mask = load_mask(FLAGS.mask, spec.image_shape)
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
    model, spec, state = load_state(FLAGS.workdir, config)
    params, step = state.ema_params, int(state.step)
    return config, model, spec, params, step, n, labels, inputs


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
        )

    try:
        images = run(labels, s_cfg.guidance_scale)
    except ValueError as e:  # e.g. a mask that does not broadcast to the batch
        cli.fail(str(e))
    name = s_cfg.name + (f"{s_cfg.num_steps}" if s_cfg.name != "ddpm" else "")
    if mode == "invert":
        name = f"ddim{s_cfg.num_steps}"
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples", f"{mode}_{name}.png")
    upscale = max(1, 32 // spec.image_shape[0])
    if mode == "sample":
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
    print(
        f"wrote {out} ({mode}, {n} images, step {step}, sampler {name}, eta {s_cfg.eta}, "
        f"guidance {s_cfg.guidance_scale}{extra})"
    )
    if mode == "invert":
        # the round trip: invert and regenerate under the source labels, unguided
        same = np.array_equal(labels, inputs["source_labels"]) and s_cfg.guidance_scale == 1.0
        recon = images if same else run(inputs["source_labels"], 1.0)
        rms = float(np.sqrt(np.mean((recon - x_in) ** 2)))
        print(f"invert: round-trip (same labels) RMS {rms:.4f} in [-1, 1] units")
    if FLAGS.npz:
        np.savez(FLAGS.npz, images=metrics.to_uint8(images), labels=labels)
        print(f"wrote {FLAGS.npz}")


if __name__ == "__main__":
    cli.run(main, FLAGS, __doc__)
