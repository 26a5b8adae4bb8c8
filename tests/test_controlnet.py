"""ControlNet (models/controlnet.py, adapted.ControlledModel) and the control signals
(controls.py): exactness at initialisation and at scale 0, the controls against hand-made
images, and a tiny ControlNet run through the trainer and the sample CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import adapters, conditioning, controls, data, generate, train
from diffusion_jax.adapted import ControlledModel
from diffusion_jax.models import build_model
from diffusion_jax.models.controlnet import ControlNet, copy_encoder, own_parameter

from helpers import UNET_TINY, cli, perturb_params, tiny_config, tiny_model_cfg


@pytest.fixture(scope="module")
def unet():
    """A tiny class-conditional UNet with perturbed (non-zero output) parameters."""
    model = build_model(tiny_model_cfg("unet", num_classes=10))
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t, y = jnp.array([0, 250, 500, 999]), jnp.array([1, 2, 3, 10])
    params = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x, t, y)["params"]
    return model, perturb_params(params, scale=0.1), (x, t, y)


def test_a_fresh_controlnet_leaves_the_unet_exactly_unchanged(unet):
    """The copy starts as the UNet's encoder (same names, same values); every residual is
    exactly 0, so UNet(..., control=residuals) equals the UNet bit for bit, for a hint at
    the input size and at 4x it (a pixel control for latents). Non-zero residuals change
    the output; a wrong hint size or residual count is refused."""
    model, params, (x, t, y) = unet
    net = ControlNet.of(model)
    base_out = model.apply({"params": params}, x, t, y)
    for size in (8, 32):
        hint = jax.random.uniform(jax.random.key(size), (4, size, size, 1))
        fresh = net.init(jax.random.key(2), x, t, y, hint=hint)["params"]
        copied = copy_encoder(fresh, params)
        shared = [k for k in copied if not own_parameter(k)]
        assert "conv_in" in shared and "mid_attn" in shared and not any("up" in k for k in shared)
        for key in shared:
            for a, b in zip(jax.tree.leaves(copied[key]), jax.tree.leaves(params[key])):
                np.testing.assert_array_equal(a, b)
        residuals = net.apply({"params": copied}, x, t, y, hint=hint)
        assert len(residuals) == 5 and all(not np.any(r) for r in residuals)
        out = model.apply({"params": params}, x, t, y, control=residuals)
        np.testing.assert_array_equal(out, base_out)

    moved = perturb_params(copied, seed=3, scale=0.05)
    residuals = net.apply({"params": moved}, x, t, y, hint=hint)
    assert not np.array_equal(model.apply({"params": params}, x, t, y, control=residuals), base_out)
    # ControlledModel: the scale multiplies every residual; a float scale stays a float
    # through generate_samples' condition arrays (it once became int32: 0.5 -> 0)
    controlled = ControlledModel(model, params, net, "edges", (32, 32, 1))
    cond = {"y": y, "hint": hint, "scale": jnp.full((4,), 0.5)}
    half = controlled.apply({"params": moved}, x, t, cond)
    want = model.apply({"params": params}, x, t, y, control=[0.5 * r for r in residuals])
    np.testing.assert_allclose(half, want, atol=1e-6)
    assert generate._condition_array(np.full(4, 0.5)).dtype == np.float32
    assert generate._condition_array([1, 2]).dtype == np.int32
    with pytest.raises(ValueError, match="times a power of two"):
        net.apply({"params": moved}, x, t, y, hint=jnp.zeros((4, 24, 24, 1)))
    with pytest.raises(ValueError, match="this UNet takes 5"):
        model.apply({"params": params}, x, t, y, control=residuals[:4])


@pytest.mark.parametrize("kind", ["cross", "pooled"])
def test_a_caption_controlnet_starts_as_its_base_and_reads_the_caption(kind):
    """Over a caption-conditioned UNet (models/text.py's TextConditional), the ControlNet
    copies the UNet's encoder, never the text encoder, and reads the caption through the
    base's frozen text encoder: a fresh one leaves the base's output bit for bit; a moved
    one changes it, its residuals depend on the caption, and the sampling view (one
    {"base", "control"} tree) gives the training view's output exactly."""
    cfg = {
        "name": "unet",
        "num_classes": 0,
        "unet": dict(UNET_TINY, dropout=0.0),
        "text": dict(vocab_size=12, max_length=6, width=16, depth=1, num_heads=2),
    }
    cfg["text"]["conditioning"] = kind
    model = build_model(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t, tokens = jnp.array([10, 900]), jnp.array([[3, 4, 5, 0, 0, 0], [6, 7, 0, 0, 0, 0]])
    params = jax.jit(model.init)(jax.random.key(1), x, t, tokens)["params"]
    params = perturb_params(params, scale=0.1)
    net = ControlNet.of(model.backbone)
    controlled = ControlledModel(model, params, net, "mask", (8, 8, 1))
    cond = {"y": tokens, "hint": (jax.random.uniform(jax.random.key(2), x.shape) > 0.5) * 1.0}
    fresh = jax.jit(controlled.init)(jax.random.key(3), x, t, cond)["params"]
    shared = [k for k in fresh if not own_parameter(k)]
    assert "conv_in" in shared and "encoder" not in fresh and "encoder" in params
    for key in shared:
        for a, b in zip(jax.tree.leaves(fresh[key]), jax.tree.leaves(params["backbone"][key])):
            np.testing.assert_array_equal(a, b)
    base_out = model.apply({"params": params}, x, t, tokens)
    np.testing.assert_array_equal(controlled.apply({"params": fresh}, x, t, cond), base_out)

    moved = perturb_params(fresh, seed=4, scale=0.05)
    out = controlled.apply({"params": moved}, x, t, cond)
    assert float(jnp.abs(out - base_out).max()) > 1e-3
    joint = controlled.sampling_params(moved)
    np.testing.assert_array_equal(controlled.apply({"params": joint}, x, t, cond), out)

    def residuals(caption):
        text = model.apply({"params": params}, caption, method="text_inputs")
        return net.apply({"params": moved}, x, t, None, hint=cond["hint"], **text)

    other = tokens.at[:, 0].set(8)
    changed = [float(jnp.abs(a - b).max()) for a, b in zip(residuals(tokens), residuals(other))]
    assert max(changed) > 1e-4, changed


def test_controls_on_hand_made_images():
    """edges: a -1 | +1 step has Sobel magnitude 8 on the two columns beside the step and
    0 elsewhere (threshold 4); mask: a coloured square on another colour is the square;
    iou against hand counts."""
    step = np.full((1, 6, 6, 3), -1.0, np.float32)
    step[:, :, 3:] = 1.0
    want = np.zeros((1, 6, 6, 1), np.float32)
    want[:, :, 2:4] = 1.0
    np.testing.assert_array_equal(controls.edges(step), want)

    image = np.zeros((2, 8, 8, 3), np.float32) + np.array([-1.0, 1.0, -1.0], np.float32)
    image[:, 2:5, 3:7] = np.array([1.0, -1.0, -1.0], np.float32)
    square = np.zeros((2, 8, 8, 1), np.float32)
    square[:, 2:5, 3:7] = 1.0
    np.testing.assert_array_equal(controls.mask(image), square)

    other = np.zeros_like(square)
    other[0, 2:5, 3:5] = 1.0  # half the square: IoU 6 / 12
    np.testing.assert_allclose(controls.iou(other, square), [0.5, 0.0])
    np.testing.assert_allclose(controls.iou(np.zeros_like(square), np.zeros_like(square)), 1.0)
    with pytest.raises(ValueError, match="unknown adapter.control 'canny'"):
        controls.extract("canny", image)


def test_guidance_and_dropout_keep_the_control():
    """The unconditional branch and condition dropout null the label, never the control."""
    model_cfg = tiny_config(**{"model.num_classes": 10}).model
    y = {"y": jnp.array([1, 2, 3, 4]), "hint": jnp.ones((4, 8, 8, 1))}
    null = conditioning.null_like(model_cfg, y)
    np.testing.assert_array_equal(null["y"], 10)
    np.testing.assert_array_equal(null["hint"], y["hint"])
    dropped = conditioning.drop(jax.random.key(0), y, jnp.arange(4), 1.0, 10)
    np.testing.assert_array_equal(dropped["y"], 10)
    np.testing.assert_array_equal(dropped["hint"], y["hint"])


def test_controlnet_run_trains_the_copy_and_samples_at_a_scale(tmp_path, digits_dir):
    """A ControlNet over a tiny class-conditional digits base: the run's parameters are
    the ControlNet's (no decoder); sampling at --control_scale=0 is the base's sampling
    bit for bit (the residuals are multiplied by 0); at scale 1 the trained copy changes
    the samples; --control reads images and their controls go to the npz."""
    common = {"data.data_dir": str(digits_dir), "model.num_classes": 10}
    base = str(tmp_path / "base")
    train.train_and_evaluate(tiny_config(**common), base)
    run = str(tmp_path / "cn")
    cn = {"adapter.kind": "controlnet", "adapter.base": base, "train.num_steps": 4}
    state = train.train_and_evaluate(tiny_config(**common, **cn), run)
    assert any(own_parameter(k) for k in state.params)
    assert not any(k.startswith("up") or k == "conv_out" for k in state.params)

    def sample(workdir_path, *args):
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
        r = cli("diffusion_jax.sample", f"--workdir={workdir_path}", "--num_samples=4",
                f"--npz={out}", *args)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return np.load(out)

    off = sample(run, "--control_scale=0")
    plain = sample(base, "--labels=" + ",".join(str(v) for v in off["labels"]))
    np.testing.assert_array_equal(off["images"], plain["images"])
    on = sample(run)
    assert not np.array_equal(on["images"], off["images"])
    test_images, test_labels = data.load_split_arrays(tiny_config(**common).data, "test")
    np.testing.assert_array_equal(on["control"], controls.edges(test_images[:4]))
    assert on["control"].mean() > 0.2  # the default controls: the first test digits' edges
    np.testing.assert_array_equal(on["labels"], test_labels[:4])
    np.savez(tmp_path / "ctl.npz", images=plain["images"])
    given = sample(run, f"--control={tmp_path / 'ctl.npz'}", "--labels=2")
    np.testing.assert_array_equal(given["control"], controls.edges(plain["images"] / 127.5 - 1))
    assert set(given["labels"]) == {2}

    r = cli("diffusion_jax.sample", f"--workdir={base}", "--control_scale=0.5")
    assert r.returncode != 0 and "need a ControlNet workdir" in r.stderr
    with pytest.raises(ValueError, match="latent datasets are not supported"):
        adapters.check_config(tiny_config(**common, **cn, **{"data.name": "latents"}))
    with pytest.raises(ValueError, match="unknown adapter.control 'canny'"):
        adapters.check_config(tiny_config(**common, **cn, **{"adapter.control": "canny"}))
