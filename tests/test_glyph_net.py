"""The glyphs attribute classifier (evaluation/glyph_net.py): fresh renders, a tiny-recipe
net trained once into a tmp cache (reloaded without retraining), its heads, the
caption-following judge, and ``make_extractor``'s dispatch for the glyphs datasets.
Offline: the tiny glyphs dataset is built in a tmp data dir.
"""

import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.datasets import glyph_render as gr, glyphs
from diffusion_jax.evaluation import extractor, glyph_net

# ~14 s of training (mostly compiling): 8,000 renders, one epoch of 500 steps.
TINY_RECIPE = dict(
    glyph_net._GLYPH_RECIPE,
    widths=(8, 16, 32),
    feature_dim=32,
    num_renders=8_000,
    epochs=1,
    batch_size=16,
    learning_rate=5e-3,
    num_eval=1_000,
)


def tiny_cfg(data_dir, **extra):
    return {"name": glyphs.TINY_NAME, "image_size": 32, "data_dir": str(data_dir), **extra}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {
        "data": str(tmp_path_factory.mktemp("tfds")),
        "cache": str(tmp_path_factory.mktemp("c")),
    }


@pytest.fixture(scope="module")
def trained(dirs):
    return glyph_net.glyph_classifier(
        dirs["cache"], TINY_RECIPE, data_dir=dirs["data"], dataset=glyphs.TINY_NAME
    )


def test_render_set_is_deterministic_and_covers_heldout_pairs():
    images, labels = glyph_net.render_set(3, 2_000)
    again, again_labels = glyph_net.render_set(3, 2_000)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    assert images.shape == (2_000, 32, 32, 3) and labels.shape == (2_000, 7)
    # The judge must know the pairs the diffusion model never sees (10% of all pairs).
    names = glyph_net.ATTRIBUTE_NAMES
    pairs = {(int(f), int(c)) for f, c in labels[:, [names.index("fg"), names.index("char")]]}
    assert len(pairs & gr.heldout_pairs()) >= 20, "held-out (fg, char) pairs are missing"
    for i, k in enumerate(glyph_net.NUM_CLASSES.values()):
        assert set(labels[:, i]) == set(range(k))  # every class of every attribute drawn
    assert not (images[:100] == glyph_net.render_set(4, 100)[0]).all()  # the seed matters


def test_tiny_net_learns_the_easy_heads_and_reloads_from_cache(trained, dirs):
    """Easy heads (size: chance 50%; fg, bg: chance 12.5%) after 500 steps, measured on
    1,000 fresh renders / the 128 real test images: size 99.5 / 100%, bg 99.8 / 100%, fg
    92.1 / 91.4% (fg is a few ink pixels, learnt last). > 80% is ~4.5 binomial standard
    deviations below fg on the 128 real images,
    so float round-off elsewhere does not flip it, while a head that learned nothing (or
    reads another label column) stays near chance and fails. char (chance 2.8%, measured
    ~70%) must be > 30%."""
    info = trained.info
    assert trained.name == "glyph_classifier" and not info["loaded_from_cache"]
    assert isinstance(trained, glyph_net.GlyphClassifier)
    fresh, real = info["fresh_renders"]["all"], info["real_test"][glyphs.TINY_NAME]
    for name in ("size", "fg", "bg"):
        assert fresh[name] > 0.8, fresh
        assert real["all"][name] > 0.8, real
    assert fresh["char"] > 0.3 and real["all"]["char"] > 0.3, (fresh, real)
    assert real["num"] == 128 and "heldout_pairs" in real
    # The real accuracy in info is what the returned object computes on the test split.
    images, char_labels = data.load_split_arrays(tiny_cfg(dirs["data"]), "test")
    predicted = trained.predict_attributes(images)
    assert predicted["size"].dtype == np.int32 and predicted["size"].shape == (128,)
    assert np.mean(predicted["char"] == char_labels) == pytest.approx(real["all"]["char"])
    # logits are the char head; attribute_logits split the heads by class count.
    logits = trained.attribute_logits(images[:7])
    assert {n: v.shape for n, v in logits.items()} == {
        n: (7, k) for n, k in glyph_net.NUM_CLASSES.items()
    }
    np.testing.assert_allclose(trained.logits(images[:7]), logits["char"], rtol=1e-5, atol=1e-5)
    feats = trained.features(images)
    assert feats.shape == (128, 32)
    # Second call: loaded (no training), the same weights and records.
    again = glyph_net.glyph_classifier(
        dirs["cache"], TINY_RECIPE, data_dir=dirs["data"], dataset=glyphs.TINY_NAME
    )
    assert again.info["loaded_from_cache"] and again.version == trained.version
    strip = lambda i: {k: v for k, v in i.items() if k != "loaded_from_cache"}
    assert strip(again.info) == strip(info)
    np.testing.assert_allclose(again.features(images), feats, rtol=1e-5, atol=1e-6)
    # Another recipe is another cache entry (different key), not these weights.
    other = glyph_net.glyph_classifier(
        dirs["cache"], dict(TINY_RECIPE, num_renders=64, batch_size=64), dataset=None
    )
    assert not other.info["loaded_from_cache"] and other.version != trained.version


