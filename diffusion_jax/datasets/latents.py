"""Latent datasets: a dataset encoded by an autoencoder (``python -m diffusion_jax.encode``),
stored as a TFDS dataset (array_record) in a directory of its own.

A latent diffusion run reads one with ``data.name = "latents"`` and ``data.data_dir = DIR``.
DIR holds
  latents.json     what the latents are (``read_metadata``): the autoencoder workdir and
                   checkpoint step, the posterior used (``mean`` or ``sample``), the latent
                   shape, the class count, the source dataset's data config, the splits and
                   their sizes, the train split's per-channel mean and std, and
                   ``scale_factor`` = 1 / (std of all train latent elements), measured here,
                   never assumed (Stable Diffusion's 0.18215 was measured the same way for its
                   VAE);
  chunks/          encoded chunks while encoding (removed once the dataset is built);
  latents/1.0.0/   the TFDS dataset: ``latent`` float32 [h, w, c] (unscaled), ``label``
                   (when the source has classes) and ``index`` (the row in the source split).
The data pipeline multiplies latents by ``scale_factor`` (so they have unit std, as the
diffusion schedules assume); decoders divide by it.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.datasets import prepare

NAME = "latents"  # the `data.name` that selects a latent dataset
METADATA_FILE = "latents.json"
CHUNKS_DIR = "chunks"


class LatentDatasetError(FileNotFoundError):
    pass


def _encode_hint(data_dir: str) -> str:
    return (
        f"encode one with `python -m diffusion_jax.encode --autoencoder=WORKDIR "
        f"--out={data_dir}` (it resumes an interrupted encoding)"
    )


def metadata_path(data_dir: str) -> str:
    return os.path.join(data_dir, METADATA_FILE)


def read_metadata(data_dir: str) -> dict[str, Any]:
    """The latents.json of a latent dataset directory; a clear error when there is none."""
    path = metadata_path(data_dir)
    if not os.path.exists(path):
        raise LatentDatasetError(
            f"data.data_dir={data_dir!r} holds no latent dataset (no {METADATA_FILE}); "
            + _encode_hint(data_dir)
        )
    with open(path) as f:
        return json.load(f)


def write_metadata(data_dir: str, metadata: dict[str, Any]) -> None:
    tmp = metadata_path(data_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    os.replace(tmp, metadata_path(data_dir))


def chunk_path(data_dir: str, split: str, index: int) -> str:
    return os.path.join(data_dir, CHUNKS_DIR, f"{split}-{index:06d}.npz")


def chunk_files(data_dir: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(data_dir, CHUNKS_DIR, f"{split}-*.npz")))


class Latents(prepare.DirectoryBuilder):
    """A dataset encoded to latents; features and splits come from DIR/latents.json."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Unscaled float32 latents, label, source index (+ caption)."}
    read_metadata = staticmethod(read_metadata)

    def _info(self) -> tfds.core.DatasetInfo:
        m = self._metadata
        features = {
            "latent": tfds.features.Tensor(shape=tuple(m["latent_shape"]), dtype=np.float32),
            "index": tfds.features.Scalar(dtype=np.int32),
        }
        if m["num_classes"]:
            features["label"] = tfds.features.ClassLabel(num_classes=m["num_classes"])
        if m.get("captions"):
            features["caption"] = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{m['source']['name']} encoded by the autoencoder in "
            f"{m['autoencoder']} (step {m['autoencoder_step']}, posterior {m['posterior']}).",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # source order within each split
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in self._metadata["splits"]}

    def _generate_examples(self, split: str):
        has_label = bool(self._metadata["num_classes"])
        has_caption = bool(self._metadata.get("captions"))
        for path in chunk_files(self._source_dir, split):
            with np.load(path) as chunk:
                latents, labels, index = chunk["latent"], chunk["label"], chunk["index"]
                captions = chunk["caption"] if has_caption else [None] * len(index)
            for z, y, i, text in zip(latents, labels, index, captions):
                example = {"latent": z, "index": int(i)}
                if has_label:
                    example["label"] = int(y)
                if has_caption:
                    example["caption"] = str(text)
                yield int(i), example


def builder(data_dir: str) -> Latents:
    """The prepared latent dataset in ``data_dir``; a clear error naming the fix when the
    directory holds none or its encoding has not finished."""
    dataset = Latents(data_dir=data_dir)
    if not dataset.is_prepared():
        raise LatentDatasetError(
            f"the latent dataset in {data_dir!r} is not complete; " + _encode_hint(data_dir)
        )
    return dataset


def build(data_dir: str) -> Latents:
    """Write the TFDS dataset from the encoded chunks (array_record)."""
    return Latents.build(data_dir)
