"""Comparing a checkpoint's stored tree with the abstract state a restore asks for.

checkpoint.py uses `compare` before reading any array data, so a checkpoint written by
another model or optimizer config is reported as such (which leaves are missing, extra or
reshaped) instead of failing somewhere inside orbax, where it would look like corruption.
"""

from __future__ import annotations

from typing import Any

import jax


def compare(stored_tree: Any, abstract_state: Any) -> tuple[str, str]:
    """``(mismatch, casts)`` between a stored tree and ``abstract_state``; "" when none.

    A ``mismatch`` (leaves missing from / only in the checkpoint, different shapes) means the
    checkpoint cannot be restored into ``abstract_state``; ``casts`` (dtype differences) do
    not stop a restore (orbax casts, e.g. float32 weights read as bfloat16). Both are short
    texts naming at most a few leaves each.
    """
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
            want_dtype is not None and have_dtype is not None and str(have_dtype) != str(want_dtype)
        ):
            dtype_diffs.append(f"{_fmt(path)}: {have_dtype} -> {want_dtype}")
    mismatches = []
    if missing:
        mismatches.append(f"missing from the checkpoint: {_fmt_list(missing)}")
    if unexpected:
        mismatches.append(f"only in the checkpoint: {_fmt_list(unexpected)}")
    if shape_diffs:
        mismatches.append(f"different shapes: {_fmt_list(shape_diffs, fmt=str)}")
    return "; ".join(mismatches), _fmt_list(dtype_diffs, fmt=str)


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
