"""diffusion_loss against closed forms recomputed here in float64: the draws of t and the
noise (their distributions, per-example ids), the targets (exact predictors of a point mass
and of Gaussian data reach their known losses), the per-example weighting, what reaches the
model, and the gradient of a linear model. Ho et al. 2020 eq. 4, 14; Salimans & Ho 2022 for
v; Hang et al. 2023 for min-SNR.

Tolerances: float32 round-off and 5-standard-error Monte Carlo bounds, as explained in
test_objectives.py; each assertion repeats the reason that applies.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import objectives as obj

from helpers import MC_K, cached_schedule as sched, f64, ref_alpha_bar

# ------------------------------------------------------------------ diffusion_loss
# Compiles dominate the runtime on a small CPU box, so each test below jits one function
# (several losses at once where useful) and the shared ones are module-level so the jit
# cache is reused across tests.

LOSS = jax.jit(
    obj.diffusion_loss,
    static_argnums=0,
    static_argnames=("prediction", "weighting", "min_snr_gamma"),
)
B, SHAPE = 4096, (2, 2, 3)  # shared batch shape for the zero-model tests


def zeros_fn(params, x_t, t, y, rng):
    return jnp.zeros_like(x_t)


def _gaussian_batch(b, shape, seed):
    return {"image": jax.random.normal(jax.random.key(seed), (b,) + shape)}


def test_zero_model_eps_loss_aux_and_t_distribution():
    T = 1000
    batch = {"image": jax.random.uniform(jax.random.key(5), (B,) + SHAPE, minval=-1, maxval=1)}
    loss, aux = LOSS(zeros_fn, None, sched(), batch, jax.random.key(6))
    n = B * int(np.prod(SHAPE))
    # Zero model, eps target: loss = mean of n chi^2_1 draws, expectation 1, SE sqrt(2/n).
    assert abs(float(loss) - 1.0) < MC_K * np.sqrt(2 / n)
    # loss is the mean of the per-example losses (float32 mean of 4096 values ~1: ~1e-6).
    per_ex = f64(aux["loss_per_example"])
    np.testing.assert_allclose(float(loss), per_ex.mean(), rtol=1e-6)
    # The noise is Gaussian, not merely unit-variance: each per-example loss is chi^2_k / k
    # (k = pixels per example), variance 2/k (uniform noise of variance 1 would give 0.8/k).
    # SE of a sample variance = sqrt((mu4 - sigma^4)/n), with chi^2_k's central
    # mu4 = 12k^2 + 48k, i.e. mu4 - sigma^4 = (8/k^2 + 48/k^3) after scaling by 1/k.
    k = int(np.prod(SHAPE))
    se_var = np.sqrt((8 / k**2 + 48 / k**3) / B)
    assert abs(per_ex.var(ddof=1) - 2 / k) < MC_K * se_var

    t = f64(aux["t"])
    assert aux["t"].shape == (B,) and aux["t"].dtype == jnp.int32
    assert aux["loss_per_example"].shape == (B,) and aux["loss_per_example"].dtype == jnp.float32
    assert t.min() >= 0 and t.max() <= T - 1
    # t ~ U{0..T-1}: mean (T-1)/2, SD sqrt((T^2-1)/12); 5 SE on the sample mean. Both ends
    # are reached: P(no t >= 990 in 4096 draws) = 0.99^4096 ~ 1e-18.
    assert abs(t.mean() - (T - 1) / 2) < MC_K * np.sqrt((T**2 - 1) / 12 / B)
    assert t.max() >= 990 and t.min() <= 9

    # Same rng -> the same draw; another rng -> other timesteps (P(equal) = 1000^-4096).
    loss2, aux2 = LOSS(zeros_fn, None, sched(), batch, jax.random.key(6))
    assert float(loss2) == float(loss)
    np.testing.assert_array_equal(aux2["t"], aux["t"])
    _, aux3 = LOSS(zeros_fn, None, sched(), batch, jax.random.key(7))
    assert not np.array_equal(f64(aux3["t"]), t)


def test_t_covers_every_timestep_uniformly():
    """With T = 10 and 4096 draws every t in 0..T-1 must appear (P(some value missing) <=
    10 * 0.9^4096 ~ 1e-186), which catches an off-by-one range such as 1..T-1."""
    T = 10
    batch = {"image": jnp.zeros((B,) + SHAPE)}
    _, aux = LOSS(zeros_fn, None, sched("cosine", T), batch, jax.random.key(24))
    counts = np.bincount(f64(aux["t"]).astype(int), minlength=T)
    assert counts.shape == (T,) and np.all(counts > 0)
    # Each count ~ Binomial(B, 1/T): within 5 SD sqrt(B p (1-p)) ~ 19 of B/T ~ 410.
    assert np.all(np.abs(counts - B / T) < MC_K * np.sqrt(B * (1 / T) * (1 - 1 / T)))


@jax.jit
def _point_mass_losses(s, rng):
    """diffusion_loss of the exact predictor for data = the constant C, per prediction kind."""
    c = 0.3

    def oracle(kind):
        def apply_fn(params, x_t, t, y, rng):
            a = jnp.take(s.sqrt_alphas_cumprod, t)[:, None, None, None]
            sg = jnp.take(s.sqrt_one_minus_alphas_cumprod, t)[:, None, None, None]
            if kind == "x0":
                return jnp.full_like(x_t, c)
            if kind == "eps":
                return (x_t - a * c) / sg
            return (a * x_t - c) / sg  # v = a eps - s x0 = (a x_t - x0)/s using a^2 + s^2 = 1

        return apply_fn

    batch = {"image": jnp.full((256, 4, 4, 3), c, jnp.float32)}
    return {
        k: obj.diffusion_loss(oracle(k), None, s, batch, rng, prediction=k) for k in obj.PREDICTIONS
    }


@pytest.mark.parametrize("zt", [False, True])
def test_point_mass_oracle_has_zero_loss(zt):
    """Data = a constant c. The exact predictor, computed from (x_t, t) alone, must reach
    loss ~0: this ties the t the model receives to the t used for noising and the target."""
    out = _point_mass_losses(sched("linear", 1000, zt), jax.random.key(9))
    for kind, (loss, aux) in out.items():
        # Per element the oracle differs from the target by float32 rounding of x_t (~1e-7)
        # divided by sqrt(1 - ab) >= 0.01: <= ~1e-5, squared <= 1e-10. An off-by-one t or a
        # wrong target formula gives errors of order 1e-3..1 instead.
        assert float(loss) < 1e-8, kind
        assert np.all(np.isfinite(f64(aux["loss_per_example"]))), kind


GAUSS_CASES = (
    ("eps", "uniform"),
    ("x0", "uniform"),
    ("v", "uniform"),
    ("eps", "min_snr"),
    ("v", "min_snr"),
)


@jax.jit
def _gaussian_optimal_losses(s, batch, rng):
    def optimal(kind):
        def apply_fn(params, x_t, t, y, rng):
            a = jnp.take(s.sqrt_alphas_cumprod, t)[:, None, None, None]
            sg = jnp.take(s.sqrt_one_minus_alphas_cumprod, t)[:, None, None, None]
            return {"eps": sg * x_t, "x0": a * x_t, "v": jnp.zeros_like(x_t)}[kind]

        return apply_fn

    return {
        (k, w): obj.diffusion_loss(optimal(k), None, s, batch, rng, prediction=k, weighting=w)
        for k, w in GAUSS_CASES
    }


def test_gaussian_data_optimal_predictor_loss():
    """x0 ~ N(0, 1) per pixel makes x_t ~ N(0, 1) at every t, and the MMSE predictors are
    linear in x_t: E[eps|x_t] = s x_t, E[x0|x_t] = a x_t, E[v|x_t] = (a s - s a) x_t = 0.
    Their expected per-pixel losses are 1 - s^2 = ab, 1 - a^2 = 1 - ab and a^2 + s^2 = 1;
    averaged over t ~ U{0..T-1} with the weights w(t): mean_t(w * loss(t))."""
    T, b = 1000, 8192
    # Linear, not cosine: cosine's alpha_bar is nearly symmetric, mean(ab) ~ mean(1 - ab),
    # which would let a swapped eps/x0 target pass.
    s = sched("linear", T)
    ab = ref_alpha_bar("linear", T)
    snr = ab / (1 - ab)
    weights = {
        "uniform": {k: np.ones(T) for k in obj.PREDICTIONS},
        "min_snr": {"eps": np.minimum(snr, 5) / snr, "v": np.minimum(snr, 5) / (snr + 1)},
    }
    per_t = {"eps": ab, "x0": 1 - ab, "v": np.ones(T)}
    out = _gaussian_optimal_losses(s, _gaussian_batch(b, (4, 4, 2), 10), jax.random.key(11))
    se = {}
    for (kind, weighting), (loss, aux) in out.items():
        expected = np.mean(weights[weighting][kind] * per_t[kind])
        per_ex = f64(aux["loss_per_example"])
        # Per-example losses are i.i.d. (t, x0, eps drawn independently per example): 5 SE
        # of their mean, SE estimated from the sample (b = 8192 makes that estimate tight).
        se[kind, weighting] = per_ex.std(ddof=1) / np.sqrt(b)
        assert abs(float(loss) - expected) < MC_K * se[kind, weighting], (
            kind,
            weighting,
            float(loss),
            expected,
        )
    # The checks discriminate: eps, x0 and v expectations differ by many SE.
    assert abs(np.mean(ab) - np.mean(1 - ab)) > 20 * max(se.values())
    assert abs(np.mean(ab) - 1) > 20 * max(se.values())


@jax.jit
def _uniform_and_min_snr(s, batch, rng):
    return (
        obj.diffusion_loss(zeros_fn, None, s, batch, rng, prediction="v")[1],
        obj.diffusion_loss(zeros_fn, None, s, batch, rng, prediction="v", weighting="min_snr")[1],
    )


def test_weighting_is_applied_per_example_with_its_t():
    uni, msnr = _uniform_and_min_snr(
        sched("linear"), _gaussian_batch(256, (4, 4, 1), 12), jax.random.key(13)
    )
    np.testing.assert_array_equal(uni["t"], msnr["t"])  # same rng -> same t
    ab = ref_alpha_bar("linear", 1000)[f64(uni["t"]).astype(int)]
    snr = ab / (1 - ab)
    w = np.minimum(snr, 5) / (snr + 1)
    # Weight rel error ~2e-6 (see test_min_snr_weights) times one float32 product.
    np.testing.assert_allclose(
        f64(msnr["loss_per_example"]), w * f64(uni["loss_per_example"]), rtol=1e-5
    )


def test_label_and_t_reach_apply_fn():
    """Eager (not jitted) so the spy sees the very objects diffusion_loss passes on."""
    seen = {}
    label = jnp.arange(8, dtype=jnp.int32)

    def spy(params, x_t, t, y, rng):
        seen.update(y=y, t=t, x_t=x_t, rng=rng)
        return jnp.zeros_like(x_t) + y.astype(x_t.dtype)[:, None, None, None]

    batch = {"image": jnp.zeros((8, 2, 2, 1)), "condition": label}
    loss, aux = obj.diffusion_loss(spy, None, sched(), batch, jax.random.key(15), prediction="x0")
    assert seen["y"] is label
    np.testing.assert_array_equal(seen["t"], aux["t"])
    assert seen["x_t"].shape == batch["image"].shape
    assert isinstance(seen["rng"], jax.Array)
    # x0 = 0 and output = label: per-example loss is label^2, exactly (small integers).
    np.testing.assert_array_equal(aux["loss_per_example"], f64(label) ** 2)

    # No condition in the batch -> the model gets None (unconditional).
    seen.clear()
    obj.diffusion_loss(
        lambda p, x, t, y, r: seen.update(y=y) or jnp.zeros_like(x),
        None,
        sched(),
        {"image": batch["image"]},
        jax.random.key(15),
    )
    assert "y" in seen and seen["y"] is None


def test_diffusion_loss_bad_choices():
    batch = _gaussian_batch(4, (2, 2, 1), 19)
    with pytest.raises(ValueError) as e:
        LOSS(zeros_fn, None, sched(), batch, jax.random.key(0), prediction="score")
    assert all(p in str(e.value) for p in ("eps", "x0", "v"))
    with pytest.raises(ValueError) as e:
        LOSS(zeros_fn, None, sched(), batch, jax.random.key(0), weighting="p2")
    assert all(w in str(e.value) for w in ("uniform", "min_snr"))


def _linear(params, x_t, t, y, rng):
    return params["a"] * x_t + params["b"]


LINEAR_CASES = (("eps", "uniform"), ("x0", "min_snr"), ("v", "min_snr"))


@jax.jit
def _linear_loss_and_grad(params, s, batch, rng):
    def loss(p, kind, weighting):
        value, _ = obj.diffusion_loss(
            _linear, p, s, batch, rng, prediction=kind, weighting=weighting
        )
        return value

    return {(kind, w): jax.value_and_grad(loss)(params, kind, w) for kind, w in LINEAR_CASES}


def test_gradient_of_linear_model_matches_closed_form():
    """For the model out = a x_t + b the loss is a quadratic in (a, b):
        L = mean_i w_i mean_p (a x_t + b - y)^2,
        dL/da = mean_i w_i mean_p 2 (a x_t + b - y) x_t,  dL/db = mean_i w_i mean_p 2 (...)
    with y the target (eps; x0; v = sqrt(ab) eps - sqrt(1 - ab) x0) and w_i the weight (1,
    or min-SNR) of example i's t, all recomputed here in float64 from the paper formulas.
    The only inputs taken from the code are the draws: x_t (what the model receives) and t
    (aux["t"]); eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab) is the forward process solved for
    the noise. So a wrong target, weight, forward process or reduction changes the
    gradient, which a finite difference of the code's own loss would not notice."""
    T, b = 1000, 64
    s = sched("linear", T)
    batch = _gaussian_batch(b, (4, 4, 1), 20)
    rng = jax.random.key(21)
    seen = {}

    def spy(params, x_t, t, y, rng):
        seen.update(x_t=x_t, t=t)
        return jnp.zeros_like(x_t)

    _, aux0 = obj.diffusion_loss(spy, None, s, batch, rng)  # eager: the spy sees the arrays
    params = {"a": jnp.float32(0.7), "b": jnp.float32(-0.2)}
    out = _linear_loss_and_grad(params, s, batch, rng)

    t = f64(seen["t"]).astype(int)
    np.testing.assert_array_equal(t, aux0["t"])
    ab = ref_alpha_bar("linear", T)[t][:, None]
    a_, s_ = np.sqrt(ab), np.sqrt(1 - ab)
    x0 = f64(batch["image"]).reshape(b, -1)
    x_t = f64(seen["x_t"]).reshape(b, -1)
    eps = (x_t - a_ * x0) / s_
    snr = (ab / (1 - ab))[:, 0]
    targets = {"eps": eps, "x0": x0, "v": a_ * eps - s_ * x0}
    weights = {
        ("eps", "uniform"): np.ones(b),
        ("x0", "min_snr"): np.minimum(snr, 5.0),
        ("v", "min_snr"): np.minimum(snr, 5.0) / (snr + 1.0),
    }
    pa, pb = 0.7, -0.2
    for (kind, weighting), (loss, grad) in out.items():
        w = weights[kind, weighting]
        r = pa * x_t + pb - targets[kind]
        want = {
            "dL/da": np.mean(w * np.mean(2 * r * x_t, axis=1)),
            "dL/db": np.mean(w * np.mean(2 * r, axis=1)),
            "loss": np.mean(w * np.mean(r**2, axis=1)),
        }
        got = {"dL/da": float(grad["a"]), "dL/db": float(grad["b"]), "loss": float(loss)}
        # float32 sums over 1024 O(1) terms: ~1e-7 of the terms' size, i.e. ~1e-6 relative
        # where they cancel (eps dL/da = -0.039). eps recovered from float32 x_t divides its
        # ~1e-7 rounding by sqrt(1 - ab) >= 0.01 (t = 0): <= ~2e-5 in one element's target,
        # ~1e-8 in the means over 1024 elements. Measured <= 9e-7 relative; 1e-5 allowed.
        # A wrong target, weight or forward process moves these by O(10%) or more.
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=(kind, key))
        assert abs(want["dL/da"]) > 1e-2 and abs(want["dL/db"]) > 1e-3  # not 0 == 0


