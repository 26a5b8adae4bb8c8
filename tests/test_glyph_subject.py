"""Subject tuning of a caption-conditioned glyph model (glyph_subject.py): the identifier
word's token row leaves every old caption exact, the instances are the held-out face
captioned with the identifier, and a tiny text base gives a subject dataset with captions
and an extended base that full and LoRA runs adapt."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax import (
    conditioning,
    evaluate_glyph_subject,
    glyph_subject,
    lora,
    subject,
    train,
    workdir,
)
from diffusion_jax.datasets import glyph_render as gr, subject as subject_data
from diffusion_jax.models import build_model
from diffusion_jax.tokenizer import SPECIAL_TOKENS, Tokenizer, words

from helpers import cli, perturb_params, tiny_config, tiny_glyph_judge

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

VOCAB_SIZE = len(gr.VOCABULARY) + len(SPECIAL_TOKENS)
PROMPT = "a large regular upright red serif letter A on the blue background"


def text_overrides(data_dir, **extra):
    return {
        "data.name": "glyphs_tiny",
        "data.data_dir": str(data_dir),
        "data.image_size": 8,
        "model.text.vocab_size": VOCAB_SIZE,
        "model.text.width": 16,
        "model.text.depth": 1,
        "model.unet.num_heads": 2,
        "sampler.guidance_scale": 2.0,
        **extra,
    }


def test_identifier_word_leaves_every_old_caption_exact(tmp_path):
    """The extended model gives bit-identical outputs for old captions (no old caption
    holds the new id) and a different one for the identifier; its row is the mean of the
    family words' rows."""
    config = tiny_config(**text_overrides(tmp_path))
    config.model.unet.dropout = 0.0
    model = build_model(config.model)
    old_tok, new_tok = Tokenizer(gr.VOCABULARY, 16), Tokenizer((*gr.VOCABULARY, "zxq"), 16)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    t = np.array([3, 700])
    tokens = old_tok.encode_batch([PROMPT, ""])
    np.testing.assert_array_equal(new_tok.encode_batch([PROMPT, ""]), tokens)
    # zero-initialised output layers would make this vacuous: perturb everything
    params = perturb_params(model.init(jax.random.key(1), x, t, tokens)["params"], scale=0.1)
    families = [2 + gr.VOCABULARY.index(f) for f in gr.ATTRIBUTES["family"]]
    extended = glyph_subject.add_identifier_word(params, VOCAB_SIZE, families)
    config.model.text.vocab_size = VOCAB_SIZE + 1
    wider = build_model(config.model)
    want = model.apply({"params": params}, x, t, tokens)
    got = wider.apply({"params": extended}, x, t, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # exact: same ids
    ident = new_tok.encode_batch([PROMPT.replace("serif", "zxq")] * 2)
    moved = wider.apply({"params": extended}, x, t, ident)
    assert float(np.abs(np.asarray(moved) - np.asarray(want)).max()) > 1e-4
    (path,) = [
        p for p in jax.tree_util.tree_leaves_with_path(extended) if "token_embed" in str(p[0])
    ]
    table = np.asarray(path[1])
    assert table.shape[0] == VOCAB_SIZE + 1
    np.testing.assert_allclose(table[-1], table[families].mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="rows, not"):
        glyph_subject.add_identifier_word(params, VOCAB_SIZE + 3, families)


def test_instances_are_the_face_captioned_with_the_identifier():
    images, labels, captions = glyph_subject.instances("cmr", "zxq", 12, seed=3)
    again = glyph_subject.instances("cmr", "zxq", 12, seed=3)
    np.testing.assert_array_equal(images, again[0])  # deterministic
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    for image, label, text in zip(images, labels, captions):
        # the training templates' words, the identifier in the family slot, regular upright
        attrs = gr.parse_caption(text.replace("zxq", "serif"))
        assert attrs["char"] == label and attrs["weight"] == 0 and attrs["slant"] == 0
        assert "zxq" in words(text) and not text.startswith("an image of")  # held-out template
        # the colours the caption names: a corner is background, the ink goes toward fg
        bg, fg = (np.asarray(gr.COLORS[gr.ATTRIBUTES[k][attrs[k]]]) for k in ("bg", "fg"))
        np.testing.assert_array_equal(image[0, 0], bg)
        ink = (image != bg).any(-1)  # thin strokes: antialiased, between bg and fg
        to_fg = np.linalg.norm(image[ink].astype(float) - fg, axis=-1)
        assert ink.any() and (to_fg < np.linalg.norm(bg - fg.astype(float))).all()
    small = glyph_subject.instances("cmr", "zxq", 3, seed=3, image_size=8)[0]
    assert small.shape == (3, 8, 8, 3)
    with pytest.raises(workdir.ConfigError, match="not a held-out face"):
        glyph_subject.instances("sans", "zxq", 1, seed=0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny text UNet trained 4 steps on glyphs_tiny and a subject made from it."""
    root = tmp_path_factory.mktemp("glyph_subject")
    base = str(root / "base")
    train.train_and_evaluate(
        tiny_config(**text_overrides(root / "data", **{"train.num_steps": 4})), base
    )
    out = str(root / "subject")
    m = glyph_subject.prepare(base, out, num_instances=6, num_prior=12, num_test=4)
    return base, out, m


def test_prepare_writes_captions_vocabulary_and_an_exact_extended_base(prepared):
    base, out, m = prepared
    assert m["identifier"] == "zxq" and m["vocabulary"] == [*gr.VOCABULARY, "zxq"]
    assert m["repeats"] == {"instance": 2, "prior": 1} and m["realised_prior_weight"] == 1.0
    with np.load(subject_data.split_path(out, "train")) as arrays:
        source, captions, images = arrays["source"], arrays["caption"], arrays["image"]
    assert len(source) == m["splits"]["train"] == 6 * 2 + 12 and images.shape[1:] == (8, 8, 3)
    assert all("zxq" in words(c) for c in captions[source == subject_data.INSTANCE])
    assert not any("zxq" in words(c) for c in captions[source == subject_data.PRIOR])
    # the prior is the base's samples under its captions; the extended base draws the same
    ext = os.path.join(out, subject.BASE_DIR)
    ext_config = workdir.load_config(ext)
    assert ext_config.model.text.vocab_size == VOCAB_SIZE + 1
    tokens = conditioning.tokenizer(ext_config).encode_batch(captions[source == subject_data.PRIOR])
    ours = subject.Sampler(ext).draw(tokens, guidance_scale=2.0, seed=0)
    theirs = subject.Sampler(base).draw(tokens, guidance_scale=2.0, seed=0)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(images[source == subject_data.PRIOR], theirs)
    vocab = conditioning.vocabulary(ml_collections.ConfigDict({"name": "subject", "data_dir": out}))
    assert vocab[-1] == "zxq"


def test_prepare_refuses_label_bases_known_words_and_used_dirs(prepared, tmp_path, digits_dir):
    base, out, _ = prepared
    with pytest.raises(workdir.ConfigError, match="already holds a subject"):
        glyph_subject.prepare(base, out, num_instances=2, num_prior=2, num_test=2)
    with pytest.raises(workdir.ConfigError, match="one new word"):
        glyph_subject.prepare(base, str(tmp_path / "a"), identifier="serif")
    with pytest.raises(workdir.ConfigError, match="one new word"):
        glyph_subject.prepare(base, str(tmp_path / "b"), identifier="two words")
    labels = str(tmp_path / "labels")
    train.train_and_evaluate(
        tiny_config(
            **{"data.data_dir": str(digits_dir), "model.num_classes": 10, "train.num_steps": 1}
        ),
        labels,
    )
    with pytest.raises(workdir.ConfigError, match="takes no captions"):
        glyph_subject.prepare(labels, str(tmp_path / "c"))
    label_subject = tmp_path / "label_subject"  # what subject.py writes: no vocabulary
    label_subject.mkdir()
    (label_subject / subject_data.METADATA_FILE).write_text('{"identifier": 10}')
    with pytest.raises(ValueError, match="names its identifier as a class label"):
        conditioning.vocabulary(
            ml_collections.ConfigDict({"name": "subject", "data_dir": str(label_subject)})
        )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One feature-net cache for the module: the attribute judge trains once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_subject_runs_train_on_captions_with_the_identifier_and_are_judged(
    prepared, tmp_path, kind, cache_dir, monkeypatch
):
    """Full and LoRA runs adapt the extended base on the captioned subject data (the
    LoRA adapts the token table too, so the identifier's row can move);
    evaluate_glyph_subject judges both against the base, with a tiny-recipe attribute
    judge (the real one trains for minutes)."""
    _, out, _ = prepared
    cfg = tiny_config(
        **text_overrides(
            out,
            **{
                "data.name": "subject",
                "model.text.vocab_size": VOCAB_SIZE + 1,
                "adapter.kind": kind,
                "adapter.base": os.path.join(out, subject.BASE_DIR),
                "adapter.targets": (*lora.DEFAULT_TARGETS, r"token_embed/embedding$"),
                "train.num_steps": 2,
            },
        )
    )
    run = str(tmp_path / kind)
    state = train.train_and_evaluate(cfg, run)
    assert int(state.step) == 2
    if kind == "lora":  # the identifier's token row is among what the LoRA adapts
        paths = ["/".join(p) for p in traverse_util.flatten_dict(state.params)]
        assert any("token_embed" in p for p in paths)
    tokens = conditioning.tokenizer(workdir.load_config(run)).encode_batch(
        [PROMPT.replace("serif", "zxq")] * 2
    )
    images = subject.Sampler(run).draw(tokens, guidance_scale=2.0, seed=0)
    assert images.shape == (2, 8, 8, 3)
    tiny_glyph_judge(monkeypatch)
    scales = (0.0, 1.0) if kind == "lora" else (1.0,)
    result = evaluate_glyph_subject.run(run, num_samples=8, lora_scales=scales, cache_dir=cache_dir)
    names = [r["model"] for r in result["rows"]]
    assert names == (["base", "lora 0", "lora 1"] if kind == "lora" else ["base", "tuned"])
    for row in result["rows"]:
        for key in ("face_rate", "old_accuracy", "face_leak"):
            assert 0.0 <= row[key] <= 1.0
        assert row["fid_subject"] > 0 and set(row["old_attributes"]) > set(gr.ATTRIBUTES)
    if kind == "lora":  # scale 0 is the base exactly: the same samples, the same numbers
        assert result["rows"][1] == {**result["rows"][0], "model": "lora 0"}
    det = result["detector"]
    assert det["face"] == "cmr" and det["image_size"] == 8
    assert "| model | face_rate |" in evaluate_glyph_subject.markdown(result)
    with pytest.raises(workdir.ConfigError, match="not a glyph subject-tuning run"):
        evaluate_glyph_subject.run(os.path.join(out, subject.BASE_DIR), num_samples=4)
    json.dumps(result)  # what the CLI appends to subject_eval.jsonl


def test_clis_give_one_line_errors(prepared, tmp_path):
    base, out, _ = prepared
    r = cli("diffusion_jax.glyph_subject", f"--base={base}", f"--out={out}")
    assert r.returncode != 0 and "already holds a subject" in r.stderr
    r = cli("diffusion_jax.evaluate_glyph_subject", f"--workdir={base}")
    assert r.returncode != 0 and "not a glyph subject-tuning run" in r.stderr
    assert "Traceback" not in r.stderr
