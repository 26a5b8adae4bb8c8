"""LoRA (lora.py) and adapter runs (adapters.py): the exactness claims of the delta, and
LoRA / full fine-tuning through the trainer and the sample CLI on a tiny digits base."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax import adapted, adapters, lora, parallel, train, workdir
from diffusion_jax.models import build_model

from helpers import cli, perturb_params, tiny_config, tiny_model_cfg

UNET_SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def unet():
    """A tiny class-conditional UNet, its params (perturbed: a fresh model's zero output
    layer would make every output 0) and inputs."""
    model = build_model(tiny_model_cfg("unet", num_classes=10))
    x = jax.random.normal(jax.random.key(0), (4, *UNET_SHAPE))
    t, y = jnp.array([0, 250, 500, 999]), jnp.array([1, 2, 3, 10])
    params = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x, t, y)["params"]
    return model, perturb_params(params, scale=0.1), (x, t, y)


def random_b(tree, seed=0, scale=0.1):
    """A LoRA with non-zero B (a fresh one has B = 0)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(tree)
    for path, leaf in flat.items():
        if path[-1] == lora.B:
            flat[path] = jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)
    return traverse_util.unflatten_dict(flat)


def test_fresh_lora_is_bit_identical_and_merge_unmerge_round_trip(unet):
    """B = 0 at init, so the merged parameters and the model output equal the base's bit
    for bit. With a non-zero B, unmerge(merge(W)) = W within 1e-5 (float32 rounding of W +
    delta - delta, |W| and |delta| ~ 0.1-1); the delta is only on the targeted kernels."""
    model, params, args = unet
    fresh = lora.init(params, lora.DEFAULT_TARGETS, 4, jax.random.key(2))
    merged = lora.merge(params, fresh, alpha=4.0)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    apply = jax.jit(lambda p: model.apply({"params": p}, *args))
    np.testing.assert_array_equal(apply(merged), apply(params))

    trained = random_b(fresh)
    merged = lora.merge(params, trained, alpha=4.0)
    assert not np.array_equal(apply(merged), apply(params))
    back = lora.unmerge(merged, trained, alpha=4.0)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    flat_m = traverse_util.flatten_dict(merged, sep="/")
    flat_b = traverse_util.flatten_dict(params, sep="/")
    changed = {k for k in flat_b if not np.array_equal(flat_m[k], flat_b[k])}
    assert changed == set(lora.select(params, lora.DEFAULT_TARGETS))


def test_delta_is_scaled_low_rank_and_convs_factor_into_two_convolutions(unet):
    """W' - W = scale * alpha / r * A @ B (closed form). A 3x3 convolution kernel adapted
    as the [9 * in, out] matrix equals conv(x, W) + conv1x1(conv(x, A as r 3x3 filters), B):
    the reshape convention is LoCon's factorisation (float32 tolerance 1e-4 over sums of
    ~600 products of O(1) terms)."""
    _, params, _ = unet
    tree = random_b(lora.init(params, (r"down1_res0/conv1/kernel$",), 3, jax.random.key(3)))
    factors = tree["down1_res0"]["conv1"]["kernel"]
    a, b = factors[lora.A], factors[lora.B]
    w = params["down1_res0"]["conv1"]["kernel"]  # [3, 3, 16, 32]
    merged = lora.merge(params, tree, alpha=6.0, scale=0.5)["down1_res0"]["conv1"]["kernel"]
    np.testing.assert_allclose(merged - w, 0.5 * 6.0 / 3 * (a @ b).reshape(w.shape), atol=1e-6)

    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 16))
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    low = conv(conv(x, a.reshape(3, 3, 16, 3)), b.reshape(1, 1, 3, 32))
    np.testing.assert_allclose(conv(x, merged), conv(x, w) + 1.0 * low, atol=1e-4)


def test_bad_targets_and_rank_are_refused_with_the_fix(unet):
    _, params, _ = unet
    with pytest.raises(ValueError, match=r"'nope' matches no kernel .*e\.g\. conv_in/kernel"):
        lora.select(params, ("nope",))
    with pytest.raises(ValueError, match="bad regular expression"):
        lora.select(params, ("attn(",))
    with pytest.raises(ValueError, match="exceeds min"):
        lora.init(params, (r"mid_attn/attn/proj/kernel$",), 64, jax.random.key(0))
    other = lora.init({"x": {"kernel": jnp.ones((4, 4))}}, ("kernel",), 2, jax.random.key(0))
    with pytest.raises(ValueError, match="this LoRA was trained on another model"):
        lora.merge(params, other, alpha=1.0)


def test_sampling_merge_scale_is_traced(unet):
    """for_sampling merges at a traced scale: scale 0 is the base exactly, any new scale
    reuses the one compiled merge."""
    model, params, _ = unet
    wrapped = adapted.LoraModel(model, params, lora.DEFAULT_TARGETS, 4, 4.0)
    tree = random_b(lora.init(params, lora.DEFAULT_TARGETS, 4, jax.random.key(5)))
    _, zero = adapters.for_sampling(wrapped, tree, 0.0)
    for a, b in zip(jax.tree.leaves(zero), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    size = adapted._merge._cache_size()
    for scale in (0.3, 1.7):
        base_model, merged = adapters.for_sampling(wrapped, tree, scale)
        want = lora.merge(params, tree, 4.0, scale)
        for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert adapted._merge._cache_size() == size and base_model is model


def test_frozen_arguments_are_not_baked_into_the_program():
    """DataParallel.compile(frozen=...) passes the frozen tree as an argument: the lowered
    program holds no constant of its size (a closure would embed all 250k floats)."""
    big = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((500, 500)), jnp.float32)}
    dp = parallel.DataParallel("jit", parallel.make_mesh(jax.devices()[:1]))
    step = dp.compile(
        lambda axis: lambda state, batch, fixed: (state + batch.sum() * fixed["w"].sum(), {}),
        frozen=big,
    )
    state, batch = jnp.zeros(()), jnp.ones((4,))
    assert 'dense<"0x' not in step.lower(state, batch).as_text()
    out, _ = step(state, batch)
    np.testing.assert_allclose(out, 4 * big["w"].sum(), rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Through the trainer.


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, digits_dir):
    """A tiny class-conditional digits model, trained 8 steps."""
    path = str(tmp_path_factory.mktemp("runs") / "base")
    common = {"data.data_dir": str(digits_dir), "model.num_classes": 10}
    train.train_and_evaluate(tiny_config(**common), path)
    _, _, state = workdir.load_state(path)
    return path, common, jax.device_get(state.ema_params)


