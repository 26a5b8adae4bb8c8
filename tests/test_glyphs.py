"""Glyphs: the renderer and captions (glyph_render.py) and the TFDS builder (glyphs.py),
through the same pipeline as every dataset (data.py). Offline, in tmp data dirs, with the
tiny config (512 train / 128 test, built in about a second).
"""

import dataclasses
import os

import numpy as np
import pytest

from diffusion_jax import data, datasets
from diffusion_jax.data_transforms import caption_text
from diffusion_jax.datasets import glyph_render as gr, glyphs
from diffusion_jax.tokenizer import words

NUM_TRAIN, NUM_TEST = 512, 128


def cfg(data_dir, split="train"):
    return {"name": glyphs.TINY_NAME, "image_size": 32, "data_dir": str(data_dir), "split": split}


def records(data_dir, split):
    _, source = datasets.open_split(glyphs.TINY_NAME, str(data_dir), split)
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def glyphs_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    data.dataset_spec(cfg(path))
    return path


@pytest.fixture(scope="module")
def splits(glyphs_dir):
    return {split: records(glyphs_dir, split) for split in ("train", "test")}


def random_attributes(n, seed=0, heldout=False):
    rng = np.random.default_rng(seed)
    return [gr.sample_attributes(rng, heldout, gr.heldout_pairs()) for _ in range(n)]


# ----------------------------------------------------------------------------------------
# The dataset through the pipeline.


def test_spec_and_pipeline(glyphs_dir, splits):
    spec = data.dataset_spec(cfg(glyphs_dir))
    assert spec == data.DatasetSpec(
        name="glyphs_tiny", image_shape=(32, 32, 3), num_classes=36, num_examples=NUM_TRAIN
    )
    assert data.dataset_spec(cfg(glyphs_dir, "test")).num_examples == NUM_TEST
    with data.create_train_iterator(cfg(glyphs_dir), batch_size=8, seed=0) as it:
        batch = next(it)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert (
        batch["label"].dtype == np.int32 and -1 <= batch["image"].min() < batch["image"].max() <= 1
    )
    # load_split_arrays: the stored images (native size: not resized) and label == char.
    images, labels = data.load_split_arrays(cfg(glyphs_dir), "test")
    stored = np.stack([r["image"] for r in splits["test"]])
    np.testing.assert_allclose(images, stored / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, [r["char"] for r in splits["test"]])
    np.testing.assert_array_equal(labels, [r["label"] for r in splits["test"]])


def test_building_twice_is_identical(tmp_path, splits):
    again = {split: records(tmp_path, split) for split in ("train", "test")}
    for split in ("train", "test"):
        assert len(again[split]) == len(splits[split])
        for a, b in zip(splits[split], again[split]):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{split} {key}")
    # The stored examples are glyphs.example(split, i), a function of (SEED, split, i).
    for split in ("train", "test"):
        for i in (0, 1, 77):
            want = glyphs.example(split, i)
            np.testing.assert_array_equal(splits[split][i]["image"], want["image"])
            assert caption_text(splits[split][i]) == want["caption"]


def test_render_is_deterministic_without_caches():
    attrs = random_attributes(40, seed=3)
    first = [gr.render(a) for a in attrs]
    gr._centred_coverage.cache_clear()  # redraw from the font files
    gr._font.cache_clear()
    for a, (image, mask) in zip(attrs, first):
        again_image, again_mask = gr.render(a)
        np.testing.assert_array_equal(image, again_image)
        np.testing.assert_array_equal(mask, again_mask)


def test_stored_attributes_rerender_the_stored_image(splits):
    for split, rows in splits.items():
        for r in rows:
            attrs = glyphs.attributes(r)
            image, _ = gr.render(attrs)
            np.testing.assert_array_equal(image, r["image"], err_msg=f"{split} {r['index']}")
            assert r["label"] == r["char"] and r["fg"] != r["bg"]


# ----------------------------------------------------------------------------------------
# What is held out.


