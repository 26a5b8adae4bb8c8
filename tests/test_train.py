"""Training in process: parallel equivalences (1 vs 8 devices, jit vs pmap, scanned steps),
precompilation, per-device noise, mixed precision, sharded sampling. The CLI end to end,
exact resume and the run-time errors are in test_train_cli.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import conditioning, generate, parallel, schedules, steps, workdir
from diffusion_jax.models import build_model
from diffusion_jax.state import create_train_state, make_optimizer

from helpers import max_diff, perturb_params, synthetic_batches, tiny_config

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")


def compiled_step_and_state(config, devices):
    """(DataParallel, compiled train step, initial device state) for ``config``."""
    model = build_model(config.model)
    schedule = schedules.make_schedule(config.schedule.name, config.schedule.num_timesteps)
    tx = make_optimizer(config.optim, config.train.num_steps)
    dp = parallel.DataParallel(config.train.parallel, parallel.make_mesh(devices))
    state = create_train_state(model, tx, (8, 8, 1), config.seed, out_sharding=dp.state_sharding)
    if config.train.parallel == "pmap":
        # pmap runs on all local devices; restrict by building the pmap over `devices`
        assert len(devices) == jax.local_device_count()
    step = dp.compile(
        lambda axis: steps.make_train_step(model, tx, schedule, config, axis_name=axis)
    )
    return dp, step, dp.put_state(state)


def run_steps(config, devices, batches, metrics=None):
    """Train ``len(batches)`` steps on ``devices``; returns the canonical state's params
    and the losses (and, given a list ``metrics``, appends each step's metrics to it)."""
    dp, step, dstate = compiled_step_and_state(config, devices)
    losses = []
    for b in batches:
        dstate, m = step(dstate, dp.put_batch(b))
        m = dp.get_metrics(m)
        losses.append(float(m["loss"]))
        if metrics is not None:
            metrics.append(m)
    return jax.device_get(dp.get_state(dstate).params), losses


# Dropout at the DDPM CIFAR-10 rate. The model starts with exactly zero output (zero final
# conv and zero conv2 in every ResBlock), so the masks first reach a gradient at the second
# step; no learning-rate warmup (whose first step has lr 0) so that happens early.
DROPOUT = {"model.unet.dropout": 0.1, "optim.warmup_steps": 0}


def assert_same_run(config_a, devices_a, config_b, devices_b, batches):
    """Two layouts of one run give the same losses, gradient norms, loss-by-t buckets and
    parameters; returns the parameters. grad_norm is compared because Adam and clipping
    are invariant to a constant gradient scale: a psum in place of a pmean would leave the
    parameters alone but multiply grad_norm by the device count. Same random draws
    (per-example keys for noise, t, label dropout and dropout masks); only the float
    summation order differs between layouts: ~1e-6 relative after a few Adam steps, 1e-5
    allowed."""
    ma, mb = [], []
    pa, la = run_steps(config_a, devices_a, batches, ma)
    pb, lb = run_steps(config_b, devices_b, batches, mb)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for a, b in zip(ma, mb):
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
        np.testing.assert_allclose(a["loss_bucket_sum"], b["loss_bucket_sum"], rtol=1e-5)
        np.testing.assert_array_equal(a["loss_bucket_count"], b["loss_bucket_count"])
    assert max_diff(pa, pb) < 1e-5
    return pa


@needs_8
def test_jit_one_device_equals_eight_devices_with_dropout():
    cfg = tiny_config(**DROPOUT)
    assert_same_run(cfg, jax.devices()[:1], cfg, jax.devices()[:8], synthetic_batches(4, 16))


@needs_8
def test_pmap_equals_jit_with_dropout():
    jit_cfg = tiny_config(**DROPOUT, **{"train.parallel": "jit"})
    pmap_cfg = tiny_config(**DROPOUT, **{"train.parallel": "pmap"})
    assert_same_run(jit_cfg, jax.devices(), pmap_cfg, jax.devices(), synthetic_batches(4, 16))


def test_dropout_is_active_in_the_train_step():
    """The equivalences above would hold trivially if the step ignored dropout. With
    DROPOUT vs the same run at rate 0: the first step is identical (see DROPOUT); the
    second step's gradient of every ResBlock's conv2 sees the dropped activations, and
    Adam's early updates are ~lr·sign(g) whatever g's size, so the parameters move apart
    by ~lr (1e-4) vs ~1e-7 of float noise between the two programs."""
    batches = synthetic_batches(2, 16)
    one, two = {}, {}
    for rate in (0.0, 0.1):
        cfg = tiny_config(**{**DROPOUT, "model.unet.dropout": rate})
        one[rate], _ = run_steps(cfg, jax.devices()[:1], batches[:1])
        two[rate], _ = run_steps(cfg, jax.devices()[:1], batches)
    assert max_diff(one[0.0], one[0.1]) < 1e-6
    assert max_diff(two[0.0], two[0.1]) > 2e-5


@needs_8
def test_class_conditional_pmap_equals_jit_and_labels_matter():
    over = {"model.num_classes": 10, **DROPOUT}
    batches = synthetic_batches(3, 16)
    p_jit = assert_same_run(
        tiny_config(**over),
        jax.devices(),
        tiny_config(**over, **{"train.parallel": "pmap"}),
        jax.devices(),
        batches,
    )
    # the same images with their labels permuted: the class embedding gets other
    # gradients, so the update differs far beyond the 1e-5 allowed between layouts
    perm = np.random.default_rng(1).permutation(16)
    relabelled = [dict(b, label=b["label"][perm]) for b in batches]
    assert all((r["label"] != b["label"]).any() for r, b in zip(relabelled, batches))
    p_other, _ = run_steps(tiny_config(**over), jax.devices(), relabelled)
    assert max_diff(p_jit, p_other) > 1e-4


@needs_8
@pytest.mark.parametrize("mode", parallel.MODES)
def test_precompile_is_reused_by_the_first_call(mode):
    """train.py compiles the step ahead, then lets the processes meet, so that nobody's
    first collective waits on a peer that is still compiling; that only works if the
    call after `precompile_and_sync` compiles nothing."""
    from jax._src import dispatch  # the event name jax reports each XLA compilation under

    compiles = []

    def listener(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        dp = parallel.DataParallel(mode, parallel.make_mesh())

        def make_step(axis):
            def step(state, batch):
                loss = jnp.mean(jnp.sin(batch["image"]) * state["w"])
                if axis:
                    loss = jax.lax.pmean(loss, axis)
                return {"w": state["w"] - loss}, {"loss": loss}

            return step

        step = dp.compile(make_step)
        state = dp.put_state(jax.device_put({"w": jnp.ones(())}, dp.state_sharding))
        batch = dp.put_batch({"image": np.linspace(0, 1, 8 * 3, dtype=np.float32).reshape(8, 3)})
        parallel.precompile_and_sync(step, state, batch, name="test")
        assert compiles, "precompile compiled nothing"
        compiles.clear()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        assert compiles == []
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_non_finite_step_leaves_the_state_untouched():
    """A NaN in the batch makes loss and gradients NaN: params, EMA and optimizer state
    stay exactly as they were (the step counter advances, metrics flag it), and the
    finite steps after it train from there (the optimizer's own count did not advance, so
    the first of them still has the warmup's learning rate 0)."""
    dp, step, dstate = compiled_step_and_state(tiny_config(), jax.devices()[:1])
    bad, *good = synthetic_batches(3, 16)
    bad["image"][3, 2, 1, 0] = np.nan
    before = jax.device_get(dp.get_state(dstate))
    dstate, m = step(dstate, dp.put_batch(bad))
    after = jax.device_get(dp.get_state(dstate))
    metrics = dp.get_metrics(m)
    assert metrics["finite"] == 0.0 and not np.isfinite(metrics["loss"])
    assert int(after.step) == int(before.step) + 1
    for name in ("params", "ema_params", "opt_state"):
        for x, y in zip(
            jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))
        ):
            np.testing.assert_array_equal(x, y)  # exactly: the update branch never ran
    for b in good:
        dstate, m = step(dstate, dp.put_batch(b))
        assert dp.get_metrics(m)["finite"] == 1.0
    assert max_diff(after.params, jax.device_get(dp.get_state(dstate).params)) > 0


