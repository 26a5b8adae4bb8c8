"""Drawing N images in batches: the one sampling path that training (sample grids, in-loop
metrics), the sample CLI and the evaluate CLI all use.

``sample_fn`` is what ``steps.make_sample_fn`` returns for a fixed batch shape; this module
cuts N requests into batches of that size, pads the last one, seeds batch ``i`` with
``fold_in(PRNGKey(seed), i)``, optionally shards every batch over a mesh (each device
denoises its slice through the whole ``lax.scan``) and gathers the images to the host.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import numpy as np

from diffusion_jax import parallel
from diffusion_jax.preemption import Interrupted

_POLL_S = 0.05


def class_balanced_labels(num_classes: int, n: int) -> np.ndarray:
    """0, 1, ..., K-1, 0, 1, ... (all zeros for unconditional models): equal class counts
    whenever K divides n, so class-conditional FIDs see the data's class mix."""
    return (np.arange(n) % max(num_classes, 1)).astype(np.int32)


def _condition_array(a) -> np.ndarray:
    """A condition leaf as int32 (labels, tokens) or float32 (a control, a scale)."""
    a = np.asarray(a)
    return a.astype(np.float32 if np.issubdtype(a.dtype, np.floating) else np.int32)


def padded_batch_size(batch_size: int, mesh=None) -> int:
    """``batch_size`` rounded up to a multiple of the mesh's device count."""
    if mesh is None:
        return batch_size
    return -(-batch_size // mesh.size) * mesh.size


@functools.lru_cache(maxsize=8)
def _compiled(sample_fn: Callable, mesh):
    """One jit per (sample_fn, mesh): inputs arrive already placed (see ``_place``), so
    only the output sharding is stated."""
    if mesh is None:
        return jax.jit(sample_fn)
    return jax.jit(sample_fn, out_shardings=parallel.batch_sharding(mesh))


def _place(value, mesh, batched: bool):
    """A host value -> the argument ``_compiled`` expects: unchanged without a mesh, else a
    global array sharded along its batch axis (``batched``) or replicated."""
    if value is None or mesh is None:
        return value
    sharding = parallel.batch_sharding(mesh) if batched else parallel.replicated(mesh)
    return parallel.host_value_to_global(value, sharding)


def generate_samples(
    sample_fn: Callable,
    params,
    num_samples: int,
    batch_size: int,
    seed: int,
    labels=None,
    *,
    guidance_scale: float = 1.0,
    mesh=None,
    images=None,
    mask=None,
    source_labels=None,
    negative=None,
    interrupt: Callable[[], bool] | None = None,
) -> np.ndarray:
    """``num_samples`` images [N, H, W, C] in [-1, 1] on the host, in batches.

    ``sample_fn(params, rng, labels [B, ...], guidance_scale, images, mask, source_labels,
    negative)`` is ``steps.make_sample_fn`` for shape ``(batch_size, H, W, C)``: one
    compile for all batches. Batch ``i`` uses ``fold_in(PRNGKey(seed), i)``, so the samples
    depend only on (params, seed, labels, batch_size, guidance, inputs). ``labels``
    (class labels [N], caption tokens [N, L], or a dict of such arrays; default zeros),
    ``negative`` (the labels' shape; default the null condition), ``images`` [N, ...]
    and ``source_labels`` are cut per batch, the last batch padded by cycling its rows
    and the surplus outputs dropped. ``mask`` is either one
    mask broadcast to every batch (ndim < 4) or per image [N, H, W, C'].

    With a ``mesh`` every batch is sharded over the mesh's devices (``batch_size`` must be
    a multiple of the device count: ``padded_batch_size``) and ``params`` are replicated on
    it (a no-op when they already are). The random draws do not depend on the sharding (JAX's partitionable
    threefry), so the images equal the unsharded ones up to float reduction order.
    Multi-process: every process gets all images.

    ``interrupt()`` (optional, single-process) is polled while each batch runs; once it
    returns True ``preemption.Interrupted`` is raised at once, carrying the batch still
    running on the device, so the caller can save before that batch ends (a first call
    still compiles before it can be interrupted).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"need num_samples, batch_size >= 1, got {num_samples}, {batch_size}")
    if labels is None:
        labels = np.zeros((num_samples,), np.int32)
    labels = jax.tree.map(_condition_array, labels)
    for leaf in jax.tree.leaves(labels):
        if leaf.shape[:1] != (num_samples,):
            raise ValueError(f"labels must be [{num_samples}, ...], got {leaf.shape}")
    if negative is not None:
        negative = np.asarray(negative, np.int32)
        if negative.shape != np.shape(labels):
            raise ValueError(f"negative must have the labels' shape {np.shape(labels)}")
    if mesh is not None and batch_size % mesh.size:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {mesh.size} mesh devices"
        )
    per_image_mask = mask is not None and np.ndim(mask) >= 4
    fn = _compiled(sample_fn, mesh)
    if mesh is not None:
        params = jax.device_put(params, parallel.replicated(mesh))
    scale = _place(np.float32(guidance_scale), mesh, batched=False)
    shared_mask = None if per_image_mask else _place(mask, mesh, batched=False)
    chunks = []
    for i, start in enumerate(range(0, num_samples, batch_size)):

        def cut(tree):  # this batch's rows of every array in tree, cycled up to batch_size
            if tree is None:
                return None

            def rows(a):
                batch = np.resize(a[start : start + batch_size], (batch_size, *a.shape[1:]))
                return _place(batch, mesh, batched=True)

            return jax.tree.map(rows, tree)

        rng = _place(jax.random.fold_in(jax.random.PRNGKey(seed), i), mesh, batched=False)
        batch_mask = cut(np.asarray(mask, np.float32)) if per_image_mask else shared_mask
        out = fn(
            params,
            rng,
            cut(labels),
            scale,
            cut(images),
            batch_mask,
            cut(source_labels),
            cut(negative),
        )
        while interrupt is not None and not out.is_ready():
            if interrupt():
                raise Interrupted(f"interrupted while sampling batch {i}", pending=out)
            time.sleep(_POLL_S)
        chunks.append(parallel.gather_to_host(out, name=f"samples:{i}"))
    return np.concatenate(chunks)[:num_samples]
