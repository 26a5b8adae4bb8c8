"""Text models on latents: encoding a captioned dataset carries its captions into the
latent dataset (same rows, same text), the tokenizer finds the source's vocabulary, a
tiny cross-attention DiT trains on the latents and samples decoded images under prompts,
and noise-aware guides (classifier, CLIP) train on them and guide its sampling, from the
API and the sample CLI."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from diffusion_jax import (
    conditioning,
    data,
    encode,
    guides,
    latent_space,
    schedules,
    steps,
    tasks,
    train,
    workdir,
)
from diffusion_jax.datasets import glyph_render, latents
from diffusion_jax.models.autoencoder import AUTOENCODER_PRESETS
from diffusion_jax.tokenizer import SPECIAL_TOKENS

from helpers import cli, tiny_config, tiny_glyph_judge

VOCAB_SIZE = len(glyph_render.VOCABULARY) + len(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def glyph_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("glyph_data"))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, glyph_dir):
    """A tiny autoencoder, 4 steps on glyphs_tiny at 8x8 (-> 4x4x3 latents), encoded."""
    c = tiny_config(
        **{
            "model.name": "autoencoder",
            "data.name": "glyphs_tiny",
            "data.data_dir": glyph_dir,
            "train.num_steps": 4,
        }
    )
    c.model.autoencoder.update(AUTOENCODER_PRESETS["tiny"])
    ae = str(tmp_path_factory.mktemp("ae") / "wd")
    train.train_and_evaluate(c, ae)
    out = str(tmp_path_factory.mktemp("latents") / "glyphs")
    encode.run(ae, out, chunk_size=200, batch_size=64)
    return ae, out


def test_latent_dataset_carries_the_captions(encoded, glyph_dir):
    _, out = encoded
    assert latents.read_metadata(out)["captions"] is True
    source_cfg = {"name": "glyphs_tiny", "data_dir": glyph_dir, "image_size": 8}
    want, want_labels = data.load_split_captions(source_cfg, "test", 128)
    latent_cfg = {"name": "latents", "data_dir": out, "image_size": 4}
    got, got_labels = data.load_split_captions(latent_cfg, "test", 128)
    assert got == want and len(set(got)) > 100  # same rows, in order, real captions
    np.testing.assert_array_equal(got_labels, want_labels)
    vocab = conditioning.vocabulary(ml_collections.ConfigDict(latent_cfg))
    assert vocab == glyph_render.VOCABULARY


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, encoded):
    """A tiny cross-attention DiT trained 8 steps on the latents."""
    ae, out = encoded
    c = latent_config(ae, out, **{"model.name": "dit", "sampler.guidance_scale": 3.0})
    c.model.dit.update(patch_size=2, hidden_size=32, depth=2, num_heads=2)
    c.model.text.update(vocab_size=VOCAB_SIZE, width=16, depth=1, num_heads=2)
    wd = str(tmp_path_factory.mktemp("text") / "wd")
    train.train_and_evaluate(c, wd)
    return wd


def latent_config(ae, out, **overrides):
    c = tiny_config(
        **{
            "data.name": "latents",
            "data.data_dir": out,
            "data.image_size": 4,
            "latent.autoencoder": ae,
            "sampler.clip_x0": False,
            **overrides,
        }
    )
    return c


def test_text_dit_trains_on_latents_and_samples_under_prompts(text_model):
    config = workdir.load_config(text_model)
    model, spec, state = workdir.load_state(text_model, config)
    tokens = conditioning.tokenizer(config).encode_batch(["large red A", "small blue 7"] * 2)
    sample_fn = steps.make_sample_fn(
        model, schedules.build(config.schedule), config, (4, *spec.image_shape)
    )
    space = latent_space.load(config)
    fn = jax.jit(latent_space.wrap_sample_fn(sample_fn, space))
    params = (state.ema_params, space.params)
    images = np.asarray(fn(params, jax.random.key(0), tokens, 3.0))
    assert images.shape == (4, 8, 8, 3) and np.isfinite(images).all()
    # the same noise under the other prompt: the caption reaches the model
    swapped = np.asarray(fn(params, jax.random.key(0), tokens[[1, 0, 3, 2]], 3.0))
    assert np.abs(images[0] - swapped[0]).max() > 1e-4


@pytest.fixture(scope="module", params=["classifier", "clip"])
def guide(request, tmp_path_factory, encoded):
    """A tiny noise-aware guide trained 4 steps on the latents, scored in the loop."""
    ae, out = encoded
    kind = request.param
    c = latent_config(ae, out, **{"model.name": kind, "train.num_steps": 4})
    c.eval.metrics_every_steps = 4
    block = dict(channels=(8, 16), num_res_blocks=1, features=16, norm_groups=4)
    if kind == "classifier":
        block["head_sizes"] = tuple(len(v) for v in glyph_render.ATTRIBUTES.values())
    else:
        c.model.text.update(vocab_size=VOCAB_SIZE, width=16, depth=1, num_heads=2)
    c.model[kind].update(block)
    wd = str(tmp_path_factory.mktemp(kind) / "wd")
    train.train_and_evaluate(c, wd)
    return kind, wd


PROMPTS = [
    "a large bold upright red serif letter A on the blue background",
    "small green 7 on black; mono regular italic",
]


def test_guides_train_score_and_guide_sampling(guide, text_model):
    kind, guide_dir = guide
    records = [json.loads(line) for line in open(os.path.join(guide_dir, "eval.jsonl"))]
    key = "accuracy_t0" if kind == "classifier" else "retrieval_top1_t0"
    assert records[-1]["step"] == 4 and 0.0 <= records[-1][key] <= 1.0
    config = workdir.load_config(text_model)
    model, spec, state = workdir.load_state(text_model, config)
    sample_fn, params_of, targets_of = guides.load_guided_sampler(config, model, spec, guide_dir, 2)
    tokens = conditioning.tokenizer(config).encode_batch(PROMPTS)
    conditions = {"tokens": tokens, "target": targets_of(PROMPTS)}
    if kind == "classifier":  # the attribute indices each prompt names
        want = [list(glyph_render.parse_caption(p).values()) for p in PROMPTS]
        np.testing.assert_array_equal(conditions["target"], want)
    fn = jax.jit(sample_fn)
    params = params_of(state.ema_params)
    rng = jax.random.key(0)
    # scale 0 is exactly classifier-free guidance alone (eps prediction)
    plain_fn, plain_params = tasks.image_sample_fn(
        config, model, schedules.build(config.schedule), (2, *spec.image_shape)
    )
    plain = np.asarray(jax.jit(plain_fn)(plain_params(state.ema_params), rng, tokens, 3.0))
    np.testing.assert_allclose(np.asarray(fn(params, rng, conditions, 0.0)), plain, atol=1e-5)
    guided = np.asarray(fn(params, rng, conditions, 50.0))
    assert np.isfinite(guided).all() and np.abs(guided - plain).max() > 1e-4


def test_sample_cli_with_a_guide(guide, text_model, tmp_path):
    kind, guide_dir = guide
    npz = str(tmp_path / "g.npz")
    r = cli(
        "diffusion_jax.sample",
        f"--workdir={text_model}",
        f"--prompt={PROMPTS[0]}",
        "--num_samples=2",
        f"--guidance={kind}",
        f"--guide={guide_dir}",
        "--guide_scale=2",
        f"--npz={npz}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{kind} guidance 2.0" in r.stdout and np.load(npz)["images"].shape == (2, 8, 8, 3)
    # a guide is refused as a text model, and a text model as a guide, in one line
    r = cli(
        "diffusion_jax.sample",
        f"--workdir={text_model}",
        f"--guidance={kind}",
        f"--guide={text_model}",
    )
    assert r.returncode != 0 and "not a guide" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_text_judges_seen_and_heldout_prompts(text_model, guide, tmp_path, monkeypatch):
    """evaluate_text end to end on the tiny text model, judged by a tiny-recipe attribute
    classifier (the real one trains for minutes): for cfg and for the guide."""
    from diffusion_jax import evaluate_text

    tiny_glyph_judge(monkeypatch)
    kind, guide_dir = guide
    cache = str(tmp_path / "cache")
    for guidance, extra in (("cfg", {}), (kind, {"guide": guide_dir})):
        result = evaluate_text.run(
            text_model,
            num_samples=8,
            scales=[1.0, 3.0],
            cache_dir=cache,
            guidance=guidance,
            **extra,
        )
        assert set(result["scales"]) == {"1.0", "3.0"} and result["guidance"] == guidance
        for groups in result["scales"].values():
            assert set(groups) == {"seen", "heldout"}
            for name, r in groups.items():
                assert 0.0 <= r["exact_match"] <= min(r[a] for a in glyph_render.ATTRIBUTES)
            assert (
                groups["seen"]["fid_matched_ratio"] > 0 and "fid_matched" not in groups["heldout"]
            )
    table = evaluate_text.markdown(result)
    assert len(table.splitlines()) == 2 + 4 + 1 + 1  # header, 2 scales x 2 groups, chance, judge
    # the prompt groups: held-out (fg, char) pairs only in "heldout", as the dataset marks
    config = workdir.load_config(text_model)
    groups = evaluate_text.prompt_groups(latent_space.pixel_data_config(config), 8)
    pairs = glyph_render.heldout_pairs()
    for group, (captions, target, _) in ((g, groups[g]) for g in evaluate_text.GROUPS):
        inside = [(f, c) in pairs for f, c in zip(target["fg"], target["char"])]
        assert all(inside) if group == "heldout" else not any(inside)
        assert [glyph_render.parse_caption(c)["char"] for c in captions] == list(target["char"])
