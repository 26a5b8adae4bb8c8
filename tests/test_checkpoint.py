"""Checkpointer: 8-device save -> 1-device restore, corrupt/partial checkpoints, config
mismatch, retention, and the SIGTERM preemption flag."""

import logging
import os
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.checkpoint import Checkpointer
from diffusion_jax.preemption import PreemptionHandler, install_preemption_handler

LOGGER = "diffusion_jax.checkpoint"

# The corruption tests make orbax fail mid-read; its leftover async read coroutines are then
# garbage-collected after their event loop closed ("RuntimeError: Event loop is closed", harmless),
# sometimes during a later test, so the filter covers the whole module.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@struct.dataclass
class _State:  # a stand-in for TrainState: dataclass + dicts + optax NamedTuples + typed key
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def _make_state(seed: int, width: int = 64, extra_layer: bool = False) -> _State:
    # 64x64 float32 = 16 KiB: larger than OCDBT's 1 KiB inline limit, so the array bytes live in
    # data files that the corruption tests can damage (tiny arrays sit inside b-tree nodes).
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "dense": {
            "kernel": jax.random.normal(k1, (width, 64)),
            "bias": jnp.full((64,), float(seed)),
        }
    }
    if extra_layer:
        params["out"] = {"kernel": jnp.ones((64, 2))}
    return _State(
        step=jnp.int32(seed), params=params, opt_state=optax.adam(1e-3).init(params), rng=k2
    )


def _abstract(state_fn, sharding):
    shapes = jax.eval_shape(state_fn)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _one_device():
    return NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P())


def _host_copy(state):
    """numpy copies of every leaf (typed keys as their raw key data)."""

    def to_np(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x)

    return jax.tree.map(to_np, state)


def _assert_bit_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, _host_copy(a), _host_copy(b))


def _save_steps(directory, steps, **kw):
    with Checkpointer(str(directory), **kw) as ckpt:
        for s in steps:
            ckpt.save(s, _make_state(s), extra={"step": s})
        ckpt.wait()


def _step_dirs(directory):
    return sorted(p.name for p in Path(directory).iterdir())


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices; see conftest.py")
def test_save_on_8_devices_restore_on_1_bit_exact(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    state = _make_state(0)
    # Shard every array with a leading dim divisible by 8, replicate the rest (scalars, key).
    state = jax.tree.map(
        lambda x: jax.device_put(x, sharded if x.ndim and x.shape[0] % 8 == 0 else replicated),
        state,
    )
    assert state.params["dense"]["kernel"].sharding == sharded
    expected = _host_copy(state)
    extra = {"data": {"epoch": 2, "index": 17}, "config": {"lr": 1e-3}}

    ckpt = Checkpointer(str(tmp_path), async_save=True)
    ckpt.save(5, state, extra=extra)
    # The async save has copied the arrays off the devices when save() returns, so the
    # trainer may donate the buffers to the next step; deleting them proves it.
    jax.tree.map(lambda x: x.delete(), state)
    ckpt.wait()
    ckpt.close()

    target = _one_device()
    fresh = Checkpointer(str(tmp_path))  # as after a restart
    assert fresh.latest_step() == 5
    restored, restored_extra = fresh.restore(_abstract(lambda: _make_state(0), target))
    fresh.close()
    assert restored_extra == extra
    jax.tree.map(np.testing.assert_array_equal, _host_copy(restored), expected)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == target
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)


def test_empty_directory_gives_none(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "run"))
    assert ckpt.latest_step() is None
    assert ckpt.restore(_abstract(lambda: _make_state(0), _one_device())) is None
    ckpt.close()


def _garbage_data_files(step_dir):
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    rng = np.random.default_rng(0)
    for f in files:
        f.write_bytes(rng.bytes(f.stat().st_size))


def _delete_manifest(step_dir):
    (step_dir / "state" / "manifest.ocdbt").unlink()


def _delete_extra_item(step_dir):
    shutil.rmtree(step_dir / "extra")


