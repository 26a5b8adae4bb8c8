"""Preparing a locally built TFDS dataset once, safely when several processes race; the
base of builders that a metadata file in their own directory describes."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from typing import Any

import tensorflow_datasets as tfds
from etils import epath


@contextlib.contextmanager
def file_lock(directory: str, name: str):
    """Exclusive lock on ``<directory>/.<name>.lock`` (no-op for remote paths)."""
    if "://" in directory:
        yield
        return
    import fcntl

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f".{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_once(
    make: Callable[[], tfds.core.DatasetBuilder], data_dir: str
) -> tfds.core.DatasetBuilder:
    """``make()``'s builder, prepared (array_record) in `data_dir` first if it is not yet.

    ``make`` builds the builder for `data_dir` (called up to three times). The
    check-and-build runs under a file lock named after the builder, and TFDS writes into
    an ``incomplete.*`` directory that is renamed when complete, so racing processes build
    once and readers never see a partial dataset. Nothing is downloaded.
    """
    prepared = make()
    if prepared.is_prepared():
        return prepared
    with file_lock(data_dir, prepared.name):
        prepared = make()
        if not prepared.is_prepared():
            prepared.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
    return make()  # re-read the info written to disk


class DirectoryBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose features and splits are described by a metadata file in its own
    ``data_dir``, next to the arrays it is built from (latent and subject datasets). A
    subclass defines ``read_metadata(data_dir)`` (a staticmethod that raises a clear error
    when the directory holds none); the builder keeps it as ``self._metadata`` and the
    directory as ``self._source_dir``."""

    read_metadata: Callable[[str], dict[str, Any]]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))  # see digits.SklearnDigits.code_path

    def __init__(self, *, data_dir: str, **kwargs):
        self._metadata = self.read_metadata(data_dir)
        self._source_dir = data_dir
        super().__init__(data_dir=data_dir, **kwargs)

    @classmethod
    def build(cls, data_dir: str):
        """Write the TFDS dataset (array_record) from the directory's arrays."""
        cls(data_dir=data_dir, file_format="array_record").download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
        return cls(data_dir=data_dir)
