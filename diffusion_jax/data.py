"""Input pipelines: TFDS random-access sources -> grain MapDataset -> per-process batches.

Every dataset is read the same way: the TFDS builder that :mod:`diffusion_jax.datasets`
returns for ``data.name`` (``"digits"``, the offline default, is built there on first use;
any other name must be a TFDS dataset prepared in ``data.data_dir``, array_record format),
then ``builder.as_data_source`` (what ``tfds.data_source`` calls; random access, no
TensorFlow) wrapped in a ``grain.MapDataset``. Nothing is downloaded at run time. Records
have a uint8 HxWxC ``"image"`` and, optionally, a ``ClassLabel`` ``"label"`` (datasets
without one, e.g. celeb_a, give ``num_classes == 0`` and all-zero labels).
``data.data_dir == ""`` means ``~/.cache/diffusion_jax/tensorflow_datasets``.

Images come out ``image_size x image_size`` (square). Images of another size are fitted by
``data.resize_method``: "bilinear" (default) center-crops named datasets' images to a square
and resizes them with PIL bilinear (antialiased when shrinking; digits are only ever
upscaled, ``image_size >= 8``); "pad" center-pads with 0, the black background of digits
and Fashion-MNIST (never scales: ``image_size`` must be >= the stored size; odd margins put
the extra pixel at the bottom/right), e.g. Fashion-MNIST 28 -> 32, 2 pixels each side.
Training, ``load_split_arrays`` and hence evaluation's reference statistics all go through
the same ``transforms.PrepareExample``. Then uint8 -> float32 ``x / 127.5 - 1`` in [-1, 1].

Order (train iterator): one global stream defined by ``seed`` and the *global* batch size
``G = batch_size * process_count``. Epoch ``e`` is the permutation
``np.random.default_rng([seed, e]).permutation(n)`` of the split, cut into ``n // G``
global batches (the epoch's remainder is dropped). Process ``p`` reads only rows
``[p*b, (p+1)*b)`` of each global batch. Horizontal flips are drawn per (seed, position
in the stream), so the same image is flipped independently in different epochs. Hence the
union of the processes' batches at a step is bit-identical to what one process with
``batch_size * process_count`` gets, and the iterator state (the global step) is valid
for any process layout with the same global batch size.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from absl import flags

from diffusion_jax import data_order, data_transforms as transforms, datasets
from diffusion_jax.datasets import digits, latents

DIGITS = digits.NAME
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "diffusion_jax", "tensorflow_datasets")

# data.resize_method: how images of another size become image_size x image_size.
RESIZE_METHODS = ("bilinear", "pad")

# Batches prefetched by one background thread when worker_count == 0 (enough to overlap
# the next batch with a train step; grain's default of 500 batches is far too many).
_PREFETCH_BATCHES = 2


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset split (shapes after resizing)."""

    name: str
    image_shape: tuple[int, int, int]  # (H, W, C)
    num_classes: int  # 0: no labels (labels are all zero)
    num_examples: int  # of the split


# ----------------------------------------------------------------------------------------
# Config and sources.


@dataclasses.dataclass(frozen=True)
class _Config:
    name: str
    data_dir: str
    split: str
    image_size: int
    resize_method: str
    random_flip: bool
    worker_count: int