def lora_config(base, common, **kw):
    return tiny_config(**common, **{"adapter.kind": "lora", "adapter.base": base, **kw})


def test_lora_run_trains_only_the_factors_resumes_and_samples(tmp_path, base_run):
    """A LoRA run's state holds the factors only (parameters, EMA, Adam moments); the
    merged model differs from the base only at the targeted kernels; it resumes exactly;
    pmap gives the jit run's update; the sample CLI's --lora / --lora_scale draw from the
    merged model (scale 0 = the base, bit for bit), also from the LoRA workdir itself."""
    base, common, base_params = base_run
    run = str(tmp_path / "lora")
    first = train.train_and_evaluate(lora_config(base, common), run)
    n_lora = lora.num_params(first.params)
    assert n_lora == lora.num_params(
        lora.init(base_params, lora.DEFAULT_TARGETS, 4, jax.random.key(0))
    )
    assert lora.num_params(first.ema_params) == n_lora
    assert lora.num_params(first.opt_state) <= 2 * n_lora + 8  # mu, nu (+ step counts)
    record = adapters.read_record(run)
    assert record["step"] == 8 and record["fingerprint"] == adapters.fingerprint(base_params)

    merged = lora.merge(base_params, first.params, 4.0)
    flat_m = traverse_util.flatten_dict(merged, sep="/")
    flat_b = traverse_util.flatten_dict(base_params, sep="/")
    changed = {k for k in flat_b if not np.array_equal(flat_m[k], flat_b[k])}
    assert changed and changed <= set(lora.select(base_params, lora.DEFAULT_TARGETS))

    longer = lora_config(base, common, **{"train.num_steps": 12})
    resumed = train.train_and_evaluate(longer, run)
    straight = train.train_and_evaluate(longer, str(tmp_path / "straight"))
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
        np.testing.assert_array_equal(a, b)
    pmapped = train.train_and_evaluate(
        lora_config(base, common, **{"train.parallel": "pmap"}), str(tmp_path / "pmap")
    )
    for a, b in zip(jax.tree.leaves(pmapped.params), jax.tree.leaves(first.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)

    def sample(*args):
        out = tmp_path / f"s{len(os.listdir(tmp_path))}.npz"
        r = cli("diffusion_jax.sample", "--num_samples=4", "--labels=3", f"--npz={out}", *args)
        assert r.returncode == 0, r.stderr
        return np.load(out)["images"]

    plain = sample(f"--workdir={base}")
    np.testing.assert_array_equal(
        sample(f"--workdir={base}", f"--lora={run}", "--lora_scale=0"), plain
    )
    adapted = sample(f"--workdir={base}", f"--lora={run}")
    np.testing.assert_array_equal(sample(f"--workdir={run}"), adapted)

    r = cli("diffusion_jax.sample", f"--workdir={base}", "--lora_scale=0.5")
    assert r.returncode != 0 and "--lora_scale needs --lora" in r.stderr
    r = cli("diffusion_jax.sample", f"--workdir={run}", f"--lora={run}")
    assert r.returncode != 0 and f"adapts {os.path.abspath(base)}, not --workdir" in r.stderr


def test_a_changed_base_or_model_is_refused(tmp_path, base_run):
    """The LoRA records its base's fingerprint: loading it over different base weights is
    refused in one line; so is an adapter whose model differs from the base's."""
    base, common, _ = base_run
    run = str(tmp_path / "lora")
    train.train_and_evaluate(lora_config(base, common, **{"train.num_steps": 4}), run)
    record = adapters.read_record(run)
    with open(os.path.join(run, adapters.RECORD_FILE), "w") as f:
        json.dump({**record, "fingerprint": "0" * 16}, f)
    with pytest.raises(workdir.ConfigError, match="The base changed"):
        workdir.load_state(run)
    bad = lora_config(base, common, **{"model.unet.base_channels": 8})
    with pytest.raises(workdir.ConfigError, match="model.unet.base_channels=8 differs"):
        train.train_and_evaluate(bad, str(tmp_path / "bad"))
    with pytest.raises(workdir.ConfigError, match="matches no kernel"):
        train.train_and_evaluate(
            lora_config(base, common, **{"adapter.targets": ("nope",)}), str(tmp_path / "bad2")
        )


def test_full_fine_tuning_starts_from_the_base(tmp_path, base_run):
    """adapter.kind=full: every weight trains, from the base's EMA weights."""
    base, common, base_params = base_run
    cfg = tiny_config(
        **common, **{"adapter.kind": "full", "adapter.base": base, "train.num_steps": 4}
    )
    state = train.train_and_evaluate(cfg, str(tmp_path / "full"))
    moved = [float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(base_params))]  # fmt: skip
    assert 0 < max(moved) < 0.05  # started from the base, then trained 4 small steps
    assert lora.num_params(state.params) == lora.num_params(base_params)