def test_devices_draw_different_noise():
    """Each example's (t, eps) comes from its global id: shards of one batch differ, and
    the union of the shards' draws equals the unsharded draw."""
    from diffusion_jax import objectives

    sched = schedules.make_schedule("linear", 1000)
    x0 = jnp.zeros((8, 4, 4, 1))
    rng = jax.random.PRNGKey(0)

    def draws(ids):
        _, aux = objectives.diffusion_loss(
            lambda p, x, t, y, r: x * 0,
            None,
            sched,
            {"image": x0[: len(ids)]},
            rng,
            example_ids=ids,
        )
        return np.asarray(aux["t"])

    whole = draws(jnp.arange(8))
    shard0, shard1 = draws(jnp.arange(0, 4)), draws(jnp.arange(4, 8))
    np.testing.assert_array_equal(np.concatenate([shard0, shard1]), whole)
    assert not np.array_equal(shard0, shard1)


def test_scanned_steps_equal_single_steps():
    batches = synthetic_batches(4, 16)
    p1, l1 = run_steps(tiny_config(), jax.devices()[:1], batches)
    cfg = tiny_config(**{"train.steps_per_dispatch": 2})
    model = build_model(cfg.model)
    schedule = schedules.make_schedule(cfg.schedule.name, cfg.schedule.num_timesteps)
    tx = make_optimizer(cfg.optim, cfg.train.num_steps)
    dp = parallel.DataParallel("jit", parallel.make_mesh(jax.devices()[:1]))
    state = dp.put_state(
        create_train_state(model, tx, (8, 8, 1), cfg.seed, out_sharding=dp.state_sharding)
    )
    step = dp.compile(lambda a: steps.make_train_step(model, tx, schedule, cfg, axis_name=a), 2)
    for i in (0, 2):
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches[i : i + 2])
        state, _ = step(state, dp.put_batch(stacked, 2))
    # identical ops inside lax.scan vs separate dispatches; XLA may fuse differently
    assert max_diff(p1, jax.device_get(state.params)) < 1e-6


