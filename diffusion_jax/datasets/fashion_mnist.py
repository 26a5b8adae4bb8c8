"""Fashion-MNIST (Xiao et al. 2017) as a TFDS builder, built offline from its IDX files.

70,000 28x28 grayscale images of 10 kinds of clothing (``CLASS_NAMES``): "train" 60,000,
"test" 10,000, each split in the order of its IDX file (``index``: the row there).

Source, first found wins; nothing is downloaded:
  1. the directory in ``$DIFFUSION_JAX_FASHION_MNIST_DIR`` (when set it must hold the four
     IDX files, or this raises);
  2. ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install dataset-fashion-mnist``).
  The four files are ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each gzipped
  (``.gz``) or not. They are parsed here (``read_idx``) and written once, on first use, as
  the TFDS dataset ``fashion_mnist_idx`` (array_record) under the data dir, with config
  ``source_<sha256 of the four files, 12 hex>``: another set of files (a test's tiny
  ones, say) is written next to it, never mixed with or mistaken for it. The config's
  description (in ``dataset_info.json``) names the source directory.
Without a source: a ``fashion_mnist_idx`` copy already prepared in the data dir is read if
there is exactly one; else TFDS's own ``fashion_mnist`` if it is prepared there (its own
example order; a warning says so); else FileNotFoundError saying how to get the data.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import logging
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffusion_jax.datasets import prepare

NAME = "fashion_mnist"  # the `data.name` that selects this dataset
TFDS_NAME = "fashion_mnist_idx"  # our builder (TFDS's own builder is "fashion_mnist")
IMAGE_SIZE = 28
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)

ENV_VAR = "DIFFUSION_JAX_FASHION_MNIST_DIR"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
# Searched after $ENV_VAR, in order (a list, so tests can replace it).
SEARCH_DIRS = [DEBIAN_DIR]
# split -> (images file, labels file), without the optional ".gz".
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x0803 / 0x0801: unsigned bytes, 3 / 1 dims

_BIG_ENDIAN_U32 = np.dtype(">u4")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# IDX files.


class IdxError(ValueError):
    """A malformed IDX file (the message names it)."""


def read_idx(path: str, magic: int) -> np.ndarray:
    """The uint8 array in IDX file `path` (gzipped or not), whose magic must be `magic`.

    IDX: a big-endian uint32 magic ``0x0000TTNN`` (type TT = 0x08, unsigned bytes; NN
    dimensions), NN big-endian uint32 sizes, then exactly their product of bytes.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise IdxError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4:
        raise IdxError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    found = int(np.frombuffer(raw[:4], _BIG_ENDIAN_U32)[0])
    if found != magic:
        raise IdxError(
            f"{path}: IDX magic number {found} (0x{found:08x}), expected {magic} "
            f"(0x{magic:08x}); not the right IDX file, or corrupt"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], _BIG_ENDIAN_U32))
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != size:
        what = "truncated" if len(raw) - header < size else "trailing bytes"
        raise IdxError(
            f"{path}: {what}: shape {shape} needs {size} data bytes, found {len(raw) - header}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _idx_path(directory: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def idx_paths(directory: str) -> list[str] | None:
    """The four IDX files in `directory` (images, labels of train, then of test), or None
    when any is missing."""
    paths = [_idx_path(directory, stem) for pair in IDX_FILES.values() for stem in pair]
    return None if None in paths else paths


def load_idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 28, 28], uint8 labels [N]) of `split` from the IDX files in
    `directory`; IdxError naming the file if they do not fit together."""
    images_stem, labels_stem = IDX_FILES[split]
    images_path, labels_path = (_idx_path(directory, s) for s in (images_stem, labels_stem))
    if images_path is None or labels_path is None:
        raise FileNotFoundError(f"{directory} lacks {images_stem}[.gz] or {labels_stem}[.gz]")
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise IdxError(
            f"{images_path}: images are {images.shape[1:]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    if len(images) != len(labels):
        raise IdxError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise IdxError(f"{labels_path}: label {labels.max()} is not a class 0..{NUM_CLASSES - 1}")
    return images, labels


def find_source() -> str | None:
    """The directory with the four IDX files: ``$ENV_VAR`` if set (FileNotFoundError if it
    lacks a file), else the first of ``SEARCH_DIRS`` that has them all, else None."""
    explicit = os.environ.get(ENV_VAR, "")
    if explicit:
        if idx_paths(explicit) is None:
            raise FileNotFoundError(
                f"{ENV_VAR}={explicit!r} does not hold the four Fashion-MNIST IDX files "
                f"({', '.join(s for pair in IDX_FILES.values() for s in pair)}, each "
                "optionally .gz). " + how_to_get()
            )
        return explicit
    for directory in SEARCH_DIRS:
        if idx_paths(directory) is not None:
            return directory
    return None


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # cache key only: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_hash(directory: str) -> str:
    """sha256 (12 hex digits) over the four IDX files' sha256s, in ``IDX_FILES`` order."""
    paths = idx_paths(directory)
    if paths is None:
        raise FileNotFoundError(f"{directory} lacks Fashion-MNIST IDX files")
    digests = []
    for path in paths:
        stat = os.stat(path)
        digests.append(_sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(" ".join(digests).encode()).hexdigest()[:12]


def how_to_get() -> str:
    """How to make Fashion-MNIST available offline (both ways)."""
    return (
        "Get Fashion-MNIST in one of two ways: (1) `apt-get install dataset-fashion-mnist` "
        f"(installs the IDX files in {DEBIAN_DIR}), or set {ENV_VAR} to a directory "
        "holding the four IDX files; (2) on a machine with internet access, "
        "`tfds build fashion_mnist --data_dir=DIR --file_format=array_record`, copy DIR "
        "here and pass --config.data.data_dir=DIR. Nothing is downloaded at run time."
    )


# ----------------------------------------------------------------------------------------
# The TFDS builder.


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from local IDX files; one config per source (see the module doc).

    ``source_dir`` is where the IDX files are; the config (``source_<hash>``) is derived
    from their contents, so ``FashionMnistIdx(source_dir=..., data_dir=...)`` finds the
    copy prepared from exactly these files.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Fashion-MNIST IDX files; IDX order; uint8 Tensor images."}

    def __init__(self, *, source_dir: str, **kwargs):
        self._source_dir = os.path.abspath(source_dir)
        self._source_hash = source_hash(self._source_dir)
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # As digits.SklearnDigits: TFDS's default probes `importlib_resources`.
        return epath.Path(__file__)

    def get_default_builder_config(self) -> tfds.core.BuilderConfig:
        # The instance's own config, named after its source (not a class-level
        # BUILDER_CONFIGS entry: the set of sources is open).
        return tfds.core.BuilderConfig(
            name=f"source_{self._source_hash}",
            description=f"IDX files in {self._source_dir} (sha256 {self._source_hash}...)",
        )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Xiao et al. 2017) read from local IDX files; "
            "each split in its IDX file's order.",
            features=tfds.features.FeaturesDict(
                {
                    # Tensor, not Image: encoding Image features needs TensorFlow.
                    "image": tfds.features.Tensor(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "index": tfds.features.Scalar(dtype=np.int32),  # row in the IDX file
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            disable_shuffling=True,  # keep the IDX order within each split
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in IDX_FILES}

    def _generate_examples(self, split):
        images, labels = load_idx_split(self._source_dir, split)
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image[..., None], "label": int(label), "index": i}


def _prepared_copies(data_dir: str) -> list[str]:
    """Version directories of the ``fashion_mnist_idx`` copies prepared in `data_dir`."""
    pattern = os.path.join(data_dir, TFDS_NAME, "source_*", str(FashionMnistIdx.VERSION))
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(pattern, "dataset_info.json")))