def _parse_config(data_cfg: Any) -> _Config:
    def get(key, default=None):
        if isinstance(data_cfg, Mapping) or hasattr(data_cfg, "get"):
            value = data_cfg.get(key, default)
        else:
            value = getattr(data_cfg, key, default)
        if value is None:
            raise ValueError(f"data config is missing {key!r}")
        return value

    cfg = _Config(
        name=str(get("name")),
        data_dir=os.path.expanduser(str(get("data_dir", "")) or DEFAULT_DATA_DIR),
        split=str(get("split", "train")),
        image_size=get("image_size"),
        resize_method=get("resize_method", "bilinear"),
        random_flip=get("random_flip", False),
        worker_count=get("worker_count", 0),
    )
    if not cfg.name:
        raise ValueError("data.name must be 'digits' or a TFDS dataset name")
    if isinstance(cfg.image_size, bool) or not isinstance(cfg.image_size, (int, np.integer)):
        raise ValueError(f"data.image_size must be an int, got {cfg.image_size!r}")
    if cfg.name == DIGITS and cfg.image_size < digits.IMAGE_SIZE:
        raise ValueError(
            f"digits are {digits.IMAGE_SIZE}x{digits.IMAGE_SIZE}: "
            f"data.image_size must be >= {digits.IMAGE_SIZE}, "
            f"got {cfg.image_size}"
        )
    if cfg.image_size < 1:
        raise ValueError(f"data.image_size must be positive, got {cfg.image_size}")
    if cfg.resize_method not in RESIZE_METHODS:
        raise ValueError(
            f"data.resize_method must be one of {RESIZE_METHODS}, got {cfg.resize_method!r}"
        )
    if not isinstance(cfg.random_flip, (bool, np.bool_)):
        raise ValueError(f"data.random_flip must be a bool, got {cfg.random_flip!r}")
    if not isinstance(cfg.worker_count, (int, np.integer)) or cfg.worker_count < 0:
        raise ValueError(f"data.worker_count must be an int >= 0, got {cfg.worker_count!r}")
    return dataclasses.replace(
        cfg,
        image_size=int(cfg.image_size),
        random_flip=bool(cfg.random_flip),
        worker_count=int(cfg.worker_count),
    )


def _open(cfg: _Config, split: str, caption_length: int = 0, attributes: bool = False):
    """Returns (random-access source, DatasetSpec, transforms.PrepareExample) for `split`;
    with ``caption_length`` the examples carry their caption's "tokens", with
    ``attributes`` the "attributes" it names."""
    builder, source = datasets.open_split(cfg.name, cfg.data_dir, split)
    features = builder.info.features
    captions = transforms.CaptionFields.of(
        cfg.name, cfg.data_dir, features, caption_length, attributes
    )
    if "latent" in features:
        return _open_latents(cfg, source, features, captions)
    if "image" not in features:
        raise ValueError(f"{cfg.name!r} has no 'image' feature (features: {list(features)})")
    native_shape = tuple(features["image"].shape)  # (H, W, C); H, W may be None
    if len(native_shape) != 3 or native_shape[-1] is None:
        raise ValueError(f"{cfg.name!r}: expected HxWxC images, got shape {native_shape}")
    if cfg.resize_method == "pad" and any(
        side is not None and side > cfg.image_size for side in native_shape[:2]
    ):
        raise ValueError(
            f"{cfg.name!r} images are {native_shape[0]}x{native_shape[1]}, larger than "
            f"data.image_size={cfg.image_size}: data.resize_method='pad' never shrinks; "
            "raise image_size or use resize_method='bilinear'"
        )
    has_label = "label" in features
    num_classes = 0
    if has_label:
        num_classes = getattr(features["label"], "num_classes", None)
        if not num_classes:
            raise ValueError(f"{cfg.name!r}: 'label' is not a ClassLabel ({features['label']})")
    spec = DatasetSpec(
        name=cfg.name,
        image_shape=(cfg.image_size, cfg.image_size, int(native_shape[-1])),
        num_classes=int(num_classes),
        num_examples=len(source),
    )
    prepare = transforms.PrepareExample(
        cfg.image_size,
        crop=cfg.name != DIGITS,
        has_label=has_label,
        pad=cfg.resize_method == "pad",
        captions=captions,
    )
    return source, spec, prepare


