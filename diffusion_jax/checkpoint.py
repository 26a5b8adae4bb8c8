"""Checkpoints: the only module that imports orbax.

`Checkpointer` wraps one `orbax.checkpoint.CheckpointManager` whose steps hold two items:
``state`` (any pytree of jax.Arrays, written with `StandardSave`, possibly sharded over many
devices and processes) and ``extra`` (a JSON dict: data-iterator state, config snapshot...).
Restoring takes an abstract pytree of `jax.ShapeDtypeStruct` whose ``.sharding`` says where
every array must land, so a checkpoint written on 8 devices restores on 1 (or on a different
mesh) bit-exactly.

How failures are handled (orbax behaviour measured with orbax-checkpoint 0.12.8):

* Saves are atomic: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
  once every item is on disk, so a save killed midway leaves only the tmp directory. orbax
  never lists it as a step; we log a warning naming it (it is safe to delete), and orbax
  replaces it if that step is saved again.
* Async saves (the default) copy the arrays to host memory before `save` returns, so the
  caller may donate or delete the device buffers right away; the write continues in a
  background thread. `wait()` blocks until it is on disk (call it before exiting).
* A finalized step can still be broken (disk trouble, a manual copy gone wrong, files edited
  by hand). orbax does not notice until it reads the data: a missing item directory raises
  KeyError, a damaged data file raises a bare Exception or ValueError from TensorStore.
  `restore()` with ``step=None`` then warns, naming the directory, and falls back to the next
  older step. Once an older step has restored with the *same* abstract state (which proves the
  newer one is broken, not the request), each broken newer step directory is renamed to
  ``<step>.corrupt`` (``<step>.corrupt-1``... if taken): nothing is ever deleted, orbax no
  longer sees it (so it neither garbage-collects it nor refuses to save that step again) and
  the user can inspect or delete it. If no step restores, nothing is moved and
  `restore()` raises. (After such a failed read Python may print "RuntimeError: Event loop is
  closed" from orbax's leftover read coroutines: noise, not a second problem.)
* A checkpoint whose tree structure or array shapes differ from the abstract state (the model
  or optimizer config changed) raises a ValueError before any data is read: that is a usage
  error, not corruption, so there is no fallback. A dtype difference only warns (orbax casts,
  e.g. to restore float32 weights as bfloat16).

Multi-process: every process constructs the `Checkpointer` and calls `save`/`restore`/`wait`
in the same order; orbax writes cooperatively (each process its own shards) and only process 0
renames broken steps aside. Limitation: a step broken on only some hosts' files fails the
restore on those hosts alone, and the processes can then disagree; orbax's barriers time out
instead of hanging forever, but the job fails and needs a manual look.

Preemption (SIGTERM -> save and exit) lives in preemption.py.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
_TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix for not-yet-finalized step dirs
_CORRUPT_SUFFIX = ".corrupt"  # no digits-only name and no "_<digits>": orbax ignores it


class Checkpointer:
    """Saves and restores (state, extra) per training step under one directory.

    Args:
      directory: the run's checkpoint directory (created if missing; local path or any
        path orbax/etils supports, e.g. gs://).
      keep: how many most recent checkpoints orbax keeps; older ones are deleted by orbax
        after each save. Directories renamed to ``<step>.corrupt`` are never deleted.
      async_save: write in a background thread (the default); False blocks in `save`.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        directory = str(directory)
        self.directory = epath.Path(
            directory if "://" in directory else epath.Path(directory).resolve()
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # the trainer decides when to save
            enable_async_checkpointing=async_save,
            create=True,
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
        self._warn_about_leftover_tmp_dirs()

    # ------------------------------------------------------------------ queries

    def latest_step(self) -> int | None:
        """The newest step whose checkpoint is finalized and looks complete, else None.

        "Looks complete" is a cheap check (the step directory and both item directories exist
        and are non-empty); damaged array data is only found by reading it, which `restore`
        does (and then falls back to an older step). A save still in flight is not counted.
        """
        if not self._manager.is_saving_in_progress():
            self._manager.reload()
        for step in sorted(self._manager.all_steps(), reverse=True):
            problem = self._structural_problem(step)
            if problem is None:
                return step
            if not self._is_in_flight(step):
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
        """
        step = int(step)
        extra = {} if extra is None else extra
        try:  # fail here, not in orbax's background thread
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"Checkpointer.save: extra must be a JSON-serialisable dict: {e}"
            ) from e
        if step in self._manager.all_steps():
            log.info(
                "Checkpoint for step %d already exists in %s; not saving it again.",
                step,
                self.directory,
            )
            return
        try:
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
            log.info(
                "Checkpoint for step %d already exists in %s; not saving it again.",
                step,
                self.directory,
            )
            return
        if not saved:
            log.info(
                "Not saving step %d in %s: older than the latest checkpoint (step %s); pass force=True to save it.",
                step,
                self.directory,
                self._manager.latest_step(),
            )

    def wait(self) -> None:
        """Blocks until in-flight async saves are on disk; re-raises a failed background save."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for in-flight saves and releases orbax's threads."""
        self._manager.close()

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
        directory holds no checkpoint at all.

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
            try:
                return self._restore_step(step, abstract_state)
            except (
                Exception
            ) as e:  # orbax/TensorStore raise bare Exception, ValueError, KeyError...
                raise RuntimeError(
                    f"Could not read checkpoint {self._step_dir(step)} ({_short(e)}); it is probably "
                    "corrupt. restore(step=None) falls back to the newest readable one."
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
                    problem = f"reading it failed: {_short(e)}"
            if problem is not None:
                log.warning(
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

    def _is_in_flight(self, step: int) -> bool:
        return self._manager.is_saving_in_progress() and step == max(
            self._manager.all_steps(), default=None
        )

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
        stored_leaves = _leaves_by_path(stored_tree)
        wanted_leaves = _leaves_by_path(abstract_state)
        missing = sorted(set(wanted_leaves) - set(stored_leaves))
        unexpected = sorted(set(stored_leaves) - set(wanted_leaves))
        shape_diffs, dtype_diffs = [], []
        for path in sorted(set(wanted_leaves) & set(stored_leaves)):
            want_shape, want_dtype = _stored_form(wanted_leaves[path])
            have = stored_leaves[path]
            have_shape, have_dtype = getattr(have, "shape", None), getattr(have, "dtype", None)
            if (
                want_shape is not None
                and have_shape is not None
                and tuple(have_shape) != tuple(want_shape)
            ):
                shape_diffs.append(
                    f"{_fmt(path)}: checkpoint {tuple(have_shape)} vs wanted {tuple(want_shape)}"
                )
            elif (
                want_dtype is not None
                and have_dtype is not None
                and str(have_dtype) != str(want_dtype)
            ):
                dtype_diffs.append(f"{_fmt(path)}: {have_dtype} -> {want_dtype}")
        if missing or unexpected or shape_diffs:
            details = []
            if missing:
                details.append(f"missing from the checkpoint: {_fmt_list(missing)}")
            if unexpected:
                details.append(f"only in the checkpoint: {_fmt_list(unexpected)}")
            if shape_diffs:
                details.append(f"different shapes: {_fmt_list(shape_diffs, fmt=str)}")
            raise ValueError(
                f"The checkpoint in {self.directory} step {step} was written by a different "
                f"model/optimizer config ({'; '.join(details)}). Use a fresh --workdir, or resume "
                "with the same config that wrote it."
            )
        if dtype_diffs:
            log.warning(
                "Checkpoint %s stores other dtypes than requested; casting on restore: %s",
                self._step_dir(step),
                _fmt_list(dtype_diffs, fmt=str),
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


def _key_name(key: Any) -> str:
    """One name per path entry, whatever the container (dict, dataclass, tuple...)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaves_by_path(tree: Any) -> dict[tuple[str, ...], Any]:
    # None leaves vanish here, as orbax stores empty optimizer states (None, EmptyState) as None.
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key_name(k) for k in path): leaf for path, leaf in flat}


def _stored_form(leaf: Any) -> tuple[tuple[int, ...] | None, Any]:
    """Shape and dtype as orbax stores ``leaf`` (typed PRNG keys are stored as their key data)."""
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        return data.shape, data.dtype
    return shape, dtype


def _fmt(path: tuple[str, ...]) -> str:
    return "/".join(path) or "<root>"


def _fmt_list(items: list, fmt=_fmt, limit: int = 5) -> str:
    shown = ", ".join(fmt(i) for i in items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return text if len(text) <= limit else text[:limit] + "..."


def _free_name(directory: epath.Path, name: str) -> epath.Path:
    path, n = directory / name, 0
    while path.exists():
        n += 1
        path = directory / f"{name}-{n}"
    return path