def test_heldout_pairs():
    pairs = gr.heldout_pairs()
    assert len(pairs) == 29 and pairs == gr.heldout_pairs(0)  # round(10% of 8 * 36)
    assert all(0 <= fg < 8 and 0 <= char < 36 for fg, char in pairs)
    assert gr.heldout_pairs(1) != pairs  # the seed matters
    seen = random_attributes(2000, seed=1)
    assert not any((a.fg, a.char) in pairs for a in seen)
    assert {a.char for a in seen} == set(range(36)) and {a.fg for a in seen} == set(range(8))
    unseen = random_attributes(300, seed=2, heldout=True)
    assert all((a.fg, a.char) in pairs for a in unseen)
    assert all(a.fg != a.bg for a in seen + unseen)


def test_heldout_pairs_and_template_only_in_test(splits):
    pairs = gr.heldout_pairs(glyphs.PAIRS_SEED)
    train, test = splits["train"], splits["test"]
    leaked = [r["index"] for r in train if (int(r["fg"]), int(r["char"])) in pairs]
    assert not leaked, f"train examples {leaked} use held-out (fg, char) pairs"
    assert all(r["heldout"] == 0 for r in train)
    for r in test:  # even index: held-out pair, odd: seen pair
        in_pairs = (int(r["fg"]), int(r["char"])) in pairs
        assert r["heldout"] == (r["index"] % 2 == 0) == in_pairs, r["index"]
    assert sum(r["heldout"] for r in test) == NUM_TEST // 2
    train_templates = {int(r["template"]) for r in train}
    test_templates = {int(r["template"]) for r in test}
    assert train_templates == set(range(len(gr.TEMPLATES))) - {gr.HELDOUT_TEMPLATE}
    assert test_templates == set(range(len(gr.TEMPLATES)))


# ----------------------------------------------------------------------------------------
# Captions.


def test_captions_name_every_attribute(splits):
    vocabulary = set(gr.VOCABULARY)
    for split, rows in splits.items():
        for r in rows:
            attrs = glyphs.attributes(r)
            text = caption_text(r)
            assert text == gr.caption(attrs, int(r["template"]))
            found = words(text)
            assert set(found) <= vocabulary, (text, set(found) - vocabulary)
            for name, value in attrs.names().items():
                assert value in found, f"{split} {r['index']}: {name}={value!r} not in {text!r}"
            assert attrs.kind in found or "{kind}" not in gr.TEMPLATES[int(r["template"])]
            # Only the character is upper case: the article "a" never reads as the letter A.
            assert [w for w in found if not w.islower()] == [gr.CHARS[attrs.char]], text


def test_vocabulary_is_exactly_the_words_of_all_captions():
    produced = set()
    for template in range(len(gr.TEMPLATES)):
        for k in range(36):  # every class of every attribute, in every template
            attrs = gr.Attributes(
                char=k, family=k % 4, weight=k % 2, slant=k // 2 % 2, fg=k % 8,
                bg=(k + 1) % 8, size=k // 4 % 2,
            )  # fmt: skip
            produced.update(words(gr.caption(attrs, template)))
    assert produced == set(gr.VOCABULARY)
    assert list(gr.VOCABULARY) == sorted(gr.VOCABULARY)
    assert words("{red} A, on-a 7!") == ["red", "A", "on", "a", "7"]


def test_attributes_names_round_trip():
    attrs = gr.Attributes.from_names(
        char="Q", family="stix", weight="bold", slant="italic", fg="red", bg="white",
        size="large", dx=-2, dy=1,
    )  # fmt: skip
    assert attrs.names()["char"] == "Q" and (attrs.dx, attrs.dy) == (-2, 1)
    assert gr.Attributes.from_mapping(dataclasses.asdict(attrs)) == attrs
    with pytest.raises(ValueError, match="fg and bg"):
        dataclasses.replace(attrs, bg=attrs.fg)
    with pytest.raises(ValueError, match="dx"):
        dataclasses.replace(attrs, dx=3)


# ----------------------------------------------------------------------------------------
# Rendering.


