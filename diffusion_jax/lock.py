"""One training run per workdir: ``<workdir>/lock``, held for the whole run.

Two trainings on one workdir would overwrite each other's checkpoints and config.json and
interleave their metrics, so the second is refused with one line naming the first (host,
pid, start time). The lock is an advisory ``flock`` on the file, which the kernel drops when
its process ends however it ends (kill -9 included): a lock left by a dead run never blocks
its resume, and there is nothing to clean up by hand. The file keeps the JSON description of
its last holder; only the ``flock`` decides whether the workdir is busy.

Multi-process runs take one lock for the run: process 0 takes it and tells the others the
outcome through jax.distributed's key-value store, so every process refuses or proceeds
together. Reading a workdir (sample, evaluate) takes no lock. On a file system without
``flock`` support the run goes on unlocked, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import socket
import sys
import time

import jax

from diffusion_jax import parallel
from diffusion_jax.workdir import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
_OK = "ok"
_TIMEOUT_MS = 300_000
_acquisitions = itertools.count()  # one key-value key per acquisition, same on every process


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir's lock (raises ConfigError if
    another run holds it). All processes of a multi-process run enter it together."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        refusal = self._lock_locally() if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            refusal = self._share(refusal)
        if refusal is not None:
            raise ConfigError(refusal)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def _lock_locally(self) -> str | None:
        """Take the flock; None on success, else the one-line refusal."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                log.warning(
                    "%s: the file system does not support locks (%s); not locked", self.path, e
                )
                return None
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            return (
                f"--workdir {self.workdir} is in use by another training run ({holder}); wait "
                "for it to finish or stop it, or choose another --workdir"
            )
        os.ftruncate(fd, 0)
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "processes": jax.process_count(),
            "command": " ".join(sys.argv),
        }
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return None

    def _share(self, refusal: str | None) -> str | None:
        """Process 0's outcome on every process (through the coordination service)."""
        client = parallel.coordination_client()
        key = f"diffusion_jax/workdir_lock/{next(_acquisitions)}"
        if jax.process_index() == 0:
            client.key_value_set(key, refusal or _OK)
            return refusal
        outcome = client.blocking_key_value_get(key, _TIMEOUT_MS)
        return None if outcome == _OK else outcome


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "holder unknown: its lock file was written by another version"