@jax.jit
def _full_and_halves(s, batch, rng):
    half = batch["image"].shape[0] // 2
    ids = jnp.arange(2 * half)
    full = obj.diffusion_loss(zeros_fn, None, s, batch, rng)[1]
    full_ids = obj.diffusion_loss(zeros_fn, None, s, batch, rng, example_ids=ids)[1]
    parts = [
        obj.diffusion_loss(
            zeros_fn, None, s, {"image": batch["image"][sl]}, rng, example_ids=ids[sl]
        )[1]
        for sl in (slice(0, half), slice(half, None))
    ]
    return full, full_ids, parts


def test_draws_depend_only_on_global_example_id():
    """A batch split over two 'devices' that pass their global example ids draws the same
    t and eps per example as the whole batch (design: same numbers on 1 or N devices)."""
    batch = _gaussian_batch(64, (2, 2, 3), 22)
    full, full_ids, parts = _full_and_halves(sched(), batch, jax.random.key(23))
    np.testing.assert_array_equal(full["t"], full_ids["t"])  # default ids are 0..B-1
    np.testing.assert_array_equal(full["t"], np.concatenate([p["t"] for p in parts]))
    # Same eps per example => same per-example loss; a mean over the same 12 float32 values
    # may be reassociated differently for another batch size: ~1e-7 relative, assert 1e-6.
    np.testing.assert_allclose(
        f64(full["loss_per_example"]),
        np.concatenate([f64(p["loss_per_example"]) for p in parts]),
        rtol=1e-6,
    )
    # And the ids matter: shifted ids give other draws (P(all 64 t equal) = 1000^-64).
    assert not np.array_equal(f64(parts[0]["t"]), f64(parts[1]["t"]))
