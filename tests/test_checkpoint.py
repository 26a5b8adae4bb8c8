"""Checkpointer: 8-device save -> 1-device restore, corrupt/partial checkpoints, config
mismatch, retention, failed writes, read-only use, orbax's noise, and the SIGTERM
preemption flag."""

import contextlib
import errno
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.checkpoint import Checkpointer, CheckpointWriteError
from diffusion_jax.checkpoint_failures import write_failure_reason
from diffusion_jax.preemption import PreemptionHandler, install_preemption_handler

LOGGER = "diffusion_jax.checkpoint"


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
    # One warning for the leftover tmp dir, one for the broken step (naming the problem, the
    # step restored instead and where the directory went).
    assert len(warnings) == 2, warnings
    assert "3.orbax-checkpoint-tmp" in warnings[0]
    assert str(tmp_path / "2") in warnings[1] and "corrupt" in warnings[1]
    assert "step 1 was restored" in warnings[1]
    assert "2.corrupt" in warnings[1] and "nothing was deleted" in warnings[1]
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


def test_read_only_creates_nothing_and_cannot_save(tmp_path):
    missing = tmp_path / "run" / "checkpoints"
    with Checkpointer(str(missing), read_only=True) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore(_abstract(lambda: _make_state(0), _one_device())) is None
        with pytest.raises(RuntimeError, match="read-only"):
            ckpt.save(1, _make_state(1))
    assert not (tmp_path / "run").exists()

    _save_steps(tmp_path / "ok", [1])
    with Checkpointer(str(tmp_path / "ok"), read_only=True) as ckpt:
        assert ckpt.latest_step() == 1
        state, extra = ckpt.restore(_abstract(lambda: _make_state(0), _one_device()))
        with pytest.raises(RuntimeError, match="read-only"):
            ckpt.save(2, _make_state(2))
    assert extra == {"step": 1}
    _assert_bit_equal(state, _make_state(1))
    assert _step_dirs(tmp_path / "ok") == ["1"]


@contextlib.contextmanager
def _file_size_limit(limit_bytes):
    """Writes past ``limit_bytes`` fail with EFBIG ("File too large") instead of a signal: a
    real write failure in TensorStore's own write path, without root or a full disk."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("mode", ["sync", "async-wait", "async-next-save"])
def test_failed_write_is_one_line_and_leaves_no_partial_save(tmp_path, caplog, mode):
    big = {"w": jax.random.normal(jax.random.key(0), (512, 512))}  # 1 MiB, incompressible
    small = _make_state(3)
    ckpt = Checkpointer(str(tmp_path), async_save=mode != "sync")
    ckpt.save(1, _make_state(1), extra={"step": 1})
    ckpt.wait()
    with caplog.at_level(logging.WARNING), _file_size_limit(64 * 1024):
        with pytest.raises(CheckpointWriteError) as err:
            ckpt.save(2, big)  # sync: raises here; async: in the background
            if mode == "async-wait":
                ckpt.wait()
            elif mode == "async-next-save":
                ckpt.save(3, small)  # reports step 2's failure (step 3 is not saved)
        ckpt.close()  # quiet after the error
        ckpt.close()
    message = str(err.value)
    assert message == (
        f"file too large (a file-size limit, e.g. ulimit -f) while saving step 2 in {tmp_path}; "
        "the previous checkpoint (step 1) is intact"
    )
    assert (err.value.step, err.value.previous_step) == (2, 1)
    assert isinstance(err.value, OSError)
    # orbax's own ERROR tracebacks of the failure were dropped (the error says it all).
    assert [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert _step_dirs(tmp_path) == ["1"]  # the partial 2.orbax-checkpoint-tmp is gone
    with Checkpointer(str(tmp_path)) as fresh:
        state, extra = fresh.restore(_abstract(lambda: _make_state(0), _one_device()))
    assert extra == {"step": 1}
    _assert_bit_equal(state, _make_state(1))


def test_first_failed_write_says_there_is_no_earlier_checkpoint(tmp_path):
    big = {"w": jax.random.normal(jax.random.key(0), (512, 512))}
    with _file_size_limit(64 * 1024):
        with Checkpointer(str(tmp_path), async_save=False) as ckpt:
            with pytest.raises(CheckpointWriteError, match="step 5 .*; there is no earlier"):
                ckpt.save(5, big)
    assert _step_dirs(tmp_path) == []


_TS = 'Error writing "w/0" in OCDBT database: Failed to write 4 bytes to file 7: {} '


@pytest.mark.parametrize(
    "error, reason",
    [
        (
            ValueError(_TS.format("No space left on device [os_error_code='28']")),
            "no space left on device",
        ),
        (
            ValueError(_TS.format("File too large [os_error_code='27']")),
            "file too large (a file-size limit, e.g. ulimit -f)",
        ),
        (OSError(errno.EACCES, "Permission denied"), "permission denied"),
        (ValueError("RESOURCE_EXHAUSTED: ... Read-only file system"), "read-only file system"),
        (
            ValueError("UNKNOWN: I/O error [os_error_code='5'] [tensorstore_spec='{...}']\nmore"),
            "ValueError: UNKNOWN: I/O error [os_error_code='5']",
        ),
        (TypeError("Object of type object is not JSON serializable"), None),
        (ValueError("Requested shape (3,) is not compatible"), None),
    ],
)
def test_write_failure_reason(error, reason):
    assert write_failure_reason(error) == reason
    wrapped = RuntimeError("orbax wraps it")  # as orbax does: the cause is what counts
    wrapped.__cause__ = error
    assert write_failure_reason(wrapped) == reason


def _truncate_data_files(step_dir, size=50):
    files = [f for f in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir() if f.is_file()]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(size)


_RESTORE_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
import jax, jax.numpy as jnp
from diffusion_jax.checkpoint import Checkpointer
sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
abstract = {k: jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=sharding) for k in "ab"}
with Checkpointer(sys.argv[1]) as ckpt:
    # Each failed read leaves orbax reads in flight, which produce the noise by chance: retry.
    for _ in range(30):
        try:
            ckpt.restore(abstract, step=2)
        except RuntimeError:
            pass
    state, extra = ckpt.restore(abstract)
print(extra["step"])
"""


def test_failed_reads_leave_no_noise(tmp_path):
    # A damaged checkpoint used to print up to tens of thousands of lines around the fallback
    # ("Event loop is closed", "Exception ignored in: <coroutine ...>", "Task exception was
    # never retrieved"), many at the process's exit: so the restore runs in a subprocess and
    # its whole stderr is checked. Arrays of 4 MiB: small ones finish reading too soon.
    with Checkpointer(str(tmp_path)) as ckpt:
        for step in (1, 2):
            keys = jax.random.split(jax.random.key(step))
            state = {k: jax.random.normal(key, (1024, 1024)) for k, key in zip("ab", keys)}
            ckpt.save(step, state, extra={"step": step})
        ckpt.wait()
    _truncate_data_files(tmp_path / "2")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-c", _RESTORE_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "1"
    lines = run.stderr.splitlines()
    assert len(lines) < 20, "\n".join(lines[:60])
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and str(tmp_path / "2") in warnings[0], lines
    assert _step_dirs(tmp_path) == ["1", "2.corrupt"]


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
