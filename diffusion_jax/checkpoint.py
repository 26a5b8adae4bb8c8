"""Checkpoints: the only module that imports orbax (with its helpers checkpoint_tree.py and
checkpoint_failures.py).

`Checkpointer` wraps one `orbax.checkpoint.CheckpointManager` whose steps hold two items:
``state`` (any pytree of jax.Arrays, written with `StandardSave`, possibly sharded over many
devices and processes) and ``extra`` (a JSON dict: data-iterator state, config snapshot...).
Restoring takes an abstract pytree of `jax.ShapeDtypeStruct` whose ``.sharding`` says where
every array must land, so a checkpoint written on 8 devices restores on 1 (or on a different
mesh) bit-exactly. ``read_only=True`` (sampling, evaluation) never creates or changes
anything: a missing directory simply holds no checkpoint.

How failures are handled (orbax behaviour measured with orbax-checkpoint 0.12.8):

* Saves are atomic: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
  once every item is on disk, so a save killed midway leaves only the tmp directory. orbax
  never lists it as a step; we log a warning naming it (it is safe to delete), and orbax
  replaces it if that step is saved again.
* Async saves (the default) copy the arrays to host memory before `save` returns, so the
  caller may donate or delete the device buffers right away; the write continues in a
  background thread. `wait()` blocks until it is on disk (call it before exiting).
* A write that fails (disk full, file-size limit, permission, read-only file system) raises
  `CheckpointWriteError` with one line, e.g. ``no space left on device while saving step N in
  DIR; the previous checkpoint (step M) is intact``: from `save` (synchronous), or from
  `wait`, `close` or the next `save` (async; it still names the failed step). The unfinished
  tmp directory is deleted first (by process 0; each process whose write failed raises) and
  orbax's own tracebacks are not shown; a later `close()` is quiet. Other errors (bad
  arguments) propagate unchanged.
* A finalized step can still be broken (disk trouble, a manual copy gone wrong, files edited
  by hand). orbax does not notice until it reads the data: a missing item directory raises
  KeyError, a damaged data file raises a bare Exception or ValueError from TensorStore.
  `restore()` with ``step=None`` then falls back to the next older step. Once an older step
  has restored with the *same* abstract state (which proves the newer one is broken, not the
  request), each broken newer step directory is renamed to ``<step>.corrupt``
  (``<step>.corrupt-1``... if taken), with one warning per step naming the problem, the step
  restored instead and the new name: nothing is ever deleted, orbax no longer sees it (so it
  neither garbage-collects it nor refuses to save that step again) and the user can inspect
  or delete it. If no step restores, nothing is moved and `restore()` raises. orbax leaves
  the failed read's other reads in flight; Python would report each as a traceback ("Event
  loop is closed", "Exception ignored in: <coroutine ...>"), thousands of lines that the
  filters in checkpoint_failures.py (installed by the first Checkpointer) drop.
* A checkpoint whose tree structure or array shapes differ from the abstract state (the model
  or optimizer config changed) raises a ValueError before any data is read: that is a usage
  error, not corruption, so there is no fallback. A dtype difference only warns (orbax casts,
  e.g. to restore float32 weights as bfloat16).

Multi-process: every process constructs the `Checkpointer` and calls `save`/`restore`/`wait`
in the same order; orbax writes cooperatively (each process its own shards) and only process 0
renames broken steps aside. Limitation: a step broken on only some hosts' files fails the
restore on those hosts alone, and the processes can then disagree; orbax's barriers time out
instead of hanging forever, but the job fails and needs a manual look. The same holds for a
write that fails on only some hosts.

Preemption (SIGTERM -> save and exit) lives in preemption.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Iterable, Iterator

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import checkpoint_failures, checkpoint_tree
from diffusion_jax.checkpoint_failures import CheckpointWriteError, short_error

__all__ = ["Checkpointer", "CheckpointWriteError"]

log = logging.getLogger(__name__)

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
_TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix for not-yet-finalized step dirs
_CORRUPT_SUFFIX = ".corrupt"  # no digits-only name and no "_<digits>": orbax ignores it


class Checkpointer:
    """Saves and restores (state, extra) per training step under one directory.

    Args:
      directory: the run's checkpoint directory (created if missing unless ``read_only``;
        local path or any path orbax/etils supports, e.g. gs://).
      keep: how many most recent checkpoints orbax keeps; older ones are deleted by orbax
        after each save. Directories renamed to ``<step>.corrupt`` are never deleted.
      async_save: write in a background thread (the default); False blocks in `save`.
      read_only: only read: the directory is not created and `save` raises (so sampling or
        evaluating a workdir without checkpoints leaves no empty directory behind).
    """

    def __init__(
        self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        directory = str(directory)
        self.directory = epath.Path(
            directory if "://" in directory else epath.Path(directory).resolve()
        )
        self.read_only = read_only
        self._async = async_save
        checkpoint_failures.silence_orbax_noise(str(self.directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # the trainer decides when to save
            enable_async_checkpointing=async_save,
            # Not orbax's own read_only option: it logs warnings about every setting it drops.
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                EXTRA_ITEM: ocp.JsonCheckpointHandler(),
            },
        )
        self._is_primary = jax.process_index() == 0
        self._warned: set[tuple[int, str]] = set()
        self._pending: int | None = None  # step of an async save not yet waited for
        self._failed = False  # a CheckpointWriteError was raised
        self._closed = False
        self._warn_about_leftover_tmp_dirs()

    # ------------------------------------------------------------------ queries

    def latest_step(self) -> int | None:
        """The newest step whose checkpoint is finalized and looks complete, else None.

        "Looks complete" is a cheap check (the step directory and both item directories exist
        and are non-empty); damaged array data is only found by reading it, which `restore`
        does (and then falls back to an older step). A save still in flight is not counted.
        """
        in_flight = self._pending if self._manager.is_saving_in_progress() else None
        if in_flight is None:
            self._manager.reload()
        for step in sorted(self._manager.all_steps(), reverse=True):
            problem = self._structural_problem(step)
            if problem is None:
                return step
            if step != in_flight:
                self._warn_once(step, problem)
        return None

    # ------------------------------------------------------------------ save

    def save(
        self, step: int, state: Any, *, extra: dict | None = None, force: bool = False
    ) -> None:
        """Starts writing ``state`` and ``extra`` as checkpoint ``step`` (all processes call this).

        Async by default: returns once the arrays are copied to host memory (the caller may
        then donate the buffers); `wait()` blocks until the files are on disk. A step that
        already has a checkpoint is skipped (logged), never overwritten. Without ``force`` a
        step older than the latest checkpoint is also skipped (orbax's policy, so a resumed
        run cannot interleave with newer checkpoints by accident); ``force=True`` saves it.

        Raises:
          CheckpointWriteError: this save, or the previous async one, could not be written.
          TypeError: ``extra`` is not JSON-serialisable.
        """
        step = int(step)
        if self.read_only:
            raise RuntimeError(
                f"Cannot save step {step}: the Checkpointer for {self.directory} is read-only."
            )
        extra = {} if extra is None else extra
        try:  # fail here, not in orbax's background thread
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"Checkpointer.save: extra must be a JSON-serialisable dict: {e}"
            ) from e
        self.wait()  # a failed previous async save is reported as that step's failure
        if step in self._manager.all_steps():
            return self._skip_existing(step)
        try:
            with self._write_failures(step):
                saved = self._manager.save(
                    step,
                    args=ocp.args.Composite(
                        **{
                            STATE_ITEM: ocp.args.StandardSave(state),
                            EXTRA_ITEM: ocp.args.JsonSave(extra),
                        }
                    ),
                    force=force,
                )
        except ocp.checkpoint_manager.StepAlreadyExistsError:  # written by someone else meanwhile
            return self._skip_existing(step)
        if not saved:
            log.info(
                "Not saving step %d in %s: older than the latest checkpoint (step %s); pass force=True to save it.",
                step,
                self.directory,
                self._manager.latest_step(),
            )
        elif self._async:
            self._pending = step

    def wait(self) -> None:
        """Blocks until in-flight async saves are on disk.

        Raises:
          CheckpointWriteError: the background write failed (reported once).
        """
        step, self._pending = self._pending, None
        with self._write_failures(step):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for in-flight saves and releases orbax's threads; safe to call again, and
        quiet after a CheckpointWriteError.

        Raises:
          CheckpointWriteError: the last async save failed (and was not reported yet).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as e:  # the failure was reported already: do not repeat it
                if not (self._failed and checkpoint_failures.write_failure_reason(e)):
                    raise
                log.debug("Ignoring a repeated write failure while closing: %s", short_error(e))
            checkpoint_failures.report_dropped()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ restore

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """Returns ``(state, extra)`` with every array on ``abstract_state``'s shardings.

        ``abstract_state``: pytree of `jax.ShapeDtypeStruct` with ``.sharding`` set (e.g. from
        `jax.eval_shape` plus the target shardings). ``step=None`` restores the newest step
        that reads back fine, renaming broken newer ones to ``<step>.corrupt`` (see the
        module docstring); an explicit ``step`` is restored or raises. Returns None when the
        directory holds no checkpoint at all (or does not exist).

        Raises:
          ValueError: the checkpoint's tree or shapes differ from ``abstract_state`` (written
            by another model/optimizer config), or the requested step does not exist.
          RuntimeError: no checkpoint could be read (nothing is moved or deleted then).
        """
        self.wait()
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            step = int(step)
            if step not in steps:
                raise ValueError(
                    f"No checkpoint for step {step} in {self.directory}; available steps: {sorted(steps)}"
                )
            problem = self._structural_problem(step)
            if problem is not None:
                raise RuntimeError(f"Checkpoint {self._step_dir(step)} is unusable: {problem}.")
            self._check_tree(step, abstract_state)
            try:  # orbax/TensorStore raise bare Exception, ValueError, KeyError...
                return self._restore_step(step, abstract_state)
            except Exception as e:
                raise RuntimeError(
                    f"Could not read checkpoint {self._step_dir(step)} ({short_error(e)}); it is "
                    "probably corrupt. restore(step=None) falls back to the newest readable one."
                ) from e

        if not steps:
            return None
        bad: list[tuple[int, str]] = []
        last_error: BaseException | None = None
        for s in steps:
            problem = self._structural_problem(s)
            if problem is None:
                self._check_tree(s, abstract_state)  # config change: raise, no fallback
                try:
                    result = self._restore_step(s, abstract_state)
                except Exception as e:
                    last_error = e
                    problem = f"reading it failed: {short_error(e)}"
            if problem is not None:
                # INFO: the warning comes once the outcome is known (_move_aside or the error).
                log.info(
                    "Checkpoint %s is corrupt or incomplete (%s); trying the previous step.",
                    self._step_dir(s),
                    problem,
                )
                bad.append((s, problem))
                continue
            if bad:
                self._move_aside(bad, good_step=s)
            log.info("Restored step %d from %s.", s, self.directory)
            return result
        raise RuntimeError(
            f"No checkpoint in {self.directory} could be restored: "
            + "; ".join(f"step {s}: {p}" for s, p in bad)
            + ". Nothing was moved or deleted. Inspect the step directories; to start over, use a "
            "fresh --workdir (or move these directories away)."
        ) from last_error

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _write_failures(self, step: int | None) -> Iterator[None]:
        """Turns an I/O failure while writing ``step`` into a one-line CheckpointWriteError,
        after deleting the step's unfinished tmp directory; other errors pass unchanged."""
        try:
            yield
        except Exception as e:
            reason = checkpoint_failures.write_failure_reason(e)
            if reason is None or step is None:
                raise
            self._failed = True
            log.debug("Saving step %d failed.", step, exc_info=e)
            checkpoint_failures.discard_failed_save(
                self.directory, f"{step}{_TMP_MARKER}", delete=self._is_primary
            )
            try:  # the failed step is not listed: its tmp directory never became a step
                previous = self.latest_step()
            except Exception:  # listing failed too: say nothing rather than something wrong
                previous = None
            raise CheckpointWriteError(reason, step, str(self.directory), previous) from None

    def _skip_existing(self, step: int) -> None:
        log.info(
            "Checkpoint for step %d already exists in %s; not saving it again.",
            step,
            self.directory,
        )

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                    EXTRA_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        extra = restored[EXTRA_ITEM]
        if not isinstance(extra, dict):
            raise ValueError(f"item {EXTRA_ITEM!r} holds {type(extra).__name__}, not a dict")
        return restored[STATE_ITEM], extra

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _structural_problem(self, step: int) -> str | None:
        """Cheap completeness check of a finalized step directory; None when it looks fine."""
        path = self._step_dir(step)
        if not path.is_dir():
            return "the step directory is missing"
        for item in (STATE_ITEM, EXTRA_ITEM):
            item_dir = path / item
            if not item_dir.is_dir() or not any(True for _ in item_dir.iterdir()):
                return f"item directory {item!r} is missing or empty"
        return None

    def _check_tree(self, step: int, abstract_state: Any) -> None:
        """Raises a ValueError when the stored tree/shapes differ from ``abstract_state``."""
        try:
            stored = self._manager.item_metadata(step)[STATE_ITEM]
            stored_tree = stored.tree if hasattr(stored, "tree") else stored
        except Exception as e:  # unreadable metadata: let the restore itself decide
            log.debug(
                "No readable tree metadata for step %d (%s); skipping the structure check.", step, e
            )
            return
        if stored_tree is None:
            return
        mismatch, casts = checkpoint_tree.compare(stored_tree, abstract_state)
        if mismatch:
            raise ValueError(
                f"The checkpoint in {self.directory} step {step} was written by a different "
                f"model/optimizer config ({mismatch}). Use a fresh --workdir, or resume "
                "with the same config that wrote it."
            )
        if casts:
            log.warning(
                "Checkpoint %s stores other dtypes than requested; casting on restore: %s",
                self._step_dir(step),
                casts,
            )

    def _move_aside(self, bad: Iterable[tuple[int, str]], good_step: int) -> None:
        """Renames broken steps newer than ``good_step`` to ``<step>.corrupt`` (never deletes)."""
        for step, problem in bad:
            src = self._step_dir(step)
            dst = _free_name(self.directory, f"{step}{_CORRUPT_SUFFIX}")
            if self._is_primary:
                src.rename(dst)
            log.warning(
                "Checkpoint %s is corrupt or incomplete (%s), so step %d was restored instead. "
                "Moved the broken directory to %s (nothing was deleted): inspect it if you like, "
                "then delete it to free the space.",
                src,
                problem,
                good_step,
                dst,
            )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("diffusion_jax.checkpoint.move_aside")
        self._manager.reload()

    def _warn_about_leftover_tmp_dirs(self) -> None:
        if not self._is_primary or not self.directory.exists():
            return
        for path in sorted(self.directory.iterdir()):
            if _TMP_MARKER in path.name:
                log.warning(
                    "Ignoring %s: a save that never finished (e.g. the job was killed while writing). "
                    "It is not a usable checkpoint; it is safe to delete, and is replaced if that step "
                    "is saved again.",
                    path,
                )

    def _warn_once(self, step: int, problem: str) -> None:
        if (step, problem) not in self._warned:
            self._warned.add((step, problem))
            log.warning(
                "Skipping checkpoint %s: %s. restore() falls back to an older step; inspect or delete "
                "the directory.",
                self._step_dir(step),
                problem,
            )


def _free_name(directory: epath.Path, name: str) -> epath.Path:
    path, n = directory / name, 0
    while path.exists():
        n += 1
        path = directory / f"{name}-{n}"
    return path
