"""Preemption: tell the training loop to save a checkpoint and exit when the job gets
SIGTERM (what schedulers send before killing), on one process or many.

`PreemptionHandler` is a callable ``should_stop(step)``; see its docstring for the single-
and multi-process behaviour. Use it as a context manager: ``with PreemptionHandler() as
should_stop:`` installs it once and restores the previous signal handlers on exit.

A preempted run exits with EXIT_CODE (75, sysexits' EX_TEMPFAIL: "try again later"), not 0,
so a scheduler's requeue logic can tell "saved, resume me" from "finished" (SLURM:
``--requeue`` plus a wrapper that requeues on 75).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Iterable

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

EXIT_CODE = 75  # EX_TEMPFAIL


class Interrupted(Exception):
    """Raised while sampling once the job got SIGTERM (see `generate`). ``pending`` is the
    abandoned batch, still computing: wait for it (after saving) before exiting, since
    tearing the runtime down under a running computation crashes the process."""

    def __init__(self, message: str, pending=None):
        super().__init__(message)
        self.pending = pending


class PreemptionHandler:
    """Tells the training loop to save and exit once the job is being preempted.

    Use ``should_stop = install_preemption_handler()`` (or ``with PreemptionHandler() as
    should_stop:``) and call ``should_stop(step)`` once per step on every process; when it
    returns True: ``ckpt.save(step, state, force=True); ckpt.wait()`` and exit.

    * Single process: a Python handler for ``signals`` (SIGTERM, which schedulers send before
      killing) sets a flag; the step argument is ignored. `uninstall()` (or leaving the
      ``with`` block) puts the previous handlers back.
    * Several processes (`jax.distributed.initialize` was called): jax's preemption service
      already catches SIGTERM in C++ (a Python handler would replace it, and hosts would stop
      at different steps and deadlock in the save), so no handler is installed and
      ``should_stop(step)`` is `multihost_utils.reached_preemption_sync_point(step)`: True on
      all hosts at the same step once any host got the signal (orbax's CheckpointManager uses
      the same call). It needs ``step``, the same on every host, every step. If the service
      is disabled (``jax_enable_preemption_service=False``) it falls back to the local flag
      with a warning; the hosts then stop at the same step only if they all get the signal.

    Signal handlers can only be installed from the main thread.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._received: int | None = None
        self._received_at: float | None = None
        self._reported = False
        self._multihost = False

    @property
    def received(self) -> bool:
        """Whether this process got one of ``signals`` since `install()` (single-process mode)."""
        return self._received is not None

    def install(self) -> "PreemptionHandler":
        if self._previous:
            return self  # already installed
        if jax.process_count() > 1:
            if jax.config.jax_enable_preemption_service:
                self._multihost = True
                log.info("Using jax's multi-host preemption service (SIGTERM is handled by jax).")
                return self
            log.warning(
                "jax_enable_preemption_service is off; using a per-process SIGTERM flag, so the "
                "hosts stop at the same step only if all of them receive the signal."
            )
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must be called from the main thread.")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; fall back to default.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        # Runs in the main thread between bytecodes: only set the flag (no logging here).
        if self._received is None:
            self._received, self._received_at = signum, time.time()

    def should_stop(self, step: int | None = None) -> bool:
        if self._multihost:
            if step is None:
                raise ValueError("should_stop(step) needs the step in multi-process runs.")
            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        if self._received is not None and not self._reported:
            self._reported = True
            log.warning(
                "Received %s at %s: the run should save a checkpoint and exit.",
                signal.Signals(self._received).name,
                time.strftime("%H:%M:%S", time.localtime(self._received_at)),
            )
        return self._received is not None

    __call__ = should_stop

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def install_preemption_handler(signals: Iterable[int] = (signal.SIGTERM,)) -> PreemptionHandler:
    """Installs a `PreemptionHandler` and returns it; call it as ``should_stop(step)``."""
    return PreemptionHandler(signals).install()
