"""The guidance scale as a model input (models/guidance_input.py) and LCM's
guidance-conditioned consistency distillation (consistency.teacher_guidance_max).

Exactness claims: a student completed from its teacher's weights computes the teacher's
output bit for bit at every w (the embedding's last layer starts at zero); the sampler
feeds w to such a model in one forward per step instead of guiding it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import consistency, schedules, steps, train, workdir
from diffusion_jax.models import abstract_inputs, build_model
from diffusion_jax.models.guidance_input import split
from diffusion_jax.state import complete_params, create_train_state

from helpers import tiny_config

SHAPE = (8, 8, 1)


def _model_cfg(name, **kw):
    cfg = tiny_config(**{"model.name": name, **kw}).model
    return cfg


def _teacher_and_student(name, **kw):
    teacher_cfg = _model_cfg(name, **kw)
    student_cfg = _model_cfg(name, **kw, **{"model.guidance_input": True})
    teacher, student = build_model(teacher_cfg), build_model(student_cfg)
    t_params = create_train_state(teacher, optax.identity(), SHAPE, 0).params
    # a "trained" teacher: the zero-initialised output layers (UNet's conv_out, DiT's
    # adaLN-Zero) would make every output 0 and an exactness check vacuous
    leaves, tree = jax.tree.flatten(t_params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    t_params = tree.unflatten(
        [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    )
    s_params = complete_params(student, t_params, SHAPE, 0)
    return teacher, student, t_params, s_params


@pytest.mark.parametrize(
    "name,kw",
    [
        ("unet", {"model.num_classes": 3}),
        ("dit", {"model.num_classes": 3}),
        ("dit", {"model.text.vocab_size": 12, "model.text.max_length": 4}),
    ],
    ids=["unet-labels", "dit-labels", "dit-text"],
)
def test_student_from_teacher_is_exactly_the_teacher_at_every_scale(name, kw):
    teacher, student, t_params, s_params = _teacher_and_student(name, **kw)
    _, _, y_abs = abstract_inputs(teacher, 4, SHAPE)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, *SHAPE)), jnp.float32)
    t = jnp.asarray([0, 10, 500, 999], jnp.int32)
    y = jnp.asarray(rng.integers(1, 3, y_abs.shape), jnp.int32)
    ref = teacher.apply({"params": t_params}, x, t, y)
    assert float(jnp.std(ref)) > 1e-3
    for w in (0.0, 1.0, 2.5, 7.0):
        out = student.apply({"params": s_params}, x, t, {"y": y, "w": jnp.full((4,), w)})
        np.testing.assert_array_equal(out, ref)  # zero-initialised: bit-identical
    # the input is wired: once the last layer is non-zero, w changes the output
    flat = jax.tree_util.tree_flatten_with_path(s_params)[0]
    assert any("guidance_embed" in jax.tree_util.keystr(p) for p, _ in flat)

    def bump(path, leaf):
        hit = "guidance_embed" in jax.tree_util.keystr(path) and "dense1" in jax.tree_util.keystr(
            path
        )
        return leaf + 0.05 if hit else leaf

    bumped = jax.tree_util.tree_map_with_path(bump, s_params)
    out1, out3 = (
        student.apply({"params": bumped}, x, t, {"y": y, "w": jnp.full((4,), w)})
        for w in (1.0, 3.0)
    )
    assert float(jnp.max(jnp.abs(out1 - out3))) > 1e-4


def test_split_names_the_fix_for_a_wrong_condition():
    with pytest.raises(ValueError, match="built without model.guidance_input"):
        split({"y": 1, "w": 2.0}, False)
    with pytest.raises(ValueError, match=r"must be \{'y'"):
        split(jnp.zeros(3), True)
    assert split({"y": 5, "w": 2.0}, True) == (5, 2.0)


def test_complete_params_refuses_a_start_that_does_not_fit():
    teacher, student, t_params, _ = _teacher_and_student("unet", **{"model.num_classes": 3})
    wrong = jax.tree.map(lambda a: a, t_params)
    wrong["conv_in"]["kernel"] = jnp.zeros((3, 3, 2, 2))
    with pytest.raises(ValueError, match="conv_in/kernel"):
        complete_params(student, wrong, SHAPE, 0)
    assert complete_params(teacher, t_params, SHAPE, 0) is t_params  # nothing missing


def test_sampler_feeds_the_scale_as_input_instead_of_guiding():
    """At init the student ignores w, so its samples at w = 3 are the teacher's plain
    conditional samples (w = 1): no classifier-free guidance was applied. The guided
    teacher at w = 3 differs."""
    kw = {"model.num_classes": 3, "sampler.num_steps": 4}
    teacher_cfg = tiny_config(**kw)
    student_cfg = tiny_config(**kw, **{"model.guidance_input": True})
    teacher, student, t_params, s_params = _teacher_and_student("unet", **{"model.num_classes": 3})
    sched = schedules.build(teacher_cfg.schedule)
    labels = jnp.asarray([0, 1, 2, 1], jnp.int32)
    rng = jax.random.PRNGKey(1)

    def draw(cfg, model, params, w):
        fn = jax.jit(steps.make_sample_fn(model, sched, cfg, (4, *SHAPE)))
        return np.asarray(fn(params, rng, labels, jnp.float32(w)))

    student_w3 = draw(student_cfg, student, s_params, 3.0)
    # 1e-4: the student's compiled program adds a (zero) embedding, which changes XLA's
    # fusion and so float32 rounding (measured <= 8e-6 after 4 steps); guidance moves
    # samples by > 1e-2
    np.testing.assert_allclose(student_w3, draw(teacher_cfg, teacher, t_params, 1.0), atol=1e-4)
    assert np.max(np.abs(student_w3 - draw(teacher_cfg, teacher, t_params, 3.0))) > 1e-2


def _distill(**kw):
    return {
        "model.num_classes": 10,
        "consistency.mode": "distill",
        "consistency.teacher": "/nonexistent",
        "consistency.teacher_guidance": 1.0,
        "consistency.teacher_guidance_max": 3.0,
        "model.guidance_input": True,
        **kw,
    }


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"model.guidance_input": False}, "model.guidance_input=True"),
        ({"consistency.teacher_guidance_max": 0.0}, "teacher_guidance_max > consistency"),
        ({"model.num_classes": 0}, "needs a conditional teacher"),
        ({"consistency.teacher_guidance_max": 0.5}, "must exceed"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        consistency.check_config(tiny_config(**_distill(**kw)))


def test_guidance_conditioned_distillation_runs_and_samples_at_any_scale(tmp_path, digits_dir):
    """Through the trainer: the student starts as the teacher plus a zero guidance
    embedding, trains with w ~ U[1, 3] per example, and samples at w = 1 and 3 (one
    forward per step) with different results once trained."""
    common = {"data.data_dir": str(digits_dir), "model.num_classes": 10}
    teacher = str(tmp_path / "teacher")
    train.train_and_evaluate(tiny_config(**common), teacher)
    student = str(tmp_path / "student")
    cfg = tiny_config(
        **_distill(
            **common,
            **{
                "consistency.teacher": teacher,
                "consistency.num_grid_steps": 10,
                "sampler.name": "consistency",
                "sampler.spacing": "trailing",
                "sampler.num_steps": 2,
                "train.num_steps": 4,
                "optim.learning_rate": 1e-2,
            },
        )
    )
    state = train.train_and_evaluate(cfg, student)
    assert "guidance_embed" in state.params
    assert float(jnp.max(jnp.abs(state.params["guidance_embed"]["dense1"]["kernel"]))) > 0
    model, _, loaded = workdir.load_state(student)
    sched = schedules.build(cfg.schedule)
    fn = jax.jit(steps.make_sample_fn(model, sched, cfg, (4, *SHAPE)))
    labels = jnp.asarray([0, 1, 2, 3], jnp.int32)
    a, b = (
        np.asarray(fn(loaded.ema_params, jax.random.PRNGKey(0), labels, jnp.float32(w)))
        for w in (1.0, 3.0)
    )
    assert np.all(np.isfinite(a)) and np.max(np.abs(a - b)) > 0
