"""How checkpoint failures reach the user: one line each, without orbax's noise.

* `CheckpointWriteError` and `write_failure_reason`: a failed write (disk full, a file-size
  limit, no permission, a read-only file system) comes out of orbax/TensorStore as a bare
  ValueError whose text embeds the whole TensorStore spec and an ``os_error_code``;
  `write_failure_reason` turns it into a few words, and checkpoint.py raises
  `CheckpointWriteError` with them. Anything that is not a write failure (a programming
  error) gives None and is re-raised unchanged.
* `silence_orbax_noise`: after a failed read (or write) orbax closes its asyncio loop while
  TensorStore reads are still in flight, and Python later prints one traceback per leftover:
  "RuntimeError: Event loop is closed" (TensorStore calling ``call_soon_threadsafe`` on the
  closed loop, reported through `sys.unraisablehook` without an object), "Exception ignored
  in: <coroutine object _read_array_index_and_device_put ...>" (orbax coroutines collected
  unfinished), asyncio's "Task (Future, _GatheringFuture) exception was never retrieved" log
  records and "RuntimeWarning: coroutine '...' was never awaited" (two measured names):
  tens of thousands of lines for a large model, all repeating the one error the caller
  already got. orbax also logs a failed background write as ERROR tracebacks, several times.
  The filters drop exactly these (counted, but for the warning; the count is logged at
  DEBUG) and pass everything else on. orbax's ERROR records are only dropped while absl
  logs at WARNING or above (the CLIs' default), so ``--verbosity=0`` still shows them.
"""

from __future__ import annotations

import atexit
import errno
import inspect
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections import Counter
from typing import Iterator

import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit, e.g. ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EROFS: "read-only file system",
}
# TensorStore reports the OS error as text plus "[os_error_code='28']".
_STRERROR_CODES = {os.strerror(code): code for code in _REASONS}
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
# Where TensorStore/orbax append kilobytes of spec to an otherwise readable first line.
_NOISY_TAIL = re.compile(
    r"\s*(\[tensorstore_spec=|\[source locations=|See full TensorStore details).*"
)
_SETTLE_S = 0.5
_WRITER_GRACE_S = 30.0
_ORBAX_DIR = os.path.dirname(os.path.abspath(ocp.__file__))  # .../site-packages/orbax/checkpoint


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message is one line naming the reason, the
    step, the directory and the newest checkpoint that is still intact. The partial step
    directory has been removed. ``step``, ``directory``, ``previous_step`` (None when there
    is no earlier checkpoint) and ``reason`` are attributes too."""

    def __init__(self, reason: str, step: int, directory: str, previous_step: int | None):
        intact = (
            "there is no earlier checkpoint"
            if previous_step is None
            else f"the previous checkpoint (step {previous_step}) is intact"
        )
        super().__init__(f"{reason} while saving step {step} in {directory}; {intact}")
        self.reason, self.step = reason, step
        self.directory, self.previous_step = directory, previous_step


def write_failure_reason(error: BaseException) -> str | None:
    """A few words for why a write failed ("no space left on device"...), or None when
    ``error`` is not an I/O failure (then it must propagate as it is). ``error`` or any
    exception it was raised from counts: orbax wraps TensorStore's errors."""
    io_error = None  # the first exception in the chain that is about I/O
    for e in _chain(error):
        code = e.errno if isinstance(e, OSError) else None
        if code is None:
            match = _OS_ERROR_CODE.search(str(e))
            code = int(match.group(1)) if match else None
        if code is None:
            code = next((c for text, c in _STRERROR_CODES.items() if text in str(e)), None)
        if code in _REASONS:
            return _REASONS[code]
        if io_error is None and (isinstance(e, OSError) or code is not None):
            io_error = e
    return None if io_error is None else short_error(io_error)


def discard_failed_save(directory: epath.Path, tmp_name: str, *, delete: bool) -> None:
    """After a failed write: waits (at most ``_WRITER_GRACE_S``) for orbax's other writer
    threads of that save, which orbax does not stop when it reports the first failure (they
    would keep writing into the directory, or fail noisily at exit), then deletes
    ``directory/tmp_name*`` if ``delete`` (process 0 does; the others only wait)."""
    deadline = time.monotonic() + _WRITER_GRACE_S
    for thread in threading.enumerate():
        if type(thread).__module__.startswith("orbax.") and thread.is_alive():
            threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))
    if not delete:
        return
    # TensorStore's own (C++) writer threads may still create files for a moment after the
    # failure, so delete until the directory stays gone for _SETTLE_S (seen: re-created
    # once in ~1 of 2 runs with 8 devices).
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < _SETTLE_S and time.monotonic() < deadline + _SETTLE_S:
        leftovers = [p for p in directory.iterdir() if p.name.startswith(tmp_name)]
        for path in leftovers:
            try:
                path.rmtree()
            except OSError as e:  # a writer raced us; retried on the next pass
                log.debug("Deleting the unfinished save %s: %s", path, e)
        if leftovers:
            quiet_since = time.monotonic()
        time.sleep(0.05)
    for path in directory.iterdir():
        if path.name.startswith(tmp_name):
            log.warning("Could not delete the unfinished save %s; delete it by hand", path)


