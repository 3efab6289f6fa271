"""Stop signals: ask training to save a resumable checkpoint and exit, on every rank together.

SIGTERM (``scancel``, ``timeout``, torchrun passing on its own), SIGINT (Ctrl-C) and SIGUSR1
(SLURM's ``--signal`` before the time limit) only set a flag; the training loop agrees on it
with the other ranks at its next log step and then saves. Launchers and terminals signal the
whole process group, DataLoader workers included, so workers ignore these signals: they must
outlive the save (the main process shuts them down as usual). A worker ignores them from its
first instruction on, because the main process starts workers with the signals blocked
(``shielded_batches``): the mask is inherited, the worker sets them to ignored, then unblocks.
"""
from __future__ import annotations

import contextlib
import functools
import signal
from typing import Callable, Iterable, Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """Within the block, a stop signal sets ``received`` (its number) instead of ending the process;
    ``stop()`` tells whether one arrived. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # only a flag: printing here could re-enter a half-written stdout buffer
        self.received = signum

    def __call__(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a stop signal"

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _ignore_stop_signals(worker_id: int, then: Optional[Callable[[int], None]] = None) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # also discards one that arrived while blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if then is not None:
        then(worker_id)


def protect_workers(*loaders) -> None:
    """Make the workers of these DataLoaders ignore the stop signals (before any ``worker_init_fn``
    they already have)."""
    for loader in loaders:
        if getattr(loader.worker_init_fn, "func", None) is not _ignore_stop_signals:
            loader.worker_init_fn = functools.partial(_ignore_stop_signals, then=loader.worker_init_fn)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_END = object()


def shielded_batches(loader: Iterable) -> Iterator:
    """The batches of ``loader``; its worker processes (started by the first ``next``) begin
    life with the stop signals blocked, so one sent to the process group just then cannot kill
    a worker before it has set them to ignored. A signal meanwhile waits for the main process."""
    with _stop_signals_blocked():
        batches = iter(loader)
        first = next(batches, _END)
    if first is _END:
        return
    yield first
    yield from batches
