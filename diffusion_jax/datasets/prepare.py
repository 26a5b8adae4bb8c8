"""Preparing a locally built TFDS dataset once, safely when several processes race."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import tensorflow_datasets as tfds


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
