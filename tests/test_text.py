"""Text conditioning: the tokenizer, the text encoder's padding mask, cross-attention's
empty-caption rule (it is the unconditional path), caption dropout and guidance on
captions without recompiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import conditioning, guidance, samplers, schedules
from diffusion_jax.models import build_model, text as text_model
from diffusion_jax.tokenizer import PAD_ID, UNK_ID, Tokenizer
from tests.helpers import DIT_TINY, UNET_TINY, perturb_params

VOCAB = ("a", "A", "B", "bold", "red", "blue", "letter", "on", "background", "serif")
L = 12


def tok(max_length=L):
    return Tokenizer(VOCAB, max_length)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_ids_and_case():
    t = tok()
    ids = t.encode("a bold red letter A, on a blue background")
    assert ids.dtype == np.int32 and ids.shape == (L,)
    assert t.decode(ids) == "a bold red letter A on a blue background"
    # "a" (article) and "A" (letter) are different ids; 2 special ids come first
    assert ids[0] == 2 + VOCAB.index("a") and ids[4] == 2 + VOCAB.index("A")
    assert (ids[9:] == PAD_ID).all() and (ids[:9] != PAD_ID).all()
    assert t.vocab_size == len(VOCAB) + 2
    assert text_model.PAD_ID == PAD_ID  # the model's mask agrees with the tokenizer
    np.testing.assert_array_equal(t.encode(""), np.zeros(L, np.int32))


def test_unknown_words_name_the_closest_known_ones():
    t = tok()
    with pytest.raises(ValueError) as e:
        t.encode("a bolt red letter A")
    msg = str(e.value)
    assert "'bolt'" in msg and "bold" in msg and f"{len(VOCAB)}-word vocabulary" in msg
    with pytest.raises(ValueError, match="'b'.*closest known: B"):
        t.encode("a b")  # lower-case letter: the case slip is pointed out
    # non-strict: unknown -> UNK, too long -> cut
    ids = t.encode("a bolt " + "red " * 20, strict=False)
    assert ids[1] == UNK_ID and ids.shape == (L,) and (ids != PAD_ID).all()
    with pytest.raises(ValueError, match="max_length=12"):
        t.encode("red " * 13)


# --------------------------------------------------------------------------- models


def text_cfg(name, conditioning_kind="cross"):
    arch = {"unet": dict(UNET_TINY, dropout=0.0), "dit": DIT_TINY}[name]
    return {
        "name": name,
        "num_classes": 0,
        name: arch,
        "text": dict(
            vocab_size=len(VOCAB) + 2,
            max_length=L,
            width=16,
            depth=1,
            num_heads=2,
            conditioning=conditioning_kind,
        ),
    }


CASES = [(n, c) for n in ("unet", "dit") for c in ("cross", "pooled")]


def _model(name, kind):
    model = build_model(text_cfg(name, kind))
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 4 if name == "dit" else 1))
    t = jnp.array([10, 400, 900])
    tokens = jnp.asarray(tok().encode_batch(["a red A", "bold blue B on a red background", ""]))
    params = jax.jit(model.init)(jax.random.key(1), x, t, tokens)
    # zero-initialized output layers would hide the condition: perturb everything
    return model, perturb_params(params, scale=0.1), x, t, tokens


@pytest.mark.parametrize("name,kind", CASES)
def test_padding_does_not_change_the_output(name, kind):
    """The same captions (<= 7 words) padded to 8 and to 12 tokens give the same output: padding
    tokens are masked out of self- and cross-attention and of the pooled mean. Masked
    logits get exp(-1e9) = 0 exactly, so only summation order differs (float32, ~1e-6)."""
    model, params, x, t, tokens = _model(name, kind)
    apply = jax.jit(model.apply)
    full = apply(params, x, t, tokens)
    short = apply(params, x, t, tokens[:, :8])
    np.testing.assert_allclose(short, full, atol=2e-5, rtol=2e-5)
    # ... while a different caption does change it (the test can fail)
    other = tokens.at[0, 1].set(2 + VOCAB.index("blue"))
    assert float(jnp.abs(apply(params, x, t, other)[0] - full[0]).max()) > 1e-3


@pytest.mark.parametrize("name,kind", CASES)
def test_empty_caption_is_the_unconditional_path(name, kind):
    """With the empty caption the text model equals its backbone run without any text:
    cross-attention contributes exactly zero (and the pooled vector is zero, projected
    without bias). Same float32 ops minus the zeroed branch: tolerance 1e-5 for XLA's
    fusion choices."""
    model, params, x, t, tokens = _model(name, kind)
    empty = jnp.zeros_like(tokens)
    with_text = model.apply(params, x, t, empty)
    backbone = model.backbone
    alone = backbone.apply({"params": params["params"]["backbone"]}, x, t, None)
    np.testing.assert_allclose(with_text, alone, atol=1e-5, rtol=1e-5)
    conditioned = model.apply(params, x, t, tokens)
    assert float(jnp.abs(conditioned[:2] - alone[:2]).max()) > 1e-3
    np.testing.assert_allclose(conditioned[2], alone[2], atol=1e-5, rtol=1e-5)


def test_text_config_errors_name_the_fix():
    cfg = text_cfg("unet")
    with pytest.raises(ValueError, match="labels or on captions"):
        build_model(dict(cfg, num_classes=3))
    with pytest.raises(ValueError, match="conditioning='film'"):
        build_model(dict(cfg, text=dict(cfg["text"], conditioning="film")))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['heads'\]"):
        build_model(dict(cfg, text=dict(cfg["text"], heads=2)))
    with pytest.raises(ValueError, match="cross_attention"):
        build_model(dict(cfg, unet=dict(cfg["unet"], cross_attention=True)))
    model, params, x, t, tokens = _model("unet", "cross")
    with pytest.raises(ValueError, match="max_length is 12"):
        model.apply(params, x, t, jnp.ones((3, 13), jnp.int32))


# --------------------------------------------------------------------------- training, sampling


def test_caption_dropout_empties_whole_captions():
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 12, (4000, L)), jnp.int32)
    out = np.asarray(conditioning.drop(jax.random.key(0), tokens, jnp.arange(4000), 0.25, PAD_ID))
    dropped = (out == PAD_ID).all(axis=1)
    np.testing.assert_array_equal(out[~dropped], np.asarray(tokens)[~dropped])
    # binomial: mean 1000, std sqrt(4000 * .25 * .75) = 27.4; 5 std
    assert abs(dropped.sum() - 1000) < 5 * 27.4, dropped.sum()


def test_caption_guidance_scale_and_prompts_are_traced():
    """One compiled sampler serves new guidance scales, prompts and negative prompts."""
    model, params, x, t, tokens = _model("dit", "cross")
    schedule = schedules.make_schedule("linear", 100)
    cfg = {"name": "dit", "num_classes": 0, "text": {"vocab_size": 12, "max_length": L}}

    def apply_fn(p, x_t, t, y):
        return model.apply(p, x_t, t, y)

    def run(scale, cond, negative=None):
        null = conditioning.null_like(cfg, cond) if negative is None else negative
        fn = guidance.guided_model_fn(apply_fn, params, cond, null, scale)
        return samplers.sample(
            fn, schedule, jax.random.key(0), x.shape, sampler="ddim", num_steps=3
        )

    first = run(1.0, tokens)
    size = samplers._scan_sample._cache_size()
    second = run(3.0, tokens)
    third = run(3.0, tokens[::-1], negative=tokens)
    assert samplers._scan_sample._cache_size() == size
    assert float(jnp.abs(first - second).max()) > 1e-4
    assert float(jnp.abs(second - third).max()) > 1e-4
