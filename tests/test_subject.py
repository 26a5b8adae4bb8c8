"""Subject tuning (DreamBooth): the identifier's label row, the typeset-digit renders, the
prior-preservation mix, the extended base, full and LoRA runs on it, and its judge."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import evaluate_subject, lora, subject, train, workdir
from diffusion_jax.datasets import font_digits, subject as subject_data
from diffusion_jax.models import build_model
from diffusion_jax.state import create_train_state

from helpers import perturb_params, tiny_config, tiny_model_cfg

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_identifier_row_leaves_every_old_label_exact(name):
    """With the identifier's row (a copy of the null row) inserted before the null row,
    the extended model gives the base's output bit for bit for every old label and for
    the null label, and the null label's output for the identifier."""
    import optax

    k = 3
    base, extended = (build_model(tiny_model_cfg(name, num_classes=n)) for n in (k, k + 1))
    params = create_train_state(base, optax.identity(), (8, 8, 1), 0).params
    params = perturb_params(params)  # zero-initialised output layers would make this vacuous
    wider = subject.add_identifier(params, k)
    x = jax.random.normal(jax.random.PRNGKey(1), (k + 1, 8, 8, 1))
    t = jnp.array([3, 40, 70, 99])
    old = jnp.array([0, 1, 2, k])  # k is the base's null label
    out = base.apply({"params": params}, x, t, old)
    new_null = jnp.array([0, 1, 2, k + 1])
    np.testing.assert_array_equal(extended.apply({"params": wider}, x, t, new_null), out)
    ident = extended.apply({"params": wider}, x, t, jnp.full(4, k))
    np.testing.assert_array_equal(ident, base.apply({"params": params}, x, t, jnp.full(4, k)))


def test_identifier_needs_a_label_table_of_the_base_size():
    with pytest.raises(ValueError, match="no label table"):
        subject.add_identifier({"dense": {"kernel": jnp.zeros((2, 2))}}, 10)
    table = {"label_embed": {"table": {"embedding": jnp.zeros((5, 2))}}}
    with pytest.raises(ValueError, match="has 5 rows; a base of 10 classes has 11"):
        subject.add_identifier(table, 10)


@pytest.mark.parametrize(
    "n_inst, n_prior, weight, expected",
    [
        (100, 1000, 1.0, (10, 1)),
        (100, 50, 1.0, (1, 2)),
        (100, 1000, 0.5, (20, 1)),
        (10, 5, 0, (1, 0)),
    ],
)
def test_repeats_realise_the_prior_weight(n_inst, n_prior, weight, expected):
    r_inst, r_prior = subject.repeats(n_inst, n_prior, weight)
    assert (r_inst, r_prior) == expected
    if weight:  # the prior's share of the split is weight / (1 + weight)
        share = r_prior * n_prior / (r_prior * n_prior + r_inst * n_inst)
        assert share == pytest.approx(weight / (1 + weight))


def test_font_digits_are_quantised_like_the_digits_and_deterministic():
    images, labels = font_digits.render(20, seed=3)
    assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(20) % 10)
    counts = images.astype(np.float64) * 16 / 255  # each pixel is round(count * 255 / 16)
    np.testing.assert_allclose(counts, np.rint(counts), atol=0.04)
    assert counts.max() <= 16 and (counts.reshape(20, -1).max(1) >= 8).all()  # ink everywhere
    np.testing.assert_array_equal(font_digits.render(20, seed=3)[0], images)
    assert (font_digits.render(20, seed=4)[0] != images).any()
    with pytest.raises(FileNotFoundError, match="cmr10.ttf"):
        font_digits.render(2, 0, font="no_such_font.ttf")


def test_lora_can_adapt_an_embedding_table():
    params = {"label_embed": {"table": {"embedding": jnp.ones((11, 8))}}}
    assert lora.select(params, [r"label_embed/table/embedding$"]) == ["label_embed/table/embedding"]
    factors = lora.init(params, [r"table/embedding$"], rank=2, key=jax.random.PRNGKey(0))
    a = factors["label_embed"]["table"]["embedding"]["lora_a"]
    assert a.shape == (11, 2)  # one row of A per label: each label's delta is its own
    np.testing.assert_array_equal(
        lora.merge(params, factors, 2.0)["label_embed"]["table"]["embedding"], 1.0
    )


# ----------------------------------------------------------------------------------------
# Through the CLI-level functions and the trainer.


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, digits_dir):
    """A tiny class-conditional digits base (8 steps) and a subject made from it."""
    root = tmp_path_factory.mktemp("subject")
    base = str(root / "base")
    common = {"data.data_dir": str(digits_dir), "model.num_classes": 10}
    train.train_and_evaluate(tiny_config(**common), base)
    out = str(root / "subject")
    metadata = subject.prepare(
        base, out, num_instances=10, num_prior=20, num_test=12, guidance_scale=2.0
    )
    return base, out, metadata