# ----------------------------------------------------------------------------- errors


def test_check_config_rejects_incompatible_image_size():
    from diffusion_jax import data

    cfg = tiny_config(**{"model.name": "dit"})
    cfg.model.dit.patch_size = 3
    with pytest.raises(workdir.ConfigError, match="patch"):
        workdir.check_config(cfg, data.dataset_spec(cfg.data))


def test_bfloat16_compute_trains_close_to_float32():
    """Mixed precision (bf16 activations/matmuls, f32 params, optimizer and loss):
    overfitting one batch, the loss falls as in f32 and stays close to it."""
    batches = synthetic_batches(1, 16) * 20
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config(
            **{"model.compute_dtype": dtype, "optim.learning_rate": 1e-3, "optim.warmup_steps": 0}
        )
        runs[dtype] = run_steps(cfg, jax.devices()[:1], batches)
    (p32, l32), (p16, l16) = runs["float32"], runs["bfloat16"]
    for losses in (l32, l16):
        assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    # bf16 keeps 8 mantissa bits (rel. 4e-3 per rounding); after 20 steps the loss
    # tracks f32 within 3% and params within 2e-2 absolute (params are O(0.1-1)).
    np.testing.assert_allclose(l16, l32, rtol=3e-2)
    assert max_diff(p32, p16) < 2e-2
    # ...and it really ran in bf16: an ignored compute_dtype would give the f32 run to
    # float noise (~1e-7); bf16 rounding moves the losses by ~1e-3 relative
    assert np.max(np.abs(np.array(l16) / np.array(l32) - 1)) > 1e-4
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))


