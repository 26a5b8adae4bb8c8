"""Subject datasets: the training data of a subject-tuning (DreamBooth) run, written by
``python -m diffusion_jax.subject`` into a directory of their own.

A run reads one with ``data.name = "subject"`` and ``data.data_dir = DIR``. DIR holds
  subject.json   what the data is (``read_metadata``): the base workdir it was made for
                 (step, parameter fingerprint), the identifier label, the class count
                 with it, the instance images' source, how the prior images were drawn,
                 the prior-preservation weight and how it was realised (repeats), the
                 splits and their sizes;
  train.npz, test.npz   ``image`` uint8 [N, H, W, C], ``label`` int32 [N], ``source``
                 (0 = an instance of the subject, 1 = a prior image drawn by the base),
                 and for a caption-conditioned base ``caption`` str [N];
  subject/1.0.0/ the TFDS dataset built from them (array_record).
The train split mixes instances (labelled with the identifier) and prior images (labelled
with the class they were drawn for); the test split holds held-out instances only.
A caption-conditioned subject (glyph_subject.py) names its identifier as a word in the
captions instead: its subject.json holds the extended ``vocabulary`` and the dataset
the captions come from (``caption_source``), and its examples carry a "caption".
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.datasets import prepare

NAME = "subject"  # the `data.name` that selects a subject dataset
METADATA_FILE = "subject.json"
INSTANCE, PRIOR = 0, 1  # the `source` of an example


class SubjectDatasetError(FileNotFoundError):
    pass


def read_metadata(data_dir: str) -> dict[str, Any]:
    """The subject.json of ``data_dir``; a clear error naming the fix when there is none."""
    path = os.path.join(data_dir, METADATA_FILE)
    if not os.path.exists(path):
        raise SubjectDatasetError(
            f"data.data_dir={data_dir!r} holds no subject dataset (no {METADATA_FILE}); "
            f"make one with `python -m diffusion_jax.subject --base=WORKDIR --out={data_dir}`"
        )
    with open(path) as f:
        return json.load(f)


def has_captions(metadata: dict[str, Any]) -> bool:
    """Whether the subject is caption-conditioned (its identifier a word, not a label)."""
    return "vocabulary" in metadata


def split_path(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, f"{split}.npz")


class Subject(prepare.DirectoryBuilder):
    """A subject dataset; features and splits come from DIR/subject.json."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "uint8 image, label, source (instance / prior), index."}
    read_metadata = staticmethod(read_metadata)

    def _info(self) -> tfds.core.DatasetInfo:
        m = self._metadata
        features = {
            "image": tfds.features.Tensor(shape=tuple(m["image_shape"]), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=m["num_classes"]),
            "source": tfds.features.Scalar(dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int32),
        }
        if has_captions(m):
            features["caption"] = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"subject data for {m['base']['workdir']}: identifier "
            f"{m['identifier']!r}, prior weight {m['prior_weight']}.",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # the written order within each split
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in self._metadata["splits"]}

    def _generate_examples(self, split: str):
        with np.load(split_path(self._source_dir, split)) as arrays:
            images, labels, source = arrays["image"], arrays["label"], arrays["source"]
            captions = arrays["caption"] if has_captions(self._metadata) else None
        for i, (x, y, s) in enumerate(zip(images, labels, source)):
            example = {"image": x, "label": int(y), "source": int(s), "index": i}
            if captions is not None:
                example["caption"] = str(captions[i])
            yield i, example


def write(data_dir: str, metadata: dict[str, Any], splits: dict[str, dict[str, np.ndarray]]):
    """Write the arrays of each split and subject.json, then build the TFDS dataset."""
    os.makedirs(data_dir, exist_ok=True)
    for split, arrays in splits.items():
        np.savez(split_path(data_dir, split), **arrays)
    metadata = {**metadata, "splits": {k: len(v["label"]) for k, v in splits.items()}}
    tmp = os.path.join(data_dir, METADATA_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(data_dir, METADATA_FILE))
    return Subject.build(data_dir)


def builder(data_dir: str) -> Subject:
    """The subject dataset in ``data_dir``; a clear error when it is missing or unfinished."""
    dataset = Subject(data_dir=data_dir)
    if not dataset.is_prepared():
        raise SubjectDatasetError(
            f"the subject dataset in {data_dir!r} is not complete; run the same "
            "`python -m diffusion_jax.subject` command again"
        )
    return dataset


__all__ = (
    "INSTANCE",
    "METADATA_FILE",
    "NAME",
    "PRIOR",
    "Subject",
    "SubjectDatasetError",
    "builder",
    "has_captions",
    "read_metadata",
    "write",
)
