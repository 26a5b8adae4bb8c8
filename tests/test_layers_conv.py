"""Tests for the explicit-gradient convolution in diffusion_jax.models.layers.

``conv_impl="explicit_grad"`` must be a drop-in for ``nn.Conv``: same parameters, same
forward values and the same gradients as JAX autodiff. Float32 tolerance 1e-5 relative
(max abs difference / max abs value): both paths sum the same products, only the
order of the float32 additions may differ. The last test checks the reason the option
exists: inside a lax.scan body its gradient convolutions are already in the canonical
NHWC/HWIO form that XLA:CPU hands to its conv library.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import conv as conv_lib, layers

RTOL = 1e-5
DN = ("NHWC", "HWIO", "NHWC")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def _assert_trees_close(ref, new, rtol=RTOL):
    assert jax.tree.structure(ref) == jax.tree.structure(new)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(new)):
        assert a.shape == b.shape, path
        assert _rel(a, b) <= rtol, (jax.tree_util.keystr(path), _rel(a, b))


@pytest.mark.parametrize(
    "kernel,strides,padding",
    [
        ((3, 3), (1, 1), "SAME"),
        ((3, 3), (2, 2), "SAME"),  # Downsample
        ((3, 3), (2, 2), "VALID"),
        ((3, 3), (1, 1), ((0, 2), (1, 0))),  # asymmetric explicit padding
        ((1, 1), (1, 1), "SAME"),
        ((3, 2), (3, 1), "SAME"),  # non-square kernel, stride > kernel overlap
    ],
)
def test_explicit_grad_matches_autodiff(kernel, strides, padding):
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 9, 8, 3), jnp.float32)
    w = jax.random.normal(kw, (*kernel, 3, 5), jnp.float32)

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)

    def new(x, w):
        return conv_lib.conv_general_dilated_explicit_grad(
            x, w, strides, padding, dimension_numbers=DN
        )

    y_ref, vjp_ref = jax.vjp(ref, x, w)
    y_new, vjp_new = jax.vjp(new, x, w)
    assert y_new.shape == y_ref.shape
    assert _rel(y_ref, y_new) <= RTOL
    dy = jax.random.normal(kd, y_ref.shape, jnp.float32)
    for g_ref, g_new in zip(vjp_ref(dy), vjp_new(dy)):
        assert g_new.shape == g_ref.shape and g_new.dtype == g_ref.dtype
        assert _rel(g_ref, g_new) <= RTOL


def test_unsupported_convs_fall_back_to_lax():
    """Grouped or dilated convs are not rewritten: identical to lax, values and grads."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
    w = jax.random.normal(jax.random.key(2), (3, 3, 2, 4))
    kw = dict(
        window_strides=(1, 1),
        padding="SAME",
        rhs_dilation=(2, 2),
        dimension_numbers=DN,
        feature_group_count=2,
    )
    f_ref = lambda x, w: jnp.sum(jax.lax.conv_general_dilated(x, w, **kw) ** 2)
    f_new = lambda x, w: jnp.sum(conv_lib.conv_general_dilated_explicit_grad(x, w, **kw) ** 2)
    np.testing.assert_array_equal(f_ref(x, w), f_new(x, w))
    for a, b in zip(jax.grad(f_ref, (0, 1))(x, w), jax.grad(f_new, (0, 1))(x, w)):
        np.testing.assert_array_equal(a, b)


def test_conv_module_is_a_drop_in_for_nn_conv():
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    ref = nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME")
    new = conv_lib.Conv(6, (3, 3), strides=(2, 2), padding="SAME", conv_impl="explicit_grad")
    params = ref.init(jax.random.key(4), x)
    # same parameter names, shapes and initial values from the same key
    _assert_trees_close(params, new.init(jax.random.key(4), x), rtol=0.0)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
    assert _rel(ref.apply(params, x), new.apply(params, x)) <= RTOL
    g_ref = jax.grad(loss(ref), (0, 1))(params, x)
    g_new = jax.grad(loss(new), (0, 1))(params, x)
    _assert_trees_close(g_ref, g_new)


def test_unknown_conv_impl_is_rejected():
    with pytest.raises(ValueError, match="conv_impl"):
        conv_lib.Conv(4, (3, 3), conv_impl="winograd")


@pytest.mark.parametrize(
    "make",
    [
        lambda impl: layers.ResBlock(8, norm_groups=4, conv_impl=impl),
        lambda impl: layers.ResBlock(8, norm_groups=4, resample="down", conv_impl=impl),
        lambda impl: layers.Downsample(True, conv_impl=impl),
        lambda impl: layers.Upsample(True, conv_impl=impl),
    ],
    ids=["resblock", "resblock_down", "downsample", "upsample"],
)
def test_blocks_same_params_outputs_and_grads(make):
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 4))
    emb = jax.random.normal(jax.random.key(6), (2, 16))
    ref, new = make("xla"), make("explicit_grad")
    args = (x, emb) if isinstance(ref, layers.ResBlock) else (x,)
    params = ref.init(jax.random.key(7), *args)
    _assert_trees_close(params, new.init(jax.random.key(7), *args), rtol=0.0)
    # non-zero everywhere (ResBlock's conv2 is zero-initialized, which would hide it)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(p.dtype), params)

    def loss(module):
        return lambda p, *a: jnp.sum(jnp.tanh(module.apply(p, *a)))

    assert _rel(ref.apply(params, *args), new.apply(params, *args)) <= RTOL
    _assert_trees_close(
        jax.grad(loss(ref), (0, 1))(params, *args), jax.grad(loss(new), (0, 1))(params, *args)
    )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's compiled HLO")
def test_gradient_convs_inside_scan_are_canonical():
    """In a scanned SGD step, every convolution of the explicit-grad version compiles in
    XLA:CPU's canonical NHWC/HWIO form (batch-major input, HWIO kernel). JAX autodiff's
    weight-gradient conv does not (it stays 'f01b_i01o->01bf' and runs as a naive loop,
    ~40x slower on jaxlib 0.10.2), which is why the option exists."""
    conv = conv_lib.Conv(8, (3, 3), padding="SAME", conv_impl="explicit_grad")
    down = conv_lib.Conv(8, (3, 3), strides=(2, 2), padding="SAME", conv_impl="explicit_grad")
    xs = jnp.ones((3, 4, 8, 8, 8))

    def net(p, x):
        return jnp.mean(down.apply(p["down"], conv.apply(p["conv"], x)) ** 2)

    params = {
        "conv": conv.init(jax.random.key(0), xs[0]),
        "down": down.init(jax.random.key(1), xs[0]),
    }

    def sgd_steps(p, xs):
        def step(p, x):
            return jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(net)(p, x)), None

        return jax.lax.scan(step, p, xs)[0]

    hlo = jax.jit(sgd_steps).lower(params, xs).compile().as_text()
    labels = re.findall(r" convolution\(.*?dim_labels=([^,\s]+)", hlo)
    # 2 forward + 2 weight grads + the input grad of `down` (x itself needs none)
    assert len(labels) >= 5, labels
    assert set(labels) == {"b01f_01io->b01f"}, labels