def test_prepare_writes_the_mix_the_extended_base_and_their_record(prepared):
    base, out, m = prepared
    assert m["identifier"] == 10 and m["num_classes"] == 11
    assert m["repeats"] == {"instance": 2, "prior": 1} and m["realised_prior_weight"] == 1.0
    with np.load(subject_data.split_path(out, "train")) as arrays:
        labels, source = arrays["label"], arrays["source"]
    assert len(labels) == m["splits"]["train"] == 10 * 2 + 20
    np.testing.assert_array_equal(labels[source == subject_data.INSTANCE], 10)
    np.testing.assert_array_equal(labels[source == subject_data.PRIOR], np.arange(20) % 10)
    base_cfg = workdir.load_config(base)
    _, _, state = workdir.load_state(base, base_cfg)
    assert m["base"]["fingerprint"] == subject.adapters.fingerprint(
        jax.device_get(state.ema_params)
    )
    # the prior images are the base's own samples: the extended base draws the same
    labels10 = np.arange(20) % 10
    ours = subject.Sampler(os.path.join(out, subject.BASE_DIR)).draw(
        labels10, guidance_scale=2.0, seed=0
    )
    theirs = subject.Sampler(base).draw(labels10, guidance_scale=2.0, seed=0)
    np.testing.assert_array_equal(ours, theirs)
    with np.load(subject_data.split_path(out, "train")) as arrays:
        np.testing.assert_array_equal(arrays["image"][source == subject_data.PRIOR], theirs)


def test_prepare_refuses_bad_bases_and_a_second_subject(prepared, tmp_path, digits_dir):
    base, out, _ = prepared
    with pytest.raises(workdir.ConfigError, match="already holds a subject"):
        subject.prepare(base, out, num_instances=2, num_prior=2, num_test=2)
    uncond = str(tmp_path / "uncond")
    train.train_and_evaluate(
        tiny_config(**{"data.data_dir": str(digits_dir), "train.num_steps": 1}), uncond
    )
    with pytest.raises(workdir.ConfigError, match="not a class-conditional model"):
        subject.prepare(uncond, str(tmp_path / "s"), num_instances=2, num_prior=2, num_test=2)
    with pytest.raises(workdir.ConfigError, match="needs prior images"):
        subject.prepare(base, str(tmp_path / "s2"), num_prior=0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One feature-net cache for the module: the digits classifier trains once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_subject_runs_train_on_the_mix_and_are_judged(prepared, tmp_path, kind, cache_dir):
    """A full and a LoRA run adapt the extended base on the subject data; the LoRA adapts
    the label table too; evaluate_subject judges both (rates in [0, 1], one row per LoRA
    scale), and refuses a run that is not a subject run."""
    base, out, m = prepared
    cfg = tiny_config(
        **{
            "data.name": "subject",
            "data.data_dir": out,
            "model.num_classes": 11,
            "adapter.kind": kind,
            "adapter.base": os.path.join(out, subject.BASE_DIR),
            "adapter.targets": (*lora.DEFAULT_TARGETS, r"label_embed/table/embedding$"),
            "train.num_steps": 2,
        }
    )
    run = str(tmp_path / kind)
    state = train.train_and_evaluate(cfg, run)
    if kind == "lora":
        assert "label_embed" in state.params
    scales = (0.0, 1.0) if kind == "lora" else (1.0,)
    result = evaluate_subject.run(run, num_samples=10, lora_scales=scales, cache_dir=cache_dir)
    assert [row["lora_scale"] for row in result["rows"]] == (
        list(scales) if kind == "lora" else [None]
    )
    for row in result["rows"]:
        for key in ("subject_rate", "class_accuracy", "style_leak"):
            assert 0.0 <= row[key] <= 1.0
        assert row["fid_old"] > 0 and row["fid_subject"] > 0
    assert (
        result["detector"]["accuracy_real"] > 0.9 and result["detector"]["accuracy_subject"] > 0.9
    )
    assert "| lora_scale | subject_rate |" in evaluate_subject.markdown(result)
    with pytest.raises(workdir.ConfigError, match="not a subject-tuning run"):
        evaluate_subject.run(base, num_samples=4)
    json.dumps(result)  # what the CLI appends to subject_eval.jsonl


def test_detector_compiles_its_net_once_per_input_shape():
    """Judging many rows calls ``is_subject`` again and again: it must reuse one compiled
    apply (a fresh ``jax.jit`` per call would recompile every time), and the cached apply
    must give the same answer as the plain one."""
    from diffusion_jax.evaluation import small_classifier, subject_net

    net = small_classifier.SmallConvNet((4, 8), 8, 2)
    x = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1), minval=-1, maxval=1)
    params = net.init(jax.random.PRNGKey(1), x)["params"]
    det = subject_net.SubjectDetector(net, perturb_params(params), {})
    first = det.is_subject(np.asarray(x))
    second = det.is_subject(np.asarray(x))
    np.testing.assert_array_equal(first, second)
    applied = subject_net._jitted_apply(small_classifier.SmallConvNet((4, 8), 8, 2))
    assert applied is subject_net._jitted_apply(net)  # equal nets share one compiled apply
    assert applied._cache_size() == 1
    _, logits = net.apply({"params": det.params}, x)
    np.testing.assert_array_equal(first, np.asarray(logits).argmax(-1) == 1)