def _open_latents(cfg: _Config, source, features, captions=transforms.CaptionFields()):
    """(source, spec, transforms.PrepareLatent) of a latent dataset (datasets/latents.py): latents
    are never resized, and come out multiplied by the dataset's measured scale_factor."""
    shape = tuple(int(d) for d in features["latent"].shape)
    if cfg.image_size != shape[0]:
        raise ValueError(
            f"data.image_size={cfg.image_size} but the latents in {cfg.data_dir} are "
            f"{shape[0]}x{shape[1]}x{shape[2]} (they are never resized); set "
            f"--config.data.image_size={shape[0]}"
        )
    metadata = latents.read_metadata(cfg.data_dir)
    if not metadata.get("scale_factor"):
        raise ValueError(
            f"the latent dataset in {cfg.data_dir} has no measured scale_factor (its encoding "
            "did not finish); run the same `python -m diffusion_jax.encode` command again"
        )
    has_label = "label" in features
    spec = DatasetSpec(
        name=cfg.name,
        image_shape=shape,
        num_classes=int(features["label"].num_classes) if has_label else 0,
        num_examples=len(source),
    )
    prepare = transforms.PrepareLatent(float(metadata["scale_factor"]), has_label, captions)
    return source, spec, prepare


# ----------------------------------------------------------------------------------------
# Train iterator (the order of its examples: data_order.py).


def _flip_seed(seed: int) -> int:
    """Seed of grain's per-index flip RNG, hashed from `seed` (and distinct from the shuffle's)."""
    return int(np.random.SeedSequence([seed, 0xF11B]).generate_state(1)[0])


class TrainIterator:
    """Infinite iterator of this process's batches ``{"image": f32 [b,H,W,C], "label": i32 [b]}``.

    ``get_state()`` is a JSON-serialisable dict ``{"step": int, "seed": int,
    "global_batch_size": int, "num_examples": int, "dataset": str, "split": str}``; the
    step counts batches already returned (== the global train step). ``set_state`` checks
    that seed, global batch size and dataset match and resumes at exactly that step; it is
    valid for any process layout with the same global batch size.
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        *,
        spec: DatasetSpec,
        steps_per_epoch: int,
        worker_count: int,
        identity: dict[str, Any],
    ):
        self.spec = spec
        self.steps_per_epoch = steps_per_epoch
        self._batches = batches
        self._worker_count = worker_count
        self._identity = identity
        self._step = 0
        self._iterator = None

    @property
    def step(self) -> int:
        """Number of batches returned so far (the next batch is global step `step`)."""
        return self._step

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._step // self.steps_per_epoch

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start(self._step)
        batch = next(self._iterator)
        if self._worker_count:
            # Worker batches arrive as views of grain's shared memory blocks; copy them into
            # plain arrays so each block is released now, not whenever the caller drops them.
            batch = {key: np.array(value) for key, value in batch.items()}
        self._step += 1
        return batch

    def _start(self, step: int):
        remaining = self._batches[step:]
        if self._worker_count == 0:
            # One background thread prepares the next batches in-process.
            ds = remaining.to_iter_dataset(
                grain.ReadOptions(num_threads=1, prefetch_buffer_size=_PREFETCH_BATCHES)
            )
        else:
            # Worker processes each build whole batches (batch k on worker k % worker_count);
            # the order stays the same as with worker_count == 0.
            if not flags.FLAGS.is_parsed():
                # grain's worker processes read its absl flags; outside absl.app.run (tests,
                # notebooks) nothing parsed them, so use their defaults.
                flags.FLAGS.mark_as_parsed()
            ds = remaining.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self._worker_count, per_worker_buffer_size=_PREFETCH_BATCHES
                )
            )
        return iter(ds)

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step, **self._identity}

    def set_state(self, state: Mapping[str, Any]) -> None:
        for key, value in self._identity.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"data iterator state has {key}={state[key]!r} but this iterator has "
                    f"{key}={value!r}; cannot resume the same stream"
                )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"negative step in data iterator state: {step}")
        self.close()
        self._step = step

    def close(self) -> None:
        """Stops background threads/processes (also done on set_state and garbage collection)."""
        if self._iterator is not None:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
            self._iterator = None

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except  (interpreter shutdown)
            pass


# ----------------------------------------------------------------------------------------
# Public API.


def data_dir_of(data_cfg) -> str:
    """The directory ``data_cfg`` reads from ("" means DEFAULT_DATA_DIR), user-expanded."""
    return _parse_config(data_cfg).data_dir


def dataset_spec(data_cfg) -> DatasetSpec:
    """Shapes (after resizing), class count and size of ``data_cfg.split``."""
    cfg = _parse_config(data_cfg)
    _, spec, _ = _open(cfg, cfg.split)
    return spec


def create_train_iterator(
    data_cfg,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    caption_length: int = 0,
    attributes: bool = False,
) -> TrainIterator:
    """This process's infinite, shuffled, drop-remainder stream of ``batch_size`` examples
    (with ``caption_length`` > 0 each batch also has "tokens" [B, caption_length]: the
    captions tokenized with the dataset's vocabulary, tokenizer.py; with ``attributes``
    "attributes" [B, K]: the attribute indices each caption names).

    ``batch_size`` is per process; the global batch is ``batch_size * process_count``. See
    the module docstring for the order; it depends only on (dataset, split, seed, global
    batch size), never on process_count or worker_count.
    """
    cfg = _parse_config(data_cfg)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    source, spec, prepare = _open(cfg, cfg.split, caption_length, attributes)
    n = spec.num_examples
    global_batch = batch_size * process_count
    if global_batch > n:
        raise ValueError(
            f"global batch {global_batch} (= {batch_size} x {process_count} "
            f"processes) exceeds the {n} examples of {cfg.name}:{cfg.split}"
        )

    # Index space of `ds`: epoch * n + position in that epoch's permutation.
    ds = data_order.EpochShuffle(grain.MapDataset.source(source), seed=int(seed))
    ds = ds.map(prepare)
    if cfg.random_flip:
        ds = ds.random_map(transforms.random_flip, seed=_flip_seed(int(seed)))
    ds = data_order.ProcessRows(
        ds,
        num_examples=n,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    batches = ds.batch(batch_size, drop_remainder=True).map(transforms.to_float)
    identity = {
        "seed": int(seed),
        "global_batch_size": global_batch,
        "num_examples": n,
        "dataset": cfg.name,
        "split": cfg.split,
    }
    return TrainIterator(
        batches,
        spec=spec,
        steps_per_epoch=n // global_batch,
        worker_count=cfg.worker_count,
        identity=identity,
    )


def load_split_arrays(data_cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Whole `split`, in stored order, unflipped: (float32 [N, H, W, C] in [-1, 1], int32 [N]).

    Holds everything in memory: meant for small datasets (evaluation, reference stats).
    """
    return load_split_rows(data_cfg, split, 0, None)