def test_mask_is_where_the_colour_is_closer_to_fg():
    """Pixels are ``rint(bg + a*(fg - bg))``; the mask is ``a > 0.5``. Rounding each channel
    moves a pixel by at most 0.5 per channel, so each distance by at most sqrt(3)/2 and
    their difference by at most sqrt(3): only pixels whose distances to fg and bg differ by
    less than that may disagree with the mask."""
    mismatched = total = 0
    for attrs in random_attributes(400, seed=4):
        image, mask = gr.render(attrs)
        names = attrs.names()
        pixels = image.astype(np.float64)
        d_fg = np.linalg.norm(pixels - gr.COLORS[names["fg"]], axis=-1)
        d_bg = np.linalg.norm(pixels - gr.COLORS[names["bg"]], axis=-1)
        disagree = (d_fg < d_bg) != mask
        assert np.all(np.abs(d_fg - d_bg)[disagree] <= np.sqrt(3) + 1e-9), attrs
        assert 0 < mask.sum() < mask.size / 2, attrs
        mismatched, total = mismatched + disagree.sum(), total + mask.size
    assert mismatched <= 0.001 * total, f"{mismatched} of {total} pixels disagree"


def test_large_glyphs_are_larger_and_bold_has_more_ink():
    """Same attributes but one: the mask of "large" (cap height 18 px) should have about
    (18/12)^2 = 2.25x the pixels of "small" (12 px), measured 2.26 over these 300; [1.8,
    2.8] allows for thin strokes thresholded away at small size and the 3 glyphs shrunk to
    fit. Bold should have more ink (coverage sum) than regular for every glyph; measured
    1.52x on average (min 1.2x), asserted >= 1.25x."""
    small, large, regular, bold = [], [], [], []
    for attrs in random_attributes(300, seed=5):
        small.append(gr.render(dataclasses.replace(attrs, size=0))[1].sum())
        large.append(gr.render(dataclasses.replace(attrs, size=1))[1].sum())
        regular.append(gr.coverage(dataclasses.replace(attrs, weight=0)).sum())
        bold.append(gr.coverage(dataclasses.replace(attrs, weight=1)).sum())
    size_ratio = np.mean(large) / np.mean(small)
    assert 1.8 <= size_ratio <= 2.8, f"mask px: large {np.mean(large)}, small {np.mean(small)}"
    assert np.all(np.array(large) > np.array(small))
    bold_ratio = np.mean(bold) / np.mean(regular)
    assert bold_ratio >= 1.25, f"ink: bold {np.mean(bold):.1f}, regular {np.mean(regular):.1f}"
    assert np.all(np.array(bold) > np.array(regular))


def test_every_glyph_fits_with_any_jitter():
    """Every (font, char, size), centred, then moved to the jitter's four corners: all its
    ink (coverage, not the mask, so faint edges count too) moves whole; np.roll would wrap
    clipped ink around and differ. The jitter is exact: whole pixels, nothing resampled."""
    for family, weight, slant in np.ndindex(4, 2, 2):
        for char, size in np.ndindex(36, 2):
            attrs = gr.Attributes(char, family, weight, slant, fg=0, bg=1, size=size)
            centred = gr.coverage(attrs)
            for dx, dy in ((-2, -2), (-2, 2), (2, -2), (2, 2)):
                moved = gr.coverage(dataclasses.replace(attrs, dx=dx, dy=dy))
                np.testing.assert_array_equal(
                    moved, np.roll(centred, (dy, dx), axis=(0, 1)), err_msg=str(attrs)
                )


def test_fonts_and_held_out_faces():
    files = [f for family in gr.FONT_FILES.values() for f in family.values()]
    assert len(set(files)) == 16 and not any(f.startswith("cm") for f in files)
    assert all(os.path.isfile(os.path.join(gr.font_dir(), f)) for f in files)
    attrs = gr.Attributes.from_names(
        char="G", family="serif", weight="regular", slant="upright", fg="black", bg="white",
        size="large",
    )  # fmt: skip
    default, _ = gr.render(attrs)
    for face in gr.HELD_OUT_FACES.values():
        path = os.path.join(gr.font_dir(), face)
        image, mask = gr.render(attrs, font_path=path)
        assert 30 < mask.sum() < 300 and not np.array_equal(image, default), face