def short_error(error: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` without TensorStore's spec dump, at most ``limit``
    characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {_NOISY_TAIL.sub('', lines[0]) if lines else ''}"
    return text if len(text) <= limit else text[:limit] + "..."


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from (cause or context), each once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _in_orbax(filename: str | None) -> bool:
    return bool(filename) and os.path.abspath(filename).startswith(_ORBAX_DIR + os.sep)


# ---------------------------------------------------------------------- noise filters

_dropped: Counter = Counter()  # kind -> messages dropped since the last report
_lock = threading.Lock()
_directories: set[str] = set()  # checkpoint directories of this process
_MARK = "_diffusion_jax_orbax_noise"


def _drop(kind: str) -> None:
    with _lock:
        _dropped[kind] += 1


def report_dropped() -> None:
    """Logs (DEBUG) how many noise messages were dropped since the last report."""
    with _lock:
        counts = dict(_dropped)
        _dropped.clear()
    if counts:
        log.debug(
            "Dropped %d messages left over from failed orbax reads/writes (%s).",
            sum(counts.values()),
            ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())),
        )


def _is_leftover_unraisable(unraisable) -> bool:
    exc, obj = unraisable.exc_value, unraisable.object
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    return inspect.iscoroutine(obj) and _in_orbax(obj.cr_code.co_filename)


def _touches_checkpoints(error: BaseException) -> bool:
    """Raised in orbax code, or about a file in one of our checkpoint directories (TensorStore
    errors have no Python frames but name the file)."""
    for e in _chain(error):
        tb = e.__traceback__
        while tb is not None:
            if _in_orbax(tb.tb_frame.f_code.co_filename):
                return True
            tb = tb.tb_next
        if any(directory in str(e) for directory in tuple(_directories)):
            return True
    return False


class _AsyncioLeftovers(logging.Filter):
    """asyncio's "... exception was never retrieved" records for orbax's abandoned reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # "Task (Future, _GatheringFuture...) exception was never retrieved"
        first_line = str(record.msg).partition("\n")[0]
        if exc is not None and first_line.endswith("exception was never retrieved"):
            return _keep("asyncio never-retrieved", lambda: _touches_checkpoints(exc))
        return True


class _OrbaxWriteErrorLogs(logging.Filter):
    """orbax's ERROR tracebacks for a failed write, which CheckpointWriteError reports; kept
    when absl logs below WARNING (the user asked for library logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if (
            exc is not None
            and record.levelno >= logging.ERROR
            and _in_orbax(record.pathname)
            and logging.getLogger("absl").getEffectiveLevel() >= logging.WARNING
        ):
            return _keep("orbax write-error log", lambda: write_failure_reason(exc))
        return True


def _keep(kind: str, is_noise) -> bool:
    """A filter's verdict on a candidate record (counted when dropped); a failing check keeps it."""
    try:
        noise = bool(is_noise())
    except Exception:
        return True
    if noise:
        _drop(kind)
    return not noise


_ASYNCIO_FILTER, _ABSL_FILTER = _AsyncioLeftovers(), _OrbaxWriteErrorLogs()


def silence_orbax_noise(directory: str) -> None:
    """Installs the filters (once; idempotent) and registers ``directory`` as a checkpoint
    directory. The unraisable hook chains to the hook that was installed before it."""
    with _lock:
        _directories.add(str(directory))
        if not getattr(sys.unraisablehook, _MARK, False):
            previous = sys.unraisablehook

            def hook(unraisable) -> None:
                try:
                    leftover = _is_leftover_unraisable(unraisable)
                except Exception:  # never let the filter hide the original report
                    leftover = False
                if leftover:
                    _drop("unraisable")
                else:
                    previous(unraisable)

            setattr(hook, _MARK, True)
            sys.unraisablehook = hook
        if not getattr(silence_orbax_noise, _MARK, False):
            setattr(silence_orbax_noise, _MARK, True)
            atexit.register(report_dropped)
    logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)  # no-op when already there
    # orbax's coroutines that the closed loop never started (a Python warning, not counted):
    # array-metadata reads after a failed read, fragment writes after a failed write; only
    # these measured names, so other unawaited coroutines still warn.
    warnings.filterwarnings(
        "ignore",
        r"coroutine '(Store\._get_array_metadatas|async_serialize_from_host\.<locals>\."
        r"write_fragment)' was never awaited",
        RuntimeWarning,
    )
    logging.getLogger("absl").addFilter(_ABSL_FILTER)
