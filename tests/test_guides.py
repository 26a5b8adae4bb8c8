"""Classifier and CLIP guidance: the gradient transform against a closed form, the guides'
gradients, losses and parameter-free pieces.

Oracle: x0 is drawn from an image-level Gaussian mixture (class y with probability pi_y,
then every pixel ~ N(m_y, s_y^2)). Everything is exact: p(x_t) and p(y | x_t) are
Gaussian-mixture densities, the unconditional eps is -sqrt(1 - a_bar) grad log p(x_t), and
Bayes' rule says grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t). So classifier
guidance at scale 1 with the exact classifier must turn the exact unconditional model into
the exact class-y model, which is the Gaussian oracle N(m_y, s_y^2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import guidance, guides, objectives, samplers
from diffusion_jax.models import build_model
from diffusion_jax.models.guide import split_logits

from oracles import SCHED, coefs, gaussian_eps_at

PI = jnp.array([0.3, 0.7])
MEANS = jnp.array([-0.6, 0.5])
STDS = jnp.array([0.2, 0.4])


def log_joint(x, t):
    """[B, K]: log pi_k + log N(x_t; a m_k, (a^2 s_k^2 + 1 - a^2) I) over all pixels."""
    a, sig = coefs(x, t)
    a, sig, xk = a[..., None], sig[..., None], x[..., None]
    var = a**2 * STDS**2 + sig**2
    logn = -0.5 * jnp.log(2 * jnp.pi * var) - 0.5 * (xk - a * MEANS) ** 2 / var
    return jnp.log(PI) + logn.reshape(x.shape[0], -1, 2).sum(axis=1)


def uncond_eps(x, t):
    _, sig = coefs(x, t)
    score = jax.grad(lambda v: jax.nn.logsumexp(log_joint(v, t), axis=-1).sum())(x)
    return -sig * score


def classifier_grad(y, x, t):
    return jax.grad(lambda v: jnp.sum(jax.nn.log_softmax(log_joint(v, t))[jnp.arange(len(y)), y]))(
        x
    )


X = jax.random.normal(jax.random.key(0), (6, 3, 3, 2))
TS = jnp.array([5, 100, 300, 500, 800, 990])
Y = jnp.array([0, 1, 0, 1, 1, 0])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_classifier_guidance_with_the_exact_classifier_gives_the_class_model(prediction):
    """Scale 1: eps_uncond - sigma * grad log p(y|x_t) = eps of N(m_y, s_y^2), within
    float32 rounding of the three-way sum (2e-4 relative: the densities' log-sum-exp and
    the x0 <-> eps conversions at t = 5, where sigma is 0.01)."""

    def model(x, t):  # the exact unconditional model, output in ``prediction``
        eps = uncond_eps(x, t)
        a, sig = coefs(x, t)
        return objectives.target(SCHED, prediction, (x - sig * eps) / a, eps, t)

    fn = guidance.gradient_guided_model_fn(
        jax.tree_util.Partial(model),
        jax.tree_util.Partial(classifier_grad, Y),
        1.0,
        SCHED,
        prediction,
    )
    _, eps = objectives.x0_eps_from_prediction(SCHED, prediction, X, TS, fn(X, TS))
    want = jnp.stack(
        [gaussian_eps_at(X[i : i + 1], TS[i : i + 1], MEANS[Y[i]], STDS[Y[i]])[0] for i in range(6)]
    )
    np.testing.assert_allclose(eps, want, rtol=2e-4, atol=2e-4)
    # the unguided model is the mixture, far from either class at most steps
    assert float(jnp.abs(uncond_eps(X, TS) - want).max()) > 0.1


def test_guidance_scale_zero_is_the_model_and_scale_is_traced():
    base = jax.tree_util.Partial(uncond_eps)
    grad = jax.tree_util.Partial(classifier_grad, Y)
    fn0 = guidance.gradient_guided_model_fn(base, grad, 0.0, SCHED, "eps")
    np.testing.assert_array_equal(fn0(X, TS), uncond_eps(X, TS))
    run = functools.partial(
        samplers.sample, schedule=SCHED, rng=jax.random.key(1), shape=X.shape, num_steps=4
    )
    run(guidance.gradient_guided_model_fn(base, grad, 1.0, SCHED, "eps"))
    size = samplers._scan_sample._cache_size()
    a = run(guidance.gradient_guided_model_fn(base, grad, 2.0, SCHED, "eps"))
    b = run(guidance.gradient_guided_model_fn(base, grad, 4.0, SCHED, "eps"))
    assert samplers._scan_sample._cache_size() == size  # a new scale never recompiles
    assert float(jnp.abs(a - b).max()) > 1e-3


# --------------------------------------------------------------------------- the guide models

HEADS = (3, 2)


def _guide(name):
    cfg = {"name": name, name: dict(channels=(8, 16), num_res_blocks=1, features=16, norm_groups=4)}
    if name == "classifier":
        cfg[name]["head_sizes"] = HEADS
    else:
        cfg["text"] = dict(vocab_size=9, max_length=5, width=16, depth=1, num_heads=2)
    model = build_model(cfg)
    x = jax.random.normal(jax.random.key(2), (4, 4, 4, 3))
    t = jnp.array([0, 300, 600, 900])
    tokens = jnp.array([[2, 3, 0, 0, 0], [4, 5, 6, 0, 0], [7, 0, 0, 0, 0], [8, 2, 3, 4, 0]])
    args = (x, t) if name == "classifier" else (x, t, tokens)
    params = model.init(jax.random.key(3), *args)["params"]
    return model, params, x, t, tokens


def test_classifier_grad_is_the_gradient_of_the_target_log_probability():
    model, params, x, t, _ = _guide("classifier")
    targets = jnp.array([[0, 1], [2, 0], [1, 1], [2, 1]])

    def log_prob(v):
        heads = split_logits(model.apply({"params": params}, v, t), HEADS)
        return sum(
            jnp.sum(jax.nn.log_softmax(h)[jnp.arange(4), targets[:, i]])
            for i, h in enumerate(heads)
        )

    got = guides.guide_grad(model, params, targets)(x, t)
    np.testing.assert_allclose(got, jax.grad(log_prob)(x), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(got).max()) > 0


def test_clip_embeddings_are_unit_and_its_grad_raises_the_similarity():
    model, params, x, t, tokens = _guide("clip")
    image, text, scale = model.apply({"params": params}, x, t, tokens)
    np.testing.assert_allclose(jnp.linalg.norm(image, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(text, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
    grad = guides.guide_grad(model, params, tokens)(x, t)
    # a small step along the gradient raises every example's image-caption similarity
    sim = lambda v: jnp.sum(model.apply({"params": params}, v, t, tokens)[0] * text, -1)  # noqa: E731
    assert bool(jnp.all(sim(x + 1e-2 * grad) > sim(x)))


def test_guide_losses_against_hand_values():
    # two heads; logits favour the right class of head 0 and the wrong one of head 1
    logits = jnp.array([[5.0, 0.0, 0.0, 0.0, 5.0]])
    ce, acc = guides.classifier_loss(logits, jnp.array([[0, 0]]), HEADS)
    want = -jax.nn.log_softmax(logits[0, :3])[0] - jax.nn.log_softmax(logits[0, 3:])[0]
    np.testing.assert_allclose(ce[0], want, rtol=1e-6)
    np.testing.assert_array_equal(acc, [1.0, 0.0])
    # CLIP: orthonormal matched pairs at scale s -> loss log(1 + (n-1) e^-s), top-1 = 1
    e = jnp.eye(3)
    loss, top1 = guides.clip_loss(e, e, 4.0)
    # float32 log-sum-exp of logits ~4: ~1e-7 absolute on a loss of 0.036
    np.testing.assert_allclose(loss, np.log(1 + 2 * np.exp(-4.0)), rtol=1e-5)
    assert float(top1) == 1.0
