"""The bundled offline dataset: scikit-learn's 8x8 handwritten digits as a TFDS builder.

1,797 images, 10 classes, written once, on first use, as the TFDS dataset
``sklearn_digits`` (array_record) under the data dir. Pixels 0..16 are stored as uint8
``round(x * 255 / 16)``. Splits: sklearn example ``i`` goes to "test" when ``i % 6 == 5``
(299 images) and to "train" otherwise (1,498 images), in sklearn order.

The builder class must live in a package module: TFDS mis-handles builder classes defined
in ``__main__`` or a script.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffusion_jax.datasets import prepare

NAME = "digits"  # the `data.name` that selects this dataset
IMAGE_SIZE = 8  # digits are IMAGE_SIZE x IMAGE_SIZE x 1
NUM_CLASSES = 10

_TEST_EVERY = 6  # sklearn example i is a test example iff i % 6 == 5


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (UCI optdigits test set) as a TFDS dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn load_digits(); uint8 round(x*255/16); i%6==5 -> test."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default probes `importlib_resources` (not installed, not a tfds dependency)
        # for builders that live in a package; the file path is what it would find anyway.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's bundled 8x8 handwritten digits, pixels 0..16 -> uint8 "
            "round(x*255/16); sklearn row i is in 'test' iff i % 6 == 5.",
            features=tfds.features.FeaturesDict(
                {
                    # Tensor, not Image: encoding Image features needs TensorFlow.
                    "image": tfds.features.Tensor(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "index": tfds.features.Scalar(dtype=np.int32),  # row in load_digits()
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep sklearn order within each split
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        images, labels = digits_uint8()
        index = np.arange(len(images))
        is_test = index % _TEST_EVERY == _TEST_EVERY - 1
        return {
            "train": self._generate_examples(images, labels, index[~is_test]),
            "test": self._generate_examples(images, labels, index[is_test]),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 sklearn digits as (uint8 [N, 8, 8, 1] in 0..255, int64 labels [N])."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target


def builder(data_dir: str) -> SklearnDigits:
    """The prepared digits builder, building it first if needed (safe when processes race:
    ``prepare.prepare_once``)."""
    return prepare.prepare_once(
        lambda: SklearnDigits(data_dir=data_dir, file_format="array_record"), data_dir
    )