@pytest.mark.parametrize("corrupt", [_garbage_data_files, _delete_manifest, _delete_extra_item])
def test_corrupt_latest_falls_back_to_previous_and_is_kept_aside(tmp_path, caplog, corrupt):
    _save_steps(tmp_path, [1, 2])
    corrupt(tmp_path / "2")
    files_before = sorted(str(p.relative_to(tmp_path / "2")) for p in (tmp_path / "2").rglob("*"))
    # A save killed midway leaves orbax's tmp dir: never listed as a step, never deleted by us.
    shutil.copytree(tmp_path / "1", tmp_path / "3.orbax-checkpoint-tmp")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ckpt = Checkpointer(str(tmp_path))
        result = ckpt.restore(_abstract(lambda: _make_state(0), _one_device()))
    assert result is not None
    state, extra = result
    assert extra == {"step": 1}
    _assert_bit_equal(state, _make_state(1))

    warnings = [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]
    assert any("3.orbax-checkpoint-tmp" in w for w in warnings)
    assert any(str(tmp_path / "2") in w and "corrupt" in w for w in warnings)
    assert any("2.corrupt" in w and "nothing was deleted" in w for w in warnings)
    # The broken step is kept, renamed; the tmp dir is untouched; orbax no longer sees step 2.
    assert _step_dirs(tmp_path) == ["1", "2.corrupt", "3.orbax-checkpoint-tmp"]
    assert (
        sorted(
            str(p.relative_to(tmp_path / "2.corrupt")) for p in (tmp_path / "2.corrupt").rglob("*")
        )
        == files_before
    )
    assert ckpt.latest_step() == 1

    # Training goes on: step 2 can be written again and is then what restore returns.
    ckpt.save(2, _make_state(22), extra={"step": 22})
    ckpt.wait()
    state, extra = ckpt.restore(_abstract(lambda: _make_state(0), _one_device()))
    assert extra == {"step": 22}
    _assert_bit_equal(state, _make_state(22))
    ckpt.close()


def test_explicit_corrupt_step_raises_and_moves_nothing(tmp_path):
    _save_steps(tmp_path, [1, 2])
    _garbage_data_files(tmp_path / "2")
    with Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(RuntimeError, match="probably corrupt"):
            ckpt.restore(_abstract(lambda: _make_state(0), _one_device()), step=2)
        with pytest.raises(ValueError, match="No checkpoint for step 7"):
            ckpt.restore(_abstract(lambda: _make_state(0), _one_device()), step=7)
        state, extra = ckpt.restore(_abstract(lambda: _make_state(0), _one_device()), step=1)
    assert extra == {"step": 1}
    assert _step_dirs(tmp_path) == ["1", "2"]


def test_nothing_readable_raises_and_moves_nothing(tmp_path):
    _save_steps(tmp_path, [1])
    _garbage_data_files(tmp_path / "1")
    with Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(RuntimeError, match="No checkpoint in .* could be restored"):
            ckpt.restore(_abstract(lambda: _make_state(0), _one_device()))
    assert _step_dirs(tmp_path) == ["1"]


@pytest.mark.parametrize(
    "changed", [dict(extra_layer=True), dict(width=32)], ids=["new-layer", "new-shape"]
)
def test_different_config_is_a_clear_error(tmp_path, changed):
    _save_steps(tmp_path, [1, 3])
    with Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(ValueError) as err:
            ckpt.restore(_abstract(lambda: _make_state(0, **changed), _one_device()))
    message = str(err.value)
    assert str(tmp_path) in message and "step 3" in message
    assert "different model/optimizer config" in message and "--workdir" in message
    assert _step_dirs(tmp_path) == ["1", "3"]  # a config error is not corruption


def test_save_skips_existing_step_and_checks_extra(tmp_path):
    with Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(1, _make_state(1))  # extra=None is stored as {}
        ckpt.save(1, _make_state(9), extra={"ignored": True}, force=True)  # exists: skipped
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(2, _make_state(2), extra={"bad": object()})
        state, extra = ckpt.restore(_abstract(lambda: _make_state(0), _one_device()))
    assert extra == {}
    _assert_bit_equal(state, _make_state(1))


def test_keeps_the_last_n(tmp_path):
    with Checkpointer(str(tmp_path), keep=2) as ckpt:
        for s in range(1, 5):
            ckpt.save(s, _make_state(s), extra={"step": s})
        ckpt.wait()
        assert ckpt.latest_step() == 4
    assert _step_dirs(tmp_path) == ["3", "4"]


def _wait_for(predicate, timeout=2.0):
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)
    return predicate()


def test_sigterm_sets_the_flag_and_uninstall_restores_the_handler():
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        with PreemptionHandler() as should_stop:
            assert signal.getsignal(signal.SIGTERM) != previous
            assert not should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            assert _wait_for(lambda: should_stop(1))
            assert should_stop(2)  # stays set
        assert signal.getsignal(signal.SIGTERM) is previous
        assert calls == []  # our handler took the signal, the previous one did not run

        should_stop = install_preemption_handler()
        assert callable(should_stop) and not should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(should_stop)
        should_stop.uninstall()
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)