def builder(data_dir: str) -> tfds.core.DatasetBuilder:
    """The prepared Fashion-MNIST builder in `data_dir`, built from the IDX source first if
    needed; without a source, an already prepared copy (see the module doc)."""
    source = find_source()
    if source is not None:
        return prepare.prepare_once(
            lambda: FashionMnistIdx(
                source_dir=source, data_dir=data_dir, file_format="array_record"
            ),
            data_dir,
        )
    copies = _prepared_copies(data_dir)
    if len(copies) == 1:
        prepared = tfds.builder_from_directory(copies[0])
        log.info(
            "Fashion-MNIST: no IDX files found; reading the copy in %s, built from %s",
            copies[0],
            prepared.info.config_description,
        )
        return prepared
    if not copies:
        theirs = tfds.builder("fashion_mnist", data_dir=data_dir)
        if theirs.is_prepared():
            log.warning(
                "Fashion-MNIST: no IDX files found; reading TFDS's own fashion_mnist from %s "
                "(its example order differs from the IDX files')",
                data_dir,
            )
            return theirs
    several = (
        f" ({len(copies)} copies from different sources: {copies}; set ${ENV_VAR} to the "
        "source of the one to use, or remove the others)"
    )
    raise FileNotFoundError(
        f"Fashion-MNIST: no IDX files in ${ENV_VAR} or {SEARCH_DIRS}, and no single prepared "
        f"copy in data_dir={data_dir!r}{several if copies else ''}. " + how_to_get()
    )
