"""Input pipelines: TFDS random-access sources -> grain MapDataset -> per-process batches.

Every dataset is read the same way: the TFDS builder that :mod:`diffusion_jax.datasets`
returns for ``data.name`` (``"digits"``, the offline default, is built there on first use;
any other name must be a TFDS dataset prepared in ``data.data_dir``, array_record format),
then ``builder.as_data_source`` (what ``tfds.data_source`` calls; random access, no
TensorFlow) wrapped in a ``grain.MapDataset``. Nothing is downloaded at run time. Records
have a uint8 HxWxC ``"image"`` and, optionally, a ``ClassLabel`` ``"label"`` (datasets
without one, e.g. celeb_a, give ``num_classes == 0`` and all-zero labels).
``data.data_dir == ""`` means ``~/.cache/diffusion_jax/tensorflow_datasets``.

Images come out ``image_size x image_size`` (square). Named datasets whose images are not
already that size are center-cropped to a square and resized with PIL bilinear
(antialiased when shrinking); digits are only ever upscaled (``image_size >= 8``).
Then uint8 -> float32 ``x / 127.5 - 1`` in [-1, 1].

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
from PIL import Image

from diffusion_jax import data_order, datasets
from diffusion_jax.datasets import digits

DIGITS = digits.NAME
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "diffusion_jax", "tensorflow_datasets")

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


def _open(cfg: _Config, split: str):
    """Returns (random-access source, DatasetSpec, has_label, crop) for `split`."""
    builder, source = datasets.open_split(cfg.name, cfg.data_dir, split)
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"{cfg.name!r} has no 'image' feature (features: {list(features)})")
    native_shape = tuple(features["image"].shape)  # (H, W, C); H, W may be None
    if len(native_shape) != 3 or native_shape[-1] is None:
        raise ValueError(f"{cfg.name!r}: expected HxWxC images, got shape {native_shape}")
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
    return source, spec, has_label, cfg.name != DIGITS


# ----------------------------------------------------------------------------------------
# Per-example and per-batch transforms (module-level classes: picklable for grain workers).


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWxC -> uint8 size x size x C, PIL bilinear (antialiased when shrinking)."""
    channels = image.shape[-1]
    if channels in (1, 3):
        mode_image = image[..., 0] if channels == 1 else image
        out = np.asarray(Image.fromarray(mode_image).resize((size, size), Image.BILINEAR))
        return out.reshape(size, size, channels)
    return np.stack(  # any other channel count: one grayscale resize per channel
        [_resize(image[..., c : c + 1], size)[..., 0] for c in range(channels)], axis=-1
    )


def _center_crop_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


@dataclasses.dataclass(frozen=True)
class _PrepareExample:
    """TFDS record -> {"image": uint8 [S, S, C], "label": int32 scalar}."""

    image_size: int
    crop: bool
    has_label: bool

    def __call__(self, record):
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[..., None]
        if image.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {image.dtype}")
        if image.shape[:2] != (self.image_size, self.image_size):
            if self.crop:
                image = _center_crop_square(image)
            image = _resize(image, self.image_size)
        label = np.int32(record["label"]) if self.has_label else np.int32(0)
        return {"image": image, "label": label}


def _random_flip(example, rng: np.random.Generator):
    """Horizontal flip with probability 1/2; `rng` is grain's, keyed by (seed, index)."""
    if rng.integers(2):
        example = {**example, "image": example["image"][:, ::-1]}
    return example


def _to_float(batch):
    """uint8 [B, H, W, C] -> float32 in [-1, 1]; labels int32 [B]."""
    image = batch["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return {"image": image, "label": batch["label"].astype(np.int32)}


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


def dataset_spec(data_cfg) -> DatasetSpec:
    """Shapes (after resizing), class count and size of ``data_cfg.split``."""
    cfg = _parse_config(data_cfg)
    _, spec, _, _ = _open(cfg, cfg.split)
    return spec


def create_train_iterator(
    data_cfg, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> TrainIterator:
    """This process's infinite, shuffled, drop-remainder stream of ``batch_size`` examples.

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
    source, spec, has_label, crop = _open(cfg, cfg.split)
    n = spec.num_examples
    global_batch = batch_size * process_count
    if global_batch > n:
        raise ValueError(
            f"global batch {global_batch} (= {batch_size} x {process_count} "
            f"processes) exceeds the {n} examples of {cfg.name}:{cfg.split}"
        )

    # Index space of `ds`: epoch * n + position in that epoch's permutation.
    ds = data_order.EpochShuffle(grain.MapDataset.source(source), seed=int(seed))
    ds = ds.map(_PrepareExample(cfg.image_size, crop=crop, has_label=has_label))
    if cfg.random_flip:
        ds = ds.random_map(_random_flip, seed=_flip_seed(int(seed)))
    ds = data_order.ProcessRows(
        ds,
        num_examples=n,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    batches = ds.batch(batch_size, drop_remainder=True).map(_to_float)
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
    cfg = _parse_config(data_cfg)
    source, spec, has_label, crop = _open(cfg, split)
    prepare = _PrepareExample(cfg.image_size, crop=crop, has_label=has_label)
    images = np.empty((spec.num_examples, *spec.image_shape), np.uint8)
    labels = np.empty((spec.num_examples,), np.int32)
    for i in range(spec.num_examples):
        example = prepare(source[i])
        images[i], labels[i] = example["image"], example["label"]
    batch = _to_float({"image": images, "label": labels})
    return batch["image"], batch["label"]