@needs_8
def test_sharded_sampling_equals_single_device():
    """In-loop sampling shards the batch over the mesh; same seed -> same images as on one
    device (x_T and per-step noise come from partitionable threefry keys)."""
    from diffusion_jax import data

    cfg = tiny_config(**{"eval.num_samples": 12})  # padded to 16 on 8 devices
    spec = data.dataset_spec(cfg.data)
    model = build_model(cfg.model)
    schedule = schedules.make_schedule(cfg.schedule.name, cfg.schedule.num_timesteps)
    tx = make_optimizer(cfg.optim, cfg.train.num_steps)
    fresh = create_train_state(model, tx, spec.image_shape, 0).params
    # a fresh model outputs exactly zero, which would hide a shard that got the wrong
    # params or inputs: perturbed, every layer shapes the samples
    perturbed = perturb_params(fresh, scale=0.05)
    out = {}
    for n, params in ((1, fresh), (1, perturbed), (8, perturbed)):
        mesh = parallel.make_mesh(jax.devices()[:n])
        padded = generate.padded_batch_size(cfg.eval.num_samples, mesh)
        fn = steps.make_sample_fn(model, schedule, cfg, (padded, *spec.image_shape))
        images = generate.generate_samples(fn, params, cfg.eval.num_samples, padded, 3, mesh=mesh)
        out[n, params is fresh] = padded, images
    assert out[1, False][0] == 12 and out[8, False][0] == 16
    assert np.abs(out[1, False][1] - out[1, True][1]).max() > 0.1
    # Same arithmetic per example; batch 12 on one device vs 2 per device tiles the convs
    # differently and reorders float32 reductions (~1e-7 relative per op), which 5 DDIM
    # steps of the perturbed model amplify to ~1e-5 (measured max 1.2e-5). A shard with
    # other noise, params or rows would be off by O(0.1-1), as the fresh-params run is.
    np.testing.assert_allclose(out[8, False][1][:12], out[1, False][1][:12], atol=1e-4)


# ------------------------------------------------------------- label dropout, loss by t


def test_label_dropout_rate_null_class_and_layout():
    """Classifier-free-guidance training drops each label to the null class with
    probability p, from a key per global example id."""
    rng = jax.random.PRNGKey(3)
    n, p, null = 20000, 0.1, 10
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, n), jnp.int32)
    ids = jnp.arange(n)
    out = np.asarray(conditioning.drop(rng, labels, ids, p, null))
    dropped = out != np.asarray(labels)
    # kept labels are untouched, dropped ones are exactly the null class
    assert set(np.unique(out[dropped])) == {null}
    # binomial count: mean n·p = 2000, std sqrt(n·p·(1-p)) = 42; 5 std = 212
    assert abs(dropped.sum() - n * p) < 5 * np.sqrt(n * p * (1 - p)), dropped.sum()
    # 8 shards with their global ids draw what the whole batch draws
    shards = [
        conditioning.drop(rng, labels[i : i + n // 8], ids[i : i + n // 8], p, null)
        for i in range(0, n, n // 8)
    ]
    np.testing.assert_array_equal(np.concatenate(shards), out)
    # another step's key draws other examples; p = 0 drops none
    other = np.asarray(conditioning.drop(jax.random.PRNGKey(4), labels, ids, p, null))
    assert (other != out).sum() > n * p
    np.testing.assert_array_equal(conditioning.drop(rng, labels, ids, 0.0, null), labels)


def test_loss_buckets_partition_the_batch_by_t():
    """metrics["loss_bucket_*"]: the counts add up to the batch and the sums to
    batch * loss (uniform weighting, so the loss is the plain mean of the per-example
    losses); float32 sums of 16 terms -> 1e-6 relative."""
    cfg = tiny_config()
    metrics = []
    run_steps(cfg, jax.devices()[:1], synthetic_batches(2, 16), metrics)
    for m in metrics:
        assert m["loss_bucket_count"].shape == (steps.NUM_LOSS_BUCKETS,)
        assert m["loss_bucket_count"].sum() == 16
        np.testing.assert_allclose(m["loss_bucket_sum"].sum(), 16 * m["loss"], rtol=1e-6)
        # a bucket without examples has no loss
        assert np.all(m["loss_bucket_sum"][m["loss_bucket_count"] == 0] == 0)


def test_loss_bucket_edges():
    """Bucket b holds b·T/10 <= t < (b+1)·T/10 (T = 1000 here: 100 timesteps a bucket)."""
    t = jnp.array([0, 99, 100, 555, 999, 998, 0])
    losses = jnp.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    sums, counts = steps.loss_buckets(t, losses, 1000)
    np.testing.assert_array_equal(counts, [3, 1, 0, 0, 0, 1, 0, 0, 0, 2])
    np.testing.assert_array_equal(sums, [67, 4, 0, 0, 0, 8, 0, 0, 0, 48])