def test_make_extractor_dispatches_glyphs(trained, dirs, monkeypatch):
    monkeypatch.setattr(glyph_net, "_GLYPH_RECIPE", TINY_RECIPE)
    assert extractor.dataset_feature_nets()[glyphs.NAME] == "glyph_classifier"
    assert extractor.dataset_feature_nets()[glyphs.TINY_NAME] == "glyph_classifier"
    net = extractor.make_extractor(tiny_cfg(dirs["data"]), cache_dir=dirs["cache"])
    assert isinstance(net, glyph_net.GlyphClassifier) and net.name == "glyph_classifier"
    assert net.info["loaded_from_cache"] and net.version == trained.version
    # Pad-fitted data (image_size 36): inputs are center-cropped back to 32x32.
    padded = extractor.make_extractor(
        tiny_cfg(dirs["data"], resize_method="pad"), cache_dir=dirs["cache"]
    )
    assert padded.version == trained.version + "-crop"
    images = glyph_net.render_set(5, 6)[0].astype(np.float32) / 127.5 - 1
    big = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    np.testing.assert_allclose(padded.features(big), trained.features(images), rtol=1e-5, atol=1e-5)
    # Resized inputs of another size and gray images are fitted too.
    assert trained.features(np.zeros((3, 16, 16, 1), np.float32)).shape == (3, 32)


def test_caption_following_hand_computed():
    names = glyph_net.ATTRIBUTE_NAMES
    target = {n: np.array([0, 1, 1, 0]) for n in names}
    predicted = {n: v.copy() for n, v in target.items()}
    predicted["char"][1] = 5  # row 1: char wrong
    predicted["fg"][2], predicted["bg"][2] = 3, 4  # row 2: fg and bg wrong
    predicted["size"][2] = 0  # row 2: size wrong too
    result = glyph_net.caption_following(predicted, {**target, "dx": np.zeros(4)})
    expected = {n: 1.0 for n in names}
    expected.update(char=0.75, fg=0.75, bg=0.75, size=0.75, exact_match=0.5)
    assert result == expected
    targets = glyph_net.attribute_arrays(
        [gr.Attributes(**{n: int(v[i]) + (n == "bg") for n, v in target.items()}) for i in range(4)]
    )
    assert targets["bg"].tolist() == [1, 2, 2, 1] and targets["char"].dtype == np.int32
    with pytest.raises(ValueError, match="missing"):
        glyph_net.caption_following({n: target[n] for n in names[1:]}, target)
    with pytest.raises(ValueError, match="char"):
        glyph_net.caption_following({**target, "char": np.zeros(3)}, target)