def load_split_rows(
    data_cfg, split: str, start: int, stop: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of `split` (stop None: to the end) like ``load_split_arrays``:
    what ``diffusion_jax.encode`` reads one chunk at a time."""
    cfg = _parse_config(data_cfg)
    source, spec, prepare = _open(cfg, split)
    rows = range(spec.num_examples)[start:stop]
    examples = [prepare(source[i]) for i in rows]
    images = np.empty((len(rows), *spec.image_shape), np.uint8)
    if examples and examples[0]["image"].dtype != np.uint8:
        images = images.astype(examples[0]["image"].dtype)
    labels = np.empty((len(rows),), np.int32)
    for j, example in enumerate(examples):
        images[j], labels[j] = example["image"], example["label"]
    batch = transforms.to_float({"image": images, "label": labels})
    return batch["image"], batch["label"]


def load_split_captions(
    data_cfg, split: str, stop: int, start: int = 0
) -> tuple[list[str], np.ndarray]:
    """The captions and labels of rows ``[start, stop)`` of `split` in stored order (rows
    past the end wrap around): what text models are sampled under for grids and metrics,
    and what ``diffusion_jax.encode`` carries into a latent dataset."""
    cfg = _parse_config(data_cfg)
    builder, source = datasets.open_split(cfg.name, cfg.data_dir, split)
    if "caption" not in builder.info.features:
        raise ValueError(f"{cfg.name!r} has no captions (features: {list(builder.info.features)})")
    records = [source[i % len(source)] for i in range(start, stop)]
    labels = np.asarray([r.get("label", 0) for r in records], np.int32)
    return [transforms.caption_text(r) for r in records], labels
